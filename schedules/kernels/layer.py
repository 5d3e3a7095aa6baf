"""``psb_layer_kernel``: from the weights (or counts) and a run-time ``n``, the fixed-point
activations ``xq``, the exact integer products ``acc`` and the float32 output ``out`` (scale, bias,
activation), per lowering (intdot, its VNNI / dp4a layouts, shiftadd, bitserial)."""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import te, tirx

from psb_tvm import numerics
from psb_tvm.abi import ATTR_KIND, ATTR_LAYOUT, ATTR_LOWERING, ATTR_SPEC

from .spec import (
    BITSERIAL_WORD,
    COUNTS_DTYPE,
    DW_TAPS,
    GPU_PIXEL_MULTIPLE,
    LOWERINGS,
    RESIDUALS,
    Handoff,
    KernelSpec,
    bitserial_levels,
    xq_row_width,
)
from .weights import _Encoding, _weight_params, _weight_stage, _wsum


def _quantize(spec: KernelSpec | Handoff, value, bounds=(None, None), scaled=False):
    """``clip(rint(x * 2**f), lo, hi)``; ``nearbyint`` rounds half to even like ``np.rint``.
    ``bounds``: what ``x`` is known to lie within (None: unbounded); a clip that cannot act is
    left out (a ReLU6 output times 2**4 is at most 96: uint8's 255 is never reached).
    ``scaled``: ``value`` is ``x * 2**f`` already."""
    lo, hi = numerics.act_range(spec.act_bits, spec.act_signed)
    scale = 2.0**spec.frac_bits
    v = tirx.nearbyint(value if scaled else value * tirx.const(scale, "float32"))
    if bounds[1] is None or bounds[1] * scale > hi:
        v = tirx.min(v, tirx.const(hi, "float32"))
    if bounds[0] is None or bounds[0] * scale < lo:
        v = tirx.max(v, tirx.const(lo, "float32"))
    return v.astype(spec.act_dtype)


def _activation_bounds(spec: KernelSpec, times: float = 1.0) -> tuple:
    """``(lo, hi)`` the fused activation clips to (None: no bound), as its float32 constants times
    ``times`` (a power of two: exact)."""
    act = spec.activation
    if act is None:
        return (None, None)
    if act == "relu":
        return (0.0, None)
    return tuple(float(np.float32(b) * np.float32(times)) for b in act[1:])


def _output_bounds(spec: KernelSpec) -> tuple:
    """The range the float output is known to lie in: its fused activation's (the epilogue's
    ``finish``), unbounded where a residual is added after it."""
    return (None, None) if spec.residual else _activation_bounds(spec)


def _activation(spec: KernelSpec, y, times: float = 1.0):
    """The fused activation of ``y``, or of ``y * times`` given that (``times`` a power of two:
    the clip's bounds times it)."""
    lo, hi = _activation_bounds(spec, times)
    if hi is not None:
        y = tirx.min(y, tirx.const(hi, "float32"))
    return y if lo is None else tirx.max(y, tirx.const(lo, "float32"))


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
        te.placeholder(spec.x_storage_shape, spec.handoff.dtype if spec.x_handoff else "float32", name="x"),
        te.placeholder(spec.w_shape, COUNTS_DTYPE, name="counts"),
        te.placeholder(spec.w_shape, "int8", name="sign"),
        te.placeholder(spec.w_shape, "int8", name="normal"),
        te.placeholder(spec.w_shape, "int8", name="shift"),
        te.placeholder((O,), "float32", name="scale"),
        te.placeholder((O,), "float32", name="bias"),
    )


def _padded(spec: KernelSpec, x):
    """``(b, c, h, w) ->`` the quantized activation of the zero-padded NCHW input (stored NHWC
    where ``x_nhwc``)."""
    _, _, H, W = spec.x_shape
    pt, pl, _, _ = spec.padding

    def value(b, c, h, w):
        # if_then_else, not Select: Select evaluates both sides and would read outside ``x``.
        inside = tirx.all(h >= pt, h < H + pt, w >= pl, w < W + pl)
        v = x[b, h - pt, w - pl, c] if spec.x_nhwc else x[b, c, h - pt, w - pl]
        return tirx.if_then_else(inside, _quantize(spec, v), tirx.const(0, spec.act_dtype))

    return value


def psb_layer_kernel(spec: KernelSpec, name: str, expose_acc: bool = False) -> tvm.tirx.PrimFunc:
    """``(x, counts, sign, normal, shift, scale, bias, n) -> out`` (and ``acc`` first if exposed).

    ``scale[o] = 2**(k_lo - f)``; the kernel multiplies by ``1/n`` (exact: a power of two). The
    PrimFunc carries its spec (``psb.spec``, JSON), so later passes can make its variants.
    """
    # (the layer id only picks the sample stream, which layer kernels do not read: identical layers
    # keep identical kernels, one tuning task)
    return _layer_kernel(spec, name, expose_acc).with_attr(ATTR_SPEC, dataclasses.replace(spec, layer=0).to_json())


def _layer_kernel(spec: KernelSpec, name: str, expose_acc: bool) -> tvm.tirx.PrimFunc:
    if spec.lowering not in LOWERINGS:
        raise ValueError(f"unknown lowering {spec.lowering!r}; expected one of {LOWERINGS}")
    O = spec.w_shape[0]
    x, counts, sign, normal, shift, scale, bias = _layer_inputs(spec)
    n = tirx.Var("n", "int64")
    if spec.prepacked and spec.lowering != "intdot":
        raise ValueError(f"prepacked weights need the intdot lowering, not {spec.lowering!r}")
    handoff = spec.x_handoff or spec.out_handoff is not None
    if handoff and not spec.handoff_capable:
        raise ValueError("integer hand-off is between 8-bit vnni and depthwise convs with prepacked weights only")
    if spec.residual not in RESIDUALS or (spec.residual and (spec.out_handoff is not None or spec.lowering == "bitserial")):
        raise ValueError(f"residual {spec.residual!r}: one of {RESIDUALS}, on a float output of a non-bitserial kernel")
    if (spec.x_nhwc or spec.out_nhwc or spec.res_nhwc) and not spec.packed_cpu_conv:
        raise ValueError("channels-last float activations are for packed CPU convs (vnni, vnni16) only")
    if (spec.x_nhwc and spec.x_handoff) or (spec.out_nhwc and spec.out_handoff is not None):
        raise ValueError("a channels-last float input / output cannot be an integer hand-off too")
    if spec.lowering == "bitserial":
        return _bitserial_kernel(spec, name, expose_acc, [x, counts, sign, normal, shift, scale, bias, n])
    q = _weight_stage(spec, counts, _Encoding(spec, sign, normal, shift), n)
    # the residual operand (passes/fuse_residual_add.py): the float tensor added to the output
    res_shape = tuple(spec.out_shape[i] for i in (0, 2, 3, 1)) if spec.res_nhwc else spec.out_shape
    res = [te.placeholder(res_shape, "float32", name="res")] if spec.residual else []
    params = [x, *_weight_params(spec, q, counts, sign, normal, shift), scale, bias, *res, n]
    shiftadd = spec.lowering == "shiftadd"
    inv_n = tirx.const(1.0, "float32") / n.astype("float32")

    def finish(acc, at, *idx, times: float = 1.0):
        """The float32 output at ``at`` (NCHW, or [M, O]) from the accumulator at ``idx``: scale,
        bias and the fused activation; then, where a residual add is fused, ``+ res[at]`` and its
        ReLU (the same float32 operations the graph's add and relu do). ``times`` (a power of
        two, no residual): the output times it, folded into the scale, the bias and the
        activation's bounds; every step scales exactly, so the same float times ``times``."""
        o = at[1]
        if times != 1.0:
            assert not spec.residual
            k = tirx.const(times, "float32")
            return _activation(spec, acc[idx].astype("float32") * (scale[o] * inv_n * k) + bias[o] * k, times)
        y = _activation(spec, acc[idx].astype("float32") * (scale[o] * inv_n) + bias[o])
        if not spec.residual:
            return y
        y = y + res[0][(at[0], at[2], at[3], at[1]) if spec.res_nhwc else at]
        return tirx.max(y, tirx.const(0.0, "float32")) if spec.residual == "add_relu" else y

    if spec.packed_dot:  # (a dense layer as a 1x1 conv over its rows, see _vnni_conv)
        return _vnni_conv(spec, name, expose_acc, params, q, None if spec.kind == "dense" else _padded(spec, x), finish)
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
        out = te.compute((M, O), lambda m, o: finish(acc, (m, o), m, o), name="out")
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
        if handoff:  # a depthwise conv next to a vnni one: channels-last, like its neighbours
            if spec.out_handoff is not None and spec.out_handoff.channels != O:
                raise ValueError(f"a depthwise conv computes its {O} channels only, not the consumer's "
                                 f"{spec.out_handoff.channels} (see can_hand_off)")
            return _depthwise_nhwc(spec, name, expose_acc, params, q, padded, finish)
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
            out = te.compute(spec.out_shape, lambda b, o, y, xx: finish(true_acc, (b, o, y, xx), b, o, y, xx), name="out")
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
        out = te.compute(spec.out_shape, lambda b, o, y, xx: finish(acc, (b, o, y, xx), b, o, y, xx), name="out")

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


def stem_activation_stages(spec: KernelSpec, value, dtype: str):
    """``xq[b, h, w, c]`` (``vnni_channels`` wide, zeros past ``C``) of a stem
    (``KernelSpec.stem_planes``) from ``value(b, c, h, w)``, the padded activation in ``dtype``:
    the planes first (``xp``, contiguous rows), then interleaved into pixels with the channel loop
    unrolled, which LLVM turns into shuffles. One stage doing both (gathers from C planes per
    pixel, padding tests per byte) ran scalar: 0.034 ms against 0.008 for MobileNetV2's 3 x 224 x
    224 input on Zen 5."""
    N, C, H, W = spec.x_shape
    pt, pl, pb, pr = spec.padding
    xp = te.compute((N, C, H + pt + pb, W + pl + pr), value, name="xp")
    return te.compute((N, H + pt + pb, W + pl + pr, spec.vnni_channels), lambda b, h, w, c: tirx.if_then_else(
        c < C, xp[b, tirx.min(c, C - 1), h, w], tirx.const(0, dtype)), name="xq")


def blocked_activation_stage(spec: KernelSpec, value, rows: int, cols: int):
    """``xq[b, c / d, h, w, c % d]`` (``d = dot_depth``) of a conv with
    ``KernelSpec.blocked_activations``, from ``value(b, c, h, w)`` over its ``vnni_channels``
    channels: ``d`` planes interleaved into contiguous rows of ``cols`` pixels."""
    d = spec.dot_depth
    return te.compute((spec.x_shape[0], spec.vnni_channels // d, rows, cols, d),
                      lambda b, g, h, w, k: value(b, g * d + k, h, w), name="xq")


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

    The ``vnni16`` layout (int16 weights) blocks the reduction as (C/2, 2) int16 words for
    ``vpdpwssd`` (signed x signed: no offset). Its activations are int16 words. Where their sums
    might not fit int32 (``acc_dtype`` int64), signed 16-bit ones are summed in int32 over chunks
    of ``vnni16_chunk`` channel pairs, ``acc[b, y, x, chunk, o]``, added up exactly in int64
    (``wide``) after each chunk; unsigned 16-bit ones go in as two base-256 digit planes
    (``act_digits``), ``lo = x & 255`` and ``hi = x >> 8`` (``x = lo + 256 * hi``), stored
    ``xq[b, h, w, digit * C2 + c]``, each with its own int32 accumulators ``acc[b, y, x, digit,
    o]``, combined exactly as ``wide = acc_lo + (acc_hi << 8)``. ``KernelSpec.vnni16`` checks that
    no int32 sum can wrap. A dense layer takes this path as a 1x1 conv: ``x [M, K]`` is a
    1 x K x 1 x M input, its output ``[M, O]``.
    """
    dense = spec.kind == "dense"
    O, Cg, KH, KW = spec.conv_w_shape  # (a dense layer's: 1x1)
    if dense:  # x [M, K] read as a 1 x K x 1 x M NCHW input
        (M, C), H, W, N = spec.x_shape, 1, spec.x_shape[0], 1
    else:
        N, C, H, W = spec.x_shape
    pt, pl, pb, pr = spec.padding
    sh, sw = spec.stride
    dh, dw = spec.dilation
    C4 = spec.vnni_channels
    depth = spec.dot_depth
    digits = spec.act_digits if spec.vnni16 else 1
    offset = spec.dot_offset
    xq_dtype = "int16" if spec.vnni16 else "uint8" if spec.vnni else "int8"

    x = params[0]
    if dense:
        def padded(b, c, h, w):
            return _quantize(spec, x[w, c])

    def digit_of(v, d):
        """Base-256 digit ``d`` of the activation ``v`` (vnni16 with 16-bit activations)."""
        v = v.astype("int32")
        return (v & tirx.const(255, "int32") if d == 0 else v >> tirx.const(8, "int32")).astype(xq_dtype)

    def xq_value(b, h, w, cd):
        if spec.x_handoff:  # the producer stored xq's interior already (see _handoff_out); pad it
            inside = tirx.all(h >= pt, h < H + pt, w >= pl, w < W + pl)
            return tirx.if_then_else(inside, x[b, h - pt, w - pl, cd], tirx.const(offset, xq_dtype))
        d, c = (cd // C4, cd % C4) if digits > 1 else (None, cd)
        v = padded(b, tirx.min(c, C - 1) if C4 != C else c, h, w)
        if offset:
            v = (v.astype("int32") + offset).astype(xq_dtype)
        elif digits > 1:  # two digit planes: the digit of this plane
            v = tirx.Select(d == 0, digit_of(v, 0), digit_of(v, 1))
        else:
            v = v.astype(xq_dtype)
        return tirx.if_then_else(c < C, v, tirx.const(0, xq_dtype)) if C4 != C else v

    OH, OW = (1, M) if dense else spec.out_shape[2:]
    XH, XW, at = H + pt + pb, W + pl + pr, lambda y, xx: (y, xx)
    if spec.strided_pointwise:
        # only the pixels the conv reads, (y * sh, x * sw): a quarter of the input of ResNet's
        # downsample convs. Measured on Zen 5 (int8 preset, prepacked, 2 threads): ResNet-18's
        # three went 0.053 / 0.029 / 0.021 -> 0.027 / 0.016 / 0.016 ms
        XH, XW, at = OH, OW, lambda y, xx, sh=sh, sw=sw: (y * sh, xx * sw)
        sh = sw = 1
    if spec.stem_planes:
        xq = stem_activation_stages(spec, lambda b, c, h, w: xq_value(b, h, w, c), xq_dtype)
    elif spec.blocked_activations:
        xq = blocked_activation_stage(spec, lambda b, c, h, w: xq_value(b, *at(h, w), c), XH, XW)
    else:
        xq = te.compute((N, XH, XW, digits * C4), lambda b, h, w, cd: xq_value(b, *at(h, w), cd), name="xq")

    def x_at(b, h, w, d, pair, k):
        """``xq`` at channel ``d * C4 + pair * depth + k`` (digit plane, channel block, lane)."""
        return xq[b, pair, h, w, k] if spec.blocked_activations else xq[b, h, w, d * C4 + pair * depth + k]
    rh = te.reduce_axis((0, KH), name="rh")
    rw = te.reduce_axis((0, KW), name="rw")
    rc = te.reduce_axis((0, C4 // depth), name="rc")
    rk = te.reduce_axis((0, depth), name="rk")

    def dot(b, y, xx, o, d, pair, axis):
        """The int32 sum over ``axis`` of activation x weight products at channel pair ``pair``."""
        return te.sum(x_at(b, y * sh + rh * dh, xx * sw + rw * dw, d, pair, rk).astype("int32")
                      * q[o // 16, rh, rw, pair, o % 16, rk].astype("int32"), axis=axis)

    def term(b, y, xx, o, d=0):
        return dot(b, y, xx, o, d, rc, [rh, rw, rc, rk])

    if spec.dp4a:  # acc[o, m] over flattened output pixels (see _flat_pixels)
        M, unflat, view = _flat_pixels(spec)
        # outputs padded to 16 (zero weights; the epilogue reads o < O only)
        acc = view(te.compute((spec.packed_outputs, M), lambda o, m: term(*unflat(m), o), name="acc"), lambda *i: i)
    elif spec.vnni16 and spec.vnni16_chunk:  # int32 partial sums acc[b, y, x, chunk, o], added in int64
        R = spec.vnni16_chunk
        rr = te.reduce_axis((0, R), name="rr")
        part = te.compute((N, OH, OW, C4 // depth // R, spec.packed_outputs),
                          lambda b, y, xx, ch, o: dot(b, y, xx, o, 0, ch * R + rr, [rh, rw, rr, rk]), name="acc")
        rch = te.reduce_axis((0, C4 // depth // R), name="rch")
        acc = te.compute((N, OH, OW, spec.packed_outputs), lambda b, y, xx, o: te.sum(
            part[b, y, xx, rch, o].astype(spec.acc_dtype), axis=[rch]), name="wide")
    elif digits > 1:  # vnni16, 16-bit activations: acc[b, y, x, digit, o], then combined (``wide``)
        digit_acc = te.compute((N, OH, OW, digits, spec.packed_outputs),
                               lambda b, y, xx, d, o: term(b, y, xx, o, d), name="acc")
        rd = te.reduce_axis((0, digits), name="rd")
        wide = spec.acc_dtype
        # (a reduction over the digits, not a sum of reads at constant digits: the schedule places
        # this stage per tile, and reverse_compute_at cannot follow a constant index)
        acc = te.compute((N, OH, OW, spec.packed_outputs), lambda b, y, xx, o: te.sum(
            digit_acc[b, y, xx, rd, o].astype(wide) << (rd * 8).astype(wide), axis=[rd]), name="wide")
    else:  # acc[b, y, x, o], outputs padded to 16 (zero weights; the epilogue reads o < O only)
        acc = te.compute((N, OH, OW, spec.packed_outputs), lambda b, y, xx, o: term(b, y, xx, o), name="acc")
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
    if spec.out_handoff is not None:
        out = _handoff_out(spec, true_acc, finish)
    elif dense:
        out = te.compute(spec.out_shape, lambda m, o: finish(true_acc, (m, o), 0, 0, m, o), name="out")
    elif spec.out_nhwc:
        out = te.compute(spec.out_storage_shape, lambda b, y, xx, o: finish(true_acc, (b, o, y, xx), b, y, xx, o),
                         name="out")
    else:
        out = te.compute(spec.out_shape, lambda b, o, y, xx: finish(true_acc, (b, o, y, xx), b, y, xx, o), name="out")
    outputs = [out]
    if expose_acc and dense:
        outputs = [te.compute(spec.out_shape, lambda m, o: true_acc[0, 0, m, o], name="acc_nchw"), out]
    elif expose_acc:  # the accumulators in the common NCHW layout, for tests
        outputs = [te.compute(spec.out_shape, lambda b, o, y, xx: true_acc[b, y, xx, o], name="acc_nchw"), out]
    func = te.create_prim_func(params + outputs)
    return func.with_attrs({"global_symbol": name, ATTR_KIND: spec.kind, ATTR_LOWERING: spec.lowering,
                            ATTR_LAYOUT: spec.weight_layout, "op_pattern": 8})


def _depthwise_nhwc(spec: KernelSpec, name, expose_acc, params, q, padded, finish):
    """Depthwise conv with activations channels-last, for the integer hand-off: ``xq[b, h, w, c]``
    (the producer's integer activations padded, or the float input quantized), ``acc[b, y, x, c]``
    summed over the taps with lanes over channels, and the epilogue (float NCHW, or the next
    conv's activations). Weights stay prepacked OIHW ``[C, 1, KH, KW]``; with ``dw_tap_groups``
    the taps are summed ``DW_TAPS`` kernel columns per dot product."""
    N, C, H, W = spec.x_shape
    _, _, KH, KW = spec.w_shape
    pt, pl, pb, pr = spec.padding
    sh, sw = spec.stride
    dh, dw = spec.dilation
    _, _, OH, OW = spec.out_shape
    if spec.x_handoff:
        x = params[0]

        def xq_value(b, h, w, c):
            inside = tirx.all(h >= pt, h < H + pt, w >= pl, w < W + pl)
            return tirx.if_then_else(inside, x[b, h - pt, w - pl, c], tirx.const(0, x.dtype))
    else:
        def xq_value(b, h, w, c):
            return padded(b, c, h, w)

    G = spec.dw_tap_groups
    rh = te.reduce_axis((0, KH), name="rh")
    if G:
        # DW_TAPS kernel columns per dot product. xq[b, h, c / 16, w, c % 16] (channels in blocks
        # of 16, each block's row contiguous): the 4 columns of one step are 64 contiguous bytes
        # (one load, interleaved to 4 bytes per channel in a register: the dot product's
        # operand), with zero columns past the padding for the groups' unused last taps;
        # qt[kh, g, c, k] the weight of tap column g * DW_TAPS + k (0 past KW). 16 channels of
        # one output pixel then take one vpdpbusd per (kh, g): 3 for a 3x3 conv.
        # (dw_pixel_pairs: output pixels 2p and 2p + 1 read the same step, columns 2p .. 2p + 3,
        # the second with its weights one column on)
        J = 2 if spec.dw_pixel_pairs else 1
        cols = max(W + pl + pr, ((OW - 1) // J) * J * sw + G * DW_TAPS)
        xq = te.compute((N, H + pt + pb, C // 16, cols, 16),
                        lambda b, h, cb, w, ci: xq_value(b, h, w, cb * 16 + ci), name="xq")

        def tap_weight(j, kh, g, c, k):
            kw = g * DW_TAPS + k - j
            return tirx.if_then_else(tirx.all(kw >= 0, kw < KW), q[c, 0, kh, tirx.max(tirx.min(kw, KW - 1), 0)],
                                     tirx.const(0, q.dtype))

        qt = te.compute((J, KH, G, C, DW_TAPS), tap_weight, name="qt")
        rg = te.reduce_axis((0, G), name="rg")
        rk = te.reduce_axis((0, DW_TAPS), name="rk")
        acc = te.compute((N, OH, OW, C), lambda b, y, xx, c: te.sum(
            xq[b, y * sh + rh * dh, c // 16, (xx // J) * J * sw + rg * DW_TAPS + rk, c % 16].astype("int32")
            * qt[xx % J, rh, rg, c, rk].astype("int32"), axis=[rh, rg, rk]), name="acc")
    else:
        xq = te.compute((N, H + pt + pb, W + pl + pr, C), xq_value, name="xq")
        # the taps' weights channels-last (9 x C bytes per call), so the lanes over channels load them
        qt = te.compute((KH, KW, C), lambda kh, kw, c: q[c, 0, kh, kw], name="qt")
        rw = te.reduce_axis((0, KW), name="rw")
        acc = te.compute((N, OH, OW, C), lambda b, y, xx, c: te.sum(
            xq[b, y * sh + rh * dh, xx * sw + rw * dw, c].astype(spec.acc_dtype) * qt[rh, rw, c].astype(spec.acc_dtype),
            axis=[rh, rw]), name="acc")
    if spec.out_handoff is not None:
        out = _handoff_out(spec, acc, finish)
    else:
        out = te.compute(spec.out_shape, lambda b, o, y, xx: finish(acc, (b, o, y, xx), b, y, xx, o), name="out")
    outputs = [out]
    if expose_acc:
        outputs = [te.compute(spec.out_shape, lambda b, o, y, xx: acc[b, y, xx, o], name="acc_nchw"), out]
    func = te.create_prim_func(params + outputs)
    return func.with_attrs({"global_symbol": name, ATTR_KIND: spec.kind, ATTR_LOWERING: spec.lowering,
                            ATTR_LAYOUT: "dw_nhwc", "op_pattern": 8})


def _handoff_out(spec: KernelSpec, acc, finish):
    """The consumer's activations from this conv's float output: ``finish`` (the float32 output,
    as the float form computes it) then the consumer's quantization and offset, NHWC. The consumer
    would compute exactly this from the float tensor, so the hand-off changes no bit. Channels past
    ``O`` (the consumer's padding to 4) hold the offset: zero activations, met by zero weights."""
    h = spec.out_handoff
    N, O, OH, OW = spec.out_shape

    def value(b, y, xx, c):
        ch = tirx.min(c, O - 1) if h.channels != O else c  # (the padding channels read channel O - 1, unused)
        # (the output times 2**f straight from the epilogue: one multiply less per value)
        v = _quantize(h, finish(acc, (b, ch, y, xx), b, y, xx, ch, times=2.0**h.frac_bits), _output_bounds(spec),
                      scaled=True)
        if h.offset:
            v = (v.astype("int32") + h.offset).astype(h.dtype)
        v = v.astype(h.dtype)
        return tirx.if_then_else(c < O, v, tirx.const(h.offset, h.dtype)) if h.channels != O else v

    return te.compute((N, OH, OW, h.channels), value, name="out")


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
