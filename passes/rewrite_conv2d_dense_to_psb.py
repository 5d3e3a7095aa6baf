"""Rewrite chosen conv2d / matmul sites (with their bias add and ReLU) into ``call_tir`` of PSB kernels.

The caller decides everything numeric (encoded weights, activation scale, lowering, sample count);
this pass only builds the kernels and splices them into the graph. Unchosen sites stay float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from psb_tvm.numerics import EncodedWeights
from psb_tvm.schedules.kernels import KernelSpec, psb_kernel

from .select_psb_layers import LayerSite, find_layer_sites


@dataclass
class PSBLayer:
    """What the rewrite needs for one layer: its site, kernel spec and constants."""

    site_index: int
    name: str
    spec: KernelSpec
    enc: EncodedWeights
    scale: np.ndarray  # float32 [O]: 2**(k_lo - f - log2 n)
    bias: np.ndarray  # float32 [O]


def _symbol(name: str, index: int) -> str:
    clean = "".join(c if c.isalnum() else "_" for c in name).strip("_") or "layer"
    return f"psb_{index}_{clean}"[:64]


@relax.expr_functor.mutator
class _PSBRewriter(relax.PyExprMutator):
    def __init__(self, mod, layers_by_var: dict, absorbed: set):
        super().__init__(mod)
        self.layers_by_var = layers_by_var
        self.absorbed = absorbed

    def visit_var_binding_(self, binding):
        if binding.var in self.absorbed:
            return  # its value is computed inside the PSB kernel of a later binding
        item = self.layers_by_var.get(binding.var)
        if item is None:
            super().visit_var_binding_(binding)
            return
        site, layer = item
        data = self.visit_expr(site.data)
        spec = layer.spec
        if spec.kind == "dense" and len(site.data.ty.shape.values) != 2:
            data = self.builder_.emit(relax.op.reshape(data, spec.x_shape))
        func = psb_kernel(spec, _symbol(layer.name, site.index))
        gv = self.builder_.add_func(func, func.attrs["global_symbol"])
        enc = layer.enc
        args = [data] + [relax.const(a) for a in (enc.threshold, enc.sign, enc.normal, enc.shift, layer.scale, layer.bias)]
        value = relax.call_tir(gv, args, out_ty=relax.TensorType(spec.out_shape, "float32"))
        out_shape = tuple(int(v) for v in binding.var.ty.shape.values)
        if out_shape != spec.out_shape:
            value = relax.op.reshape(self.builder_.emit(value), out_shape)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(value)))


def rewrite_to_psb(mod: tvm.IRModule, layers: list[PSBLayer]) -> tvm.IRModule:
    """Replace the sites named by ``layers`` (by ``LayerSite.index``) in ``mod["main"]``."""
    if not layers:
        return mod
    sites = {s.index: s for s in find_layer_sites(mod["main"])}
    layers_by_var, absorbed = {}, set()
    for layer in layers:
        site: LayerSite = sites[layer.site_index]
        if not site.convertible:
            raise ValueError(f"layer {layer.name!r} cannot be PSB: {site.reason}")
        layers_by_var[site.final_var] = (site, layer)
        absorbed.update(site.fused_vars)
    rewriter = _PSBRewriter(mod, layers_by_var, absorbed)
    main = rewriter.visit_expr(mod["main"])
    rewriter.builder_.update_func(mod.get_global_var("main"), main)
    out = rewriter.builder_.get()
    return relax.transform.DeadCodeElimination(["main"])(out)
