"""Default GPU schedule of the integer-dot-product PSB kernels: a tiled implicit GEMM.

Applies to the intdot conv in the ``dp4a`` layout (int8 preset: four int8 x int8 products per
``__dp4a``), the channels-last intdot conv (int16 preset) and the intdot dense. Output pixels
(flattened, M) and output channels (O) are tiled over thread blocks, each thread keeps a TM x TN
tile of accumulators in registers, and each step of the reduction stages the block's slice of the
weights (and of a dense layer's activations) in shared memory, reused by every thread of the
block; a conv's activations are read from global memory (one 4-byte load per pixel and step,
shared by the thread's TN channels). The epilogue (scale, bias, activation, NCHW layout) runs on
the register tiles.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule
from tvm.target import Target

from psb_tvm.abi import ATTR_KIND, ATTR_LAYOUT, ATTR_LOWERING

from ..cpu.common import block_names, largest_divisor, loop_extents
from ..rule import PSBRule
from .common import bind_spatial

#: Threads per block of the tiled kernels.
THREADS = 256
#: Shared memory one reduction step may stage (bytes); 48 KiB is the static limit per block.
SHARED_BYTES = 24 * 1024
#: Blocks wanted before a larger tile is taken: two waves of an H100 (132 SMs).
MIN_BLOCKS = 264
#: (BM, BN, TM, TN) candidates, largest tile first: block tile of BM pixels x BN channels,
#: TM x TN accumulators per thread (BM / TM * BN / TN = THREADS threads each).
TILES = ((128, 64, 8, 4), (64, 64, 4, 4), (64, 32, 4, 2), (32, 32, 2, 2), (32, 16, 2, 1), (16, 16, 1, 1))


def choose_tile(m: int, o: int) -> tuple[int, int, int, int]:
    """The largest tile dividing (``m``, ``o``) that still gives ``MIN_BLOCKS`` blocks, else the
    one giving the most blocks: batch-1 late layers (7x7 x 512) need small tiles to fill the GPU.
    Tiles that divide need no bounds predicate (which the dp4a tensorization refuses); without
    one the smallest tile is taken, with a predicate."""
    fits = [t for t in TILES if m % t[0] == 0 and o % t[1] == 0] or [TILES[-1]]
    for t in fits:
        if -(-m // t[0]) * -(-o // t[1]) >= MIN_BLOCKS:
            return t
    return max(fits, key=lambda t: (-(-m // t[0]) * -(-o // t[1]), -t[0] * t[1]))


def _reduction_chunk(extent: int, bytes_per_step: int) -> int:
    """Largest divisor of ``extent`` whose staged slices stay within ``SHARED_BYTES`` (at least 1)."""
    return largest_divisor(extent, max(1, SHARED_BYTES // bytes_per_step))


def _stage(sch: s_tir.Schedule, block, read_index: int, at, tx: int, ty: int, vector: int) -> None:
    """Copy ``block``'s ``read_index``-th input into shared memory under loop ``at``, the copy
    spread over the block's ``tx`` x ``ty`` threads (threadIdx.x / .y extents; ``vector``
    consecutive elements per thread and step)."""
    cache = sch.cache_read(block, read_index, "shared", consumer_blocks=[block])
    sch.compute_at(cache, at)
    depth = [sch.get(lp).same_as(sch.get(at)) for lp in sch.get_loops(cache)].index(True) + 1
    inner = sch.get_loops(cache)[depth:]
    fused = sch.fuse(*inner) if len(inner) > 1 else inner[0]
    extent = loop_extents(sch, [fused])[0]
    if vector > 1 and extent % vector == 0:
        _, yo, xo, vec = sch.split(fused, [None, ty, tx, vector])
        sch.vectorize(vec)
    else:
        _, yo, xo = sch.split(fused, [None, ty, tx])
    sch.bind(yo, "threadIdx.y")
    sch.bind(xo, "threadIdx.x")


class PSBIntdotTiled(PSBRule, GPUScheduleRule):
    """Tiled implicit GEMM for intdot convs (``dp4a`` / channels-last layouts) and dense."""

    kinds = ("conv2d", "dense")

    def schedule(self, func: tirx.PrimFunc, attrs, target: Target, _: bool) -> None | s_tir.Schedule:
        if attrs.get(ATTR_LOWERING) != "intdot":
            return None
        kind, layout = attrs.get(ATTR_KIND), attrs.get(ATTR_LAYOUT)
        if not (kind == "dense" or (kind == "conv2d" and layout in ("dp4a", "gemm"))):
            return None
        sch = s_tir.Schedule(func)
        names = block_names(sch)
        acc = sch.get_sblock("acc")
        # conv: acc[o, m] (channels x flattened output pixels); dense: acc[m, o] (rows x outputs)
        if kind == "dense":
            m, o, *reductions = sch.get_loops(acc)
        else:
            o, m, *reductions = sch.get_loops(acc)
        M, O = loop_extents(sch, [m, o])
        BM, BN, TM, TN = choose_tile(M, O)
        tx, ty = BN // TN, BM // TM
        assert tx * ty == THREADS, (BM, BN, TM, TN)

        # Accumulators in registers. A conv's epilogue is computed per register tile: its NCHW
        # loops (b, o, y, x) are re-indexed to acc's (o, m = (b*OH + y)*OW + x), where a tile is a
        # rectangle, so each thread writes its outputs straight from registers (no int32 round
        # trip through global memory). Dense layers, convs whose offset correction ``wsum`` is a
        # block of the kernel (sampled, not prepacked: a producer outside the tile, which
        # reverse_compute_at refuses) and test builds exposing the accumulators write acc back
        # per tile and run the epilogue as its own kernel.
        fuse_epilogue = kind != "dense" and not {"acc_nchw", "wsum"} & names
        if fuse_epilogue:
            out = sch.get_sblock("out")
            _, _, OH, OW = loop_extents(sch, sch.get_loops(out))
            sch.transform_block_layout(out, lambda b, o_, y, x: (o_, (b * OH + y) * OW + x))
            sch.set_scope(acc, 0, "local")
            acc_out = out
        else:
            acc_out = sch.cache_write(acc, 0, "local")

        mo, mt, mi = sch.split(m, [None, ty, TM])
        oo, ot, oi = sch.split(o, [None, tx, TN])
        dp4a = layout == "dp4a"
        if dp4a:
            rh, rw, rc, rk = reductions
            C4 = loop_extents(sch, [rc])[0]
            KH, KW = loop_extents(sch, [rh, rw])
            # staged per c/4 group: BN x KH x KW x 4 weight bytes
            chunk = _reduction_chunk(C4, 4 * BN * KH * KW)
            rco, rci = sch.split(rc, [None, chunk])
            sch.reorder(mo, oo, mt, ot, rco, rh, rw, rci, mi, oi, rk)
            stage_at = first_reduction = rco
        else:
            red = reductions[-1]  # the contiguous channel / feature axis
            K = loop_extents(sch, [red])[0]
            chunk = _reduction_chunk(K, 4 * (BM + BN))
            chunk = min(chunk, 64) if K % min(chunk, 64) == 0 else chunk
            ro, ri = sch.split(red, [None, chunk])
            sch.reorder(mo, oo, mt, ot, *reductions[:-1], ro, ri, mi, oi)
            stage_at = ro
            first_reduction = (reductions[:-1] or [ro])[0]
        block_idx = sch.fuse(mo, oo)
        sch.bind(block_idx, "blockIdx.x")
        # threadIdx.x along the output channels: a warp spans 16 channels x 2 pixel groups, so its
        # activation loads are two broadcast addresses and its weight loads one contiguous run of
        # shared memory. (threadIdx.x along the pixels makes the accumulator writes coalesce but
        # every activation load 32 separate cache lines: measured 1.15x slower on MobileNetV2 at
        # batch 64, up to 2x on its 7x7 960-channel projections.)
        sch.bind(mt, "threadIdx.y")
        sch.bind(ot, "threadIdx.x")
        sch.reverse_compute_at(acc_out, ot)

        reads = [r.source.name for r in sch.get(acc).reads]
        x_index = next(i for i, n in enumerate(reads) if n.startswith("xq"))
        q_index = next(i for i, n in enumerate(reads) if n.startswith("q"))
        if kind == "dense":  # a conv's activation slice is no rectangle of the flattened pixels
            _stage(sch, acc, x_index, stage_at, tx, ty, vector=1)
        _stage(sch, acc, q_index, stage_at, tx, ty, vector=4 if dp4a else 1)
        sch.decompose_reduction(acc, first_reduction)
        sch.unroll(mi)
        sch.unroll(oi)
        if dp4a:
            from .dp4a import PSB_DP4A_GLOBAL_SHARED

            sch.tensorize(sch.get_loops(acc)[-1], PSB_DP4A_GLOBAL_SHARED)

        # The other stages: one thread per element (the weight-sum reduction stays serial).
        for name in ("xq", "q", "wsum", "acc_nchw") + (() if fuse_epilogue else ("out",)):
            if name in names:
                bind_spatial(sch, sch.get_sblock(name))
        return sch
