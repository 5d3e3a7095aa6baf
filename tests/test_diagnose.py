"""psb_tvm.diagnose and the activation-range options: per-layer errors against what sampling and
activation rounding explain, on a graph with the PP-OCR patterns; saturation made visible."""

from __future__ import annotations

import json

import numpy as np
import onnx_models as om
import onnxruntime as ort
import pytest
from tvm import relax

import psb_tvm
from psb_tvm import ConfigError, PSBConfig, compiler
from psb_tvm.calibration import ActStats, choose_width
from psb_tvm.cli import main as cli_main

SHAPE = (1, 3, 16, 16)


def _images(count, seed, scale=1.0):
    return (np.random.default_rng(seed).uniform(0, 1, (count,) + SHAPE[1:]) * scale).astype(np.float32)


@pytest.fixture(scope="module")
def mobile():
    return om.mobile_block_model()


def _ort(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])


def test_mobile_block_layers_match_their_emulation(mobile):
    """Every PSB layer of the MobileNetV3-style graph (BN, HardSwish, learnable affine + ReLU6,
    squeeze-excite on 1x1 maps, decomposed BN, strided depthwise, Gemm) is explained by sampling
    plus activation rounding, the kernels agree with their float emulation, and the float
    reference is ONNX Runtime's output."""
    x, calib = _images(6, 1), _images(16, 2)
    d = psb_tvm.diagnose(mobile, {"x": x}, samples=64, calibration={"x": calib}, config=PSBConfig(act_bits=16),
                         progress=False)
    assert [l.name for l in d.layers] == ["stem", "dw", "se1", "se2", "pw", "dw2", "fc"]
    assert d.first_excess is None, d.markdown()
    for l in d.layers:
        assert l.kernel < 1e-5, (l.name, l.kernel)  # float summation order only
        assert l.compiled <= 1.25 * l.explained + 1e-4, (l.name, l.compiled, l.explained)
        assert 0 < l.scheme < 0.2 and l.activation < 1e-3, (l.name, l.scheme, l.activation)
        assert l.saturated == 0
    assert d.output["kernel"] < 1e-5 and 0 < d.output["compiled"] < 0.2
    # act_bits=8: rounding is now visible per layer, and still explains the error
    d8 = psb_tvm.diagnose(mobile, {"x": x}, samples=64, calibration={"x": calib}, config=PSBConfig(act_bits=8),
                          progress=False)
    assert all(l.activation > 1e-4 for l in d8.layers) and max(l.activation for l in d8.layers) > 0.01
    assert all(l.compiled <= 1.25 * l.explained + 1e-4 for l in d8.layers), d8.markdown()
    # and the compiled module at high n is close to ONNX Runtime float
    m = psb_tvm.compile(mobile, samples=64, calibration={"x": calib}, config=PSBConfig(act_bits=16))
    ref = _ort(mobile, x)
    got = np.concatenate([m.run(x[i:i + 1]) for i in range(len(x))])
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.2


def test_saturation_beyond_the_calibrated_range_is_reported(mobile, tmp_path):
    """Inputs 4x larger than calibration saturate the stem's fixed point: the diagnosis counts it,
    names the layer, and writes JSON / markdown."""
    calib = _images(8, 2)
    d = psb_tvm.diagnose(mobile, {"x": _images(4, 3, scale=4.0)}, samples=16, calibration={"x": calib},
                         progress=False)
    stem = d.layers[0]
    assert stem.saturated > 0 and stem.observed_max > stem.calibrated_max
    assert "stem" in d.saturated_layers and "Saturated inputs" in d.markdown()
    files = d.write(tmp_path, plots=False)
    data = json.loads(open(files["json"]).read())
    assert data["layers"][0]["saturated"] == stem.saturated and data["saturated_layers"] == d.saturated_layers
    # the same inputs in range: nothing saturates
    ok = psb_tvm.diagnose(mobile, {"x": _images(4, 3)}, samples=16, calibration={"x": calib}, progress=False)
    assert ok.layers[0].saturated == 0


def test_diagnose_flags_an_error_the_scheme_does_not_explain(mobile, monkeypatch):
    """A defect injected into one compiled layer (its bias shifted) is flagged at that layer."""
    import sys

    module = sys.modules["psb_tvm.diagnose"]  # the package attribute is the function
    real = module.lower_plan

    def broken(p, *args, **kwargs):
        p.layers[2].bias = p.layers[2].bias + 1.0  # se1, in the compiled module only (emulations come after)
        try:
            return real(p, *args, **kwargs)
        finally:
            p.layers[2].bias = p.layers[2].bias - 1.0

    monkeypatch.setattr(module, "lower_plan", broken)
    d = psb_tvm.diagnose(mobile, {"x": _images(4, 1)}, samples=64, calibration={"x": _images(8, 2)},
                         config=PSBConfig(act_bits=16), progress=False)
    assert d.first_excess == "se1", d.markdown()
    assert d.layers[2].kernel > 0.01 and not d.layers[1].excess


def test_act_range_options_and_auto_width():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(100_000).astype(np.float32)
    x[0] = 200.0  # one outlier
    st = ActStats(float(np.abs(x).max()), float(x.min()), x)
    f_max = choose_width(st, 8, "max", 99.99, 1.0, 0.01)[1]
    f_pct = choose_width(st, 8, "percentile", 99.9, 1.0, 0.01)[1]
    assert f_pct > f_max  # finer steps for the bulk
    assert st.saturated_fraction(f_max, 8) == 0 < st.saturated_fraction(f_pct, 8) < 0.002
    bulk = ActStats(st.max_abs, st.min, x[1:])  # the rest of the data gets the finer steps
    assert bulk.rounding_error(f_pct, 8) < 0.5 * bulk.rounding_error(f_max, 8)
    assert choose_width(st, 8, "max", 99.99, 2.0, 0.01)[1] == f_max - 1  # headroom of 2 = one bit
    # auto: the outlier makes 8 bits too coarse for the bulk -> 16; well-spread data keeps 8
    assert choose_width(st, "auto", "max", 99.99, 1.0, 0.01)[0] == 16
    u = rng.uniform(0, 1, 100_000).astype(np.float32)
    assert choose_width(ActStats(1.0, 0.0, u), "auto", "max", 99.99, 1.0, 0.01)[0] == 8


def test_layer_act_bits_in_module_metadata(mobile):
    calib = _images(8, 2)
    m = psb_tvm.compile(mobile, samples=8, calibration={"x": calib},
                        config=PSBConfig(act_bits=8, layer_act_bits={"pw": 16, "stem": 16}))
    bits = {l["name"]: l["act_bits"] for l in m.layers}
    assert bits == {"stem": 16, "dw": 8, "se1": 8, "se2": 8, "pw": 16, "dw2": 8, "fc": 8}
    assert {l["name"]: l["act_dtype"] for l in m.layers}["pw"] in ("int16", "uint16")
    assert all(0 <= l["act_rounding_error"] < 1 and l["calibration_saturated"] == 0 for l in m.layers)
    with pytest.raises(ConfigError, match="layer_act_bits names unknown layers"):
        psb_tvm.compile(mobile, samples=8, calibration={"x": calib}, config=PSBConfig(layer_act_bits={"nope": 16}))


@pytest.mark.parametrize("kwargs, words", [
    (dict(act_bits=12), ["act_bits", "12"]),
    (dict(act_range="mean"), ["act_range", "mean"]),
    (dict(act_percentile=20), ["act_percentile"]),
    (dict(act_headroom=0.5), ["act_headroom"]),
    (dict(layer_act_bits={"conv": 4}), ["layer_act_bits", "conv"]),
])
def test_bad_activation_options_name_the_field(kwargs, words):
    with pytest.raises(ConfigError) as err:
        PSBConfig(**kwargs)
    assert all(w in str(err.value) for w in words)


def test_cli_diagnose(mobile, tmp_path, capsys):
    model = tmp_path / "mobile.onnx"
    model.write_bytes(mobile.SerializeToString())
    np.save(tmp_path / "x.npy", _images(3, 1))
    np.save(tmp_path / "calib.npy", _images(8, 2))
    rc = cli_main(["diagnose", str(model), "--inputs", str(tmp_path / "x.npy"), "--calibration",
                   str(tmp_path / "calib.npy"), "--samples", "16", "--act-bits", "auto", "--out-dir", str(tmp_path),
                   "--no-plots", "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["layers"]) == 7 and data["config"]["act_bits"] == "auto"
    assert (tmp_path / "diagnosis.md").exists() and (tmp_path / "diagnosis.json").exists()
    assert cli_main(["diagnose", str(model), "--inputs", str(tmp_path / "missing.npy")]) == 2


def test_allocate_n_and_activation_width_together(mobile):
    """allocate(model, ..., act_bits=(8, 16)) picks n and width per layer on the emulation; the
    compiled module with that allocation has the error the emulation measured, for less work than
    the cheapest uniform n meeting the same budget."""
    from psb_tvm.evaluate import rel_error, run_dataset

    calib = _images(24, 2)
    # With the stratified sampler, budgets down to ~0.02 are met with 8-bit activations everywhere
    # (measured: 0.019 at 8 bits); at 0.01 the depthwise conv needs 16 bits.
    tight = psb_tvm.allocate(mobile, {"x": calib}, 0.01, act_bits=(8, 16), seeds=(0, 1))
    loose = psb_tvm.allocate(mobile, {"x": calib}, 0.03, act_bits=(8, 16), seeds=(0, 1))
    for a in (tight, loose):
        assert a.feasible and a.measured_error <= a.budget
        assert set(a.act_bits) == set(a.samples) and set(a.act_bits.values()) <= {8, 16}
        assert a.uniform is not None and a.cost < a.uniform["cost"]
    assert 16 in tight.act_bits.values() and loose.cost < tight.cost
    assert sum(b == 8 for b in loose.act_bits.values()) >= sum(b == 8 for b in tight.act_bits.values())
    m = psb_tvm.compile(mobile, samples=tight.samples, calibration={"x": calib}, config=tight.config())
    assert {l["name"]: l["act_bits"] for l in m.layers} == tight.act_bits
    names = tuple(l["name"] for l in m.layers)
    ref = run_dataset(psb_tvm.compile(mobile, calibration={"x": calib}, config=PSBConfig(exclude=names)), {"x": calib})
    compiled = np.mean([rel_error(run_dataset(m, {"x": calib}, samples=tight.samples, seed=s), ref) for s in (0, 1)])
    assert compiled == pytest.approx(tight.measured_error, rel=1e-3)
    with pytest.raises(ConfigError, match="ONNX model"):
        psb_tvm.allocate(m, {"x": calib}, 0.05, act_bits=(8, 16))


def test_percentile_range_saturates_a_known_fraction_and_says_so(mobile):
    calib = _images(8, 2)
    by_max = psb_tvm.compile(mobile, samples=8, calibration={"x": calib}, config=PSBConfig(act_bits=8))
    by_pct = psb_tvm.compile(mobile, samples=8, calibration={"x": calib},
                             config=PSBConfig(act_bits=8, act_range="percentile", act_percentile=99.0))
    for a, b in zip(by_max.layers, by_pct.layers):
        assert b["frac_bits"] >= a["frac_bits"] and b["act_range"] <= a["act_range"]
        assert a["calibration_saturated"] == 0 and b["calibration_saturated"] < 0.011
    assert any(l["calibration_saturated"] > 0 for l in by_pct.layers)
    assert "saturated" in by_pct.report() and "saturated" not in by_max.report()


@pytest.mark.parametrize("act_bits", [8, 16])
def test_mobile_block_stem_is_bit_exact_against_the_numpy_oracle(mobile, act_bits):
    """The stem (conv + BatchNormalization folded) of the compiled graph reproduces the numpy oracle
    bit for bit, with 8- and 16-bit activations."""
    from psb_tvm import numerics as nm
    from psb_tvm.compiler import plan

    calib, x = _images(8, 2), _images(1, 5)
    cfg = PSBConfig(act_bits=act_bits)
    m = psb_tvm.compile(mobile, samples=16, calibration={"x": calib}, config=cfg)
    _, layers = m.layer_outputs(x, samples=8, seed=3)
    stem = plan(mobile, calibration={"x": calib}, config=cfg).layers[0]
    spec = stem.spec
    q = nm.integer_weights(stem.enc, 8, 3, stem.site_index)
    xi = nm.quantize_activations(x, spec.frac_bits, spec.act_bits, spec.act_signed)
    acc = nm.conv2d_int(xi, q, spec.stride, spec.padding, spec.dilation, spec.groups)
    want = nm.epilogue(acc, nm.output_scale(stem.enc.k_lo, spec.frac_bits, 8), stem.bias, spec.activation, 1)
    assert m.layers[0]["act_bits"] == act_bits
    np.testing.assert_array_equal(layers[0], want)


def test_layer_outputs_run_the_same_network_as_run(mobile):
    """``layer_outputs`` (the ``probe`` function the diagnosis reads) computes the output ``run``
    computes, bit for bit: its float glue (HardSwish, the affine, squeeze-excite) is fused the same
    way: ``probe`` is made of dataflow blocks like ``main`` (FuseOps fuses only inside them; the
    recognizer test in test_real_models.py checks a model whose unfused glue rounded differently)."""
    mod, _, _ = compiler.lower(mobile, samples=8, calibration={"x": _images(16, 2)})
    for name in ("main", "probe"):
        assert any(isinstance(b, relax.DataflowBlock) for b in mod[name].body.blocks), name
    x, calib = _images(2, 3), _images(16, 2)
    for config in (PSBConfig(), PSBConfig.preset("int8")):
        m = psb_tvm.compile(mobile, samples=8, calibration={"x": calib}, config=config, cache=False)
        for i in range(len(x)):
            (out,), _ = m.layer_outputs(x[i:i + 1])
            np.testing.assert_array_equal(out.view(np.int32), m.run(x[i:i + 1]).view(np.int32))
