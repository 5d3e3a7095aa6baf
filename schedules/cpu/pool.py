"""CPU schedule for the float pooling glue (TOPI's ``pool2d``: a padded copy, then a max / sum
over the window, for average pooling a division after it)."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

from .common import epilogue_per_row, loop_extents, root_blocks, vectorize_below_reductions

#: Pools over at least this many planes (batch x channels) pad each plane right before pooling it
#: (in cache) instead of padding the whole input first: ResNet-18's 3x3 / 2 max pool (64 planes of
#: 112x112, a 3.3 MB padded copy) 0.123 -> 0.107 ms (Zen 5, 2 threads, alone, two A/B pairs).
MIN_PLANES = 8


class Pool2D(CPUScheduleRule):
    """The padded copy per plane inside the pooling's parallel loop over planes (or, under
    ``MIN_PLANES`` planes, a whole copy first, rows in parallel); pooling rows, columns in lanes below
    the window loops (every lane keeps its own max / sum in TOPI's window order: the same floats);
    any epilogue (the average's division) per row.

    Without it no rule scheduled ResNet-18's 3x3 / 2 max pool (dlight's Reduction declines the
    padded copy in front): one thread, 0.14 ms alone and 0.26 ms inside the int8 module's call,
    the fourth most expensive call there; with it 0.12 ms alone (Zen 5, 2 threads; it reads the
    stem's 3.2 MB output, so it is bound by memory), 0.107 ms with each plane padded right before
    it is pooled (``MIN_PLANES``). Reading the input with the padding test inlined instead
    measured 0.21-0.28 ms (a test per element and lane)."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> None | s_tir.Schedule:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = root_blocks(sch)
        if blocks is None:
            return None
        names = [sch.get(b).name_hint for b in blocks]
        # TOPI marks its pooling (max: the reduction; average: the division after the sum)
        if not any(str(sch.get(b).annotations.get("schedule_rule", "")).startswith("meta_schedule.pool_")
                   for b in blocks):
            return None
        reductions = [i for i, b in enumerate(blocks)
                      if any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(b).iter_vars)]
        if len(reductions) != 1:
            return None
        index = reductions[0]
        pool = sch.get_sblock(names[index])
        kinds = [iv.iter_type for iv in sch.get(pool).iter_vars]
        loops = sch.get_loops(pool)
        # 4 spatial loops, then the window's reduction loops. NCHW: (batch, channel) planes, the
        # columns in lanes; NHWC (passes/channels_last_float.py): the same nest over (batch, row)
        # with the channels in lanes, each output row's input rows padded right before it
        # (ResNet-18's max pool 0.107 -> 0.056 ms)
        if len(loops) != len(kinds) or len(kinds) < 5 or kinds[:4] != [tirx.IterVar.DataPar] * 4:
            return None
        if any(k != tirx.IterVar.CommReduce for k in kinds[4:]):
            return None
        pads = [sch.get_sblock(name) for name in names[:index]]
        if any(iv.iter_type != tirx.IterVar.DataPar for pad in pads for iv in sch.get(pad).iter_vars):
            return None
        b, c, y, x, *window = loops
        per_plane = bool(pads) and loop_extents(sch, [b])[0] * loop_extents(sch, [c])[0] >= MIN_PLANES
        if not per_plane:
            for pad in pads:  # the padded copy: rows in parallel, LLVM vectorizes each row
                pad_loops = sch.get_loops(pad)
                sch.parallel(sch.fuse(*pad_loops[:-1]) if len(pad_loops) > 1 else pad_loops[0])
        vectorize_below_reductions(sch, pool, [b, c, y], x, window, n_parallel=2 if per_plane else 3)
        if per_plane:  # planes in parallel, each padded right before it is pooled
            for pad in pads:
                sch.compute_at(pad, sch.get_loops(pool)[0])
        if not epilogue_per_row(sch, names[index + 1:], sch.get_loops(pool)[0]):
            return None
        return sch
