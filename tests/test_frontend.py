"""The ONNX frontend: model sources, exporter-style shape subgraphs, old opsets, batch-norm folding
and the errors for bad models and bad ``input_shapes`` (each names the bad thing)."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnx_models as om
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from psb_tvm.passes import find_layer_sites

import psb_tvm
from psb_tvm import PSBConfig
from psb_tvm.errors import DynamicShapeError, ModelLoadError, UnsupportedModelError
from psb_tvm.frontend import import_onnx

FLOAT_ONLY = PSBConfig(include=())  # every linear layer stays float: the compiled model is the float model


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _x(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _calib(shape, count=4, seed=2) -> dict:
    return {"x": _x((count,) + tuple(shape[1:]), seed)}


# ---------------------------------------------------------------- model sources


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory) -> pathlib.Path:
    return pathlib.Path(om.save(om.small_cnn(), tmp_path_factory.mktemp("models") / "small_cnn.onnx"))


@pytest.mark.parametrize("kind", ["str", "pathlib", "bytes", "bytearray", "ModelProto"])
def test_import_accepts_every_source(kind, cnn_file):
    sources = {
        "str": str(cnn_file),
        "pathlib": cnn_file,
        "bytes": cnn_file.read_bytes(),
        "bytearray": bytearray(cnn_file.read_bytes()),
        "ModelProto": om.small_cnn(),
    }
    imported = import_onnx(sources[kind])
    assert imported.inputs == [("x", (1, 3, 12, 12), "float32")]
    assert imported.output_names == ["y"]
    assert imported.layer_names["conv2d"] == ["conv1", "conv2", "dwconv", "pwconv"]
    assert imported.layer_names["dense"] == ["fc"]
    expected_source = {"str": str(cnn_file), "pathlib": str(cnn_file), "bytes": "<bytes>",
                       "bytearray": "<bytes>", "ModelProto": "<ModelProto>"}[kind]
    assert imported.source == expected_source


def test_compile_from_path_records_source_and_runs(cnn_file):
    module = psb_tvm.compile(cnn_file, calibration=_calib((1, 3, 12, 12)), config=FLOAT_ONLY)
    assert module.metadata["source"] == str(cnn_file)
    x = _x((1, 3, 12, 12))
    np.testing.assert_allclose(module.run(x), _ort(om.small_cnn(), x), rtol=1e-5, atol=1e-5)


def test_compile_does_not_mutate_the_callers_model_proto():
    model = om.pytorch_style_reshape_model()  # dynamic batch: input_shapes rewrites the (copied) graph inputs
    before = model.SerializeToString()
    psb_tvm.compile(model, input_shapes={"x": (2, 2, 6, 6)}, calibration=_calib((2, 2, 6, 6)), config=FLOAT_ONLY)
    assert model.SerializeToString() == before
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


# ---------------------------------------------------------------- exporter-style graphs


RESHAPE_CASES = {
    # name: (builder, input_shapes, run shape, names of the linear layers)
    "pytorch": (om.pytorch_style_reshape_model, {"x": (3, 2, 6, 6)}, (3, 2, 6, 6), ["conv", "fc"]),
    "paddle": (om.paddle_style_reshape_model, None, (1, 2, 6, 6), ["conv", "fc"]),
    "old_opset": (om.old_opset_model, None, (1, 3, 8, 8), ["conv", "fc"]),
}


@pytest.mark.parametrize("case", sorted(RESHAPE_CASES))
def test_float_compile_matches_onnxruntime(case):
    build, input_shapes, shape, names = RESHAPE_CASES[case]
    model = build()
    module = psb_tvm.compile(model, input_shapes=input_shapes, calibration=_calib(shape), config=FLOAT_ONLY)
    assert [(l["name"], l["status"], l["reason"]) for l in module.layers] == [
        (n, "float", "not in config.include") for n in names
    ]
    assert module.inputs == [("x", shape, "float32")]
    for seed in (1, 7):
        x = _x(shape, seed)
        np.testing.assert_allclose(module.run(x), _ort(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(RESHAPE_CASES))
def test_psb_compile_of_exporter_style_graphs(case):
    build, input_shapes, shape, names = RESHAPE_CASES[case]
    model = build()
    module = psb_tvm.compile(model, input_shapes=input_shapes, calibration=_calib(shape, count=8), samples=64)
    assert [(l["name"], l["status"]) for l in module.layers] == [(n, "psb") for n in names]
    x = _x(shape)
    out, ref = module.run(x), _ort(model, x)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    # PSB is an approximation; at n=64 it stays close to the float model.
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.25


def test_shape_subgraphs_are_folded_away():
    for model, shapes in [(om.pytorch_style_reshape_model(), {"x": (2, 2, 6, 6)}),
                          (om.paddle_style_reshape_model(), None)]:
        text = import_onnx(model, shapes).mod.script()
        assert "R.shape_of" not in text and "R.concat" not in text  # the Shape/Gather/Slice/Concat chain
        assert "R.reshape" in text


def test_old_opset_is_upgraded_and_imports():
    model = om.old_opset_model()
    assert model.opset_import[0].version == 9
    imported = import_onnx(model)
    assert imported.inputs == [("x", (1, 3, 8, 8), "float32")]
    assert imported.layer_names == {"conv2d": ["conv"], "dense": ["fc"]}
    assert model.opset_import[0].version == 9  # the caller's proto is untouched


# ---------------------------------------------------------------- batch-norm folding


def test_batch_norm_is_folded_into_the_conv():
    model = om.small_cnn()
    mod = import_onnx(model).mod
    text = mod.script()
    assert "batch_norm" not in text
    assert "R.sqrt" not in text and "R.divide" not in text  # no leftover BN arithmetic
    sites = find_layer_sites(mod["main"])
    conv1 = sites[0]
    assert conv1.kind == "conv2d" and conv1.activation == "relu"
    assert conv1.bias is not None  # conv bias + BN shift fused into one per-channel add

    p = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    k = p["bn1_scale"] / np.sqrt(p["bn1_var"] + 1e-5)
    np.testing.assert_allclose(conv1.weight, p["conv1_W"] * k[:, None, None, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(conv1.bias, (p["conv1_B"] - p["bn1_mean"]) * k + p["bn1_bias"], rtol=1e-5, atol=1e-6)
    # Nothing sits between the folded conv's bias add and its ReLU.
    assert [s.kind for s in sites] == ["conv2d"] * 4 + ["dense"]
    assert all(s.bias is not None for s in sites)


# ---------------------------------------------------------------- bad models


def test_missing_file(tmp_path):
    path = tmp_path / "nope.onnx"
    with pytest.raises(ModelLoadError, match="not found") as err:
        psb_tvm.compile(path)
    assert str(path) in str(err.value)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"this is not an ONNX model \x00\xff\xfe\x01" * 16)
    with pytest.raises(ModelLoadError, match="cannot parse as ONNX") as err:
        psb_tvm.compile(path)
    assert str(path) in str(err.value)


def test_truncated_file(tmp_path):
    data = om.small_cnn().SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated") as err:
        import_onnx(str(path))
    assert str(path) in str(err.value)


def test_empty_bytes():
    with pytest.raises(ModelLoadError, match="<bytes>.*no graph"):
        psb_tvm.compile(b"")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError) as err:
        import_onnx(path)
    assert str(path) in str(err.value)


def test_not_a_model_object():
    with pytest.raises(ModelLoadError, match="expected a path, bytes or onnx.ModelProto, got int"):
        import_onnx(123)


def test_unknown_op_names_op_and_node():
    with pytest.raises(UnsupportedModelError) as err:
        psb_tvm.compile(om.unknown_op_model())
    msg = str(err.value)
    assert om.UNKNOWN_OP == "LpNormalization"
    assert "LpNormalization" in msg
    assert "unknown (LpNormalization)" in msg  # the node name with its op
    assert "<ModelProto>" in msg


def test_unknown_op_from_file_names_the_file(tmp_path):
    path = om.save(om.unknown_op_model(), tmp_path / "unknown_op.onnx")
    with pytest.raises(UnsupportedModelError) as err:
        psb_tvm.compile(str(path))
    msg = str(err.value)
    assert str(path) in msg and "LpNormalization" in msg and "unknown" in msg


# ---------------------------------------------------------------- input shapes


def test_dynamic_dims_without_input_shapes():
    with pytest.raises(DynamicShapeError) as err:
        psb_tvm.compile(om.pytorch_style_reshape_model())
    msg = str(err.value)
    assert "'x'" in msg and "dynamic" in msg and "input_shapes" in msg


def test_input_shapes_unknown_input():
    with pytest.raises(DynamicShapeError) as err:
        psb_tvm.compile(om.pytorch_style_reshape_model(), input_shapes={"x": (1, 2, 6, 6), "img": (1, 2, 6, 6)})
    msg = str(err.value)
    assert "'img'" in msg and "unknown" in msg and "['x']" in msg


@pytest.mark.parametrize("shape", [(1, 2, 6), (1, 2, 6, 6, 1)])
def test_input_shapes_wrong_rank(shape):
    with pytest.raises(DynamicShapeError) as err:
        psb_tvm.compile(om.pytorch_style_reshape_model(), input_shapes={"x": shape})
    msg = str(err.value)
    assert "'x'" in msg and f"rank {len(shape)}" in msg and "rank 4" in msg


def test_input_shapes_contradicting_a_static_dim():
    with pytest.raises(DynamicShapeError) as err:
        psb_tvm.compile(om.pytorch_style_reshape_model(), input_shapes={"x": (1, 3, 6, 6)})
    msg = str(err.value)
    assert "'x'" in msg and "contradicts" in msg and "(1, 3, 6, 6)" in msg


def test_input_shapes_contradicting_a_fully_static_model():
    with pytest.raises(DynamicShapeError, match="contradicts"):
        import_onnx(om.small_cnn(), {"x": (2, 3, 12, 12)})


def test_input_shapes_non_positive():
    with pytest.raises(DynamicShapeError, match="'x'.*positive"):
        import_onnx(om.pytorch_style_reshape_model(), {"x": (0, 2, 6, 6)})
