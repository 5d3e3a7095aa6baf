"""Calibration statistics from ONNX Runtime (the default: nothing is compiled) equal those of the
float TVM probe (``ExposeLayerInputs`` built and run) on the suite's models, and the probe takes
over where ONNX Runtime cannot name a layer's input."""

import numpy as np
import onnx_models
import pytest
from psb_tvm.passes import find_layer_sites

from psb_tvm import calibration, numerics
from psb_tvm.compiler import plan
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split
from psb_tvm.frontend import from_relax, import_onnx


def _both(model, shapes, calib):
    imported = import_onnx(model, shapes)
    sites = [s for s in find_layer_sites(imported.mod["main"]) if s.convertible]
    batches, _ = calibration.normalize_calibration(calib, imported.inputs, 8)
    assert calibration.onnx_layer_tensors(imported, sites) is not None
    ort_stats = calibration.collect_stats(imported, sites, batches)
    probe = calibration._accumulate(calibration._tvm_runner(imported.mod, [s.index for s in sites]), len(sites),
                                    batches, imported.inputs)
    return ort_stats, probe


def compare_stats(a, b, rtol=1e-5):
    """Statistics equal in meaning: ranges to float rounding (ORT and TVM sum in different orders),
    the same subsample, so the same signedness and activation scales."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.max_abs == pytest.approx(y.max_abs, rel=rtol) and x.min == pytest.approx(y.min, rel=rtol, abs=1e-12)
        assert x.signed == y.signed and x.sample.shape == y.sample.shape
        np.testing.assert_allclose(x.sample, y.sample, rtol=rtol, atol=rtol * y.max_abs)
        for bits in (8, 16):
            assert numerics.choose_frac_bits(x.max_abs, bits, x.signed) == numerics.choose_frac_bits(y.max_abs, bits, y.signed)


def test_digits_and_mobile_block_stats_match_the_float_probe():
    x = load_digits_split()[0][:64]
    compare_stats(*_both(DIGITS_ONNX, {"input": (4, 1, 8, 8)}, {"input": x}))
    rng = np.random.default_rng(0)
    compare_stats(*_both(onnx_models.mobile_block_model(), None, {"x": rng.random((8, 3, 16, 16), np.float32)}))


def test_without_onnxruntime_or_onnx_the_probe_gives_the_same_plan(monkeypatch):
    x = load_digits_split()[0][:64]
    shapes, calib = {"input": (4, 1, 8, 8)}, {"input": x}
    want = plan(DIGITS_ONNX, input_shapes=shapes, calibration=calib)
    monkeypatch.setattr(calibration, "ort", None)
    got = plan(DIGITS_ONNX, input_shapes=shapes, calibration=calib)
    assert [l["frac_bits"] for l in got.info.values()] == [l["frac_bits"] for l in want.info.values()]
    compare_stats(got.stats, want.stats)
    relax_module = from_relax(import_onnx(DIGITS_ONNX, shapes).mod)  # no ONNX model behind it
    assert relax_module.proto is None
    assert calibration.onnx_layer_tensors(relax_module, find_layer_sites(relax_module.mod["main"])) is None


def test_unnameable_inputs_fall_back_to_the_probe():
    """When the ONNX linear nodes and the Relax sites disagree (here: the layer input lists are
    emptied), no tensor is guessed."""
    imported = import_onnx(DIGITS_ONNX, {"input": (4, 1, 8, 8)})
    sites = find_layer_sites(imported.mod["main"])
    imported.layer_inputs = {"conv2d": imported.layer_inputs["conv2d"][:2], "dense": imported.layer_inputs["dense"]}
    assert calibration.onnx_layer_tensors(imported, sites) is None
