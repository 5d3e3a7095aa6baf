"""Layer selection and the PSB rewrite on Relax: fused epilogues, batch-norm folding, names."""

import numpy as np
import pytest

import psb_tvm
from psb_tvm import numerics
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split
from psb_tvm.demo import run_batched
from psb_tvm.frontend import import_onnx
from psb_tvm.passes import find_layer_sites, name_sites

from onnx_models import small_cnn


def _sites(imported):
    sites = find_layer_sites(imported.mod["main"])
    name_sites(sites, imported.layer_names)
    return sites


def test_digits_sites_fuse_bias_and_relu_and_carry_onnx_names():
    imported = import_onnx(DIGITS_ONNX, {"input": (2, 1, 8, 8)})
    sites = _sites(imported)
    assert [s.name for s in sites] == ["/conv1/Conv", "/conv2/Conv", "/conv3/Conv", "/fc1/Gemm", "/fc2/Gemm"]
    assert [s.activation for s in sites] == ["relu"] * 4 + [None]
    assert all(s.bias is not None for s in sites)
    assert sites[3].weight.shape == (64, 512)  # dense weights are stored [out, in]


def test_unfolded_batch_norm_is_folded_into_the_conv_by_layer_selection():
    """Without onnxsim the importer leaves conv -> bias -> (x-m)/s*g+b chains; selection folds them."""
    raw = import_onnx(DIGITS_ONNX, {"input": (2, 1, 8, 8)}, use_onnxsim=False)
    assert "subtract" in raw.mod.script()  # the decomposed batch norm is really there
    simp = import_onnx(DIGITS_ONNX, {"input": (2, 1, 8, 8)})
    for a, b in zip(_sites(raw), _sites(simp)):
        assert a.activation == b.activation
        np.testing.assert_allclose(a.weight, b.weight, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a.bias, b.bias, rtol=1e-4, atol=1e-5)


def test_bn_between_relu_and_next_layer_stays_float_glue():
    imported = import_onnx(small_cnn(), None)
    sites = _sites(imported)
    assert sites[0].name == "conv1" and sites[0].activation == "relu" and sites[0].bias is not None


def test_compiled_digits_matches_the_reference_model_layer_by_layer():
    """The whole compiled net equals a numpy re-implementation built from the reference ops."""
    x_train, _, x_test, _ = load_digits_split()
    n, seed = 8, 5
    module = psb_tvm.compile(DIGITS_ONNX, samples=n, seed=seed, input_shapes={"input": (10, 1, 8, 8)},
                             calibration={"input": x_train[:100]})
    imported = import_onnx(DIGITS_ONNX, {"input": (10, 1, 8, 8)})
    sites = _sites(imported)
    info = module.layers
    x = x_test[:10]

    def layer(i, h):
        s, li = sites[i], info[i]
        enc = numerics.encode_weights(s.weight)
        q = numerics.integer_weights(enc, n, seed, s.index)
        signed = li["act_dtype"].startswith("int")
        xi = numerics.quantize_activations(h, li["frac_bits"], 8, signed)
        if s.kind == "conv2d":
            acc = numerics.conv2d_int(xi, q, padding=(1, 1, 1, 1))
        else:
            acc = numerics.dense_int(xi, q)
        return numerics.epilogue(acc, numerics.output_scale(enc.k_lo, li["frac_bits"], n), s.bias, s.activation, 1)

    h = layer(1, layer(0, x))
    h = h.reshape(10, 32, 4, 2, 4, 2).max(axis=(3, 5))  # 2x2 max pool
    h = layer(2, h).reshape(10, 512)
    y = layer(4, layer(3, h))
    out = module.run(x)
    np.testing.assert_array_equal(out.view(np.int32), y.view(np.int32))


def test_model_with_clip_primfuncs_compiles():
    """The importer lowers ONNX Clip (ReLU6) to PrimFuncs; the calibration probe must keep them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array(0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6, np.float32), "hi")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="relu6")],
        "clip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    module = psb_tvm.compile(model, samples=8, calibration={"x": x})
    y = module.run(x)
    assert module.layers[0]["status"] == "psb"
    assert y.min() >= 0 and y.max() <= 6 and y.max() > 0
