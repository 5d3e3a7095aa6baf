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
