"""CUDA: the source TVM generates for a PSB module compiles with nvcc (no GPU needed).

A CUDA module's exported library holds CUDA *source* that the runtime compiles when it loads, so
a syntax or type error in generated kernels would only show on a GPU machine; compile it here.
"""

import re
import shutil
import warnings

import pytest
import tvm
from conftest import tool_module
from onnx_models import small_cnn

import psb_tvm


def _cuda_modules(mod):
    """Every module of kind "cuda" among ``mod`` and its imports (VMExecutable -> llvm host -> cuda)."""
    found, stack = [], [mod]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            found.append(m)
        stack.extend(m.imports)
    return found


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found (CUDA toolkit not installed)")
@pytest.mark.parametrize("lowering", ["auto", "bitserial"])
def test_generated_cuda_source_compiles_with_nvcc(lowering):
    """The default lowerings, and bitserial (its popcounts lower to __popc / __popcll through
    schedules/gpu/intrinsics.py: TVM 0.27 has no CUDA lowering of tirx.popcount)."""
    from tvm.support import nvcc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = psb_tvm.compile(small_cnn(), target="cuda", samples=4, config=psb_tvm.PSBConfig(lowering=lowering))
    assert [l["status"] for l in module.layers].count("psb") == 5
    cuda = _cuda_modules(module._executable.mod)
    assert len(cuda) == 1, [m.kind for m in cuda]
    source = cuda[0].inspect_source()
    if lowering == "bitserial":
        assert "__popc(" in source
    kernels = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', source)
    assert kernels, source[:2000]

    target = tvm.target.Target(module.metadata["target"])
    arch = str(target.attrs["arch"])  # sm_90a for nvidia/nvidia-h100
    with target:
        cubin = nvcc.compile_cuda(source, target_format="cubin", arch=arch, compiler="nvcc")
    cubin = bytes(cubin)
    assert cubin[:4] == b"\x7fELF"
    missing = [k for k in kernels if k.encode() not in cubin]
    assert not missing, f"kernels absent from the cubin: {missing}"


def _gpu_check():
    return tool_module("gpu_check")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found (CUDA toolkit not installed)")
def test_gpu_check_prepare_quick(tmp_path):
    """tools/gpu_check.py prepare --quick: digits PSB / PSB int8 / fp32 for cuda, batch 1 and 64 (~45 s)."""
    import json
    import subprocess
    import sys

    gc = _gpu_check()
    # a subprocess: prepare loads TVM's CUDA runtime (with a libcuda stub) and registers a build-time
    # nvcc callback, which would change how later cuda builds in this process behave
    subprocess.run([sys.executable, gc.__file__, "prepare", str(tmp_path), "--quick", "--variants", "psb,psb_int8,fp32"],
                   check=True, timeout=600)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["cuda_binary"] in ("fatbin", "source")
    assert {(m["variant"], m["batch"]) for m in manifest["modules"]} >= {("psb", 1), ("psb", 64), ("fp32", 1), ("fp32", 64)}
    for m in manifest["modules"]:
        data = (tmp_path / m["file"]).read_bytes()
        assert len(data) == m["bytes"]
        for ref in m["refs"].values():
            assert (tmp_path / ref).is_file()
        if manifest["cuda_binary"] == "fatbin":  # kernels precompiled: no CUDA source travels
            assert b"__global__" not in data and bytes.fromhex("50ed55ba") in data
    assert manifest["total_bytes"] < gc.CARRY_LIMIT
    # a cuda module's metadata loads only where TVM's CUDA runtime can load (a driver, or prepare's
    # libcuda stub); in a plain process here psb_tvm.load says so with ModelLoadError
    psb = next(m for m in manifest["modules"] if m["variant"] == "psb")
    probe = ("import ctypes, sys, psb_tvm; ctypes.CDLL(sys.argv[2], mode=ctypes.RTLD_GLOBAL); "
             "import tvm.backend.cuda as c; c.register_backend(); m = psb_tvm.load(sys.argv[1]); "
             "print(m.metadata['target_kind'], bool(m.metadata['runtime_args']))")
    stub = tmp_path / "libcuda.so.1"
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(stub), "-x", "c", "-"], check=True,
                   input="".join(f"int {s}(void) {{ return 100; }}\n" for s in gc._CUDA_DRIVER_SYMBOLS).encode())
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / psb["file"]), str(stub)], check=True,
                         capture_output=True, text=True).stdout
    assert out.split() == ["cuda", "True"], out


def test_gpu_check_cpu_dry_run(tmp_path):
    """prepare and run on this CPU (llvm modules): the run path (runtime-only VM via tvm_ffi) works
    and PSB outputs match the CPU reference exactly."""
    import json

    gc = _gpu_check()
    assert gc.main(["prepare", str(tmp_path), "--quick", "--device", "cpu", "--batches", "4"]) == 0
    results = tmp_path / "results.json"
    assert gc.main(["run", str(tmp_path), "--device", "cpu", "--runs", "3", "--warmup", "1",
                    "--budget-s", "0.1", "--results", str(results)]) == 0
    checks = json.loads(results.read_text())["checks"]
    # psb, psb_iid at n = 1, 8, 16 and one attend call each (the masked kernels); psb_int8; fp32
    assert len(checks) == 10 and all(c["ok"] for c in checks), checks
    assert sum("attend" in c["module"] for c in checks) == 2
    assert all(c["max_abs"] == 0 for c in checks if " psb" in c["module"])


def _nvcc_compiles(module) -> str:
    """The CUDA source of a compiled psb_tvm module, checked to compile with nvcc; returns it."""
    from tvm.support import nvcc

    source = _cuda_modules(module._executable.mod)[0].inspect_source()
    target = tvm.target.Target(module.metadata["target"])
    with target:
        cubin = bytes(nvcc.compile_cuda(source, target_format="cubin", arch=str(target.attrs["arch"]), compiler="nvcc"))
    assert cubin[:4] == b"\x7fELF"
    return source


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found (CUDA toolkit not installed)")
def test_int8_preset_cuda_kernels_use_dp4a_and_shared_memory():
    """The int8 preset on CUDA: convs with 16k output channels take the dp4a layout, and the tiled
    default schedule stages weights in shared memory and multiplies with __dp4a."""
    import numpy as np
    from onnx_models import conv_model

    model = conv_model(in_ch=8, out_ch=32, hw=9)
    cal = np.random.default_rng(0).standard_normal((4, 8, 9, 9)).astype(np.float32)
    for frozen in (False, True):
        module = psb_tvm.compile(model, target="cuda", samples=8, calibration=cal, frozen=frozen,
                                 config=psb_tvm.PSBConfig.preset("int8"))
        layer = next(l for l in module.layers if l["status"] == "psb")
        assert layer["weight_layout"] == "dp4a" and layer["prepacked"] == frozen
        source = _nvcc_compiles(module)
        assert "__dp4a(" in source and "__shared__" in source
        # a frozen module has no run-time arguments: its kernels replay as one CUDA graph
        assert module.metadata["cuda_graph"] == frozen


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found (CUDA toolkit not installed)")
def test_frozen_cuda_module_replays_a_cuda_graph():
    """Frozen (no run-time n / seed): the VM captures the kernel sequence once and replays it;
    sampled: kernels launched one by one (n and the seed change per call)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for frozen in (True, False):
            module = psb_tvm.compile(small_cnn(), target="cuda", samples=8, frozen=frozen,
                                     config=psb_tvm.PSBConfig.preset("int8"))
            text = module._executable.as_text()
            assert module.metadata["cuda_graph"] == frozen
            assert ("vm.builtin.cuda_graph.run_or_capture" in text) == frozen


def _stand_in_runner(calls: list):
    """A MetaSchedule runner for a machine without a GPU: reports 1 s for the first batch (the
    default schedules) and 1 ms for every later candidate, so any searched candidate wins."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class StandInRunner(ms.runner.PyRunner):
        def run(self, runner_inputs):
            calls.append(len(runner_inputs))
            secs = 1.0 if len(calls) == 1 else 1e-3
            return [ms.runner.LocalRunnerFuture(res=[secs], error_message=None) for _ in runner_inputs]

    return StandInRunner()


def _gpu_tuning_case():
    import numpy as np
    from onnx_models import conv_model

    model = conv_model(in_ch=8, out_ch=16, hw=6, seed=5)
    cal = np.random.default_rng(0).standard_normal((4, 8, 6, 6)).astype(np.float32)
    return model, cal, psb_tvm.PSBConfig.preset("int8")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found (CUDA toolkit not installed)")
def test_gpu_tuning_database_round_trip(tmp_path):
    """tune(target="cuda", trials=0) without a GPU here: the PSB conv is the one task, its default
    GPU schedule builds with nvcc and is stored for the cuda target, compile(tuning_db=) replays
    it, and the replayed module's CUDA source compiles. Without a GPU, rpc_tracker or runner,
    tuning for cuda says what to pass."""
    from psb_tvm.tuning import TuningError, TuningWarning

    model, cal, config = _gpu_tuning_case()
    if not tvm.cuda(0).exist:
        with pytest.raises(TuningError, match="rpc_tracker"):
            psb_tvm.tune(model, target="cuda", work_dir=str(tmp_path / "x"), trials=1, calibration=cal, config=config)
    calls = []
    work = str(tmp_path / "gpu")
    result = psb_tvm.tune(model, target="cuda", work_dir=work, trials=0, samples=8, calibration=cal, config=config,
                          progress=False, runner=_stand_in_runner(calls))
    assert calls == [1] and [t.kernels for t in result.tasks] == [["psb_0_conv"]]
    assert result.tasks[0].default_ms == 1000.0
    module = psb_tvm.compile(model, target="cuda", samples=8, calibration=cal, config=config, tuning_db=work)
    assert module.metadata["schedules"]["tuned_kernels"] == ["psb_0_conv"]
    assert "__dp4a(" in _nvcc_compiles(module)
    with pytest.warns(TuningWarning, match="tuned for"):  # a CPU module ignores it
        psb_tvm.compile(model, samples=8, calibration=cal, config=config, tuning_db=work)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found (CUDA toolkit not installed)")
def test_gpu_tuning_search_builds_candidates_and_replays(tmp_path):
    """The MetaSchedule search for cuda (~3 min on 2 cores: the CUDA space includes tensor-core
    candidates, and their intrinsics take ~30 s to register): searched candidates build with
    nvcc, the stand-in runner makes one of them the best record, compile replays it and its CUDA
    source compiles. (Timings need a GPU host: rpc_tracker= / runner=.)"""
    model, cal, config = _gpu_tuning_case()
    work = str(tmp_path / "gpu")
    result = psb_tvm.tune(model, target="cuda", work_dir=work, trials=2, samples=8, calibration=cal, config=config,
                          progress=False, runner=_stand_in_runner([]))
    assert len(result.tasks) == 1 and result.tasks[0].default_ms == 1000.0
    assert result.tasks[0].best_ms == 1.0 and result.trials_total >= 1
    module = psb_tvm.compile(model, target="cuda", samples=8, calibration=cal, config=config, tuning_db=work)
    assert module.metadata["schedules"]["tuned"] == 1
    _nvcc_compiles(module)
