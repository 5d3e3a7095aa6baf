"""Rewrite chosen conv2d / matmul sites (with their fused epilogue) into ``call_tir`` of PSB kernels.

The caller decides everything numeric (encoded weights, activation scale, lowering); this pass
builds the kernels and splices them in. Unchosen sites stay float. The result has
- sampled mode: ``main(*inputs, samples: Shape[L], seed: Shape[1])`` sampling at run time,
  ``sample(lo: Shape[L], hi: Shape[L], seed: Shape[1]) -> (counts_0, ..., counts_{L-1})`` and
  ``forward(*inputs, samples: Shape[L], counts_0, ..., counts_{L-1})`` for progressive refinement,
  ``weights(samples, seed) -> (w...)`` and ``cached(*inputs, samples, w...)``: one draw's weight
  arguments made once and reused (the runtime's weight cache). intdot layers take their integer
  weights packed at run time (``psb_pack``) by the same prepacked kernels a frozen module runs,
  other lowerings take the counts;
- frozen mode: ``main(*inputs)`` with one draw baked in as constants: for intdot layers the integer
  weights ``q`` themselves, prepacked into the kernel's layout (no weight stage per call);
and, for the localized refinement ("computational attention") of sampled modules,
``probe(*inputs, samples, seed) -> (output, layer_0, ..., layer_{L-1})`` (every PSB layer's output)
and ``attend(*inputs, samples, seed, m: Shape[L], low_0.., pos_0.., slot_0..)`` where layer ``l``
computes only its ``m_l`` listed positions and copies ``low_l`` elsewhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import tvm
from psb_tvm.schedules.kernels import (
    COUNTS_DTYPE,
    KernelSpec,
    pack_layout,
    pack_weights,
    psb_layer_kernel,
    psb_masked_kernel,
    psb_pack_kernel,
    psb_sample_kernel,
)
from tvm import relax, tirx

from psb_tvm.abi import ATTR_LAYER_KERNELS
from psb_tvm.numerics import EncodedWeights, weight_code, weights_from_counts

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

    sample: tvm.ir.GlobalVar | None  # None in frozen modules (drawn at compile time)
    layer: tvm.ir.GlobalVar
    masked: tvm.ir.GlobalVar
    threshold: object
    encoding: list  # sign, normal, shift constants (empty when prepacked; the packed code when packed at run time)
    epilogue: list  # scale, bias constants
    counts_type: object  # the sampler's output: int16 counts in the layer's storage layout
    packed: list | None = None  # frozen intdot layers: the prepacked weight constants (pack_weights)
    pack: tvm.ir.GlobalVar | None = None  # sampled intdot layers: counts -> packed weights at run time
    draw: tvm.ir.GlobalVar | None = None  # ... stratified: (threshold, seed, n) -> packed weights in one pass
    pack_types: list | None = None  # the pack kernel's output types (q and, for offset convs, wsum)


#: Kernels that read the layer's sample stream (``KernelSpec.layer``): never shared between layers.
PER_LAYER_KERNELS = ("psb_sample", "psb_draw")


def _symbol(prefix: str, name: str, index: int) -> str:
    clean = "".join(c if c.isalnum() else "_" for c in name).strip("_") or "layer"
    return f"{prefix}_{index}_{clean}"[:64]


def _i64(value) -> relax.Expr:
    return relax.prim_value(tirx.IntImm("int64", int(value)) if isinstance(value, (int, np.integer)) else value)


@relax.expr_functor.mutator
class _PSBRewriter(relax.PyExprMutator):
    """Replace each chosen site by ``make_call(l, builder, data)``; records the layer outputs."""

    def __init__(self, mod, layers_by_var: dict, absorbed: set, make_call):
        super().__init__(mod)
        self.layers_by_var = layers_by_var
        self.absorbed = absorbed
        self.make_call = make_call
        self.layer_outputs = {}

    def visit_var_binding_(self, binding):
        if binding.var in self.absorbed:
            return  # its value is computed inside the PSB kernel of a later binding
        item = self.layers_by_var.get(binding.var)
        if item is None:
            super().visit_var_binding_(binding)
            return
        ordinal, site, layer, _ = item
        data = self.visit_expr(site.data)
        spec = layer.spec
        if spec.kind == "dense" and len(site.data.ty.shape.values) != 2:
            data = self.builder_.emit(relax.op.reshape(data, spec.x_shape))
        value = self.make_call(ordinal, self.builder_, data)
        out_shape = tuple(int(v) for v in binding.var.ty.shape.values)
        if out_shape != spec.out_shape:
            kernel_out = self.builder_.emit(value)
            self.layer_outputs[ordinal] = kernel_out
            value = relax.op.reshape(kernel_out, out_shape)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(value)))
        self.layer_outputs.setdefault(ordinal, binding.var)


def _positions(spec: KernelSpec) -> tuple:
    """Shape of the position list of the masked kernel: one (b, y, x) / (row, 0, 0) per output position."""
    if spec.kind == "dense":
        return (spec.out_shape[0], 3)
    N, _, OH, OW = spec.out_shape
    return (N * OH * OW, 3)


def _slot_shape(spec: KernelSpec) -> tuple:
    if spec.kind == "dense":
        return (spec.out_shape[0],)
    N, _, OH, OW = spec.out_shape
    return (N, OH, OW)


def _sample_call(kern: _Kernels, layer: PSBLayer, lo, hi, seed):
    return relax.call_tir(kern.sample, [kern.threshold, _i64(lo), _i64(hi), _i64(seed)], out_ty=kern.counts_type)


def _shape_var(name: str, length: int, prefix: str):
    values = [tirx.Var(f"{prefix}{i}", "int64") for i in range(length)]
    return relax.Var(name, relax.ShapeType(values)), values


def rewrite_main(mod, main, layers_by_var, absorbed, make_call, extra_params, name, expose_layers=False,
                 expose_inputs: dict | None = None):
    """``main`` with each site of ``layers_by_var`` replaced by ``make_call(ordinal, builder, data)``.

    ``expose_layers``: return ``(output, layer_0, ...)``; with ``expose_inputs`` (a dict that
    ``make_call`` fills with each layer's input) ``(output, in_0, out_0, in_1, out_1, ...)``.
    """
    if expose_layers:  # layer outputs must outlive the dataflow block to be returned
        main = relax.transform.ToNonDataflow()(tvm.IRModule({"main": main}))["main"]
        sites = {s.index: s for s in find_layer_sites(main)}
        layers_by_var = {sites[item[1].index].final_var: (item[0], sites[item[1].index], item[2], item[3])
                         for item in layers_by_var.values()}
        absorbed = {v for s in sites.values() for v in s.fused_vars if s.final_var in layers_by_var}
    rewriter = _PSBRewriter(mod, layers_by_var, absorbed, make_call)
    new = rewriter.visit_expr(main)
    body = new.body
    if expose_layers:
        layer_outs = [rewriter.layer_outputs[l] for l in range(len(rewriter.layer_outputs))]
        if expose_inputs is not None:
            layer_outs = [v for l, out in enumerate(layer_outs) for v in (expose_inputs[l], out)]
        outs = relax.Tuple([body.body] + layer_outs)
        body = relax.SeqExpr(body.blocks, outs)
    func = relax.Function(list(new.params) + extra_params, body, ret_ty=body.body.ty if expose_layers else new.ret_ty,
                          is_pure=new.is_pure, attrs=new.attrs)
    if expose_layers:  # back into dataflow blocks, so FuseOps fuses the float glue as in main
        func = relax.transform.ConvertToDataflow()(tvm.IRModule({"main": func}))["main"]
    # Every function needs its own Var objects (they are all rewritten from one original).
    return relax.utils.copy_with_new_vars(func).with_attr("global_symbol", name)


@tvm.transform.module_pass(opt_level=0, name="RewriteToPSB")
class RewriteToPSB:
    """Replace the sites named by ``layers`` (``PSBLayer.site_index``, from ``find_layer_sites``
    of the same module) in ``main`` with PSB kernels, and add the functions listed above.

    ``frozen``: ``{"counts": [array per layer], "samples": [n per layer]}`` bakes one draw in.
    With no layers the module is returned unchanged.
    """

    def __init__(self, layers: list[PSBLayer], frozen: dict | None = None):
        self.layers, self.frozen = list(layers), frozen

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return _rewrite(mod, self.layers, self.frozen)


def _rewrite(mod: tvm.IRModule, layers: list[PSBLayer], frozen: dict | None) -> tvm.IRModule:
    if not layers:
        return mod
    sites = {s.index: s for s in find_layer_sites(mod["main"])}
    bb = relax.BlockBuilder(mod)
    layers_by_var, absorbed, kernels = {}, set(), []
    # Layers of one shape and numeric format share their kernels (the unrolled steps of a recurrent
    # node, a ResNet stage's repeated convs): one PrimFunc to schedule, tune and generate. Only the
    # samplers depend on the layer (its sample stream), so they stay per layer.
    shared, layer_kernels, encodings = {}, {}, {}
    for ordinal, layer in enumerate(layers):
        site = sites.get(layer.site_index)
        if site is None or site.kind != layer.spec.kind or site.weight is None \
                or tuple(site.weight.shape) != tuple(layer.spec.w_shape):
            raise ValueError(f"RewriteToPSB: layer {layer.name!r} ({layer.spec.kind} {tuple(layer.spec.w_shape)}) does not "
                             f"match site {layer.site_index} of this module; plan the layers on the module you rewrite")
        if not site.convertible:
            raise ValueError(f"layer {layer.name!r} cannot be PSB: {site.reason}")
        enc = layer.enc
        spec, packed = layer.spec, None
        if frozen is not None and spec.lowering == "intdot":
            spec = dataclasses.replace(spec, prepacked=True)
            q = weights_from_counts(enc, frozen["counts"][ordinal], frozen["samples"][ordinal])
            packed = [relax.const(a) for a in pack_weights(spec, q)]

        def add(prefix, make, spec=spec):
            key = (prefix, spec if prefix in PER_LAYER_KERNELS else dataclasses.replace(spec, layer=0))
            if key not in shared:
                symbol = _symbol(prefix, layer.name, site.index)
                shared[key] = bb.add_func(make(spec, symbol), symbol)
            layer_kernels.setdefault(str(site.index), {})[prefix] = shared[key].name_hint
            return shared[key]

        # Sampled intdot layers run the prepacked kernel on weights packed at run time; their
        # threshold, counts and one-byte weight code are stored in the kernel's weight layout
        # (KernelSpec.packed_encoding); the prepacked layer kernel reads no encoding at all.
        run_packed = frozen is None and spec.lowering == "intdot"
        layer_spec = dataclasses.replace(spec, prepacked=True) if run_packed else spec
        if run_packed:
            spec = dataclasses.replace(spec, packed_encoding=True)
        # Layers sharing one encoding (the same weights: an unrolled recurrent node's steps) share
        # its constants too: one copy in the module.
        form = (id(enc), run_packed, packed is not None, spec.threshold_dtype, spec.weight_layout)
        if form not in encodings:
            threshold = np.asarray(enc.threshold).astype(spec.threshold_dtype)
            if run_packed:
                encodings[form] = (relax.const(pack_layout(spec, threshold)),
                                   [relax.const(pack_layout(spec, weight_code(enc)))])
            else:  # frozen intdot layers read their prepacked q, no encoding
                encodings[form] = (relax.const(threshold), [] if packed is not None else
                                   [relax.const(a) for a in (enc.sign, enc.normal, enc.shift)])
        threshold_const, encoding = encodings[form]
        storage = spec.packed_weight_shape if spec.packed_encoding else spec.w_shape
        kern = _Kernels(
            sample=None if frozen is not None else add("psb_sample", psb_sample_kernel, spec),  # frozen: drawn here
            layer=add("psb", psb_layer_kernel, layer_spec),
            masked=None if frozen is not None else add("psb_masked", psb_masked_kernel, spec),
            threshold=threshold_const,
            encoding=encoding,
            counts_type=relax.TensorType(storage, COUNTS_DTYPE),
            epilogue=[relax.const(a) for a in (layer.scale, layer.bias)],
            packed=packed,
            pack=add("psb_pack", psb_pack_kernel, spec) if run_packed else None,
            draw=add("psb_draw", lambda sp, sym: psb_pack_kernel(sp, sym, draw=True), spec)
            if run_packed and spec.sampler == "stratified" else None,
            pack_types=([relax.TensorType(layer_spec.packed_weight_shape, layer_spec.q_dtype)]
                        + ([relax.TensorType((spec.w_shape[0],), "int32")] if layer_spec.dot_offset else []))
            if run_packed else None,
        )
        kernels.append(kern)
        layers_by_var[site.final_var] = (ordinal, site, layer, kern)
        absorbed.update(site.fused_vars)
    base = bb.get()
    main = base["main"]
    L = len(layers)
    funcs = {}
    def _packed(l, builder, func, args):
        types = kernels[l].pack_types
        packed = builder.emit(relax.call_tir(func, args, out_ty=types if len(types) > 1 else types[0]))
        if len(types) == 1:
            return [packed]
        return [builder.emit(relax.TupleGetItem(packed, i)) for i in range(len(types))]

    def draw_weights(l, builder, counts, n):
        """What layer ``l`` keeps of a draw (the weight cache's entry) from its counts: its weights
        packed at run time (intdot) or the counts (the other lowerings build their weights in the
        layer kernel)."""
        kern = kernels[l]
        if kern.pack is None:
            return [counts]
        return _packed(l, builder, kern.pack, [counts] + kern.encoding + [n])

    def sampled_weights(l, builder, n, sd):
        """``draw_weights`` of the draw ``[0, n)`` of seed ``sd``: in one pass where the layer has
        a draw kernel (stratified intdot), else sampler then pack."""
        kern = kernels[l]
        if kern.draw is not None:
            return _packed(l, builder, kern.draw, [kern.threshold] + kern.encoding + [_i64(n[l]), _i64(sd)])
        return draw_weights(l, builder, draw_counts(builder, l, n, sd), _i64(n[l]))

    def weight_args(l, drawn):
        """The layer kernel's weight arguments from ``draw_weights``'s tensors."""
        return drawn if kernels[l].pack is not None else drawn + kernels[l].encoding

    def weight_types(l):
        kern = kernels[l]
        return kern.pack_types if kern.pack is not None else [kern.counts_type]

    def layer_call(l, data, weights, n):
        args = [data] + weights + kernels[l].epilogue + [n]
        return relax.call_tir(kernels[l].layer, args, out_ty=relax.TensorType(layers[l].spec.out_shape, "float32"))

    def plain_call(counts_of, n_of, drawn_of=None):
        """Layer calls on constant packed weights (frozen), on ``drawn_of(l, builder)``'s weights, or
        on weights from ``counts_of(l, builder)``."""
        def make(l, builder, data):
            kern = kernels[l]
            if kern.packed is not None:
                return layer_call(l, data, kern.packed, n_of(l))
            drawn = (drawn_of(l, builder) if drawn_of is not None
                     else draw_weights(l, builder, counts_of(l, builder), n_of(l)))
            return layer_call(l, data, weight_args(l, drawn), n_of(l))

        return make

    def rewrite(make_call, extra, name, expose=False):
        return rewrite_main(base, main, layers_by_var, absorbed, make_call, extra, name, expose)

    if frozen is not None:
        # counts constants only for the layers whose weights are not prepacked (shiftadd, bitserial)
        consts = [None if k.packed is not None else relax.const(np.asarray(c, COUNTS_DTYPE))
                  for k, c in zip(kernels, frozen["counts"])]
        funcs["main"] = rewrite(plain_call(lambda l, _b: consts[l], lambda l: _i64(frozen["samples"][l])), [], "main")
    else:
        def draw_counts(builder, l, n, sd):
            return builder.emit(_sample_call(kernels[l], layers[l], 0, n[l], sd))

        def sampled(n, sd):
            return lambda l, builder: draw_counts(builder, l, n, sd)

        def drawn(n, sd):
            return lambda l, builder: sampled_weights(l, builder, n, sd)

        samples, n = _shape_var("samples", L, "n")
        seed, (sd,) = _shape_var("seed", 1, "seed")
        funcs["main"] = rewrite(plain_call(None, lambda l: _i64(n[l]), drawn(n, sd)), [samples, seed], "main")

        samples, n = _shape_var("samples", L, "n")
        counts = [relax.Var(f"counts_{l}", kernels[l].counts_type) for l in range(L)]
        funcs["forward"] = rewrite(plain_call(lambda l, _b: counts[l], lambda l: _i64(n[l])), [samples] + counts,
                                   "forward")

        samples, n = _shape_var("samples", L, "n")
        seed, (sd,) = _shape_var("seed", 1, "seed")
        funcs["probe"] = rewrite(plain_call(None, lambda l: _i64(n[l]), drawn(n, sd)), [samples, seed], "probe",
                                 expose=True)

        samples, n = _shape_var("samples", L, "n")
        seed, (sd,) = _shape_var("seed", 1, "seed")
        m_param, m = _shape_var("m", L, "m")
        lows = [relax.Var(f"low_{l}", relax.TensorType(layers[l].spec.out_shape, "float32")) for l in range(L)]
        pos = [relax.Var(f"pos_{l}", relax.TensorType(_positions(layers[l].spec), "int32")) for l in range(L)]
        slot = [relax.Var(f"slot_{l}", relax.TensorType(_slot_shape(layers[l].spec), "int32")) for l in range(L)]
        draw = sampled(n, sd)

        def masked_call(l, builder, data):
            args = ([data, draw(l, builder)] + kernels[l].encoding + kernels[l].epilogue
                    + [lows[l], pos[l], slot[l], _i64(n[l]), _i64(m[l])])
            return relax.call_tir(kernels[l].masked, args, out_ty=relax.TensorType(layers[l].spec.out_shape, "float32"))

        funcs["attend"] = rewrite(masked_call, [samples, seed, m_param] + lows + pos + slot, "attend")

        # The weight cache: one draw's weight arguments, then the network on them.
        samples, n = _shape_var("samples", L, "n")
        seed, (sd,) = _shape_var("seed", 1, "seed")
        wbb = relax.BlockBuilder(base)
        with wbb.function("weights", [samples, seed]):
            with wbb.dataflow():
                outs = [w for l in range(L) for w in sampled_weights(l, wbb, n, sd)]
                result = wbb.emit_output(relax.Tuple(outs))
            wbb.emit_func_output(result)
        funcs["weights"] = wbb.get()["weights"]

        samples, n = _shape_var("samples", L, "n")
        wparams = [[relax.Var(f"w_{l}_{i}", t) for i, t in enumerate(weight_types(l))] for l in range(L)]

        def cached_call(l, _builder, data):
            return layer_call(l, data, weight_args(l, wparams[l]), _i64(n[l]))

        funcs["cached"] = rewrite(cached_call, [samples] + [v for ws in wparams for v in ws], "cached")

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
    return relax.transform.DeadCodeElimination(list(funcs))(out).with_attr(ATTR_LAYER_KERNELS, layer_kernels)
