"""What the passes that follow ``RewriteToPSB`` share: which functions run the integer network,
the spec of a layer-kernel call, and the rebuild of those functions on variants of their kernels
(``HandOffInt8Activations``, ``FuseResidualAdd``, ``ChannelsLastFloat``)."""

from __future__ import annotations

import tvm
from psb_tvm.schedules.kernels import KernelSpec, psb_layer_kernel, spec_of
from tvm import relax

from .module_copy import with_functions

#: The functions that run the integer network (``probe`` returns every layer's own float output
#: and ``attend`` runs the masked kernels: both keep the plain layer kernels).
FUNCTIONS = ("main", "cached", "forward")


def layer_kernel_spec(mod: tvm.IRModule, value) -> KernelSpec | None:
    """The spec of the layer kernel ``value`` calls, or None for any other expression (float glue,
    samplers, pack and masked kernels)."""
    if not isinstance(value, relax.Call) or value.op != tvm.ir.Op.get("relax.call_tir"):
        return None
    func = mod[value.args[0]]
    return spec_of(func) if isinstance(func, tvm.tirx.PrimFunc) else None


def function_plans(mod: tvm.IRModule, make_plan) -> dict:
    """``{name: make_plan(mod, mod[name])}`` for the ``FUNCTIONS`` the module has, where the
    plan is not empty."""
    present = {g.name_hint for g in mod.get_global_vars()}
    plans = {name: make_plan(mod, mod[name]) for name in FUNCTIONS if name in present}
    return {name: plan for name, plan in plans.items() if plan}


def rebind(mutator: relax.PyExprMutator, binding, value, same_type: bool) -> None:
    """Emit ``value`` for ``binding``: under the binding's var when the type is unchanged (the var
    may be an output of its block), else as a new var that the var's readers are remapped to."""
    if same_type:
        mutator.builder_.emit_normalized(relax.VarBinding(binding.var, mutator.builder_.normalize(value)))
    else:
        mutator.set_var_remap(binding.var, mutator.builder_.emit(value, name_hint=binding.var.name))


def rebuild(mod: tvm.IRModule, plans: dict, make_mutator, suffix) -> tuple[tvm.IRModule, dict]:
    """``mod`` with each function ``plans`` names rewritten by ``make_mutator(module, plan,
    kernel_of).visit_expr``, where ``kernel_of(spec, base_name)`` adds one layer kernel per distinct
    spec (named ``base_name + suffix(spec) + a counter``); the kernels no function calls any more
    are dropped. Returns the module and the mutators by function name."""
    bb = relax.BlockBuilder(mod)
    built = {}

    def kernel_of(spec: KernelSpec, base_name: str):
        if spec not in built:
            symbol = f"{base_name}{suffix(spec)}{len(built)}"
            built[spec] = bb.add_func(psb_layer_kernel(spec, symbol), symbol)
        return built[spec]

    mutators, functions = {}, {}
    for name, plan in plans.items():
        mutators[name] = make_mutator(bb.get(), plan, kernel_of)
        functions[name] = mutators[name].visit_expr(mod[name])
    out = with_functions(bb.get(), functions)
    keep = [g.name_hint for g, f in out.functions.items() if isinstance(f, relax.Function)]
    out = relax.transform.DeadCodeElimination(keep)(out)
    # (DeadCodeElimination keeps PrimFuncs with a global symbol: drop the layer kernels no function
    # calls any more, which would otherwise be compiled for nothing)
    called = set()
    for func in out.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, lambda e: called.add(e.name_hint)
                                            if isinstance(e, tvm.ir.GlobalVar) else None)
    dead = [g for g, f in out.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and spec_of(f) is not None and g.name_hint not in called]
    if dead:
        out = out.clone() if hasattr(out, "clone") else tvm.IRModule(dict(out.functions), attrs=out.attrs)
        for g in dead:
            del out[g]
    return out, mutators
