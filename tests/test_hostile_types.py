"""Hostile and careless arguments (issue 14): strict types for every public parameter, CLI exit
codes, layers too large to build, and the zoo's wheel hashes. Every refusal is a ``PSBError`` whose
message names the argument; the CLI exits 2 with a one-line message and writes nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile

import numpy as np
import onnx_models
import pytest

import psb_tvm
from psb_tvm import ConfigError, PSBConfig, PSBError, UnsupportedModelError, numerics

pytestmark = pytest.mark.filterwarnings("ignore")


def _names(message: str, name: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message) is not None


# ---------------------------------------------------------------------------- PSBConfig
@pytest.mark.parametrize("field, value", [
    ("E", True), ("E", 4.0), ("P", True), ("n_max", True), ("n_max", 8.0), ("n_max", "8"),
    ("act_bits", 8.0), ("act_bits", True), ("act_bits", "8"),
    ("per_channel", "no"), ("per_channel", 0), ("exclude_first_last", "no"), ("exclude_first_last", 1),
    ("sampler", 5), ("sampler", ["iid"]), ("lowering", 5), ("lowerings", [1]), ("lowerings", {1: "intdot"}),
    ("lowerings", {"fc": ["intdot"]}), ("include", 5), ("include", [1]), ("include", {"fc": 1}), ("exclude", 5),
    ("exclude", b"fc"), ("calibration_fallback_samples", True), ("calibration_fallback_samples", 8.0),
    ("layer_act_bits", [1]), ("layer_act_bits", {"fc": 8.0}), ("layer_act_bits", {"fc": True}),
    ("layer_act_bits", {1: 8}), ("act_range", ["max"]), ("act_percentile", float("nan")), ("act_percentile", True),
    ("act_percentile", "99"), ("act_headroom", float("nan")), ("act_headroom", float("inf")), ("act_headroom", "2"),
    ("act_auto_error", float("nan")), ("act_auto_error", True),
])
def test_config_refuses_wrong_types(field, value):
    with pytest.raises(ConfigError) as err:
        PSBConfig(**{field: value})
    assert _names(str(err.value), field), str(err.value)


def test_config_normalises_numpy_scalars_and_keeps_its_defaults():
    cfg = PSBConfig(E=np.int64(3), n_max=np.int32(8), act_bits=np.int16(8), per_channel=np.bool_(False),
                    act_percentile=np.float32(99.0), exclude=None, include={"b", "a"})
    assert (type(cfg.E), type(cfg.n_max), type(cfg.act_bits), type(cfg.per_channel)) == (int, int, int, bool)
    assert type(cfg.act_percentile) is float and cfg.exclude == () and cfg.include == ("a", "b")
    json.dumps(cfg.to_dict())
    assert PSBConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="dict of fields"):
        PSBConfig.from_dict(["E", 4])
    with pytest.raises(ConfigError, match="unknown preset"):
        PSBConfig.preset(["int8"])


# ---------------------------------------------------------------------------- compile()
MODEL = onnx_models.dense_model()  # x [2, 32] -> Gemm "fc" -> y [2, 10]


@pytest.mark.parametrize("kwargs, name", [
    (dict(target=5), "target"), (dict(target=None), "target"), (dict(target={"kind": "c"}), "target"),
    (dict(samples="4"), "samples"), (dict(samples=4.0), "samples"), (dict(samples=True), "samples"),
    (dict(samples={"fc": True}), "samples"), (dict(samples={5: 4}), "samples"), (dict(samples=[4]), "samples"),
    (dict(seed=True), "seed"), (dict(seed=1.0), "seed"), (dict(seed="1"), "seed"),
    (dict(frozen="no"), "frozen"), (dict(frozen=1), "frozen"), (dict(frozen=None), "frozen"),
    (dict(input_shapes=[1, 2]), "input_shapes"), (dict(input_shapes="x"), "input_shapes"),
    (dict(input_shapes={"x": (2, 4.5)}), "input_shapes"), (dict(input_shapes={"x": (2.0, 32)}), "input_shapes"),
    (dict(input_shapes={"x": (True, 32)}), "input_shapes"), (dict(input_shapes={"x": 5}), "input_shapes"),
    (dict(input_shapes={"x": "2,32"}), "input_shapes"), (dict(input_shapes={5: (2, 32)}), "input_shapes"),
    (dict(input_shapes={"x": (0, 32)}), "input_shapes"),
    (dict(calibration=5), "calibration"), (dict(calibration="x"), "calibration"), (dict(calibration=[1, 2]), "calibration"),
    (dict(calibration={"x": "abc"}), "calibration"), (dict(calibration={"x": [[1, 2], [3]]}), "calibration"),
    (dict(calibration={"x": np.zeros((3, 32), complex)}), "calibration"),
    (dict(calibration={1: np.zeros((3, 32))}), "calibration"),
    (dict(config=5), "config"), (dict(config={"E": True}), "E"), (dict(config={"per_channel": "no"}), "per_channel"),
    (dict(tuning_db=5), "tuning_db"),
])
def test_compile_refuses_wrong_types(kwargs, name):
    with pytest.raises(ConfigError) as err:
        psb_tvm.compile(MODEL, **kwargs)
    assert _names(str(err.value), name), str(err.value)


@pytest.fixture(scope="module")
def dense_module():
    return psb_tvm.compile(MODEL, samples=4, calibration={"x": np.random.default_rng(0).standard_normal((8, 32))})


def test_compile_accepts_numpy_dims_and_runs(dense_module):
    module = psb_tvm.compile(MODEL, samples=np.int64(4), input_shapes={"x": np.array([2, 32])}, seed=np.uint32(1),
                             calibration=[{"x": [[0.5] * 32] * 4}], frozen=np.bool_(False))
    assert module.inputs[0][1] == (2, 32) and module.psb_layers == ["fc"]


@pytest.mark.parametrize("kwargs, name", [
    (dict(samples=True), "samples"), (dict(samples=4.0), "samples"), (dict(samples="4"), "samples"),
    (dict(samples=np.bool_(True)), "samples"), (dict(samples={"fc": 4.0}), "samples"), (dict(samples={3: 4}), "samples"),
    (dict(seed=True), "seed"), (dict(seed=1.5), "seed"), (dict(seed="1"), "seed"), (dict(seed=np.float64(1)), "seed"),
])
def test_run_refuses_wrong_types(dense_module, kwargs, name):
    x = np.zeros((2, 32), np.float32)
    with pytest.raises(ConfigError) as err:
        dense_module.run(x, **kwargs)
    assert _names(str(err.value), name), str(err.value)


def test_load_refuses_a_wrong_weight_cache_size(dense_module, tmp_path):
    path = tmp_path / "m.so"
    dense_module.export_library(str(path))
    for value in (True, 1.5, "1", -1):
        with pytest.raises(ConfigError, match="weight_cache_bytes"):
            psb_tvm.load(path, weight_cache_bytes=value)


@pytest.mark.parametrize("value", [True, np.bool_(True), 4.0, "4", 3, 0])
def test_check_samples_and_seed_refuse_bools_and_floats(value):
    with pytest.raises(ValueError, match="samples"):
        numerics.check_samples(value)
    if not isinstance(value, int) or isinstance(value, bool):
        with pytest.raises(ValueError, match="seed"):
            numerics.check_seed(value)


# ---------------------------------------------------------------------------- layers too large to build
def test_layer_with_2_31_outputs_is_an_unsupported_model_error():
    """A dense layer [65536, 8] x [8, 32768]: 2**31 outputs. Refused when the layers are found,
    before any calibration or build (nothing of that size is allocated)."""
    big = onnx_models.dense_model(in_features=8, out_features=1 << 15, batch=1 << 16)
    with pytest.raises(UnsupportedModelError) as err:
        psb_tvm.compile(big)
    assert "'fc'" in str(err.value) and "2147483648 output elements >= 2^31" in str(err.value)
    conv = onnx_models.conv_model(in_ch=8, out_ch=512, kernel=1, pad=0, hw=2048, relu=False)
    with pytest.raises(UnsupportedModelError, match=r"'conv' \(conv2d\): 2147483648 output elements"):
        psb_tvm.compile(conv)


def test_layer_with_2_31_inputs_or_weights_stays_float(monkeypatch):
    from psb_tvm.passes import find_layer_sites
    from psb_tvm.passes import select_psb_layers as sel

    from psb_tvm.frontend import import_onnx

    # a 1x1 conv, stride 4, on a [1, 512, 2048, 2048] input: 2**31 inputs, 2**21 outputs
    conv = onnx_models.conv_model(in_ch=512, out_ch=8, kernel=1, pad=0, stride=4, hw=2048, relu=False)
    (site,) = find_layer_sites(import_onnx(conv).mod["main"])
    assert site.reason == "too large: 2147483648 input elements >= 2^31 (the PSB kernels index with int32)"
    assert not site.output_too_large
    # weights: the same rule with a lowered bound (a real 2**31-weight layer is an 8 GiB model)
    monkeypatch.setattr(sel, "MAX_KERNEL_ELEMENTS", 300)  # fc: 20 outputs, 64 inputs, 320 weights
    module = psb_tvm.compile(MODEL)
    assert module.psb_layers == [] and module.layers[0]["reason"].startswith("too large: 320 weight elements")


# ---------------------------------------------------------------------------- the zoo's wheel hashes
@pytest.fixture
def zoo_cache(tmp_path, monkeypatch):
    import zoo

    monkeypatch.setenv("PSB_TVM_CACHE", str(tmp_path))
    monkeypatch.delenv(zoo.TRUST_UNPINNED_ENV, raising=False)
    (tmp_path / "wheels").mkdir()
    return zoo, tmp_path / "wheels"


def test_zoo_deletes_a_wheel_whose_hash_differs(zoo_cache):
    zoo, wheels = zoo_cache
    name = "facenet_pytorch-2.6.0-py3-none-any.whl"
    bad = wheels / name
    bad.write_bytes(b"not the wheel")
    with pytest.raises(zoo.WheelHashError) as err:
        zoo.extract_wheel(*zoo.FACENET)
    msg = str(err.value)
    assert isinstance(err.value, PSBError) and name in msg and zoo.WHEEL_SHA256[name] in msg
    assert not bad.exists() and not (wheels.parent / "extracted").exists()


def test_zoo_refuses_an_unpinned_wheel_unless_trusted(zoo_cache, monkeypatch):
    zoo, wheels = zoo_cache
    other = wheels / "silero_vad-6.2.3-cp311-cp311-linux_x86_64.whl"  # another build of the pinned version
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("silero_vad/data/a.onnx", b"x")
    with pytest.raises(zoo.WheelHashError) as err:
        zoo.extract_wheel(*zoo.SILERO)
    assert other.name in str(err.value) and zoo.TRUST_UNPINNED_ENV in str(err.value)
    assert other.exists() and not (wheels.parent / "extracted").exists()
    monkeypatch.setenv(zoo.TRUST_UNPINNED_ENV, "1")
    with pytest.warns(UserWarning, match="unchecked"):
        root = zoo.extract_wheel(*zoo.SILERO)
    assert (root / "silero_vad" / "data" / "a.onnx").read_bytes() == b"x"


def test_zoo_checks_the_hash_before_extracting_again(zoo_cache, monkeypatch):
    zoo, wheels = zoo_cache
    wheel = wheels / "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("rapidocr_onnxruntime/models/m.onnx", b"good")
    monkeypatch.setitem(zoo.WHEEL_SHA256, wheel.name, zoo.file_sha256(wheel))
    root = zoo.extract_wheel(*zoo.RAPIDOCR)
    assert (root / ".complete").read_text().strip() == zoo.WHEEL_SHA256[wheel.name]
    with zipfile.ZipFile(wheel, "w") as z:  # the cached wheel is replaced: refused, deleted
        z.writestr("rapidocr_onnxruntime/models/m.onnx", b"evil")
    with pytest.raises(zoo.WheelHashError, match="does not match the pinned"):
        zoo.extract_wheel(*zoo.RAPIDOCR)
    assert not wheel.exists()
    assert (root / "rapidocr_onnxruntime" / "models" / "m.onnx").read_bytes() == b"good"


# ---------------------------------------------------------------------------- CLI exit codes
def _start(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "psb_tvm.cli", *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


CLI_CASES = {
    "garbage_npz": (["compile", "d.onnx", "-o", "out.so", "--calibration", "garbage.npz"], "garbage.npz"),
    "text_npz": (["compile", "d.onnx", "-o", "out.so", "--calibration", "text.npz"], "text.npz"),
    "wrong_keys_npz": (["compile", "d.onnx", "-o", "out.so", "--calibration", "wrongkeys.npz"], "wrongkeys.npz"),
    "strings_npz": (["compile", "d.onnx", "-o", "out.so", "--calibration", "strings.npz"], "calibration"),
    "n_max_0": (["compile", "d.onnx", "-o", "out.so", "--n-max", "0", "--json"], "n_max"),
    "target_kind": (["compile", "d.onnx", "-o", "out.so", "--target", "c"], "target"),
    "run_time_negative": (["run", "d.so", "x.npy", "-o", "y.npy", "--time", "-3"], "--time"),
    "bench_repeats_negative": (["bench", "d.so", "--repeats", "-1"], "--repeats"),
    "bench_repeats_0": (["bench", "d.so", "--repeats", "0", "--json"], "--repeats"),
    "demo_export_samples": (["demo", "--samples", "2,4", "--export-samples", "7", "--out", "demo.so"], "--export-samples"),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, dense_module):
    d = tmp_path_factory.mktemp("hostile_cli")
    onnx_models.save(MODEL, d / "d.onnx")
    dense_module.export_library(str(d / "d.so"))
    np.save(d / "x.npy", np.zeros((2, 32), np.float32))
    (d / "garbage.npz").write_bytes(b"PK\x03\x04" + b"garbage" * 20)
    (d / "text.npz").write_text("hello")
    np.savez(d / "wrongkeys.npz", a=np.zeros((3, 32), np.float32), b=np.zeros(3))
    np.savez(d / "strings.npz", x=np.array([["a"] * 32] * 3))
    before = sorted(p.name for p in d.iterdir())
    procs = {}
    for key, (args, _) in CLI_CASES.items():  # two at a time (a start costs ~2 s of imports)
        procs[key] = _start(*args, cwd=d)
        if len(procs) % 2 == 0:
            for p in procs.values():
                p.wait(timeout=300)
    results = {key: (p.wait(timeout=300), *p.communicate()) for key, p in procs.items()}
    return results, before, sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_arguments_exit_2_with_one_line(cli_results, case):
    results, _, _ = cli_results
    code, out, err = results[case]
    assert code == 2, (code, err)
    assert "Traceback" not in err and CLI_CASES[case][1] in err, err
    message = [line for line in err.splitlines() if ": error: " in line]
    assert len(message) == 1, err
    if "--json" in CLI_CASES[case][0]:
        result = json.loads(out.strip().splitlines()[-1])
        assert result["exit_code"] == 2 and CLI_CASES[case][1] in result["error"]


def test_cli_failures_write_nothing(cli_results):
    _, before, after = cli_results
    assert after == before


def test_cli_psb_error_is_one_line(monkeypatch, capsys):
    from psb_tvm import cli

    def boom(args):
        raise ConfigError("first line\nsecond line")

    monkeypatch.setattr(cli, "cmd_info", boom)
    assert cli.main(["info", "m.so", "--json"]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == "psb-tvm info: error: first line | second line"
    assert json.loads(out) == {"error": "first line | second line", "exit_code": 2}
