"""The one configuration object of psb_tvm, validated once when it is made."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .checks import is_int as _is_int
from .checks import is_real as _is_real
from .errors import ConfigError
from .numerics import LOWERINGS, SAMPLERS


@dataclass(frozen=True)
class PSBConfig:
    """Numeric preset and layer selection (DESIGN.md section 2).

    E: exponent levels per weight group; P: threshold bits; act_bits: activation bits;
    n_max: largest sample count a module accepts; per_channel: one exponent range per output
    channel (else per tensor); sampler: the sample stream, "stratified" (the default: rotated van
    der Corput points, each weight's count within one of ``n p``, error falling as 1/n) or "iid"
    (the paper's independent Bernoulli samples, error falling as 1/sqrt(n)); lowering: kernel
    lowering of every layer ("auto": the compiler picks per layer, from a measured pick in
    ``tuning_db`` if there is one, else its cost rule; or one of "intdot", "shiftadd",
    "bitserial": popcounts of activation bit planes AND weight sign/level masks, exact at every
    n <= n_max but costing E + 1 + log2 n levels per plane, so meant for n = 1, 2; the masked /
    attention kernels of a bitserial layer use the intdot products), ``lowerings`` overrides it
    per layer name; exclude_first_last keeps the first and last convertible layers float;
    include (if given) converts only the named layers; exclude keeps the named layers float;
    calibration_fallback_samples: synthetic samples used when no calibration data is given.
    """

    E: int = 4
    P: int = 16
    act_bits: int | str = "auto"
    n_max: int = 64
    per_channel: bool = True
    sampler: str = "stratified"
    lowering: str = "auto"
    lowerings: dict = field(default_factory=dict)
    exclude_first_last: bool = False
    include: tuple | None = None
    exclude: tuple = ()
    calibration_fallback_samples: int = 8
    layer_act_bits: dict = field(default_factory=dict)
    act_range: str = "max"
    act_percentile: float = 99.99
    act_headroom: float = 1.0
    act_auto_error: float = 0.01

    def __post_init__(self):
        def check(cond, msg):
            if not cond:
                raise ConfigError(f"invalid PSBConfig: {msg}")

        # Types first (bool is not an int, a string is not a flag, nan is not a number), then
        # values; every field is normalised to plain Python types (hashable, JSON-serialisable).
        for name in ("E", "P", "n_max", "calibration_fallback_samples"):
            value = getattr(self, name)
            check(_is_int(value), f"{name} must be an int, got {value!r} ({type(value).__name__})")
            object.__setattr__(self, name, int(value))
        for name in ("per_channel", "exclude_first_last"):
            value = getattr(self, name)
            check(isinstance(value, (bool, np.bool_)), f"{name} must be True or False, got {value!r} ({type(value).__name__})")
            object.__setattr__(self, name, bool(value))
        for name in ("act_percentile", "act_headroom", "act_auto_error"):
            value = getattr(self, name)
            check(_is_real(value) and math.isfinite(value),
                  f"{name} must be a finite number, got {value!r} ({type(value).__name__})")
            object.__setattr__(self, name, float(value) if isinstance(value, np.floating) else
                               int(value) if isinstance(value, np.integer) else value)
        for name in ("sampler", "lowering", "act_range"):
            value = getattr(self, name)
            check(isinstance(value, str), f"{name} must be a str, got {value!r} ({type(value).__name__})")
        check(self.act_bits == "auto" if isinstance(self.act_bits, str) else _is_int(self.act_bits),
              f"act_bits must be 8, 16 or 'auto', got {self.act_bits!r}")
        if _is_int(self.act_bits):
            object.__setattr__(self, "act_bits", int(self.act_bits))
        for name in ("lowerings", "layer_act_bits"):
            value = getattr(self, name)
            check(isinstance(value, Mapping), f"{name} must be a dict {{layer name: value}}, got {value!r} "
                                              f"({type(value).__name__})")
            bad = [k for k in value if not isinstance(k, str)]
            check(not bad, f"{name} keys must be layer names (str), got {bad[0]!r}" if bad else "")
        # Normalise the name lists to tuples of str so the config stays hashable and serialisable.
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value is None:  # include=None: every layer; exclude=None: none
                if name == "exclude":
                    object.__setattr__(self, name, ())
                continue
            if isinstance(value, str):
                value = (value,)
            check(isinstance(value, (list, tuple, set, frozenset)),
                  f"{name} must be a layer name or a list of layer names (str), got {value!r} ({type(value).__name__})")
            bad = [v for v in value if not isinstance(v, str)]
            check(not bad, f"{name} must list layer names (str), got {bad[0]!r}" if bad else "")
            object.__setattr__(self, name, tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value))

        check(1 <= self.E <= 16, f"E must be an int in [1, 16], got {self.E!r}")
        check(1 <= self.P <= 30, f"P must be an int in [1, 30], got {self.P!r}")
        check(self.act_bits in (8, 16, "auto"), f"act_bits must be 8, 16 or 'auto', got {self.act_bits!r}")
        layer_act_bits = {}
        for k, v in dict(self.layer_act_bits).items():
            check(_is_int(v) and v in (8, 16), f"layer_act_bits[{k!r}] must be 8 or 16, got {v!r}")
            layer_act_bits[k] = int(v)
        check(self.act_range in ("max", "percentile"), f"act_range must be 'max' or 'percentile', got {self.act_range!r}")
        check(50 <= self.act_percentile <= 100, f"act_percentile must be a number in [50, 100], got {self.act_percentile!r}")
        check(1 <= self.act_headroom <= 2 ** 16, f"act_headroom must be a number in [1, 65536], got {self.act_headroom!r}")
        check(0 < self.act_auto_error < 1, f"act_auto_error must be a number in (0, 1), got {self.act_auto_error!r}")
        n = self.n_max
        check(1 <= n <= 1024 and not n & (n - 1), f"n_max must be a power of two in [1, 1024], got {n!r}")
        check(self.sampler in SAMPLERS, f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        check(self.sampler != "stratified" or self.n_max <= 2 ** self.P,
              f"the stratified sampler needs n_max <= 2**P (n_max={n}, P={self.P})")
        for name, low in [("lowering", self.lowering)] + [(f"lowerings[{k!r}]", v) for k, v in self.lowerings.items()]:
            check(isinstance(low, str) and low in LOWERINGS + ("auto",),
                  f"{name} must be 'auto' or one of {LOWERINGS}, got {low!r}")
        check(self.calibration_fallback_samples >= 1,
              f"calibration_fallback_samples must be a positive int, got {self.calibration_fallback_samples!r}")
        object.__setattr__(self, "lowerings", dict(self.lowerings))
        object.__setattr__(self, "layer_act_bits", layer_act_bits)

    @classmethod
    def coerce(cls, config) -> "PSBConfig":
        """``config`` as a PSBConfig: None (the defaults), a dict of fields (``from_dict``) or a
        PSBConfig; anything else is a ConfigError. The one conversion every entry point uses."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        raise ConfigError(f"config must be a PSBConfig or dict, got {type(config).__name__}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "PSBConfig":
        """Named numeric presets (DESIGN.md section 2): ``"int8"`` (E=3, n_max=8: every sampled
        weight fits int8, so uint8 activations x int8 weights run on VNNI / dot-product units) and
        ``"int16"`` (E=4, n_max=64, ``act_bits="auto"``: the default: int16 weights, more precision per
        sample, 16-bit activations where 8 bits would round too coarsely)."""
        presets = {"int8": dict(E=3, n_max=8, act_bits=8), "int16": dict(E=4, n_max=64, act_bits="auto")}
        if not isinstance(name, str) or name not in presets:
            raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["include"] = list(self.include) if self.include is not None else None
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PSBConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"a PSBConfig dict must be a dict of fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(repr(k) for k in d if not isinstance(k, str))
        if bad:
            raise ConfigError(f"PSBConfig field names must be str, got {bad}")
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown PSBConfig fields: {sorted(unknown)}")
        return cls(**d)
