"""Computational attention: masked high-n refinement, its work accounting and its errors."""

import numpy as np
import pytest
from onnx_models import conv_model

import psb_tvm
from psb_tvm import attention
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split

SHAPES = {"input": (10, 1, 8, 8)}


@pytest.fixture(scope="module")
def digits():
    x_train, _, x_test, _ = load_digits_split()
    module = psb_tvm.compile(DIGITS_ONNX, samples=8, input_shapes=SHAPES, calibration={"input": x_train[:100]})
    return module, x_test[:10]


def same_bits(a, b):
    return np.array_equal(np.asarray(a).view(np.int32), np.asarray(b).view(np.int32))


def test_all_ones_mask_is_the_full_high_n_run(digits):
    module, x = digits
    result = module.attend(x, low=2, high=32, mask=np.ones((10, 4, 4), bool), seed=4)
    assert same_bits(result.output, module.run(x, samples=32, seed=4))
    assert same_bits(result.low_output, module.run(x, samples=2, seed=4))
    assert result.high_work_fraction == 1.0
    assert all(f == 1.0 for f in result.layer_fractions.values())


def test_masked_kernels_on_every_layer_match_the_full_kernels(digits):
    """All positions but one: the masked kernels run on every layer (no shortcut to the plain
    kernels) and every untouched image is its full high-n row bit for bit."""
    module, x = digits
    mask = np.ones((10, 4, 4), bool)
    mask[3, 1, 2] = False
    result = module.attend(x, low=2, high=32, mask=mask, seed=4)
    keep = np.arange(10) != 3
    assert same_bits(result.output[keep], module.run(x, samples=32, seed=4)[keep])
    assert 0.9 < result.high_work_fraction < 1.0


def test_all_zeros_mask_is_the_low_n_run(digits):
    module, x = digits
    result = module.attend(x, low=2, high=32, mask=np.zeros((10, 4, 4), bool), seed=4)
    assert same_bits(result.output, module.run(x, samples=2, seed=4))
    assert result.high_work_fraction == 0.0
    assert result.additions["high_pass"] == 0


def test_partial_mask_blends_per_position_on_a_single_conv():
    """One conv layer: masked positions are the high-n values, the others the low-n values, exactly."""
    model = conv_model(in_ch=3, out_ch=6, hw=9, seed=2)
    rng = np.random.default_rng(0)
    module = psb_tvm.compile(model, samples=4, calibration={"x": rng.normal(size=(8, 3, 9, 9)).astype(np.float32)})
    x = rng.normal(size=(1, 3, 9, 9)).astype(np.float32)
    mask = rng.random((1, 9, 9)) < 0.3
    result = module.attend(x, low=1, high=16, mask=mask, seed=1)
    want = np.where(mask[:, None], module.run(x, samples=16, seed=1), module.run(x, samples=1, seed=1))
    assert same_bits(result.output, want)
    assert result.high_work_fraction == pytest.approx(mask.mean())


def test_entropy_mask_modes_and_work_fraction(digits):
    module, x = digits
    fractions = []
    for frac in (0.8, 1.0, 1.2):
        r = module.attend(x, low=2, high=16, mode="mean_entropy", fraction=frac)
        fractions.append(r.high_work_fraction)
        assert r.mask.shape == (10, 4, 4) and r.mask.dtype == bool
    assert fractions[0] >= fractions[1] >= fractions[2] and fractions[0] > fractions[2]
    ent = module.attend(x, low=2, high=16, mode="mean_entropy", fraction=1.0)
    rnd = module.attend(x, low=2, high=16, mode="random", fraction=1.0, mask_seed=3)
    assert np.array_equal(ent.mask.sum(axis=(1, 2)), rnd.mask.sum(axis=(1, 2)))  # same budget per image
    mx = module.attend(x, low=2, high=16, mode="max_entropy", fraction=0.9)
    assert mx.mask.any(axis=(1, 2)).all()  # the max pixel of each image is always kept at fraction < 1
    dil = module.attend(x, low=2, high=16, mode="mean_entropy", fraction=1.0, dilation=1)
    assert (dil.mask >= ent.mask).all() and dil.high_work_fraction >= ent.high_work_fraction


def test_entropy_and_masks_helpers():
    logits = np.zeros((1, 4, 2, 2), np.float32)
    logits[0, 0, 0, 0] = 50.0  # one confident pixel
    ent = attention.entropy_map(logits)
    assert ent[0, 0, 0] < 1e-6 and np.allclose(ent[0].reshape(-1)[1:], np.log(4))
    assert attention.resize_nearest(np.eye(2, dtype=bool)[None], (4, 4))[0].sum() == 8
    mask = np.zeros((1, 5, 5), bool)
    mask[0, 2, 2] = True
    assert attention.dilate(mask, 1).sum() == 9 and attention.dilate(mask, 2).sum() == 25


def test_cost_accounting(digits):
    module, _ = digits
    cost = module.cost(samples={"default": 4, "/fc2/Gemm": 16})
    rows = {r["name"]: r for r in cost["layers"]}
    # conv1: 10 images x 16 channels x 8 x 8 positions x 9 weights each, one addition per sample
    assert rows["/conv1/Conv"]["additions_per_sample"] == 10 * 16 * 8 * 8 * 9
    assert rows["/conv1/Conv"]["additions"] == 4 * rows["/conv1/Conv"]["additions_per_sample"]
    assert rows["/fc2/Gemm"]["additions"] == 16 * 10 * 10 * 64
    assert cost["additions"] == sum(r["additions"] for r in cost["layers"])


@pytest.mark.parametrize("kwargs,match", [
    ({"mask": np.ones((10, 8, 8), bool)}, r"shape \(10, 4, 4\)"),
    ({"mask": np.full((10, 4, 4), 2)}, "0/1 array"),
    ({"mode": "median"}, "unknown attention mode"),
    ({"fraction": -1.0}, "fraction"),
    ({"dilation": -1}, "dilation"),
    ({"high": 3}, "power of two"),
    ({"low": {"nope": 2}}, "unknown layers"),
])
def test_attention_errors(digits, kwargs, match):
    module, x = digits
    with pytest.raises(psb_tvm.ConfigError, match=match):
        module.attend(x, **kwargs)


# ---------------------------------------------------------------- signals beyond the entropy map


@pytest.mark.parametrize("mode,fraction", [("variance", 1.0), ("magnitude", 1.0), ("margin_gate", 0.99),
                                           ("random_gate", 0.99)])
def test_new_modes_blend_high_and_low_exactly(digits, mode, fraction):
    """Every mode is a mask: where it is set the output is the high-n run's, elsewhere the low-n
    run's; an image with no masked pixel is exactly its low-n row, a fully masked image its high-n row."""
    module, x = digits
    r = module.attend(x, low=2, high=16, mode=mode, fraction=fraction, seed=3, mask_seed=1)
    assert r.mask.shape == (10, 4, 4) and r.mask.dtype == bool
    low, high = module.run(x, samples=2, seed=3), module.run(x, samples=16, seed=3)
    none, every = ~r.mask.any(axis=(1, 2)), r.mask.all(axis=(1, 2))
    assert same_bits(r.output[none], low[none]) and same_bits(r.output[every], high[every])
    assert same_bits(r.low_output, low)
    if mode in attention.IMAGE_MODES:
        assert (none | every).all()  # whole images
    # the same mask given explicitly reproduces the output bit for bit (signal only picks the mask)
    again = module.attend(x, low=2, high=16, mask=r.mask, seed=3)
    assert same_bits(again.output, r.output)
    extra = r.additions["signal_pass"]
    assert extra == (module.cost(samples=2)["additions"] if mode == "variance" else 0)
    assert r.high_work_fraction == pytest.approx((r.additions["high_pass"] + extra) / r.additions["full_high"])
    assert r.total_work_fraction == pytest.approx(r.high_work_fraction + r.additions["low_pass"] / r.additions["full_high"])


def test_margin_gate_extremes_are_the_low_and_high_runs(digits):
    module, x = digits
    everything = module.attend(x, low=2, high=32, mode="margin_gate", fraction=1.5, seed=4)
    assert same_bits(everything.output, module.run(x, samples=32, seed=4)) and everything.high_work_fraction == 1.0
    nothing = module.attend(x, low=2, high=32, mode="margin_gate", fraction=0.0, seed=4)
    assert same_bits(nothing.output, module.run(x, samples=2, seed=4)) and nothing.high_work_fraction == 0.0
    # the gate selects the images with the smallest low-n margins; random_gate as many at random
    margins = attention.margin(nothing.low_output)
    gated = module.attend(x, low=2, high=32, mode="margin_gate", fraction=float(np.median(margins)), seed=4)
    chosen = gated.mask.any(axis=(1, 2))
    assert chosen.any() and not chosen.all() and margins[chosen].max() < margins[~chosen].min()
    rnd = module.attend(x, low=2, high=32, mode="random_gate", fraction=float(np.median(margins)), seed=4, mask_seed=2)
    assert rnd.mask.any(axis=(1, 2)).sum() == chosen.sum()


def test_gate_restricts_a_pixel_mask_to_unsure_images(digits):
    module, x = digits
    pixels = module.attend(x, low=2, high=16, mode="magnitude", fraction=0.5, seed=1)
    everywhere = module.attend(x, low=2, high=16, mode="magnitude", fraction=0.5, seed=1, gate=1.5)
    assert np.array_equal(everywhere.mask, pixels.mask) and same_bits(everywhere.output, pixels.output)
    threshold = float(np.median(attention.margin(pixels.low_output)))
    gated = module.attend(x, low=2, high=16, mode="magnitude", fraction=0.5, seed=1, gate=threshold)
    keep = attention.margin(pixels.low_output) < threshold
    assert np.array_equal(gated.mask, pixels.mask & keep[:, None, None])
    assert gated.high_work_fraction < pixels.high_work_fraction
    explicit = module.attend(x, low=2, high=16, mask=np.ones((10, 4, 4), bool), seed=1, gate=0.0)
    assert same_bits(explicit.output, module.run(x, samples=2, seed=1))  # gate 0 refines nothing


def test_variance_signal_is_the_disagreement_of_two_draws(digits):
    module, x = digits
    a = np.zeros((1, 3, 2, 2), np.float32)
    b = a.copy()
    b[0, :, 1, 0] = [1.0, -2.0, 0.5]
    assert np.allclose(attention.disagreement_map(a, b)[0], [[0, 0], [3.5, 0]])
    assert np.allclose(attention.magnitude_map(b)[0], [[0, 0], [3.5, 0]])
    assert np.allclose(attention.margin(np.array([[0.0, 0.0], [50.0, 0.0]])), [0.0, 1.0])
    r1 = module.attend(x, low=2, high=16, mode="variance", fraction=1.0, seed=5)
    r2 = module.attend(x, low=2, high=16, mode="variance", fraction=1.0, seed=5)
    assert np.array_equal(r1.mask, r2.mask)  # deterministic given the seed
    lo = module.attend(x, low=2, high=16, mode="variance", fraction=0.5, seed=5)
    assert lo.mask.sum() >= r1.mask.sum() and (lo.mask >= r1.mask).all()
    assert r1.seconds["signal_pass"] > 0


@pytest.mark.parametrize("kwargs,match", [
    ({"gate": -0.1}, "gate"),
    ({"gate": float("nan")}, "gate"),
    ({"gate": "low"}, "gate"),
    ({"mode": "margin_gate", "fraction": float("inf")}, "fraction"),
    ({"mode": "variance", "fraction": "1"}, "fraction"),
    ({"mode": "variance", "dilation": 1.5}, "dilation"),
])
def test_new_mode_errors(digits, kwargs, match):
    module, x = digits
    with pytest.raises(psb_tvm.ConfigError, match=match):
        module.attend(x, **kwargs)


def test_image_gate_needs_classifier_logits():
    """A model whose output is a feature map has no margin: the gate modes say so."""
    model = conv_model(in_ch=3, out_ch=6, hw=9, seed=2)
    rng = np.random.default_rng(0)
    module = psb_tvm.compile(model, samples=4, calibration={"x": rng.normal(size=(8, 3, 9, 9)).astype(np.float32)})
    x = rng.normal(size=(1, 3, 9, 9)).astype(np.float32)
    with pytest.raises(psb_tvm.ConfigError, match="classifier logits"):
        module.attend(x, low=1, high=4, mode="margin_gate", fraction=0.5)
    with pytest.raises(psb_tvm.ConfigError, match="classifier logits"):
        module.attend(x, low=1, high=4, mode="magnitude", gate=0.5)
    with pytest.raises(psb_tvm.ConfigError, match="selects images"):
        attention.select(np.zeros((1, 2, 2)), "margin_gate", 0.5)
