"""Properties of the numpy reference of the PSB numeric contract (DESIGN.md section 2).

``psb_tvm.numerics`` is the oracle the compiled kernels are checked against, so these tests pin
its behaviour independently: encoding, the sample hash (recomputed in plain Python), nesting,
unbiasedness, error bounds, fixed-point activations and the exact integer layers.
All randomness is seeded; tolerances are derived from the standard error of what is measured.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from psb_tvm import numerics as nm

# ------------------------------------------------------------------ helpers


def _w_shape_bcast(k_lo, ndim):
    return k_lo.reshape((-1,) + (1,) * (ndim - 1)).astype(np.int64)


def _mixed_weights(rng, shape=(16, 8, 3, 3)):
    """Gaussian weights with per-channel scales spanning 2^-12 .. 2^4, plus zeros."""
    w = rng.normal(size=shape) * np.exp2(rng.integers(-12, 5, size=(shape[0],) + (1,) * (len(shape) - 1)))
    w = w.astype(np.float32)
    w.reshape(-1)[::17] = 0.0
    return w


def _floor_log2(v: float) -> int:
    return math.frexp(v)[1] - 1


# ------------------------------------------------------------------ encoding


@pytest.mark.parametrize("E", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("P", [4, 8, 16, 24])
def test_encoding_normal_subnormal_zero(E, P):
    rng = np.random.default_rng(100 * E + P)
    w = _mixed_weights(rng)
    enc = nm.encode_weights(w, E=E, P=P)
    a = np.abs(w.astype(np.float64))
    k_lo = _w_shape_bcast(enc.k_lo, w.ndim)
    k_lo_full = np.broadcast_to(k_lo, w.shape)

    # Stored types, ranges and the E/P configuration.
    assert enc.E == E and enc.P == P and enc.shape == w.shape
    assert enc.sign.dtype == np.int8 and enc.normal.dtype == np.int8 and enc.shift.dtype == np.int8
    assert enc.threshold.dtype == np.int32 and enc.k_lo.shape == (w.shape[0],)
    assert enc.threshold.min() >= 0 and enc.threshold.max() <= 2**P
    assert enc.shift.min() >= 0 and enc.shift.max() <= E - 1
    assert set(np.unique(enc.normal)) <= {0, 1}
    np.testing.assert_array_equal(enc.sign, np.sign(w).astype(np.int8))

    # k_lo per channel = floor(log2 max|w_c|) - (E - 1), computed independently with math.frexp.
    for c in range(w.shape[0]):
        m = float(a[c].max())
        assert enc.k_lo[c] == _floor_log2(m) - (E - 1)

    t = enc.threshold.astype(np.float64)
    normal = enc.normal.astype(bool)
    zero = a == 0
    sub = ~normal & ~zero

    # Normal: 2^k <= |w| < 2^(k+1) with k = k_lo + shift; |w| = 2^k (1 + t/2^P) up to half a step.
    k = k_lo + enc.shift.astype(np.int64)
    assert normal.any()
    lo = np.ldexp(1.0, k)
    assert np.all(lo[normal] <= a[normal]) and np.all(a[normal] < 2 * lo[normal])
    recon = lo * (1 + t / 2**P)
    assert np.all(np.abs(recon - a)[normal] <= lo[normal] * 2.0 ** -(P + 1))
    assert np.all(np.abs(recon - a)[normal] <= a[normal] * 2.0**-P)  # relative 2^-P
    # The largest weight of every channel sits in the top exponent level.
    flat_shift = enc.shift.reshape(w.shape[0], -1)
    flat_a = a.reshape(w.shape[0], -1)
    for c in range(w.shape[0]):
        if flat_a[c].max() > 0:
            assert flat_shift[c, flat_a[c].argmax()] == E - 1

    # Subnormal: |w| < 2^k_lo, normal 0, shift 0, |w| = 2^k_lo * t / 2^P up to half a step.
    if E > 1:
        assert sub.any()
    base = np.ldexp(1.0, k_lo_full)
    assert np.all(a[sub] < base[sub])
    assert np.all(enc.shift[sub] == 0)
    assert np.all(np.abs(base * t / 2**P - a)[sub] <= base[sub] * 2.0 ** -(P + 1))
    # A normal weight is exactly one with |w| >= 2^k_lo.
    np.testing.assert_array_equal(normal, a >= base)

    # Zero: sign 0 and nothing else set.
    assert zero.any()
    assert np.all(enc.sign[zero] == 0) and np.all(enc.normal[zero] == 0)
    assert np.all(enc.shift[zero] == 0) and np.all(enc.threshold[zero] == 0)


def test_encoding_exact_powers_and_threshold_full_scale():
    P = 16
    top = np.nextafter(np.float32(2.0), np.float32(0))  # 2 - 2^-23: p rounds up to 1
    w = np.array([[2.0, 1.0, -0.5, top, -top, 0.25, 2.0**-3, 0.0]], np.float32)
    enc = nm.encode_weights(w, E=4, P=P)
    assert enc.k_lo[0] == 1 - 3
    np.testing.assert_array_equal(enc.normal[0], [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(enc.shift[0], [3, 2, 1, 2, 2, 0, 0, 0])
    # Powers of two have p = 0 (never a sample bit), 2^-3 = 2^k_lo / 2 is subnormal with p = 1/2.
    np.testing.assert_array_equal(enc.threshold[0], [0, 0, 0, 2**P, 2**P, 0, 2 ** (P - 1), 0])
    # t = 2^P: every sample bit is one, so q = s * 2n * 2^shift deterministically.
    for n in (1, 4, 8):
        q = nm.integer_weights(enc, n, seed=5, layer=2)
        np.testing.assert_array_equal(q[0], [8 * n, 4 * n, -2 * n, 8 * n, -8 * n, n, q[0, 6], 0])
        assert 0 <= q[0, 6] <= n


def test_encoding_per_tensor_vs_per_channel():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 32)).astype(np.float32)
    w[1] *= 2.0**-10  # a quiet channel
    w[2] *= 2.0**3
    w[3] *= 2.0**6
    E = 4
    pc = nm.encode_weights(w, E=E, per_channel=True)
    pt = nm.encode_weights(w, E=E, per_channel=False)
    gmax = float(np.abs(w).max())
    assert np.all(pt.k_lo == _floor_log2(gmax) - (E - 1))
    for c in range(4):
        assert pc.k_lo[c] == _floor_log2(float(np.abs(w[c]).max())) - (E - 1)
    assert len(set(pc.k_lo.tolist())) == 4
    # Per tensor, the quiet channel falls entirely below 2^k_lo (all subnormal); per channel it keeps
    # its E exponent levels.
    assert pt.normal[1].sum() == 0 and pc.normal[1].sum() > 0
    np.testing.assert_array_equal(pc.normal[3], pt.normal[3])
    np.testing.assert_array_equal(pc.threshold[3], pt.threshold[3])
    # Both encodings have expectation w up to half a threshold step: s * 2^k * (normal + t / 2^P).
    for enc in (pc, pt):
        step = np.ldexp(1.0, _w_shape_bcast(enc.k_lo, 2) + enc.shift.astype(np.int64))
        expect = enc.sign * step * (enc.normal + enc.threshold / 2**enc.P)
        assert np.all(np.abs(expect - w.astype(np.float64)) <= step * 2.0 ** -(enc.P + 1))


def test_encoding_all_zero_channel():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    w[1] = 0.0
    enc = nm.encode_weights(w, E=4)
    assert np.isfinite(enc.k_lo.astype(np.float64)).all()
    for arr in (enc.sign, enc.normal, enc.shift, enc.threshold):
        assert np.all(arr[1] == 0)
    q = nm.integer_weights(enc, 8, 3, 4)
    assert np.all(q[1] == 0) and np.any(q[0] != 0)
    scale = nm.output_scale(enc.k_lo, 5, 8)
    assert np.isfinite(scale).all() and np.all(scale > 0)
    # The whole tensor zero works too.
    z = nm.encode_weights(np.zeros((2, 5), np.float32))
    assert np.all(nm.integer_weights(z, 4, 0, 0) == 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encoding_rejects_non_finite(bad):
    w = np.ones((2, 3), np.float32)
    w[1, 2] = bad
    with pytest.raises(ValueError):
        nm.encode_weights(w)


def test_encoding_rejects_shapeless():
    with pytest.raises(ValueError):
        nm.encode_weights(np.float32(1.0))
    with pytest.raises(ValueError):
        nm.encode_weights(np.zeros((0, 3), np.float32))


# ------------------------------------------------------------------ hash


def _py_mix32(x: int) -> int:
    """lowbias32 written out with Python ints."""
    M = 0xFFFFFFFF
    x &= M
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M
    x ^= x >> 15
    x = (x * 0x846CA68B) & M
    x ^= x >> 16
    return x


def _py_layer_key(seed: int, layer: int) -> int:
    return _py_mix32(_py_mix32(seed & 0xFFFFFFFF) ^ ((layer * 0x9E3779B9) & 0xFFFFFFFF))


def _py_hash(seed: int, layer: int, i: int, j: int, P: int) -> int:
    u = _py_mix32(_py_layer_key(seed, layer) ^ i)
    return _py_mix32(u ^ ((j * 0x9E3779B9) & 0xFFFFFFFF)) >> (32 - P)


def test_hash_constants_pinned():
    assert (nm.MIX_C1, nm.MIX_C2, nm.GOLDEN) == (0x7FEB352D, 0x846CA68B, 0x9E3779B9)


@pytest.mark.parametrize(
    "seed,layer",
    [(0, 0), (1, 0), (0, 1), (12345, 7), (2**32 - 1, 2**31 + 3), (2**40 + 9, 5), (-1, -2)],
)
def test_hash_matches_plain_python_formula(seed, layer):
    assert int(nm.layer_key(seed, layer)) == _py_layer_key(seed, layer)
    idx = np.array([0, 1, 2, 1000, 65535, 2**20 + 7, 2**32 - 1], dtype=np.uint32)
    js = np.array([0, 1, 3, 63, 1023])
    for P in (1, 8, 16, 30, 32):
        got = nm.sample_hash(seed, layer, idx[None, :], js[:, None], P)
        want = [[_py_hash(seed, layer, int(i), int(j), P) for i in idx] for j in js]
        np.testing.assert_array_equal(got.astype(np.int64), np.array(want, np.int64))
    # mix32 itself, on a few values including the wrap-around corners.
    xs = [0, 1, 2, 0xDEADBEEF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
    np.testing.assert_array_equal(nm.mix32(np.array(xs, np.uint32)).astype(np.int64), [_py_mix32(x) for x in xs])


def test_hash_golden_values():
    """Literal values: catches a change that both the reference and a rewritten oracle would share."""
    assert _py_mix32(1) == 0x688990C0
    assert int(nm.mix32(np.array([1], np.uint32))[0]) == 0x688990C0
    assert int(nm.layer_key(0, 0)) == 0  # mix32(0) == 0
    assert int(nm.layer_key(3, 1)) == 0xD13920C4
    idx = np.array([0, 5, 123], np.uint32)
    js = np.array([0, 1, 63])
    got = nm.sample_hash(7, 3, idx, js, 16).tolist()
    assert got == [10466, 32679, 36178]
    assert got == [_py_hash(7, 3, int(i), int(j), 16) for i, j in zip(idx, js)]


def test_hash_scalar_inputs_do_not_warn():
    # mix32 wraps modulo 2^32 by design; scalar arguments must not raise overflow warnings (these
    # turn into errors under -W error).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = nm.sample_hash(1, 2, 3, 4)
        nm.mix32(0xFFFFFFFF)
    assert int(h) == _py_hash(1, 2, 3, 4, 16)


def test_hash_deterministic_and_distinct():
    idx = np.arange(4096, dtype=np.uint32)
    a = nm.sample_hash(11, 3, idx, 5)
    np.testing.assert_array_equal(a, nm.sample_hash(11, 3, idx, 5))
    P = 16
    # Two independent streams agree on a value with probability 2^-16: allow at most 0.5% matches.
    others = {
        "seed": nm.sample_hash(12, 3, idx, 5),
        "layer": nm.sample_hash(11, 4, idx, 5),
        "sample": nm.sample_hash(11, 3, idx, 6),
        "index": nm.sample_hash(11, 3, idx + np.uint32(4096), 5),
    }
    for name, b in others.items():
        assert np.mean(a == b) < 0.005, name
    # Within one stream, distinct indices give (almost all) distinct values, and the 32-bit stream
    # is injective in i for fixed j (mix32 is a bijection).
    assert len(np.unique(a)) > 4096 * 0.9
    full = nm.sample_hash(11, 3, idx, 5, P=32)
    assert len(np.unique(full)) == 4096
    assert a.max() < 2**P


@pytest.mark.parametrize("P", [8, 16, 24])
def test_hash_roughly_uniform(P):
    n_draws = 100_000
    idx = np.arange(n_draws // 10, dtype=np.uint32)
    h = nm.sample_hash(2024, 9, idx[None, :], np.arange(10)[:, None], P).astype(np.float64).ravel()
    assert h.size == n_draws and h.min() >= 0 and h.max() < 2**P
    mean_expected = (2**P - 1) / 2
    se = 2**P / math.sqrt(12) / math.sqrt(n_draws)
    assert abs(h.mean() - mean_expected) < 5 * se
    # 16 equal buckets: chi-square with 15 dof; 60 is far in the tail (p ~ 1e-7).
    counts = np.bincount((h * 16 / 2**P).astype(int), minlength=16)
    chi2 = ((counts - n_draws / 16) ** 2 / (n_draws / 16)).sum()
    assert chi2 < 60
    # Every one of the P bits is balanced.
    hi = h.astype(np.int64)
    for b in range(P):
        frac = ((hi >> b) & 1).mean()
        assert abs(frac - 0.5) < 5 * 0.5 / math.sqrt(n_draws), b


@pytest.mark.parametrize("sampler", nm.SAMPLERS)
def test_sample_bits_probability_matches_threshold(sampler):
    P = 16
    thr = np.array([0, 1, 2**14, 2**15, 3 * 2**14, 2**16 - 1, 2**16], np.int32)
    m = thr.size
    enc = nm.EncodedWeights(
        sign=np.ones((m,), np.int8), normal=np.ones((m,), np.int8), shift=np.zeros((m,), np.int8),
        threshold=thr, k_lo=np.zeros((m,), np.int32), E=4, P=P,
    )
    n = 20_000
    bits = nm.sample_bits(enc, 3, 1, 0, n, sampler)
    assert bits.shape == (n, m) and bits.dtype == np.int8
    frac = bits.mean(axis=0)
    p = thr / 2**P
    se = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(frac - p) <= 5 * se + 1e-12)
    assert frac[0] == 0 and frac[-1] == 1


# ------------------------------------------------------------------ nesting (progressive)


@pytest.mark.parametrize("sampler", nm.SAMPLERS)
@pytest.mark.parametrize("n", [1, 2, 4, 16, 64])
@pytest.mark.parametrize("seed,layer", [(0, 0), (7, 3)])
def test_nesting_prefix_and_refinement(n, seed, layer, sampler):
    rng = np.random.default_rng(n + 10 * seed)
    w = _mixed_weights(rng, (6, 4, 3, 3))
    enc = nm.encode_weights(w, E=4)
    b2 = nm.sample_bits(enc, seed, layer, 0, 2 * n, sampler)
    b1 = nm.sample_bits(enc, seed, layer, 0, n, sampler)
    second = nm.sample_bits(enc, seed, layer, n, 2 * n, sampler)
    np.testing.assert_array_equal(b2[:n], b1)
    np.testing.assert_array_equal(b2[n:], second)
    # B(2n) = B(n) + bits n..2n-1
    B1 = nm.sample_counts(enc, n, seed, layer, sampler)
    B2 = nm.sample_counts(enc, 2 * n, seed, layer, sampler)
    np.testing.assert_array_equal(B1, b1.sum(axis=0, dtype=np.int64))  # closed form == explicit sum
    np.testing.assert_array_equal(B2, B1 + second.sum(axis=0, dtype=np.int64))
    # The second half is not a copy of the first (would make refinement useless).
    if n >= 2:
        assert np.any(b1 != second)

    # w~(2n) == (w~(n) + w~'(n)) / 2 exactly, w~' built from samples n..2n-1.
    sign = enc.sign.astype(np.int64)
    normal = enc.normal.astype(np.int64)
    shift = enc.shift.astype(np.int64)
    q1 = nm.integer_weights(enc, n, seed, layer, sampler)
    q2 = nm.integer_weights(enc, 2 * n, seed, layer, sampler)
    q1p = sign * ((n * normal + second.sum(axis=0, dtype=np.int64)) << shift)
    np.testing.assert_array_equal(q2, q1 + q1p)
    wt2 = nm.weight_values(enc, q2, 2 * n)
    wt_avg = (nm.weight_values(enc, q1, n) + nm.weight_values(enc, q1p, n)) / 2
    np.testing.assert_array_equal(wt2, wt_avg)

    # And for the layer output: acc(2n) = acc(n) + acc'(n), y(2n) = (y(n) + y'(n)) / 2.
    x = nm.quantize_activations(rng.normal(size=(2, 4, 5, 5)), 5, 8, True)
    a1 = nm.conv2d_int(x, q1, padding=(1, 1, 1, 1))
    a1p = nm.conv2d_int(x, q1p, padding=(1, 1, 1, 1))
    a2 = nm.conv2d_int(x, q2, padding=(1, 1, 1, 1))
    np.testing.assert_array_equal(a2, a1 + a1p)
    s1, s2 = nm.output_scale(enc.k_lo, 5, n), nm.output_scale(enc.k_lo, 5, 2 * n)
    np.testing.assert_array_equal(s1, 2 * s2)


# ------------------------------------------------------------------ unbiasedness and error bounds


def _unbias_weights():
    # One channel: max 1.9 -> k_hi = 0, k_lo = -3 (E = 4); values below 2^-3 are subnormal.
    vals = [1.9, -1.3, 1.01, 0.77, -0.6, 0.3, 0.2, -0.13, 0.126,  # normal
            0.1, -0.07, 0.031, 0.0123, -0.004, 0.11]  # subnormal
    return np.array([vals], np.float32)


@pytest.mark.parametrize("sampler", nm.SAMPLERS)
@pytest.mark.parametrize("n", [1, 4])
def test_unbiased_over_seeds(n, sampler):
    """Unbiased over seeds; i.i.d. with the binomial spread, stratified within one sample."""
    w = _unbias_weights()
    enc = nm.encode_weights(w, E=4)
    assert enc.normal.sum() == 9 and (enc.normal == 0).sum() == 6
    seeds = 2000
    wts = np.stack([nm.weight_values(enc, nm.integer_weights(enc, n, s, 1, sampler), n) for s in range(seeds)])
    mean = wts.mean(axis=0)
    k = _w_shape_bcast(enc.k_lo, 2) + enc.shift.astype(np.int64)
    step = np.ldexp(1.0, k)
    p_eff = enc.threshold / 2**enc.P
    sd = step * np.sqrt(p_eff * (1 - p_eff) / n)
    w64 = w.astype(np.float64)
    # Bias of the encoding itself is at most half a threshold step ...
    assert np.all(np.abs(enc.sign * step * (enc.normal + p_eff) - w64) <= step * 2.0 ** -(enc.P + 1))
    # ... and the sampled mean converges to w within its standard error.
    tol = 5 * sd / math.sqrt(seeds) + step * 2.0**-enc.P
    assert np.all(np.abs(mean - w64) <= tol), (mean - w64) / tol
    if sampler == "stratified":  # every draw is floor or ceil of n p: error below one sample
        assert np.all(np.abs(wts - enc.sign * step * (enc.normal + p_eff)) < step / n * (1 + 1e-9))
        return
    # The spread across seeds is the binomial one: draws are independent across seeds.
    z2 = ((wts - enc.sign * step * (enc.normal + p_eff)) / sd) ** 2
    assert 0.85 < z2.mean() < 1.15


@pytest.mark.parametrize("sampler", nm.SAMPLERS)
@pytest.mark.parametrize("E", [2, 4, 6])
def test_bounded_error_every_draw(E, sampler):
    rng = np.random.default_rng(E)
    w = _mixed_weights(rng, (8, 64))
    enc = nm.encode_weights(w, E=E)
    a = np.abs(w.astype(np.float64))
    normal = enc.normal.astype(bool)
    k = _w_shape_bcast(enc.k_lo, 2) + enc.shift.astype(np.int64)
    step = np.ldexp(1.0, k)
    for n in (1, 2, 4, 8, 64):
        for seed in range(5):
            q = nm.integer_weights(enc, n, seed, 2, sampler)
            assert np.all(np.abs(q) <= nm.max_abs_q(E, n))
            wt = nm.weight_values(enc, q, n)
            err = np.abs(wt - w.astype(np.float64))
            assert np.all(err[normal] <= step[normal])
            assert np.all(step[normal] <= a[normal])
            # Sign is kept; subnormal weights stay within [0, 2^k_lo] in magnitude.
            assert np.all(np.sign(wt) * np.sign(w) >= 0)
            assert np.all(np.abs(wt)[~normal] <= step[~normal])


def _dense_rel_error(n: int, sampler: str) -> float:
    """Relative output error of a 1152-input dense layer (Gaussian weights, ReLU'd Gaussian inputs)
    with its weights sampled at ``n``, mean over 3 seeds."""
    rng = np.random.default_rng(0)
    K, O, M = 1152, 64, 16
    w = rng.normal(size=(O, K)).astype(np.float32)
    x = np.maximum(rng.normal(size=(M, K)), 0).astype(np.float64)
    enc = nm.encode_weights(w, E=4)
    y = x @ w.astype(np.float64).T
    errs = []
    for seed in range(3):
        wt = nm.weight_values(enc, nm.integer_weights(enc, n, seed, 0, sampler), n)
        errs.append(np.sqrt(np.mean((x @ wt.T - y) ** 2) / np.mean(y**2)))
    return float(np.mean(errs))


def test_relative_error_shrinks_with_samples():
    """i.i.d. sampler: the output error falls as 1/sqrt(n)."""
    rel = [_dense_rel_error(n, "iid") for n in (1, 4, 16, 64)]
    # DESIGN.md quotes ~0.28 / 0.14 / 0.07 / 0.04.
    bands = [(0.2, 0.4), (0.1, 0.2), (0.05, 0.1), (0.025, 0.055)]
    for r, (lo, hi) in zip(rel, bands):
        assert lo < r < hi, rel
    for a, b in zip(rel, rel[1:]):
        assert 1.6 < a / b < 2.5, rel  # ~ sqrt(4) per 4x samples


# ------------------------------------------------------------------ the stratified stream


def _all_points(P):
    """``[o, j]``: the stratified point ``(o + bitrev_P(j)) mod 2**P`` for every offset and sample."""
    o = np.arange(1 << P)[:, None]
    return (o + nm.bit_reverse(np.arange(1 << P), P)[None, :]) & ((1 << P) - 1)


def test_bit_reverse():
    assert nm.bit_reverse(np.arange(8), 3).tolist() == [0, 4, 2, 6, 1, 5, 3, 7]
    assert int(nm.bit_reverse(1, 16)) == 1 << 15 and int(nm.bit_reverse(3, 16)) == 3 << 14


@pytest.mark.parametrize("P", [1, 3, 6])
def test_stratified_closed_form_equals_explicit_sum(P):
    """Every offset, threshold and prefix length m in [0, 2**P]: the closed form counts exactly the
    points below t among the first m samples (any m, not only powers of two)."""
    u = _all_points(P)
    t = np.arange((1 << P) + 1)
    for m in range((1 << P) + 1):
        explicit = (u[:, None, :m] < t[None, :, None]).sum(-1)
        np.testing.assert_array_equal(nm.stratified_count(np.arange(1 << P)[:, None], t[None, :], m, P), explicit)
    with pytest.raises(ValueError, match="outside"):
        nm.stratified_count(0, 0, (1 << P) + 1, P)


@pytest.mark.parametrize("P", [4, 7])
def test_stratified_exactly_unbiased_and_within_one(P):
    """Over all 2**P offsets (what the hash makes uniform) the mean count is exactly n t / 2**P
    (Hermite's identity), and every single count is floor or ceil of n t / 2**P: variance <= 1/4."""
    o = np.arange(1 << P)[:, None]
    t = np.arange((1 << P) + 1)[None, :]
    for log2n in range(P + 1):
        n = 1 << log2n
        B = nm.stratified_count(o, t, n, P)
        np.testing.assert_array_equal(B.sum(axis=0) * (1 << P), n * t[0] * (1 << P))  # mean == n t / 2^P
        exact = n * t / (1 << P)
        assert np.all((B == np.floor(exact)) | (B == np.ceil(exact)))
        assert np.all(B.var(axis=0) <= 0.25 + 1e-12)


def test_stratified_nested_grids():
    """The first n points of a weight form a grid of spacing 2**P / n (one per stratum), and those
    of 2n contain those of n."""
    P = 8
    u = _all_points(P)
    for n in (1, 2, 4, 16, 256):
        pts = np.sort(u[:, :n], axis=1)
        steps = np.diff(pts, axis=1)
        assert np.all(steps == (1 << P) // n)
        if 2 * n <= (1 << P):
            assert all(set(u[o, :n]) <= set(u[o, :2 * n]) for o in range(0, 1 << P, 17))


def test_stratified_offsets_differ_by_seed_and_layer():
    """The rotation is the top P bits of the per-weight hash: seeds and layers give other draws."""
    idx = np.arange(4096, dtype=np.uint32)
    a = nm.sample_offset(11, 3, idx)
    assert a.max() < 2**16
    for other in (nm.sample_offset(12, 3, idx), nm.sample_offset(11, 4, idx)):
        assert np.mean(a == other) < 0.01
    enc = nm.encode_weights(np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32))
    draws = [nm.sample_counts(enc, 8, seed, 1) for seed in range(4)]
    assert all(np.any(draws[0] != d) for d in draws[1:])
    assert nm.sample_counts(enc, 8, 0, 1, "iid").shape == draws[0].shape
    with pytest.raises(ValueError, match="sampler"):
        nm.sample_counts(enc, 8, 0, 1, "sobol")


def test_stratified_error_falls_as_one_over_n():
    """The dense-layer experiment of the i.i.d. test above: the stratified error is smaller at every
    n, more so as n grows, and falls ~4x per 4x samples (1/n), not 2x (1/sqrt(n))."""
    strat = [_dense_rel_error(n, "stratified") for n in (4, 16, 64)]
    iid = [_dense_rel_error(n, "iid") for n in (4, 16, 64)]
    # measured: stratified 0.074 / 0.019 / 0.0048, i.i.d. 0.139 / 0.070 / 0.035 at n = 4 / 16 / 64
    for s_, i_, gain in zip(strat, iid, (1.5, 3.0, 5.0)):
        assert s_ < i_ / gain, (strat, iid)
    assert strat[0] / strat[1] > 3.0 and strat[1] / strat[2] > 3.0, strat  # 4x n: ~4x smaller


# ------------------------------------------------------------------ activations


def test_quantize_round_half_to_even():
    x = np.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49999997, 1.4999999, -0.75])
    got = nm.quantize_activations(x, 0, 8, True)
    np.testing.assert_array_equal(got, [0, 2, 2, 4, 0, -2, -2, 0, 1, -1])
    assert got.dtype == np.int64
    # Ties after scaling: 0.25 * 2 = 0.5 -> 0, 0.75 * 2 = 1.5 -> 2, -1.25 * 2 = -2.5 -> -2.
    np.testing.assert_array_equal(nm.quantize_activations([0.25, 0.75, -1.25], 1, 8, True), [0, 2, -2])
    # Negative frac bits: 48 * 2^-5 = 1.5 -> 2, 80 * 2^-5 = 2.5 -> 2.
    np.testing.assert_array_equal(nm.quantize_activations([48.0, 80.0], -5, 8, True), [2, 2])


def test_quantize_in_float32():
    # float64 input is rounded to float32 first (as the kernel receives it): 0.5 + 1e-12 -> 0.5 -> 0.
    np.testing.assert_array_equal(nm.quantize_activations(np.float64(0.5 + 1e-12), 0, 8, True), 0)
    # 2.5000002 is the float32 just above the tie, so it rounds up.
    np.testing.assert_array_equal(nm.quantize_activations(np.float32(2.5000002), 0, 8, True), 3)


@pytest.mark.parametrize(
    "bits,signed,lo,hi",
    [(8, True, -128, 127), (8, False, 0, 255), (16, True, -32768, 32767), (16, False, 0, 65535)],
)
def test_quantize_clips_to_range(bits, signed, lo, hi):
    assert nm.act_range(bits, signed) == (lo, hi)
    f = 3
    x = np.array([lo - 1000, lo - 0.5, lo, lo + 0.5, -0.5, 0, 3.5, hi - 0.5, hi, hi + 0.5, hi + 1000, np.inf, -np.inf])
    got = nm.quantize_activations(x / 2.0**f, f, bits, signed)
    want = np.clip(np.rint(x), lo, hi)
    np.testing.assert_array_equal(got, want)
    assert got.min() == lo and got.max() == hi


@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (16, True), (16, False)])
@pytest.mark.parametrize("max_abs", [1e-3, 0.3, 1.0, 127 / 32, 3.99, 4.0, 127.0, 128.0, 255.0, 1e4, 7.0e5])
def test_choose_frac_bits_largest(max_abs, bits, signed):
    hi = nm.act_range(bits, signed)[1]
    f = nm.choose_frac_bits(max_abs, bits, signed)
    assert isinstance(f, int)
    assert max_abs * 2.0**f <= hi
    assert max_abs * 2.0 ** (f + 1) > hi
    # and the value then survives quantization without clipping
    assert nm.quantize_activations(np.float32(max_abs), f, bits, signed) <= hi


def test_choose_frac_bits_edges():
    assert nm.choose_frac_bits(127 / 32, 8, True) == 5  # exactly hi at f = 5
    assert nm.choose_frac_bits(255 / 32, 8, False) == 5
    assert nm.choose_frac_bits(0.0, 8, True) == 0
    assert nm.choose_frac_bits(float("nan"), 8, True) == 0
    assert nm.choose_frac_bits(float("inf"), 8, True) == 0
    assert nm.choose_frac_bits(1e-30, 8, True) == 64  # clamped
    assert nm.choose_frac_bits(1e30, 8, True) == -64


# ------------------------------------------------------------------ accumulators and sample counts


def test_accumulator_bits_boundary():
    # bound = K * n * 2^E * max|x|; int32 iff bound <= 2^31 - 1.
    assert nm.accumulator_bits(2**20 - 1, 4, 1, 8, True) == 32  # (2^20-1) * 16 * 128 < 2^31
    assert nm.accumulator_bits(2**20, 4, 1, 8, True) == 64  # = 2^31
    assert nm.accumulator_bits(2**20 // 64, 4, 64, 8, True) == 64
    assert nm.accumulator_bits(2**20 // 64 - 1, 4, 64, 8, True) == 32
    # unsigned 8-bit: max|x| = 255
    K = ((1 << 31) - 1) // (16 * 255)
    assert nm.accumulator_bits(K, 4, 1, 8, False) == 32
    assert nm.accumulator_bits(K + 1, 4, 1, 8, False) == 64
    # 16-bit activations with E = 8 overflow int32 quickly
    assert nm.accumulator_bits(300, 8, 1, 16, True) == 64
    assert nm.accumulator_bits(255, 8, 1, 16, True) == 32  # 255 * 256 * 32768 < 2^31
    for K, E, n, bits, signed in [(1152, 4, 64, 8, True), (9, 8, 64, 16, False), (1, 16, 1024, 16, True)]:
        lo, hi = nm.act_range(bits, signed)
        bound = K * n * 2**E * max(-lo, hi)
        assert nm.accumulator_bits(K, E, n, bits, signed) == (32 if bound < 2**31 else 64)


def test_check_samples():
    for k in range(11):
        assert nm.check_samples(2**k) == k
        assert nm.check_samples(np.int64(2**k), n_max=1024) == k
    assert nm.check_samples(64, n_max=64) == 6
    for bad in (0, 3, 6, -1, -2, True, False, 2.0, "4", None, 12):
        with pytest.raises(ValueError):
            nm.check_samples(bad)
    with pytest.raises(ValueError):
        nm.check_samples(128, n_max=64)
    # The samplers validate n as well.
    enc = nm.encode_weights(np.ones((1, 2), np.float32))
    with pytest.raises(ValueError):
        nm.integer_weights(enc, 3, 0, 0)
    with pytest.raises(ValueError):
        nm.output_scale(enc.k_lo, 0, 6)


def test_max_abs_q_is_tight():
    # w just below 2^(k_hi+1) in the top level with t = 2^P: |q| = n * 2^E exactly.
    top = np.nextafter(np.float32(1.0), np.float32(0))
    enc = nm.encode_weights(np.array([[top, -top, 0.1]], np.float32), E=3)
    for n in (1, 8, 64):
        q = nm.integer_weights(enc, n, 0, 0)
        assert q[0, 0] == nm.max_abs_q(3, n) == n * 8 and q[0, 1] == -n * 8


@pytest.mark.parametrize("E", [1, 3, 4, 16])
def test_weight_code_gives_the_same_integer_weights(E):
    """The one-byte code the run-time draw reads (sign, normal flag, shift) gives the same q as
    the three arrays for every weight: zeros, subnormal-small ones, both signs, every shift."""
    rng = np.random.default_rng(E)
    w = (rng.standard_normal((16, 64)) * np.exp2(rng.integers(-20, 4, (16, 64)))).astype(np.float32)
    w[0, :8] = 0.0
    w[1, :4] = [1e-30, -1e-30, np.float32(2.0**-140), -0.0]
    enc = nm.encode_weights(w, E=E)
    code = nm.weight_code(enc)
    assert code.dtype == np.uint8 and int((code & 63).max()) == E - 1
    for n in (1, 8, 64):
        counts = nm.sample_counts(enc, n, 3, 1)
        assert np.array_equal(nm.weights_from_code(code, counts, n), nm.weights_from_counts(enc, counts, n))


# ------------------------------------------------------------------ layers


def _conv_direct(x, w, stride, padding, dilation, groups):
    """Float64 convolution written as plain loops, independent of ``conv2d_int``."""
    N, C, H, W = x.shape
    O, Cg, KH, KW = w.shape
    pt, pl, pb, pr = padding
    sh, sw = stride
    dh, dw = dilation
    OH = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
    Og = O // groups
    out = np.zeros((N, O, OH, OW))
    for b in range(N):
        for o in range(O):
            g = o // Og
            for oy in range(OH):
                for ox in range(OW):
                    s = 0.0
                    for c in range(Cg):
                        for ky in range(KH):
                            for kx in range(KW):
                                iy = oy * sh + ky * dh - pt
                                ix = ox * sw + kx * dw - pl
                                if 0 <= iy < H and 0 <= ix < W:
                                    s += float(x[b, g * Cg + c, iy, ix]) * float(w[o, c, ky, kx])
                    out[b, o, oy, ox] = s
    return out


@pytest.mark.parametrize(
    "x_shape,w_shape,stride,padding,dilation,groups",
    [
        ((1, 3, 5, 5), (4, 3, 1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
        ((2, 3, 6, 5), (4, 3, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
        ((1, 2, 7, 7), (3, 2, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
        ((1, 2, 6, 6), (2, 2, 3, 2), (1, 2), (0, 1, 1, 0), (1, 1), 1),
        ((1, 2, 8, 7), (2, 2, 3, 3), (1, 1), (2, 1, 0, 2), (2, 3), 1),
        ((1, 4, 5, 5), (6, 2, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),
        ((2, 3, 5, 6), (6, 1, 3, 3), (2, 1), (1, 0, 2, 1), (1, 2), 3),
    ],
)
def test_conv2d_int_matches_direct_loop(x_shape, w_shape, stride, padding, dilation, groups):
    rng = np.random.default_rng(sum(x_shape) + sum(w_shape))
    x = rng.integers(-128, 128, size=x_shape)
    q = rng.integers(-512, 513, size=w_shape)
    got = nm.conv2d_int(x, q, stride=stride, padding=padding, dilation=dilation, groups=groups)
    assert got.dtype == np.int64
    want = _conv_direct(x, q, stride, padding, dilation, groups)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want.astype(np.int64))


def test_conv2d_int_rejects_group_mismatch():
    with pytest.raises(ValueError):
        nm.conv2d_int(np.zeros((1, 4, 3, 3), np.int64), np.zeros((4, 3, 1, 1), np.int64), groups=1)
    with pytest.raises(ValueError):
        nm.conv2d_int(np.zeros((1, 4, 3, 3), np.int64), np.zeros((3, 2, 1, 1), np.int64), groups=2)


def test_dense_int_exact_beyond_int32():
    rng = np.random.default_rng(3)
    x = rng.integers(30000, 32768, size=(3, 300))
    q = rng.integers(1000, 16384, size=(5, 300))
    got = nm.dense_int(x, q)
    want = [[sum(int(a) * int(b) for a, b in zip(x[m], q[o])) for o in range(5)] for m in range(3)]
    np.testing.assert_array_equal(got, np.array(want, np.int64))
    assert got.max() > 2**31


def test_epilogue_reconstructs_the_represented_dot_product():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(6, 40)).astype(np.float32)
    x = rng.normal(size=(3, 40)).astype(np.float32)
    f, n = 5, 8
    enc = nm.encode_weights(w, E=4)
    q = nm.integer_weights(enc, n, 1, 2)
    xi = nm.quantize_activations(x, f, 8, True)
    acc = nm.dense_int(xi, q)
    scale = nm.output_scale(enc.k_lo, f, n)
    assert scale.dtype == np.float32
    np.testing.assert_array_equal(np.log2(scale.astype(np.float64)), enc.k_lo - f - 3)
    y = nm.epilogue(acc, scale, None, None, 1)
    assert y.dtype == np.float32
    exact = (xi / 2.0**f) @ nm.weight_values(enc, q, n).T
    np.testing.assert_array_equal(y, exact.astype(np.float32))  # scaling by 2^k never rounds
    bias = rng.normal(size=6).astype(np.float32)
    yb = nm.epilogue(acc, scale, bias, None, 1)
    np.testing.assert_array_equal(yb, y + bias)
    np.testing.assert_array_equal(nm.epilogue(acc, scale, bias, "relu", 1), np.maximum(yb, 0))
    np.testing.assert_array_equal(nm.epilogue(acc, scale, bias, ("clip", -0.5, 0.5), 1), np.clip(yb, -0.5, 0.5))
    with pytest.raises(ValueError):
        nm.epilogue(acc, scale, bias, "gelu", 1)
