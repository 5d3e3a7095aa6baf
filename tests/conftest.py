"""Test setup: the ONNX builders in tests/onnx_models.py are importable as ``onnx_models`` and the
real-model zoo as ``zoo`` (tools/zoo.py: test and benchmark data, not part of the installed
package); other scripts of tools/ load with ``tool_module``."""

import os
import sys

import pytest

MODULE_CACHE_ENV = "PSB_TVM_MODULE_CACHE"

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))


def tool_module(name: str):
    """A script of tools/ (e.g. ``gpu_check``) loaded as a module, for tests that reuse its parts."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def _module_cache(tmp_path_factory):
    """Compiled modules go to a cache of this test session (psb_tvm.module_cache), not ~/.cache:
    tests exercise the cached path as users do, and leave nothing behind."""
    os.environ[MODULE_CACHE_ENV] = str(tmp_path_factory.mktemp("module_cache"))
    yield
