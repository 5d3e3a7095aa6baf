"""Passes of psb_tvm, one per file, each a ``tvm.transform`` module pass that composes in any
Relax pipeline (``psb_tvm.pipeline`` lists them in order): the import clean-up, the calibration
probe, the PSB rewrite, the integer hand-off between convs, the fused residual adds and the
channels-last float tensors between packed convs, its
float emulation (the diagnosis), the direct legalization of upsampling transposed convs, the
tuning database's schedules, the kernels' own sample-count check and the metadata. Layer
selection (``find_layer_sites``) is an analysis, not a pass: it reads ``main`` and returns the
sites."""

from .apply_psb_tuning_database import ApplyPSBTuningDatabase
from .assert_sample_bounds import AssertSampleBounds
from .attach_psb_metadata import AttachPSBMetadata
from .channels_last_float import ChannelsLastFloat
from .expose_layer_inputs import ExposeLayerInputs
from .fuse_residual_add import FuseResidualAdd
from .hand_off_int8_activations import HandOffInt8Activations
from .legalize_conv_transpose import LegalizeNonOverlappingConvTranspose
from .rewrite_conv2d_dense_to_psb import PSBLayer, RewriteToPSB
from .scalar_minmax_call_tir_to_relax_ops import ScalarMinMaxCallTIRToRelaxOps
from .select_psb_layers import LayerSite, find_layer_sites, name_sites, select_layers
from .simulate_psb_layers import SimulatePSBLayers

__all__ = ["ApplyPSBTuningDatabase", "AssertSampleBounds", "AttachPSBMetadata", "ChannelsLastFloat", "ExposeLayerInputs",
           "FuseResidualAdd", "HandOffInt8Activations", "LayerSite",
           "LegalizeNonOverlappingConvTranspose", "PSBLayer", "RewriteToPSB", "ScalarMinMaxCallTIRToRelaxOps",
           "SimulatePSBLayers", "find_layer_sites", "name_sites", "select_layers"]
