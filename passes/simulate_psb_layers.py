"""Rewrite chosen layers into float Relax ops that emulate PSB numerics: the diagnosis' references.

Each chosen site (with its fused bias and activation) becomes ``act(conv(x', w) + bias)`` where
``w`` is a run-time weight argument (float weights, or the represented sampled weights ``w~`` of
any n and seed) and ``x'`` the input, optionally rounded to a run-time fixed point:
``x' = q * clip(round(x * s), lo, hi) / s + (1 - q) * x`` with ``(s, lo, hi, q)`` the layer's row
of a run-time ``act`` tensor. One build thus emulates every sample count, seed and activation
width: with both weights and rounding it is the scheme in float (the layer sums in float64,
exact), which the compiled integer kernels match bit for bit. ``main(*inputs, act: [L, 4], w_0, ..., w_{L-1})``
returns ``(output, in_0, out_0, in_1, out_1, ...)``.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .rewrite_conv2d_dense_to_psb import PSBLayer, rewrite_main
from .select_psb_layers import find_layer_sites


def emulation_weight_shape(layer: PSBLayer) -> tuple:
    """Shape of a layer's weight argument: OIHW for convs, ``[in, out]`` for dense layers."""
    shape = tuple(layer.spec.w_shape)
    return (shape[1], shape[0]) if layer.spec.kind == "dense" else shape


def _emulate(layer: PSBLayer, ordinal: int, site, builder, data, act, weight) -> relax.Expr:
    spec = layer.spec
    s, lo, hi, q = (builder.emit(relax.op.reshape(relax.op.strided_slice(act, [0, 1], [ordinal, i], [ordinal + 1, i + 1]),
                                                  ())) for i in range(4))
    v = builder.emit(relax.op.multiply(data, s))  # float32, as the kernel scales
    # round half to even (the kernel's nearbyint; TVM's round is half away from zero): ties take
    # 2 * round(v / 2). Image inputs (k/255 steps) times 2^f do hit exact ties.
    tie = relax.op.equal(relax.op.abs(relax.op.subtract(v, relax.op.trunc(v))), relax.const(np.float32(0.5)))
    rounded = builder.emit(relax.op.where(tie, relax.op.multiply(relax.op.round(relax.op.multiply(v, relax.const(
        np.float32(0.5)))), relax.const(np.float32(2))), relax.op.round(v)))
    fixed = builder.emit(relax.op.divide(relax.op.astype(relax.op.minimum(relax.op.maximum(rounded, lo), hi), "float64"),
                                         relax.op.astype(s, "float64")))
    x = builder.emit(relax.op.add(relax.op.multiply(fixed, relax.op.astype(q, "float64")), relax.op.multiply(
        relax.op.astype(data, "float64"), relax.op.astype(relax.op.subtract(relax.const(np.float32(1)), q), "float64"))))
    # In float64 the sums of (x_int / 2^f) * (q 2^k_lo / n) are exact (integers times one power of
    # two, far below 2^53), so the cast to float32 rounds acc * scale exactly as the kernel's
    # float32(acc) * 2^(k_lo - f - log2 n) does: the emulation reproduces the kernel bit for bit.
    w64 = relax.op.astype(weight, "float64")
    if spec.kind == "dense":
        y = builder.emit(relax.op.matmul(x, w64))
        bias_shape = (1, -1)
    else:
        y = builder.emit(relax.Call(site.call.op, [x, w64], site.call.attrs))
        bias_shape = (1, -1, 1, 1)
    y = builder.emit(relax.op.add(relax.op.astype(y, "float32"),
                                  relax.const(layer.bias.reshape(bias_shape).astype(np.float32))))
    act_fn = spec.activation
    if act_fn == "relu":
        return relax.op.nn.relu(y)
    if isinstance(act_fn, tuple) and act_fn[0] == "clip":
        return relax.op.clip(y, float(act_fn[1]), float(act_fn[2]))
    return y


@tvm.transform.module_pass(opt_level=0, name="SimulatePSBLayers")
class SimulatePSBLayers:
    """A float module emulating ``layers`` with run-time weights and activation rounding (see the
    module docstring): the diagnosis' and the allocator's reference."""

    def __init__(self, layers: list[PSBLayer]):
        self.layers = list(layers)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        layers = self.layers
        sites = {s.index: s for s in find_layer_sites(mod["main"])}
        act = relax.Var("act", relax.TensorType((len(layers), 4), "float32"))
        weights = [relax.Var(f"w_{l}", relax.TensorType(emulation_weight_shape(layer), "float32"))
                   for l, layer in enumerate(layers)]
        inputs = {}

        def make_call(l, builder, data):
            inputs[l] = data
            return _emulate(layers[l], l, sites[layers[l].site_index], builder, data, act, weights[l])

        layers_by_var = {sites[layer.site_index].final_var: (l, sites[layer.site_index], layer, None)
                         for l, layer in enumerate(layers)}
        absorbed = {v for layer in layers for v in sites[layer.site_index].fused_vars}
        func = rewrite_main(mod, mod["main"], layers_by_var, absorbed, make_call, [act] + weights, "main",
                            expose_layers=True, expose_inputs=inputs)
        out = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"})
        out["main"] = func
        return relax.transform.DeadCodeElimination(["main"])(out)
