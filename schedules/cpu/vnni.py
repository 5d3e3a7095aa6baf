"""x86 VNNI tensor intrinsics: 16 int32 lanes += 4 uint8 (broadcast) x 16x4 int8, one ``vpdpbusd``;
and 16 int32 lanes += 2 int16 (broadcast) x 16x2 int16, one ``vpdpwssd`` (the vnni16 layout);
and, for depthwise convs' tap groups, 16 int32 lanes += 4 taps x 16 channels uint8 (interleaved to
4 bytes per lane in the register) x 16x4 int8: one ``vpermb`` and one ``vpdpbusd``, no broadcast.

TVM 0.27 ships one (``dot_16x4_vnni``) that passes <16 x i32> operands; the LLVM it bundles
declares ``llvm.x86.avx512.vpdpbusd.512`` with <64 x i8> operands and rejects the call. This is
the same intrinsic with the operand types LLVM expects.
"""

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

PSB_VNNI_16x4 = "psb_dot_16x4_vnni"
PSB_VNNI_16x2_WORDS = "psb_dot_16x2_words_vnni"
PSB_VNNI_DW_16x4 = "psb_dw_dot_16x4_vnni"


def _dot_16xk(a_dtype: str, b_dtype: str, depth: int, llvm_intrinsic: str):
    """``(description, implementation)`` of 16 int32 lanes += ``depth`` activations (one 32-bit
    word, broadcast) x 16 x ``depth`` weights, the implementation one ``llvm_intrinsic`` call on
    512-bit operands of the types LLVM declares for it."""
    lanes = {"int8": 64, "uint8": 64, "int16": 32}[b_dtype]  # elements of one 512-bit operand
    a_word = f"{a_dtype}x{depth}"
    operand = f"{b_dtype}x{lanes}"

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((depth,), a_dtype, offset_factor=1),
        B: T.Buffer((16, depth), b_dtype, offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:depth], B[0:16, 0:depth])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, depth):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((depth,), a_dtype, offset_factor=1),
        B: T.Buffer((16, depth), b_dtype, offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:depth], B[0:16, 0:depth])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], a_word), dtype="int32")
            a_wide = T.reinterpret(T.broadcast(a_i32, 16), dtype=operand)
            b_wide = B.vload([0, 0], dtype=operand)
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_intrinsic),
                C.vload([0], dtype="int32x16"),
                a_wide,
                b_wide,
                dtype="int32x16",
            )

    return desc, impl


# The description TVM's ``tvm.s_tir.tensor_intrin.x86`` uses, written out here: importing that
# module runs its package __init__, which registers every target's intrinsics (CUDA included) and
# takes 30-200 s, once per process (every compile, every tuning worker).
dot_product_16x4_u8i8i32_desc, _dot_16x4_vnni = _dot_16xk("uint8", "int8", 4, "llvm.x86.avx512.vpdpbusd.512")
# The vnni16 layout's: int16 words in pairs (vpdpwssd takes <32 x i16> operands).
dot_product_16x2_i16i16i32_desc, _dot_16x2_words_vnni = _dot_16xk("int16", "int16", 2, "llvm.x86.avx512.vpdpwssd.512")


# Depthwise tap groups (kernels/layer.py, KernelSpec.dw_tap_groups): 16 int32 lanes += the 4 x 16
# activation tile (4 taps x 16 channels, each row contiguous) x 16 x 4 int8 weights, no broadcast.
@T.prim_func(s_tir=True)
def _dw_dot_desc(
    A: T.Buffer((4, 16), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4, 0:16], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk, vi], "int32") * T.cast(B[vi, vk], "int32")


# The 4 x 16 activation tile interleaved to 16 x 4 (one vpermb with AVX512-VBMI)
_INTERLEAVE = [k * 16 + c for c in range(16) for k in range(4)]


@T.prim_func(s_tir=True)
def _dw_dot_vnni(
    A: T.Buffer((4, 16), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4, 0:16], B[0:16, 0:4])
        T.writes(C[0:16])
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.Shuffle([A.vload([0, 0], dtype="uint8x64")], _INTERLEAVE),
            B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16",
        )


for _name, _desc, _impl in ((PSB_VNNI_16x4, dot_product_16x4_u8i8i32_desc, _dot_16x4_vnni),
                            (PSB_VNNI_16x2_WORDS, dot_product_16x2_i16i16i32_desc, _dot_16x2_words_vnni),
                            (PSB_VNNI_DW_16x4, _dw_dot_desc, _dw_dot_vnni)):
    try:
        TensorIntrin.register(_name, _desc, _impl)
    except Exception:  # noqa: BLE001 - already registered (module reloaded)
        pass
