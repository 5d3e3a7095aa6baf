"""Default CPU schedules for the sampling and packing kernels and the weight/activation stages of
layer kernels."""

from __future__ import annotations

from tvm import DataType, s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from psb_tvm.abi import ATTR_LAYOUT, ATTR_SAMPLER

from ..kernels.spec import spec_of
from ..rule import PSBRule
from .common import VECTOR_LANES, block_names, largest_divisor, loop_extents, parallel_vectorize


def _parallel_spatial(sch: s_tir.Schedule, block, n_spatial: int) -> None:
    loops = sch.get_loops(block)[:n_spatial]
    sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])


class PSBSample(PSBRule, CPUScheduleRule):
    """Parallel over weights; i.i.d.: each weight's run-time sample loop stays innermost and
    serial; stratified (closed form, no sample loop): parallel and vectorized over weights."""

    kinds = ("sample",)

    def schedule(self, func: tirx.PrimFunc, attrs, target: Target, _: bool) -> None | s_tir.Schedule:
        sch = s_tir.Schedule(func)
        counts = sch.get_sblock("counts")
        loops = sch.get_loops(counts)
        if attrs.get(ATTR_SAMPLER) == "stratified":
            parallel_vectorize(sch, counts)
            return sch
        _parallel_spatial(sch, counts, len(loops) - 1)
        # Initialise outside the sample loop: an empty range [lo, lo) must still give zero counts.
        sch.decompose_reduction(counts, sch.get_loops(counts)[-1])
        return sch


class PSBPack(PSBRule, CPUScheduleRule):
    """Run-time weight packing and drawing: every array is in the kernel's weight layout, so walk
    it in storage order, parallel over the outer dimension and vectorized over the rest (loads and
    stores contiguous); then the offset correction ``wsum`` parallel over output channels (its
    reduction serial)."""

    kinds = ("pack",)

    def schedule(self, func: tirx.PrimFunc, attrs, target: Target, _: bool) -> None | s_tir.Schedule:
        sch = s_tir.Schedule(func)
        q = sch.get_sblock("q")
        # Measured on a 256x256x3x3 vnni draw (uint16 thresholds, one-byte code): 0.64 ns per
        # weight walking the weights' source order, whose stores into the packed layout were 16
        # scalar byte stores per vector (and the thresholds / three int8 encodings read in source
        # order); the stored-in-layout walk is the measured time below in DESIGN.md section 5.
        outer, *inner = sch.get_loops(q)
        sch.parallel(outer)
        if inner:
            fused = sch.fuse(*inner) if len(inner) > 1 else inner[0]
            lanes = largest_divisor(int(sch.get(fused).extent), VECTOR_LANES)
            if lanes >= 8:
                _, vec = sch.split(fused, [None, lanes])
                sch.vectorize(vec)
        if "wsum" in block_names(sch):
            wsum = sch.get_sblock("wsum")
            sch.parallel(sch.get_loops(wsum)[0])
        return sch


#: Bytes of the NHWC activation stage per pass over the channels (columns x C x itemsize stores
#: in flight): whole rows of 160 columns x 256 int16 channels (80 KB) overflowed L1 and made a
#: 128-channel 1x1 conv (16-bit activations, vnni16) 0.84 ms instead of 0.22 (32 columns, 16 KB;
#: 8 / 16 columns: 0.30). A budget in bytes rather than columns: 32 columns as the cap made the
#: stems' blocks the largest divisor of the padded width (226 -> 2 columns), and MobileNetV2's
#: stem 0.127 ms instead of 0.06 (whole rows of 4 channels: 0.9 KB).
XQ_BLOCK_BYTES = 16384


def schedule_shared_stages(sch: s_tir.Schedule) -> None:
    """Layer kernels: parallel weight stage ``q`` (absent when the weights are prepacked), parallel +
    vectorized activation stage ``xq``."""
    if "q" in block_names(sch):
        q = sch.get_sblock("q")
        _parallel_spatial(sch, q, len(sch.get_loops(q)))
    xq = sch.get_sblock("xq")
    loops = sch.get_loops(xq)
    spec = spec_of(sch.mod["main"])
    if spec is not None and spec.stem_planes:
        # planes: rows in parallel, LLVM vectorizes along them; pixels: rows in parallel, the
        # channel loop unrolled so the column loop vectorizes as an interleaving store
        b, c, h, w = sch.get_loops(sch.get_sblock("xp"))
        sch.reorder(b, h, c, w)
        sch.parallel(sch.fuse(b, h))
        sch.parallel(sch.fuse(*loops[:2]))
        sch.unroll(loops[3])
        return
    if spec is not None and spec.blocked_activations:
        # rows of 4 (2) planes in parallel, the channels unrolled: LLVM interleaves the quantized
        # rows with shuffles into contiguous stores
        sch.parallel(sch.fuse(*loops[:3]))
        sch.unroll(loops[4])
        return
    if spec is not None and spec.x_nhwc:
        # Float NHWC in, integer NHWC out: rows in parallel; LLVM vectorizes the contiguous
        # channels itself (TVM's vectorize turned the float loads into gathers, the byte stores
        # into extracts)
        sch.parallel(sch.fuse(*loops[:2]))
        return
    handoff = spec is not None and spec.x_handoff  # a padded copy of NHWC rows
    layout = str(sch.mod["main"].attrs.get(ATTR_LAYOUT, "") or "")
    dense = spec is not None and spec.kind == "dense"  # (its float input is row-major [M, K] already)
    if not handoff and not dense and len(loops) == 4 and layout in ("vnni", "vnni16", "channels_last"):
        # Float NCHW in, integer NHWC out: rows in parallel, per row one channel at a time along
        # the columns (contiguous loads, stores C bytes apart; LLVM vectorizes the column loop).
        # Lanes over channels gathered from C planes instead: measured on Zen 5 (whole kernels,
        # int8 preset, prepacked) ResNet-18's stem 0.41 -> 0.27 ms, its 3x3 convs 625-817 ->
        # 704-949 GMAC/s, MobileNetV2's stem 0.20 -> 0.06 ms.
        b, h, w, c = loops
        width, channels = loop_extents(sch, [w, c])
        row_bytes = channels * DataType(sch.get(xq).writes[0].source.dtype).bits // 8
        wo, wi = sch.split(w, [None, largest_divisor(width, max(1, XQ_BLOCK_BYTES // row_bytes))])
        sch.reorder(b, h, wo, c, wi)
        sch.parallel(sch.fuse(b, h))
    elif sch.get(xq).name_hint == "xq" and len(loops) in (4, 5) and (handoff or loop_extents(sch, loops[-1:])[0] >= 32):
        # Padded NCHW/NHWC rows: parallel over rows, vectorize along the row. Fusing everything
        # (parallel_vectorize) turns the padding test into per-lane div/mod and gathers: measured
        # ~10x slower on a 144-channel 56x56 depthwise input.
        # (5 loops: the phase-split rows of a strided conv, see kernels/layer.py)
        sch.parallel(sch.fuse(*loops[:-1]))
        width = loop_extents(sch, loops[-1:])[0]
        lanes = largest_divisor(width, VECTOR_LANES)
        if lanes >= 4:
            _, inner = sch.split(loops[-1], [None, lanes])
            sch.vectorize(inner)
    else:
        parallel_vectorize(sch, xq)
