"""Arm dot-product tensor intrinsics for the int8 preset's packed conv (``psb.layout == "vnni"``).

The kernel's innermost block is the one x86 tensorizes with ``vpdpbusd``: 16 output channels x 4
input channels, ``C[i] += sum_k int32(A[k]) * int32(B[i, k])`` with ``A`` uint8 (the activations of
one output pixel, broadcast) and ``B`` int8 (weights packed ``[16, 4]``, 64 contiguous bytes).
Those 64 bytes are exactly four ``sdot``/``usdot`` weight operands: lane ``i`` of a 128-bit dot
product multiplies bytes ``4i..4i+3``, i.e. output ``4j + i`` of chunk ``j`` with its 4 channels.

- ``+i8mm`` (``PSB_ARM_USDOT_16x4``): ``usdot`` multiplies unsigned by signed bytes: 4 instructions.
- ``+dotprod`` only (``PSB_ARM_SDOT_16x4``): ``sdot``/``udot`` need both operands of one sign.
  The activations are moved to signed, ``a - 128`` (``a ^ 0x80`` read as int8), and the offset is
  added back exactly: ``sum a*b = sum (a-128)*b + 128*sum b`` and ``128*sum b`` is
  ``-sdot(0, splat(-128), b)`` (all values in int8 / int32, no rounding, so the result is
  bit-identical to ``vpdpbusd`` and to the numpy reference; every partial sum stays far inside
  int32: ``|4 * 128 * 128| = 65536``). The correction depends on the weights only: when a few
  output pixels share a weight vector (the schedule unrolls them), LLVM computes it once for all
  of them (the intrinsic is pure), so it costs 4 extra ``sdot`` per weight vector and one ``sub``
  per output vector.

TVM's own ``dot_4x4_i8i8s32_sdot`` / ``dot_4x4_u8u8u32_udot`` (``tvm.s_tir.tensor_intrin.arm_cpu``)
take both operands of one sign, which is not the int8 preset's uint8 x int8, so they are not used.
"""

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .vnni import dot_product_16x4_u8i8i32_desc  # the same 16 outputs x 4 channels description

PSB_ARM_SDOT_16x4 = "psb_dot_16x4_u8i8i32_arm_sdot"
PSB_ARM_USDOT_16x4 = "psb_dot_16x4_u8i8i32_arm_usdot"


@T.prim_func(s_tir=True)
def _dot_16x4_sdot(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        # a - 128 for each byte: flip the top bit of the 4 bytes, then broadcast them to 16 lanes.
        a_i32 = T.bitwise_xor(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), T.int32(-2139062144))
        a_i8x16 = T.reinterpret(T.broadcast(a_i32, 4), dtype="int8x16")
        for j in T.unroll(4):
            b_i8x16 = B.vload([j * 4, 0], dtype="int8x16")
            C[T.ramp(j * 4, 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                C.vload([j * 4], dtype="int32x4"),
                a_i8x16,
                b_i8x16,
                dtype="int32x4",
            ) - T.call_llvm_pure_intrin(  # - (-128 * sum b) = + 128 * sum b
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                T.broadcast(T.int32(0), 4),
                T.broadcast(T.int8(-128), 16),
                b_i8x16,
                dtype="int32x4",
            )


@T.prim_func(s_tir=True)
def _dot_16x4_usdot(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a_u8x16 = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 4),
                                dtype="uint8x16")
        for j in T.unroll(4):
            C[T.ramp(j * 4, 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.usdot.v4i32.v16i8"),
                C.vload([j * 4], dtype="int32x4"),
                a_u8x16,
                B.vload([j * 4, 0], dtype="int8x16"),
                dtype="int32x4",
            )


for _name, _impl in ((PSB_ARM_SDOT_16x4, _dot_16x4_sdot), (PSB_ARM_USDOT_16x4, _dot_16x4_usdot)):
    try:
        TensorIntrin.register(_name, dot_product_16x4_u8i8i32_desc, _impl)
    except Exception:  # noqa: BLE001 - already registered (module reloaded)
        pass


def arm_dot_intrin(target):
    """The intrinsic for ``target``, or ``None`` when it is not aarch64 with dot-product support."""
    from tvm.target import codegen

    if not is_aarch64(target):
        return None
    if codegen.llvm_cpu_has_features("i8mm", target):
        return PSB_ARM_USDOT_16x4
    if codegen.llvm_cpu_has_features("dotprod", target):
        return PSB_ARM_SDOT_16x4
    return None


def is_aarch64(target) -> bool:
    triple = str(target.attrs.get("mtriple", "") or "")
    return target.kind.name == "llvm" and (triple.startswith("aarch64") or triple.startswith("arm64"))
