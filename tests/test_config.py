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


def test_sampler_field():
    assert psb_tvm.PSBConfig().sampler == "stratified"
    cfg = psb_tvm.PSBConfig(sampler="iid")
    assert psb_tvm.PSBConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(psb_tvm.ConfigError, match="sampler must be one of"):
        psb_tvm.PSBConfig(sampler="sobol")
    # the stratified grid has 2**P points: n_max beyond it is refused, i.i.d. allows it
    with pytest.raises(psb_tvm.ConfigError, match=r"n_max <= 2\*\*P"):
        psb_tvm.PSBConfig(P=4, n_max=32)
    assert psb_tvm.PSBConfig(P=4, n_max=32, sampler="iid").n_max == 32


def test_cli_sampler_flag():
    import argparse

    from psb_tvm.cli import _config

    assert _config(argparse.Namespace(sampler="iid")).sampler == "iid"
    assert _config(argparse.Namespace(sampler=None)).sampler == "stratified"


def test_coerce_is_the_one_conversion():
    cfg = psb_tvm.PSBConfig(E=3)
    assert psb_tvm.PSBConfig.coerce(cfg) is cfg
    assert psb_tvm.PSBConfig.coerce(None) == psb_tvm.PSBConfig()
    assert psb_tvm.PSBConfig.coerce({"E": 3, "n_max": 8}) == psb_tvm.PSBConfig(E=3, n_max=8)
    with pytest.raises(psb_tvm.ConfigError, match="config must be a PSBConfig or dict, got list"):
        psb_tvm.PSBConfig.coerce([("E", 3)])
    with pytest.raises(psb_tvm.ConfigError, match="unknown PSBConfig fields"):
        psb_tvm.PSBConfig.coerce({"bogus": 1})
