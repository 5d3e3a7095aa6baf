"""PSBConfig presets and round-tripping through the module metadata."""

import pytest

import psb_tvm
from psb_tvm import numerics


def test_int8_preset_keeps_every_sampled_weight_in_int8():
    cfg = psb_tvm.PSBConfig.preset("int8")
    assert (cfg.E, cfg.n_max) == (3, 8)
    assert numerics.max_abs_q(cfg.E, cfg.n_max) <= 127
    assert psb_tvm.PSBConfig.preset("int16") == psb_tvm.PSBConfig()
    assert psb_tvm.PSBConfig.preset("int8", act_bits=16).act_bits == 16


def test_unknown_preset_and_fields():
    with pytest.raises(psb_tvm.ConfigError, match="unknown preset 'int4'"):
        psb_tvm.PSBConfig.preset("int4")
    with pytest.raises(psb_tvm.ConfigError, match="unknown PSBConfig fields"):
        psb_tvm.PSBConfig.from_dict({"E": 4, "bits": 3})


def test_config_round_trips_through_dict():
    cfg = psb_tvm.PSBConfig(E=5, exclude=["a", "b"], lowerings={"a": "shiftadd"})
    assert psb_tvm.PSBConfig.from_dict(cfg.to_dict()) == cfg
