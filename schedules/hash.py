"""The PSB sample streams in TIR: the same integers as ``psb_tvm.numerics`` (``sample_hash`` for the
i.i.d. stream, ``sample_offset`` / ``stratified_count`` for the stratified one)."""

from __future__ import annotations

from tvm import tirx

from psb_tvm.numerics import GOLDEN, MIX_C1, MIX_C2


def _u32(v: int) -> tirx.PrimExpr:
    return tirx.const(v, "uint32")


def _mul(x: tirx.PrimExpr, c: int) -> tirx.PrimExpr:
    """``x * c mod 2**32`` for a uint32 ``x`` and a 32-bit constant ``c``.

    TVM's LLVM backend emits uint32 ``*`` as ``mul nuw``: a wrapping product is undefined behaviour
    (apache/tvm#12383), and LLVM folds the hash to a constant when it can prove the overflow (e.g.
    after loop fusion bounds the index). The exact product of two 32-bit values fits uint64, so
    multiply there and keep the low 32 bits.
    """
    wide = x.astype("uint64") * tirx.const(c, "uint64")
    return (wide & tirx.const(0xFFFFFFFF, "uint64")).astype("uint32")


def _let(value: tirx.PrimExpr, body):
    """Bind ``value`` once (a Let), so the hash's reuse of its state does not blow up the tree."""
    var = tirx.Var("h", "uint32")
    return tirx.Let(var, value, body(var))


def mix32(x: tirx.PrimExpr, then):
    """lowbias32 on uint32 (multiplies wrap modulo 2**32, as in numpy); continues with ``then(result)``."""
    return _let(
        x,
        lambda a: _let(
            _mul(a ^ (a >> _u32(16)), MIX_C1),
            lambda b: _let(_mul(b ^ (b >> _u32(15)), MIX_C2), lambda c: then(c ^ (c >> _u32(16)))),
        ),
    )


def layer_key(seed: tirx.PrimExpr, layer: int, then):
    """``key = mix32(mix32(seed) ^ (layer * GOLDEN))`` for a runtime ``seed``; continues with ``then(key)``."""
    lay = _u32((int(layer) * GOLDEN) & 0xFFFFFFFF)
    return mix32(seed.astype("uint32"), lambda a: mix32(a ^ lay, then))


def weight_hash(key: tirx.PrimExpr, flat_index: tirx.PrimExpr, then):
    """The per-weight hash ``u_i = mix32(key ^ i)`` both sample streams start from; continues with
    ``then(u_i)``."""
    return mix32(key ^ flat_index.astype("uint32"), then)


def sample_bit(key: tirx.PrimExpr, flat_index: tirx.PrimExpr, sample: tirx.PrimExpr, threshold: tirx.PrimExpr, P: int):
    """``1`` (int32) when ``h(seed, layer, i, j) < t_i``, else ``0``; ``key`` is the layer key (uint32)."""

    def compare(h):
        top = (h >> _u32(32 - P)).astype("int32")
        return tirx.Select(top < threshold, tirx.const(1, "int32"), tirx.const(0, "int32"))

    return weight_hash(key, flat_index, lambda u: mix32(u ^ _mul(sample.astype("uint32"), GOLDEN), compare))


def sample_offset(key: tirx.PrimExpr, flat_index: tirx.PrimExpr, P: int, then):
    """The stratified stream's rotation ``o_i = mix32(key ^ i) >> (32 - P)`` (int32); continues
    with ``then(o_i)``."""
    return weight_hash(key, flat_index, lambda u: then((u >> _u32(32 - P)).astype("int32")))


def stratified_count(offset: tirx.PrimExpr, threshold: tirx.PrimExpr, m: tirx.PrimExpr, P: int, max_log2: int):
    """``#{j < m : (o + bitrev_P(j)) mod 2**P < t}`` (int32) for a run-time ``m`` that is 0 or a
    power of two ``<= 2**max_log2 <= 2**P``: the single closed-form term
    ``min(m, max(0, ceil((t - r) / s)))``, ``s = 2**P / m``, ``r = o mod s``
    (``psb_tvm.numerics.stratified_count`` for such ``m``).

    The shift ``log2 s`` and the mask ``s - 1`` depend on ``m`` only (``log2 m`` as a sum of
    ``max_log2`` comparisons: CUDA has no int32 popcount), so they are computed once per call,
    and each weight costs an and, an add, a shift and a clamp. (General ``m`` needs one term per
    set bit of ``m``; sample ranges in psb_tvm always start and end at 0 or a power of two.)
    int32 is exact: ``o, t <= 2**P <= 2**30`` and ``s <= 2**P``, so ``t - r + s - 1 < 2**31``.
    """
    m = m.astype("int32")
    log2m = tirx.const(0, "int32")
    for b in range(1, max_log2 + 1):
        log2m = log2m + (m >= tirx.const(1 << b, "int32")).astype("int32")
    log2s = tirx.const(P, "int32") - log2m
    mask = (tirx.const(1, "int32") << log2s) - tirx.const(1, "int32")
    cells = (threshold - (offset & mask) + mask) >> log2s
    return tirx.min(m, tirx.max(tirx.const(0, "int32"), cells))
