"""psb_tvm.check / ``psb-tvm check``: every op with how it is handled, the dynamic dims to fix and
the linear layers that become PSB, before compiling; exit 2 with the list when something stops the
compile. The layers it lists are the ones compile makes."""

import json

import numpy as np
import onnx_models
import pytest
from onnx import helper
from test_recurrent import recurrent_model

import psb_tvm
from psb_tvm import cli


def _ops(result):
    return {o.op: o for o in result.ops}


def test_layers_and_statuses_are_the_ones_compile_makes():
    model = onnx_models.small_cnn()
    result = psb_tvm.check(model, config={"exclude": ("fc",)})
    assert result.ok and result.problems == [] and result.dynamic == []
    assert all(o.handling == "imported" for o in result.ops) and _ops(result)["Conv"].count == 4
    module = psb_tvm.compile(model, samples=4, config={"exclude": ("fc",)},
                             calibration={"x": np.random.default_rng(0).standard_normal((4, 3, 12, 12)).astype(np.float32)})
    assert [(l.name, l.status, l.reason) for l in result.layers] == \
        [(l["name"], l["status"], l["reason"]) for l in module.layers]
    assert [l.reason for l in result.layers if l.status == "float"] == ["in config.exclude"]


def test_recurrent_nodes_are_rewritten_and_their_layers_listed():
    result = psb_tvm.check(recurrent_model("GRU", "bidirectional", lens=[5, 3]))
    assert result.ok
    assert _ops(result)["GRU"].handling == "rewritten"
    names = [l.name for l in result.layers if l.status == "psb"]
    assert "rnn/Gemm_W" in names and "rnn/Gemm_W_reverse" in names and "rnn/MatMul_R_1" in names


def test_unsupported_ops_and_recurrent_forms_are_named():
    result = psb_tvm.check(onnx_models.unknown_op_model())
    assert not result.ok and result.layers is None
    op = _ops(result)[onnx_models.UNKNOWN_OP]
    assert op.handling == "unsupported" and "no converter" in op.note
    assert result.problems == [f"node unknown ({onnx_models.UNKNOWN_OP}): TVM's ONNX importer has no converter"]
    lstm = psb_tvm.check(recurrent_model("LSTM", "forward", input_forget=1))
    assert not lstm.ok and _ops(lstm)["LSTM"].handling == "unsupported"
    assert "input_forget=1" in _ops(lstm)["LSTM"].note and "not unrolled: input_forget=1" in lstm.problems[0]


def test_dynamic_dims_are_listed_until_fixed():
    model = onnx_models.conv_model()
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_value")
    dim.dim_param = "batch"
    result = psb_tvm.check(model)
    assert not result.ok and result.layers is None and result.dynamic == [("x", 0, "batch")]
    assert "pass input_shapes" in result.problems[0]
    fixed = psb_tvm.check(model, input_shapes={"x": (2, 4, 10, 10)})
    assert fixed.ok and [l.weight_shape for l in fixed.layers] == [[8, 4, 3, 3]]
    with pytest.raises(psb_tvm.DynamicShapeError, match="contradicts"):
        psb_tvm.check(model, input_shapes={"x": (2, 5, 10, 10)})


def test_cli_exit_codes_and_json(tmp_path, capsys):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx_models.save(recurrent_model("RNN", "reverse"), good)
    onnx_models.save(onnx_models.unknown_op_model(), bad)
    assert cli.main(["check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "| RNN | 1 | rewritten |" in out and "become PSB" in out
    assert cli.main(["check", str(bad), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["layers"] is None and "unknown" in report["problems"][0]
    assert cli.main(["check", str(tmp_path / "missing.onnx")]) == 2
    assert "ONNX model not found" in capsys.readouterr().err


def test_if_with_a_constant_condition_is_reported_inlined():
    model = onnx_models.conv_model()
    then = helper.make_graph([helper.make_node("Relu", ["y"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", 1, None)])
    other = helper.make_graph([helper.make_node("Neg", ["y"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", 1, None)])
    g = model.graph
    g.node.append(helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("c", 9, [], [True])))
    g.node.append(helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then, else_branch=other))
    g.output[0].name = "z"
    result = psb_tvm.check(model)
    assert result.ok and _ops(result)["If"].handling == "rewritten"
