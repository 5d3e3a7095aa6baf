"""psb_tvm: compile pretrained ONNX models into progressive stochastic binarized (PSB) networks.

Public API: ``compile``, ``load``, ``PSBConfig``, ``PSBModule``, ``evaluate`` (accuracy and cost
vs n), ``allocate`` (per-layer sample counts for a budget), ``tune`` (MetaSchedule + XGBoost;
reapplied with ``compile(..., tuning_db=)``) and the exception types.
"""

from .allocate import Allocation, allocate
from .compiler import __version__, compile  # noqa: A004 - mirrors tvm.compile
from .config import PSBConfig
from .errors import (ConfigError, DynamicShapeError, InputError, ModelLoadError, PSBError, TargetMismatchError,
                     UnsupportedModelError)
from .evaluate import EvalReport, Preprocess, evaluate
from .runtime import PSBModule, load
from .tuning import TuneResult, TuningError, TuningWarning, tune

__all__ = [
    "Allocation",
    "EvalReport",
    "Preprocess",
    "ConfigError",
    "DynamicShapeError",
    "InputError",
    "ModelLoadError",
    "PSBConfig",
    "PSBError",
    "PSBModule",
    "TargetMismatchError",
    "TuneResult",
    "TuningError",
    "TuningWarning",
    "UnsupportedModelError",
    "__version__",
    "allocate",
    "compile",
    "evaluate",
    "load",
    "tune",
]
