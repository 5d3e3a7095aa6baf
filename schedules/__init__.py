"""PSB kernels (TE/TIR) and their schedules per target."""

from . import cpu, gpu


def default_rules(target) -> list:
    """The schedule rules tried in order on every unscheduled PrimFunc for ``target``'s kind: the
    GPU rules (PSB kernels only; TVM's own GPU rules take the float glue) for CUDA, else the CPU
    rules."""
    return gpu.default_rules() if target.kind.name == "cuda" else cpu.default_rules()
