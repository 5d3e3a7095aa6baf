"""Compiled PSB kernels == numpy reference, bit for bit (DESIGN.md sections 2 and 3).

Every case builds the two TE kernels of ``psb_tvm.schedules.kernels`` (the sampler, with a run-time
sample range and seed, and the layer kernel, with a run-time n), applies the default CPU schedule
rules (``PSBSample``, ``PSBConv2D`` / ``PSBDense``), compiles them for the host and compares the
sampled counts, the exact integer accumulators (``acc``) and the float32 outputs (as int32 bit
patterns) with ``psb_tvm.numerics``.
Compiled modules and results are cached per ``KernelSpec`` so the lowering-agreement checks reuse
them. Inputs include values beyond the activation range and exact .5 ties after scaling.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import numpy as np
import pytest
import tvm
from psb_tvm.schedules import hash as tir_hash
from psb_tvm.schedules.cpu import PSBConv2D, PSBDense, PSBDepthwiseConv2D, PSBDepthwiseNHWC, PSBPack, PSBSample
from psb_tvm.schedules.kernels import (
    LOWERINGS,
    Handoff,
    KernelSpec,
    bitserial_levels,
    can_hand_off,
    pack_layout,
    pack_weights,
    psb_layer_kernel,
    psb_masked_kernel,
    psb_pack_kernel,
    psb_sample_kernel,
    unpack_layout,
)
from tvm import s_tir, te

from psb_tvm import numerics as nm
from psb_tvm.target import host_target

TARGET = host_target()
DEV = tvm.cpu()
ACTS = [None, "relu", ("clip", 0.0, 6.0)]
# (0, 0) has layer key 0, which hides hash bugs (key ^ i == i): it gets its own test below.
SEEDS_LAYERS = [(1, 0), (3, 1), (12345, 17), (2**32 - 1, 250)]

# name -> (x_shape, w_shape, geometry kwargs)
CONV_CASES = {
    "1x1": ((1, 8, 6, 8), (16, 8, 1, 1), {}),
    "3x3_pad1": ((1, 4, 8, 8), (8, 4, 3, 3), dict(padding=(1, 1, 1, 1))),
    "5x5_pad2": ((1, 3, 9, 10), (6, 3, 5, 5), dict(padding=(2, 2, 2, 2))),
    "stride2": ((2, 4, 9, 9), (8, 4, 3, 3), dict(stride=(2, 2), padding=(1, 1, 1, 1))),
    "asym_pad": ((1, 4, 7, 8), (6, 4, 3, 3), dict(padding=(0, 1, 1, 0))),
    "dilation2": ((1, 4, 10, 10), (8, 4, 3, 3), dict(dilation=(2, 2), padding=(2, 2, 2, 2))),
    "groups2": ((1, 8, 6, 6), (8, 4, 3, 3), dict(groups=2, padding=(1, 1, 1, 1))),
    "depthwise": ((1, 8, 8, 8), (8, 1, 3, 3), dict(groups=8, padding=(1, 1, 1, 1))),
    "depthwise_x2": ((1, 6, 7, 9), (12, 1, 3, 3), dict(groups=6, stride=(1, 2), padding=(1, 1, 1, 1))),
    "width7": ((1, 4, 5, 7), (8, 4, 3, 3), dict(padding=(1, 1, 1, 1))),  # 7 lanes
    "width13": ((1, 3, 6, 13), (4, 3, 3, 3), dict(padding=(1, 1, 1, 1))),  # 13 lanes
    "width17": ((1, 3, 4, 17), (4, 3, 3, 3), dict(padding=(1, 1, 1, 1))),  # prime > 16: not vectorized
    "out_1x1": ((1, 4, 3, 3), (4, 4, 3, 3), {}),  # one output pixel, not vectorized
    "mixed": ((2, 6, 11, 9), (9, 2, 3, 2), dict(stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2), groups=3)),
}
DENSE_CASES = {"1x64x10": (1, 64, 10), "3x40x8": (3, 40, 8), "5x300x17": (5, 300, 17)}
# Lowerings exercised over every geometry and preset below; "bitserial" (meant for n <= 2) has its
# own, smaller matrix at the end of the file.
CLASSIC = ("intdot", "shiftadd")


# ------------------------------------------------------------------ helpers


@dataclasses.dataclass(frozen=True)
class Case(KernelSpec):
    """A kernel spec plus the run-time sample count and seed of one test run (n_max = n)."""

    n: int = 1
    seed: int = 0


def conv_spec(case, lowering, n, seed=0, layer=0, activation="relu", E=4, P=16, act_bits=8, act_signed=True,
              frac_bits=None):
    x_shape, w_shape, geo = CONV_CASES[case] if isinstance(case, str) else case
    if frac_bits is None:
        frac_bits = 5 if act_bits == 8 else 12
    return Case(kind="conv2d", lowering=lowering, x_shape=x_shape, w_shape=w_shape, n=n, n_max=n, seed=seed,
                layer=layer, E=E, P=P, act_bits=act_bits, act_signed=act_signed, frac_bits=frac_bits,
                activation=activation, **geo)


def dense_spec(case, lowering, n, seed=0, layer=0, activation=None, E=4, P=16, act_bits=8, act_signed=True,
               frac_bits=None):
    M, K, O = DENSE_CASES[case] if isinstance(case, str) else case
    if frac_bits is None:
        frac_bits = 5 if act_bits == 8 else 12
    return Case(kind="dense", lowering=lowering, x_shape=(M, K), w_shape=(O, K), n=n, n_max=n, seed=seed,
                layer=layer, E=E, P=P, act_bits=act_bits, act_signed=act_signed, frac_bits=frac_bits,
                activation=activation)


@functools.lru_cache(maxsize=None)
def build(spec: KernelSpec):
    """(sampler, layer kernel) compiled with the default CPU rules; n and seed are run-time.

    A spec built for a GPU (``gpu=True``: its kernel definitions, e.g. the dp4a layout) compiles
    unscheduled for the CPU here: the numerics of the definition, not the GPU schedule, are tested."""
    spec = KernelSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(KernelSpec)})
    compiled = []
    # the rules in default_rules' order: the first that applies schedules the kernel
    for func, rules in [(psb_sample_kernel(spec, "psb_test_sample"), [PSBSample()]),
                        (psb_layer_kernel(spec, "psb_test_kernel", expose_acc=True),
                         [PSBDepthwiseConv2D(), PSBConv2D()] if spec.kind == "conv2d" else [PSBDense()])]:
        if spec.gpu and func.attrs["psb.kind"] != "sample":
            compiled.append(tvm.compile(func, target=TARGET))
            continue
        sch = next((s for s in (rule.apply(func, TARGET, False) for rule in rules) if s is not None), None)
        assert sch is not None, "default CPU rule did not apply"
        compiled.append(tvm.compile(sch.mod["main"], target=TARGET))
    return tuple(compiled)


def make_weights(rng, w_shape):
    """Gaussian weights with per-channel scales, zeros, exact powers of two and values just below
    a power of two (threshold 2^P: every sample bit is one)."""
    O = w_shape[0]
    scale = np.exp2(rng.integers(-6, 3, size=O)).reshape((O,) + (1,) * (len(w_shape) - 1))
    w = (rng.normal(size=w_shape) * scale).astype(np.float32)
    flat = w.reshape(-1)
    m = flat.size
    picks = rng.permutation(m)
    nz, npow, nbelow = max(1, m // 10), max(1, m // 20), max(1, m // 20)
    flat[picks[:nz]] = 0.0
    sel = picks[nz:nz + npow]
    flat[sel] = np.sign(rng.normal(size=sel.size)) * np.exp2(rng.integers(-8, 2, size=sel.size))
    sel = picks[nz + npow:nz + npow + nbelow]
    flat[sel] = np.sign(rng.normal(size=sel.size)) * np.nextafter(
        np.exp2(rng.integers(-8, 2, size=sel.size)).astype(np.float32), np.float32(0))
    return w


def make_acts(rng, shape, frac_bits, bits, signed):
    """Normal activations that overflow the range on both sides, with exact .5 ties after scaling."""
    lo, hi = nm.act_range(bits, signed)
    span = max(abs(lo), hi) / 2.0**frac_bits
    x = rng.normal(size=shape) * span * 0.45
    flat = x.reshape(-1)
    m = flat.size
    picks = rng.permutation(m)
    nt = max(2, m // 6)
    ties = rng.integers(lo - 4, hi + 4, size=nt) + 0.5
    ties[: min(nt, 4)] = [0.5, 1.5, -0.5, -1.5][: min(nt, 4)]
    flat[picks[:nt]] = ties / 2.0**frac_bits
    ne = max(2, m // 50)
    flat[picks[nt:nt + ne]] = rng.choice([-1, 1], size=ne) * (max(abs(lo), hi) + 100) / 2.0**frac_bits
    return x.astype(np.float32)


def execute(spec: Case, x, enc, scale, bias):
    """Run the compiled kernels of ``spec``; return (acc, out) as numpy arrays.

    ``scale`` is the final 2**(k_lo - f - log2 n); the layer kernel takes 2**(k_lo - f) and divides by n.
    """
    sampler, layer = build(spec)
    counts = tvm.runtime.empty(spec.w_shape, "int16", DEV)
    sampler(tvm.runtime.tensor(enc.threshold, DEV), 0, spec.n, spec.seed, counts)
    np.testing.assert_array_equal(counts.numpy(), nm.sample_counts(enc, spec.n, spec.seed, spec.layer, spec.sampler))
    base = (scale * np.float32(spec.n)).astype(np.float32)
    if spec.prepacked:  # the frozen form: integer weights from these counts, in the kernel's layout
        packed = pack_weights(spec, nm.weights_from_counts(enc, counts.numpy(), spec.n))
        weights = [tvm.runtime.tensor(a, DEV) for a in packed]
    else:
        weights = [counts] + [tvm.runtime.tensor(a, DEV) for a in (enc.sign, enc.normal, enc.shift)]
    args = [tvm.runtime.tensor(x, DEV)] + weights + [tvm.runtime.tensor(a, DEV) for a in (base, bias)]
    acc = tvm.runtime.empty(spec.out_shape, spec.acc_dtype, DEV)
    out = tvm.runtime.empty(spec.out_shape, "float32", DEV)
    layer(*args, spec.n, acc, out)
    return acc.numpy(), out.numpy()


def _input_seed(spec: KernelSpec, seed_extra: str) -> int:
    # Identical inputs for both lowerings of the same layer.
    return zlib.crc32(repr(dataclasses.replace(spec, lowering="intdot")).encode() + seed_extra.encode())


@functools.lru_cache(maxsize=None)
def run_case(spec: KernelSpec, seed: int, layer: int, per_channel: bool = True, big: bool = False):
    """Compile and run ``spec``; return (acc, out, reference acc, reference out)."""
    assert (spec.seed, spec.layer) == (seed, layer)
    rng = np.random.default_rng(_input_seed(spec, f"{per_channel}{big}"))
    if big:  # saturated activations and large same-sign weights: accumulators beyond int32
        lo, hi = nm.act_range(spec.act_bits, spec.act_signed)
        x = (rng.uniform(0.9, 1.5, size=spec.x_shape) * hi / 2.0**spec.frac_bits).astype(np.float32)
        w = rng.uniform(0.5, 1.0, size=spec.w_shape).astype(np.float32)
        w[1::2] *= -1
        w.reshape(-1)[::7] *= 2.0**-12  # some subnormal weights as well
    else:
        x = make_acts(rng, spec.x_shape, spec.frac_bits, spec.act_bits, spec.act_signed)
        w = make_weights(rng, spec.w_shape)
    O = spec.w_shape[0]
    bias = rng.normal(size=O).astype(np.float32)
    enc = nm.encode_weights(w, E=spec.E, P=spec.P, per_channel=per_channel)
    scale = nm.output_scale(enc.k_lo, spec.frac_bits, spec.n)

    acc, out = execute(spec, x, enc, scale, bias)
    q = nm.integer_weights(enc, spec.n, seed, layer, spec.sampler)
    xi = nm.quantize_activations(x, spec.frac_bits, spec.act_bits, spec.act_signed)
    if spec.kind == "conv2d":
        racc = nm.conv2d_int(xi, q, stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
                             groups=spec.groups)
    else:
        racc = nm.dense_int(xi, q)
    rout = nm.epilogue(racc, scale, bias, spec.activation, 1)
    return acc, out, racc, rout


def check(spec: KernelSpec, seed: int, layer: int, **kw):
    acc, out, racc, rout = run_case(spec, seed, layer, **kw)
    assert acc.dtype == np.dtype(spec.acc_dtype)
    assert acc.shape == racc.shape == spec.out_shape
    assert np.any(racc != 0), "degenerate case: all accumulators zero"
    bad = np.flatnonzero(acc.astype(np.int64) != racc)
    assert bad.size == 0, f"{bad.size} accumulators differ, first at {np.unravel_index(bad[0], acc.shape)}: " \
                          f"{acc.reshape(-1)[bad[0]]} != {racc.reshape(-1)[bad[0]]}"
    assert out.dtype == np.float32 and rout.dtype == np.float32
    bad = np.flatnonzero(out.view(np.int32) != rout.view(np.int32))
    assert bad.size == 0, f"{bad.size} outputs differ, first: {out.reshape(-1)[bad[0]]!r} != {rout.reshape(-1)[bad[0]]!r}"
    return acc, racc


# ------------------------------------------------------------------ the hash in TIR


def _schedule_variants(func, block):
    """The function as written, with its loops fused and parallelized (as the default rules do for
    the sampling stages: with a wrapping uint32 multiply this is what LLVM miscompiled), and fused,
    parallelized and vectorized."""
    yield "plain", func
    for vectorize in (False, True):
        sch = s_tir.Schedule(func)
        loops = sch.get_loops(sch.get_sblock(block))
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        if vectorize:
            outer, inner = sch.split(fused, [None, 16])
            sch.parallel(outer)
            sch.vectorize(inner)
        else:
            sch.parallel(fused)
        yield ("fused_vectorized" if vectorize else "fused"), sch.mod["main"]


def test_tir_mix32_matches_reference():
    m = 4096
    x = te.placeholder((m,), "uint32", name="x")
    h = te.compute((m,), lambda i: tir_hash.mix32(x[i], lambda v: v), name="h")
    func = te.create_prim_func([x, h])
    rng = np.random.default_rng(0)
    xs = rng.integers(0, 2**32, size=m, dtype=np.uint64).astype(np.uint32)
    xs[:8] = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
    want = nm.mix32(xs)
    for name, f in _schedule_variants(func, "h"):
        lib = tvm.compile(f, target=TARGET)
        out = tvm.runtime.empty((m,), "uint32", DEV)
        lib(tvm.runtime.tensor(xs, DEV), out)
        np.testing.assert_array_equal(out.numpy(), want, err_msg=name)


@pytest.mark.parametrize("seed,layer,P", [(0, 0, 16), (3, 1, 16), (2**32 - 1, 250, 30)])
def test_tir_sample_bit_matches_reference(seed, layer, P):
    """``sample_bit`` == ``sample_hash < t`` for 64 samples x 1024 indices, thresholds over [0, 2^P]."""
    J, I = 64, 1024
    key = int(nm.layer_key(seed, layer))
    t = te.placeholder((I,), "int32", name="t")
    b = te.compute((J, I), lambda j, i: tir_hash.sample_bit(tvm.tirx.const(key, "uint32"), i, j, t[i], P), name="b")
    func = te.create_prim_func([t, b])
    rng = np.random.default_rng(seed % 1000 + P)
    thr = rng.integers(0, 2**P + 1, size=I).astype(np.int32)
    thr[:4] = [0, 1, 2**P - 1, 2**P]
    h = nm.sample_hash(seed, layer, np.arange(I, dtype=np.uint32)[None, :], np.arange(J)[:, None], P)
    want = (h.astype(np.int64) < thr[None, :]).astype(np.int32)
    assert 0 < want.mean() < 1
    for name, f in _schedule_variants(func, "b"):
        lib = tvm.compile(f, target=TARGET)
        out = tvm.runtime.empty((J, I), "int32", DEV)
        lib(tvm.runtime.tensor(thr, DEV), out)
        np.testing.assert_array_equal(out.numpy(), want, err_msg=name)


# ------------------------------------------------------------------ conv2d geometry


@pytest.mark.parametrize("n", [1, 2, 8])
@pytest.mark.parametrize("lowering", CLASSIC)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_bit_exact(case, lowering, n):
    i = list(CONV_CASES).index(case)
    seed, layer = SEEDS_LAYERS[(i + n) % len(SEEDS_LAYERS)]
    act = ACTS[(i + n) % len(ACTS)]
    spec = conv_spec(case, lowering, n, seed, layer, activation=act)
    check(spec, seed, layer)


# ------------------------------------------------------------------ dense shapes


@pytest.mark.parametrize("n", [1, 2, 8])
@pytest.mark.parametrize("lowering", CLASSIC)
@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_dense_bit_exact(case, lowering, n):
    i = list(DENSE_CASES).index(case)
    seed, layer = SEEDS_LAYERS[(i + 2 * n) % len(SEEDS_LAYERS)]
    act = ACTS[(i + n) % len(ACTS)]
    spec = dense_spec(case, lowering, n, seed, layer, activation=act)
    check(spec, seed, layer)


# ------------------------------------------------------------------ epilogue activations


@pytest.mark.parametrize("act", ACTS, ids=["none", "relu", "clip"])
@pytest.mark.parametrize("lowering", CLASSIC)
@pytest.mark.parametrize("kind", ["conv2d", "dense"])
def test_activation_bit_exact(kind, lowering, act):
    seed, layer = 7, 2
    if kind == "conv2d":
        spec = conv_spec("3x3_pad1", lowering, 4, seed, layer, activation=act)
    else:
        spec = dense_spec("3x40x8", lowering, 4, seed, layer, activation=act)
    acc, racc = check(spec, seed, layer)
    out = run_case(spec, seed, layer)[1]
    if act is not None:  # the activation actually clamps something
        assert np.any(out == 0.0)
    if act == ("clip", 0.0, 6.0):
        assert out.max() <= 6.0


# ------------------------------------------------------------------ activation formats


@pytest.mark.parametrize("act_bits,act_signed", [(8, True), (8, False), (16, True), (16, False)],
                         ids=["s8", "u8", "s16", "u16"])
@pytest.mark.parametrize("lowering", CLASSIC)
@pytest.mark.parametrize("kind", ["conv2d", "dense"])
def test_activation_formats_bit_exact(kind, lowering, act_bits, act_signed):
    seed, layer = 11, 5
    if kind == "conv2d":
        spec = conv_spec("stride2", lowering, 2, seed, layer, activation=None, act_bits=act_bits,
                         act_signed=act_signed)
    else:
        spec = dense_spec("3x40x8", lowering, 2, seed, layer, activation=None, act_bits=act_bits,
                          act_signed=act_signed)
    assert spec.act_dtype == f"{'' if act_signed else 'u'}int{act_bits}"
    check(spec, seed, layer)


# ------------------------------------------------------------------ numeric presets


@pytest.mark.parametrize("lowering", CLASSIC)
@pytest.mark.parametrize(
    "E,P,n,per_channel",
    [(1, 16, 4, True), (3, 16, 16, True), (4, 8, 4, False), (4, 24, 2, True), (8, 30, 1, True)],
    ids=["E1", "E3_n16_int16q", "P8_per_tensor", "P24", "E8_P30"],
)
def test_presets_bit_exact(lowering, E, P, n, per_channel):
    seed, layer = 42, 3
    spec = conv_spec("groups2", lowering, n, seed, layer, activation="relu", E=E, P=P)
    check(spec, seed, layer, per_channel=per_channel)
    spec = dense_spec("3x40x8", lowering, n, seed, layer, activation=None, E=E, P=P)
    check(spec, seed, layer, per_channel=per_channel)


@pytest.mark.parametrize("lowering", CLASSIC)
def test_int32_weights_bit_exact(lowering):
    spec = dense_spec((2, 40, 5), lowering, 128, 9, 9, E=8)
    assert spec.q_dtype == "int32" and spec.acc_dtype == "int32"
    check(spec, 9, 9)


@pytest.mark.parametrize("lowering", CLASSIC)
@pytest.mark.parametrize("kind", ["conv2d", "dense"])
def test_many_samples_bit_exact(kind, lowering):
    seed, layer = 5, 4
    if kind == "conv2d":
        spec = conv_spec("3x3_pad1", lowering, 64, seed, layer, activation=("clip", 0.0, 6.0))
    else:
        spec = dense_spec("3x40x8", lowering, 64, seed, layer, activation="relu")
    assert spec.q_dtype == "int16"
    check(spec, seed, layer)


# ------------------------------------------------------------------ wide accumulators


@pytest.mark.parametrize("lowering", CLASSIC)
@pytest.mark.parametrize("kind", ["conv2d", "dense"])
def test_int64_accumulators_bit_exact(kind, lowering):
    seed, layer = 8, 8
    if kind == "conv2d":
        spec = conv_spec(((1, 16, 6, 6), (8, 16, 3, 3), dict(padding=(1, 1, 1, 1))), lowering, 4, seed, layer,
                         activation=None, E=8, act_bits=16)
    else:
        spec = dense_spec((4, 300, 6), lowering, 8, seed, layer, activation=None, E=8, act_bits=16)
    assert spec.acc_dtype == "int64"
    acc, racc = check(spec, seed, layer, big=True)
    # The values really need 64 bits: int32 would have wrapped.
    assert np.abs(racc).max() > 2**31
    assert np.any(racc > 2**31) and np.any(racc < -(2**31))
    # and int64 -> float32 rounding is exercised (not every accumulator is exactly representable)
    assert np.any(racc != racc.astype(np.float32).astype(np.int64))


def test_int32_accumulator_chosen_when_safe():
    spec = conv_spec("3x3_pad1", "intdot", 8)
    assert spec.acc_dtype == "int32"
    K = spec.reduction_size
    assert K * nm.max_abs_q(spec.E, spec.n) * 128 < 2**31


# ------------------------------------------------------------------ lowerings agree


AGREE = [("conv2d", c, n) for c in ("3x3_pad1", "asym_pad", "depthwise_x2", "width17", "mixed") for n in (1, 8)] + [
    ("dense", c, n) for c in DENSE_CASES for n in (2, 8)]


@pytest.mark.parametrize("kind,case,n", AGREE)
def test_lowerings_identical(kind, case, n):
    """intdot and shiftadd give the same accumulators and outputs (reuses the cached runs above)."""
    results = []
    for lowering in CLASSIC:
        if kind == "conv2d":
            i = list(CONV_CASES).index(case)
            seed, layer = SEEDS_LAYERS[(i + n) % len(SEEDS_LAYERS)]
            spec = conv_spec(case, lowering, n, seed, layer, activation=ACTS[(i + n) % len(ACTS)])
        else:
            i = list(DENSE_CASES).index(case)
            seed, layer = SEEDS_LAYERS[(i + 2 * n) % len(SEEDS_LAYERS)]
            spec = dense_spec(case, lowering, n, seed, layer, activation=ACTS[(i + n) % len(ACTS)])
        results.append(run_case(spec, seed, layer))
    (acc_a, out_a, _, _), (acc_b, out_b, _, _) = results
    assert acc_a.dtype == acc_b.dtype
    np.testing.assert_array_equal(acc_a, acc_b)
    np.testing.assert_array_equal(out_a.view(np.int32), out_b.view(np.int32))


def test_key_changes_the_samples():
    """Same inputs, different (seed, layer) keys: each run matches its own reference and they differ."""
    rng = np.random.default_rng(77)
    base = dense_spec("3x40x8", "intdot", 1)
    x = make_acts(rng, base.x_shape, base.frac_bits, base.act_bits, base.act_signed)
    enc = nm.encode_weights(make_weights(rng, base.w_shape), E=base.E, P=base.P)
    scale = nm.output_scale(enc.k_lo, base.frac_bits, base.n)
    bias = rng.normal(size=base.w_shape[0]).astype(np.float32)
    xi = nm.quantize_activations(x, base.frac_bits, base.act_bits, base.act_signed)
    accs = []
    for seed, layer in [(0, 0), (1, 0), (0, 1)]:  # (0, 0): layer key 0
        spec = dense_spec("3x40x8", "intdot", 1, seed, layer)
        acc, _ = execute(spec, x, enc, scale, bias)
        np.testing.assert_array_equal(acc, nm.dense_int(xi, nm.integer_weights(enc, 1, seed, layer)))
        accs.append(acc)
    assert np.any(accs[0] != accs[1]) and np.any(accs[0] != accs[2])


def test_tir_layer_key_matches_reference():
    """The run-time key ``mix32(mix32(seed) ^ layer*GOLDEN)`` in TIR equals ``numerics.layer_key``."""
    seeds = np.array([0, 1, 2, 12345, 2**31, 2**32 - 1], dtype=np.int64)
    for layer in (0, 1, 17, 250):
        s = te.placeholder((seeds.size,), "int64", name="s")
        k = te.compute((seeds.size,), lambda i: tir_hash.layer_key(s[i], layer, lambda v: v), name="k")
        lib = tvm.compile(te.create_prim_func([s, k]), target=TARGET)
        out = tvm.runtime.empty((seeds.size,), "uint32", DEV)
        lib(tvm.runtime.tensor(seeds, DEV), out)
        np.testing.assert_array_equal(out.numpy(), [int(nm.layer_key(int(v), layer)) for v in seeds])


@pytest.mark.parametrize("thr_dtype", ["int32", "uint16"])
@pytest.mark.parametrize("sampler", nm.SAMPLERS)
@pytest.mark.parametrize("P,n_max", [(16, 64), (5, 32)])
def test_sampler_kernel_every_range(sampler, P, n_max, thr_dtype):
    """The compiled sampler == ``numerics.range_counts`` == the explicit per-sample sum, for ranges
    from and to 0 or a power of two (what main and refinement draw; i.i.d. also anywhere), with P
    small enough that n_max = 2**P (every point of the stream used)."""
    spec = dataclasses.replace(conv_spec("3x3_pad1", "intdot", n_max, 3, 2, P=P), sampler=sampler,
                               threshold_dtype=thr_dtype)
    spec = KernelSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(KernelSpec)})
    func = psb_sample_kernel(spec, "psb_test_sample_ranges")
    assert func.attrs["psb.sampler"] == sampler
    lib = tvm.compile(PSBSample().apply(func, TARGET, False).mod["main"], target=TARGET)
    enc = nm.encode_weights(make_weights(np.random.default_rng(P), spec.w_shape), P=P)
    assert enc.threshold.max() == 2**P  # values just below a power of two: every sample is one
    if thr_dtype == "uint16" and P == 16:  # 2**16 does not fit: compile keeps such layers int32
        enc = dataclasses.replace(enc, threshold=np.minimum(enc.threshold, 2**16 - 1))
    thr = tvm.runtime.tensor(enc.threshold.astype(thr_dtype), DEV)
    out = tvm.runtime.empty(spec.w_shape, "int16", DEV)
    ranges = [(0, 1), (0, 8), (8, 16), (0, n_max), (n_max // 2, n_max), (4, 4), (1, 2)]
    if sampler == "iid":
        ranges += [(3, 11), (5, 5), (0, n_max - 1), (7, n_max)]
    for lo, hi in ranges:
        for seed in (1, 2**32 - 1):
            lib(thr, lo, hi, seed, out)
            ref = nm.range_counts(enc, lo, hi, seed, 2, sampler)
            np.testing.assert_array_equal(out.numpy(), ref, err_msg=f"[{lo}, {hi}) seed {seed}")
            np.testing.assert_array_equal(ref, nm.sample_bits(enc, seed, 2, lo, hi, sampler).sum(0))


@pytest.mark.parametrize("case", ["oihw_depthwise", "ohwi_3x3", "vnni_3x3", "vnni_stem_c3", "vnni16_stem_c3",
                                  "vnni16_o24", "oi_dense", "vnni16_dense"])
def test_pack_kernel_equals_pack_weights(case):
    """The run-time pack kernel (sampled modules, the weight cache) writes exactly what
    ``pack_weights`` makes at compile time for a frozen module, ``wsum`` included, and so does the
    draw kernel that computes the stratified counts itself. Both read counts, thresholds and the
    one-byte weight code stored in the kernel's layout (``pack_layout``)."""
    spec = PREPACKED_CASES[case](8)
    lib = tvm.compile(PSBPack().apply(psb_pack_kernel(spec, "psb_test_pack"), TARGET, False).mod["main"], target=TARGET)
    draw_lib, draw16_lib = (
        tvm.compile(PSBPack().apply(psb_pack_kernel(sp, "psb_test_draw", draw=True), TARGET, False).mod["main"],
                    target=TARGET)
        for sp in (spec, dataclasses.replace(spec, threshold_dtype="uint16")))
    enc = nm.encode_weights(make_weights(np.random.default_rng(7), spec.w_shape), E=spec.E)
    enc = dataclasses.replace(enc, threshold=np.minimum(enc.threshold, 2**16 - 1))  # fits uint16
    code = tvm.runtime.tensor(pack_layout(spec, nm.weight_code(enc)), DEV)
    for n in (1, 8):
        counts = nm.sample_counts(enc, n, 3, 1)
        want = pack_weights(spec, nm.weights_from_counts(enc, counts, n))
        got = [tvm.runtime.empty(a.shape, str(a.dtype), DEV) for a in want]
        lib(tvm.runtime.tensor(pack_layout(spec, counts.astype(np.int16)), DEV), code, n, *got)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.numpy(), w)
        # the draw kernel (stratified: closed-form counts in place) from the thresholds and seed,
        # stored as int32 or (all below 2**16 here) uint16
        for lib_, thr in ((draw_lib, enc.threshold), (draw16_lib, enc.threshold.astype(np.uint16))):
            drawn = [tvm.runtime.empty(a.shape, str(a.dtype), DEV) for a in want]
            lib_(tvm.runtime.tensor(pack_layout(spec, thr), DEV), code, n, 3, *drawn)
            for g, w in zip(drawn, want):
                np.testing.assert_array_equal(g.numpy(), w)
    with pytest.raises(ValueError, match="intdot"):
        psb_pack_kernel(dataclasses.replace(spec, lowering="shiftadd"), "x")
    with pytest.raises(ValueError, match="stratified"):
        psb_pack_kernel(dataclasses.replace(spec, sampler="iid"), "x", draw=True)


@pytest.mark.parametrize("case", ["vnni_stem_c3", "vnni16_o24", "ohwi_3x3"])
@pytest.mark.parametrize("sampler", ["stratified", "iid"])
def test_sampler_in_packed_storage(case, sampler):
    """A run-time packed layer's sampler reads thresholds and writes counts in the kernel's weight
    layout (zero counts in the padding), the counts of the oracle rearranged; ``unpack_layout``
    inverts ``pack_layout``."""
    spec = dataclasses.replace(PREPACKED_CASES[case](8), sampler=sampler, packed_encoding=True)
    lib = tvm.compile(PSBSample().apply(psb_sample_kernel(spec, "psb_test_sample_packed"), TARGET, False).mod["main"],
                      target=TARGET)
    enc = nm.encode_weights(make_weights(np.random.default_rng(3), spec.w_shape), E=spec.E)
    thr = pack_layout(spec, enc.threshold)
    assert np.array_equal(unpack_layout(spec, thr), enc.threshold)
    out = tvm.runtime.empty(spec.packed_weight_shape, "int16", DEV)
    for lo, hi in ((0, 8), (4, 8), (0, 1)):
        lib(tvm.runtime.tensor(thr, DEV), lo, hi, 5, out)
        np.testing.assert_array_equal(out.numpy(), pack_layout(spec, nm.range_counts(enc, lo, hi, 5, spec.layer, sampler)))


@pytest.mark.parametrize("lowering", ["intdot", "shiftadd", "bitserial"])
def test_iid_sampler_layer_bit_exact(lowering):
    """The i.i.d. stream through a whole layer (sampler + layer kernel) == the oracle."""
    n = 2 if lowering == "bitserial" else 8
    spec = dataclasses.replace(conv_spec("stride2", lowering, n, 3, 1), sampler="iid")
    check(spec, 3, 1)


@pytest.mark.parametrize("lowering", CLASSIC)
def test_sample_ranges_nest(lowering):
    """counts over [0, 2n) == counts over [0, n) + counts over [n, 2n), computed by the compiled sampler."""
    spec = conv_spec("3x3_pad1", lowering, 8, 3, 1)
    sampler, _ = build(spec)
    rng = np.random.default_rng(4)
    enc = nm.encode_weights(make_weights(rng, spec.w_shape))
    thr = tvm.runtime.tensor(enc.threshold, DEV)

    def counts(lo, hi):
        out = tvm.runtime.empty(spec.w_shape, "int16", DEV)
        sampler(thr, lo, hi, 3, out)
        return out.numpy().astype(np.int64)

    np.testing.assert_array_equal(counts(0, 8), counts(0, 4) + counts(4, 8))
    np.testing.assert_array_equal(counts(4, 8), nm.sample_bits(enc, 3, 1, 4, 8).sum(0))
    assert np.all(counts(5, 5) == 0)


VNNI_CASES = {
    "3x3_pad1": ((1, 8, 9, 10), (16, 8, 3, 3), dict(padding=(1, 1, 1, 1))),
    "1x1": ((2, 12, 5, 6), (32, 12, 1, 1), {}),
    "stride2_asym": ((1, 4, 11, 9), (16, 4, 3, 3), dict(stride=(2, 2), padding=(0, 1, 1, 0))),
    "dilation2": ((1, 8, 10, 10), (16, 8, 3, 3), dict(dilation=(2, 2), padding=(2, 2, 2, 2))),
    "width7": ((1, 16, 4, 7), (48, 16, 3, 3), dict(padding=(1, 1, 1, 1))),
    # channels rounded up to 4 with zeros: an RGB stem, and 6 -> 8
    "stem_c3": ((1, 3, 13, 11), (16, 3, 7, 7), dict(stride=(2, 2), padding=(3, 3, 3, 3))),
    "c6": ((1, 6, 5, 6), (16, 6, 3, 3), dict(padding=(1, 1, 1, 1))),
    # output channels padded to 16 with zero weights (MobileNetV2's 24-channel projections)
    "o24": ((1, 32, 4, 8), (24, 32, 1, 1), {}),
    "o40_3x3": ((1, 8, 5, 6), (40, 8, 3, 3), dict(padding=(1, 1, 1, 1))),
    # a strided 1x1 (ResNet's downsample): only the pixels it reads are quantized
    "1x1_s2": ((2, 12, 9, 11), (16, 12, 1, 1), dict(stride=(2, 2))),
    "1x1_s2x3": ((1, 8, 7, 10), (16, 8, 1, 1), dict(stride=(2, 3))),
    # planes of >= BLOCKED_MIN_PIXELS: activations blocked by 4 channels (blocked_activations)
    "blocked_3x3": ((1, 12, 28, 29), (16, 12, 3, 3), dict(padding=(1, 1, 1, 1))),
    "blocked_1x1_s2": ((1, 6, 29, 30), (32, 6, 1, 1), dict(stride=(2, 2))),
}


@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
@pytest.mark.parametrize("n,E", [(1, 4), (4, 4), (8, 3)])
@pytest.mark.parametrize("case", list(VNNI_CASES))
def test_vnni_conv_bit_exact(case, n, E, signed):
    """The int8 preset (8-bit activations, int8 weights) takes the tensorized vpdpbusd path; signed
    activations go in offset by 128 and come out corrected by the per-channel weight sums."""
    i = list(VNNI_CASES).index(case)
    seed, layer = SEEDS_LAYERS[(i + n) % len(SEEDS_LAYERS)]
    spec = conv_spec(VNNI_CASES[case], "intdot", n, seed, layer, activation=ACTS[i % len(ACTS)], E=E,
                     act_signed=signed)
    assert spec.vnni and spec.q_dtype == "int8" and spec.act_dtype == ("int8" if signed else "uint8")
    check(spec, seed, layer)


@pytest.mark.parametrize("bits", [8, 16])
def test_stem_activations_quantized_in_planes(bits):
    """A packed conv on a float input of <= 4 channels quantizes whole padded planes (``xp``), then
    interleaves them into 4-channel pixels with the channel loop unrolled; wider inputs and
    hand-offs keep the one-stage ``xq``. (Bit-exactness: ``stem_c3`` / ``stride2_asym`` above.)"""
    def stages(case, **kw):
        spec = dataclasses.replace(conv_spec(VNNI_CASES[case], "intdot", 8, 1, 0, E=3, act_bits=bits), prepacked=True, **kw)
        sch = PSBConv2D().apply(psb_layer_kernel(spec, "stem"), TARGET, False)
        names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
        return spec, names, sch

    spec, names, sch = stages("stem_c3")
    assert spec.packed_dot and spec.stem_planes and {"xp", "xq"} <= names
    assert sch.get(sch.get_loops(sch.get_sblock("xq"))[-1]).kind == tvm.tirx.ForKind.UNROLLED
    assert sch.get(sch.get_loops(sch.get_sblock("xp"))[0]).kind == tvm.tirx.ForKind.PARALLEL
    spec, names, _ = stages("c6")
    assert not spec.stem_planes and "xp" not in names
    if bits == 8:  # (the integer hand-off is between 8-bit convs only)
        spec, names, _ = stages("stem_c3", x_handoff=True)
        assert not spec.stem_planes and "xp" not in names


def test_strided_pointwise_quantizes_read_pixels_only():
    """A strided 1x1 conv's activation stage has the output's pixels, ``x[y * sh, x * sw]``, not
    the whole input; a padded or 3x3 strided conv keeps the whole (padded) input. (Bit-exactness:
    the ``1x1_s2`` cases above and ``to_1x1_s2`` of the hand-off pairs.)"""
    def xq_shape(case):
        spec = dataclasses.replace(conv_spec(VNNI_CASES[case], "intdot", 8, 1, 0, E=3), prepacked=True)
        func = psb_layer_kernel(spec, "k")
        sch = PSBConv2D().apply(func, TARGET, False)
        shape = tuple(int(v) for v in sch.get(sch.get_sblock("xq")).writes[0].source.shape)
        return spec, shape[2:4] if spec.blocked_activations else shape[1:3]  # (rows, columns)

    spec, shape = xq_shape("1x1_s2")
    assert spec.strided_pointwise and shape == tuple(spec.out_shape[2:]) == (5, 6)
    spec, shape = xq_shape("1x1_s2x3")
    assert spec.strided_pointwise and shape == (4, 4)
    for case in ("1x1", "stride2_asym"):
        spec, shape = xq_shape(case)
        pt, pl, pb, pr = spec.padding
        assert not spec.strided_pointwise and shape == (spec.x_shape[2] + pt + pb, spec.x_shape[3] + pl + pr)


def test_float_input_activations_blocked_by_4_channels():
    """A vnni conv on a float input (not a stem) quantizes into ``xq[b, c / 4, h, w, c % 4]``
    (vnni16: int16 words, ``c / 2``), rows in parallel and the channels unrolled (contiguous
    interleaving stores); hand-off consumers, stems and two-digit 16-bit convs keep NHWC pixels.
    (Bit-exactness: test_vnni_conv_bit_exact, test_vnni16_conv_bit_exact.)"""
    def stage(case, **kw):
        spec = dataclasses.replace(conv_spec(VNNI_CASES[case], "intdot", 8, 1, 0, E=3), prepacked=True, **kw)
        sch = PSBConv2D().apply(psb_layer_kernel(spec, "k"), TARGET, False)
        xq = sch.get_sblock("xq")
        return spec, sch.get(xq).writes[0].source.shape, [sch.get(lp) for lp in sch.get_loops(xq)]

    spec, shape, loops = stage("blocked_3x3")
    C, H, W = spec.x_shape[1:]
    assert spec.blocked_activations and [int(v) for v in shape] == [1, C // 4, H + 2, W + 2, 4]
    assert loops[0].kind == tvm.tirx.ForKind.PARALLEL
    assert (int(loops[-1].extent), loops[-1].kind) == (4, tvm.tirx.ForKind.UNROLLED)
    spec, shape, _ = stage("blocked_1x1_s2")  # only the pixels read, blocked (C = 6: 2 blocks)
    assert spec.blocked_activations and spec.strided_pointwise and [int(v) for v in shape] == [1, 2, 15, 15, 4]
    for case, kw in (("blocked_3x3", dict(x_handoff=True)), ("stem_c3", {}), ("3x3_pad1", {})):
        spec, shape, _ = stage(case, **kw)  # a hand-off, a stem, planes under BLOCKED_MIN_PIXELS
        assert not spec.blocked_activations and len(shape) == 4
    wide = dataclasses.replace(stage("blocked_3x3")[0], x_shape=(1, 132, 28, 28), w_shape=(16, 132, 3, 3))
    assert not wide.blocked_activations  # (more than BLOCKED_MAX_CHANNELS)
    # vnni16: int16 words in pairs of planes; not in two digit planes (unsigned 16-bit activations)
    spec = dataclasses.replace(conv_spec(VNNI_CASES["blocked_3x3"], "intdot", 64, 1, 0, E=4), prepacked=True)
    sch = PSBConv2D().apply(psb_layer_kernel(spec, "k"), TARGET, False)
    assert spec.vnni16 and spec.blocked_activations and spec.act_digits == 1
    assert [int(v) for v in sch.get(sch.get_sblock("xq")).writes[0].source.shape] == [1, C // 2, H + 2, W + 2, 2]
    spec = dataclasses.replace(spec, act_bits=16, act_signed=False)
    assert spec.vnni16 and spec.act_digits == 2 and not spec.blocked_activations


@pytest.mark.parametrize("prepacked", [False, True], ids=["sampled", "prepacked"])
@pytest.mark.parametrize("bits,signed", [(8, False), (8, True), (16, False), (16, True)],
                         ids=["uint8", "int8", "uint16", "int16"])
@pytest.mark.parametrize("case", ["3x3_pad1", "1x1", "stride2_asym", "dilation2", "width7", "stem_c3", "o24", "1x1_s2",
                                  "blocked_3x3", "blocked_1x1_s2"])
def test_vnni16_conv_bit_exact(case, bits, signed, prepacked):
    """The default preset's int16 weights take the tensorized vpdpwssd path (``vnni16``: words in
    pairs, channels padded to 2, outputs to 16); 16-bit activations whose sums might not fit int32
    are summed in int32 chunks added up in int64 (signed) or go in as two base-256 digits
    (unsigned), summed apart in int32 and combined in int64."""
    i = list(VNNI_CASES).index(case)
    seed, layer = SEEDS_LAYERS[(i + bits) % len(SEEDS_LAYERS)]
    spec = dataclasses.replace(conv_spec(VNNI_CASES[case], "intdot", 64, seed, layer, activation=ACTS[i % len(ACTS)],
                                         E=4, act_bits=bits, act_signed=signed), prepacked=prepacked)
    assert spec.vnni16 and spec.weight_layout == "vnni16" and spec.q_dtype == "int16" and spec.dot_offset == 0
    assert spec.packed_weight_shape[-2:] == (16, 2) and spec.vnni_channels % 2 == 0
    # a 7x7 tap window x 2 channels can already pass int32 (the stem): no chunk, digits
    pair = spec.reduction_size // spec.w_shape[1] * 2 * 2**15 * spec.n_max * 2**spec.E
    chunked = bits == 16 and signed and spec.acc_dtype == "int64" and pair <= 2**31 - 1
    assert bool(spec.vnni16_chunk) == chunked
    assert spec.act_digits == (1 if bits == 8 or (signed and (spec.acc_dtype == "int32" or chunked)) else 2)
    check(spec, seed, layer)


@pytest.mark.parametrize("prepacked", [False, True], ids=["sampled", "prepacked"])
@pytest.mark.parametrize("signed", [False, True], ids=["uint16", "int16"])
@pytest.mark.parametrize("case", ["3x3_pad1", "stem_c3", "o24"])
def test_vnni16_int8_weights_with_16bit_activations(case, signed, prepacked):
    """int8-range weights (E=3 / n_max=8) with 16-bit activations take vnni16 with the weights
    stored as int16 words; with 8-bit activations they stay on vnni (vpdpbusd)."""
    i = list(VNNI_CASES).index(case)
    seed, layer = SEEDS_LAYERS[i % len(SEEDS_LAYERS)]
    spec = dataclasses.replace(conv_spec(VNNI_CASES[case], "intdot", 8, seed, layer, E=3, act_bits=16,
                                         act_signed=signed), prepacked=prepacked)
    assert spec.q_range_dtype == "int8" and spec.q_dtype == "int16" and spec.vnni16 and not spec.vnni
    assert dataclasses.replace(spec, act_bits=8).vnni and dataclasses.replace(spec, act_bits=8).q_dtype == "int8"
    check(spec, seed, layer)


@pytest.mark.parametrize("prepacked", [False, True], ids=["sampled", "prepacked"])
@pytest.mark.parametrize("bits,signed", [(8, False), (8, True), (16, True)], ids=["uint8", "int8", "int16"])
def test_vnni16_dense_with_int8_weights(bits, signed, prepacked):
    """Dense layers have no int8 packed form: int8-range weights take vnni16 as int16 words at any
    activation width (PP-OCRv4 rec's 120 -> 6625 classifier with the int8 preset)."""
    spec = dataclasses.replace(dense_spec((40, 120, 40), "intdot", 8, 3, 1, E=3, act_bits=bits, act_signed=signed),
                               prepacked=prepacked)
    assert spec.q_range_dtype == "int8" and spec.q_dtype == "int16" and spec.weight_layout == "vnni16"
    check(spec, 3, 1)


@pytest.mark.parametrize("prepacked", [False, True], ids=["sampled", "prepacked"])
@pytest.mark.parametrize("bits,signed", [(8, False), (16, False), (16, True)], ids=["uint8", "uint16", "int16"])
@pytest.mark.parametrize("shape", [(5, 300, 17), (40, 120, 96), (1, 64, 32)], ids=["5x300x17", "40x120x96", "1x64x32"])
def test_vnni16_dense_bit_exact(shape, bits, signed, prepacked):
    """Dense layers with int16 weights take the vnni16 conv as a 1x1 conv over their rows (outputs
    padded to 16, the reduction to 2)."""
    spec = dataclasses.replace(dense_spec(shape, "intdot", 64, 3, 1, act_bits=bits, act_signed=signed,
                                          activation="relu" if bits == 8 else None), prepacked=prepacked)
    assert spec.vnni16 and spec.weight_layout == "vnni16"
    check(spec, 3, 1)


def test_vnni16_chunks_and_digits():
    """16-bit activations whose whole sums might wrap int32: signed ones are summed over chunks of
    channel pairs that provably fit int32 (the largest divisor of the pairs), unsigned ones (not
    int16 words) as two digit planes; a short reduction needs neither."""
    short = conv_spec(((1, 4, 5, 6), (16, 4, 1, 1), {}), "intdot", 64, E=4, act_bits=16)
    long = conv_spec(((1, 64, 5, 6), (16, 64, 3, 3), dict(padding=(1, 1, 1, 1))), "intdot", 64, E=4, act_bits=16)
    assert short.acc_dtype == "int32" and short.act_digits == 1 and short.vnni16_chunk == 0
    assert dataclasses.replace(short, act_signed=False).act_digits == 2
    # 3x3 taps x 2 channels x 2**15 x 1024 = 2**29.2 per pair: 3 pairs fit int32, 2 divide the 32 pairs
    assert long.acc_dtype == "int64" and long.act_digits == 1 and long.vnni16_chunk == 2 and long.vnni16
    assert 9 * 2 * long.vnni16_chunk * 2**15 * 1024 <= 2**31 - 1
    one_by_one = dataclasses.replace(long, x_shape=(1, 480, 5, 6), w_shape=(480, 480, 1, 1), padding=(0, 0, 0, 0))
    assert one_by_one.vnni16_chunk == 30  # of 240 pairs: 32 fit, 30 divides
    unsigned = dataclasses.replace(long, act_signed=False)
    assert unsigned.vnni16_chunk == 0 and unsigned.act_digits == 2 and unsigned.vnni16
    # one digit's sums must fit int32, else the conv keeps the channels-last form
    huge = dataclasses.replace(unsigned, x_shape=(1, 4096, 5, 6), w_shape=(16, 4096, 3, 3))
    assert huge.vnni16_digit_bound > 2**31 - 1 and not huge.vnni16 and huge.weight_layout == "OHWI"
    # fewer than 16 outputs, a 1-2 channel input, groups or a GPU: not vnni16
    assert not dataclasses.replace(long, w_shape=(8, 64, 3, 3)).vnni16
    assert not dataclasses.replace(long, gpu=True).vnni16


GPU_DP4A_CASES = {**{k: VNNI_CASES[k] for k in ("3x3_pad1", "stride2_asym", "stem_c3", "width7")},
                  # output channels padded to 16 (MobileNet's 24-channel projections)
                  "o24": ((2, 8, 5, 6), (24, 8, 3, 3), dict(padding=(1, 1, 1, 1)))}


@pytest.mark.parametrize("prepacked", [False, True], ids=["sampled", "prepacked"])
@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
@pytest.mark.parametrize("case", list(GPU_DP4A_CASES))
def test_gpu_dp4a_conv_definition_bit_exact(case, signed, prepacked):
    """The GPU's int8 conv (``dp4a`` layout: signed bytes on both sides, unsigned activations stored
    ``x - 128`` and corrected by ``+128 * sum q``; accumulators over flattened pixels, outputs
    padded to 16), run on the CPU: same bits as the reference."""
    i = list(GPU_DP4A_CASES).index(case)
    seed, layer = SEEDS_LAYERS[(i + 2 * signed) % len(SEEDS_LAYERS)]
    spec = dataclasses.replace(conv_spec(GPU_DP4A_CASES[case], "intdot", 8, seed, layer, activation=ACTS[i % len(ACTS)],
                                         E=3, act_signed=signed), gpu=True, prepacked=prepacked)
    assert spec.dp4a and not spec.vnni and spec.weight_layout == "dp4a"
    assert spec.dot_offset == (0 if signed else -128)
    func = psb_layer_kernel(spec, "psb_test_dp4a")
    assert func.attrs["psb.layout"] == "dp4a"
    if prepacked:  # unsigned activations: the offset correction travels next to q
        assert [p.name for p in func.params] == ["x", "q", *([] if signed else ["wsum"]), "scale", "bias", "n", "out"]
    check(spec, seed, layer)


@pytest.mark.parametrize("case", ["3x3_pad1", "stride2", "dilation2"])
def test_gpu_gemm_conv_definition_bit_exact(case):
    """The GPU's channels-last conv (int16 preset; accumulators over flattened pixels)."""
    spec = dataclasses.replace(conv_spec(case, "intdot", 16, 3, 1, E=4, act_signed=False), gpu=True)
    assert spec.channels_last and not spec.dp4a and spec.q_dtype == "int16"
    assert psb_layer_kernel(spec, "psb_test_gemm").attrs["psb.layout"] == "gemm"
    check(spec, 3, 1)


PREPACKED_CASES = {  # one per weight layout: OIHW (grouped), OHWI (channels last), vnni, OI (dense)
    "oihw_depthwise": lambda n: conv_spec("depthwise_x2", "intdot", n, 3, 1),
    "ohwi_3x3": lambda n: conv_spec("3x3_pad1", "intdot", n, 3, 1),
    "vnni_3x3": lambda n: conv_spec(VNNI_CASES["3x3_pad1"], "intdot", n, 3, 1, E=3, act_signed=False),
    "vnni_stem_c3": lambda n: conv_spec(VNNI_CASES["stem_c3"], "intdot", n, 3, 1, E=3, act_signed=True),
    # (n_max 64: int16 weights at every run-time n)
    "vnni16_stem_c3": lambda n: dataclasses.replace(conv_spec(VNNI_CASES["stem_c3"], "intdot", n, 3, 1, E=4, act_bits=16),
                                                    n_max=64),
    "vnni16_o24": lambda n: dataclasses.replace(conv_spec(VNNI_CASES["o24"], "intdot", n, 3, 1, E=4), n_max=64),
    "oi_dense": lambda n: dense_spec("3x40x8", "intdot", n, 3, 1),  # (fewer than 16 outputs: not vnni16)
    "vnni16_dense": lambda n: dataclasses.replace(dense_spec("5x300x17", "intdot", n, 3, 1, act_bits=16), n_max=64),
}


@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("case", list(PREPACKED_CASES))
def test_prepacked_weights_bit_exact(case, n):
    """Frozen modules pass q already in the kernel's layout (``pack_weights``): same bits as the
    reference, and the kernel has no weight stage left."""
    spec = PREPACKED_CASES[case](n)
    spec = dataclasses.replace(spec, prepacked=True)
    assert spec.weight_layout == {"oihw": "OIHW", "ohwi": "OHWI", "vnni": "vnni", "vnni16": "vnni16",
                                  "oi": "OI"}[case.split("_")[0]]
    func = psb_layer_kernel(spec, "psb_test_prepacked")
    wsum = ["wsum"] if case == "vnni_stem_c3" else []  # signed activations: the offset correction
    assert [p.name for p in func.params] == ["x", "q", *wsum, "scale", "bias", "n", "out"]
    check(spec, 3, 1)


# Depthwise rows as MobileNetV2 has them (widths a multiple of 16, of 8, 14 and 7, strides 1 and 2,
# asymmetric padding): PSBDepthwiseConv2D schedules them (int8 weights, prepacked or packed at run
# time: the intdot layer kernel has no weight stage).
DEPTHWISE_CASES = {
    "w32": ((1, 8, 6, 32), (8, 1, 3, 3), dict(groups=8, padding=(1, 1, 1, 1))),
    "w56_s2": ((1, 4, 5, 112), (4, 1, 3, 3), dict(groups=4, stride=(2, 2), padding=(1, 1, 1, 1))),
    "w14": ((1, 5, 4, 14), (5, 1, 3, 3), dict(groups=5, padding=(1, 1, 1, 1))),
    "w7": ((1, 12, 7, 7), (12, 1, 3, 3), dict(groups=12, padding=(1, 1, 1, 1))),
    "w28_s2_asym": ((2, 3, 8, 56), (3, 1, 5, 5), dict(groups=3, stride=(2, 2), padding=(1, 2, 2, 1))),
}


@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("case", list(DEPTHWISE_CASES))
def test_depthwise_rule_bit_exact(case, n, signed):
    i = list(DEPTHWISE_CASES).index(case)
    seed, layer = SEEDS_LAYERS[(i + n) % len(SEEDS_LAYERS)]
    spec = dataclasses.replace(conv_spec(DEPTHWISE_CASES[case], "intdot", n, seed, layer, activation=ACTS[i % len(ACTS)],
                                         E=3, act_signed=signed), prepacked=True)
    assert PSBDepthwiseConv2D().apply(psb_layer_kernel(spec, "dw", expose_acc=True), TARGET, False) is not None
    check(spec, seed, layer)


def test_depthwise_rule_declines_other_convs():
    """A channel multiplier, several channels per group, a weight stage (the other lowerings) and
    dense convs go to PSBConv2D."""
    def applies(spec):
        return PSBDepthwiseConv2D().apply(psb_layer_kernel(spec, "k"), TARGET, False) is not None

    assert not applies(dataclasses.replace(conv_spec("depthwise_x2", "intdot", 4), prepacked=True))
    assert not applies(dataclasses.replace(conv_spec("groups2", "intdot", 4), prepacked=True))
    assert not applies(conv_spec("depthwise", "shiftadd", 4))
    assert not applies(dataclasses.replace(conv_spec("3x3_pad1", "intdot", 4), prepacked=True))
    assert applies(dataclasses.replace(conv_spec("depthwise", "intdot", 4), prepacked=True))


def test_pack_weights_layout_and_errors():
    spec = conv_spec(VNNI_CASES["stem_c3"], "intdot", 8, 3, 1, E=3, act_signed=True)
    q = np.ones(spec.w_shape, np.int64)
    q[5] = -2
    packed, wsum = pack_weights(spec, q)
    assert packed.shape == (1, 7, 7, 1, 16, 4) and packed.dtype == np.int8
    assert packed[..., :3].sum() == q.sum() and not packed[..., 3].any()  # the 4th channel is padding
    assert wsum.dtype == np.int32 and wsum[0] == -128 * 147 and wsum[5] == 128 * 2 * 147
    assert len(pack_weights(dataclasses.replace(spec, act_signed=False), q)) == 1  # no offset, no wsum
    with pytest.raises(ValueError, match="kernel wants"):
        pack_weights(spec, q[:, :2])
    with pytest.raises(ValueError, match="do not fit int8"):
        pack_weights(spec, q * 300)
    with pytest.raises(ValueError, match="need the intdot lowering"):
        psb_layer_kernel(dataclasses.replace(conv_spec("1x1", "shiftadd", 4), prepacked=True), "x")


def test_vnni_kernel_contains_vpdpbusd():
    spec = conv_spec(VNNI_CASES["3x3_pad1"], "intdot", 4, 1, 0, E=4, act_signed=False)
    _, layer = build(spec)
    asm = layer.mod.imports[0].inspect_source("asm") if layer.mod.imports else layer.mod.inspect_source("asm")
    assert "vpdpbusd" in asm


def test_int16_kernel_uses_vnni_word_dot_products():
    """The int16 preset (int16 weights): the vnni16 conv, tensorized into AVX-512 VNNI word dot
    products (``vpdpwssd``)."""
    spec = conv_spec("3x3_pad1", "intdot", 64, 1, 0, E=4, act_signed=False)
    spec = dataclasses.replace(spec, x_shape=(1, 32, 8, 8), w_shape=(32, 32, 3, 3))
    assert spec.q_dtype == "int16" and spec.weight_layout == "vnni16"
    _, layer = build(spec)
    asm = layer.mod.imports[0].inspect_source("asm") if layer.mod.imports else layer.mod.inspect_source("asm")
    assert "vpdpwssd" in asm


ARM_MATTRS = {"dotprod": (["+neon", "+dotprod"], "sdot"), "i8mm": (["+neon", "+dotprod", "+i8mm"], "usdot"),
              "neon": (["+neon"], None)}


@pytest.mark.parametrize("arm", list(ARM_MATTRS))
def test_arm_vnni_kernel_uses_dot_product_instructions(arm):
    """The int8 preset's packed conv built for aarch64: sdot (+dotprod: activations shifted to
    signed, exact correction) or usdot (+i8mm); without dot products a plain vectorized nest."""
    import re

    mattr, want = ARM_MATTRS[arm]
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr})
    spec = conv_spec(VNNI_CASES["1x1"], "intdot", 8, 1, 0, E=3, act_signed=False)
    spec = KernelSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(KernelSpec)})
    assert spec.vnni
    sch = PSBConv2D().apply(psb_layer_kernel(spec, "psb_test_arm_kernel"), target, False)
    lib = tvm.compile(sch.mod["main"], target=target)
    asm = lib.mod.imports[0].inspect_source("asm") if lib.mod.imports else lib.mod.inspect_source("asm")
    ops = re.findall(r"^\s+(sdot|udot|usdot)\s", asm, flags=re.M)
    if want is None:
        assert ops == []
    else:
        assert ops and set(ops) == {want}, ops


# ------------------------------------------------------------------ bitserial lowering (n = 1, 2)

BITSERIAL_CONV = ["1x1", "stride2", "asym_pad", "groups2", "depthwise_x2", "mixed"]


def test_bitserial_is_a_lowering():
    assert LOWERINGS == ("intdot", "shiftadd", "bitserial")
    assert bitserial_levels(4, 1) == 5 and bitserial_levels(4, 2) == 6 and bitserial_levels(3, 64) == 10


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("case", BITSERIAL_CONV)
def test_bitserial_conv_bit_exact(case, n):
    """Popcounts of activation bit planes AND weight sign/level masks == the numpy accumulators,
    over strides, padding, dilation, groups and depthwise; int8 and uint8 activations alternate."""
    i = list(CONV_CASES).index(case)
    seed, layer = SEEDS_LAYERS[(i + n) % len(SEEDS_LAYERS)]
    spec = conv_spec(case, "bitserial", n, seed, layer, activation=ACTS[(i + n) % len(ACTS)],
                     act_signed=(i + n) % 2 == 0)
    check(spec, seed, layer)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_bitserial_dense_bit_exact(case, n):
    i = list(DENSE_CASES).index(case)
    act_signed = (i + n) % 2 == 1  # each n sees both int8 and uint8 activations
    seed, layer = SEEDS_LAYERS[(i + 2 * n + act_signed) % len(SEEDS_LAYERS)]
    spec = dense_spec(case, "bitserial", n, seed, layer, activation=ACTS[(i + n) % len(ACTS)], act_signed=act_signed)
    check(spec, seed, layer)


@pytest.mark.parametrize("act_signed", [True, False], ids=["s16", "u16"])
@pytest.mark.parametrize("kind", ["conv2d", "dense"])
def test_bitserial_16bit_activations_bit_exact(kind, act_signed):
    seed, layer = 11, 5
    make = conv_spec if kind == "conv2d" else dense_spec
    spec = make("stride2" if kind == "conv2d" else "3x40x8", "bitserial", 2, seed, layer, activation=None,
                act_bits=16, act_signed=act_signed)
    check(spec, seed, layer)


@pytest.mark.parametrize("kind", ["conv2d", "dense"])
def test_bitserial_int64_accumulators_bit_exact(kind):
    """Saturated 16-bit activations and E=10 / E=12 weights: the accumulators need int64."""
    seed, layer = 8, 8
    if kind == "conv2d":
        spec = conv_spec(((1, 16, 6, 6), (8, 16, 3, 3), dict(padding=(1, 1, 1, 1))), "bitserial", 2, seed, layer,
                         activation=None, E=10, act_bits=16)
    else:
        spec = dense_spec((4, 300, 6), "bitserial", 2, seed, layer, activation=None, E=12, act_bits=16)
    assert spec.acc_dtype == "int64"
    _, racc = check(spec, seed, layer, big=True)
    assert np.abs(racc).max() > 2**31


@pytest.mark.parametrize("n,n_max", [(1, 64), (8, 8)])
@pytest.mark.parametrize("kind", ["conv2d", "dense"])
def test_bitserial_any_n_up_to_n_max(kind, n, n_max):
    """The level loop follows the run-time n (E + 1 + log2 n levels), so a module compiled for a
    larger n_max is exact at every n; n > 2 is supported, only slower."""
    seed, layer = 42, 3
    if kind == "conv2d":
        spec = conv_spec("groups2", "bitserial", n, seed, layer, activation="relu", E=3)
    else:
        spec = dense_spec("3x40x8", "bitserial", n, seed, layer, activation=None, E=3)
    check(dataclasses.replace(spec, n_max=n_max), seed, layer, per_channel=n != 2)


def test_bitserial_masked_kernel_uses_intdot_products():
    """The attention (masked) kernel of a bitserial layer computes its positions with the intdot
    products: the same integers by construction."""
    spec = KernelSpec(**{f.name: getattr(dense_spec("3x40x8", "bitserial", 2), f.name)
                         for f in dataclasses.fields(KernelSpec)})
    func = psb_masked_kernel(spec, "psb_test_masked")
    assert func.attrs["psb.lowering"] == "intdot"


def test_bitserial_wide_plane_codes_bit_exact():
    """E=15: 2 * (E + 2) sign/level planes no longer fit an int32 plane code (int64 codes)."""
    spec = dense_spec("3x40x8", "bitserial", 2, 6, 6, activation=None, E=15)
    assert 2 * bitserial_levels(spec.E, spec.n_max) > 31
    check(spec, 6, 6)


# Producer -> consumer pairs of vnni convs for the integer hand-off: the producer's uint8 NHWC
# output and the consumer's float output on it. (producer case, consumer w_shape and geometry)
HANDOFF_CASES = {
    "3x3_to_3x3": (((1, 8, 6, 7), (32, 8, 3, 3), dict(padding=(1, 1, 1, 1))), ((16, 32, 3, 3), dict(padding=(1, 1, 1, 1)))),
    # 24 outputs (packed to 32) into a 1x1 projection; a strided consumer with asymmetric padding
    "o24_to_1x1": (((1, 16, 5, 8), (24, 16, 1, 1), {}), ((48, 24, 1, 1), {})),
    "to_stride2": (((2, 4, 9, 9), (16, 4, 3, 3), dict(padding=(1, 1, 1, 1))),
                   ((32, 16, 3, 3), dict(stride=(2, 2), padding=(0, 1, 1, 0)))),
    # 18 channels: the consumer's padding to 20 holds the offset, met by zero weights
    "o18_padded": (((1, 4, 4, 6), (18, 4, 3, 3), dict(padding=(1, 1, 1, 1))), ((16, 18, 3, 3), dict(padding=(1, 1, 1, 1)))),
    # depthwise convs (channels-last dw_nhwc kernels) after an expansion and before a projection
    "1x1_to_dw": (((1, 16, 6, 8), (32, 16, 1, 1), {}), ((32, 1, 3, 3), dict(groups=32, padding=(1, 1, 1, 1)))),
    "dw_s2_to_1x1": (((2, 32, 9, 9), (32, 1, 3, 3), dict(groups=32, stride=(2, 2), padding=(1, 1, 1, 1))),
                     ((24, 32, 1, 1), {})),
    "dw20_5x5_asym": (((1, 20, 5, 7), (20, 1, 5, 5), dict(groups=20, padding=(2, 1, 2, 1))), ((16, 20, 1, 1), {})),
    # PP-OCRv4 recognizer: its RGB stem into a 16-channel depthwise conv; a squeeze-excite pair on 1x1 maps
    "stem_to_dw16": (((1, 3, 12, 40), (16, 3, 3, 3), dict(stride=(2, 2), padding=(1, 1, 1, 1))),
                     ((16, 1, 3, 3), dict(groups=16, padding=(1, 1, 1, 1)))),
    "se_1x1_maps": (((1, 240, 1, 1), (60, 240, 1, 1), {}), ((240, 60, 1, 1), {})),
    "to_1x1_s2": (((1, 8, 7, 9), (16, 8, 3, 3), dict(padding=(1, 1, 1, 1))), ((32, 16, 1, 1), dict(stride=(2, 2)))),
    # a producer on blocked activations (a 28x28 plane)
    "blocked_to_3x3": (((1, 8, 28, 28), (16, 8, 3, 3), dict(padding=(1, 1, 1, 1))), ((16, 16, 3, 3), dict(padding=(1, 1, 1, 1)))),
}


def _compile_default(spec: KernelSpec, name: str):
    func = psb_layer_kernel(spec, name)
    sch = next(s for s in (r.apply(func, TARGET, False) for r in (PSBDepthwiseNHWC(), PSBConv2D())) if s is not None)
    assert sch is not None
    return tvm.compile(sch.mod["main"], target=TARGET)


@pytest.mark.parametrize("width,stride,pixels", [(8, 1, 8), (20, 2, 5), (7, 1, 7), (13, 1, 1)])
def test_dw_nhwc_sums_pixels_together(width, stride, pixels):
    """The channels-last depthwise schedule sums several output pixels of a row per tap (an
    unrolled loop of a divisor of the width <= DW_PIXEL_TILE, below the taps, above the channel lanes),
    so each tap's weights are loaded once for them and their multiply-adds are independent.
    (Bit-exactness at such widths: test_int8_handoff_pair_bit_exact.)"""
    geo = dict(groups=16, stride=(stride, stride), padding=(1, 1, 1, 1))
    # (signed activations: one multiply-add per tap, not dw_tap_groups)
    spec = dataclasses.replace(conv_spec(((1, 16, 4, width), (16, 1, 3, 3), geo), "intdot", 8, 1, 0, E=3,
                                         act_signed=True), prepacked=True, x_handoff=True)
    assert not spec.dw_tap_groups
    sch = PSBDepthwiseNHWC().apply(psb_layer_kernel(spec, "dw"), TARGET, False)
    loops = [sch.get(lp) for lp in sch.get_loops(sch.get_sblock("acc_update"))]
    kinds = [(int(lp.extent), lp.kind) for lp in loops]
    assert kinds[-1][1] == tvm.tirx.ForKind.VECTORIZED
    assert kinds[-2] == (pixels, tvm.tirx.ForKind.UNROLLED)
    assert [k for _, k in kinds[-4:-2]] == [tvm.tirx.ForKind.UNROLLED] * 2  # the taps, above the pixels


def _dw_spec(case, act_signed=False, **fields):
    x_shape, w_shape, geo = case
    return dataclasses.replace(conv_spec(case, "intdot", 8, 1, 0, activation=("clip", 0.0, 6.0), E=3,
                                         act_signed=act_signed, frac_bits=4), prepacked=True, **fields)


def test_dw_tap_groups_where():
    """Depthwise hand-off convs sum 4 tap columns per dot product where vpdpbusd's operands fit:
    uint8 activations, int8 weights, int32 sums, channels in blocks of 16, columns not dilated;
    ceil(KW / 4) groups."""
    case = ((1, 32, 6, 9), (32, 1, 3, 3), dict(groups=32, padding=(1, 1, 1, 1)))
    spec = _dw_spec(case, x_handoff=True)
    assert spec.dw_tap_groups == 1
    assert _dw_spec(((1, 32, 9, 9), (32, 1, 5, 5), dict(groups=32, padding=(2, 2, 2, 2))), x_handoff=True).dw_tap_groups == 2
    assert dataclasses.replace(spec, x_handoff=False, out_handoff=Handoff(8, False, 4, 0, 32)).dw_tap_groups == 1
    assert not dataclasses.replace(spec, x_handoff=False).dw_tap_groups  # (the NCHW kernel: PSBDepthwiseConv2D)
    assert not _dw_spec(case, act_signed=True, x_handoff=True).dw_tap_groups  # int8 activations
    assert not _dw_spec(((1, 24, 6, 9), (24, 1, 3, 3), dict(groups=24, padding=(1, 1, 1, 1))), x_handoff=True).dw_tap_groups
    assert not _dw_spec(((1, 32, 6, 9), (32, 1, 3, 3), dict(groups=32, padding=(2, 2, 2, 2), dilation=(2, 2))),
                        x_handoff=True).dw_tap_groups
    assert _dw_spec(((1, 32, 9, 6), (32, 1, 3, 3), dict(groups=32, padding=(2, 1, 2, 1), dilation=(2, 1))),
                    x_handoff=True).dw_tap_groups == 1
    assert not dataclasses.replace(_dw_spec(case, x_handoff=True), E=5, n_max=64).dw_tap_groups  # int16 weights
    # pixel pairs: stride 1, at most 3 columns, whole tiles of 8 pixels
    assert not spec.dw_pixel_pairs  # (9 columns)
    wide = _dw_spec(((1, 32, 6, 16), (32, 1, 3, 3), dict(groups=32, padding=(1, 1, 1, 1))), x_handoff=True)
    assert wide.dw_pixel_pairs
    assert not dataclasses.replace(wide, x_shape=(1, 32, 6, 32), stride=(1, 2)).dw_pixel_pairs
    assert not _dw_spec(((1, 32, 9, 12), (32, 1, 5, 5), dict(groups=32, padding=(2, 0, 2, 0))), x_handoff=True).dw_pixel_pairs


@pytest.mark.parametrize("activation,frac_bits,mins,maxs", [
    (("clip", 0.0, 6.0), 4, 1, 1), (("clip", 0.0, 6.0), 6, 2, 1), ("relu", 4, 1, 1), (None, 4, 1, 1)],
    ids=["relu6_f4", "relu6_f6", "relu_f4", "none_f4"])
def test_handoff_epilogue_leaves_out_idle_clips(activation, frac_bits, mins, maxs):
    """The hand-off epilogue multiplies the scale, the bias and the activation's bounds by 2**f
    instead of each output, and leaves out the quantization's clips the activation makes idle: a
    ReLU6 output times 2**4 is at most 96 < 255 (only the activation's clip is left); times 2**6
    it reaches 384 (255 stays); ReLU keeps the upper clip, no activation both. (Bit-exactness:
    test_int8_handoff_pair_bit_exact and test_dw_tap_groups_bit_exact.)"""
    case = ((1, 32, 6, 9), (32, 1, 3, 3), dict(groups=32, padding=(1, 1, 1, 1)))
    spec = dataclasses.replace(_dw_spec(case, x_handoff=True), activation=activation,
                               out_handoff=Handoff(8, False, frac_bits, 0, 32))
    script = psb_layer_kernel(spec, "dw").script()
    epilogue = next(line for line in script.splitlines() if line.strip().startswith("out["))
    assert (epilogue.count("T.min("), epilogue.count("T.max(")) == (mins, maxs)
    times = f"T.float32({2.0 ** frac_bits})"
    assert epilogue.count(times) == 2 and f"bias[v_c] * {times}" in epilogue  # (scale and bias, nothing else)
    if activation == ("clip", 0.0, 6.0):
        assert f"T.float32({6.0 * 2 ** frac_bits})" in epilogue


# (x_shape, w_shape, geometry) of depthwise convs with 16-channel blocks: MobileNetV2's 3x3 at
# strides 1 and 2, pixel pairs (widths of 16 and 8), a 5x5 (two groups of 4 columns), odd widths,
# asymmetric padding, rows dilated
DW_TAP_CASES = {
    "3x3": ((1, 32, 6, 9), (32, 1, 3, 3), dict(groups=32, padding=(1, 1, 1, 1))),
    "3x3_pixel_pairs": ((1, 16, 5, 16), (16, 1, 3, 3), dict(groups=16, padding=(1, 1, 1, 1))),
    "2x2_pixel_pairs_b2": ((2, 32, 4, 9), (32, 1, 2, 2), dict(groups=32, padding=(0, 0, 1, 0))),
    "3x3_s2_b2": ((2, 16, 9, 11), (16, 1, 3, 3), dict(groups=16, stride=(2, 2), padding=(1, 1, 1, 1))),
    "5x5": ((1, 48, 8, 7), (48, 1, 5, 5), dict(groups=48, padding=(2, 2, 2, 2))),
    "3x3_asym_w13": ((1, 16, 5, 13), (16, 1, 3, 3), dict(groups=16, stride=(1, 2), padding=(0, 1, 1, 0))),
    "3x3_rows_dilated": ((1, 32, 9, 6), (32, 1, 3, 3), dict(groups=32, padding=(2, 1, 2, 1), dilation=(2, 1))),
    "1x7": ((1, 16, 4, 12), (16, 1, 1, 7), dict(groups=16, padding=(0, 3, 0, 3))),
}


@pytest.mark.parametrize("target", ["host", "x86-64-v3"], ids=["host", "avx2_loop_nest"])
@pytest.mark.parametrize("x_handoff,out_handoff", [(True, True), (True, False), (False, True)],
                         ids=["in_out", "in", "out"])
@pytest.mark.parametrize("case", list(DW_TAP_CASES))
def test_dw_tap_groups_bit_exact(case, x_handoff, out_handoff, target, monkeypatch):
    """A dw_tap_groups depthwise conv (uint8 NHWC or float NCHW in, the consumer's uint8 NHWC or
    float NCHW out) computes exactly what the one-multiply-add-per-tap kernel of the same spec
    does (checked against the oracle in test_int8_handoff_pair_bit_exact): with vpdpbusd on the
    host (VNNI) and as a loop nest on an AVX2 target (no VNNI)."""
    tgt = TARGET if target == "host" else tvm.target.Target({"kind": "llvm", "mcpu": target})
    i = list(DW_TAP_CASES).index(case)
    spec = _dw_spec(DW_TAP_CASES[case], x_handoff=x_handoff,
                    out_handoff=Handoff(8, False, 3, 0, DW_TAP_CASES[case][1][0]) if out_handoff else None)
    assert spec.dw_tap_groups == -(-spec.w_shape[3] // 4)
    rng = np.random.default_rng(40 + i)
    N, C, H, W = spec.x_shape
    if x_handoff:
        x = rng.integers(0, 256, size=(N, H, W, C)).astype(np.uint8)
    else:
        x = make_acts(rng, spec.x_shape, spec.frac_bits, 8, False)
    q = rng.integers(-127, 128, size=spec.w_shape).astype(np.int8)
    scale = (2.0 ** -rng.integers(6, 9, size=C)).astype(np.float32)
    bias = rng.normal(size=C).astype(np.float32)

    def run(schedule_target):
        sch = PSBDepthwiseNHWC().apply(psb_layer_kernel(spec, "dw"), schedule_target, False)
        out = tvm.runtime.empty(spec.out_storage_shape, spec.out_dtype, DEV)
        tvm.compile(sch.mod["main"], target=schedule_target)["dw"](
            tvm.runtime.tensor(x, DEV), tvm.runtime.tensor(q, DEV), tvm.runtime.tensor(scale, DEV),
            tvm.runtime.tensor(bias, DEV), 8, out)
        return out.numpy(), sch

    got, sch = run(tgt)
    assert ("vpdpbusd" in sch.mod["main"].script()) == (target == "host" and "avx512_vnni" in _cpu_flags())
    monkeypatch.setattr(KernelSpec, "dw_tap_groups", property(lambda self: 0))
    want, _ = run(TARGET)
    assert len(np.unique(want)) > 3, "degenerate case"
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


@pytest.mark.parametrize("consumer_signed", [False, True], ids=["uint8", "int8"])
@pytest.mark.parametrize("n", [1, 8])
@pytest.mark.parametrize("case", list(HANDOFF_CASES))
def test_int8_handoff_pair_bit_exact(case, n, consumer_signed):
    """A vnni conv that hands over its output (``out_handoff``) writes exactly
    ``numerics.handoff_activations`` of its float output, and the consumer on them
    (``x_handoff``) gives the reference's float output of the float hand-over, bit for bit."""
    (x_shape, w_shape, geo), (w2_shape, geo2) = HANDOFF_CASES[case]
    i = list(HANDOFF_CASES).index(case)
    seed, layer = SEEDS_LAYERS[(i + n) % len(SEEDS_LAYERS)]
    a = dataclasses.replace(conv_spec((x_shape, w_shape, geo), "intdot", n, seed, layer, activation=ACTS[i % len(ACTS)],
                                      E=3, act_signed=True), prepacked=True)
    b = dataclasses.replace(conv_spec((a.out_shape, w2_shape, geo2), "intdot", n, seed, layer + 1, activation="relu",
                                      E=3, act_signed=consumer_signed, frac_bits=3), prepacked=True)
    assert can_hand_off(a, b) and (a.vnni or b.vnni)
    a_h = KernelSpec(**{f.name: getattr(a, f.name) for f in dataclasses.fields(KernelSpec)})
    a_h = dataclasses.replace(a_h, out_handoff=b.handoff)
    b_h = KernelSpec(**{f.name: getattr(b, f.name) for f in dataclasses.fields(KernelSpec)})
    b_h = dataclasses.replace(b_h, x_handoff=True)
    rng = np.random.default_rng(_input_seed(a, "handoff"))
    x = make_acts(rng, a.x_shape, a.frac_bits, 8, True)
    consts = []
    for spec, lay in ((a, layer), (b, layer + 1)):
        enc = nm.encode_weights(make_weights(rng, spec.w_shape), E=spec.E, P=spec.P)
        bias = rng.normal(size=spec.w_shape[0]).astype(np.float32)
        q = nm.integer_weights(enc, n, seed, lay, spec.sampler)
        consts.append((q, nm.output_scale(enc.k_lo, spec.frac_bits, n), bias))
    (qa, sa, ba), (qb, sb, bb) = consts
    # the oracle: the float hand-over, and what the consumer stores of it
    ya = nm.epilogue(nm.conv2d_int(nm.quantize_activations(x, a.frac_bits, 8, True), qa, a.stride, a.padding,
                                   a.dilation, a.groups), sa, ba, a.activation, 1)
    want_h = nm.handoff_activations(ya, b.frac_bits, 8, consumer_signed, b.dot_offset, b.handoff.channels)
    assert want_h.dtype == np.dtype(b.handoff.dtype)
    xb = nm.quantize_activations(ya, b.frac_bits, 8, consumer_signed)
    assert np.any(xb != 0) and np.any(xb != xb.flat[0]), "degenerate case: constant hand-over"
    want_z = nm.epilogue(nm.conv2d_int(xb, qb, b.stride, b.padding, b.dilation, b.groups), sb, bb, b.activation, 1)

    def args(spec, q, scale, bias):
        return ([tvm.runtime.tensor(t, DEV) for t in pack_weights(spec, q)]
                + [tvm.runtime.tensor((scale * np.float32(n)).astype(np.float32), DEV), tvm.runtime.tensor(bias, DEV)])

    h = tvm.runtime.empty(a_h.out_storage_shape, a_h.out_dtype, DEV)
    _compile_default(a_h, "producer")["producer"](tvm.runtime.tensor(x, DEV), *args(a, qa, sa, ba), n, h)
    np.testing.assert_array_equal(h.numpy(), want_h)
    z = tvm.runtime.empty(b.out_shape, "float32", DEV)
    _compile_default(b_h, "consumer")["consumer"](h, *args(b, qb, sb, bb), n, z)
    np.testing.assert_array_equal(z.numpy().view(np.int32), want_z.view(np.int32))


@pytest.mark.parametrize("x_nhwc,out_nhwc,residual,res_nhwc", [
    (True, False, None, False), (False, True, None, False), (True, True, None, False),
    (True, True, "add_relu", True), (False, True, "add", False), (True, False, "add_relu", True)],
    ids=["x", "out", "x_out", "all_relu", "out_add", "x_res_relu"])
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("case", ["3x3_pad1", "1x1_s2", "stem_c3", "o24", "blocked_3x3"])
def test_channels_last_float_bit_exact(case, bits, x_nhwc, out_nhwc, residual, res_nhwc):
    """A packed conv with its float input (``x_nhwc``), output (``out_nhwc``) and / or residual
    operand (``res_nhwc``) channels-last computes the very floats of the NCHW kernel (checked
    against the oracle in test_vnni_conv_bit_exact / test_vnni16_conv_bit_exact), transposed."""
    i = list(VNNI_CASES).index(case)
    seed, layer = SEEDS_LAYERS[(i + bits) % len(SEEDS_LAYERS)]
    n = 8
    base = dataclasses.replace(conv_spec(VNNI_CASES[case], "intdot", n, seed, layer, activation=ACTS[i % len(ACTS)],
                                         E=3 if bits == 8 else 4, act_bits=8, act_signed=bits == 16),
                               prepacked=True, residual=residual)
    assert base.vnni == (bits == 8) and base.vnni16 == (bits == 16) and base.packed_cpu_conv
    spec = dataclasses.replace(base, x_nhwc=x_nhwc, out_nhwc=out_nhwc, res_nhwc=res_nhwc)
    rng = np.random.default_rng(_input_seed(base, "nhwc"))
    x = make_acts(rng, base.x_shape, base.frac_bits, 8, base.act_signed)
    enc = nm.encode_weights(make_weights(rng, base.w_shape), E=base.E, P=base.P)
    q = nm.integer_weights(enc, n, seed, layer, base.sampler)
    scale = (nm.output_scale(enc.k_lo, base.frac_bits, n) * np.float32(n)).astype(np.float32)
    bias = rng.normal(size=base.w_shape[0]).astype(np.float32)
    res = rng.normal(size=base.out_shape).astype(np.float32)
    nhwc = (0, 2, 3, 1)

    def run(s, x, res):
        args = [tvm.runtime.tensor(x, DEV), *[tvm.runtime.tensor(t, DEV) for t in pack_weights(s, q)],
                tvm.runtime.tensor(scale, DEV), tvm.runtime.tensor(bias, DEV)]
        args += [tvm.runtime.tensor(res, DEV)] if residual else []
        out = tvm.runtime.empty(s.out_storage_shape, "float32", DEV)
        _compile_default(s, "k")["k"](*args, n, out)
        return out.numpy()

    want = run(base, x, res)
    assert np.any(want != 0)
    got = run(spec, np.ascontiguousarray(x.transpose(nhwc)) if x_nhwc else x,
              np.ascontiguousarray(res.transpose(nhwc)) if res_nhwc else res)
    if out_nhwc:
        assert got.shape == spec.out_storage_shape
        got = got.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


def test_channels_last_float_spec():
    """Where channels-last float activations are allowed, and the storage shapes they give."""
    spec = dataclasses.replace(conv_spec(VNNI_CASES["blocked_3x3"], "intdot", 8, E=3), prepacked=True)
    assert spec.blocked_activations
    nhwc = dataclasses.replace(spec, x_nhwc=True, out_nhwc=True)
    assert not nhwc.blocked_activations  # (an NHWC float input quantizes into NHWC pixels directly)
    assert nhwc.x_storage_shape == (1, 28, 29, 12) and nhwc.out_storage_shape == (1, 28, 29, 16)
    with pytest.raises(ValueError, match="channels-last"):
        psb_layer_kernel(dataclasses.replace(conv_spec(CONV_CASES["3x3_pad1"], "shiftadd", 8), x_nhwc=True), "k")
    with pytest.raises(ValueError, match="hand-off"):
        psb_layer_kernel(dataclasses.replace(nhwc, x_handoff=True), "k")


def test_int8_handoff_only_where_it_is_exact():
    """Only 8-bit vnni and depthwise convs with prepacked weights hand over, and a depthwise conv
    only to a consumer without channel padding (it computes its own channels only); the kernel
    refuses the others by name."""
    int16 = dataclasses.replace(conv_spec("3x3_pad1", "intdot", 4, 3, 1), prepacked=True)
    assert not int16.handoff_capable and not int16.vnni
    with pytest.raises(ValueError, match="8-bit vnni and depthwise convs"):
        psb_layer_kernel(dataclasses.replace(int16, x_handoff=True), "k")
    dw = dataclasses.replace(conv_spec(((1, 18, 5, 7), (18, 1, 3, 3), dict(groups=18, padding=(1, 1, 1, 1))),
                                       "intdot", 4, 3, 1, E=3), prepacked=True)
    padded = dataclasses.replace(conv_spec((dw.out_shape, (16, 18, 1, 1), {}), "intdot", 4, 3, 2, E=3), prepacked=True)
    assert dw.handoff_capable and padded.handoff_capable and padded.handoff.channels == 20
    assert not can_hand_off(dw, padded)
    dw20 = dataclasses.replace(dw, x_shape=(1, 20, 5, 7), w_shape=(20, 1, 3, 3), groups=20)
    assert can_hand_off(dw20, dataclasses.replace(padded, x_shape=dw20.out_shape, w_shape=(16, 20, 1, 1)))
    with pytest.raises(ValueError, match="computes its 18 channels only"):
        psb_layer_kernel(dataclasses.replace(dw, out_handoff=padded.handoff), "k")
    assert not can_hand_off(dataclasses.replace(dw, prepacked=False), padded)  # weights built in the kernel


# A residual add (+ ReLU) fused into the epilogue, on every float-output layout: vnni, a hand-off
# consumer (vnni and dw_nhwc), channels-last (int16), NCHW (grouped, shiftadd, depthwise) and dense.
RESIDUAL_CASES = {
    "vnni": lambda: dataclasses.replace(conv_spec("3x3_pad1", "intdot", 4, 3, 1, E=3, act_signed=False),
                                        w_shape=(16, 4, 3, 3), prepacked=True),
    "vnni_handoff_in": lambda: dataclasses.replace(conv_spec(((1, 16, 5, 6), (32, 16, 3, 3), dict(padding=(1, 1, 1, 1))),
                                                             "intdot", 4, 3, 1, E=3), prepacked=True, x_handoff=True),
    "dw_nhwc_handoff_in": lambda: dataclasses.replace(conv_spec(((1, 16, 6, 5), (16, 1, 3, 3), dict(
        groups=16, stride=(2, 2), padding=(1, 1, 1, 1))), "intdot", 4, 3, 1, E=3), prepacked=True, x_handoff=True),
    "channels_last_int16": lambda: conv_spec("stride2", "intdot", 4, 3, 1),
    "vnni16": lambda: dataclasses.replace(conv_spec("stride2", "intdot", 64, 3, 1), w_shape=(16, 4, 3, 3)),
    "vnni16_chunks": lambda: dataclasses.replace(conv_spec(VNNI_CASES["width7"], "intdot", 64, 3, 1, act_bits=16),
                                                 prepacked=True),
    "vnni16_digits": lambda: dataclasses.replace(conv_spec("stride2", "intdot", 64, 3, 1, act_bits=16, act_signed=False),
                                                 w_shape=(16, 4, 3, 3), prepacked=True),
    "nchw_groups": lambda: conv_spec("groups2", "intdot", 4, 3, 1),
    "nchw_shiftadd": lambda: conv_spec("3x3_pad1", "shiftadd", 4, 3, 1),
    "depthwise": lambda: dataclasses.replace(conv_spec("depthwise", "intdot", 4, 3, 1, E=3), prepacked=True),
    "dense": lambda: dense_spec("3x40x8", "intdot", 4, 3, 1),
}


@pytest.mark.parametrize("residual", ["add", "add_relu"])
@pytest.mark.parametrize("case", list(RESIDUAL_CASES))
def test_residual_epilogue_bit_exact(case, residual):
    """``KernelSpec.residual``: the kernel's float output plus ``res`` (and ReLU) equals the
    oracle's output followed by the same float32 add and ReLU, bit for bit."""
    base = RESIDUAL_CASES[case]()
    spec = KernelSpec(**{f.name: getattr(base, f.name) for f in dataclasses.fields(KernelSpec)})
    spec = dataclasses.replace(spec, residual=residual)
    n, seed, layer = base.n, base.seed, base.layer
    rng = np.random.default_rng(_input_seed(base, "residual" + case))
    x = make_acts(rng, spec.x_shape, spec.frac_bits, spec.act_bits, spec.act_signed)
    enc = nm.encode_weights(make_weights(rng, spec.w_shape), E=spec.E, P=spec.P)
    bias = rng.normal(size=spec.w_shape[0]).astype(np.float32)
    res = rng.normal(size=spec.out_shape).astype(np.float32)
    counts = nm.sample_counts(enc, n, seed, layer, spec.sampler)
    q = nm.weights_from_counts(enc, counts, n)
    scale = nm.output_scale(enc.k_lo, spec.frac_bits, n)
    xi = nm.quantize_activations(x, spec.frac_bits, spec.act_bits, spec.act_signed)
    if spec.kind == "dense":
        y = nm.epilogue(nm.dense_int(xi, q), scale, bias, spec.activation, 1)
    else:
        y = nm.epilogue(nm.conv2d_int(xi, q, spec.stride, spec.padding, spec.dilation, spec.groups), scale, bias,
                        spec.activation, 1)
    want = y + res
    if residual == "add_relu":
        want = np.maximum(want, np.float32(0))
    if spec.x_handoff:
        x_arg = nm.handoff_activations(x, spec.frac_bits, 8, spec.act_signed, spec.dot_offset, spec.handoff.channels)
    else:
        x_arg = x
    if spec.prepacked:
        weights = pack_weights(spec, q)
    else:
        weights = [counts.astype(np.int16), enc.sign, enc.normal, enc.shift]
    func = psb_layer_kernel(spec, "residual")
    assert [p.name for p in func.params][-3:] == ["res", "n", "out"]
    rules = [PSBDepthwiseNHWC(), PSBDepthwiseConv2D(), PSBConv2D()] if spec.kind == "conv2d" else [PSBDense()]
    sch = next(s for s in (r.apply(func, TARGET, False) for r in rules) if s is not None)
    lib = tvm.compile(sch.mod["main"], target=TARGET)
    out = tvm.runtime.empty(spec.out_shape, "float32", DEV)
    lib["residual"](*[tvm.runtime.tensor(a, DEV) for a in [x_arg, *weights, (scale * np.float32(n)).astype(np.float32),
                                                            bias, res]], n, out)
    np.testing.assert_array_equal(out.numpy().view(np.int32), want.astype(np.float32).view(np.int32))


def test_residual_refused_where_the_output_is_not_float():
    """A residual needs the float output: not on a hand-off producer, not on bitserial kernels."""
    vnni = RESIDUAL_CASES["vnni"]()
    with pytest.raises(ValueError, match="residual 'add_relu'"):
        psb_layer_kernel(dataclasses.replace(vnni, residual="add_relu", out_handoff=vnni.handoff), "k")
    with pytest.raises(ValueError, match="residual 'add'"):
        psb_layer_kernel(dataclasses.replace(conv_spec("3x3_pad1", "bitserial", 2, 3, 1), residual="add"), "k")
    with pytest.raises(ValueError, match="residual 'mul'"):
        psb_layer_kernel(dataclasses.replace(vnni, residual="mul"), "k")
