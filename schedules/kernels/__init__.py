"""TE definitions of the PSB kernels (DESIGN.md sections 3 and 5), one module per kind:

- ``spec``: ``KernelSpec``, what every kernel of a layer is generated from;
- ``layout``: the weight layouts (numpy and TIR index maps) and prepacked weights;
- ``sample``: ``psb_sample_kernel``, the counts of a run-time sample range;
- ``weights``: the weight stage and ``psb_pack_kernel`` (pack or draw into the kernel's layout);
- ``layer``: ``psb_layer_kernel``, the integer layer with its float epilogue, every lowering;
- ``masked``: ``psb_masked_kernel``, the layer on listed positions (computational attention).

``psb.*`` attributes (``psb_tvm.abi``) tell the schedule rules what each PrimFunc is.
"""

from .layer import psb_layer_kernel
from .layout import pack_layout, pack_weights, unpack_layout
from .masked import psb_masked_kernel
from .sample import psb_sample_kernel
from .spec import (
    BITSERIAL_WORD,
    COUNTS_DTYPE,
    GPU_PIXEL_MULTIPLE,
    LOWERINGS,
    XQ_ROW_MULTIPLE,
    Handoff,
    KernelSpec,
    bitserial_levels,
    can_hand_off,
    spec_of,
    xq_row_width,
)
from .weights import psb_pack_kernel

__all__ = [
    "BITSERIAL_WORD",
    "COUNTS_DTYPE",
    "GPU_PIXEL_MULTIPLE",
    "Handoff",
    "KernelSpec",
    "LOWERINGS",
    "XQ_ROW_MULTIPLE",
    "bitserial_levels",
    "can_hand_off",
    "pack_layout",
    "pack_weights",
    "psb_layer_kernel",
    "psb_masked_kernel",
    "psb_pack_kernel",
    "psb_sample_kernel",
    "spec_of",
    "unpack_layout",
    "xq_row_width",
]
