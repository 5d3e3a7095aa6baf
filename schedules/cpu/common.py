"""Small scheduling helpers shared by the CPU rules."""

from __future__ import annotations

from tvm import s_tir

#: Vector lanes the default schedules aim for (16 x int32 = one AVX-512 register).
VECTOR_LANES = 16


def loop_extents(sch: s_tir.Schedule, loops) -> list[int]:
    return [int(sch.get(loop).extent) for loop in loops]


def block_names(sch: s_tir.Schedule) -> set:
    """Names of the top-level blocks of the scheduled function (which optional stages it has)."""
    return {sch.get(block).name_hint for block in sch.get_child_blocks(sch.get_sblock("root"))}


def largest_divisor(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is at most ``cap`` (vectorizing needs no tail)."""
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def vectorize_below_reductions(sch: s_tir.Schedule, acc, outer: list, axis, reductions: list, n_parallel: int) -> None:
    """Split ``axis`` into a tail-free vector part placed below the reductions, so every lane keeps
    its own sum (no horizontal adds); parallelize the first ``n_parallel`` loops of ``outer + [axis
    outer part]`` (fused), and split off the vectorized init block (after parallel: it needs the
    complete reduction block)."""
    lanes = largest_divisor(loop_extents(sch, [axis])[0], VECTOR_LANES)
    ao, ai = sch.split(axis, [None, lanes])
    sch.reorder(*outer, ao, *reductions, ai)
    par = [*outer, ao][:n_parallel]
    sch.parallel(sch.fuse(*par) if len(par) > 1 else par[0])
    vectorize_reduction(sch, acc, ai, reductions[0], lanes)


def vectorize_reduction(sch: s_tir.Schedule, block, lane_loop, reduction_loop, lanes: int) -> None:
    """Vectorize ``lane_loop`` (when ``lanes > 1``), then split ``block``'s init off at
    ``reduction_loop``, vectorized alike. The order matters: vectorizing needs the complete
    reduction block, which decompose_reduction splits."""
    if lanes > 1:
        sch.vectorize(lane_loop)
    init = sch.decompose_reduction(block, reduction_loop)
    if lanes > 1:
        sch.vectorize(sch.get_loops(init)[-1])


def parallel_vectorize(sch: s_tir.Schedule, block, lanes: int = VECTOR_LANES) -> None:
    """Elementwise nest: fuse all loops, parallelize the outer part, vectorize a tail-free inner part."""
    loops = sch.get_loops(block)
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    total = int(sch.get(fused).extent)
    vec = largest_divisor(total, lanes)
    if vec > 1:
        outer, inner = sch.split(fused, [None, vec])
        sch.parallel(outer)
        sch.vectorize(inner)
    else:
        sch.parallel(fused)


def root_blocks(sch: s_tir.Schedule) -> list | None:
    """The blocks under the root block, or None when the function has no root block (not a
    schedulable nest)."""
    try:
        return list(sch.get_child_blocks(sch.get_sblock("root")))
    except Exception:  # noqa: BLE001 - no root block
        return None


def epilogue_per_row(sch: s_tir.Schedule, names: list, row) -> bool:
    """Place the elementwise blocks ``names`` (bias, activation, an average's division) under the
    main nest's ``row`` loop, each vectorized over a tail-free part of its innermost loop, so each
    row is finished while in cache. False when one does not follow the nest row by row."""
    for name in names:
        block = sch.get_sblock(name)
        try:
            sch.reverse_compute_at(block, row)
        except s_tir.ScheduleError:
            return False
        inner = sch.get_loops(block)[-1]
        n = largest_divisor(loop_extents(sch, [inner])[0], VECTOR_LANES)
        if n > 1:
            sch.vectorize(sch.split(inner, [None, n])[1])
    return True
