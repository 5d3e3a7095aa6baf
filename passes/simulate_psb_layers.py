"""Rewrite chosen layers into float Relax ops that emulate PSB numerics: the diagnosis' references.

Each chosen site (with its fused bias and activation) becomes
``act(conv(x', w') + bias)`` where ``x'`` is the input, optionally rounded to the layer's fixed
point (``clip(round(x * 2^f), lo, hi) / 2^f``), and ``w'`` the float weights or the represented
sampled weights ``w~``. With both the scheme is emulated in float: the compiled integer kernel
must agree with it up to float summation order, so a larger difference is a kernel or rewrite
defect, not sampling. ``main`` returns ``(output, layer_input_0, layer_output_0, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from psb_tvm import numerics

from .rewrite_conv2d_dense_to_psb import PSBLayer, rewrite_main
from .select_psb_layers import find_layer_sites


@dataclass
class SimulatedLayer:
    """One layer of the emulation: its PSB layer and what to emulate."""

    layer: PSBLayer
    weight: np.ndarray  # conv OIHW / dense [out, in]: float or represented sampled weights
    quantize: bool  # round the input to the layer's fixed point


def _f32(value) -> relax.Expr:
    return relax.const(np.float32(value))


def _emulate(sim: SimulatedLayer, site, builder, data) -> relax.Expr:
    spec = sim.layer.spec
    x = data
    if sim.quantize:
        lo, hi = numerics.act_range(spec.act_bits, spec.act_signed)
        scaled = builder.emit(relax.op.multiply(x, _f32(2.0 ** spec.frac_bits)))
        # TVM's round is half away from zero, the kernel's nearbyint half to even: they differ
        # only on exact ties, which float inputs times 2^f hit with negligible frequency.
        rounded = builder.emit(relax.op.clip(relax.op.round(scaled), lo, hi))
        x = builder.emit(relax.op.multiply(rounded, _f32(2.0 ** -spec.frac_bits)))
    w = sim.weight.astype(np.float32)
    if spec.kind == "dense":
        y = builder.emit(relax.op.matmul(x, relax.const(np.ascontiguousarray(w.T))))
        bias_shape = (1, -1)
    else:
        y = builder.emit(relax.Call(site.call.op, [x, relax.const(w)], site.call.attrs))
        bias_shape = (1, -1, 1, 1)
    y = builder.emit(relax.op.add(y, relax.const(sim.layer.bias.reshape(bias_shape).astype(np.float32))))
    act = spec.activation
    if act == "relu":
        return relax.op.nn.relu(y)
    if isinstance(act, tuple) and act[0] == "clip":
        return relax.op.clip(y, float(act[1]), float(act[2]))
    return y


def simulate_psb(mod: tvm.IRModule, sims: list[SimulatedLayer]) -> tvm.IRModule:
    """A float module whose ``main`` emulates ``sims`` and returns
    ``(output, in_0, out_0, in_1, out_1, ...)`` for every simulated layer, in order."""
    sites = {s.index: s for s in find_layer_sites(mod["main"])}
    inputs = {}

    def make_call(l, builder, data):
        inputs[l] = data
        return _emulate(sims[l], sites[sims[l].layer.site_index], builder, data)

    layers_by_var = {sites[s.layer.site_index].final_var: (l, sites[s.layer.site_index], s.layer, None)
                     for l, s in enumerate(sims)}
    absorbed = {v for s in sims for v in sites[s.layer.site_index].fused_vars}
    func = rewrite_main(mod, mod["main"], layers_by_var, absorbed, make_call, [], "main", expose_layers=True,
                        expose_inputs=inputs)
    out = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"})
    out["main"] = func
    return relax.transform.DeadCodeElimination(["main"])(out)
