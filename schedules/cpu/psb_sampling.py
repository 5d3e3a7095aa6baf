"""Default CPU schedule of the stages every PSB kernel shares: sampling and activation quantization."""

from __future__ import annotations

from tvm import s_tir

from .common import parallel_vectorize


def schedule_shared_stages(sch: s_tir.Schedule) -> None:
    """Parallelize weight sampling over weights (samples stay innermost) and vectorize ``xq``."""
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if "count" in names:
        count = sch.get_sblock("count")
        spatial = sch.get_loops(count)[:-1]
        sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
    q = sch.get_sblock("q")
    qloops = sch.get_loops(q)
    sch.parallel(sch.fuse(*qloops) if len(qloops) > 1 else qloops[0])
    parallel_vectorize(sch, sch.get_sblock("xq"))
