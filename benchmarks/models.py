"""ONNX builders for the benchmarks: ResNet-18 and MobileNetV2 shaped networks with random weights.

Both are built with ``onnx.helper`` (opset 13, float32, batch 1, input "input" [1, 3, 224, 224],
output "logits" [1, 1000]) with the real topologies and He-initialised weights from a fixed seed.
BatchNormalization nodes are kept in the graph (psb_tvm's frontend and ONNX Runtime both fold them);
their statistics are random but mild, and the last BN of every residual branch has a small scale so
that activations stay in a sane range through the residual additions (like "zero-init residual").

Also: ``digits()`` (the bundled digits CNN), ``float_macs(model, input_shapes)`` (multiply-accumulates
of the Conv / Gemm / MatMul nodes, counted from the graph) and
``python benchmarks/models.py`` (a self-check with onnxruntime).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
IR_VERSION = 8
F32 = TensorProto.FLOAT
IMAGE_SHAPE = (1, 3, 224, 224)


class _Builder:
    """Accumulates nodes and initializers; names are unique and readable (``layer1.0.conv1``)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []

    def _init(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def conv(self, x, name, cin, cout, k, stride=1, groups=1, pad=None, bias=False):
        pad = k // 2 if pad is None else pad
        fan_in = cin // groups * k * k
        w = (self.rng.standard_normal((cout, cin // groups, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        inputs = [x, self._init(name + ".weight", w)]
        if bias:
            inputs.append(self._init(name + ".bias", (self.rng.standard_normal(cout) * 0.01).astype(np.float32)))
        out = name + ".out"
        self.nodes.append(helper.make_node("Conv", inputs, [out], name=name, kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[pad] * 4, group=groups))
        return out

    def bn(self, x, name, c, gamma=1.0):
        r = self.rng
        params = [
            self._init(name + ".weight", (gamma * r.uniform(0.8, 1.2, c)).astype(np.float32)),
            self._init(name + ".bias", (r.standard_normal(c) * 0.05).astype(np.float32)),
            self._init(name + ".running_mean", (r.standard_normal(c) * 0.05).astype(np.float32)),
            self._init(name + ".running_var", r.uniform(0.8, 1.2, c).astype(np.float32)),
        ]
        out = name + ".out"
        self.nodes.append(helper.make_node("BatchNormalization", [x, *params], [out], name=name, epsilon=1e-5))
        return out

    def op(self, op_type, inputs, name, **attrs):
        out = name + ".out"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def relu(self, x, name):
        return self.op("Relu", [x], name)

    def relu6(self, x, name):
        if "relu6.min" not in {i.name for i in self.inits}:
            self._init("relu6.min", np.array(0.0, np.float32))
            self._init("relu6.max", np.array(6.0, np.float32))
        return self.op("Clip", [x, "relu6.min", "relu6.max"], name)

    def head(self, x, cin, classes=1000):
        x = self.op("GlobalAveragePool", [x], "avgpool")
        x = self.op("Flatten", [x], "flatten", axis=1)
        w = (self.rng.standard_normal((classes, cin)) * np.sqrt(2.0 / cin)).astype(np.float32)
        b = (self.rng.standard_normal(classes) * 0.01).astype(np.float32)
        self.nodes.append(helper.make_node("Gemm", [x, self._init("fc.weight", w), self._init("fc.bias", b)],
                                           ["logits"], name="fc", transB=1))
        return "logits"

    def model(self, graph_name, classes=1000) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name,
                                  [helper.make_tensor_value_info("input", F32, list(IMAGE_SHAPE))],
                                  [helper.make_tensor_value_info("logits", F32, [IMAGE_SHAPE[0], classes])],
                                  initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="psb_tvm.benchmarks")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def resnet18_shaped(seed: int = 0) -> onnx.ModelProto:
    """ResNet-18: conv7x7/2 + BN + ReLU, maxpool 3x3/2, 4 stages x 2 BasicBlocks (64, 128, 256, 512
    channels; 1x1/2 conv + BN projections where the shape changes), global average pool, FC 512->1000."""
    b = _Builder(seed)
    x = b.conv("input", "conv1", 3, 64, 7, stride=2, pad=3)
    x = b.relu(b.bn(x, "bn1", 64), "relu")
    x = b.op("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            p = f"layer{stage}.{block}"
            y = b.conv(x, p + ".conv1", cin, cout, 3, stride=stride)
            y = b.relu(b.bn(y, p + ".bn1", cout), p + ".relu1")
            y = b.conv(y, p + ".conv2", cout, cout, 3)
            y = b.bn(y, p + ".bn2", cout, gamma=0.3)
            if stride != 1 or cin != cout:
                x = b.bn(b.conv(x, p + ".downsample.0", cin, cout, 1, stride=stride, pad=0), p + ".downsample.1", cout)
            x = b.relu(b.op("Add", [y, x], p + ".add"), p + ".relu2")
            cin = cout
    b.head(x, 512)
    return b.model("resnet18_shaped")


# (expansion t, output channels c, repeats n, first stride s): torchvision's MobileNetV2, width 1.0
MOBILENETV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenetv2_shaped(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 (width 1.0): conv3x3/2 32 + BN + ReLU6, 17 inverted residual blocks (1x1 expand
    by t, depthwise 3x3, 1x1 linear projection; residual where stride 1 and shapes match), conv1x1
    320->1280 + BN + ReLU6, global average pool, FC 1280->1000. ReLU6 is Clip(0, 6)."""
    b = _Builder(seed)
    x = b.relu6(b.bn(b.conv("input", "features.0.conv", 3, 32, 3, stride=2), "features.0.bn", 32), "features.0.relu6")
    cin, index = 32, 1
    for t, c, n, s in MOBILENETV2_SETTINGS:
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{index}"
            hidden = cin * t
            y = x
            if t != 1:
                y = b.relu6(b.bn(b.conv(y, p + ".expand", cin, hidden, 1, pad=0), p + ".expand_bn", hidden), p + ".expand_relu6")
            y = b.conv(y, p + ".dw", hidden, hidden, 3, stride=stride, groups=hidden)
            y = b.relu6(b.bn(y, p + ".dw_bn", hidden), p + ".dw_relu6")
            y = b.conv(y, p + ".project", hidden, c, 1, pad=0)
            residual = stride == 1 and cin == c
            y = b.bn(y, p + ".project_bn", c, gamma=0.3 if residual else 1.0)
            x = b.op("Add", [x, y], p + ".add") if residual else y
            cin, index = c, index + 1
    x = b.relu6(b.bn(b.conv(x, f"features.{index}.conv", cin, 1280, 1, pad=0), f"features.{index}.bn", 1280),
                f"features.{index}.relu6")
    b.head(x, 1280)
    return b.model("mobilenetv2_shaped")


def digits() -> onnx.ModelProto:
    """The bundled digits CNN (input "input" [batch, 1, 8, 8], dynamic batch; output "logits" [batch, 10])."""
    from psb_tvm.data.digits import DIGITS_ONNX

    return onnx.load(str(DIGITS_ONNX))


def float_macs(model: onnx.ModelProto, input_shapes: dict | None = None) -> dict:
    """Multiply-accumulates of one forward pass, per Conv / Gemm / MatMul node and in total.

    Conv: N * C_out * H_out * W_out * (C_in / groups) * kH * kW; Gemm / MatMul: M * N * K.
    The operand shapes are measured by running the graph once in onnxruntime on zeros (shape
    inference cannot see through Shape -> Reshape subgraphs); ``input_shapes`` ({name: shape})
    fixes dynamic input dims (default: every dynamic dim is 1).
    """
    import onnxruntime as ort

    linear = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    model = onnx.ModelProto.FromString(model.SerializeToString())
    known = {o.name for o in model.graph.output}
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in linear:
        for name in (node.input[0], node.input[1], node.output[0]):
            if name not in known and name not in inits:
                model.graph.output.append(helper.make_tensor_value_info(name, F32, None))
                known.add(name)
    feeds = {}
    init_names = set(inits)
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in inp.type.tensor_type.shape.dim]
        shape = tuple((input_shapes or {}).get(inp.name, dims))
        feeds[inp.name] = np.zeros(shape, np.float32)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    shapes = {n: list(v.shape) for n, v in zip(names, sess.run(names, feeds))}
    shapes.update(inits)

    per_node = {}
    for node in linear:
        a, w, y = shapes[node.input[0]], shapes[node.input[1]], shapes[node.output[0]]
        if node.op_type == "Conv":
            per_node[node.name] = int(np.prod(y)) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            trans_a = next((h.i for h in node.attribute if h.name == "transA"), 0)
            k = a[0] if trans_a else a[1]
            per_node[node.name] = int(np.prod(y)) * int(k)
        else:  # MatMul
            per_node[node.name] = int(np.prod(y)) * int(a[-1])
    return {"total": int(sum(per_node.values())), "per_node": per_node}


BUILDERS = {"resnet18": resnet18_shaped, "mobilenetv2": mobilenetv2_shaped, "digits": digits}


def _self_check() -> None:
    import onnxruntime as ort

    for name, build in BUILDERS.items():
        model = build()
        shape = (1, 1, 8, 8) if name == "digits" else IMAGE_SHAPE
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        (y,) = sess.run(None, {"input": x})
        macs = float_macs(model, {"input": shape})["total"]
        print(f"{name}: {len(model.graph.node)} nodes, output {y.shape}, |y| max {np.abs(y).max():.3g}, "
              f"finite {np.isfinite(y).all()}, {macs / 1e6:.1f} M MACs")


if __name__ == "__main__":
    _self_check()
