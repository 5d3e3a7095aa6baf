"""Computational attention: masked high-n refinement, its work accounting and its errors."""

import numpy as np
import pytest

import psb_tvm
from psb_tvm import attention
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split

from onnx_models import conv_model

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
