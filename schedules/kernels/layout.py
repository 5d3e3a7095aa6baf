"""The kernels' weight layouts: per-weight arrays rearranged into the kernel's storage
(``pack_layout`` / ``unpack_layout`` in numpy, ``_source_index`` / ``_packed_index`` in TIR) and the
prepacked weight arguments (``pack_weights``)."""

from __future__ import annotations

from .spec import KernelSpec


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
    if spec.packed_dot:
        ob, kh, kw, c4, oi, ci = p
        o, c = ob * 16 + oi, c4 * spec.dot_depth + ci
        return (o, c) if spec.kind == "dense" else (o, c, kh, kw)
    return tuple(p)


def _packed_index(spec: KernelSpec, i) -> tuple:
    """Where the weight ``i = (o, c[, kh, kw])`` sits in ``spec.packed_weight_shape``."""
    layout = spec.weight_layout
    if layout == "OHWI":
        o, c, kh, kw = i
        return (o, kh, kw, c)
    if spec.packed_dot:
        o, c, kh, kw = i if len(i) == 4 else (*i, 0, 0)  # (dense weights: a 1x1 conv's)
        d = spec.dot_depth
        return (o // 16, kh, kw, c // d, o % 16, c % d)
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
    if spec.packed_dot:
        O, Cg, KH, KW = spec.conv_w_shape
        a = a.reshape(O, Cg, KH, KW)
        Op, Cp, d = spec.packed_outputs, spec.vnni_channels, spec.dot_depth
        padded = np.zeros((Op, Cp, KH, KW), a.dtype)
        padded[:O, :Cg] = a
        return np.ascontiguousarray(padded.reshape(Op // 16, 16, Cp // d, d, KH, KW).transpose(0, 4, 5, 2, 1, 3))
    return np.ascontiguousarray(a)


def unpack_layout(spec: KernelSpec, packed):
    """The inverse of ``pack_layout``: [O, C/groups, KH, KW] (dense [O, K]) without the padding."""
    import numpy as np

    packed = np.asarray(packed)
    layout = spec.weight_layout
    if layout == "OHWI":
        return np.ascontiguousarray(packed.transpose(0, 3, 1, 2))
    if spec.packed_dot:
        O, Cg, KH, KW = spec.conv_w_shape
        full = packed.transpose(0, 4, 3, 5, 1, 2).reshape(spec.packed_outputs, spec.vnni_channels, KH, KW)
        return np.ascontiguousarray(full[:O, :Cg].reshape(spec.w_shape))
    return packed
