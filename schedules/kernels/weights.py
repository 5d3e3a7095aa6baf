"""The weight stage: integer weights ``q = s * (n*normal + counts) << shift`` from counts and the
encoding, and ``psb_pack_kernel`` (pack a draw into the kernel's layout, or draw and pack in one pass)."""

from __future__ import annotations

import dataclasses

import tvm
from tvm import te, tirx

from psb_tvm.abi import ATTR_KIND, ATTR_LAYOUT

from .layout import _source_index, _storage_shape
from .sample import _stratified
from .spec import COUNTS_DTYPE, PACKED_DOT_LAYOUTS, KernelSpec


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
    if layout in PACKED_DOT_LAYOUTS:
        O, Cg = spec.w_shape[:2]

        def packed(*p):
            o, c, *khw = _source_index(spec, p)
            # channels past C (the round-up to 4) and outputs past O (dp4a's round-up to 16) are
            # zero weights
            inside = tirx.all(c < Cg, o < O) if spec.packed_outputs != O else c < Cg
            return tirx.if_then_else(inside, q_value(tirx.min(o, O - 1), tirx.min(c, Cg - 1), *khw),
                                     tirx.const(0, spec.q_dtype))

        return te.compute(spec.packed_weight_shape, packed, name="q")
    return te.compute(spec.w_shape, q_value, name="q")


def _wsum(spec: KernelSpec, q):
    """The offset correction of the packed int8 conv, ``wsum[o] = -dot_offset * sum q[o, ...]``
    (int32), from ``q`` in the vnni / dp4a layout (see ``_vnni_conv``)."""
    _, KH, KW, C4, _, depth = spec.packed_weight_shape
    rh, rw, rc, rk = (te.reduce_axis((0, e), name=f"s{i}") for i, e in enumerate((KH, KW, C4, depth)))
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
