"""Target resolution: shorthands map to concrete TVM targets, never to generic ``llvm``."""

from __future__ import annotations

import os

import tvm

from .errors import ConfigError

SHORTHANDS = ("llvm", "cpu", "aarch64", "cuda")


def host_cpu() -> str:
    """The host CPU name as LLVM knows it (e.g. ``znver4``); plain ``llvm`` would be generic x86."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


def host_target() -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mcpu": host_cpu(), "num-cores": os.cpu_count() or 1})


def resolve_target(target) -> tvm.target.Target:
    """Accept a ``tvm.target.Target``, a dict, a TVM target string with options (``"llvm -mcpu=..."``)
    or one of the shorthands in ``SHORTHANDS``."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        try:
            return tvm.target.Target(target)
        except Exception as err:  # noqa: BLE001 - TVM raises several types here
            raise ConfigError(f"invalid target dict {target!r}: {err}") from err
    if target in ("llvm", "cpu"):
        return host_target()
    if target == "aarch64":
        return tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]})
    if target == "cuda":
        return tvm.target.Target("nvidia/nvidia-h100")
    if isinstance(target, str) and " " in target.strip() and target.split()[0] in ("llvm", "cuda", "c"):
        # The classic TVM string form ("llvm -mcpu=znver4 -num-cores=2"), which TVM 0.27 only
        # accepts as a dict: "-key=value" options, comma lists for mattr / keys / libs.
        kind, *opts = target.split()
        config = {"kind": kind}
        for opt in opts:
            key, sep, value = opt.lstrip("-").partition("=")
            if not opt.startswith("-") or not sep or not key:
                raise ConfigError(f"invalid target string {target!r}: option {opt!r} is not -key=value")
            config[key] = (value.split(",") if key in ("mattr", "keys", "libs")
                           else int(value) if value.lstrip("-").isdigit() else value)
        try:
            return tvm.target.Target(config)
        except Exception as err:  # noqa: BLE001 - TVM raises several types here
            raise ConfigError(f"invalid target string {target!r}: {err}") from err
    raise ConfigError(f"unknown target {target!r}: pass a tvm.target.Target, a dict, a TVM target string "
                      f"(\"llvm -mcpu=...\"), or one of {SHORTHANDS}")


def is_host_cpu(target: tvm.target.Target) -> bool:
    """True when modules built for ``target`` can run in this process."""
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    return triple == "" or triple.startswith("x86_64")
