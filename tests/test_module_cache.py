"""Compiled modules on disk (psb_tvm.module_cache): machine code generated at compile time, a
repeated compile loads the stored library, and the cache stays correct when entries are damaged,
pruned or the directory is unusable."""

import os
import warnings

import numpy as np
import pytest

import psb_tvm
from psb_tvm import module_cache
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split

SHAPES = {"input": (4, 1, 8, 8)}


@pytest.fixture(scope="module")
def data():
    x_train, _, x_test, _ = load_digits_split()
    return {"input": x_train[:64]}, x_test[:4]


def _compile(calib, **kwargs):
    return psb_tvm.compile(DIGITS_ONNX, samples=8, input_shapes=SHAPES, calibration=calib, **kwargs)


def test_second_compile_loads_the_stored_library(data, tmp_path):
    calib, x = data
    first = _compile(calib, cache=tmp_path)
    entries = list(tmp_path.glob("*.so"))
    assert len(entries) == 1 and first._source_path == os.fspath(entries[0])
    mtime = entries[0].stat().st_mtime_ns
    second = _compile(calib, cache=tmp_path)
    assert second._source_path == first._source_path and entries[0].stat().st_mtime_ns >= mtime
    assert np.array_equal(first.run(x, samples=4, seed=3), second.run(x, samples=4, seed=3))
    uncached = _compile(calib, cache=False)
    assert uncached._source_path is None and len(list(tmp_path.glob("*.so"))) == 1
    assert np.array_equal(uncached.run(x, samples=4, seed=3), second.run(x, samples=4, seed=3))
    # what the library embeds is part of the key: another default seed is another entry
    other = _compile(calib, cache=tmp_path, seed=5)
    assert other._source_path != first._source_path and other.metadata.seed == 5
    # export copies the stored library, byte for byte
    out = tmp_path / "out" / "m.so"
    out.parent.mkdir()
    second.export_library(out)
    assert out.read_bytes() == entries[0].read_bytes()
    assert psb_tvm.load(out).metadata == second.metadata


def test_key_follows_the_model_config_target_and_tuning(data, tmp_path):
    calib, _ = data
    from psb_tvm.compiler import lower

    def key(**kw):
        mod, md, tgt = lower(DIGITS_ONNX, "llvm", 8, 0, SHAPES, calib, kw.pop("config", None), kw.pop("frozen", False))
        return module_cache.module_key(mod, tgt, md, kw.pop("tuning_db", None))

    base = key()
    assert key() == base
    assert key(config={"act_bits": 16}) != base
    assert key(frozen=True) != base
    mod, md, tgt = lower(DIGITS_ONNX, "llvm", 8, 0, SHAPES, {"input": calib["input"][:32]})
    assert module_cache.module_key(mod, tgt, md) != base  # other calibration data: other scales
    (tmp_path / "database_workload.json").write_text("")
    assert key(tuning_db=str(tmp_path)) != base
    assert key(tuning_db=object()) is None  # an in-memory database cannot be fingerprinted: not cached


def test_damaged_entry_is_removed_and_rebuilt(data, tmp_path):
    calib, x = data
    first = _compile(calib, cache=tmp_path)
    entry = first._source_path
    want = first.run(x)
    with open(entry, "r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    again = _compile(calib, cache=tmp_path)
    assert again._source_path == entry and np.array_equal(again.run(x), want)


def test_unusable_directory_warns_and_compiles_in_memory(data, tmp_path):
    calib, x = data
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="module cache .* is not usable"):
        module = _compile(calib, cache=blocker / "modules")
    assert module._source_path is None and module.run(x).shape == (4, 10)


def test_prune_removes_least_recently_used_entries(tmp_path):
    for i, age in enumerate((300, 200, 100)):
        path = tmp_path / f"{i}.so"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (path.stat().st_atime - age, path.stat().st_mtime - age))
    assert module_cache.prune(tmp_path, 2500) == 1000
    assert sorted(p.name for p in tmp_path.glob("*.so")) == ["1.so", "2.so"]
    assert module_cache.prune(tmp_path, 0, keep=tmp_path / "2.so") == 1000
    assert [p.name for p in tmp_path.glob("*.so")] == ["2.so"]


def test_cache_setting_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(module_cache.ENV_DIR, "off")
    assert module_cache.cache_dir(None) is None
    monkeypatch.setenv(module_cache.ENV_DIR, str(tmp_path))
    assert module_cache.cache_dir(None) == tmp_path and module_cache.cache_dir(False) is None
    monkeypatch.delenv(module_cache.ENV_DIR)
    monkeypatch.setenv("PSB_TVM_CACHE", str(tmp_path))
    assert module_cache.cache_dir(True) == tmp_path / "modules"
    with pytest.raises(psb_tvm.ConfigError, match="cache must be a directory"):
        module_cache.cache_dir(3)


def test_first_call_runs_compiled_code(data, tmp_path):
    """The module compile returns runs code generated at compile time: a library loaded from disk,
    not an in-memory executable that generates its code on the first call."""
    calib, x = data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = _compile(calib, cache=tmp_path)
    assert module._executable is None and module._source_path is not None
    assert module.run(x).shape == (4, 10)


def test_key_follows_psb_tvm_sources(data, monkeypatch):
    """The schedule rules and build passes act after the lowered module: a changed rule must not
    load a library the old one built (a stale detector head was loaded that way)."""
    calib, _ = data
    from psb_tvm.compiler import lower

    mod, md, tgt = lower(DIGITS_ONNX, "llvm", 8, 0, SHAPES, calib)
    before = module_cache.module_key(mod, tgt, md)
    assert len(module_cache.code_fingerprint()) == 64
    monkeypatch.setattr(module_cache, "code_fingerprint", lambda: "0" * 64)
    assert module_cache.module_key(mod, tgt, md) != before
