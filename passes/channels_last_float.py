"""Keep float32 activations channels-last between packed conv kernels.

A packed CPU conv (vnni, vnni16) works on NHWC activations and NHWC accumulators inside; with a
float32 NCHW tensor between two of them, the producer's epilogue transposes its accumulators into
NCHW (gathers) and the consumer's activation stage transposes them back (byte scatters). Where a
layer kernel's float output is read only by such kernels, as their input ``x`` or as a fused
residual operand, or by a global average pool (``mean`` over the rows and columns), or by a
max pool whose output is read so in turn, it is written NHWC instead (``KernelSpec.out_nhwc``)
and read so (``x_nhwc``, ``res_nhwc``; the mean over axes 1 and 2, each channel's sum in the
same order, reshaped back when it keeps its dims; the max pool in NHWC layout, the same
windows): the same floats in another order, so no output changes by a bit.
Measured on Zen 5 (2 threads, int8 preset, kernels alone): ResNet-18's first conv of layer1
0.152 -> 0.127 ms with both sides channels-last, MobileNetV2's 320 -> 1280 conv 0.041 -> 0.030.

Runs after ``FuseResidualAdd`` on ``main``, ``cached`` and ``forward``; ``probe`` keeps every
layer's NCHW output. Tensors read by anything else (other pooling, the function's result, a
float glue op) stay NCHW, so the graph's inputs and outputs keep their layout. The kernels that read
or write NHWC floats carry ``_c`` in their names.
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import relax

from psb_tvm.abi import ATTR_LAYER_KERNELS

from .layer_variants import function_plans, layer_kernel_spec, rebind, rebuild
from .select_psb_layers import users_of


def _roles(call: relax.Call, spec) -> dict:
    """The tensors a layer-kernel call reads as activations: var -> roles ("x", "res")."""
    fields = list(call.args[1].fields)
    roles = {}
    if isinstance(fields[0], relax.Var):
        roles.setdefault(fields[0], set()).add("x")
    if spec.residual and isinstance(fields[-2], relax.Var):  # (the operand sits before n)
        roles.setdefault(fields[-2], set()).add("res")
    return roles


def _spatial_mean(value) -> bool:
    """``mean(x, axis=[2, 3])`` of a 4-D tensor (a global average pool)."""
    if not (isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.mean")
            and isinstance(value.args[0], relax.Var)):
        return False
    shape = getattr(value.args[0].ty, "shape", None)
    if shape is None or len(shape.values) != 4 or value.attrs.axis is None:
        return False
    return sorted(int(a) % 4 for a in value.attrs.axis) == [2, 3]


def _max_pool(value) -> bool:
    """A 2-D max pool of an NCHW tensor (ResNet's after its stem)."""
    return (isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.nn.max_pool2d")
            and isinstance(value.args[0], relax.Var) and str(value.attrs.layout) == "NCHW"
            and str(value.attrs.out_layout) == "NCHW")


def _plan(mod: tvm.IRModule, func: relax.Function) -> dict:
    """Layer-kernel var -> its channels-last spec, for the calls that change; a global average
    pool's var -> "mean" and a max pool's -> "max_pool" where their input becomes NHWC."""
    kernels, means, pools = {}, {}, {}  # (means, pools: var -> the tensor they read)
    for block in func.body.blocks:
        if isinstance(block, relax.DataflowBlock):
            for binding in block.bindings:
                spec = layer_kernel_spec(mod, binding.value)
                if spec is not None and spec.packed_cpu_conv:
                    kernels[binding.var] = (binding.value, spec)
                elif _spatial_mean(binding.value):
                    means[binding.var] = binding.value.args[0]
                elif _max_pool(binding.value):
                    pools[binding.var] = binding.value.args[0]
    users = users_of(func)

    def readers_ok(var) -> bool:
        """Read only by packed convs as x (float) / res, by global average pools (the same sums
        over an NHWC tensor's rows and columns) or by max pools whose readers are such."""
        for user in users.get(var, []):
            if user is not None and user.var in means:
                continue
            if user is not None and pools.get(user.var) is not None and pools[user.var].same_as(var):
                if readers_ok(user.var):
                    continue
                return False
            if user is None or user.var not in kernels:
                return False
            call, spec = kernels[user.var]
            roles = _roles(call, spec).get(var, set())
            reads = sum(1 for a in call.args[1].fields if isinstance(a, relax.Var) and a.same_as(var))
            if not roles or reads != len(roles) or ("x" in roles and spec.x_handoff):
                return False
        return True

    nhwc = {var for var, (_, spec) in kernels.items() if spec.out_handoff is None and readers_ok(var)}
    for var, data in pools.items():  # (binding order: a pool of a pool follows its input)
        if data in nhwc and readers_ok(var):
            nhwc.add(var)
    plan = {}
    for var, (call, spec) in kernels.items():
        roles = _roles(call, spec)
        new = dataclasses.replace(
            spec, out_nhwc=var in nhwc,
            x_nhwc=any(v in nhwc for v, r in roles.items() if "x" in r),
            res_nhwc=any(v in nhwc for v, r in roles.items() if "res" in r))
        if new != spec:
            plan[var] = new
    plan.update({var: "mean" for var, data in means.items() if data in nhwc})
    plan.update({var: "max_pool" for var in pools if var in nhwc})
    return plan


@relax.expr_functor.mutator
class _Mutator(relax.PyExprMutator):
    def __init__(self, mod, plan: dict, kernel_of):
        super().__init__(mod)
        self.plan, self.kernel_of = plan, kernel_of
        self.renamed = {}  # kernel name -> the channels-last kernel that replaces it

    def visit_var_binding_(self, binding):
        spec = self.plan.get(binding.var)
        if spec is None:
            super().visit_var_binding_(binding)
            return
        if spec == "mean":  # over NHWC's rows and columns: each channel's sum in the same order
            value = binding.value
            keep = bool(value.attrs.keepdims)
            mean = relax.op.mean(self.visit_expr(value.args[0]), axis=[1, 2], keepdims=keep)
            if keep:  # [N, 1, 1, C] -> [N, C, 1, 1]: the same values in the same order
                mean = relax.op.reshape(self.builder_.emit(mean), binding.var.ty.shape)
            rebind(self, binding, mean, same_type=True)
            return
        if spec == "max_pool":  # the same windows over NHWC: the same maxima
            a = binding.value.attrs
            pool = relax.op.nn.max_pool2d(self.visit_expr(binding.value.args[0]), a.pool_size, a.strides, a.padding,
                                          a.dilation, bool(a.ceil_mode), bool(a.count_include_pad), "NHWC", "NHWC")
            rebind(self, binding, pool, same_type=False)  # (NHWC now)
            return
        call = binding.value
        kernel = self.kernel_of(spec, call.args[0].name_hint)
        self.renamed[call.args[0].name_hint] = kernel.name_hint
        value = relax.call_tir(kernel, self.visit_expr(call.args[1]),
                               out_ty=relax.TensorType(spec.out_storage_shape, spec.out_dtype))
        rebind(self, binding, value, same_type=not spec.out_nhwc)  # (NHWC: read only by what this pass rewrites)


@tvm.transform.module_pass(opt_level=0, name="ChannelsLastFloat")
class ChannelsLastFloat:
    """Float32 tensors between packed conv kernels stored NHWC instead of NCHW."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        plans = function_plans(mod, _plan)
        if not plans:
            return mod
        out, mutators = rebuild(mod, plans, _Mutator, lambda spec: "_c")
        # which kernel each layer's call in main runs now (tuning reads it)
        renamed = mutators["main"].renamed if "main" in mutators else {}
        table = {str(k): {p: renamed.get(str(v), str(v)) for p, v in kernels.items()}
                 for k, kernels in mod.attrs[ATTR_LAYER_KERNELS].items()}
        return out.with_attr(ATTR_LAYER_KERNELS, table)
