"""Default (untuned) CPU schedule for PSB conv2d kernels, all lowerings."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from psb_tvm.abi import ATTR_LAYOUT

from ..kernels import spec_of
from ..rule import PSBRule
from .common import VECTOR_LANES, block_names, largest_divisor, loop_extents, parallel_vectorize, vectorize_below_reductions
from .psb_sampling import schedule_shared_stages


class PSBConv2D(PSBRule, CPUScheduleRule):
    """Parallel over (batch, output channel), vectorized over output columns, reduction outside.

    Vectorizing over output width keeps every lane's reduction independent and needs no
    horizontal sums; the lane count is a divisor of the width so no tail predicate blocks it.
    """

    kinds = ("conv2d",)

    def schedule(self, func: tirx.PrimFunc, attrs, target: Target, _: bool) -> None | s_tir.Schedule:
        if attrs.get(ATTR_LAYOUT) in ("dp4a", "gemm"):
            return None  # GPU kernels (flattened pixels); built for a CPU only by the numerics tests
        sch = s_tir.Schedule(func)
        schedule_shared_stages(sch)
        acc = sch.get_sblock("acc")
        loops = sch.get_loops(acc)
        b, o, y, x = loops[:4]
        reductions = loops[4:]
        if attrs.get(ATTR_LAYOUT) in ("vnni", "vnni16"):  # (dp4a is declined above)
            return schedule_vnni(sch, acc, target)
        if attrs.get(ATTR_LAYOUT) == "bitserial":
            schedule_bitserial_packs(sch)  # then the NCHW nest below: vectorized over output columns
        if attrs.get(ATTR_LAYOUT) == "channels_last":
            # Reduction over contiguous channels innermost: LLVM vectorizes it into dot products.
            sch.reorder(b, y, x, o, *reductions)
            sch.parallel(sch.fuse(b, y))
            sch.decompose_reduction(acc, reductions[0])
            parallel_vectorize(sch, sch.get_sblock("out"))
            return sch
        vectorize_below_reductions(sch, acc, [b, o, y], x, reductions, n_parallel=2)  # parallel over (b, o)
        parallel_vectorize(sch, sch.get_sblock("out"))
        return sch


def schedule_bitserial_packs(sch: s_tir.Schedule) -> None:
    """Bitserial packing stages: ``xpack`` / ``wpack`` parallel over words, vectorized over their
    innermost spatial axis (columns / outputs) when it has a tail-free divisor, bit loop unrolled."""
    for name in ("xpack", "wpack"):
        block = sch.get_sblock(name)
        loops = sch.get_loops(block)
        spatial, rj = loops[:-1], loops[-1]
        inner = spatial[-1]
        lanes = largest_divisor(loop_extents(sch, [inner])[0], VECTOR_LANES)
        vectorize = name == "xpack" or len(spatial) == 4  # conv wpack: innermost is the level axis
        if vectorize and lanes > 1:
            io, ii = sch.split(inner, [None, lanes])
            sch.reorder(io, rj, ii)
            outer = list(spatial[:-1]) + [io]
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
            sch.vectorize(ii)
            init = sch.decompose_reduction(block, rj)
            sch.vectorize(sch.get_loops(init)[-1])
            sch.unroll(rj)
        else:
            sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
            sch.unroll(rj)


def has_vnni(target: Target) -> bool:
    mcpu = str(target.attrs.get("mcpu", "") or "")
    features = [str(f) for f in (target.attrs.get("mattr", None) or [])]
    return "+avx512vnni" in features or mcpu in VNNI_CPUS


#: LLVM CPU names with AVX-512 VNNI (vpdpbusd).
VNNI_CPUS = {"cascadelake", "cooperlake", "icelake-client", "icelake-server", "tigerlake", "rocketlake",
             "alderlake", "sapphirerapids", "emeraldrapids", "graniterapids", "znver4", "znver5"}


#: Fewer output rows than this: the packed convs parallelize over (row, output block) instead.
PARALLEL_ROWS = 12


def schedule_vnni(sch: s_tir.Schedule, acc, target: Target) -> s_tir.Schedule:
    """Rows in parallel; per output pixel tile, 16 output channels x 4 input channels per
    tensorized step: one ``vpdpbusd`` on x86 (pmaddubsw+pmaddwd on AVX-512 without VNNI), four
    ``usdot`` (+i8mm) or ``sdot`` (+dotprod, see ``arm_dot.py``) on aarch64. Other targets (Arm
    without dot products) keep the loop nest, vectorized over the 16 output channels."""
    from .arm_dot import arm_dot_intrin, is_aarch64

    spec = spec_of(sch.mod["main"])
    # vnni16: int16 words; with 16-bit activations one accumulator set per digit (kernels/layer.py)
    words = spec is not None and spec.vnni16
    digits = spec.act_digits if words else 1
    chunked = words and spec.vnni16_chunk
    if chunked:  # int32 partial sums per chunk of channels, added up in int64 (kernels/layer.py)
        b, y, x, ch, o, rh, rw, rc, rk = sch.get_loops(acc)
    elif digits > 1:
        b, y, x, d, o, rh, rw, rc, rk = sch.get_loops(acc)
    else:
        b, y, x, o, rh, rw, rc, rk = sch.get_loops(acc)
    ow = loop_extents(sch, [x])[0]
    # Output pixels sharing each loaded weight vector = independent vpdpbusd accumulator chains:
    # up to 8 keeps the dot-product latency hidden even at 7x7 (4 measured up to 1.7x slower).
    # With two activation digits each pixel has two chains: 4 pixels x 2 digits.
    xt = largest_divisor(ow, 8 // digits)
    xo, xi = sch.split(x, [None, xt])
    ob, oi = sch.split(o, [None, 16])
    # Two (or three) 16-channel blocks per tile: each broadcast activation feeds 2-3 vpdpbusd and
    # the tile holds 16-24 accumulators. Zen 5 issues two 512-bit vpdpbusd per cycle; with one
    # block the loads (one broadcast per vpdpbusd) bound it. Measured there (2 threads, prepacked):
    # ResNet-18's 3x3 convs 549-679 -> 630-859 GMAC/s, 320->1280 1x1 7x7 478 -> 548; four blocks
    # (32 accumulators, spills) were slower than one.
    blocks = loop_extents(sch, [ob])[0]
    ot = 2 if blocks % 2 == 0 else 3 if blocks % 3 == 0 else 1
    ob, oo = sch.split(ob, [None, ot])
    inner = [rh, rw, rc, xi, *([d] if digits > 1 else []), oo, oi, rk]
    if chunked:
        inner = [ch] + inner
    # Rows in parallel; where there are few (a dense layer has one), (row, output block) pairs,
    # each block's weights then reused along its row. Measured (2 threads): 7 rows of ResNet-18's
    # last 3x3 conv 785 -> 872 GMAC/s (int8) / 428 -> 464 (vnni16), a 480-channel 1x1 conv over 3
    # rows (PP-OCRv4 rec, 16-bit activations) 157 -> 195; with 14-56 rows within +-5 %.
    rows = loop_extents(sch, [b])[0] * loop_extents(sch, [y])[0]
    if rows < PARALLEL_ROWS:
        sch.reorder(b, y, ob, xo, *inner)
        sch.parallel(sch.fuse(b, y, ob))
        tile = xo
    else:
        sch.reorder(b, y, xo, ob, *inner)
        sch.parallel(sch.fuse(b, y))
        tile = ob
    arm = is_aarch64(target)
    arm_intrin = arm_dot_intrin(target) if arm and not words else None
    # no dot-product instruction to tensorize: the loop nest, vectorized over the 16 outputs
    # (LLVM's pmaddwd for int16 words on x86 without VNNI)
    loop_nest = (arm and arm_intrin is None) or (words and not arm and not has_vnni(target))
    if loop_nest:
        sch.reorder(rk, oi)
        sch.vectorize(oi)  # before decompose_reduction: it needs the complete reduction block
    init = sch.decompose_reduction(acc, rh)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(xi)
    if digits > 1:
        sch.unroll(d)
    sch.unroll(oo)
    # The epilogue right after each (pixels x 16 channels) tile, while its accumulators are hot:
    # as a separate NHWC -> NCHW pass over the whole output it cost 1.4-3.6x more (1x1 convs at
    # 56-112 px most, where the conv itself is cheap).
    # (Not when the signed-activation correction ``wsum`` is a block of this kernel: a producer of
    # ``out`` outside the tile loop, which reverse_compute_at refuses; prepacked kernels take it
    # as an argument.)
    names = block_names(sch)
    out = sch.get_sblock("out")
    if "wsum" in names:
        parallel_vectorize(sch, out)
    else:
        if "wide" in names and chunked:  # each chunk's int32 sums added to int64 ones, per tile
            wide = sch.get_sblock("wide")
            sch.reverse_compute_at(wide, ch)
            sch.vectorize(sch.get_loops(wide)[-1])
        elif "wide" in names:  # the digits' sums combined per tile, vectorized over the channels
            wide = sch.get_sblock("wide")
            sch.reverse_compute_at(wide, tile)
            ch, rd = sch.get_loops(wide)[-2:]
            sch.reorder(rd, ch)
            sch.vectorize(ch)  # (before decompose_reduction, which leaves an update it cannot vectorize)
            sch.vectorize(sch.get_loops(sch.decompose_reduction(wide, rd))[-1])
        sch.reverse_compute_at(out, tile)
        sch.vectorize(sch.get_loops(out)[-1])
    if arm:
        if arm_intrin is not None:
            sch.tensorize(oi, arm_intrin)
    else:
        from .vnni import PSB_VNNI_16x2_WORDS, PSB_VNNI_16x4

        if words:
            if not loop_nest:
                sch.tensorize(oi, PSB_VNNI_16x2_WORDS)
        elif has_vnni(target):
            sch.tensorize(oi, PSB_VNNI_16x4)
        else:  # AVX-512 without VNNI: TVM's intrinsic (its import registers every intrinsic: slow)
            from tvm.s_tir.tensor_intrin.x86 import AVX512_DOT_16x4_INTRIN

            sch.tensorize(oi, AVX512_DOT_16x4_INTRIN)
    if "acc_nchw" in names:  # the NCHW copy of the accumulators that test builds expose
        parallel_vectorize(sch, sch.get_sblock("acc_nchw"))
    if "wsum" in names:  # per-channel weight sums of the signed-activation offset: 16 lanes wide
        wsum = sch.get_sblock("wsum")
        o, *red = sch.get_loops(wsum)
        wo, wi = sch.split(o, [None, 16])
        sch.reorder(wo, *red, wi)
        sch.parallel(wo)
        sch.vectorize(wi)
        sch.vectorize(sch.get_loops(sch.decompose_reduction(wsum, red[0]))[-1])
    return sch
