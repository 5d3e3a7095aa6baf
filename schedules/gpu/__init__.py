"""Default GPU schedule rules for PSB kernels (thread binding; no tuning yet)."""

from .psb_fallback import PSBGpuFallback


def default_rules():
    """Rules applied to PSB PrimFuncs before TVM's own GPU rules see the module."""
    return [PSBGpuFallback()]


__all__ = ["PSBGpuFallback", "default_rules"]
