"""Issue 14's probes as regression tests: threads, external-data models, bad calibration, bad
weights, non-finite inputs, output files and damaged modules. Each must end in a PSBError naming
the bad input (CLI exit 2) or in a defined result, never in a crash or a silently wrong output."""

import copy
import os
import stat
import threading
import warnings

import numpy as np
import onnx
import onnx_models
import onnxruntime as ort
import pytest
import tvm
from onnx import numpy_helper

import psb_tvm
from psb_tvm import PSBConfig, cli, files, numerics, onnxsim_worker
from psb_tvm.compiler import plan
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split
from psb_tvm.errors import ConfigError, InputError, ModelLoadError, OutputError

SHAPES = {"input": (4, 1, 8, 8)}


@pytest.fixture(scope="module")
def digits():
    x_train, _, x_test, _ = load_digits_split()
    calib = {"input": x_train[:64]}
    module = psb_tvm.compile(DIGITS_ONNX, samples=4, seed=0, input_shapes=SHAPES, calibration=calib)
    return module, x_test[:4], calib


@pytest.fixture(scope="module")
def exported(digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "digits.so"
    digits[0].export_library(path)
    return path


def _quiet_compile(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return psb_tvm.compile(*args, **kwargs)


# ---------------------------------------------------------------------------- threads
def test_one_module_hammered_from_threads_matches_sequential(digits):
    """run, sample_stats, attend and a refinement session from 4 threads at once: every output
    equals the one computed alone (one VM per thread; the weight cache is shared)."""
    m, x, _ = digits
    want = {
        "run": [m.run(x, samples=n, seed=s) for n, s in ((2, 0), (8, 1))],
        "stats": m.sample_stats(x, draws=2, samples=4)["mean"],
        "attend": m.attend(x, low=2, high=8, fraction=0.5).output,
        "session": m.run(x, samples=4, seed=0),
    }
    errors = []

    def worker(t):
        try:
            for i in range(3):
                k = (t + i) % 4
                if k == 0:
                    got = [m.run(x, samples=n, seed=s) for n, s in ((2, 0), (8, 1))]
                    ok = all(np.array_equal(a, b) for a, b in zip(got, want["run"]))
                elif k == 1:
                    ok = np.array_equal(m.sample_stats(x, draws=2, samples=4)["mean"], want["stats"])
                elif k == 2:
                    ok = np.array_equal(m.attend(x, low=2, high=8, fraction=0.5).output, want["attend"])
                else:
                    session = m.session(x, samples=1, seed=0)
                    session.refine()
                    ok = np.array_equal(session.refine(), want["session"])
                if not ok:
                    errors.append((t, i, k))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append((t, repr(err)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ---------------------------------------------------------------------------- models with external data
@pytest.fixture(scope="module")
def external(tmp_path_factory):
    d = tmp_path_factory.mktemp("external")
    model = onnx_models.conv_model()
    onnx.save_model(copy.deepcopy(model), d / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    x = np.random.default_rng(0).random((1, 4, 10, 10), np.float32)
    return d, model, x


def test_external_data_model_loads_from_any_directory(external, tmp_path, monkeypatch):
    d, model, x = external
    want = _quiet_compile(model, samples=4, calibration=x).run(x)
    for cwd in (tmp_path, d):  # elsewhere, and the model's own directory (onnxsim crashed there)
        monkeypatch.chdir(cwd)
        assert np.array_equal(_quiet_compile(str(d / "model.onnx"), samples=4, calibration=x).run(x), want)


def test_missing_or_short_external_data_is_a_model_load_error(external, tmp_path):
    d, _, _ = external
    copy_dir = tmp_path / "m"
    copy_dir.mkdir()
    (copy_dir / "model.onnx").write_bytes((d / "model.onnx").read_bytes())
    with pytest.raises(ModelLoadError, match="external data file 'weights.bin' of tensor"):
        psb_tvm.compile(str(copy_dir / "model.onnx"))
    (copy_dir / "weights.bin").write_bytes(b"12")
    with pytest.raises(ModelLoadError, match="external data"):
        psb_tvm.compile(str(copy_dir / "model.onnx"))


def test_external_data_outside_the_model_directory_is_refused(external, tmp_path):
    d, _, _ = external
    proto = onnx.load(str(d / "model.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../weights.bin"
    (tmp_path / "sub").mkdir()
    (tmp_path / "weights.bin").write_bytes((d / "weights.bin").read_bytes())
    onnx.save_model(proto, str(tmp_path / "sub" / "model.onnx"))
    with pytest.raises(ModelLoadError, match="outside the model's directory"):
        psb_tvm.compile(str(tmp_path / "sub" / "model.onnx"))


def test_onnxsim_crash_is_a_warning_and_a_fallback(monkeypatch):
    """onnxsim runs in a worker process: a segfault there becomes a warning, the model is imported
    unsimplified, and the next call starts a new worker."""
    monkeypatch.setattr(onnxsim_worker, "_WORKER", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    monkeypatch.setattr(onnxsim_worker, "_proc", None)
    model = onnx_models.conv_model()
    x = np.random.default_rng(1).random((1, 4, 10, 10), np.float32)
    with pytest.warns(UserWarning, match=r"onnxsim crashed \(signal 11\)"):
        crashed = psb_tvm.compile(model, samples=4, calibration=x)
    monkeypatch.undo()
    onnxsim_worker._stop()
    onnxsim_worker._proc = None
    normal = _quiet_compile(model, samples=4, calibration=x)
    assert np.array_equal(crashed.run(x), normal.run(x))


# ---------------------------------------------------------------------------- calibration and weights
def test_non_finite_calibration_is_a_config_error_naming_input_and_sample(digits):
    _, _, calib = digits
    bad = calib["input"].copy()
    bad[37, 0, 2, 3] = np.inf
    with pytest.raises(ConfigError, match=r"input 'input' has 1 non-finite value.*at index \(37, 0, 2, 3\).*sample 37"):
        psb_tvm.compile(DIGITS_ONNX, input_shapes=SHAPES, calibration={"input": bad})
    with pytest.raises(ConfigError, match="non-finite"):
        psb_tvm.compile(DIGITS_ONNX, input_shapes=SHAPES, calibration={"input": np.full_like(bad, np.nan)})


def test_zero_and_out_of_scale_calibration_warn_with_the_layer_name(digits):
    _, _, calib = digits
    with pytest.warns(UserWarning, match=r"layer '/conv1/Conv': its input was 0 on all calibration data"):
        psb_tvm.compile(DIGITS_ONNX, input_shapes=SHAPES, calibration={"input": np.zeros_like(calib["input"])})
    with pytest.warns(UserWarning, match=r"layer '/conv1/Conv': calibration range .* clamped"):
        psb_tvm.compile(DIGITS_ONNX, input_shapes=SHAPES, calibration={"input": calib["input"] * 1e30})


def _scaled_weights(model, scale):
    model = copy.deepcopy(model)
    for t in model.graph.initializer:
        if len(t.dims) == 2:
            t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) * scale).astype(np.float32), t.name))
    return model


@pytest.mark.parametrize("scale, match", [(np.nan, "weights contain NaN or infinity"),
                                          (1e36, "outside float32's range")])
def test_bad_weights_are_a_config_error_naming_the_layer(scale, match):
    model = _scaled_weights(onnx_models.dense_model(batch=2), scale)
    x = np.random.default_rng(0).random((8, 32), np.float32)
    with pytest.raises(ConfigError, match=rf"layer 'fc': .*{match}"):
        psb_tvm.compile(model, calibration=x)


def test_dead_channels_below_float32s_scale_range_are_encoded_as_zero():
    """BatchNorm folding leaves dead channels (PP-OCRv4's recognizer: weights of 1e-40 and 1e-32)
    whose output scale 2**(k_lo - f - log2 n) float32 cannot hold. They become zero weights (their
    true contribution is below 2**-100), counted in the layer info, and the layer still matches
    the numpy oracle bit for bit and ONNX Runtime closely."""
    model = copy.deepcopy(onnx_models.conv_model(in_ch=4, out_ch=8, relu=False, batch=2))
    w = next(t for t in model.graph.initializer if t.name == "conv_W")
    arr = numpy_helper.to_array(w).copy()
    arr[2] = 3e-40  # denormal
    arr[5] = 4e-32  # normal, but 2**(k_lo - f - 6) < 2**-126 at 16-bit activations
    w.CopyFrom(numpy_helper.from_array(arr, "conv_W"))
    x = np.random.default_rng(1).normal(size=(16, 4, 10, 10)).astype(np.float32)
    cfg = PSBConfig(act_bits=16)
    m = _quiet_compile(model, samples=64, calibration={"x": x}, config=cfg)
    assert m.layers[0]["negligible_channels"] == 2
    layer = plan(model, calibration={"x": x}, config=cfg).layers[0]
    assert not layer.enc.threshold[[2, 5]].any() and layer.enc.threshold.any()
    spec = layer.spec
    q = numerics.integer_weights(layer.enc, 64, 0, layer.site_index)
    acc = numerics.conv2d_int(numerics.quantize_activations(x[:2], spec.frac_bits, 16, True), q, spec.stride, spec.padding)
    want = numerics.epilogue(acc, numerics.output_scale(layer.enc.k_lo, spec.frac_bits, 64), layer.bias, None, 1)
    got = m.run(x[:2], samples=64, seed=0)
    np.testing.assert_array_equal(got, want)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x[:2]})[0]
    np.testing.assert_array_equal(got[:, [2, 5]], ref[:, [2, 5]])  # the bias, exactly
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.02


# ---------------------------------------------------------------------------- non-finite inputs
def test_non_finite_inputs_error_or_propagate_per_batch_item(digits):
    m, x, _ = digits
    bad = x.copy()
    bad[2, 0, 4, 5] = -np.inf
    with pytest.raises(InputError, match=r"input 'input': non-finite value -inf at index \(2, 0, 4, 5\)"):
        m.run(bad)
    with pytest.raises(psb_tvm.PSBError, match="nonfinite must be"):
        m.run(bad, nonfinite="ignore")
    got = m.run(bad, nonfinite="propagate")
    clean = m.run(np.where(np.isfinite(bad), bad, 0).astype(np.float32))
    assert np.isnan(got[2]).all() and not np.isnan(np.delete(got, 2, 0)).any()
    assert np.array_equal(np.delete(got, 2, 0), np.delete(clean, 2, 0))


def test_inputs_far_outside_the_calibration_range_warn_once(digits):
    """Calibrated on 0..255 pixels, run on 0..1 (or the reverse): the output degrades without an
    error, so run() says so, once per input and direction."""
    _, x, calib = digits
    m = _quiet_compile(DIGITS_ONNX, samples=4, input_shapes=SHAPES, calibration={"input": calib["input"] * 255})
    assert m.metadata["input_ranges"]["input"][1] == pytest.approx(255 * float(calib["input"].max()))
    with pytest.warns(UserWarning, match=r"input 'input': max \|x\| = .* far below the calibration range"):
        m.run(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.run(x)  # once only
        m.run(x * 255)  # in range: silent
    with pytest.warns(UserWarning, match="far above the calibration range"):
        m.run(x * 255 * 4)


def test_kernels_and_oracle_agree_on_nan(digits):
    """Passed straight to the kernels (no check), NaN quantizes like +inf: to the largest code,
    which is what the numpy oracle does too."""
    m, x, _ = digits
    assert numerics.quantize_activations(np.array([np.nan, np.inf, -np.inf]), 3, 8, True).tolist() == [127, 127, -128]
    vm = m._machine()
    args = [tvm.runtime.ShapeTuple([4] * len(m.psb_layers)), tvm.runtime.ShapeTuple([0])]
    outs = []
    for v in (np.nan, np.inf):
        bad = x.copy()
        bad[1, 0, 3, 3] = v
        outs.append(vm["main"](tvm.runtime.tensor(bad), *args).numpy())
    assert np.array_equal(outs[0], outs[1])


def test_cli_run_refuses_non_finite_input_and_writes_nothing(exported, digits, tmp_path, capsys):
    _, x, _ = digits
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "x.npy", bad)
    out = tmp_path / "y.npy"
    code = cli.main(["run", str(exported), str(tmp_path / "x.npy"), "--output", str(out)])
    assert code == 2 and "non-finite value nan at index (0, 0, 0, 0)" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------- output files
def test_export_keeps_devices_links_and_gives_normal_permissions(digits, tmp_path):
    m = digits[0]
    old = os.umask(0o022)
    try:
        m.export_library("/dev/null")  # written through, not replaced by a regular file
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
        target = tmp_path / "real.so"
        m.export_library(target)
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
        os.chmod(target, 0o750)
        link = tmp_path / "link.so"
        link.symlink_to(target)
        m.export_library(link)  # replaces the link's target, keeps the link and the file's mode
        assert link.is_symlink() and stat.S_IMODE(os.stat(target).st_mode) == 0o750
        psb_tvm.load(link)
        with pytest.raises(OutputError, match="is a directory"):
            m.export_library(tmp_path)
        with pytest.raises(OutputError, match="does not exist"):
            m.export_library(tmp_path / "missing" / "m.so")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["link.so", "real.so"]  # no temp files left
    finally:
        os.umask(old)


def test_cli_outputs_through_links_and_devices_with_normal_permissions(exported, digits, tmp_path, capsys):
    _, x, _ = digits
    np.save(tmp_path / "x.npy", x)
    old = os.umask(0o022)
    try:
        out = tmp_path / "y.npy"
        assert cli.main(["run", str(exported), str(tmp_path / "x.npy"), "--output", str(out)]) == 0
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
        assert cli.main(["run", str(exported), str(tmp_path / "x.npy"), "--output", "/dev/null"]) == 0
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
        assert cli.main(["run", str(exported), str(tmp_path / "x.npy"), "--output", str(tmp_path)]) == 2
        assert "is a directory" in capsys.readouterr().err
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------- damaged modules
def test_truncated_modules_are_model_load_errors(exported, tmp_path, capsys):
    data = exported.read_bytes()
    for fraction in (0.1, 0.5, 0.999):
        cut = tmp_path / f"cut{fraction}.so"
        cut.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(ModelLoadError, match="truncated"):
            psb_tvm.load(cut)
        assert cli.main(["info", str(cut)]) == 2
        assert "truncated" in capsys.readouterr().err


def test_flipped_bits_are_model_load_errors(exported, tmp_path):
    """Single-bit flips spread over the file (code, weights, metadata, the record itself)."""
    data = exported.read_bytes()
    rng = np.random.default_rng(0)
    for k, pos in enumerate(sorted(rng.choice(len(data), 24, replace=False))):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << (k % 8)
        path = tmp_path / f"flip{k}.so"
        path.write_bytes(bytes(flipped))
        with pytest.raises(ModelLoadError):
            psb_tvm.load(path)


def test_edited_n_max_is_refused_and_the_kernels_check_n(tmp_path):
    """Editing the embedded n_max of an int8 module (8 -> 64) breaks its SHA-256; and called
    directly, the module's functions refuse an n above the n_max they were compiled for."""
    model = onnx_models.dense_model(batch=2)
    x = np.random.default_rng(0).random((2, 32), np.float32)
    m = _quiet_compile(model, samples=8, calibration=x, config=psb_tvm.PSBConfig.preset("int8"))
    path = tmp_path / "int8.so"
    m.export_library(path)
    data = path.read_bytes()
    assert data.count(b'"n_max": 8') >= 1  # the metadata's and its config's
    path.write_bytes(data.replace(b'"n_max": 8', b'"n_max":64'))
    with pytest.raises(ModelLoadError, match="SHA-256 mismatch"):
        psb_tvm.load(path)
    vm = m._machine()
    for n in (16, 3):
        with pytest.raises(Exception, match="power of two <= n_max 8"):
            vm["main"](tvm.runtime.tensor(x), tvm.runtime.ShapeTuple([n]), tvm.runtime.ShapeTuple([0]))


def test_integrity_record_round_trip(exported):
    record = files.verify_module(exported)
    assert record["library_bytes"] + len(files.MAGIC) + 8 < os.path.getsize(exported)
    assert len(record["library_sha256"]) == 64
