"""The psb-tvm command line: demo end to end (small settings) and error exit codes."""

import json
import subprocess
import sys

import numpy as np

import psb_tvm


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "psb_tvm.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_demo_writes_a_loadable_module(tmp_path):
    out = tmp_path / "digits.so"
    proc = _cli("demo", "--samples", "2,8", "--export-samples", "8", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["samples"] for r in report["rows"]] == ["float", 2, 8]
    assert report["rows"][2]["accuracy"] > 0.9
    module = psb_tvm.load(out)
    assert module.samples == 8
    x = np.zeros(module.inputs[0][1], np.float32)
    assert module.run(x).shape == (module.inputs[0][1][0], 10)


def test_demo_bad_output_dir_fails_cleanly(tmp_path):
    proc = _cli("demo", "--samples", "2", "--export-samples", "2", "--out", str(tmp_path / "missing" / "m.so"))
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
    assert not (tmp_path / "missing").exists()


def test_help_explains_the_accuracy_knob():
    proc = _cli("--help")
    assert proc.returncode == 0
    assert "sample count n" in proc.stdout


# ---------------------------------------------------------------------------- compile | run | info | bench | eval
import onnx_models  # noqa: E402
import pytest  # noqa: E402

from psb_tvm import cli  # noqa: E402


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def main(capsys):
    """The CLI in this process (no interpreter start per call): returns returncode, stdout, stderr."""
    def call(*args):
        capsys.readouterr()
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)
    return call


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    onnx_models.save(onnx_models.small_cnn(batch=2), d / "cnn.onnx")
    rng = np.random.default_rng(0)
    np.save(d / "x.npy", rng.standard_normal((2, 3, 12, 12)).astype(np.float32))
    np.savez(d / "calib.npz", x=rng.standard_normal((16, 3, 12, 12)).astype(np.float32))
    proc = _cli("compile", str(d / "cnn.onnx"), "-o", str(d / "cnn.so"), "--calibration", str(d / "calib.npz"),
                "--samples", "8", "--exclude", "fc", "--json")
    assert proc.returncode == 0, proc.stderr
    return d, json.loads(proc.stdout)


def test_compile_json_and_info(compiled, main):
    d, report = compiled
    assert report["output"].endswith("cnn.so") and report["psb_layers"] == ["conv1", "conv2", "dwconv", "pwconv"]
    assert {l["name"]: l["status"] for l in report["layers"]}["fc"] == "float"
    proc = main("info", str(d / "cnn.so"))
    assert proc.returncode == 0, proc.stderr
    for text in ("conv1", "dwconv", "intdot", "n_max: 64", "input  x: float32 (2, 3, 12, 12)", "in config.exclude"):
        assert text in proc.stdout
    meta = json.loads(main("info", str(d / "cnn.so"), "--json").stdout)
    assert meta["samples"] == 8 and meta["psb_layers"] == report["psb_layers"]


def test_run_writes_outputs_matching_the_api(compiled, main):
    d, _ = compiled
    out = d / "y.npy"
    proc = main("run", str(d / "cnn.so"), f"x={d / 'x.npy'}", "--samples", "conv1=16,default=2", "--seed", "3",
                "-o", str(out), "--time", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["samples"] == {"conv1": 16, "conv2": 2, "dwconv": 2, "pwconv": 2} and result["seed"] == 3
    assert result["timing"]["repeats"] == 3 and result["timing"]["median_ms"] > 0
    module = psb_tvm.load(d / "cnn.so")
    expected = module.run(np.load(d / "x.npy"), samples={"conv1": 16, "default": 2}, seed=3)
    assert np.array_equal(np.load(out), expected)


@pytest.mark.parametrize("args, message", [
    (["missing.npy"], "input file for 'x' not found: missing.npy"),
    (["x.npy", "--samples", "3"], "power of two"),
    (["x.npy", "--samples", "conv9=4"], "unknown layers ['conv9']"),
    (["calib.npz"], "cannot read calib.npz as .npy"),
    (["x.npy", "x.npy"], "2 positional input file(s) for 1"),
])
def test_run_errors_exit_2_and_write_nothing(compiled, args, message, main, monkeypatch):
    d, _ = compiled
    before = sorted(p.name for p in d.iterdir())
    monkeypatch.chdir(d)
    proc = main("run", "cnn.so", *args, "--json")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and json.loads(proc.stdout)["exit_code"] == 2
    assert sorted(p.name for p in d.iterdir()) == before


def test_usage_and_missing_file_errors(tmp_path, main):
    assert main("run").returncode == 2  # argparse: missing arguments
    assert main("frobnicate").returncode == 2
    proc = main("info", str(tmp_path / "nope.so"))
    assert proc.returncode == 2 and "compiled module not found" in proc.stderr and "nope.so" in proc.stderr
    proc = main("compile", str(tmp_path / "nope.onnx"))
    assert proc.returncode == 2 and "ONNX model not found" in proc.stderr
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    proc = main("compile", str(bad), "-o", str(tmp_path / "missing" / "m.so"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = main("compile", str(bad), "-o", str(tmp_path / "m.so"))
    assert proc.returncode == 2 and "bad.onnx" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_bench_times_each_n(compiled, main):
    d, _ = compiled
    proc = main("bench", str(d / "cnn.so"), "--samples", "1,4", "--repeats", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert [r["samples"] for r in rows] == [1, 4] and all(r["median_ms"] > 0 for r in rows)
    assert rows[1]["additions"] == 4 * rows[0]["additions"]


def test_eval_compiled_module_writes_reports(compiled, main):
    d, _ = compiled
    rng = np.random.default_rng(1)
    np.savez(d / "evalset.npz", x=rng.standard_normal((6, 3, 12, 12)).astype(np.float32), labels=np.arange(6) % 5)
    out = d / "eval_out"
    out.mkdir()
    proc = main("eval", str(d / "cnn.so"), "--inputs", str(d / "evalset.npz"), "--samples", "1,8", "--out-dir",
                str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["metric"] == "accuracy" and [r["samples"] for r in report["rows"]] == [1, 8]
    assert "float" in report["meta"]["reference"]  # the ONNX source was found: float compile
    assert report["attention"]
    assert {p.name for p in out.iterdir()} == {"eval.json", "eval.md", "eval_accuracy_vs_n.png", "eval_accuracy_vs_cost.png"}
    proc = main("eval", str(d / "cnn.so"), "--inputs", str(d / "nope"), "--out-dir", str(out))
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_tune_then_compile_with_the_database(compiled, main):
    """trials 0: only the default schedules are measured and stored; compile --tuning-db replays them."""
    d, _ = compiled
    work = d / "tuning"
    args = ["--calibration", d / "calib.npz", "--exclude", "fc"]
    proc = main("tune", d / "cnn.onnx", "--work-dir", work, "--trials", "0", "--threads", "2", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["num_threads"] == 2 and {t["name"] for t in result["tasks"]} >= {"psb_0_conv1", "psb_1_conv2"}
    assert all(t["default_ms"] > 0 for t in result["tasks"] if t["name"].startswith("psb_"))
    proc = main("compile", d / "cnn.onnx", "-o", d / "tuned.so", "--samples", "8", "--tuning-db", work, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(main("info", d / "tuned.so", "--json").stdout)
    assert meta["schedules"]["tuned"] >= 4
    x = np.load(d / "x.npy")
    np.testing.assert_array_equal(psb_tvm.load(d / "tuned.so").run(x), psb_tvm.load(d / "cnn.so").run(x))
    # the same database for another target: the command refuses it (exit 2, the reason on stderr)
    proc = main("tune", d / "cnn.onnx", "--work-dir", work, "--trials", "0", "--target", "aarch64", *args)
    assert proc.returncode == 2 and "target" in proc.stderr


def test_cli_lowering_choices_match_the_kernels():
    from psb_tvm.schedules.kernels import LOWERINGS

    assert cli.LOWERING_CHOICES == ("auto", *LOWERINGS)
