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
