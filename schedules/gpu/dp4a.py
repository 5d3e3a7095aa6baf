"""CUDA ``__dp4a`` tensor intrinsic for the int8 preset's packed conv (``psb.layout == "dp4a"``).

TVM's own dp4a intrinsics want both operands in shared memory; the tiled conv stages only the
weights there and reads the activations (reused by every channel of a thread's tile) from global
memory, so this one declares that mix. One step: ``c += sum_k a[k] * b[k]`` over 4 int8 pairs.
"""

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T


@T.prim_func(s_tir=True)
def _desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1, align=4, scope="global")
    B = T.match_buffer(b, (4,), "int8", offset_factor=1, align=4, scope="shared")
    C = T.match_buffer(c, (1,), "int32", offset_factor=1, align=4, scope="local")
    with T.sblock("root"):
        T.reads(C[0], A[0:4], B[0:4])
        T.writes(C[0])
        for i in range(4):
            with T.sblock("update"):
                vi = T.axis.remap("R", [i])
                C[0] = C[0] + T.cast(A[vi], "int32") * T.cast(B[vi], "int32")


@T.prim_func(s_tir=True)
def _impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1, align=4, scope="global")
    B = T.match_buffer(b, (4,), "int8", offset_factor=1, align=4, scope="shared")
    C = T.match_buffer(c, (1,), "int32", offset_factor=1, align=4, scope="local")
    with T.sblock("root"):
        T.reads(C[0], A[0:4], B[0:4])
        T.writes(C[0])
        C[0] += T.call_pure_extern("__dp4a", A.vload([0], "int8x4"), B.vload([0], "int8x4"), T.int32(0),
                                   dtype="int32")


PSB_DP4A_GLOBAL_SHARED = "psb_dp4a_s8s8s32_global_shared"
TensorIntrin.register(PSB_DP4A_GLOBAL_SHARED, _desc, _impl)
