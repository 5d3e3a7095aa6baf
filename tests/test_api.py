"""The public API: layer report and selection, argument checking, calibration, determinism,
run-time input checks, export / load (also in a fresh process)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import onnx_models as om
import onnxruntime as ort
import pytest

import psb_tvm
from psb_tvm import ConfigError, InputError, ModelLoadError, PSBConfig

CNN_SHAPE = (1, 3, 12, 12)
CNN_LAYERS = ["conv1", "conv2", "dwconv", "pwconv", "fc"]


def _x(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _ort(model, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _rel_err(out, ref) -> float:
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _status(module) -> dict:
    return {l["name"]: (l["status"], l["reason"]) for l in module.layers}


CALIB = {"x": _x((16,) + CNN_SHAPE[1:], seed=100)}


def _compile_cnn(**kw):
    kw.setdefault("calibration", CALIB)
    return psb_tvm.compile(om.small_cnn(), **kw)


@pytest.fixture(scope="module")
def cnn():
    """small_cnn, all defaults (n=16, seed=0, intdot) with calibration data."""
    return _compile_cnn()


@pytest.fixture(scope="module")
def x_cnn():
    return _x(CNN_SHAPE, seed=5)


# ---------------------------------------------------------------- layer report


@pytest.fixture(scope="module")
def unsupported():
    model = om.unsupported_layer_model()
    module = psb_tvm.compile(model, calibration={"x": _x((16, 2, 4, 4), seed=3)})
    return model, module


def test_unsupported_layers_stay_float_with_a_reason(unsupported):
    _, module = unsupported
    by_op = {l["op"]: l for l in module.layers}
    assert [l["op"] for l in module.layers] == ["conv2d", "conv2d_transpose", "dense"]
    assert [l["name"] for l in module.layers] == ["conv_ok", "deconv", "dyn_matmul"]  # ONNX node names

    conv = by_op["conv2d"]
    assert conv["name"] == "conv_ok" and conv["status"] == "psb" and conv["reason"] == ""
    assert conv["lowering"] == "intdot" and isinstance(conv["frac_bits"], int)

    deconv = by_op["conv2d_transpose"]
    assert deconv["status"] == "float"
    assert "not supported" in deconv["reason"] and "conv2d_transpose" in deconv["reason"]
    assert "frac_bits" not in deconv and "lowering" not in deconv

    matmul = by_op["dense"]
    assert matmul["status"] == "float"
    assert "not a constant" in matmul["reason"] and "activation x activation" in matmul["reason"]

    report = module.report()
    assert "1 of 3 linear layers are PSB" in report
    for l in module.layers:
        assert l["name"] in report
    assert deconv["reason"] in report and matmul["reason"] in report


def test_unsupported_model_runs_close_to_onnxruntime(unsupported):
    model, module = unsupported
    for seed in (1, 2):
        x = _x((1, 2, 4, 4), seed)
        out, ref = module.run(x), _ort(model, x)
        assert out.shape == ref.shape == (1, 2, 2) and out.dtype == np.float32
        assert _rel_err(out, ref) < 0.25


def test_default_report_and_metadata(cnn):
    assert _status(cnn) == {n: ("psb", "") for n in CNN_LAYERS}
    assert cnn.samples == 16 and cnn.metadata["seed"] == 0
    assert cnn.metadata["config"] == PSBConfig().to_dict()
    assert cnn.metadata["calibration"] == "user data"
    assert cnn.inputs == [("x", CNN_SHAPE, "float32")]
    assert cnn.metadata["outputs"] == ["y"]
    assert all(l["lowering"] == "intdot" for l in cnn.layers)
    assert "5 of 5 linear layers are PSB (n=16, seed=0)" in cnn.report()
    assert "n=16" in repr(cnn) and "psb_layers=5/5" in repr(cnn)


def test_psb_output_is_close_to_onnxruntime(cnn, x_cnn):
    out, ref = cnn.run(x_cnn), _ort(om.small_cnn(), x_cnn)
    assert out.shape == (1, 5) and out.dtype == np.float32
    assert _rel_err(out, ref) < 0.25


# ---------------------------------------------------------------- layer selection


def test_include():
    module = _compile_cnn(config=PSBConfig(include=("conv2", "fc")))
    assert _status(module) == {
        "conv1": ("float", "not in config.include"),
        "conv2": ("psb", ""),
        "dwconv": ("float", "not in config.include"),
        "pwconv": ("float", "not in config.include"),
        "fc": ("psb", ""),
    }
    psb = [l for l in module.layers if l["status"] == "psb"]
    assert all("frac_bits" in l for l in psb)
    assert all("frac_bits" not in l for l in module.layers if l["status"] == "float")
    assert "2 of 5 linear layers are PSB" in module.report()


def test_include_as_a_single_string_and_exclude():
    module = _compile_cnn(config=PSBConfig(include="dwconv", exclude=()))
    assert [n for n, (s, _) in _status(module).items() if s == "psb"] == ["dwconv"]
    module = _compile_cnn(config=PSBConfig(exclude=("dwconv", "conv1")))
    assert _status(module) == {
        "conv1": ("float", "in config.exclude"),
        "conv2": ("psb", ""),
        "dwconv": ("float", "in config.exclude"),
        "pwconv": ("psb", ""),
        "fc": ("psb", ""),
    }


def test_exclude_first_last(x_cnn, cnn):
    module = _compile_cnn(config=PSBConfig(exclude_first_last=True))
    assert _status(module) == {
        "conv1": ("float", "first layer (exclude_first_last)"),
        "conv2": ("psb", ""),
        "dwconv": ("psb", ""),
        "pwconv": ("psb", ""),
        "fc": ("float", "last layer (exclude_first_last)"),
    }
    assert module.metadata["config"]["exclude_first_last"] is True
    assert not np.array_equal(module.run(x_cnn), cnn.run(x_cnn))


@pytest.mark.parametrize("field", ["include", "exclude"])
def test_unknown_layer_names_in_include_exclude(field):
    with pytest.raises(ConfigError) as err:
        _compile_cnn(config=PSBConfig(**{field: ("conv1", "no_such_layer", "other_missing")}))
    msg = str(err.value)
    assert f"config.{field}" in msg
    assert "no_such_layer" in msg and "other_missing" in msg
    assert "'conv1'" in msg.split(";")[1]  # the model's layers are listed after the unknown ones
    assert "unknown layers ['no_such_layer', 'other_missing']" in msg


def test_unknown_layer_name_in_lowerings():
    with pytest.raises(ConfigError, match=r"config\.lowerings names unknown layers \['conv9'\]"):
        _compile_cnn(config=PSBConfig(lowerings={"conv9": "shiftadd"}))


def test_per_layer_lowering_is_recorded(cnn, x_cnn):
    module = _compile_cnn(config=PSBConfig(lowerings={"conv1": "shiftadd"}))
    lowering = {l["name"]: l["lowering"] for l in module.layers}
    assert lowering == {"conv1": "shiftadd", "conv2": "intdot", "dwconv": "intdot", "pwconv": "intdot", "fc": "intdot"}
    assert module.metadata["config"]["lowerings"] == {"conv1": "shiftadd"}
    assert "shiftadd" in module.report()
    np.testing.assert_array_equal(module.run(x_cnn), cnn.run(x_cnn))  # same integers either way


def test_intdot_and_shiftadd_are_bit_identical(cnn, x_cnn):
    module = _compile_cnn(config=PSBConfig(lowering="shiftadd"))
    assert all(l["lowering"] == "shiftadd" for l in module.layers)
    for seed in (5, 6):
        x = _x(CNN_SHAPE, seed)
        np.testing.assert_array_equal(module.run(x), cnn.run(x))


# ---------------------------------------------------------------- argument checking


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(samples=3), ["samples", "power of two", "3"]),
        (dict(samples=0), ["samples", "0"]),
        (dict(samples=-4), ["samples", "-4"]),
        (dict(samples=2.0), ["samples", "2.0"]),
        (dict(samples=True), ["samples", "True"]),
        (dict(samples=128), ["samples=128", "n_max=64"]),
        (dict(samples=256, config=PSBConfig(n_max=128)), ["samples=256", "n_max=128"]),
        (dict(seed=-1), ["seed", "-1"]),
        (dict(seed=2**32), ["seed", str(2**32)]),
        (dict(seed=1.5), ["seed", "1.5"]),
        (dict(target="foo"), ["unknown target", "'foo'"]),
        (dict(target={"kind": "no-such-kind"}), ["invalid target", "no-such-kind"]),
        (dict(config="intdot"), ["config", "str"]),
        (dict(config={"E": 0}), ["E", "0"]),
        (dict(config={"bogus": 1}), ["unknown PSBConfig fields", "bogus"]),
    ],
)
def test_bad_compile_arguments(kwargs, words):
    with pytest.raises(ConfigError) as err:
        psb_tvm.compile(om.small_cnn(), calibration=CALIB, **kwargs)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(E=0), ["E", "0"]),
        (dict(E=17), ["E", "17"]),
        (dict(P=0), ["P", "0"]),
        (dict(act_bits=7), ["act_bits", "7"]),
        (dict(lowering="foo"), ["lowering", "'foo'", "intdot", "shiftadd"]),
        (dict(lowerings={"conv1": "bar"}), ["lowerings['conv1']", "'bar'"]),
        (dict(n_max=48), ["n_max", "48"]),
        (dict(n_max=0), ["n_max", "0"]),
        (dict(calibration_fallback_samples=0), ["calibration_fallback_samples"]),
        (dict(include=("conv1", 3)), ["include"]),
    ],
)
def test_bad_config_fields(fields, words):
    with pytest.raises(ConfigError) as err:
        PSBConfig(**fields)
    assert str(err.value).startswith("invalid PSBConfig")
    for word in words:
        assert word in str(err.value)


def test_config_round_trips_through_a_dict():
    config = PSBConfig(E=3, lowering="shiftadd", lowerings={"fc": "intdot"}, include=["conv1", "fc"], exclude="fc")
    assert config.include == ("conv1", "fc") and config.exclude == ("fc",)
    assert PSBConfig.from_dict(config.to_dict()) == config
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()


# ---------------------------------------------------------------- run-time input checks


def test_wrong_number_of_inputs(cnn, x_cnn):
    for args in [(), (x_cnn, x_cnn)]:
        with pytest.raises(InputError) as err:
            cnn.run(*args)
        assert "'x'" in str(err.value) and f"got {len(args)}" in str(err.value)


def test_wrong_shape(cnn, x_cnn):
    with pytest.raises(InputError) as err:
        cnn.run(x_cnn[:, :2])
    assert "'x'" in str(err.value) and "(1, 3, 12, 12)" in str(err.value) and "(1, 2, 12, 12)" in str(err.value)
    with pytest.raises(InputError, match="'x'"):
        cnn.run(np.concatenate([x_cnn, x_cnn]))


def test_wrong_dtype(cnn, x_cnn):
    with pytest.raises(InputError) as err:
        cnn.run(x_cnn.astype(np.float64))
    assert "'x'" in str(err.value) and "float64" in str(err.value) and "float32" in str(err.value)


def test_list_instead_of_array(cnn, x_cnn):
    with pytest.raises(InputError) as err:
        cnn.run(x_cnn.tolist())
    assert "'x'" in str(err.value) and "list" in str(err.value)


def test_non_contiguous_input_is_accepted(cnn, x_cnn):
    strided = np.asfortranarray(x_cnn)
    np.testing.assert_array_equal(cnn.run(strided), cnn.run(x_cnn))


# ---------------------------------------------------------------- calibration


def _check_frac_bits(layer):
    m, f = layer["act_max_abs"], layer["frac_bits"]
    hi = {"int8": 127, "uint8": 255, "int16": 32767, "uint16": 65535}[layer["act_dtype"]]
    assert m * 2.0**f <= hi < 2 * m * 2.0**f, layer


def test_frac_bits_follow_the_calibration_range(cnn):
    for layer in cnn.layers:
        _check_frac_bits(layer)
    conv1 = cnn.layers[0]
    assert conv1["act_max_abs"] == float(np.abs(CALIB["x"]).max())
    assert conv1["act_dtype"] in ("int8", "int16")  # standard-normal images have negative values
    assert all(l["act_dtype"].startswith("uint") for l in cnn.layers[1:])  # after ReLU


def test_calibration_from_a_generator_with_a_known_range():
    rng = np.random.default_rng(0)
    batches = [rng.uniform(0, 3.0, (4,) + CNN_SHAPE[1:]).astype(np.float32) for _ in range(3)]
    batches[1][2, 0, 5, 5] = 3.0  # the exact maximum, in the middle batch
    module = psb_tvm.compile(om.small_cnn(), calibration=({"x": b} for b in batches))
    assert module.metadata["calibration"] == "user data"
    conv1 = module.layers[0]
    assert conv1["act_max_abs"] == 3.0
    assert conv1["act_dtype"] == "uint8"  # non-negative inputs: unsigned activations
    assert conv1["frac_bits"] == 6  # 3 * 2**6 = 192 <= 255 < 384
    for layer in module.layers:
        _check_frac_bits(layer)


def test_single_input_calibration_may_be_a_bare_array():
    a = psb_tvm.compile(om.small_cnn(), calibration=CALIB["x"])
    b = psb_tvm.compile(om.small_cnn(), calibration=CALIB)
    assert [l["frac_bits"] for l in a.layers] == [l["frac_bits"] for l in b.layers]
    x = _x((1, 3, 12, 12))
    np.testing.assert_array_equal(a.run(x), b.run(x))


def test_calibration_count_not_a_multiple_of_the_model_batch():
    calib = _x((5, 3, 12, 12), seed=9)
    calib[4] *= 10  # the largest sample is the last, in the partial batch
    module = psb_tvm.compile(om.small_cnn(batch=2), calibration={"x": calib})
    assert module.inputs == [("x", (2, 3, 12, 12), "float32")]
    assert module.layers[0]["act_max_abs"] == float(np.abs(calib).max())
    out = module.run(_x((2, 3, 12, 12)))
    assert out.shape == (2, 5) and np.isfinite(out).all()


@pytest.mark.parametrize(
    "calibration, words",
    [
        ({"img": CALIB["x"]}, ["missing inputs ['x']", "unknown inputs ['img']"]),
        ({}, ["missing inputs ['x']"]),
        ({"x": CALIB["x"], "extra": CALIB["x"]}, ["unknown inputs ['extra']"]),
        ({"x": CALIB["x"][:, :2]}, ["'x'", "(16, 2, 12, 12)", "(N, 3, 12, 12)"]),
        ({"x": CALIB["x"][0]}, ["'x'", "(3, 12, 12)"]),
        ({"x": CALIB["x"][:0]}, ["'x'", "(0, 3, 12, 12)"]),
        ([], ["empty"]),
        ([{"x": CALIB["x"]}, CALIB["x"]], ["item 1", "ndarray"]),
        (CALIB["x"][:, :2], ["'x'", "(16, 2, 12, 12)"]),  # a bare array names the single input
        ("x", ["dict", "str"]),
    ],
)
def test_bad_calibration(calibration, words):
    with pytest.raises(ConfigError) as err:
        psb_tvm.compile(om.small_cnn(), calibration=calibration)
    for word in words:
        assert word in str(err.value)


def test_no_calibration_warns_and_falls_back():
    with pytest.warns(UserWarning, match="accuracy will suffer") as record:
        module = psb_tvm.compile(om.small_cnn())
    assert any("calibration" in str(w.message) for w in record)
    assert module.metadata["calibration"].startswith("fallback")
    for layer in module.layers:
        _check_frac_bits(layer)


def test_user_calibration_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        psb_tvm.compile(om.conv_model(), calibration={"x": _x((4, 4, 10, 10))})


# ---------------------------------------------------------------- determinism


def test_same_seed_same_output_different_seed_different_output(cnn, x_cnn):
    again = _compile_cnn(seed=0)
    other = _compile_cnn(seed=1)
    assert again.layers == cnn.layers
    np.testing.assert_array_equal(again.run(x_cnn), cnn.run(x_cnn))
    assert other.metadata["seed"] == 1
    assert not np.array_equal(other.run(x_cnn), cnn.run(x_cnn))
    # Running twice in one module is deterministic too.
    np.testing.assert_array_equal(cnn.run(x_cnn), cnn.run(x_cnn))


# ---------------------------------------------------------------- export / load


def test_export_to_a_missing_directory_writes_nothing(cnn, tmp_path):
    target = tmp_path / "missing" / "model.so"
    with pytest.raises(psb_tvm.OutputError) as err:
        cnn.export_library(target)
    assert str(tmp_path / "missing") in str(err.value)
    assert not (tmp_path / "missing").exists()
    assert list(tmp_path.iterdir()) == []


def test_export_leaves_exactly_one_file_and_loads_back(cnn, x_cnn, tmp_path):
    path = tmp_path / "model.so"
    assert cnn.export_library(path) == str(path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.so"]  # no temp files left behind
    cnn.export_library(str(path))  # overwriting is atomic too
    assert [p.name for p in tmp_path.iterdir()] == ["model.so"]
    loaded = psb_tvm.load(path)
    assert loaded.metadata == cnn.metadata
    np.testing.assert_array_equal(loaded.run(x_cnn), cnn.run(x_cnn))
    with pytest.raises(InputError, match="'x'"):
        loaded.run(x_cnn.astype(np.float64))


def test_load_a_file_that_is_not_a_module(tmp_path):
    path = tmp_path / "junk.so"
    path.write_text("not a shared library")
    with pytest.raises(ModelLoadError) as err:
        psb_tvm.load(path)
    assert str(path) in str(err.value)


def test_load_an_onnx_file_or_a_missing_file(tmp_path):
    onnx_path = om.save(om.small_cnn(), tmp_path / "model.onnx")
    with pytest.raises(ModelLoadError, match="no psb_tvm integrity record"):
        psb_tvm.load(onnx_path)
    with pytest.raises(ModelLoadError, match="not found") as err:
        psb_tvm.load(tmp_path / "none.so")
    assert str(tmp_path / "none.so") in str(err.value)


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import psb_tvm
    so, x_path, out_path, meta_path = sys.argv[1:]
    module = psb_tvm.load(so)
    np.save(out_path, module.run(np.load(x_path)))
    with open(meta_path, "w") as f:
        f.write(module.metadata.to_json())
    """
)


def test_end_to_end_in_a_fresh_process(tmp_path):
    module = _compile_cnn(samples=32, seed=7, config=PSBConfig(lowerings={"pwconv": "shiftadd"}, exclude=("fc",)))
    x = _x(CNN_SHAPE, seed=11)
    expected = module.run(x)
    so = module.export_library(tmp_path / "small_cnn.so")
    np.save(tmp_path / "x.npy", x)
    out_path, meta_path = tmp_path / "out.npy", tmp_path / "meta.json"
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, so, str(tmp_path / "x.npy"), str(out_path), str(meta_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(out_path)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert out.tobytes() == expected.tobytes()  # bit for bit
    meta = json.loads(meta_path.read_text())
    assert meta["layers"] == module.layers
    assert meta["samples"] == 32 and meta["seed"] == 7
    assert meta["config"] == module.metadata["config"]
    assert PSBConfig.from_dict(meta["config"]) == PSBConfig(lowerings={"pwconv": "shiftadd"}, exclude=("fc",))
    assert meta == json.loads(module.metadata.to_json())
    assert all(math.isfinite(l["act_max_abs"]) for l in meta["layers"] if l["status"] == "psb")
    assert os.path.getsize(so) > 0


def test_export_sends_tvm_native_log_noise_to_the_logger(tmp_path, capfd, caplog):
    """TVM 0.27 prints 'executable.cc: Warning: Scope Saving:' lines when it exports a module that
    has run (the demo's case): they go to the "psb_tvm" logger at debug level, not to the terminal."""
    import logging

    from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split

    x_train, _, _, _ = load_digits_split()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = psb_tvm.compile(DIGITS_ONNX, samples=2, input_shapes={"input": (4, 1, 8, 8)},
                                 calibration={"input": x_train[:32]}, cache=False)  # in memory: export builds
    module.run(x_train[:4])
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger="psb_tvm"):
        module.export_library(tmp_path / "m.so")
    assert "Scope Saving" not in capfd.readouterr().err
    assert any("Scope Saving" in r.getMessage() for r in caplog.records if r.name == "psb_tvm")
