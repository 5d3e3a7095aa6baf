"""CUDA: the source TVM generates for a PSB module compiles with nvcc (no GPU needed).

A CUDA module's exported library holds CUDA *source* that the runtime compiles when it loads, so
a syntax or type error in generated kernels would only show on a GPU machine; compile it here.
"""

import re
import shutil
import warnings

import pytest
import tvm

import psb_tvm

from onnx_models import small_cnn


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
def test_generated_cuda_source_compiles_with_nvcc():
    from tvm.support import nvcc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = psb_tvm.compile(small_cnn(), target="cuda", samples=4)
    assert [l["status"] for l in module.layers].count("psb") == 5
    cuda = _cuda_modules(module._executable.mod)
    assert len(cuda) == 1, [m.kind for m in cuda]
    source = cuda[0].inspect_source()
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
