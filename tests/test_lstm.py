"""LSTM nodes of every direction (forward, reverse, bidirectional), with and without bias and
initial states, unrolled into per-step linear layers (psb_tvm.onnx_rewrite): the unrolled graph
equals ONNX Runtime's LSTM, TVM imports it, and the PSB module is close to float at high n."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import psb_tvm
from psb_tvm import onnx_rewrite

T, B, I, H = 5, 2, 3, 4
REL_ERROR_N64 = 0.05


def lstm_model(direction="forward", bias=True, initial=True, seed=0):
    """x[T, B, I] -> LSTM(direction, hidden H) -> (Y [T, dirs, B, H], Y_h, Y_c), then a Relu on Y so
    the graph has an op after it."""
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    inits = [numpy_helper.from_array((rng.standard_normal((dirs, 4 * H, I)) * 0.5).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((dirs, 4 * H, H)) * 0.5).astype(np.float32), "R")]
    ins = ["x", "W", "R"]
    if bias or initial:
        ins.append("B" if bias else "")
        if bias:
            inits.append(numpy_helper.from_array((rng.standard_normal((dirs, 8 * H)) * 0.1).astype(np.float32), "B"))
    if initial:
        ins += ["", "h0", "c0"]
        inits += [numpy_helper.from_array((rng.standard_normal((dirs, B, H)) * 0.3).astype(np.float32), "h0"),
                  numpy_helper.from_array((rng.standard_normal((dirs, B, H)) * 0.3).astype(np.float32), "c0")]
    nodes = [helper.make_node("LSTM", ins, ["y", "y_h", "y_c"], name="lstm", hidden_size=H, direction=direction),
             helper.make_node("Relu", ["y"], ["out"], name="relu")]
    graph = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, B, I])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [T, dirs, B, H]),
                               helper.make_tensor_value_info("y_h", TensorProto.FLOAT, [dirs, B, H]),
                               helper.make_tensor_value_info("y_c", TensorProto.FLOAT, [dirs, B, H])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("bias, initial", [(True, True), (False, False), (False, True)])
def test_unrolled_lstm_equals_onnxruntime(direction, bias, initial):
    model = lstm_model(direction, bias, initial)
    unrolled, done, left = onnx_rewrite.unroll_lstms(model)
    assert done == 1 and left == {} and not any(n.op_type == "LSTM" for n in unrolled.graph.node)
    x = np.random.default_rng(1).standard_normal((T, B, I)).astype(np.float32)
    for want, got in zip(_run(model, x), _run(unrolled, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_unsupported_lstm_forms_are_named():
    model = lstm_model("bidirectional")
    lstm = model.graph.node[0]
    lstm.attribute.append(helper.make_attribute("layout", 1))
    _, done, left = onnx_rewrite.unroll_lstms(model)
    assert done == 0 and left == {"lstm": "layout=1 (only 0)"}


def test_bidirectional_lstm_compiles_to_psb_layers_per_step_and_direction():
    """Each step's input and recurrent matmuls of both directions become PSB layers (the first
    step's recurrent product, on a constant initial state, folds to a constant); at n=64 the
    outputs are close to ONNX Runtime's float LSTM."""
    model = lstm_model("bidirectional")
    rng = np.random.default_rng(2)
    calib = rng.standard_normal((8 * T, B, I)).astype(np.float32)  # 8 sequences stacked on the time axis
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    module = psb_tvm.compile(model, samples=64, calibration={"x": calib})
    names = module.psb_layers
    assert sum("Gemm_W_" in n and "reverse" not in n for n in names) == T
    assert sum("Gemm_W_" in n and "reverse" in n for n in names) == T
    assert sum("MatMul_R_" in n for n in names) >= 2 * (T - 1)
    want = _run(model, x)
    got = module.run(x, samples=64, seed=0)
    for w, g in zip(want, got):
        assert np.linalg.norm(g - w) / np.linalg.norm(w) < REL_ERROR_N64, (np.linalg.norm(g - w) / np.linalg.norm(w))
