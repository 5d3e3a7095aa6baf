"""The PSB sample stream in TIR: the same integer hash as ``psb_tvm.numerics.sample_hash``."""

from __future__ import annotations

from tvm import tirx

from psb_tvm.numerics import GOLDEN, MIX_C1, MIX_C2


def _u32(v: int) -> tirx.PrimExpr:
    return tirx.const(v, "uint32")


def _let(value: tirx.PrimExpr, body):
    """Bind ``value`` once (a Let), so the hash's reuse of its state does not blow up the tree."""
    var = tirx.Var("h", "uint32")
    return tirx.Let(var, value, body(var))


def mix32(x: tirx.PrimExpr, then):
    """lowbias32 on uint32 (wrapping multiplies, as in numpy); continues with ``then(result)``."""
    return _let(
        x,
        lambda a: _let(
            (a ^ (a >> _u32(16))) * _u32(MIX_C1),
            lambda b: _let((b ^ (b >> _u32(15))) * _u32(MIX_C2), lambda c: then(c ^ (c >> _u32(16)))),
        ),
    )


def sample_bit(key: int, flat_index: tirx.PrimExpr, sample: tirx.PrimExpr, threshold: tirx.PrimExpr, P: int):
    """``1`` (int32) when ``h(seed, layer, i, j) < t_i``, else ``0``; ``key`` is ``layer_key(seed, layer)``."""

    def compare(h):
        top = (h >> _u32(32 - P)).astype("int32")
        return tirx.Select(top < threshold, tirx.const(1, "int32"), tirx.const(0, "int32"))

    return mix32(
        _u32(int(key)) ^ flat_index.astype("uint32"),
        lambda u: mix32(u ^ (sample.astype("uint32") * _u32(GOLDEN)), compare),
    )
