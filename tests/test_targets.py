"""Target resolution and the non-host build paths (compile only: no Arm board or GPU here)."""

import shutil
import warnings

import pytest
from onnx_models import small_cnn

import psb_tvm
from psb_tvm.target import host_cpu, resolve_target


def test_cpu_shorthands_resolve_to_this_host_not_generic_llvm():
    for name in ("llvm", "cpu"):
        target = resolve_target(name)
        assert target.kind.name == "llvm"
        assert str(target.attrs["mcpu"]) == host_cpu() != "generic"


def test_dict_and_target_objects_pass_through():
    target = resolve_target({"kind": "llvm", "mcpu": "skylake-avx512"})
    assert str(target.attrs["mcpu"]) == "skylake-avx512"
    assert resolve_target(target) is target


def test_target_strings_with_options():
    target = resolve_target("llvm -mcpu=skylake-avx512 -num-cores=2")
    assert str(target.attrs["mcpu"]) == "skylake-avx512" and int(target.attrs["num-cores"]) == 2
    with pytest.raises(psb_tvm.ConfigError, match="invalid target string"):
        resolve_target("llvm -no-such-option=1")


def test_unknown_target_is_a_config_error():
    with pytest.raises(psb_tvm.ConfigError, match="unknown target 'tpu'"):
        resolve_target("tpu")
    with pytest.raises(psb_tvm.ConfigError, match="invalid target dict"):
        resolve_target({"kind": "no-such-kind"})


@pytest.mark.parametrize("target", ["aarch64", "cuda"])
def test_cross_targets_compile_and_refuse_to_run_here(target, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = psb_tvm.compile(small_cnn(), target=target, samples=4)
    assert [l["status"] for l in module.layers].count("psb") == 5
    import numpy as np

    with pytest.raises(psb_tvm.errors.TargetMismatchError, match="cannot run on this host"):
        module.run(np.zeros((1, 3, 12, 12), np.float32))
    out = tmp_path / "m.so"
    if target == "aarch64" and shutil.which("aarch64-linux-gnu-g++") is None:
        with pytest.raises(psb_tvm.errors.ConfigError, match="aarch64-linux-gnu-g\\+\\+"):
            module.export_library(out)
        assert list(tmp_path.iterdir()) == []
    else:
        module.export_library(out)
        assert out.stat().st_size > 0
