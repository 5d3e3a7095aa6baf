"""Numpy reference of the PSB numeric contract (DESIGN.md section 2).

This module is the oracle: every compiled kernel must reproduce its integers and float32 outputs
bit for bit. It is deliberately plain numpy, written for clarity rather than speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Odd 32-bit constants of the hash (Wellons' "lowbias32" finaliser and the golden ratio).
MIX_C1 = 0x7FEB352D
MIX_C2 = 0x846CA68B
GOLDEN = 0x9E3779B9


def mix32(x):
    """A bijective 32-bit integer finaliser (lowbias32); all arithmetic wraps modulo 2**32."""
    x = np.asarray(x, dtype=np.uint32)
    with np.errstate(over="ignore"):  # 0-d inputs become numpy scalars, which warn on wrap-around
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(MIX_C1)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(MIX_C2)
        x = x ^ (x >> np.uint32(16))
    return x


def layer_key(seed: int, layer: int) -> np.uint32:
    """Per-layer key ``mix32(mix32(seed) ^ (layer * GOLDEN))`` (seed and layer taken modulo 2**32)."""
    with np.errstate(over="ignore"):
        lay = np.uint32((int(layer) * GOLDEN) & 0xFFFFFFFF)
        return np.uint32(mix32(mix32(np.uint32(int(seed) & 0xFFFFFFFF)) ^ lay))


def sample_hash(seed: int, layer: int, index, sample, P: int = 16):
    """The i.i.d. sample stream ``h(seed, layer, i, j)``, reduced to ``P`` bits.

    ``u_i = mix32(key ^ i)``; ``h = mix32(u_i ^ (j * GOLDEN)) >> (32 - P)`` (top ``P`` bits).
    ``index`` (flat weight index ``i``) and ``sample`` (``j``) broadcast against each other.
    """
    j = (np.asarray(sample, dtype=np.uint64) * GOLDEN % (1 << 32)).astype(np.uint32)
    return mix32(weight_hash(seed, layer, index) ^ j) >> np.uint32(32 - P)


def weight_hash(seed: int, layer: int, index):
    """The per-weight hash ``u_i = mix32(key(seed, layer) ^ i)`` both sample streams start from."""
    return mix32(layer_key(seed, layer) ^ np.asarray(index, dtype=np.uint32))


#: The sample streams (DESIGN.md section 2): ``"stratified"`` (the default: rotated van der Corput
#: points, count error at most one sample) and ``"iid"`` (the paper's independent Bernoulli samples).
SAMPLERS = ("stratified", "iid")
#: How a PSB layer computes its products (DESIGN.md section 5): integer dot products, shifts and
#: adds, or bit-serial popcounts.
LOWERINGS = ("intdot", "shiftadd", "bitserial")


def check_sampler(sampler: str) -> str:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return sampler


def sample_offset(seed: int, layer: int, index, P: int = 16):
    """The stratified stream's rotation of weight ``i``: ``o_i = mix32(key ^ i) >> (32 - P)``
    (the top ``P`` bits of the per-weight hash ``u_i`` of the i.i.d. stream)."""
    return weight_hash(seed, layer, index) >> np.uint32(32 - P)


def bit_reverse(j, P: int):
    """``bitrev_P(j)``: the low ``P`` bits of ``j`` in reverse order (int64)."""
    j = np.asarray(j, dtype=np.int64)
    out = np.zeros_like(j)
    for b in range(P):
        out |= ((j >> b) & 1) << (P - 1 - b)
    return out


def stratified_points(seed: int, layer: int, index, sample, P: int = 16):
    """The stratified stream ``u_ij = (o_i + bitrev_P(j)) mod 2**P``; ``b_ij = [u_ij < t_i]``.

    For a power of two ``n`` the points ``j < n`` are the grid ``{r_i + k * 2**P / n}`` rotated by
    ``r_i = o_i mod (2**P / n)``: nested (the first ``n`` are a prefix of the first ``2n``) and
    stratified (one point per cell of width ``2**P / n``).
    """
    o = sample_offset(seed, layer, index, P).astype(np.int64)
    return (o + bit_reverse(sample, P)) & ((1 << P) - 1)


def stratified_count(offset, threshold, m: int, P: int):
    """``#{j < m : (o + bitrev_P(j)) mod 2**P < t}`` in closed form, for any ``0 <= m <= 2**P``.

    The first ``m`` indices split by the set bits of ``m`` (highest first) into blocks of
    ``2**a`` consecutive ``j`` sharing their high bits ``prefix``; a block's points are a grid of
    spacing ``s = 2**(P-a)`` rotated by ``r = (o + bitrev_P(prefix)) mod s``, holding
    ``min(2**a, max(0, ceil((t - r) / s)))`` points below ``t``. For ``m = n`` a power of two this
    is the single term ``B(n) = min(n, max(0, ceil((t - r) / s)))``: ``floor`` or ``ceil`` of
    ``n t / 2**P``.
    """
    if not 0 <= m <= (1 << P):
        raise ValueError(f"sample index {m} outside [0, 2**P] for P={P}")
    o = np.asarray(offset, dtype=np.int64)
    t = np.asarray(threshold, dtype=np.int64)
    count = np.zeros(np.broadcast(o, t).shape, np.int64)
    for a in range(P, -1, -1):
        if not (m >> a) & 1:
            continue
        s = 1 << (P - a)
        prefix = (m >> (a + 1)) << (a + 1)
        r = (o + int(bit_reverse(prefix, P))) & (s - 1)
        count += np.minimum(1 << a, np.maximum(0, (t - r + s - 1) >> (P - a)))
    return count


@dataclass(frozen=True)
class EncodedWeights:
    """PSB encoding of a weight tensor whose axis 0 is the output channel.

    ``sign`` in {-1, 0, 1}; ``normal`` in {0, 1} (implicit leading one); ``shift = k - k_lo`` in
    [0, E-1]; ``threshold = rint(p * 2**P)`` in [0, 2**P]; ``k_lo`` per output channel.
    """

    sign: np.ndarray
    normal: np.ndarray
    shift: np.ndarray
    threshold: np.ndarray
    k_lo: np.ndarray
    E: int
    P: int

    @property
    def shape(self):
        return self.sign.shape


def encode_weights(w, E: int = 4, P: int = 16, per_channel: bool = True) -> EncodedWeights:
    """Encode float weights (output channel on axis 0) as sign, exponent and threshold."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 1 or w.shape[0] == 0:
        raise ValueError(f"weights must have an output-channel axis, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weights contain NaN or infinity")
    a = np.abs(w.astype(np.float64))
    flat = a.reshape(a.shape[0], -1)
    gmax = flat.max(axis=1) if per_channel else np.full(a.shape[0], flat.max())
    # floor(log2 m) exactly: frexp gives m = mant * 2**e with mant in [0.5, 1).
    k_hi = np.where(gmax > 0, np.frexp(gmax)[1] - 1, 0).astype(np.int64)
    k_lo = k_hi - (E - 1)
    k_lo_b = k_lo.reshape((-1,) + (1,) * (w.ndim - 1))
    k = np.where(a > 0, np.frexp(a)[1] - 1, 0).astype(np.int64)
    normal = (a > 0) & (k >= k_lo_b)
    k = np.where(normal, k, k_lo_b)
    p = np.ldexp(a, -k) - normal  # in [0, 1): mantissa fraction (normal) or |w|/2^k_lo
    threshold = np.rint(p * (1 << P)).astype(np.int32)
    return EncodedWeights(
        sign=np.sign(w).astype(np.int8),
        normal=normal.astype(np.int8),
        shift=np.where(a > 0, k - k_lo_b, 0).astype(np.int8),
        threshold=threshold,
        k_lo=k_lo.astype(np.int32),
        E=E,
        P=P,
    )


def sample_bits(enc: EncodedWeights, seed: int, layer: int, start: int, stop: int,
                sampler: str = "stratified") -> np.ndarray:
    """Bits ``b_ij`` for samples ``start <= j < stop``, one by one; shape ``(stop-start,) + w.shape``."""
    check_sampler(sampler)
    idx = np.arange(enc.threshold.size, dtype=np.uint32)
    js = np.arange(start, stop, dtype=np.uint32)[:, None]
    if sampler == "iid":
        u = sample_hash(seed, layer, idx[None, :], js, enc.P)
    else:
        u = stratified_points(seed, layer, idx[None, :], js, enc.P)
    bits = u.astype(np.int64) < enc.threshold.reshape(1, -1)
    return bits.reshape((stop - start,) + enc.shape).astype(np.int8)


def check_samples(n: int, n_max: int | None = None) -> int:
    """Validate a sample count (a power of two, at most ``n_max``) and return log2(n)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 or n & (n - 1):
        raise ValueError(f"samples must be a power of two >= 1, got {n!r}")
    if n_max is not None and n > n_max:
        raise ValueError(f"samples={n} exceeds n_max={n_max} fixed at compile time")
    return int(n).bit_length() - 1


def check_seed(seed) -> int:
    """Validate a seed of the sample stream (an int in [0, 2**32)) and return it as int."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    return int(seed)


def sample_counts(enc: EncodedWeights, n: int, seed: int, layer: int, sampler: str = "stratified") -> np.ndarray:
    """``B_i(n)``: number of ones among the first ``n`` samples of every weight."""
    check_samples(n)
    return range_counts(enc, 0, n, seed, layer, sampler)


def range_counts(enc: EncodedWeights, lo: int, hi: int, seed: int, layer: int, sampler: str = "stratified") -> np.ndarray:
    """Ones among samples ``lo <= j < hi`` of every weight (what the sampler kernel computes):
    stratified in closed form, ``C(hi) - C(lo)``; i.i.d. by drawing the samples."""
    check_sampler(sampler)
    if not 0 <= lo <= hi:
        raise ValueError(f"sample range [{lo}, {hi}) is empty or negative")
    if sampler == "stratified":
        o = sample_offset(seed, layer, np.arange(enc.threshold.size, dtype=np.uint32), enc.P).reshape(enc.shape)
        return stratified_count(o, enc.threshold, hi, enc.P) - stratified_count(o, enc.threshold, lo, enc.P)
    counts = np.zeros(enc.shape, np.int64)
    step = max(1, (1 << 22) // max(1, enc.threshold.size))  # bounded memory for large layers
    for start in range(lo, hi, step):
        counts += sample_bits(enc, seed, layer, start, min(hi, start + step), sampler).sum(axis=0, dtype=np.int64)
    return counts


def integer_weights(enc: EncodedWeights, n: int, seed: int, layer: int, sampler: str = "stratified") -> np.ndarray:
    """``q_i(n) = s_i * (n*normal_i + B_i(n)) * 2**shift_i`` as int64."""
    return weights_from_counts(enc, sample_counts(enc, n, seed, layer, sampler), n)


def weights_from_counts(enc: EncodedWeights, counts: np.ndarray, n: int) -> np.ndarray:
    """``q_i = s_i * (n*normal_i + counts_i) * 2**shift_i`` (int64) for a given draw ``counts = B(n)``."""
    B = np.asarray(counts).astype(np.int64)
    return enc.sign.astype(np.int64) * ((n * enc.normal.astype(np.int64) + B) << enc.shift.astype(np.int64))


def weight_code(enc: EncodedWeights) -> np.ndarray:
    """One byte per weight for the run-time draw: bit 7 the sign (1: negative), bit 6 the normal
    flag, bits 0-5 the shift (< E <= 16). A zero weight reads as sign +1: its normal flag and
    threshold are 0, so its count and ``q`` are 0 all the same."""
    if enc.E > 64:
        raise ValueError(f"the weight code holds shifts below 64, E={enc.E}")
    code = ((enc.sign < 0).astype(np.uint8) << 7) | (enc.normal.astype(np.uint8) << 6) | enc.shift.astype(np.uint8)
    return code.astype(np.uint8)


def weights_from_code(code: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    """``weights_from_counts`` read from ``weight_code``'s bytes (what the draw kernels compute)."""
    code = np.asarray(code).astype(np.int64)
    sign = 1 - 2 * (code >> 7)
    return sign * ((n * ((code >> 6) & 1) + np.asarray(counts).astype(np.int64)) << (code & 63))


def weight_values(enc: EncodedWeights, q: np.ndarray, n: int) -> np.ndarray:
    """The represented weights ``w~ = q * 2**k_lo / n`` (float64)."""
    k_lo = enc.k_lo.reshape((-1,) + (1,) * (q.ndim - 1)).astype(np.int64)
    return np.ldexp(q.astype(np.float64), k_lo) / n


def max_abs_q(E: int, n: int) -> int:
    """Static bound ``|q| <= n * 2**E`` (``2n`` ones times the largest shift ``2**(E-1)``)."""
    return n << E


# ---------------------------------------------------------------- activations (fixed point)


def act_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-wide activation."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


#: Activation fixed-point exponents are clamped to +-MAX_FRAC_BITS (the compiler warns when it clamps).
MAX_FRAC_BITS = 64


def unclamped_frac_bits(max_abs: float, bits: int, signed: bool) -> int:
    """Largest ``f`` with ``max_abs * 2**f`` inside the integer range, before ``choose_frac_bits``
    clamps it to +-MAX_FRAC_BITS (0 when ``max_abs`` is 0 or not finite)."""
    hi = act_range(bits, signed)[1]
    if not np.isfinite(max_abs) or max_abs <= 0:
        return 0
    f = int(np.floor(np.log2(hi / max_abs)))
    while max_abs * 2.0**f > hi:  # guard against log2 rounding
        f -= 1
    return f


def choose_frac_bits(max_abs: float, bits: int, signed: bool) -> int:
    """Largest ``f`` with ``max_abs * 2**f`` inside the integer range (0 when ``max_abs`` is 0),
    clamped to +-MAX_FRAC_BITS."""
    return max(-MAX_FRAC_BITS, min(MAX_FRAC_BITS, unclamped_frac_bits(max_abs, bits, signed)))


def quantize_activations(x, frac_bits: int, bits: int, signed: bool) -> np.ndarray:
    """``clip(rint(x * 2**f), lo, hi)`` in float32 arithmetic (rint = round half to even). NaN
    becomes ``hi`` as in the kernels, whose min/max return the operand that is not NaN."""
    lo, hi = act_range(bits, signed)
    xs = np.asarray(x, dtype=np.float32) * np.float32(2.0**frac_bits)
    return np.clip(np.rint(np.where(np.isnan(xs), np.float32(hi), xs)), lo, hi).astype(np.int64)


def handoff_activations(y, frac_bits: int, bits: int, signed: bool, offset: int, channels: int) -> np.ndarray:
    """What a conv hands the next one (DESIGN.md section 5): its float32 NCHW output ``y``
    quantized at the consumer's scale, plus the consumer's ``offset`` (128 for a vnni consumer's
    signed activations), NHWC with ``channels`` channels (a vnni consumer's padding to 4 holds the
    offset); uint8, or int8 for a depthwise consumer's signed activations."""
    xq = quantize_activations(y, frac_bits, bits, signed) + offset
    N, C, H, W = xq.shape
    out = np.full((N, H, W, channels), offset, np.int64)
    out[..., :C] = xq.transpose(0, 2, 3, 1)
    return out.astype(np.uint8 if offset or not signed else np.int8)


def saturated(x, frac_bits: int, bits: int, signed: bool) -> np.ndarray:
    """Where ``rint(x * 2**f)`` (float32) falls outside the integer range: the values the clip changes."""
    lo, hi = act_range(bits, signed)
    xs = np.asarray(x, dtype=np.float32) * np.float32(2.0**frac_bits)
    return (xs > hi + 0.5) | (xs < lo - 0.5) | ~np.isfinite(xs)


# ---------------------------------------------------------------- layers


def accumulator_bits(K: int, E: int, n: int, act_bits: int, signed: bool) -> int:
    """32 when ``K * max|q| * max|x|`` provably fits int32, else 64 (never wrap)."""
    lo, hi = act_range(act_bits, signed)
    bound = K * max_abs_q(E, n) * max(abs(lo), abs(hi))
    return 32 if bound <= (1 << 31) - 1 else 64


#: The smallest exponent of a dequantisation scale ``2**(k_lo - f - log2 n)``: float32's smallest normal.
MIN_SCALE_EXP = -126


def negligible_channels(k_lo: np.ndarray, frac_bits: int, n_max: int) -> np.ndarray:
    """Output channels whose weights are too small for float32 to scale: ``k_lo - f - log2 n_max``
    below 2**-126 (bool ``[O]``).

    Their weights are below ``2**(k_lo + E)`` and the inputs below ``2**(bits - 1 - f)``, so every
    product is below ``2**(-126 + E + bits - 1 + log2 n_max)`` (2**-101 at E=4, 16 bits, n_max=64):
    such a channel contributes nothing float32 can show next to any bias or other channel. Real
    models have them: BatchNorm folding leaves dead channels of denormal (1e-40) or 1e-32 weights
    (PP-OCRv4's recognizer has 53 in 5 layers). The compiler encodes them as zero."""
    log2n = check_samples(n_max)
    return (np.asarray(k_lo, np.int64) - frac_bits - log2n) < MIN_SCALE_EXP


def output_scale(k_lo: np.ndarray, frac_bits: int, n: int) -> np.ndarray:
    """Per-channel float32 ``2**(k_lo - f - log2 n)``: exact powers of two, so scaling never rounds."""
    log2n = check_samples(n)
    return np.ldexp(np.float32(1), (k_lo.astype(np.int64) - frac_bits - log2n)).astype(np.float32)


def epilogue(acc, scale, bias, activation, channel_axis: int) -> np.ndarray:
    """``float32(acc) * scale + bias`` per channel, then the fused activation, all in float32."""
    shape = [1] * acc.ndim
    shape[channel_axis] = -1
    y = acc.astype(np.float32) * scale.reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, np.float32).reshape(shape)
    return apply_activation(y, activation)


def apply_activation(y, activation):
    """``None``, ``"relu"`` or ``("clip", lo, hi)`` in float32."""
    if activation is None:
        return y
    if activation == "relu":
        return np.maximum(y, np.float32(0))
    if isinstance(activation, tuple) and activation[0] == "clip":
        return np.clip(y, np.float32(activation[1]), np.float32(activation[2]))
    raise ValueError(f"unknown activation {activation!r}")


def conv2d_int(x_int, q, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    """Exact integer NCHW/OIHW convolution in int64. ``padding`` = (top, left, bottom, right)."""
    x_int = np.asarray(x_int, np.int64)
    q = np.asarray(q, np.int64)
    N, C, H, W = x_int.shape
    O, Cg, KH, KW = q.shape
    if C != Cg * groups or O % groups:
        raise ValueError(f"channels {C} / weight {q.shape} do not match groups={groups}")
    pt, pl, pb, pr = padding
    xp = np.pad(x_int, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    sh, sw = stride
    dh, dw = dilation
    OH = (H + pt + pb - dh * (KH - 1) - 1) // sh + 1
    OW = (W + pl + pr - dw * (KW - 1) - 1) // sw + 1
    Og = O // groups
    out = np.zeros((N, O, OH, OW), np.int64)
    for g in range(groups):
        xs = xp[:, g * Cg:(g + 1) * Cg]
        for kh in range(KH):
            for kw in range(KW):
                patch = xs[:, :, kh * dh: kh * dh + sh * (OH - 1) + 1: sh,
                           kw * dw: kw * dw + sw * (OW - 1) + 1: sw]
                out[:, g * Og:(g + 1) * Og] += np.einsum("nchw,oc->nohw", patch, q[g * Og:(g + 1) * Og, :, kh, kw])
    return out


def dense_int(x_int, q):
    """Exact integer ``x @ q.T`` in int64 (``q`` is [out, in])."""
    return np.asarray(x_int, np.int64) @ np.asarray(q, np.int64).T
