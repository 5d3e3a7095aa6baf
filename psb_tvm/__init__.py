"""psb_tvm: compile pretrained ONNX models into progressive stochastic binarized (PSB) networks.

Public API: ``compile``, ``load``, ``PSBConfig``, ``PSBModule`` and the exception types.
"""

from .compiler import __version__, compile  # noqa: A004 - mirrors tvm.compile
from .config import PSBConfig
from .errors import ConfigError, DynamicShapeError, InputError, ModelLoadError, PSBError, UnsupportedModelError
from .runtime import PSBModule, load

__all__ = [
    "ConfigError",
    "DynamicShapeError",
    "InputError",
    "ModelLoadError",
    "PSBConfig",
    "PSBError",
    "PSBModule",
    "UnsupportedModelError",
    "__version__",
    "compile",
    "load",
]
