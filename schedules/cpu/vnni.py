"""x86 VNNI tensor intrinsics: 16 int32 lanes += 4 uint8 (broadcast) x 16x4 int8, one ``vpdpbusd``;
and 16 int32 lanes += 2 int16 (broadcast) x 16x2 int16, one ``vpdpwssd`` (the vnni16 layout).

TVM 0.27 ships one (``dot_16x4_vnni``) that passes <16 x i32> operands; the LLVM it bundles
declares ``llvm.x86.avx512.vpdpbusd.512`` with <64 x i8> operands and rejects the call. This is
the same intrinsic with the operand types LLVM expects.
"""

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

PSB_VNNI_16x4 = "psb_dot_16x4_vnni"
PSB_VNNI_16x2_WORDS = "psb_dot_16x2_words_vnni"


# The description TVM's ``tvm.s_tir.tensor_intrin.x86`` uses, written out here: importing that
# module runs its package __init__, which registers every target's intrinsics (CUDA included) and
# takes 30-200 s, once per process (every compile, every tuning worker).
@T.prim_func(s_tir=True)
def dot_product_16x4_u8i8i32_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_16x4_vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        a_i8x64 = T.reinterpret(T.broadcast(a_i32, 16), dtype="int8x64")
        b_i8x64 = B.vload([0, 0], dtype="int8x64")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            a_i8x64,
            b_i8x64,
            dtype="int32x16",
        )


try:
    TensorIntrin.register(PSB_VNNI_16x4, dot_product_16x4_u8i8i32_desc, _dot_16x4_vnni)
except Exception:  # noqa: BLE001 - already registered (module reloaded)
    pass


@T.prim_func(s_tir=True)
def dot_product_16x2_i16i16i32_desc(
    A: T.Buffer((2,), "int16", offset_factor=1),
    B: T.Buffer((16, 2), "int16", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2], B[0:16, 0:2])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 2):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_16x2_words_vnni(
    A: T.Buffer((2,), "int16", offset_factor=1),
    B: T.Buffer((16, 2), "int16", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2], B[0:16, 0:2])
        T.writes(C[0:16])
        a_i32 = T.reinterpret(A.vload([0], "int16x2"), dtype="int32")
        a_i16x32 = T.reinterpret(T.broadcast(a_i32, 16), dtype="int16x32")
        b_i16x32 = B.vload([0, 0], dtype="int16x32")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpwssd.512"),
            C.vload([0], dtype="int32x16"),
            a_i16x32,
            b_i16x32,
            dtype="int32x16",
        )


try:
    TensorIntrin.register(PSB_VNNI_16x2_WORDS, dot_product_16x2_i16i16i32_desc, _dot_16x2_words_vnni)
except Exception:  # noqa: BLE001 - already registered (module reloaded)
    pass
