"""The code base stays clean under the ruff rules configured in pyproject.toml (pyflakes errors,
pycodestyle, import order)."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ruff():
    exe = shutil.which("ruff") or str(pathlib.Path(sys.executable).parent / "ruff")
    return exe if pathlib.Path(exe).exists() else None


@pytest.mark.skipif(_ruff() is None, reason="ruff is not installed (pip install -e '.[test]' installs it)")
def test_ruff_is_clean():
    proc = subprocess.run([_ruff(), "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
