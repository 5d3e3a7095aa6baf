"""CUDA lowering of ``tirx.popcount``, which TVM 0.27 does not register for CUDA (the bitserial
lowering's kernels then fail to build: "Unresolved call tirx.popcount"): ``__popc`` for operands
up to 32 bits, ``__popcll`` for 64-bit ones (both return int)."""

from __future__ import annotations

from tvm import tirx


def _lower_popcount(call):
    x = call.args[0]
    wide = str(x.ty.dtype).endswith("64")  # TVM 0.27: the type is .ty (Vars and Calls have no .dtype)
    func, arg_t = ("__popcll", "uint64") if wide else ("__popc", "uint32")
    return tirx.call_pure_extern("int32", func, x.astype(arg_t)).astype(str(call.ty.dtype))


tirx.register_intrin_lowering("tirx.popcount", target="cuda", f=_lower_popcount, level=99)
