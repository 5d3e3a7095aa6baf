"""The tutorials (tutorials/*.py) run end to end in ``--fast`` mode and print their key numbers.

Each script runs as a subprocess with TVM_NUM_THREADS=2, from an empty working directory, with
``--out-dir`` in a temporary folder: the test also checks that nothing is written elsewhere.
Steps that need cmake, the aarch64 cross compiler or qemu are skipped by the scripts when the
tools are missing; where the tools are installed (CI), the test asserts that those steps ran.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
PCT = r"[0-9]+\.[0-9]+%"

HOST_RUNNER_TOOLS = ("cmake", "g++")
ARM_TOOLS = ("cmake", "aarch64-linux-gnu-g++", "qemu-aarch64")


def _have(tools):
    return all(shutil.which(t) for t in tools)


def _run(script, tmp_path, *extra, timeout=600):
    cwd = tmp_path / "cwd"
    out = tmp_path / "out"
    cwd.mkdir()
    env = dict(os.environ, TVM_NUM_THREADS="2", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, str(TUTORIALS / script), "--fast", "--out-dir", str(out), *extra],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + "\n--- stderr (tail) ---\n" + proc.stderr[-4000:]
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{log}"
    assert list(cwd.iterdir()) == [], f"{script} wrote into its working directory: {list(cwd.iterdir())}"
    return proc.stdout


def _expect(stdout, *patterns):
    for pattern in patterns:
        assert re.search(pattern, stdout, re.MULTILINE), f"missing {pattern!r} in:\n{stdout}"


def test_every_tutorial_is_listed_in_the_readme():
    readme = (TUTORIALS / "README.md").read_text()
    scripts = sorted(p.name for p in TUTORIALS.glob("[0-9][0-9]_*.py"))
    assert len(scripts) == 6
    for name in scripts:
        assert name in readme, f"{name} is not listed in tutorials/README.md"


def test_01_compile_and_deploy(tmp_path):
    stdout = _run("01_compile_and_deploy.py", tmp_path)
    _expect(stdout, rf"^float accuracy: {PCT}$", rf"^PSB accuracy \(n=16\): {PCT}$",
            r"^loaded module matches the compiled one bit for bit: True$",
            r"^5 of 5 linear layers are PSB", r"^n_max: 64")  # psb-tvm info
    acc = float(re.search(r"^PSB accuracy \(n=16\): ([0-9.]+)%", stdout, re.MULTILINE).group(1))
    assert acc > 90
    if _have(HOST_RUNNER_TOOLS):
        _expect(stdout, r"^psb_run output matches Python bit for bit \(compiled default n\): True$",
                r"^psb_run output matches Python bit for bit \(--samples 4 --seed 3\): True$",
                r"median latency: [0-9.]+ ms")
    else:
        _expect(stdout, r"^SKIPPED the C\+\+ runner")
    assert (tmp_path / "out" / "digits_psb.so").is_file()


def test_02_runtime_accuracy_knob(tmp_path):
    stdout = _run("02_runtime_accuracy_knob.py", tmp_path)
    accs = {int(n): float(a) for n, a in re.findall(r"^n=(\d+)\s+accuracy\s+([0-9.]+)%\s+rel\. error", stdout, re.MULTILINE)}
    assert set(accs) == {1, 4, 16, 64}, stdout
    assert accs[64] > 90 and accs[64] >= accs[1], accs
    _expect(stdout, rf"^2\. per-layer n .*: accuracy {PCT}",
            r"^3\. same seed, same bits: True; another seed differs: True",
            r"^n=4\s+mean logit std [0-9.]+",
            r"^refined to n=16: equals run\(samples=16\) bit for bit: True$",
            rf"^margin 0\.5: early-exit accuracy {PCT}, mean final n [0-9.]+",
            r"^7\. frozen n=8 equals run\(samples=8, seed=0\) bit for bit: True",
            r"frozen\.run\(samples=4\) -> ConfigError")


def test_03_attention(tmp_path):
    stdout = _run("03_attention.py", tmp_path)
    _expect(stdout, r"high-n work fraction 0\.\d+",
            r"all-ones mask == run\(samples=16\): True; all-zeros mask == run\(samples=4\): True",
            rf"^full low-n \(n=4\) accuracy: {PCT}", rf"^full high-n \(n=16\) accuracy: {PCT}")
    rows = re.findall(r"^\| (mean_entropy|max_entropy|random) \| [0-9.]+ \| \d \| ([0-9.]+)% \| [-+0-9.]+ \| "
                      r"([0-9.]+)% \| ([0-9.]+)% \|$", stdout, re.MULTILINE)
    assert {r[0] for r in rows} == {"mean_entropy", "max_entropy", "random"}, stdout
    for _, acc, _, work in rows:
        assert float(acc) > 80 and 0 < float(work) <= 100


def test_04_tuning(tmp_path):
    stdout = _run("04_tuning.py", tmp_path)
    _expect(stdout, r"^\| psb_0_conv1_Conv \| 1 \| [0-9.]+ \|",
            r"^second tune\(\) with the same work_dir: 0 new trials",
            r"^compile\(tuning_db=\.\.\.\): schedules [1-9]\d* tuned",
            r"^tuned outputs identical to default outputs .*: True$",
            r"^latency n=8: default [0-9.]+ ms, tuned [0-9.]+ ms")
    assert (tmp_path / "out" / "tuning" / "psb_tuning.json").is_file()


def test_05_arm_cross_compile(tmp_path):
    stdout = _run("05_arm_cross_compile.py", tmp_path)
    _expect(stdout, r"^same PSB layers and activation scales on both targets: True$",
            r"cannot run on this host CPU", rf"^x86 accuracy on 20 images \(n=16\): {PCT}$")
    if _have(ARM_TOOLS):
        _expect(stdout, r"^exported digits_aarch64\.so: an aarch64 shared library",
                r"^qemu aarch64 vs x86 at n=16 seed=0: bit-identical True",
                r"^qemu aarch64 vs x86 at n=4 seed=9: bit-identical True")
    else:
        _expect(stdout, r"^SKIPPED")


def test_06_tvm_pipeline(tmp_path):
    stdout = _run("06_tvm_pipeline.py", tmp_path)
    _expect(stdout, r"^PSB layers: conv2d_0 \(conv2d",
            r"^functions after the rewrite: attend, cached, forward, main, probe, sample, weights$",
            r"^passes seen by the instrument \(some\): RewriteToPSB -> HandOffInt8Activations -> FuseResidualAdd -> psb_cpu "
            r"-> ApplyDefaultSchedule -> AssertSampleBounds$",
            r"^n=4: accuracy [0-9.]+%, bit-identical to psb_tvm.compile: True$",
            r"^n=16: accuracy [0-9.]+%, bit-identical to psb_tvm.compile: True$")
