"""Rewrite chosen conv2d / matmul sites (with their fused epilogue) into ``call_tir`` of PSB kernels.

The caller decides everything numeric (encoded weights, activation scale, lowering); this pass
builds the kernels and splices them in. Unchosen sites stay float. The result has
- sampled mode: ``main(*inputs, samples: Shape[L], seed: Shape[1])`` sampling at run time,
  ``sample(lo: Shape[L], hi: Shape[L], seed: Shape[1]) -> (counts_0, ..., counts_{L-1})`` and
  ``forward(*inputs, samples: Shape[L], counts_0, ..., counts_{L-1})`` for progressive refinement;
- frozen mode: ``main(*inputs)`` with one draw of the counts baked in as constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx

from psb_tvm.numerics import EncodedWeights
from psb_tvm.schedules.kernels import COUNTS_DTYPE, KernelSpec, psb_layer_kernel, psb_sample_kernel

from .select_psb_layers import find_layer_sites


@dataclass
class PSBLayer:
    """What the rewrite needs for one layer: its site, kernel spec and constants."""

    site_index: int
    name: str
    spec: KernelSpec
    enc: EncodedWeights
    scale: np.ndarray  # float32 [O]: 2**(k_lo - f); the kernel divides by n
    bias: np.ndarray  # float32 [O]


@dataclass
class _Kernels:
    """Per-layer global vars and shared constants (one copy used by every function)."""

    sample: tvm.ir.GlobalVar
    layer: tvm.ir.GlobalVar
    threshold: object
    rest: list  # sign, normal, shift, scale, bias constants


def _symbol(prefix: str, name: str, index: int) -> str:
    clean = "".join(c if c.isalnum() else "_" for c in name).strip("_") or "layer"
    return f"{prefix}_{index}_{clean}"[:64]


def _i64(value) -> relax.Expr:
    return relax.prim_value(tirx.IntImm("int64", int(value)) if isinstance(value, (int, np.integer)) else value)


@relax.expr_functor.mutator
class _PSBRewriter(relax.PyExprMutator):
    """Replace each chosen site; ``operands(l)`` gives layer ``l``'s (counts expr, n expr)."""

    def __init__(self, mod, layers_by_var: dict, absorbed: set, operands):
        super().__init__(mod)
        self.layers_by_var = layers_by_var
        self.absorbed = absorbed
        self.operands = operands

    def visit_var_binding_(self, binding):
        if binding.var in self.absorbed:
            return  # its value is computed inside the PSB kernel of a later binding
        item = self.layers_by_var.get(binding.var)
        if item is None:
            super().visit_var_binding_(binding)
            return
        ordinal, site, layer, kern = item
        data = self.visit_expr(site.data)
        spec = layer.spec
        if spec.kind == "dense" and len(site.data.ty.shape.values) != 2:
            data = self.builder_.emit(relax.op.reshape(data, spec.x_shape))
        counts, n = self.operands(ordinal, self.builder_)
        args = [data, counts] + kern.rest + [n]
        value = relax.call_tir(kern.layer, args, out_ty=relax.TensorType(spec.out_shape, "float32"))
        out_shape = tuple(int(v) for v in binding.var.ty.shape.values)
        if out_shape != spec.out_shape:
            value = relax.op.reshape(self.builder_.emit(value), out_shape)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(value)))


def _counts_type(layer: PSBLayer):
    return relax.TensorType(layer.spec.w_shape, COUNTS_DTYPE)


def _sample_call(kern: _Kernels, layer: PSBLayer, lo, hi, seed):
    return relax.call_tir(kern.sample, [kern.threshold, _i64(lo), _i64(hi), _i64(seed)], out_ty=_counts_type(layer))


def _shape_var(name: str, length: int, prefix: str):
    values = [tirx.Var(f"{prefix}{i}", "int64") for i in range(length)]
    return relax.Var(name, relax.ShapeType(values)), values


def _rewrite_main(mod, main, layers_by_var, absorbed, operands, extra_params, name):
    rewriter = _PSBRewriter(mod, layers_by_var, absorbed, operands)
    new = rewriter.visit_expr(main)
    func = relax.Function(list(new.params) + extra_params, new.body, ret_ty=new.ret_ty, is_pure=new.is_pure,
                          attrs=new.attrs)
    # Every function needs its own Var objects (main and forward are rewritten from one original).
    return relax.utils.copy_with_new_vars(func).with_attr("global_symbol", name)


def rewrite_to_psb(mod: tvm.IRModule, layers: list[PSBLayer], frozen: dict | None = None) -> tvm.IRModule:
    """Replace the sites named by ``layers`` (by ``LayerSite.index``) in ``mod["main"]``.

    ``frozen``: ``{"counts": [array per layer], "samples": [n per layer]}`` bakes one draw in.
    """
    if not layers:
        return mod
    sites = {s.index: s for s in find_layer_sites(mod["main"])}
    bb = relax.BlockBuilder(mod)
    layers_by_var, absorbed, kernels = {}, set(), []
    for ordinal, layer in enumerate(layers):
        site = sites[layer.site_index]
        if not site.convertible:
            raise ValueError(f"layer {layer.name!r} cannot be PSB: {site.reason}")
        enc = layer.enc
        kern = _Kernels(
            sample=bb.add_func(psb_sample_kernel(layer.spec, _symbol("psb_sample", layer.name, site.index)),
                               _symbol("psb_sample", layer.name, site.index)),
            layer=bb.add_func(psb_layer_kernel(layer.spec, _symbol("psb", layer.name, site.index)),
                              _symbol("psb", layer.name, site.index)),
            threshold=relax.const(enc.threshold),
            rest=[relax.const(a) for a in (enc.sign, enc.normal, enc.shift, layer.scale, layer.bias)],
        )
        kernels.append(kern)
        layers_by_var[site.final_var] = (ordinal, site, layer, kern)
        absorbed.update(site.fused_vars)
    base = bb.get()
    main = base["main"]
    L = len(layers)
    funcs = {}
    if frozen is not None:
        consts = [relax.const(np.asarray(c, np.int16)) for c in frozen["counts"]]
        funcs["main"] = _rewrite_main(base, main, layers_by_var, absorbed,
                                      lambda l, _b: (consts[l], _i64(frozen["samples"][l])), [], "main")
    else:
        samples, n = _shape_var("samples", L, "n")
        seed, (sd,) = _shape_var("seed", 1, "seed")

        def sampled(l, builder):
            return builder.emit(_sample_call(kernels[l], layers[l], 0, n[l], sd)), _i64(n[l])

        funcs["main"] = _rewrite_main(base, main, layers_by_var, absorbed, sampled, [samples, seed], "main")
        f_samples, fn = _shape_var("samples", L, "n")
        counts = [relax.Var(f"counts_{l}", _counts_type(layers[l])) for l in range(L)]
        funcs["forward"] = _rewrite_main(base, main, layers_by_var, absorbed,
                                         lambda l, _b: (counts[l], _i64(fn[l])), [f_samples] + counts, "forward")
        lo, lo_v = _shape_var("lo", L, "lo")
        hi, hi_v = _shape_var("hi", L, "hi")
        s_seed, (ssd,) = _shape_var("seed", 1, "seed")
        sbb = relax.BlockBuilder(base)
        with sbb.function("sample", [lo, hi, s_seed]):
            with sbb.dataflow():
                outs = [sbb.emit(_sample_call(kernels[l], layers[l], lo_v[l], hi_v[l], ssd)) for l in range(L)]
                result = sbb.emit_output(relax.Tuple(outs))
            sbb.emit_func_output(result)
        funcs["sample"] = sbb.get()["sample"]
    out = tvm.IRModule({gv: f for gv, f in base.functions.items() if gv.name_hint != "main"})
    for name, func in funcs.items():
        out[name] = func
    return relax.transform.DeadCodeElimination(list(funcs))(out)
