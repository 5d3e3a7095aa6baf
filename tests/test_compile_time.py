"""Compile time is bounded by construction, not by wall clock: kernels whose generated code stays
small (a HardSwish / BatchNorm-as-Mul conv block once took minutes of LLVM code generation), stage
timings on every module, and a heartbeat that names the stage and TVM pass of a long compile."""

import json
import logging
import time

import numpy as np
import onnx_models
import pytest
import tvm

import psb_tvm
from psb_tvm import cli, progress
from psb_tvm.build import kernel_codegen_times
from psb_tvm.compiler import lower

#: Assembly per kernel: the block's kernels measure 50-120 KB; an unrolled or over-vectorized
#: schedule of the fused epilogue would be megabytes.
MAX_ASM_BYTES = 400_000


@pytest.mark.parametrize("hardswish", ["clip", "op", "sigmoid"])
@pytest.mark.parametrize("psb", [False, True], ids=["float", "psb"])
def test_hardswish_bn_conv_block_kernels_stay_small(hardswish, psb):
    model = onnx_models.conv_bn_hardswish_model(hw=112, hardswish=hardswish)
    x = np.random.default_rng(0).random((4, 3, 112, 112), np.float32)
    config = None if psb else psb_tvm.PSBConfig(include=())
    mod, _, tgt = lower(model, "llvm", 8, 0, None, {"x": x}, config)
    rows = kernel_codegen_times(mod, tgt)
    names = [name for _, name, _ in rows]
    if psb:
        assert any(name.startswith("psb_0_stem") for name in names), names
    else:  # the whole block is one fused kernel: conv, batch norm, HardSwish
        assert any(name.startswith("fused_conv2d") for name in names), names
    big = [(name, size) for _, name, size in rows if size > MAX_ASM_BYTES]
    assert big == [], big


def test_compile_records_stage_timings(tmp_path):
    model = onnx_models.conv_bn_hardswish_model(hw=16)
    x = np.random.default_rng(0).random((4, 3, 16, 16), np.float32)
    cold = psb_tvm.compile(model, calibration={"x": x}, cache=tmp_path)
    assert set(cold.compile_seconds) == {"import", "calibration", "encode", "rewrite", "build", "codegen", "weights",
                                          "total"}
    warm = psb_tvm.compile(model, calibration={"x": x}, cache=tmp_path)
    assert "build" not in warm.compile_seconds  # loaded from the module cache
    assert warm._source_path == cold._source_path


@tvm.transform.module_pass(opt_level=0, name="SlowPassForTheHeartbeat")
class _Slow:
    def transform_module(self, mod, _ctx):
        time.sleep(0.3)
        return mod


def test_heartbeat_names_the_stage_and_the_tvm_pass(caplog):
    p = progress.CompileProgress(bar=False, heartbeat_s=0.05)
    with caplog.at_level(logging.WARNING, logger="psb_tvm"):
        with progress.tracking(p), progress.stage("build"), p.passes():
            _Slow()(tvm.IRModule())
    seconds = p.close()
    messages = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert messages and "stage 'build'" in messages[-1] and "TVM pass SlowPassForTheHeartbeat" in messages[-1]
    assert seconds["build"] >= 0.3


def test_cli_kernel_report(tmp_path, capsys):
    path = tmp_path / "block.onnx"
    onnx_models.save(onnx_models.conv_bn_hardswish_model(hw=16), path)
    out = tmp_path / "block.so"
    assert cli.main(["compile", str(path), "-o", str(out), "--kernel-report", "2", "--no-cache", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["kernel_codegen"]) == 2 and all(r["asm_bytes"] > 0 for r in report["kernel_codegen"])
    assert report["compile_seconds"]["total"] > 0 and out.is_file()
