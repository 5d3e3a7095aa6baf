"""Passes of psb_tvm, one per file: layer selection, the calibration probe, the PSB rewrite, its
float emulation (the diagnosis), and the kernels' own sample-count check."""

from .assert_sample_bounds import AssertSampleBounds
from .expose_layer_inputs import expose_layer_inputs
from .rewrite_conv2d_dense_to_psb import PSBLayer, rewrite_to_psb
from .select_psb_layers import LayerSite, find_layer_sites, name_sites
from .simulate_psb_layers import simulate_psb

__all__ = ["AssertSampleBounds", "LayerSite", "PSBLayer", "expose_layer_inputs", "find_layer_sites", "name_sites",
           "rewrite_to_psb", "simulate_psb"]
