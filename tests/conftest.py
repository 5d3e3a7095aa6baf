"""Test setup: the ONNX builders in tests/onnx_models.py are importable as ``onnx_models``."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
