"""Default GPU schedule rules for PSB kernels (dlight style, one rule per file), and the CUDA
intrinsic lowering they need (``intrinsics``, registered on import)."""

from . import intrinsics  # noqa: F401 - registers the CUDA lowering of tirx.popcount
from .psb_fallback import PSBGpuFallback
from .psb_intdot_tiled import PSBIntdotTiled


def default_rules():
    """Rules applied to PSB PrimFuncs before TVM's own GPU rules see the module: the tiled
    integer-dot-product kernels first, thread binding for every other PSB kernel."""
    return [PSBIntdotTiled(), PSBGpuFallback()]


__all__ = ["PSBGpuFallback", "PSBIntdotTiled", "default_rules"]
