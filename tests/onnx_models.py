"""Small, deterministic ONNX model builders for the psb_tvm test suite.

Every builder returns an ``onnx.ModelProto`` with one float32 input "x" and one
output "y"; it passes ``onnx.checker.check_model`` and runs in onnxruntime.
Weights are seeded (``np.random.default_rng(seed)``) and He-initialised.
Run ``python tests/onnx_models.py`` for a self-check (checker, onnxruntime,
TVM relax import directly and after onnxsim).
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
IR_VERSION = 8
# A standard ONNX op (runs in onnxruntime, kept by onnxsim) that is absent
# from tvm.relax.frontend.onnx's converter map (apache-tvm 0.27).
UNKNOWN_OP = "LpNormalization"

F32 = TensorProto.FLOAT


def _he(rng, shape, fan_in):
    """He-normal weights: N(0, 2 / fan_in)."""
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _bias(rng, n):
    return (rng.standard_normal(n) * 0.1).astype(np.float32)


def _t(name, arr):
    """Initializer tensor from a numpy array."""
    return numpy_helper.from_array(np.asarray(arr), name)


def _i64(name, values):
    return _t(name, np.asarray(values, dtype=np.int64))


def _const(name, values):
    """Constant node (Paddle-style) producing an int64 tensor named ``name``."""
    return helper.make_node("Constant", [], [name], name=name,
                            value=_i64(name + "_value", values))


def _conv_w(rng, out_ch, in_ch, k, groups=1):
    return _he(rng, (out_ch, in_ch // groups, k, k), in_ch // groups * k * k)


def _bn_params(rng, prefix, c):
    """Non-trivial BatchNormalization scale, bias, mean, var initializers."""
    return [
        _t(prefix + "_scale", rng.uniform(0.5, 1.5, c).astype(np.float32)),
        _t(prefix + "_bias", _bias(rng, c)),
        _t(prefix + "_mean", _bias(rng, c)),
        _t(prefix + "_var", rng.uniform(0.5, 1.5, c).astype(np.float32)),
    ]


def _model(name, nodes, x_shape, y_shape, inits, opset=OPSET, ir_version=IR_VERSION):
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", F32, x_shape)],
        [helper.make_tensor_value_info("y", F32, y_shape)],
        inits)
    model = helper.make_model(graph, producer_name="psb_tvm-tests",
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def conv_model(in_ch=4, out_ch=8, kernel=3, stride=1, pad=1, dilation=1, groups=1,
               hw=10, bias=True, relu=True, seed=0, batch=1):
    """x[batch,in_ch,hw,hw] -> Conv "conv" (optional bias) -> optional Relu -> y."""
    assert in_ch % groups == 0 and out_ch % groups == 0
    rng = np.random.default_rng(seed)
    inits = [_t("conv_W", _conv_w(rng, out_ch, in_ch, kernel, groups))]
    ins = ["x", "conv_W"]
    if bias:
        inits.append(_t("conv_B", _bias(rng, out_ch)))
        ins.append("conv_B")
    conv_out = "conv_out" if relu else "y"
    nodes = [helper.make_node(
        "Conv", ins, [conv_out], name="conv", kernel_shape=[kernel, kernel],
        strides=[stride, stride], pads=[pad] * 4, dilations=[dilation, dilation],
        group=groups)]
    if relu:
        nodes.append(helper.make_node("Relu", [conv_out], ["y"], name="relu"))
    out_hw = (hw + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    return _model("conv_model", nodes, [batch, in_ch, hw, hw],
                  [batch, out_ch, out_hw, out_hw], inits)


def dense_model(in_features=32, out_features=10, seed=0, batch=2, use_gemm=True,
                relu=False):
    """x[batch,in] -> Gemm "fc" (transB=1) or MatMul "fc" + Add "fc_bias" -> [Relu] -> y."""
    rng = np.random.default_rng(seed)
    w = _he(rng, (out_features, in_features), in_features)  # [out, in]
    b = _bias(rng, out_features)
    fc_out = "fc_out" if relu else "y"
    if use_gemm:
        inits = [_t("fc_W", w), _t("fc_B", b)]
        nodes = [helper.make_node("Gemm", ["x", "fc_W", "fc_B"], [fc_out],
                                  name="fc", transB=1)]
    else:
        inits = [_t("fc_W", np.ascontiguousarray(w.T)), _t("fc_B", b)]  # [in, out]
        nodes = [helper.make_node("MatMul", ["x", "fc_W"], ["fc_mm"], name="fc"),
                 helper.make_node("Add", ["fc_mm", "fc_B"], [fc_out], name="fc_bias")]
    if relu:
        nodes.append(helper.make_node("Relu", [fc_out], ["y"], name="relu"))
    return _model("dense_model", nodes, [batch, in_features], [batch, out_features], inits)


def small_cnn(seed=0, batch=1, hw=12):
    """conv1+BN+Relu -> conv2(s2)+Relu -> dwconv+Relu -> pwconv+Relu -> GAP -> Flatten -> fc."""
    rng = np.random.default_rng(seed)
    mk = helper.make_node
    inits = [
        _t("conv1_W", _conv_w(rng, 8, 3, 3)), _t("conv1_B", _bias(rng, 8)),
        *_bn_params(rng, "bn1", 8),
        _t("conv2_W", _conv_w(rng, 16, 8, 3)), _t("conv2_B", _bias(rng, 16)),
        _t("dwconv_W", _conv_w(rng, 16, 16, 3, groups=16)), _t("dwconv_B", _bias(rng, 16)),
        _t("pwconv_W", _conv_w(rng, 16, 16, 1)), _t("pwconv_B", _bias(rng, 16)),
        _t("fc_W", _he(rng, (5, 16), 16)), _t("fc_B", _bias(rng, 5)),
    ]
    nodes = [
        mk("Conv", ["x", "conv1_W", "conv1_B"], ["c1"], name="conv1",
           kernel_shape=[3, 3], pads=[1] * 4),
        mk("BatchNormalization", ["c1", "bn1_scale", "bn1_bias", "bn1_mean", "bn1_var"],
           ["b1"], name="bn1", epsilon=1e-5),
        mk("Relu", ["b1"], ["r1"], name="relu1"),
        mk("Conv", ["r1", "conv2_W", "conv2_B"], ["c2"], name="conv2",
           kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2]),
        mk("Relu", ["c2"], ["r2"], name="relu2"),
        mk("Conv", ["r2", "dwconv_W", "dwconv_B"], ["c3"], name="dwconv",
           kernel_shape=[3, 3], pads=[1] * 4, group=16),
        mk("Relu", ["c3"], ["r3"], name="relu3"),
        mk("Conv", ["r3", "pwconv_W", "pwconv_B"], ["c4"], name="pwconv",
           kernel_shape=[1, 1]),
        mk("Relu", ["c4"], ["r4"], name="relu4"),
        mk("GlobalAveragePool", ["r4"], ["gap"], name="gap"),
        mk("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        mk("Gemm", ["flat", "fc_W", "fc_B"], ["y"], name="fc", transB=1),
    ]
    return _model("small_cnn", nodes, [batch, 3, hw, hw], [batch, 5], inits)


def _conv_relu_2to4(rng):
    """Shared head: Conv "conv" 2->4 3x3 pad1 + Relu "relu" on x -> "r"."""
    inits = [_t("conv_W", _conv_w(rng, 4, 2, 3)), _t("conv_B", _bias(rng, 4))]
    nodes = [helper.make_node("Conv", ["x", "conv_W", "conv_B"], ["c"], name="conv",
                              kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    return nodes, inits


def pytorch_style_reshape_model(seed=0):
    """x[N,2,6,6] -> conv+relu -> flatten via Shape/Gather/Unsqueeze/Concat/Reshape -> Gemm "fc" -> y[N,3]."""
    rng = np.random.default_rng(seed)
    nodes, inits = _conv_relu_2to4(rng)
    mk = helper.make_node
    inits += [_i64("gather_idx", 0), _i64("unsq_axes", [0]), _i64("minus_one", [-1]),
              _t("fc_W", _he(rng, (3, 144), 144)), _t("fc_B", _bias(rng, 3))]
    nodes += [
        mk("Shape", ["r"], ["shape"], name="shape"),
        mk("Gather", ["shape", "gather_idx"], ["n"], name="gather", axis=0),
        mk("Unsqueeze", ["n", "unsq_axes"], ["n1"], name="unsqueeze"),
        mk("Concat", ["n1", "minus_one"], ["new_shape"], name="concat", axis=0),
        mk("Reshape", ["r", "new_shape"], ["flat"], name="reshape"),
        mk("Gemm", ["flat", "fc_W", "fc_B"], ["y"], name="fc", transB=1),
    ]
    return _model("pytorch_style_reshape", nodes, ["N", 2, 6, 6], ["N", 3], inits)


def paddle_style_reshape_model(seed=0):
    """x[1,2,6,6] -> conv+relu -> Shape/Slice/Concat(Constant nodes)/Reshape -> MatMul "fc" + Add "fc_bias" -> y[1,3]."""
    rng = np.random.default_rng(seed)
    nodes, inits = _conv_relu_2to4(rng)
    mk = helper.make_node
    inits += [_t("fc_W", _he(rng, (144, 3), 144)), _t("fc_B", _bias(rng, 3))]
    nodes += [
        mk("Shape", ["r"], ["shape"], name="shape"),
        _const("slice_starts", [0]), _const("slice_ends", [1]),
        mk("Slice", ["shape", "slice_starts", "slice_ends"], ["n1"], name="slice"),
        _const("minus_one", [-1]),
        mk("Concat", ["n1", "minus_one"], ["new_shape"], name="concat", axis=0),
        mk("Reshape", ["r", "new_shape"], ["flat"], name="reshape"),
        mk("MatMul", ["flat", "fc_W"], ["fc_mm"], name="fc"),
        mk("Add", ["fc_mm", "fc_B"], ["y"], name="fc_bias"),
    ]
    return _model("paddle_style_reshape", nodes, [1, 2, 6, 6], [1, 3], inits)


def old_opset_model(seed=0):
    """Opset 9 / IR 4: x[1,3,8,8] -> Conv "conv" -> Relu -> BatchNormalization -> Flatten -> Gemm "fc" -> y[1,4]."""
    rng = np.random.default_rng(seed)
    mk = helper.make_node
    inits = [_t("conv_W", _conv_w(rng, 8, 3, 3)), _t("conv_B", _bias(rng, 8)),
             *_bn_params(rng, "bn", 8),
             _t("fc_W", _he(rng, (4, 512), 512)), _t("fc_B", _bias(rng, 4))]
    nodes = [
        mk("Conv", ["x", "conv_W", "conv_B"], ["c"], name="conv",
           kernel_shape=[3, 3], pads=[1] * 4),
        mk("Relu", ["c"], ["r"], name="relu"),
        mk("BatchNormalization", ["r", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
           ["b"], name="bn", epsilon=1e-5, momentum=0.9),
        mk("Flatten", ["b"], ["flat"], name="flatten", axis=1),
        mk("Gemm", ["flat", "fc_W", "fc_B"], ["y"], name="fc", transB=1),
    ]
    return _model("old_opset", nodes, [1, 3, 8, 8], [1, 4], inits, opset=9, ir_version=4)


def unsupported_layer_model(seed=0):
    """x[1,2,4,4] -> Conv "conv_ok" -> Relu -> ConvTranspose "deconv" (2x2,s2) -> Relu
    -> a=[1,2,64]; MatMul "dyn_matmul"(a, Transpose(a)) (no constant weight) -> y[1,2,2]."""
    rng = np.random.default_rng(seed)
    mk = helper.make_node
    inits = [_t("conv_ok_W", _conv_w(rng, 4, 2, 3)), _t("conv_ok_B", _bias(rng, 4)),
             # ConvTranspose weight layout: [in_ch, out_ch/group, kH, kW]
             _t("deconv_W", _he(rng, (4, 2, 2, 2), 4 * 2 * 2)), _t("deconv_B", _bias(rng, 2)),
             _i64("gram_shape", [1, 2, 64])]
    nodes = [
        mk("Conv", ["x", "conv_ok_W", "conv_ok_B"], ["c"], name="conv_ok",
           kernel_shape=[3, 3], pads=[1] * 4),
        mk("Relu", ["c"], ["r"], name="relu1"),
        mk("ConvTranspose", ["r", "deconv_W", "deconv_B"], ["d"], name="deconv",
           kernel_shape=[2, 2], strides=[2, 2]),
        mk("Relu", ["d"], ["r2"], name="relu2"),
        mk("Reshape", ["r2", "gram_shape"], ["a"], name="reshape"),
        mk("Transpose", ["a"], ["at"], name="transpose", perm=[0, 2, 1]),
        mk("MatMul", ["a", "at"], ["y"], name="dyn_matmul"),
    ]
    return _model("unsupported_layer", nodes, [1, 2, 4, 4], [1, 2, 2], inits)


def unknown_op_model(seed=0):
    """x[1,3,8,8] -> Conv "conv1" -> UNKNOWN_OP "unknown" (p=2, axis=1) -> Conv "conv2" -> y[1,4,8,8]."""
    rng = np.random.default_rng(seed)
    mk = helper.make_node
    inits = [_t("conv1_W", _conv_w(rng, 4, 3, 3)), _t("conv1_B", _bias(rng, 4)),
             _t("conv2_W", _conv_w(rng, 4, 4, 3)), _t("conv2_B", _bias(rng, 4))]
    nodes = [
        mk("Conv", ["x", "conv1_W", "conv1_B"], ["c1"], name="conv1",
           kernel_shape=[3, 3], pads=[1] * 4),
        mk(UNKNOWN_OP, ["c1"], ["u"], name="unknown", axis=1, p=2),
        mk("Conv", ["u", "conv2_W", "conv2_B"], ["y"], name="conv2",
           kernel_shape=[3, 3], pads=[1] * 4),
    ]
    return _model("unknown_op", nodes, [1, 3, 8, 8], [1, 4, 8, 8], inits)


def mobile_block_model(seed=0, hw=16):
    """A MobileNetV3 / PP-LCNet-style net with the patterns of the PP-OCR models (opset 14):
    stem conv + BatchNormalization + HardSwish; depthwise conv + scalar Mul/Add (a learnable affine)
    + Clip (ReLU6); squeeze-excite (GlobalAveragePool, 1x1 convs on a 1x1 map, Relu, HardSigmoid
    with Paddle's slope 0.2, Mul); a pointwise conv whose batch norm is decomposed into per-channel
    Mul + Add, then HardSwish written as ``x * Clip(x + 3, 0, 6) / 6``; a strided 5x5 depthwise
    conv; global pooling and a Gemm head. x[1, 3, hw, hw] -> y[1, 10]."""
    rng = np.random.default_rng(seed)
    c1, c2 = 8, 16
    inits = [_t("stem_W", _conv_w(rng, c1, 3, 3)), *_bn_params(rng, "stem_bn", c1),
             _t("dw_W", _conv_w(rng, c1, c1, 3, groups=c1)), _t("dw_B", _bias(rng, c1)),
             _t("lab_s", np.array(1.3, np.float32)), _t("lab_b", np.array(-0.2, np.float32)),
             _t("relu6_lo", np.array(0.0, np.float32)), _t("relu6_hi", np.array(6.0, np.float32)),
             _t("se1_W", _conv_w(rng, 4, c1, 1)), _t("se1_B", _bias(rng, 4)),
             _t("se2_W", _conv_w(rng, c1, 4, 1)), _t("se2_B", _bias(rng, c1)),
             _t("pw_W", _conv_w(rng, c2, c1, 1)),
             _t("pw_scale", rng.uniform(0.5, 1.5, (1, c2, 1, 1)).astype(np.float32)),
             _t("pw_shift", (rng.standard_normal((1, c2, 1, 1)) * 0.1).astype(np.float32)),
             _t("three", np.array(3.0, np.float32)), _t("six", np.array(6.0, np.float32)),
             _t("dw2_W", _conv_w(rng, c2, c2, 5, groups=c2)), _t("dw2_B", _bias(rng, c2)),
             _t("fc_W", _he(rng, (10, c2), c2)), _t("fc_B", _bias(rng, 10))]
    bn_names = [f"stem_bn_{k}" for k in ("scale", "bias", "mean", "var")]
    nodes = [
        helper.make_node("Conv", ["x", "stem_W"], ["stem"], name="stem", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["stem"] + bn_names, ["stem_bn"], name="stem_bn", epsilon=1e-5),
        helper.make_node("HardSwish", ["stem_bn"], ["a1"], name="hswish1"),
        helper.make_node("Conv", ["a1", "dw_W", "dw_B"], ["dw"], name="dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         group=c1),
        helper.make_node("Mul", ["dw", "lab_s"], ["dw_s"], name="lab_mul"),
        helper.make_node("Add", ["dw_s", "lab_b"], ["dw_a"], name="lab_add"),
        helper.make_node("Clip", ["dw_a", "relu6_lo", "relu6_hi"], ["a2"], name="relu6"),
        helper.make_node("GlobalAveragePool", ["a2"], ["se_pool"], name="se_pool"),
        helper.make_node("Conv", ["se_pool", "se1_W", "se1_B"], ["se1"], name="se1", kernel_shape=[1, 1]),
        helper.make_node("Relu", ["se1"], ["se1_r"], name="se_relu"),
        helper.make_node("Conv", ["se1_r", "se2_W", "se2_B"], ["se2"], name="se2", kernel_shape=[1, 1]),
        helper.make_node("HardSigmoid", ["se2"], ["se_gate"], name="se_gate", alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["a2", "se_gate"], ["a3"], name="se_mul"),
        helper.make_node("Conv", ["a3", "pw_W"], ["pw"], name="pw", kernel_shape=[1, 1]),
        helper.make_node("Mul", ["pw", "pw_scale"], ["pw_m"], name="pw_bn_mul"),
        helper.make_node("Add", ["pw_m", "pw_shift"], ["pw_bn"], name="pw_bn_add"),
        helper.make_node("Add", ["pw_bn", "three"], ["hs_a"], name="hs_add"),
        helper.make_node("Clip", ["hs_a", "relu6_lo", "six"], ["hs_c"], name="hs_clip"),
        helper.make_node("Mul", ["pw_bn", "hs_c"], ["hs_m"], name="hs_mul"),
        helper.make_node("Div", ["hs_m", "six"], ["a4"], name="hs_div"),
        helper.make_node("Conv", ["a4", "dw2_W", "dw2_B"], ["dw2"], name="dw2", kernel_shape=[5, 5], strides=[2, 2],
                         pads=[2, 2, 2, 2], group=c2),
        helper.make_node("Relu", ["dw2"], ["a5"], name="relu5"),
        helper.make_node("GlobalAveragePool", ["a5"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_W", "fc_B"], ["y"], name="fc", transB=1),
    ]
    return _model("mobile_block_model", nodes, [1, 3, hw, hw], [1, 10], inits, opset=14)


def handoff_model(seed=0, hw=12):
    """Chains of 3x3 / 1x1 convs with 16-48 channels (the int8 preset's vnni convs): conv1 -> conv2
    -> conv3 -> conv4 feed one conv each (integer hand-off); conv4's output feeds two convs whose
    sum goes on (float); a 24-channel conv (padded to 32), strided convs, and conv7 -> expansion ->
    depthwise -> projection. x[1, 3, hw, hw] -> y[1, 5]."""
    rng = np.random.default_rng(seed)
    mk = helper.make_node
    convs = [("conv1", 3, 16, 3, 1), ("conv2", 16, 32, 3, 1), ("conv3", 32, 24, 1, 1), ("conv4", 24, 32, 3, 2),
             ("conv5", 32, 32, 1, 1), ("conv6", 32, 32, 1, 1), ("conv7", 32, 16, 3, 1),
             ("expand", 16, 48, 1, 1), ("dw", 48, 48, 3, 2), ("project", 48, 16, 1, 1)]
    groups = {"dw": 48}
    inits = [t for name, cin, cout, k, _ in convs
             for t in (_t(name + "_W", _conv_w(rng, cout, cin, k, groups=groups.get(name, 1))),
                       _t(name + "_B", _bias(rng, cout)))]
    inits += [_t("fc_W", _he(rng, (5, 16), 16)), _t("fc_B", _bias(rng, 5))]
    nodes = []

    def conv(name, x, relu=True):
        _, _, _, k, stride = next(c for c in convs if c[0] == name)
        nodes.append(mk("Conv", [x, name + "_W", name + "_B"], [name], name=name, kernel_shape=[k, k],
                        pads=[k // 2] * 4, strides=[stride, stride], group=groups.get(name, 1)))
        if not relu:
            return name
        nodes.append(mk("Relu", [name], [name + "_r"], name=name + "_relu"))
        return name + "_r"

    a = conv("conv4", conv("conv3", conv("conv2", conv("conv1", "x")), relu=False))
    nodes.append(mk("Add", [conv("conv5", a), conv("conv6", a, relu=False)], ["sum"], name="add"))
    nodes.append(mk("Relu", ["sum"], ["sum_r"], name="add_relu"))
    # a MobileNetV2 block without its residual: expansion -> depthwise (stride 2) -> projection
    tail = conv("project", conv("dw", conv("expand", conv("conv7", "sum_r"))), relu=False)
    nodes += [mk("GlobalAveragePool", [tail], ["gap"], name="gap"),
              mk("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
              mk("Gemm", ["flat", "fc_W", "fc_B"], ["y"], name="fc", transB=1)]
    return _model("handoff_model", nodes, [1, 3, hw, hw], [1, 5], inits)


def conv_bn_hardswish_model(hw=112, cin=3, cout=16, seed=0, hardswish="clip"):
    """x[1, cin, hw, hw] -> Conv 3x3 stride 2 (+bias) -> batch norm as per-channel Mul + Add ->
    HardSwish (``"clip"``: ``x * Clip(x + 3, 0, 6) / 6``; ``"op"``: the HardSwish op; ``"sigmoid"``:
    ``x * HardSigmoid(x)``): the MobileNetV3 stem whose fused float kernel once took minutes of LLVM
    code generation."""
    rng = np.random.default_rng(seed)
    inits = [_t("W", _conv_w(rng, cout, cin, 3)), _t("B", _bias(rng, cout)),
             _t("s", rng.uniform(0.5, 1.5, (1, cout, 1, 1)).astype(np.float32)),
             _t("b", (rng.standard_normal((1, cout, 1, 1)) * 0.1).astype(np.float32)),
             _t("lo", np.array(0.0, np.float32)), _t("hi", np.array(6.0, np.float32)),
             _t("three", np.array(3.0, np.float32)), _t("six", np.array(6.0, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="stem", kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "s"], ["m"], name="bn_mul"),
             helper.make_node("Add", ["m", "b"], ["bn"], name="bn_add")]
    if hardswish == "op":
        nodes.append(helper.make_node("HardSwish", ["bn"], ["y"], name="hswish"))
    elif hardswish == "sigmoid":
        nodes += [helper.make_node("HardSigmoid", ["bn"], ["g"], name="hsig", alpha=1 / 6, beta=0.5),
                  helper.make_node("Mul", ["bn", "g"], ["y"], name="hs_mul")]
    else:
        nodes += [helper.make_node("Add", ["bn", "three"], ["p3"], name="hs_add"),
                  helper.make_node("Clip", ["p3", "lo", "hi"], ["cl"], name="hs_clip"),
                  helper.make_node("Mul", ["bn", "cl"], ["hm"], name="hs_mul"),
                  helper.make_node("Div", ["hm", "six"], ["y"], name="hs_div")]
    out = (hw + 1) // 2
    return _model("conv_bn_hardswish", nodes, [1, cin, hw, hw], [1, cout, out, out], inits, opset=14)


def save(model, path):
    """Write the serialized model to ``path`` and return the path."""
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def _static_input_shape(model, n=1):
    """Input shape of "x" with symbolic dims replaced by ``n``."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else n for d in dims]


def _self_check():
    """Checker, onnxruntime run, TVM relax import (direct and after onnxsim)."""
    import onnxruntime as ort
    import onnxsim
    import tvm
    import tvm.relax.frontend.onnx  # noqa: F401
    from tvm.relax.frontend.onnx import from_onnx

    def relax_ops(m, shape_dict=None):
        """Sorted relax op names of the imported module, or the exception."""
        try:
            mod = from_onnx(m, shape_dict=shape_dict)
        except Exception as e:  # noqa: BLE001
            return e
        ops = set()
        tvm.relax.analysis.post_order_visit(mod["main"], lambda e: ops.add(e.op.name) if (
            isinstance(e, tvm.relax.Call) and isinstance(e.op, tvm.ir.Op)) else None)
        return sorted(o.replace("relax.", "") for o in ops)

    cases = {
        "conv_model": conv_model(),
        "conv_model(groups=2)": conv_model(groups=2),
        "conv_model(depthwise,s2)": conv_model(groups=4, stride=2),
        "conv_model(dil2,no bias/relu,b2)": conv_model(dilation=2, pad=2, bias=False,
                                                       relu=False, batch=2),
        "dense_model": dense_model(),
        "dense_model(matmul,relu)": dense_model(use_gemm=False, relu=True),
        "small_cnn": small_cnn(),
        "pytorch_style_reshape_model": pytorch_style_reshape_model(),
        "paddle_style_reshape_model": paddle_style_reshape_model(),
        "old_opset_model": old_opset_model(),
        "unsupported_layer_model": unsupported_layer_model(),
        "unknown_op_model": unknown_op_model(),
    }
    for name, m in cases.items():
        onnx.checker.check_model(m)
        shape = _static_input_shape(m)
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": x})[0]
        assert np.isfinite(y).all(), name
        sm, ok = onnxsim.simplify(m, overwrite_input_shapes={"x": shape})
        assert ok, name
        direct, simp = relax_ops(m), relax_ops(sm, {"x": shape})
        if name == "unknown_op_model":
            assert all(isinstance(r, tvm.error.OpNotImplemented) for r in (direct, simp))
        else:
            assert isinstance(direct, list) and isinstance(simp, list), (name, direct, simp)
        print(f"{name}: x{shape} -> y{list(y.shape)}\n"
              f"  onnxsim nodes: {[(n.op_type, n.name) for n in sm.graph.node]}\n"
              f"  relax direct: {direct}\n  relax onnxsim: {simp}")
    print("OK")


if __name__ == "__main__":
    _self_check()


def resnet_stem_model(seed=0, hw=16, batch=1):
    """ResNet's stem and first block: conv 7x7/2 + ReLU -> max pool 3x3/2 -> conv + ReLU -> conv,
    + the pooled input, ReLU -> GAP -> Flatten -> fc. x[batch, 3, hw, hw] -> y[batch, 5]."""
    rng = np.random.default_rng(seed)
    mk = helper.make_node
    inits = [_t("stem_W", _conv_w(rng, 16, 3, 7)), _t("stem_B", _bias(rng, 16)),
             _t("conv1_W", _conv_w(rng, 16, 16, 3)), _t("conv1_B", _bias(rng, 16)),
             _t("conv2_W", _conv_w(rng, 16, 16, 3)), _t("conv2_B", _bias(rng, 16)),
             _t("fc_W", _he(rng, (5, 16), 16)), _t("fc_B", _bias(rng, 5))]
    nodes = [
        mk("Conv", ["x", "stem_W", "stem_B"], ["s"], name="stem", kernel_shape=[7, 7], pads=[3] * 4, strides=[2, 2]),
        mk("Relu", ["s"], ["s_r"], name="stem_relu"),
        mk("MaxPool", ["s_r"], ["p"], name="pool", kernel_shape=[3, 3], pads=[1] * 4, strides=[2, 2]),
        mk("Conv", ["p", "conv1_W", "conv1_B"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
        mk("Relu", ["c1"], ["c1_r"], name="relu1"),
        mk("Conv", ["c1_r", "conv2_W", "conv2_B"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4),
        mk("Add", ["c2", "p"], ["sum"], name="add"),
        mk("Relu", ["sum"], ["sum_r"], name="add_relu"),
        mk("GlobalAveragePool", ["sum_r"], ["gap"], name="gap"),
        mk("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        mk("Gemm", ["flat", "fc_W", "fc_B"], ["y"], name="fc", transB=1),
    ]
    return _model("resnet_stem_model", nodes, [batch, 3, hw, hw], [batch, 5], inits)
