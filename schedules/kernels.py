"""TE definitions of the PSB kernels (DESIGN.md section 3), one PrimFunc per layer.

Every PSB PrimFunc has the same stages: ``q`` (sample the integer weights from the encoded
constants), ``xq`` (fixed-point activations, zero padded), ``acc`` (exact integer products) and
``out`` (float32 scale, bias, activation). ``psb.*`` attributes tell the schedule rules what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import te, tirx

from psb_tvm import numerics

from .hash import sample_bit

LOWERINGS = ("intdot", "shiftadd")


@dataclass(frozen=True)
class KernelSpec:
    """Everything that shapes one PSB kernel; two layers with equal specs share code except the key."""

    kind: str  # "conv2d" or "dense"
    lowering: str
    x_shape: tuple  # conv: (N, C, H, W); dense: (M, K)
    w_shape: tuple  # conv: (O, C/groups, KH, KW); dense: (O, K)
    n: int
    key: int  # numerics.layer_key(seed, layer)
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

    @property
    def reduction_size(self) -> int:
        size = 1
        for d in self.w_shape[1:]:
            size *= d
        return size

    @property
    def acc_dtype(self) -> str:
        bits = numerics.accumulator_bits(self.reduction_size, self.E, self.n, self.act_bits, self.act_signed)
        return f"int{bits}"

    @property
    def q_dtype(self) -> str:
        qmax = numerics.max_abs_q(self.E, self.n)
        return "int8" if qmax <= 127 else "int16" if qmax <= 32767 else "int32"

    @property
    def act_dtype(self) -> str:
        bits = 8 if self.act_bits <= 8 else 16 if self.act_bits <= 16 else 32
        return f"{'' if self.act_signed else 'u'}int{bits}"

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


def _flat_index(shape, idx):
    flat = idx[0]
    for dim, i in zip(shape[1:], idx[1:]):
        flat = flat * dim + i
    return flat


def _sample_stage(spec: KernelSpec, thr, sign, normal, shift):
    """intdot: ``q = s * (n*normal + B(n)) << shift``; shiftadd: planes ``normal + b_j`` in {0, 1, 2}."""
    if spec.lowering == "intdot":
        j = te.reduce_axis((0, spec.n), name="j")
        count = te.compute(
            spec.w_shape,
            lambda *i: te.sum(sample_bit(spec.key, _flat_index(spec.w_shape, i), j, thr[i], spec.P), axis=j),
            name="count",
        )
        return te.compute(
            spec.w_shape,
            lambda *i: (
                sign[i].astype("int32")
                * ((normal[i].astype("int32") * spec.n + count[i]) << shift[i].astype("int32"))
            ).astype(spec.q_dtype),
            name="q",
        )
    return te.compute(
        (spec.n,) + tuple(spec.w_shape),
        lambda j, *i: (
            normal[i].astype("int32") + sample_bit(spec.key, _flat_index(spec.w_shape, i), j, thr[i], spec.P)
        ).astype("int8"),
        name="q",
    )


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


def _product(spec: KernelSpec, xv, q, sign, shift, j=None):
    """One term of the integer dot product, in the accumulator type."""
    acc = spec.acc_dtype
    if spec.lowering == "intdot":
        return xv.astype(acc) * q.astype(acc)
    # shiftadd: planes c = normal + b_j in {0, 1, 2}; term = +-(x << (shift + c - 1)), no multiply.
    c = q.astype("int32")
    mag = xv.astype(acc) << (shift.astype(acc) + c.astype(acc) - tirx.const(1, acc))
    signed = tirx.Select(sign < tirx.const(0, "int8"), tirx.const(0, acc) - mag, mag)
    return tirx.Select(c == 0, tirx.const(0, acc), signed)


def psb_kernel(spec: KernelSpec, name: str, expose_acc: bool = False) -> tvm.tirx.PrimFunc:
    """Build the PSB PrimFunc ``(x, thr, sign, normal, shift, scale, bias) -> out`` (and ``acc``)."""
    if spec.lowering not in LOWERINGS:
        raise ValueError(f"unknown lowering {spec.lowering!r}; expected one of {LOWERINGS}")
    O = spec.w_shape[0]
    x = te.placeholder(spec.x_shape, "float32", name="x")
    thr = te.placeholder(spec.w_shape, "int32", name="threshold")
    sign = te.placeholder(spec.w_shape, "int8", name="sign")
    normal = te.placeholder(spec.w_shape, "int8", name="normal")
    shift = te.placeholder(spec.w_shape, "int8", name="shift")
    scale = te.placeholder((O,), "float32", name="scale")
    bias = te.placeholder((O,), "float32", name="bias")
    q = _sample_stage(spec, thr, sign, normal, shift)
    shiftadd = spec.lowering == "shiftadd"

    if spec.kind == "dense":
        M, K = spec.x_shape
        xq = te.compute((M, K), lambda m, k: _quantize(spec, x[m, k]), name="xq")
        rk = te.reduce_axis((0, K), name="rk")
        axes = [rk]
        if shiftadd:
            rj = te.reduce_axis((0, spec.n), name="rj")
            axes = [rj, rk]
            term = lambda m, o: _product(spec, xq[m, rk], q[rj, o, rk], sign[o, rk], shift[o, rk])
        else:
            term = lambda m, o: _product(spec, xq[m, rk], q[o, rk], None, None)
        acc = te.compute((M, O), lambda m, o: te.sum(term(m, o), axis=axes), name="acc")
        out = te.compute(
            (M, O), lambda m, o: _activation(spec, acc[m, o].astype("float32") * scale[o] + bias[o]), name="out"
        )
    else:
        N, C, H, W = spec.x_shape
        _, Cg, KH, KW = spec.w_shape
        pt, pl, pb, pr = spec.padding
        sh, sw = spec.stride
        dh, dw = spec.dilation
        Og = O // spec.groups

        def padded(b, c, h, w):
            # if_then_else, not Select: Select evaluates both sides and would read outside ``x``.
            inside = tirx.all(h >= pt, h < H + pt, w >= pl, w < W + pl)
            return tirx.if_then_else(inside, _quantize(spec, x[b, c, h - pt, w - pl]), tirx.const(0, spec.act_dtype))

        xq = te.compute((N, C, H + pt + pb, W + pl + pr), padded, name="xq")
        rc = te.reduce_axis((0, Cg), name="rc")
        rh = te.reduce_axis((0, KH), name="rh")
        rw = te.reduce_axis((0, KW), name="rw")

        def xval(b, o, y, xx):
            return xq[b, (o // Og) * Cg + rc, y * sh + rh * dh, xx * sw + rw * dw]

        if shiftadd:
            rj = te.reduce_axis((0, spec.n), name="rj")
            axes = [rj, rc, rh, rw]
            term = lambda b, o, y, xx: _product(
                spec, xval(b, o, y, xx), q[rj, o, rc, rh, rw], sign[o, rc, rh, rw], shift[o, rc, rh, rw]
            )
        else:
            axes = [rc, rh, rw]
            term = lambda b, o, y, xx: _product(spec, xval(b, o, y, xx), q[o, rc, rh, rw], None, None)
        acc = te.compute(spec.out_shape, lambda *i: te.sum(term(*i), axis=axes), name="acc")
        out = te.compute(
            spec.out_shape,
            lambda b, o, y, xx: _activation(spec, acc[b, o, y, xx].astype("float32") * scale[o] + bias[o]),
            name="out",
        )

    outputs = [acc, out] if expose_acc else [out]
    func = te.create_prim_func([x, thr, sign, normal, shift, scale, bias] + outputs)
    return func.with_attrs(
        {
            "global_symbol": name,
            "psb.kind": spec.kind,
            "psb.lowering": spec.lowering,
            "op_pattern": 8,  # kOpaque: keep Relax's FuseOps from merging (and unscheduling) it
        }
    )
