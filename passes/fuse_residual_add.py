"""Fuse a residual add (and the ReLU after it) into the PSB kernel whose output it reads.

``v = psb_layer(x, ...); w = add(v, s)`` (or ``add(s, v)``), optionally ``r = relu(w)``, with
``v`` read only by the add and ``w`` only by the relu, becomes one call of the layer kernel's
``residual`` variant (``KernelSpec.residual``: "add" or "add_relu"), which takes ``s`` and computes
``relu(output + s)`` in its epilogue: the same float32 operations, so no bit changes, while the
layer's output is written once instead of written, read back by the add and written again.
Measured on Zen 5 (2 threads): ResNet-18's add + relu glue took 0.32 ms of 3.3.

Runs after ``HandOffInt8Activations`` on ``main``, ``cached`` and ``forward`` (``probe`` returns
the layer outputs themselves), on any layer kernel with a float output (its spec travels with it,
``psb.spec``), a hand-off consumer included (ResNet's second conv of a block).
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import relax

from .layer_variants import function_plans, layer_kernel_spec, rebuild
from .select_psb_layers import single_user, users_of


def _same_tensor_type(a, b) -> bool:
    ta, tb = a.ty, b.ty
    return (isinstance(ta, relax.TensorType) and isinstance(tb, relax.TensorType) and str(ta.dtype) == str(tb.dtype)
            and ta.shape is not None and tb.shape is not None
            and [int(v) for v in ta.shape.values] == [int(v) for v in tb.shape.values])


def _plan(mod: tvm.IRModule, func: relax.Function) -> dict:
    """Bindings to change: the layer call's var -> None (dropped); the add's var -> (call, spec, s,
    "add"), or None when a ReLU follows, whose var -> (call, spec, s, "add_relu")."""
    add, relu = tvm.ir.Op.get("relax.add"), tvm.ir.Op.get("relax.nn.relu")
    users = users_of(func)
    plan = {}
    for block in func.body.blocks:
        if not isinstance(block, relax.DataflowBlock):
            continue
        calls, adds = {}, set()
        for binding in block.bindings:
            var, value = binding.var, binding.value
            spec = layer_kernel_spec(mod, value)
            # (CPU kernels: the GPU schedules tile the epilogue for their own three inputs)
            if spec is not None and spec.out_handoff is None and spec.residual is None and not spec.gpu \
                    and spec.lowering != "bitserial" and single_user(users, var) is not None:
                calls[var] = (value, spec)
            elif isinstance(value, relax.Call) and value.op == add and len(value.args) == 2:
                a, b = value.args
                for v, s in ((a, b), (b, a)):
                    if isinstance(v, relax.Var) and v in calls and _same_tensor_type(v, s) and _same_tensor_type(v, var) \
                            and not (isinstance(s, relax.Var) and s.same_as(v)):
                        call, spec = calls.pop(v)
                        plan[v] = None
                        plan[var] = (call, spec, s, "add")
                        adds.add(var)
                        break
            elif isinstance(value, relax.Call) and value.op == relu and value.args[0] in adds \
                    and single_user(users, value.args[0]) is not None:
                src = value.args[0]
                call, spec, s, _ = plan[src]
                plan[src] = None
                plan[var] = (call, spec, s, "add_relu")
                adds.discard(src)
    return plan


@relax.expr_functor.mutator
class _Mutator(relax.PyExprMutator):
    def __init__(self, mod, plan: dict, kernel_of):
        super().__init__(mod)
        self.plan, self.kernel_of = plan, kernel_of

    def visit_var_binding_(self, binding):
        if binding.var not in self.plan:
            super().visit_var_binding_(binding)
            return
        item = self.plan[binding.var]
        if item is None:
            return  # folded into the fused call below
        call, spec, s, kind = item
        spec = dataclasses.replace(spec, residual=kind)
        args = list(call.args[1].fields)
        args = [self.visit_expr(a) for a in args[:-1]] + [self.visit_expr(s), self.visit_expr(args[-1])]
        value = relax.call_tir(self.kernel_of(spec, call.args[0].name_hint), args,
                               out_ty=relax.TensorType(spec.out_shape, "float32"))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(value)))


@tvm.transform.module_pass(opt_level=0, name="FuseResidualAdd")
class FuseResidualAdd:
    """Residual add (+ ReLU) into the epilogue of the layer kernel that produces one operand."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        plans = function_plans(mod, _plan)
        if not plans:
            return mod
        return rebuild(mod, plans, _Mutator, lambda spec: "_r")[0]
