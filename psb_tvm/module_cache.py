"""Compiled modules on disk: machine code generated at compile time, and reused by later compiles.

TVM generates a module's machine code lazily, on its first call (9.3 s of a 9.3 s first call on
PP-OCR's classifier, against 3 ms for the second), and again when it is exported. ``compile``
therefore exports every host-CPU module once, into this cache, and runs it from there: the first
call costs what the second does, ``export_library`` copies the file, and a later compile of the same
lowered module (same model, calibration, config, defaults and target) loads it instead of building.

The key is a SHA-256 of everything the library depends on: psb_tvm's and TVM's versions, psb_tvm's
own sources (``code_fingerprint``: the schedule rules and build passes act after the lowered module), the
target, the lowered Relax module (structural hash, weights included), the metadata it embeds and
the tuning database's files. Entries are written all-or-nothing with the integrity record that
``load`` checks, and the least recently used ones are removed beyond ``PSB_TVM_MODULE_CACHE_MAX_BYTES``.
The kernels the libraries are linked from live in ``kernels/`` beside them (``psb_tvm.kernel_cache``,
a quarter of that budget): a compile that misses here reuses every kernel it shares with earlier ones.

Where: ``compile(..., cache=...)``: a directory, ``False`` (no cache: the executable is kept in
memory and generates its code on the first call, as TVM does), or ``None``: ``$PSB_TVM_MODULE_CACHE``
(a directory, or ``off``), else ``$PSB_TVM_CACHE/modules``, else ``~/.cache/psb_tvm/modules``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
import warnings

import tvm
import tvm_ffi

from . import passes, schedules
from .errors import ConfigError, ModelLoadError, OutputError
from .files import cache_root, file_sha256, verify_module

LOG = logging.getLogger("psb_tvm")
ENV_DIR = "PSB_TVM_MODULE_CACHE"
ENV_MAX_BYTES = "PSB_TVM_MODULE_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 4 << 30
SUFFIX = ".so"


def cache_dir(setting=None) -> pathlib.Path | None:
    """The cache directory for ``compile(cache=setting)``, or ``None`` when caching is off."""
    if setting is False:
        return None
    if setting is True:
        setting = None
    if setting is None:
        env = os.environ.get(ENV_DIR, "").strip()
        if env.lower() in ("off", "0", "false", "no"):
            return None
        if env:
            return pathlib.Path(env)
        return cache_root() / "modules"
    if isinstance(setting, (str, os.PathLike)):
        return pathlib.Path(setting)
    raise ConfigError(f"cache must be a directory, True, False or None, got {type(setting).__name__}")


def kernel_dir(directory: pathlib.Path) -> pathlib.Path:
    """Where the kernel objects of the modules in ``directory`` are kept."""
    return pathlib.Path(directory) / "kernels"


def writable(directory: pathlib.Path) -> bool:
    """``directory`` exists (created if need be) and this process may write there; if not, a
    warning says so (the compile goes on without the cache)."""
    try:
        pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as err:
        _warn_unusable(directory, err)
        return False
    return True


def _warn_unusable(directory, err):
    warnings.warn(f"module cache {directory} is not usable ({err}); compiling without it "
                  f"(set ${ENV_DIR}=off to silence this)", stacklevel=4)


def _max_bytes() -> int:
    value = os.environ.get(ENV_MAX_BYTES, "").strip()
    try:
        return int(value) if value else DEFAULT_MAX_BYTES
    except ValueError:
        raise ConfigError(f"${ENV_MAX_BYTES} must be a number of bytes, got {value!r}") from None


def _tuning_fingerprint(tuning_db) -> str | None:
    """SHA-256 over a tuning work dir's files; ``""`` without a database; ``None`` when the
    database cannot be fingerprinted (an in-memory MetaSchedule database: then nothing is cached)."""
    if tuning_db is None:
        return ""
    if not isinstance(tuning_db, (str, os.PathLike)) or not os.path.isdir(tuning_db):
        return None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(tuning_db)):
        path = os.path.join(tuning_db, name)
        if os.path.isfile(path) and name.endswith(".json"):
            digest.update(name.encode() + b"\0" + file_sha256(path).encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """SHA-256 over psb_tvm's own sources (the package, its passes and schedules): the build
    pipeline and the schedule rules act after the lowered module the key hashes, so a changed rule
    must not load a library built by the old one (the version string stays the same between
    releases)."""
    digest = hashlib.sha256()
    for package in (__file__, passes.__file__, schedules.__file__):
        folder = pathlib.Path(package).resolve().parent
        for path in sorted(folder.rglob("*.py")):
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def module_key(mod: tvm.IRModule, target: tvm.target.Target, metadata, tuning_db=None) -> str | None:
    """The cache key of a lowered module, or ``None`` when it must not be cached."""
    tuning = _tuning_fingerprint(tuning_db)
    if tuning is None:
        return None
    parts = {"psb_tvm": metadata.psb_tvm_version, "code": code_fingerprint(), "tvm": tvm.__version__,
             "target": str(target),
             "module": str(tvm_ffi.structural_hash(mod)), "metadata": metadata.to_json(), "tuning": tuning}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def lookup(directory: pathlib.Path, key: str) -> pathlib.Path | None:
    """The entry for ``key`` if present and intact (a damaged one is removed), marked as used."""
    path = directory / (key + SUFFIX)
    if not path.is_file():
        return None
    try:
        verify_module(path)
    except ModelLoadError as err:
        LOG.warning("module cache: removing a damaged entry (%s)", err)
        path.unlink(missing_ok=True)
        return None
    os.utime(path)  # least recently used pruning reads the modification time
    return path


def store(directory: pathlib.Path, key: str, export) -> pathlib.Path | None:
    """``export(path)`` writes the library (all-or-nothing, with its integrity record) as the entry
    for ``key``; ``None`` (with a warning) if the directory is not writable."""
    path = directory / (key + SUFFIX)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        export(path)
    except (OSError, OutputError) as err:
        _warn_unusable(directory, err)
        return None
    prune(directory, _max_bytes(), keep=path)
    prune(kernel_dir(directory), _max_bytes() // 4, suffix=".o")
    return path


def prune(directory: pathlib.Path, max_bytes: int, keep: pathlib.Path | None = None, suffix: str = SUFFIX) -> int:
    """Remove the least recently used entries (files ending in ``suffix``) until the cache holds at
    most ``max_bytes``; returns the bytes removed. ``keep`` (the entry just written) is never removed.
    A kernel object removed while a compile links it makes that compile fail its store and build
    again without the cache: never a wrong module."""
    entries = []
    for path in pathlib.Path(directory).glob("*" + suffix):
        try:
            st = path.stat()
        except FileNotFoundError:  # removed by another process
            continue
        entries.append((st.st_mtime, st.st_size, path))
    total, removed = sum(size for _, size, _ in entries), 0
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        if keep is not None and path == keep:
            continue
        path.unlink(missing_ok=True)
        total -= size
        removed += size
    return removed
