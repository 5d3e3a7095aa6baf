"""Kernels generated in parallel threads as object files, cached by key (psb_tvm.kernel_cache): a
compile at another seed or n reuses them, parallel and serial builds give the same module, and the
key follows everything a kernel's code depends on."""

import numpy as np
import pytest
import test_module_cache as digits_setup
import tvm

import psb_tvm
from psb_tvm import kernel_cache, module_cache
from psb_tvm.progress import CompileProgress

# the digits calibration / test images fixture and compile helper of test_module_cache
data = digits_setup.data
_compile = digits_setup._compile


def test_recompiles_reuse_kernels_and_match_the_in_memory_build(data, tmp_path):
    calib, x = data
    first = _compile(calib, cache=tmp_path)
    stats = first.compile_kernels
    objects = sorted(module_cache.kernel_dir(tmp_path).glob("*.o"))
    assert stats["kernels"] == stats["generated"] == len(objects) > 5 and stats["reused"] == 0
    assert np.array_equal(first.run(x, samples=4, seed=3), _compile(calib, cache=False).run(x, samples=4, seed=3))
    # another default seed and n: another module, the same kernels (n and seed are run-time arguments)
    second = _compile(calib, cache=tmp_path, seed=5)
    assert second._source_path != first._source_path
    assert second.compile_kernels["reused"] == second.compile_kernels["kernels"] and second.compile_kernels["generated"] == 0
    assert np.array_equal(second.run(x, samples=4, seed=3), first.run(x, samples=4, seed=3))
    # frozen at two seeds: other weights in the same kernels; bit-exact with the in-memory build
    frozen = [_compile(calib, cache=tmp_path, seed=s, frozen=True) for s in (1, 2)]
    assert frozen[1].compile_kernels["generated"] == 0
    for s, module in zip((1, 2), frozen):
        want = _compile(calib, cache=False, seed=s, frozen=True).run(x)
        assert np.array_equal(module.run(x), want)
    assert not np.array_equal(frozen[0].run(x), frozen[1].run(x))


def test_serial_and_parallel_builds_give_the_same_module(data, tmp_path, monkeypatch):
    calib, x = data
    modules = []
    for jobs in ("1", "2"):
        monkeypatch.setenv(kernel_cache.ENV_JOBS, jobs)
        module = _compile(calib, cache=tmp_path / jobs)
        assert module.compile_kernels["jobs"] == int(jobs) and module.compile_kernels["reused"] == 0
        modules.append(module)
    names = [sorted(p.name for p in module_cache.kernel_dir(tmp_path / j).glob("*.o")) for j in ("1", "2")]
    assert names[0] == names[1]  # the same keys
    assert np.array_equal(modules[0].run(x, samples=8, seed=1), modules[1].run(x, samples=8, seed=1))
    monkeypatch.setenv(kernel_cache.ENV_JOBS, "zero")
    with pytest.raises(psb_tvm.ConfigError, match="PSB_TVM_BUILD_JOBS must be a positive number"):
        kernel_cache.build_jobs()


def test_key_follows_symbol_code_target_and_pass_options():
    from tvm.script import tirx as T

    @T.prim_func
    def add_one(a: T.Buffer((8,), "float32"), b: T.Buffer((8,), "float32")):
        for i in range(8):
            b[i] = a[i] + T.float32(1)

    @T.prim_func
    def add_two(a: T.Buffer((8,), "float32"), b: T.Buffer((8,), "float32")):
        for i in range(8):
            b[i] = a[i] + T.float32(2)

    zen = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    generic = tvm.target.Target({"kind": "llvm"})

    def key(func=add_one, name="k", target=zen, config=None):
        with tvm.transform.PassContext(config=config or {}):
            ctx = kernel_cache._context_fingerprint(tvm.transform.PassContext.current())
        return kernel_cache.kernel_key(name, func, target, ctx)

    base = key()
    assert key() == base
    assert key(func=add_two) != base
    assert key(name="k2") != base  # the symbol is in the object file
    assert key(target=generic) != base
    assert key(config={"tirx.disable_vectorize": True}) != base


def test_progress_names_the_kernel_being_generated():
    progress = CompileProgress(bar=False, heartbeat_s=0)
    with progress.stage("build"):
        progress.kernel(3, 10, "fused_conv2d_add")
        assert progress.current_pass == "kernels (3 of 10 generated, last fused_conv2d_add)"
    progress.close()
