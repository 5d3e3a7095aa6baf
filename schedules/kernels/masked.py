"""``psb_masked_kernel``: a layer computing only listed output positions (computational
attention), copying a low-n result elsewhere."""

from __future__ import annotations

import dataclasses

import tvm
from tvm import te, tirx

from psb_tvm.abi import ATTR_KIND, ATTR_LOWERING

from .layer import _activation, _layer_inputs, _padded, _product, _quantize, _shiftadd_bits
from .layout import _packed_index, _Stored
from .spec import COUNTS_DTYPE, KernelSpec
from .weights import _Encoding, _weight_stage


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
