"""Make ``main`` return the inputs of the given linear layers: the probe that calibration runs."""

from __future__ import annotations

import tvm
from tvm import relax

from .select_psb_layers import find_layer_sites


def expose_layer_inputs(mod: tvm.IRModule, site_indices: list[int]) -> tvm.IRModule:
    """A copy of ``mod`` whose ``main`` returns a tuple of the input tensors of those sites."""
    mod = relax.transform.ToNonDataflow()(mod)
    func = mod["main"]
    sites = {s.index: s for s in find_layer_sites(func)}
    outputs = relax.Tuple([sites[i].data for i in site_indices])
    body = relax.SeqExpr(func.body.blocks, outputs)
    probe = relax.Function(func.params, body, ret_ty=outputs.ty, is_pure=func.is_pure, attrs=func.attrs)
    mod = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(dict(mod.functions))
    mod["main"] = probe  # keep the other functions: the importer emits PrimFuncs (e.g. for Clip)
    return relax.transform.DeadCodeElimination(["main"])(mod)
