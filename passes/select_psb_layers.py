"""Find the conv2d and matmul call sites of a Relax function and decide which can become PSB.

An analysis, not a rewrite: it returns one ``LayerSite`` per linear layer, in binding order,
with the per-channel bias add and ReLU/clip that follow it when they can be fused into the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tvm import ir, relax

from psb_tvm.errors import ConfigError, UnsupportedModelError

LINEAR_OPS = {
    "relax.nn.conv2d": "conv2d",
    "relax.matmul": "dense",
    "relax.nn.conv1d": "conv1d",
    "relax.nn.conv3d": "conv3d",
    "relax.nn.conv1d_transpose": "conv1d_transpose",
    "relax.nn.conv2d_transpose": "conv2d_transpose",
}


@dataclass
class LayerSite:
    """One linear layer of the graph and what a PSB rewrite would fuse with it."""

    index: int  # position among all linear call sites, in binding order
    kind: str  # "conv2d", "dense", or the op kind that PSB does not handle
    call: relax.Call
    data: relax.Expr
    weight: np.ndarray | None  # conv: OIHW; dense: [out, in] (transposed from Relax's [in, out])
    bias: np.ndarray | None = None
    activation: object = None
    final_var: relax.Var | None = None  # the binding whose value the PSB call replaces
    fused_vars: list = field(default_factory=list)  # bindings absorbed into the kernel
    reason: str = ""  # why the site cannot be PSB ("" when it can)
    name: str = ""
    # the output has >= 2**31 elements: no kernel (PSB or float) can be built for it (name_sites refuses it)
    output_too_large: bool = False

    @property
    def convertible(self) -> bool:
        return not self.reason


def _const(expr) -> np.ndarray | None:
    if isinstance(expr, ir.GenericConst):
        return expr.value.numpy()
    return None


def _static_shape(expr):
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    try:
        return tuple(int(v) for v in shape.values)
    except (TypeError, ValueError):
        return None


def _bindings(func: relax.Function):
    for block in func.body.blocks:
        yield from block.bindings


def users_of(func: relax.Function) -> dict:
    """Var -> the bindings that read it (``None`` for the function's result)."""
    users: dict = {}
    for b in _bindings(func):
        for v in relax.analysis.free_vars(b.value):
            users.setdefault(v, []).append(b)
    for v in relax.analysis.free_vars(func.body.body):
        users.setdefault(v, []).append(None)  # used by the function's result
    return users


def single_user(users, var):
    """The one binding that reads ``var`` (``users_of``), or None (several readers, or the result)."""
    u = users.get(var, [])
    return u[0] if len(u) == 1 and u[0] is not None else None


def _affine_of(binding, var, channels: int, kind: str):
    """``(a, c)`` with value ``a * var + c`` when ``binding`` is add/subtract/multiply/divide of
    ``var`` by a per-output-channel (or scalar) float32 constant, else None.

    This is what an unfused batch norm (and a bias add) looks like after decomposition.
    """
    call = binding.value
    if not isinstance(call, relax.Call) or len(call.args) != 2:
        return None
    op = getattr(call.op, "name", "")
    if op not in ("relax.add", "relax.subtract", "relax.multiply", "relax.divide"):
        return None
    a, b = call.args
    if a.same_as(var):
        c, var_first = _const(b), True
    elif b.same_as(var):
        c, var_first = _const(a), False
    else:
        return None
    if c is None or c.dtype != np.float32:
        return None
    per_channel = {(channels,), (1, channels)} if kind == "dense" else {(1, channels, 1, 1), (channels, 1, 1)}
    if c.shape in per_channel:
        c = c.reshape(channels).astype(np.float64)
    elif c.size == 1 and c.ndim <= 1:
        c = np.full(channels, float(c.reshape(())), np.float64)
    else:
        return None
    one, zero = np.ones(channels), np.zeros(channels)
    if op == "relax.add":
        return one, c
    if op == "relax.subtract":
        return (one, -c) if var_first else (-one, c)
    if not np.all(np.isfinite(c)) or np.any(c == 0):
        return None
    if op == "relax.multiply":
        return c, zero
    return (1.0 / c, zero) if var_first else None


def _scalar_bound(binding, var, op: str):
    """The float value ``c`` when ``binding`` is ``op(var, c)`` (either order) with a scalar constant."""
    call = binding.value
    if not isinstance(call, relax.Call) or getattr(call.op, "name", "") != op or len(call.args) != 2:
        return None
    a, b = call.args
    other = b if a.same_as(var) else a if b.same_as(var) else None
    c = None if other is None else _const(other)
    if c is None or c.size != 1 or c.dtype != np.float32 or not np.isfinite(c).all():
        return None
    return float(c.reshape(()))


def _activation_of(binding, var, users=None):
    """``(activation, bindings)``: the ReLU / clip applied to ``var`` and the bindings it spans.

    Besides ``relu`` and ``clip``, ONNX ``Clip`` with min/max inputs imports as ``maximum(x, lo)``
    then ``minimum(., hi)`` (or the reverse): the pair is one clip, a lone ``maximum(x, 0)`` a ReLU.
    """
    call = binding.value
    if not isinstance(call, relax.Call) or not call.args:
        return None, []
    name = getattr(call.op, "name", "")
    if name == "relax.nn.relu" and call.args[0].same_as(var):
        return "relu", [binding]
    if name == "relax.clip" and len(call.args) == 3 and call.args[0].same_as(var):
        try:
            lo, hi = (float(a.value.value) for a in call.args[1:])
        except AttributeError:
            return None, []
        return ("clip", lo, hi), [binding]
    for first, second in (("relax.maximum", "relax.minimum"), ("relax.minimum", "relax.maximum")):
        c1 = _scalar_bound(binding, var, first)
        if c1 is None:
            continue
        nxt = single_user(users, binding.var) if users is not None else None
        c2 = None if nxt is None else _scalar_bound(nxt, binding.var, second)
        if c2 is not None:
            lo, hi = (c1, c2) if first == "relax.maximum" else (c2, c1)
            # min(max(x, lo), hi) == max(min(x, hi), lo) only when lo <= hi.
            if lo <= hi:
                return ("clip", lo, hi), [binding, nxt]
        if first == "relax.maximum" and c1 == 0.0:
            return "relu", [binding]
    return None, []


def _check_conv2d(call) -> tuple[np.ndarray | None, str]:
    attrs = call.attrs
    data, weight = call.args
    w = _const(weight)
    if w is None:
        return None, "weight is not a constant"
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return None, f"layout {attrs.data_layout}/{attrs.kernel_layout} is not NCHW/OIHW"
    if w.dtype != np.float32 or getattr(data.ty, "dtype", None) != "float32":
        return None, "not float32"
    if _static_shape(data) is None or len(_static_shape(data)) != 4:
        return None, "input shape is not static 4-D"
    return w, ""


def _check_dense(call) -> tuple[np.ndarray | None, str]:
    data, weight = call.args
    w = _const(weight)
    if w is None:
        return None, "weight is not a constant (activation x activation matmul)"
    if w.ndim != 2:
        return None, f"weight is {w.ndim}-D, not 2-D"
    if w.dtype != np.float32 or getattr(data.ty, "dtype", None) != "float32":
        return None, "not float32"
    shape = _static_shape(data)
    if shape is None or len(shape) < 2:
        return None, "input is not a static tensor of rank >= 2"
    return np.ascontiguousarray(w.T), ""


#: Elements of a tensor the PSB kernels index with int32 (the CPU and GPU schedules assume it): a layer
#: whose input (padded as the kernels pad it) or weights reach this stays float; one whose output
#: reaches it cannot be built at all (TVM's float schedules index it with int32 as well).
MAX_KERNEL_ELEMENTS = 1 << 31


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _size_reason(kind: str, call, data_shape, weight_shape, out_shape) -> tuple[str, bool]:
    """``("too large: ...", output too large)`` when a buffer of the layer's PSB kernels would have
    >= 2**31 elements, else ``("", False)``."""
    x = int(np.prod(data_shape, dtype=object))
    if kind == "conv2d":  # the padded activation buffers: rows to 16 columns, channels to 4
        n, c, h, w = data_shape
        pad = [int(p) for p in call.attrs.padding]
        x = max(x, n * _round_up(c, 4) * (h + pad[0] + pad[2]) * _round_up(w + pad[1] + pad[3], 16))
        o, cg, kh, kw = weight_shape
        weights = _round_up(o, 16) * kh * kw * _round_up(cg, 4)
    else:
        weights = int(np.prod(weight_shape, dtype=object))
    for what, count in (("output", int(np.prod(out_shape or (0,), dtype=object))), ("input", x), ("weight", weights)):
        if count >= MAX_KERNEL_ELEMENTS:
            return f"too large: {count} {what} elements >= 2^31 (the PSB kernels index with int32)", what == "output"
    return "", False


def find_layer_sites(func: relax.Function) -> list[LayerSite]:
    """Every linear call site of ``func`` with its fusable epilogue and a reason when it is not PSB."""
    users = users_of(func)
    sites = []
    for b in _bindings(func):
        call = b.value
        if not isinstance(call, relax.Call) or getattr(call.op, "name", "") not in LINEAR_OPS:
            continue
        kind = LINEAR_OPS[call.op.name]
        site = LayerSite(index=len(sites), kind=kind, call=call, data=call.args[0], weight=None, final_var=b.var)
        sites.append(site)
        if kind == "conv2d":
            site.weight, site.reason = _check_conv2d(call)
        elif kind == "dense":
            site.weight, site.reason = _check_dense(call)
        else:
            site.reason = f"{call.op.name} is not supported by PSB"
        if not site.reason:
            site.reason, site.output_too_large = _size_reason(kind, call, _static_shape(site.data), site.weight.shape,
                                                              _static_shape(b.var))
        if site.reason:
            continue
        channels = site.weight.shape[0]
        user = single_user(users, b.var)
        scale, shift = np.ones(channels), None
        while user is not None:  # fold bias adds and decomposed batch norms: y = scale * conv + shift
            affine = _affine_of(user, site.final_var, channels, kind)
            if affine is None:
                break
            a, c = affine
            scale, shift = scale * a, (c if shift is None else a * shift + c)
            site.fused_vars.append(site.final_var)
            site.final_var = user.var
            user = single_user(users, user.var)
        if shift is not None:
            site.bias = shift.astype(np.float32)
        if not np.all(scale == 1):
            bshape = (-1,) + (1,) * (site.weight.ndim - 1)
            site.weight = (site.weight.astype(np.float64) * scale.reshape(bshape)).astype(np.float32)
        if user is not None:
            act, spanned = _activation_of(user, site.final_var, users)
            if act is not None:
                site.activation = act
                for b in spanned:
                    site.fused_vars.append(site.final_var)
                    site.final_var = b.var
    return sites


def name_sites(sites: list[LayerSite], onnx_names: dict) -> None:
    """Give sites their ONNX node names: the i-th site of a kind is the i-th ONNX node of that kind;
    then refuse (``UnsupportedModelError``, naming them) layers whose output is too large to build.

    When the counts of a kind disagree (an importer that emits extra matmuls, say), that kind's
    sites get positional names such as ``dense_3`` instead of guessed ones.
    """
    by_kind: dict = {}
    for s in sites:
        by_kind.setdefault(s.kind, []).append(s)
    for kind, kind_sites in by_kind.items():
        names = onnx_names.get(kind, [])
        use_onnx = len(names) == len(kind_sites) and len(set(names)) == len(names)
        for i, s in enumerate(kind_sites):
            s.name = names[i] if use_onnx else f"{kind}_{i}"
    big = [s for s in sites if s.output_too_large]
    if big:
        what = "; ".join(f"layer {s.name!r} ({s.kind}): {s.reason.split(' (')[0].removeprefix('too large: ')}"
                         for s in big)
        raise UnsupportedModelError(f"too large to build: {what} (TVM's conv / matmul schedules index tensors with "
                                    "int32, float or PSB alike); use a smaller batch or input size")


def select_layers(sites: list, config) -> dict:
    """Map site index -> reason it stays float ("" when it becomes PSB): the sites' own reasons,
    then ``config`` (a ``PSBConfig``: include, exclude, exclude_first_last). Names in the config
    that match no site are a ``ConfigError``."""
    names = [s.name for s in sites]
    for option in ("include", "exclude"):
        listed = getattr(config, option) or ()
        unknown = sorted(set(listed) - set(names))
        if unknown:
            raise ConfigError(f"config.{option} names unknown layers {unknown}; the model's linear layers are {names}")
    unknown = sorted(set(config.lowerings) - set(names))
    if unknown:
        raise ConfigError(f"config.lowerings names unknown layers {unknown}; the model's linear layers are {names}")
    convertible = [s for s in sites if s.convertible]
    edges = {}
    if config.exclude_first_last and convertible:
        edges = {convertible[0].index: "first layer (exclude_first_last)",
                 convertible[-1].index: "last layer (exclude_first_last)"}
    reasons = {}
    for s in sites:
        if not s.convertible:
            reasons[s.index] = s.reason
        elif config.include is not None and s.name not in config.include:
            reasons[s.index] = "not in config.include"
        elif s.name in config.exclude:
            reasons[s.index] = "in config.exclude"
        else:
            reasons[s.index] = edges.get(s.index, "")
    return reasons
