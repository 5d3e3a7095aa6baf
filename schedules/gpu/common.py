"""Small scheduling helpers shared by the GPU rules."""

from __future__ import annotations

from tvm import s_tir

#: Threads per block of the elementwise stages.
ELEMENTWISE_THREADS = 256


def bind_spatial(sch: s_tir.Schedule, block, threads: int = ELEMENTWISE_THREADS) -> None:
    """One thread per output element of ``block``: its spatial loops fused and split over
    blocks x threads; reduction loops (a weight sum) stay serial inside each thread."""
    spatial = [lp for lp, iv in zip(sch.get_loops(block), sch.get(block).iter_vars) if iv.iter_type == 0]
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
