"""Default CPU schedule rules (dlight style): PSB kernels first, then the float glue."""

from tvm.s_tir import dlight

from .conv_transpose import ConvTranspose
from .conv_transpose_direct import DirectConvTranspose
from .elementwise import Elementwise
from .gemv import GEMV
from .pool import Pool2D
from .psb_conv2d import PSBConv2D
from .psb_dense import PSBDense
from .psb_depthwise import PSBDepthwiseConv2D
from .psb_depthwise_nhwc import PSBDepthwiseNHWC
from .psb_masked import PSBMasked
from .psb_sampling import PSBPack, PSBSample


def default_rules():
    """Rules tried in order for every PrimFunc that is not scheduled yet."""
    return [PSBSample(), PSBPack(), PSBDepthwiseNHWC(), PSBDepthwiseConv2D(), PSBConv2D(), PSBDense(), PSBMasked(),
            DirectConvTranspose(), ConvTranspose(), Pool2D(), GEMV(), dlight.cpu.Reduction(), Elementwise()]


__all__ = ["GEMV", "ConvTranspose", "DirectConvTranspose", "Elementwise",
           "PSBConv2D", "PSBDense", "PSBDepthwiseConv2D", "PSBDepthwiseNHWC",
           "PSBMasked", "PSBPack", "PSBSample", "Pool2D", "default_rules"]
