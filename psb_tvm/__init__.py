"""psb_tvm: compile pretrained ONNX models into progressive stochastic binarized (PSB) networks.

Public API: ``check`` (what a compile would do with a model's ops and layers), ``compile``,
``load``, ``PSBConfig``, ``PSBModule``, ``evaluate`` (accuracy and cost vs n), ``diagnose``
(per-layer error vs what sampling and activation rounding explain), ``allocate``
(per-layer sample counts for a budget), ``tune`` (MetaSchedule + XGBoost;
reapplied with ``compile(..., tuning_db=)``) and the exception types.

TVM's CPU thread pool: ``TVM_NUM_THREADS`` is set to the physical cores available when unset
(``psb_tvm.threads``), before TVM starts its pool.
"""

from . import threads  # noqa: F401 - first: sets TVM_NUM_THREADS before anything starts TVM's pool
from .allocate import Allocation, allocate
from .compiler import Plan, __version__, compile, plan  # noqa: A004 - mirrors tvm.compile
from .config import PSBConfig
from .diagnose import Diagnosis, LayerDiagnosis, diagnose
from .errors import (
    ConfigError,
    DynamicShapeError,
    InputError,
    ModelLoadError,
    OutputError,
    PSBError,
    TargetMismatchError,
    TuningError,
    TuningWarning,
    UnsupportedModelError,
)
from .evaluate import EvalReport, Preprocess, evaluate
from .model_check import ModelCheck, check
from .runtime import PSBModule, load
from .tuning import TuneResult, tune

__all__ = [
    "plan",
    "Allocation",
    "EvalReport",
    "Preprocess",
    "ConfigError",
    "Diagnosis",
    "DynamicShapeError",
    "InputError",
    "LayerDiagnosis",
    "OutputError",
    "ModelLoadError",
    "PSBConfig",
    "Plan",
    "PSBError",
    "PSBModule",
    "TargetMismatchError",
    "TuneResult",
    "TuningError",
    "TuningWarning",
    "UnsupportedModelError",
    "__version__",
    "ModelCheck",
    "allocate",
    "check",
    "compile",
    "diagnose",
    "evaluate",
    "load",
    "tune",
]
