"""Make ``main`` return the inputs of the given linear layers: the probe that calibration runs."""

from __future__ import annotations

import tvm
from tvm import relax

from .module_copy import with_functions
from .select_psb_layers import find_layer_sites


@tvm.transform.module_pass(opt_level=0, name="ExposeLayerInputs")
class ExposeLayerInputs:
    """``main`` returns a tuple of the input tensors of the linear-layer sites ``site_indices``
    (``LayerSite.index`` of ``find_layer_sites``) instead of its outputs; the other functions are
    kept (the importer emits PrimFuncs, e.g. for Clip)."""

    def __init__(self, site_indices):
        self.site_indices = [int(i) for i in site_indices]

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod = relax.transform.ToNonDataflow()(mod)
        func = mod["main"]
        sites = {s.index: s for s in find_layer_sites(func)}
        missing = sorted(set(self.site_indices) - set(sites))
        if missing:
            raise ValueError(f"ExposeLayerInputs: main has no linear-layer sites {missing} (it has {sorted(sites)})")
        outputs = relax.Tuple([sites[i].data for i in self.site_indices])
        body = relax.SeqExpr(func.body.blocks, outputs)
        probe = relax.Function(func.params, body, ret_ty=outputs.ty, is_pure=func.is_pure, attrs=func.attrs)
        return relax.transform.DeadCodeElimination(["main"])(with_functions(mod, {"main": probe}))
