"""``ModuleMetadata``: what a compiled module says about itself, typed, with a versioned JSON form.

The JSON travels inside every exported library as the Relax function ``psb_metadata()``; the
Python runtime and the C++ runner (``runner/psb_runner.cc``, ``ParseMetadata``) read it. Version
history of ``format_version``:

- 0: modules written before the field existed (read with defaults for the newer fields);
- 1: this layout.

A module from a newer psb_tvm (a higher version) is refused with a message that says so; keys
this version does not know are kept (``extra``) and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .errors import ModelLoadError

FORMAT_VERSION = 1


@dataclass
class ModuleMetadata:
    """One compiled module's metadata. ``layers`` holds one dict per linear layer of the model
    (``name``, ``op``, ``status`` "psb"/"float", ``reason``; PSB layers add their lowering, activation
    width and scale, cost, ...: ``compiler.plan``); the rest is typed here.

    Read-only mapping access (``md["n_max"]``, ``md.get("frozen")``) is kept for code written
    when the metadata was a plain dict."""

    inputs: list  # [{"name", "shape", "dtype"}]
    samples: int  # the default n of run()
    seed: int
    n_max: int
    layers: list
    psb_tvm_version: str = ""
    source: str = ""
    target: str = ""
    target_kind: str = "llvm"
    mtriple: str = ""
    host_runnable: bool = True
    sampler: str = "stratified"
    frozen: bool = False
    psb_layers: list = field(default_factory=list)
    # per-PSB-layer default n when compile() was given a map (None: every layer at ``samples``)
    layer_samples: dict | None = None
    # sampled modules also have weights(samples, seed) and cached(...) (psb_tvm.weight_cache)
    weight_cache: bool = False
    # extra arguments of main after the model inputs (empty for frozen and all-float modules)
    runtime_args: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    calibration: str = "none"
    # [min, max] of each float input over the calibration data: run() warns far outside it
    input_ranges: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)
    # tuned / default kernel counts, set by passes.AttachPSBMetadata after scheduling
    schedules: dict | None = None
    cuda_graph: bool | None = None  # CUDA only: main replays one captured CUDA graph
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)  # keys of a newer minor layout, kept as they were

    _REQUIRED = ("inputs", "samples", "seed", "n_max", "layers")

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if out["layer_samples"] is None:
            del out["layer_samples"]
        for name in ("schedules", "cuda_graph"):
            if out[name] is None:
                del out[name]
        return {**self.extra, **out}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict, where: str = "module metadata") -> ModuleMetadata:
        if not isinstance(data, dict):
            raise ModelLoadError(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ModelLoadError(f"{where}: format_version must be a non-negative int, got {version!r}")
        if version > FORMAT_VERSION:
            raise ModelLoadError(f"{where}: format_version {version} was written by a newer psb_tvm; this one reads "
                                 f"up to {FORMAT_VERSION} (upgrade psb_tvm)")
        missing = [k for k in cls._REQUIRED if k not in data]
        if missing:
            raise ModelLoadError(f"{where}: missing {missing} (not a psb_tvm module, or a damaged one)")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        if version == 0 and "sampler" not in known:
            known["sampler"] = "iid"  # modules from before the stratified sampler
        known["format_version"] = FORMAT_VERSION  # read into this layout; written back as such
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def from_json(cls, text: str, where: str = "module metadata") -> ModuleMetadata:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"{where}: not valid JSON ({err})") from None
        return cls.from_dict(data, where)

    @classmethod
    def coerce(cls, value) -> ModuleMetadata:
        """A ``ModuleMetadata`` from itself or a dict (as written by earlier versions)."""
        return value if isinstance(value, cls) else cls.from_dict(dict(value))

    # -- read-only mapping view ---------------------------------------------------------------
    def __getitem__(self, key: str):
        d = self.to_dict()
        if key not in d:
            raise KeyError(key)
        return d[key]

    def get(self, key: str, default=None):
        return self.to_dict().get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()
