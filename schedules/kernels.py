"""TE definitions of the PSB kernels (DESIGN.md section 3): two PrimFuncs per layer.

``psb_sample_kernel``: ``counts[i] = sum_{lo <= j < hi} b_ij`` for a run-time sample range and seed
(the nested sample stream, so the counts of ``[0, 2n)`` are those of ``[0, n)`` plus ``[n, 2n)``).
``psb_layer_kernel``: from the counts and a run-time ``n``, the integer weights
``q = s * (n*normal + counts) << shift``, the fixed-point activations ``xq``, the exact integer
products ``acc`` and the float32 output ``out`` (scale, bias, activation). ``psb.*`` attributes
tell the schedule rules what they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import tvm
from tvm import te, tirx

from psb_tvm import numerics
from psb_tvm.abi import ATTR_KIND, ATTR_LAYOUT, ATTR_LOWERING, ATTR_SAMPLER

from .hash import layer_key, sample_bit, sample_offset, stratified_count

LOWERINGS = ("intdot", "shiftadd", "bitserial")
COUNTS_DTYPE = "int16"  # counts <= n_max <= 1024
BITSERIAL_WORD = 32  # bits per packed word of the bitserial lowering (popcount on uint32)


def bitserial_levels(E: int, n: int) -> int:
    """Power-of-two levels of the sampled magnitudes ``|q| <= n * 2**E``: ``E + 1 + log2 n``."""
    return E + 1 + (int(n).bit_length() - 1)


@dataclass(frozen=True)
class KernelSpec:
    """Everything that shapes one PSB layer's kernels (the sample count and seed are run-time)."""

    kind: str  # "conv2d" or "dense"
    lowering: str
    x_shape: tuple  # conv: (N, C, H, W); dense: (M, K)
    w_shape: tuple  # conv: (O, C/groups, KH, KW); dense: (O, K)
    n_max: int
    layer: int  # layer id of the sample stream
    E: int
    P: int
    act_bits: int
    act_signed: bool
    frac_bits: int
    activation: object = None  # None, "relu", ("clip", lo, hi)
    stride: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple = (1, 1)
    groups: int = 1
    # intdot only: the integer weights q arrive as one constant already in the kernel's layout
    # (``pack_weights``), made at compile time from a frozen draw; no weight stage per call.
    prepacked: bool = False
    # The kernel is built for a GPU (CUDA): the int8 preset's packed conv takes the ``dp4a`` layout
    # (signed bytes on both sides) instead of x86's ``vnni`` one (unsigned x signed).
    gpu: bool = False
    # The sample stream (numerics.SAMPLERS): "stratified" counts in closed form, "iid" sums the
    # per-sample hash bits.
    sampler: str = "stratified"
    # Storage of the thresholds: "uint16" when every threshold of the layer is below 2**16 (P <= 16
    # and no weight rounds up to the next power of two), else "int32". The same integers either
    # way; the samplers read half the bytes (measured: the draw kernel is memory-bound).
    threshold_dtype: str = "int32"
    # intdot layers sampled at run time: their threshold, counts and encoding are stored in the
    # kernel's weight layout (``pack_layout``, padding zero), the encoding as one byte per weight
    # (``numerics.weight_code``) instead of three int8 arrays; their sample and masked kernels read
    # them so, and the pack / draw kernels (which always do) walk every array contiguously. In the
    # source order, the draw's stores into the vnni / OHWI layouts were byte scatters.
    packed_encoding: bool = False

    @property
    def reduction_size(self) -> int:
        size = 1
        for d in self.w_shape[1:]:
            size *= d
        return size

    @property
    def acc_dtype(self) -> str:
        bits = numerics.accumulator_bits(self.reduction_size, self.E, self.n_max, self.act_bits, self.act_signed)
        return f"int{bits}"

    @property
    def q_dtype(self) -> str:
        qmax = numerics.max_abs_q(self.E, self.n_max)
        return "int8" if qmax <= 127 else "int16" if qmax <= 32767 else "int32"

    @property
    def act_dtype(self) -> str:
        bits = 8 if self.act_bits <= 8 else 16 if self.act_bits <= 16 else 32
        return f"{'' if self.act_signed else 'u'}int{bits}"

    def _packed_int8_conv(self, act_signed_bound: bool, any_outputs: bool) -> bool:
        """The int8 preset's conv (8-bit activations x int8 weights, 16 outputs x 4 channels per
        packed step), when its sums in the packed domain still fit int32 (and, unless
        ``any_outputs``, the output channels come in 16s)."""
        bits = numerics.accumulator_bits(self.reduction_size, self.E, self.n_max, 8, act_signed_bound)
        return (self.kind == "conv2d" and self.lowering == "intdot" and self.groups == 1
                and self.q_dtype == "int8" and self.act_bits == 8 and bits == 32
                and (any_outputs or self.w_shape[0] % 16 == 0) and self.w_shape[1] >= 3)

    @property
    def vnni(self) -> bool:
        """int8 preset on CPUs: 8-bit activations (int8 ones offset to uint8) x int8 weights, 16
        outputs x 4 channels per ``vpdpbusd`` (weights packed [O/16, KH, KW, C/4, 16, 4],
        accumulators NHWC)."""
        # Signed activations go in offset by +128 (see _vnni_conv): the sums then need the
        # unsigned 8-bit bound to fit int32.
        return not self.gpu and self._packed_int8_conv(act_signed_bound=False, any_outputs=False)

    @property
    def dp4a(self) -> bool:
        """int8 preset on GPUs: the ``vnni`` blocking with both operands signed bytes (uint8
        activations offset to int8), for CUDA's ``__dp4a`` (4 int8 x int8 products per step).
        Output channels are padded to ``packed_outputs`` with zero weights (MobileNet's 24 / 40)."""
        return self.gpu and self._packed_int8_conv(act_signed_bound=True, any_outputs=True)

    @property
    def packed_outputs(self) -> int:
        """Output channels of the packed layouts: ``O`` rounded up to 16 (``dp4a`` pads; ``vnni``
        needs 16 | O)."""
        return -(-self.w_shape[0] // 16) * 16

    @property
    def dot_offset(self) -> int:
        """What the packed int8 conv adds to every activation so both operands have the signedness
        its instruction wants (``vpdpbusd``: unsigned x signed, ``dp4a``: signed x signed); the
        kernel takes ``offset * sum q`` back per output channel (``wsum``)."""
        if self.vnni and self.act_signed:
            return 128
        if self.dp4a and not self.act_signed:
            return -128
        return 0

    @property
    def vnni_channels(self) -> int:
        """Input channels of the VNNI layout: ``C`` rounded up to 4 (zero weights, zero activations),
        so a 3-channel stem still takes one ``vpdpbusd`` per 16 outputs x 4 channels."""
        return -(-self.w_shape[1] // 4) * 4

    @property
    def weight_layout(self) -> str:
        """Layout of the integer weights ``q`` inside the layer kernel (``pack_weights`` makes it)."""
        if self.kind == "dense":
            return "OI"
        return "vnni" if self.vnni else "dp4a" if self.dp4a else "OHWI" if self.channels_last else "OIHW"

    @property
    def packed_weight_shape(self) -> tuple:
        O, Cg, KH, KW = self.w_shape if self.kind == "conv2d" else (*self.w_shape, 1, 1)
        return {"OI": self.w_shape, "OIHW": self.w_shape, "OHWI": (O, KH, KW, Cg),
                "vnni": (O // 16, KH, KW, self.vnni_channels // 4, 16, 4),
                "dp4a": (self.packed_outputs // 16, KH, KW, self.vnni_channels // 4, 16, 4)}[self.weight_layout]

    @property
    def channels_last(self) -> bool:
        """Dense-style conv: activations NHWC and weights OHWI, so the reduction over input
        channels is contiguous and innermost and LLVM emits packed dot products (VNNI)."""
        return self.kind == "conv2d" and self.lowering == "intdot" and self.groups == 1 and self.w_shape[1] >= 3

    @property
    def out_shape(self) -> tuple:
        if self.kind == "dense":
            return (self.x_shape[0], self.w_shape[0])
        N, _, H, W = self.x_shape
        O, _, KH, KW = self.w_shape
        pt, pl, pb, pr = self.padding
        OH = (H + pt + pb - self.dilation[0] * (KH - 1) - 1) // self.stride[0] + 1
        OW = (W + pl + pr - self.dilation[1] * (KW - 1) - 1) // self.stride[1] + 1
        return (N, O, OH, OW)


#: Columns an NCHW activation row of ``xq`` is padded to (zeros, never read): its stage is
#: vectorized along rows, and an odd row width (30 = 15 lanes) made a 192-channel 28x28 depthwise
#: conv 10x slower per MAC than a 14x14 one.
XQ_ROW_MULTIPLE = 16


def xq_row_width(width: int) -> int:
    """``width`` rounded up to ``XQ_ROW_MULTIPLE``."""
    return -(-width // XQ_ROW_MULTIPLE) * XQ_ROW_MULTIPLE


def _flat_index(shape, idx):
    flat = idx[0]
    for dim, i in zip(shape[1:], idx[1:]):
        flat = flat * dim + i
    return flat


def _source_index(spec: KernelSpec, p) -> tuple:
    """The weight ``(o, c[, kh, kw])`` at index ``p`` of ``spec.packed_weight_shape`` (past the
    weights where the layout pads: those entries hold zeros)."""
    layout = spec.weight_layout
    if layout == "OHWI":
        o, kh, kw, c = p
        return (o, c, kh, kw)
    if layout in ("vnni", "dp4a"):
        ob, kh, kw, c4, oi, ci = p
        return (ob * 16 + oi, c4 * 4 + ci, kh, kw)
    return tuple(p)


def _packed_index(spec: KernelSpec, i) -> tuple:
    """Where the weight ``i = (o, c[, kh, kw])`` sits in ``spec.packed_weight_shape``."""
    layout = spec.weight_layout
    if layout == "OHWI":
        o, c, kh, kw = i
        return (o, kh, kw, c)
    if layout in ("vnni", "dp4a"):
        o, c, kh, kw = i
        return (o // 16, kh, kw, c // 4, o % 16, c % 4)
    return tuple(i)


class _Stored:
    """A per-weight array read by weight index ``i`` (source order), stored in packed order when
    ``packed`` (``spec.packed_encoding``)."""

    def __init__(self, spec: KernelSpec, buf, packed: bool):
        self.spec, self.buf, self.packed = spec, buf, packed

    def __getitem__(self, i):
        return self.buf[_packed_index(self.spec, i) if self.packed else tuple(i)]


def _storage_shape(spec: KernelSpec) -> tuple:
    """Shape of a layer's per-weight arrays (threshold, counts, encoding)."""
    return spec.packed_weight_shape if spec.packed_encoding else spec.w_shape


def _stratified(spec: KernelSpec, t, seed, i, then):
    """The stratified stream at weight ``i`` (source index) of threshold ``t`` (int32): ``then(c)``
    where ``c(m)`` is the number of ones among its first ``m`` samples (``m`` 0 or a power of two
    <= n_max, in closed form; int32). The weight's rotation is hashed once, however many prefixes
    ``then`` counts."""
    max_log2 = int(spec.n_max).bit_length() - 1

    def counts(o):
        return then(lambda m: stratified_count(o, t, m, spec.P, max_log2))

    return layer_key(seed, spec.layer, lambda key: sample_offset(key, _flat_index(spec.w_shape, i), spec.P, counts))


def psb_sample_kernel(spec: KernelSpec, name: str) -> tvm.tirx.PrimFunc:
    """``(threshold, lo, hi, seed) -> counts``: ones among samples ``lo <= j < hi`` of every weight.

    i.i.d.: a run-time loop over the samples, one hash per sample. Stratified: no loop, the closed
    form ``C(hi) - C(lo)`` per weight, so the cost no longer grows with ``n``; ``lo`` and ``hi``
    must each be 0 or a power of two (``main`` draws ``[0, n)``, refinement ``[n, 2n)``; the
    runtime checks), and at most ``n_max``.
    """
    shape = _storage_shape(spec)
    thr = te.placeholder(shape, spec.threshold_dtype, name="threshold")
    lo = tirx.Var("lo", "int64")
    hi = tirx.Var("hi", "int64")
    seed = tirx.Var("seed", "int64")

    def source(p):
        return _source_index(spec, p) if spec.packed_encoding else p

    if spec.sampler == "stratified":
        def count(*p):
            return _stratified(spec, thr[p].astype("int32"), seed, source(p),
                               lambda c: (c(hi) - c(lo)).astype(COUNTS_DTYPE))

        counts = te.compute(shape, count, name="counts")
        func = te.create_prim_func([thr, lo, hi, seed, counts])
        return func.with_attrs({"global_symbol": name, ATTR_KIND: "sample", ATTR_SAMPLER: "stratified",
                                "op_pattern": 8})
    if spec.sampler != "iid":
        raise ValueError(f"unknown sampler {spec.sampler!r}; expected one of {numerics.SAMPLERS}")
    r = te.reduce_axis((0, hi - lo), name="j")

    def count_iid(*p):
        bit = layer_key(seed, spec.layer, lambda key: sample_bit(key, _flat_index(spec.w_shape, source(p)), lo + r,
                                                                 thr[p].astype("int32"), spec.P))
        return te.sum(bit.astype(COUNTS_DTYPE), axis=r)

    counts = te.compute(shape, count_iid, name="counts")
    func = te.create_prim_func([thr, lo, hi, seed, counts])
    return func.with_attrs({"global_symbol": name, ATTR_KIND: "sample", ATTR_SAMPLER: "iid", "op_pattern": 8})


def _quantize(spec: KernelSpec, value):
    """``clip(rint(x * 2**f), lo, hi)``; ``nearbyint`` rounds half to even like ``np.rint``."""
    lo, hi = numerics.act_range(spec.act_bits, spec.act_signed)
    scaled = tirx.nearbyint(value * tirx.const(2.0**spec.frac_bits, "float32"))
    clipped = tirx.max(tirx.min(scaled, tirx.const(hi, "float32")), tirx.const(lo, "float32"))
    return clipped.astype(spec.act_dtype)


def _activation(spec: KernelSpec, y):
    act = spec.activation
    if act is None:
        return y
    if act == "relu":
        return tirx.max(y, tirx.const(0.0, "float32"))
    return tirx.max(tirx.min(y, tirx.const(float(act[2]), "float32")), tirx.const(float(act[1]), "float32"))


class _Encoding:
    """A weight's sign, normal flag and shift as a kernel reads them (int8 expressions): the three
    int8 arrays, or one uint8 ``code`` per weight (numerics.weight_code:
    bit 7 the sign, bit 6 the normal flag, bits 0-5 the shift). A zero weight's code says sign +1;
    its count and normal flag are 0, so its ``q`` is 0 either way."""

    def __init__(self, spec: KernelSpec, sign, normal, shift, code: bool = False, index=None):
        """``code``: read the one-byte code (a ``code`` placeholder of ``shape``); ``index``: maps
        the index the kernel reads at to the code's (the packed layout's) index."""
        if code and spec.lowering != "intdot":
            raise ValueError(f"the one-byte weight code is for intdot layers, not {spec.lowering!r}")
        self.arrays = (sign, normal, shift)
        self.code = te.placeholder(_storage_shape(spec), "uint8", name="code") if code else None
        self.index = index or tuple
        self.params = [self.code] if self.code is not None else [sign, normal, shift]

    def _byte(self, i):
        return self.code[self.index(i)]

    def sign(self, i):
        if self.code is None:
            return self.arrays[0][i]
        return (tirx.const(1, "int32") - ((self._byte(i).astype("int32") >> 7) << 1)).astype("int8")

    def normal(self, i):
        if self.code is None:
            return self.arrays[1][i]
        return ((self._byte(i) >> tirx.const(6, "uint8")) & tirx.const(1, "uint8")).astype("int8")

    def shift(self, i):
        if self.code is None:
            return self.arrays[2][i]
        return (self._byte(i) & tirx.const(63, "uint8")).astype("int8")


def _q_value(spec: KernelSpec, counts, enc: _Encoding, n32, i):
    """``q_i = s_i * (n*normal_i + counts_i) << shift_i`` in the kernel's weight type."""
    mag = (enc.normal(i).astype("int32") * n32 + counts[i].astype("int32")) << enc.shift(i).astype("int32")
    return (enc.sign(i).astype("int32") * mag).astype(spec.q_dtype)


def pack_weights(spec: KernelSpec, q) -> list:
    """The weight arguments of a prepacked kernel (what it takes in place of the counts), from the
    integer weights ``q`` [O, C/groups, KH, KW] (dense [O, K]): ``q`` rearranged into the kernel's
    ``weight_layout`` and cast to ``q_dtype``, and for the VNNI conv of signed activations the
    offset correction ``wsum[o] = -dot_offset * sum q[o, ...]`` (int32, see ``_vnni_conv``)."""
    import numpy as np

    q = np.asarray(q)
    if q.shape != tuple(spec.w_shape):
        raise ValueError(f"weights of shape {q.shape}, the kernel wants {tuple(spec.w_shape)}")
    extra = []
    if spec.dot_offset:
        extra = [(-spec.dot_offset * q.reshape(q.shape[0], -1).astype(np.int64).sum(axis=1)).astype(np.int32)]
    packed = pack_layout(spec, q)
    out = packed.astype(spec.q_dtype)
    if not np.array_equal(out.astype(np.int64), packed.astype(np.int64)):
        raise ValueError(f"weights do not fit {spec.q_dtype}")
    return [out] + extra


def pack_layout(spec: KernelSpec, a):
    """A per-weight array ``a`` [O, C/groups, KH, KW] (dense [O, K]) rearranged into the kernel's
    ``weight_layout`` (``spec.packed_weight_shape``; the vnni / dp4a padding holds zeros), dtype
    kept. ``pack_weights`` does this to ``q``; sampled intdot layers store their threshold, counts
    and weight code so (``KernelSpec.packed_encoding``)."""
    import numpy as np

    a = np.asarray(a)
    if a.shape != tuple(spec.w_shape):
        raise ValueError(f"weights of shape {a.shape}, the kernel wants {tuple(spec.w_shape)}")
    layout = spec.weight_layout
    if layout == "OHWI":
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1))
    if layout in ("vnni", "dp4a"):
        O, Cg, KH, KW = a.shape
        Op, Cp = spec.packed_outputs, spec.vnni_channels
        padded = np.zeros((Op, Cp, KH, KW), a.dtype)
        padded[:O, :Cg] = a
        return np.ascontiguousarray(padded.reshape(Op // 16, 16, Cp // 4, 4, KH, KW).transpose(0, 4, 5, 2, 1, 3))
    return np.ascontiguousarray(a)


def unpack_layout(spec: KernelSpec, packed):
    """The inverse of ``pack_layout``: [O, C/groups, KH, KW] (dense [O, K]) without the padding."""
    import numpy as np

    packed = np.asarray(packed)
    layout = spec.weight_layout
    if layout == "OHWI":
        return np.ascontiguousarray(packed.transpose(0, 3, 1, 2))
    if layout in ("vnni", "dp4a"):
        O, Cg, KH, KW = spec.w_shape
        full = packed.transpose(0, 4, 3, 5, 1, 2).reshape(spec.packed_outputs, spec.vnni_channels, KH, KW)
        return np.ascontiguousarray(full[:O, :Cg])
    return packed


def _weight_stage(spec: KernelSpec, counts, enc: _Encoding, n, layout: str | None = None):
    """intdot: ``q`` in ``layout`` (default: the kernel's ``weight_layout``; a placeholder when
    prepacked); shiftadd: the magnitude ``c = n*normal + counts``."""
    if spec.prepacked:
        return te.placeholder(spec.packed_weight_shape, spec.q_dtype, name="q")
    n32 = n.astype("int32")

    def q_value(*i):
        return _q_value(spec, counts, enc, n32, i)

    layout = layout or spec.weight_layout
    if spec.lowering != "intdot":
        return te.compute(
            spec.w_shape, lambda *i: enc.normal(i).astype("int32") * n32 + counts[i].astype("int32"), name="q"
        )
    if layout == "OHWI":
        return te.compute(spec.packed_weight_shape, lambda *p: q_value(*_source_index(spec, p)), name="q")
    if layout in ("vnni", "dp4a"):
        O, Cg = spec.w_shape[:2]

        def packed(*p):
            o, c, kh, kw = _source_index(spec, p)
            # channels past C (the round-up to 4) and outputs past O (dp4a's round-up to 16) are
            # zero weights
            inside = tirx.all(c < Cg, o < O) if spec.packed_outputs != O else c < Cg
            return tirx.if_then_else(inside, q_value(tirx.min(o, O - 1), tirx.min(c, Cg - 1), kh, kw),
                                     tirx.const(0, spec.q_dtype))

        return te.compute(spec.packed_weight_shape, packed, name="q")
    return te.compute(spec.w_shape, q_value, name="q")


def _wsum(spec: KernelSpec, q):
    """The offset correction of the packed int8 conv, ``wsum[o] = -dot_offset * sum q[o, ...]``
    (int32), from ``q`` in the vnni / dp4a layout (see ``_vnni_conv``)."""
    _, KH, KW, C4, _, _ = spec.packed_weight_shape
    rh, rw, rc, rk = (te.reduce_axis((0, e), name=f"s{i}") for i, e in enumerate((KH, KW, C4, 4)))
    return te.compute((spec.w_shape[0],), lambda o: te.sum(
        q[o // 16, rh, rw, rc, o % 16, rk].astype("int32") * tirx.const(-spec.dot_offset, "int32"),
        axis=[rh, rw, rc, rk]), name="wsum")


def psb_pack_kernel(spec: KernelSpec, name: str, draw: bool = False) -> tvm.tirx.PrimFunc:
    """``(counts, code, n) -> q`` (and ``wsum``): at run time, the weight arguments ``pack_weights``
    makes at compile time for a frozen module, so a module sampled at run time runs the same
    prepacked layer kernels (and can keep packed weights between calls). Every array is in the
    kernel's weight layout (``pack_layout``: counts, the one-byte ``code``, the threshold), so
    each ``q`` is computed where it is stored, walking all of them contiguously.

    ``draw=True`` (stratified sampler only): ``(threshold, code, n, seed) -> q``, the counts
    ``B(n)`` computed in place by the closed form instead of read from the sampler's output (one
    pass over the weights instead of two, no counts in memory).
    """
    if spec.lowering != "intdot":
        raise ValueError(f"packed weights need the intdot lowering, not {spec.lowering!r}")
    spec = dataclasses.replace(spec, prepacked=False, packed_encoding=True)
    shape = spec.packed_weight_shape
    enc = _Encoding(spec, None, None, None, code=True)
    n = tirx.Var("n", "int64")
    if draw:
        if spec.sampler != "stratified":
            raise ValueError("drawing in the pack kernel needs the stratified sampler's closed form")
        thr = te.placeholder(shape, spec.threshold_dtype, name="threshold")
        seed = tirx.Var("seed", "int64")

        class _Drawn:  # counts[p] = B_p(n), in closed form
            def __getitem__(self, p):
                return _stratified(spec, thr[p].astype("int32"), seed, _source_index(spec, p),
                                   lambda c: c(n).astype(COUNTS_DTYPE))

        counts, inputs = _Drawn(), [thr]
    else:
        counts = te.placeholder(shape, COUNTS_DTYPE, name="counts")
        inputs = [counts]
    n32 = n.astype("int32")
    # padding (channels past C, outputs past O) holds threshold, counts and code 0: q = 0 there
    q = te.compute(shape, lambda *p: _q_value(spec, counts, enc, n32, p), name="q")
    outputs = [q]
    if spec.dot_offset:
        outputs.append(_wsum(spec, q))
    params = inputs + enc.params + [n] + ([seed] if draw else []) + outputs
    func = te.create_prim_func(params)
    return func.with_attrs({"global_symbol": name, ATTR_KIND: "pack", ATTR_LAYOUT: spec.weight_layout,
                            "op_pattern": 8})


def _weight_params(spec: KernelSpec, q, counts, sign, normal, shift) -> list:
    """The weight arguments of a layer kernel: those of ``pack_weights`` when prepacked (``q`` and,
    for the packed int8 conv of offset activations, ``wsum``), else the draw and the encoding."""
    if not spec.prepacked:
        return [counts, sign, normal, shift]
    if spec.dot_offset:
        return [q, te.placeholder((spec.w_shape[0],), "int32", name="wsum")]
    return [q]


def _shiftadd_bits(spec: KernelSpec) -> int:
    """Bits of the largest magnitude ``2 * n_max``."""
    return (2 * spec.n_max).bit_length()


def _product(spec: KernelSpec, xv, qv, sign, shift, rb):
    """One term of the integer dot product, in the accumulator type.

    shiftadd multiplies by the magnitude ``c`` bit-serially: ``sum_b [bit b of c] * (x << (shift+b))``,
    then applies the sign by negation: shifts, adds and negation only.
    """
    acc = spec.acc_dtype
    if spec.lowering == "intdot":
        return xv.astype(acc) * qv.astype(acc)
    bit = (qv >> rb.astype("int32")) & tirx.const(1, "int32")
    mag = xv.astype(acc) << (shift.astype(acc) + rb.astype(acc))
    signed = tirx.Select(sign < tirx.const(0, "int8"), tirx.const(0, acc) - mag, mag)
    return tirx.Select(bit == 0, tirx.const(0, acc), signed)


def _layer_inputs(spec: KernelSpec):
    """Placeholders shared by the layer kernels: x, counts, sign, normal, shift, scale, bias."""
    O = spec.w_shape[0]
    return (
        te.placeholder(spec.x_shape, "float32", name="x"),
        te.placeholder(spec.w_shape, COUNTS_DTYPE, name="counts"),
        te.placeholder(spec.w_shape, "int8", name="sign"),
        te.placeholder(spec.w_shape, "int8", name="normal"),
        te.placeholder(spec.w_shape, "int8", name="shift"),
        te.placeholder((O,), "float32", name="scale"),
        te.placeholder((O,), "float32", name="bias"),
    )


def _padded(spec: KernelSpec, x):
    """``(b, c, h, w) ->`` the quantized activation of the zero-padded NCHW input."""
    _, _, H, W = spec.x_shape
    pt, pl, _, _ = spec.padding

    def value(b, c, h, w):
        # if_then_else, not Select: Select evaluates both sides and would read outside ``x``.
        inside = tirx.all(h >= pt, h < H + pt, w >= pl, w < W + pl)
        return tirx.if_then_else(inside, _quantize(spec, x[b, c, h - pt, w - pl]), tirx.const(0, spec.act_dtype))

    return value


def psb_layer_kernel(spec: KernelSpec, name: str, expose_acc: bool = False) -> tvm.tirx.PrimFunc:
    """``(x, counts, sign, normal, shift, scale, bias, n) -> out`` (and ``acc`` first if exposed).

    ``scale[o] = 2**(k_lo - f)``; the kernel multiplies by ``1/n`` (exact: a power of two).
    """
    if spec.lowering not in LOWERINGS:
        raise ValueError(f"unknown lowering {spec.lowering!r}; expected one of {LOWERINGS}")
    O = spec.w_shape[0]
    x, counts, sign, normal, shift, scale, bias = _layer_inputs(spec)
    n = tirx.Var("n", "int64")
    if spec.prepacked and spec.lowering != "intdot":
        raise ValueError(f"prepacked weights need the intdot lowering, not {spec.lowering!r}")
    if spec.lowering == "bitserial":
        return _bitserial_kernel(spec, name, expose_acc, [x, counts, sign, normal, shift, scale, bias, n])
    q = _weight_stage(spec, counts, _Encoding(spec, sign, normal, shift), n)
    params = [x, *_weight_params(spec, q, counts, sign, normal, shift), scale, bias, n]
    shiftadd = spec.lowering == "shiftadd"
    inv_n = tirx.const(1.0, "float32") / n.astype("float32")

    def finish(acc, o, *idx):
        return _activation(spec, acc[idx].astype("float32") * (scale[o] * inv_n) + bias[o])

    if spec.kind == "dense":
        M, K = spec.x_shape
        xq = te.compute((M, K), lambda m, k: _quantize(spec, x[m, k]), name="xq")
        rk = te.reduce_axis((0, K), name="rk")
        axes = [rk]
        rb = None
        if shiftadd:
            rb = te.reduce_axis((0, _shiftadd_bits(spec)), name="rb")
            axes = [rk, rb]
        acc = te.compute(
            (M, O),
            lambda m, o: te.sum(_product(spec, xq[m, rk], q[o, rk], sign[o, rk], shift[o, rk], rb), axis=axes),
            name="acc",
        )
        out = te.compute((M, O), lambda m, o: finish(acc, o, m, o), name="out")
    else:
        N, C, H, W = spec.x_shape
        _, Cg, KH, KW = spec.w_shape
        pt, pl, pb, pr = spec.padding
        sh, sw = spec.stride
        dh, dw = spec.dilation
        Og = O // spec.groups

        padded = _padded(spec, x)

        rc = te.reduce_axis((0, Cg), name="rc")
        rh = te.reduce_axis((0, KH), name="rh")
        rw = te.reduce_axis((0, KW), name="rw")
        if spec.vnni or spec.dp4a:
            return _vnni_conv(spec, name, expose_acc, params, q, padded, finish)
        if spec.channels_last:
            xq = te.compute((N, H + pt + pb, W + pl + pr, C), lambda b, h, w, c: padded(b, c, h, w), name="xq")

            def channels_last_term(b, y, xx, o):
                return te.sum(xq[b, y * sh + rh * dh, xx * sw + rw * dw, rc].astype(spec.acc_dtype)
                              * q[o, rh, rw, rc].astype(spec.acc_dtype), axis=[rh, rw, rc])

            if spec.gpu:  # acc[o, m] over flattened output pixels (see _flat_pixels)
                M, unflat, view = _flat_pixels(spec)
                acc = te.compute((O, M), lambda o, m: channels_last_term(*unflat(m), o), name="acc")
                true_acc = view(acc, lambda b, o, y, xx: (b, y, xx, o))
                layout = "gemm"
            else:
                acc = te.compute(spec.out_shape, lambda b, o, y, xx: channels_last_term(b, y, xx, o), name="acc")
                true_acc, layout = acc, "channels_last"
            out = te.compute(spec.out_shape, lambda b, o, y, xx: finish(true_acc, o, b, o, y, xx), name="out")
            outputs = [acc, out] if expose_acc and not spec.gpu else [out]
            if expose_acc and spec.gpu:
                outputs = [te.compute(spec.out_shape, lambda *i: true_acc[i], name="acc_nchw"), out]
            func = te.create_prim_func(params + outputs)
            return func.with_attrs({"global_symbol": name, ATTR_KIND: spec.kind, ATTR_LOWERING: spec.lowering,
                                    ATTR_LAYOUT: layout, "op_pattern": 8})
        axes = [rc, rh, rw]
        rb = None
        if shiftadd:
            rb = te.reduce_axis((0, _shiftadd_bits(spec)), name="rb")
            axes = [rc, rh, rw, rb]
        # xq rows padded to xq_row_width columns
        if sw > 1 and dw == 1:
            # Strided conv: columns split by phase, xq[b, c, h, p, j] = column s*j + p, so the
            # vectorized reads of consecutive output columns are contiguous (a stride-2 depthwise
            # conv spent most of its time in gathers).
            xq = te.compute((N, C, H + pt + pb, sw, xq_row_width(-(-(W + pl + pr) // sw))),
                            lambda b, c, h, ph, j: padded(b, c, h, j * sw + ph), name="xq")

            def x_at(b, c, h, xx, r):
                return xq[b, c, h, r % sw, xx + r // sw]
        else:
            xq = te.compute((N, C, H + pt + pb, xq_row_width(W + pl + pr)), padded, name="xq")

            def x_at(b, c, h, xx, r):
                return xq[b, c, h, xx * sw + r * dw]

        def term(b, o, y, xx):
            xv = x_at(b, (o // Og) * Cg + rc, y * sh + rh * dh, xx, rw)
            w = (o, rc, rh, rw)
            return _product(spec, xv, q[w], sign[w], shift[w], rb)

        acc = te.compute(spec.out_shape, lambda *i: te.sum(term(*i), axis=axes), name="acc")
        out = te.compute(spec.out_shape, lambda b, o, y, xx: finish(acc, o, b, o, y, xx), name="out")

    outputs = [acc, out] if expose_acc else [out]
    func = te.create_prim_func(params + outputs)
    return func.with_attrs(
        {
            "global_symbol": name,
            ATTR_KIND: spec.kind,
            ATTR_LOWERING: spec.lowering,
            "op_pattern": 8,  # kOpaque: keep Relax's FuseOps from merging (and unscheduling) it
        }
    )


#: GPU convs round their flattened pixel count up to a multiple of this (see _flat_pixels).
GPU_PIXEL_MULTIPLE = 16


def _flat_pixels(spec: KernelSpec):
    """GPU convs accumulate ``acc[o, m]`` over flattened output pixels ``m = (b*OH + y)*OW + x``:
    the GPU schedules tile ``m``, and a tile of ``m`` is a rectangle of ``acc`` only in this form;
    with ``m`` innermost the NCHW epilogue reads ``acc`` in runs of ``OH*OW`` (coalesced).
    ``m`` runs to a multiple of ``GPU_PIXEL_MULTIPLE`` (the extra rows repeat the last pixel and
    are never read), so tiles divide it and the tensorized block needs no bounds predicate.
    Returns ``(M, m -> (b, y, x), view)`` where ``view(acc, idx_map)`` reads ``acc`` by
    ``idx_map``'s (b, y, x, o) as if it were a 4-d tensor."""
    N, _, OH, OW = spec.out_shape
    M = N * OH * OW

    def unflat(m):
        m = tirx.min(m, M - 1)
        return m // (OH * OW), m // OW % OH, m % OW

    class _View:
        def __init__(self, acc, idx_map):
            self.acc, self.idx_map = acc, idx_map

        def __getitem__(self, idx):
            b, y, xx, o = self.idx_map(*idx)
            return self.acc[o, (b * OH + y) * OW + xx]

    return -(-M // GPU_PIXEL_MULTIPLE) * GPU_PIXEL_MULTIPLE, unflat, _View


def _vnni_conv(spec: KernelSpec, name, expose_acc, params, q, padded, finish):
    """Conv with the reduction blocked as (C/4, 4) and outputs as (O/16, 16): the shape of x86's
    ``vpdpbusd`` (see ``schedules/cpu/psb_conv2d.py``, which tensorizes it). ``C`` is rounded up
    to 4 with zero activations and zero weights.

    ``vpdpbusd`` multiplies unsigned by signed bytes. Signed (int8) activations are stored offset,
    ``x + 128`` as uint8, and the offset is taken back exactly per output channel:
    ``sum x*q = wsum + sum (x+128)*q``, ``wsum[o] = -128 * sum q[o, ...]`` (integers, no rounding;
    ``KernelSpec.vnni`` checks that the offset sums still fit int32). Padding becomes 128 as well,
    so the correction is the same at every output position. ``wsum`` is a block of the kernel, or
    a compile-time constant argument when the weights are prepacked.

    The GPU's ``dp4a`` layout is the same conv with signed bytes on both sides: unsigned
    activations are stored ``x - 128`` as int8 and ``wsum[o] = +128 * sum q[o, ...]``
    (``KernelSpec.dot_offset``); signed ones go in unchanged.
    """
    N, C, H, W = spec.x_shape
    O, Cg, KH, KW = spec.w_shape
    pt, pl, pb, pr = spec.padding
    sh, sw = spec.stride
    dh, dw = spec.dilation
    C4 = spec.vnni_channels
    offset = spec.dot_offset
    xq_dtype = "uint8" if spec.vnni else "int8"

    def xq_value(b, h, w, c):
        v = padded(b, tirx.min(c, C - 1) if C4 != C else c, h, w)
        if offset:
            v = (v.astype("int32") + offset).astype(xq_dtype)
        return tirx.if_then_else(c < C, v, tirx.const(0, xq_dtype)) if C4 != C else v

    xq = te.compute((N, H + pt + pb, W + pl + pr, C4), xq_value, name="xq")
    rh = te.reduce_axis((0, KH), name="rh")
    rw = te.reduce_axis((0, KW), name="rw")
    rc = te.reduce_axis((0, C4 // 4), name="rc")
    rk = te.reduce_axis((0, 4), name="rk")
    _, _, OH, OW = spec.out_shape

    def term(b, y, xx, o):
        return te.sum(xq[b, y * sh + rh * dh, xx * sw + rw * dw, rc * 4 + rk].astype("int32")
                      * q[o // 16, rh, rw, rc, o % 16, rk].astype("int32"), axis=[rh, rw, rc, rk])

    if spec.dp4a:  # acc[o, m] over flattened output pixels (see _flat_pixels)
        M, unflat, view = _flat_pixels(spec)
        # outputs padded to 16 (zero weights; the epilogue reads o < O only)
        acc = view(te.compute((spec.packed_outputs, M), lambda o, m: term(*unflat(m), o), name="acc"), lambda *i: i)
    else:  # acc[b, y, x, o]
        acc = te.compute((N, OH, OW, O), term, name="acc")
    true_acc = acc
    if offset:
        if spec.prepacked:  # a compile-time constant next to q (pack_weights)
            wsum = params[2]
        else:
            wsum = _wsum(spec, q)

        class _Corrected:  # acc[b, y, x, o] + wsum[o], read where the epilogue reads acc
            def __getitem__(self, idx):
                return acc[idx] + wsum[idx[3]]

        true_acc = _Corrected()
    out = te.compute(spec.out_shape, lambda b, o, y, xx: finish(true_acc, o, b, y, xx, o), name="out")
    outputs = [out]
    if expose_acc:  # the accumulators in the common NCHW layout, for tests
        outputs = [te.compute(spec.out_shape, lambda b, o, y, xx: true_acc[b, y, xx, o], name="acc_nchw"), out]
    func = te.create_prim_func(params + outputs)
    return func.with_attrs({"global_symbol": name, ATTR_KIND: spec.kind, ATTR_LOWERING: spec.lowering,
                            ATTR_LAYOUT: spec.weight_layout, "op_pattern": 8})


def _bitserial_kernel(spec: KernelSpec, name, expose_acc, params):
    """Bit-serial layer kernel: ``acc = sum_{s,e,b} (-1)^s * sign_b * 2^(e+b) * popcount(X_b & M_se)``.

    Weights are split into binary masks ``M_se`` (sign ``s``: 0 positive, 1 negative; level ``e``:
    bit ``e`` of ``|q|``), activations into two's-complement bit planes ``X_b`` (for signed
    activations the top plane counts ``-2^(B-1)``); the reduction over input channels is packed 32 to
    a ``uint32`` word (zero-padded to a whole word per group), so every term is an AND and a
    popcount. Exact for every run-time ``n <= n_max``: the level loop runs over the ``E + 1 + log2 n``
    levels that ``n`` can reach, so the cost grows with ``log2 n`` (it is meant for n = 1, 2).
    Sign-magnitude masks keep every partial sum within the bound that chose ``acc_dtype``.

    Stages: ``q`` (per-weight plane codes, channel-padded), ``wpack`` (weight masks), ``xq`` (quantized,
    padded activations), ``xpack`` (activation bit planes), ``acc``, ``out``.
    """
    x, counts, sign, normal, shift, scale, bias, n = params
    WB, wdt, acc_t = BITSERIAL_WORD, f"uint{BITSERIAL_WORD}", spec.acc_dtype
    xbits = tvm.DataType(spec.act_dtype).bits
    L = bitserial_levels(spec.E, spec.n_max)
    # levels reached at run time (n is a power of two: popcount(n - 1) = log2 n), capped by n_max
    levels = tirx.min(tirx.popcount(n - 1) + (spec.E + 1), tirx.const(L, "int64"))
    n32 = n.astype("int32")
    O = spec.w_shape[0]
    K = spec.w_shape[1]  # channels per group (conv) or input features (dense)
    words = (K + WB - 1) // WB
    inv_n = tirx.const(1.0, "float32") / n.astype("float32")

    code_t = "int32" if 2 * L <= 31 else "int64"

    def q_value(i):
        """The plane code of weight ``i``: ``|q|`` in bits ``[0, L)`` if ``q > 0``, in ``[L, 2L)`` if ``q < 0``."""
        mag = ((normal[i].astype("int32") * n32 + counts[i].astype("int32")) << shift[i].astype("int32")).astype(code_t)
        return tirx.Select(sign[i] < tirx.const(0, "int8"), mag << tirx.const(L, code_t), mag * sign[i].astype(code_t))

    def wbit(code, s, e):
        """Mask bit of sign ``s`` (0: positive, 1: negative) and level ``e`` of a weight's plane code."""
        return ((code >> (s * L + e).astype(code_t)) & tirx.const(1, code_t)).astype(wdt)

    def xbit(v, b):
        """Bit ``b`` of the two's-complement activation ``v`` (sign-extended for signed types)."""
        return ((v.astype("int32") >> b.astype("int32")) & 1).astype(wdt)

    def pack(bit_of):
        rj = te.reduce_axis((0, WB), name="rj")
        return te.sum(bit_of(rj) << rj.astype(wdt), axis=rj)

    top = xbits - 1 if spec.act_signed else -1

    def term(xw, ww, rs, re, rb):
        mag = tirx.popcount(xw & ww).astype(acc_t) << (re.astype(acc_t) + rb.astype(acc_t))
        neg = (rs == 1) if top < 0 else tirx.Select(rb == top, rs == 0, rs == 1)
        return tirx.Select(neg, tirx.const(0, acc_t) - mag, mag)

    rs = te.reduce_axis((0, 2), name="rs")
    re = te.reduce_axis((0, levels), name="re")
    rb = te.reduce_axis((0, xbits), name="rb")

    def finish(o, v):
        return _activation(spec, v.astype("float32") * (scale[o] * inv_n) + bias[o])

    if spec.kind == "dense":
        M = spec.x_shape[0]
        zero = tirx.const(0, spec.act_dtype)
        xq = te.compute((M, words * WB), lambda m, k: tirx.if_then_else(k < K, _quantize(spec, x[m, tirx.min(k, K - 1)]), zero),
                        name="xq")
        xpack = te.compute((M, words, xbits), lambda m, w, b: pack(lambda j: xbit(xq[m, w * WB + j], b)), name="xpack")
        # weights [K, O]: the packed masks are contiguous over outputs (vectorized)
        q = te.compute((words * WB, O), lambda k, o: tirx.if_then_else(k < K, q_value((o, tirx.min(k, K - 1))),
                                                                      tirx.const(0, code_t)), name="q")
        wpack = te.compute((words, 2, L, O), lambda w, s, e, o: pack(lambda j: wbit(q[w * WB + j, o], s, e)), name="wpack")
        rw = te.reduce_axis((0, words), name="rw")
        acc = te.compute(
            (M, O),
            lambda m, o: te.sum(term(xpack[m, rw, rb], wpack[rw, rs, re, o], rs, re, rb), axis=[rw, rs, re, rb]),
            name="acc",
        )
        out = te.compute((M, O), lambda m, o: finish(o, acc[m, o]), name="out")
    else:
        N, C, H, W = spec.x_shape
        _, Cg, KH, KW = spec.w_shape
        pt, pl, pb, pr = spec.padding
        sh, sw = spec.stride
        dh, dw = spec.dilation
        G = spec.groups
        Og = O // G
        Hp, Wp = H + pt + pb, W + pl + pr
        padded = _padded(spec, x)
        zero = tirx.const(0, spec.act_dtype)
        # activations [N, G, Hp, C/G padded, Wp]: planes contiguous over columns (vectorized)
        xq = te.compute(
            (N, G, Hp, words * WB, Wp),
            lambda b, g, h, c, w: tirx.if_then_else(c < Cg, padded(b, g * Cg + tirx.min(c, Cg - 1), h, w), zero),
            name="xq",
        )
        xpack = te.compute((N, G, Hp, words, xbits, Wp),
                           lambda b, g, h, wd, bit, w: pack(lambda j: xbit(xq[b, g, h, wd * WB + j, w], bit)),
                           name="xpack")
        q = te.compute((O, KH, KW, words * WB),
                       lambda o, kh, kw, c: tirx.if_then_else(c < Cg, q_value((o, tirx.min(c, Cg - 1), kh, kw)),
                                                              tirx.const(0, code_t)),
                       name="q")
        wpack = te.compute((O, KH, KW, words, 2, L),
                           lambda o, kh, kw, wd, s, e: pack(lambda j: wbit(q[o, kh, kw, wd * WB + j], s, e)),
                           name="wpack")
        rh = te.reduce_axis((0, KH), name="rh")
        rw = te.reduce_axis((0, KW), name="rw")
        rc = te.reduce_axis((0, words), name="rc")

        def conv_term(b, o, y, xx):
            xw = xpack[b, o // Og, y * sh + rh * dh, rc, rb, xx * sw + rw * dw]
            return term(xw, wpack[o, rh, rw, rc, rs, re], rs, re, rb)

        acc = te.compute(spec.out_shape, lambda *i: te.sum(conv_term(*i), axis=[rh, rw, rc, rs, re, rb]), name="acc")
        out = te.compute(spec.out_shape, lambda b, o, y, xx: finish(o, acc[b, o, y, xx]), name="out")

    outputs = [acc, out] if expose_acc else [out]
    func = te.create_prim_func([x, counts, sign, normal, shift, scale, bias, n] + outputs)
    return func.with_attrs({"global_symbol": name, ATTR_KIND: spec.kind, ATTR_LOWERING: "bitserial",
                            ATTR_LAYOUT: "bitserial", "op_pattern": 8})


def psb_masked_kernel(spec: KernelSpec, name: str) -> tvm.tirx.PrimFunc:
    """Attention variant: compute only listed output positions, copy ``low`` everywhere else.

    ``(x, counts, sign, normal, shift, scale, bias, low, pos, slot, n, m) -> out``. ``pos[k]`` is
    the k-th computed position (conv: ``(b, y, x)``; dense: ``(row, 0, 0)``), ``k < m`` (run-time:
    skipped positions cost nothing); ``slot[position] = k`` or -1. Computed positions are bit
    identical to the full kernel's.
    """
    if spec.lowering == "bitserial":  # same integers; the masked gathers use the intdot products
        spec = dataclasses.replace(spec, lowering="intdot")
    O = spec.w_shape[0]
    x, counts, sign, normal, shift, scale, bias = _layer_inputs(spec)
    low = te.placeholder(spec.out_shape, "float32", name="low")
    if spec.kind == "dense":
        positions = spec.out_shape[0]
        slot_shape = (positions,)
    else:
        N, _, OH, OW = spec.out_shape
        positions = N * OH * OW
        slot_shape = (N, OH, OW)
    pos = te.placeholder((positions, 3), "int32", name="pos")
    slot = te.placeholder(slot_shape, "int32", name="slot")
    n = tirx.Var("n", "int64")
    m = tirx.Var("m", "int64")
    if spec.packed_encoding:  # a run-time packed intdot layer: counts and code in its weight layout
        counts = te.placeholder(spec.packed_weight_shape, COUNTS_DTYPE, name="counts")
    enc = _Encoding(spec, sign, normal, shift, code=spec.packed_encoding,
                    index=lambda i: _packed_index(spec, i))
    stored = _Stored(spec, counts, spec.packed_encoding)
    q = _weight_stage(spec, stored, enc, n, layout="OI" if spec.kind == "dense" else "OIHW")
    inv_n = tirx.const(1.0, "float32") / n.astype("float32")
    rb = te.reduce_axis((0, _shiftadd_bits(spec)), name="rb") if spec.lowering == "shiftadd" else None

    if spec.kind == "dense":
        M, K = spec.x_shape
        xq = te.compute((M, K), lambda r, k: _quantize(spec, x[r, k]), name="xq")
        rk = te.reduce_axis((0, K), name="rk")
        axes = [rk] + ([rb] if rb is not None else [])
        acc = te.compute(
            (m, O),
            lambda k, o: te.sum(_product(spec, xq[pos[k, 0], rk], q[o, rk], enc.sign((o, rk)), enc.shift((o, rk)), rb),
                                axis=axes),
            name="acc",
        )

        def gather(r, o):
            return slot[r], (r, o)
    else:
        N, C, H, W = spec.x_shape
        _, Cg, KH, KW = spec.w_shape
        pt, pl, pb, pr = spec.padding
        sh, sw = spec.stride
        dh, dw = spec.dilation
        Og = O // spec.groups

        padded = _padded(spec, x)

        xq = te.compute((N, C, H + pt + pb, W + pl + pr), padded, name="xq")
        rc = te.reduce_axis((0, Cg), name="rc")
        rh = te.reduce_axis((0, KH), name="rh")
        rw = te.reduce_axis((0, KW), name="rw")
        axes = [rc, rh, rw] + ([rb] if rb is not None else [])

        def term(k, o):
            xv = xq[pos[k, 0], (o // Og) * Cg + rc, pos[k, 1] * sh + rh * dh, pos[k, 2] * sw + rw * dw]
            w = (o, rc, rh, rw)
            return _product(spec, xv, q[w], enc.sign(w), enc.shift(w), rb)

        acc = te.compute((m, O), lambda k, o: te.sum(term(k, o), axis=axes), name="acc")

        def gather(b, o, y, xx):
            return slot[b, y, xx], (b, o, y, xx)

    def blend(*idx):
        s, full = gather(*idx)
        o = idx[1]
        y = _activation(spec, acc[tirx.max(s, 0), o].astype("float32") * (scale[o] * inv_n) + bias[o])
        return tirx.if_then_else(s >= 0, y, low[full])

    out = te.compute(spec.out_shape, blend, name="out")
    func = te.create_prim_func([x, counts, *enc.params, scale, bias, low, pos, slot, n, m, out])
    return func.with_attrs({"global_symbol": name, ATTR_KIND: f"{spec.kind}_masked", ATTR_LOWERING: spec.lowering,
                            "op_pattern": 8})
