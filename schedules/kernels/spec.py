"""``KernelSpec``: everything a PSB layer kernel is generated from (shapes, lowering, layouts,
activation width, epilogue), plus the constants shared by the kernels."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from psb_tvm import numerics
from psb_tvm.abi import ATTR_SPEC
from psb_tvm.numerics import LOWERINGS  # noqa: F401 - re-exported

COUNTS_DTYPE = "int16"  # counts <= n_max <= 1024
RESIDUALS = (None, "add", "add_relu")  # KernelSpec.residual
#: The packed dot-product weight layouts: blocks of 16 outputs x ``dot_depth`` channels.
PACKED_DOT_LAYOUTS = ("vnni", "dp4a", "vnni16")


BITSERIAL_WORD = 32  # bits per packed word of the bitserial lowering (popcount on uint32)


def bitserial_levels(E: int, n: int) -> int:
    """Power-of-two levels of the sampled magnitudes ``|q| <= n * 2**E``: ``E + 1 + log2 n``."""
    return E + 1 + (int(n).bit_length() - 1)


def act_dtype(bits: int, signed: bool) -> str:
    """The integer type of ``bits``-bit activations: 8, 16 or 32 bits, unsigned unless ``signed``."""
    width = 8 if bits <= 8 else 16 if bits <= 16 else 32
    return f"{'' if signed else 'u'}int{width}"


@dataclass(frozen=True)
class Handoff:
    """How a consumer conv stores its input activations (``xq`` without the padding):
    ``clip(rint(y * 2**frac_bits), lo, hi) + offset``, ``channels`` wide (NHWC)."""

    act_bits: int
    act_signed: bool
    frac_bits: int
    offset: int
    channels: int

    @property
    def act_dtype(self) -> str:
        """The type the quantized values have before the offset."""
        return act_dtype(self.act_bits, self.act_signed)

    @property
    def dtype(self) -> str:
        """uint8 for a vnni consumer (offset or unsigned), else the consumer's 8-bit type."""
        return "uint8" if self.offset or not self.act_signed else "int8"


@dataclass(frozen=True)
class KernelSpec:
    """Everything that shapes one PSB layer's kernels (the sample count and seed are run-time)."""

    kind: str  # "conv2d" or "dense"
    lowering: str
    x_shape: tuple  # conv: (N, C, H, W); dense: (M, K)
    w_shape: tuple  # conv: (O, C/groups, KH, KW); dense: (O, K)
    n_max: int
    layer: int  # layer id of the sample stream
    E: int
    P: int
    act_bits: int
    act_signed: bool
    frac_bits: int
    activation: object = None  # None, "relu", ("clip", lo, hi)
    stride: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple = (1, 1)
    groups: int = 1
    # intdot only: the integer weights q arrive as one constant already in the kernel's layout
    # (``pack_weights``), made at compile time from a frozen draw; no weight stage per call.
    prepacked: bool = False
    # The kernel is built for a GPU (CUDA): the int8 preset's packed conv takes the ``dp4a`` layout
    # (signed bytes on both sides) instead of x86's ``vnni`` one (unsigned x signed).
    gpu: bool = False
    # The sample stream (numerics.SAMPLERS): "stratified" counts in closed form, "iid" sums the
    # per-sample hash bits.
    sampler: str = "stratified"
    # Storage of the thresholds: "uint16" when every threshold of the layer is below 2**16 (P <= 16
    # and no weight rounds up to the next power of two), else "int32". The same integers either
    # way; the samplers read half the bytes (measured: the draw kernel is memory-bound).
    threshold_dtype: str = "int32"
    # intdot layers sampled at run time: their threshold, counts and encoding are stored in the
    # kernel's weight layout (``pack_layout``, padding zero), the encoding as one byte per weight
    # (``numerics.weight_code``) instead of three int8 arrays; their sample and masked kernels read
    # them so, and the pack / draw kernels (which always do) walk every array contiguously. In the
    # source order, the draw's stores into the vnni / OHWI layouts were byte scatters.
    packed_encoding: bool = False
    # Integer hand-off between two vnni convs (passes/hand_off_int8_activations.py): the producer
    # writes the consumer's activations -- quantized at the consumer's scale, offset, NHWC with the
    # consumer's ``vnni_channels`` -- instead of float32 NCHW, and the consumer reads them as they
    # are (only the zero padding left to add). ``out_handoff`` is the consumer's ``Handoff``.
    x_handoff: bool = False
    out_handoff: Handoff | None = None
    # A residual add fused into the epilogue (passes/fuse_residual_add.py): the kernel takes the
    # other float operand ``res`` and returns ``output + res`` ("add") or ``relu(output + res)``
    # ("add_relu"), the graph's own float32 operations.
    residual: str | None = None
    # Float32 activations channels-last between layer kernels (passes/channels_last_float.py):
    # the input ``x`` (``x_nhwc``), the output (``out_nhwc``), the residual operand (``res_nhwc``)
    # NHWC. The same values in another order: packed CPU convs (``packed_cpu_conv``) only.
    x_nhwc: bool = False
    out_nhwc: bool = False
    res_nhwc: bool = False

    def to_json(self) -> str:
        """The spec as JSON (``from_json`` reads it back): carried by its layer kernel."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KernelSpec:
        data = json.loads(str(text))
        fields = {f.name for f in dataclasses.fields(KernelSpec)}
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
        if isinstance(data.get("activation"), tuple):
            data["activation"] = tuple(data["activation"])
        if data.get("out_handoff") is not None:
            data["out_handoff"] = Handoff(**data["out_handoff"])
        return KernelSpec(**data)

    @property
    def reduction_size(self) -> int:
        size = 1
        for d in self.w_shape[1:]:
            size *= d
        return size

    @property
    def acc_dtype(self) -> str:
        bits = numerics.accumulator_bits(self.reduction_size, self.E, self.n_max, self.act_bits, self.act_signed)
        return f"int{bits}"

    @property
    def q_range_dtype(self) -> str:
        """The narrowest integer type of the weights' range ``|q| <= n_max * 2**E``."""
        qmax = numerics.max_abs_q(self.E, self.n_max)
        return "int8" if qmax <= 127 else "int16" if qmax <= 32767 else "int32"

    @property
    def q_dtype(self) -> str:
        """The stored type of the integer weights: their range's, or int16 words for a ``vnni16``
        kernel of int8-range weights."""
        return "int16" if self.vnni16 else self.q_range_dtype

    @property
    def act_dtype(self) -> str:
        return act_dtype(self.act_bits, self.act_signed)

    def _packed_int8_conv(self, act_signed_bound: bool, any_outputs: bool) -> bool:
        """The int8 preset's conv (8-bit activations x int8 weights, 16 outputs x 4 channels per
        packed step), when its sums in the packed domain still fit int32 (and, unless
        ``any_outputs``, the output channels come in 16s)."""
        bits = numerics.accumulator_bits(self.reduction_size, self.E, self.n_max, 8, act_signed_bound)
        return (self.kind == "conv2d" and self.lowering == "intdot" and self.groups == 1
                and self.q_range_dtype == "int8" and self.act_bits == 8 and bits == 32
                and (any_outputs or self.w_shape[0] % 16 == 0) and self.w_shape[1] >= 3)

    @property
    def vnni(self) -> bool:
        """int8 preset on CPUs: 8-bit activations (int8 ones offset to uint8) x int8 weights, 16
        outputs x 4 channels per ``vpdpbusd`` (weights packed [O/16, KH, KW, C/4, 16, 4],
        accumulators NHWC)."""
        # Signed activations go in offset by +128 (see _vnni_conv): the sums then need the
        # unsigned 8-bit bound to fit int32.
        # Output channels not in 16s are padded (24 -> 32: MobileNetV2's two 24-channel projections
        # took 0.089 / 0.116 ms instead of 0.145 / 0.234 in the channels-last form, 2-vCPU EPYC);
        # below 16 outputs the padding would cost more than it saves.
        return not self.gpu and self._packed_int8_conv(act_signed_bound=False, any_outputs=self.w_shape[0] >= 16)

    @property
    def vnni16(self) -> bool:
        """int16 weights on CPUs (the default preset; also int8-range ones with 16-bit activations,
        and every dense layer), convs and dense layers (as a 1x1 conv over ``M`` columns): 16
        outputs x 2 channels per ``vpdpwssd`` (int16 x int16 word pairs into int32; weights packed
        [O/16, KH, KW, C/2, 16, 2]), the
        activations int16 NHWC. Where the sums of 16-bit activations may not fit int32, signed
        ones are summed in int32 over chunks of channels added up in int64 (``vnni16_chunk``),
        unsigned ones (not int16 words) go in as two base-256 digits ``x = lo + 256*hi``
        (``act_digits``), each summed in int32 and combined in ``acc_dtype``: every digit sum
        must provably fit int32 (``vnni16_digit_bound``)."""
        # int8-range weights take it with 16-bit activations (a config such as E=3, n_max=8 with
        # act_bits "auto"; the int8 preset's activations are all 8-bit); convs with 8-bit ones take
        # the vnni layout (vpdpbusd: twice the products). Dense layers have no int8 packed form:
        # PP-OCRv4 rec's 120 -> 6625 classifier took 0.88 ms in the plain OI form with the int8
        # preset, 0.23 ms here.
        words = self.q_range_dtype == "int16" or (self.q_range_dtype == "int8"
                                                   and (self.act_bits == 16 or self.kind == "dense"))
        return (not self.gpu and self.kind in ("conv2d", "dense") and self.lowering == "intdot" and self.groups == 1
                and words and self.act_bits in (8, 16) and self.w_shape[0] >= 16
                and self.w_shape[1] >= 3 and (self.vnni16_chunk > 0 or self.vnni16_digit_bound <= (1 << 31) - 1))

    @property
    def act_digits(self) -> int:
        """Base-256 digits per activation in the ``vnni16`` conv: 1 when the activations are int16
        words already and their whole sums fit int32 (8-bit ones; 16-bit signed ones of a short
        reduction), else 2."""
        return 1 if self.act_bits <= 8 or (self.act_signed and self.acc_dtype == "int32") or self.vnni16_chunk else 2

    @property
    def vnni16_chunk(self) -> int:
        """Channel pairs ``R`` per int32 partial sum of the ``vnni16`` conv with int16 activations
        whose whole sums need int64: the largest divisor of the pairs such that ``KH * KW * 2 * R``
        products provably fit int32; the partial sums are added up in int64. 0 where that is not
        possible or not needed (int32 sums; unsigned 16-bit activations, which take digits).
        Measured on Zen 5 (2 threads) against two digit planes: 1.5-2.5x faster (PP-OCRv4 det's
        96 -> 24 3x3 conv at 80x80: 1.20 -> 0.61 ms; rec's 480 -> 480 1x1: 0.55 -> 0.37 ms)."""
        if not (self.act_signed and self.act_bits == 16 and self.acc_dtype == "int64"):
            return 0
        taps = self.reduction_size // self.w_shape[1]
        lo, hi = numerics.act_range(self.act_bits, self.act_signed)
        per_pair = taps * 2 * max(abs(lo), abs(hi)) * numerics.max_abs_q(self.E, self.n_max)
        pairs = -(-self.w_shape[1] // 2)  # (vnni_channels // 2, without asking vnni16)
        fit = ((1 << 31) - 1) // per_pair
        return max((r for r in range(1, min(fit, pairs) + 1) if pairs % r == 0), default=0)

    @property
    def vnni16_digit_bound(self) -> int:
        """The largest ``|sum x_digit * q|`` one ``vnni16`` accumulator can reach (channels padded
        to 2 with zeros): ``K * max|digit| * max|q|``."""
        lo, hi = numerics.act_range(self.act_bits, self.act_signed)
        digit = max(abs(lo), abs(hi)) if self.act_digits == 1 else 255
        return self.reduction_size * digit * numerics.max_abs_q(self.E, self.n_max)

    @property
    def dp4a(self) -> bool:
        """int8 preset on GPUs: the ``vnni`` blocking with both operands signed bytes (uint8
        activations offset to int8), for CUDA's ``__dp4a`` (4 int8 x int8 products per step).
        Output channels are padded to ``packed_outputs`` with zero weights (MobileNet's 24 / 40)."""
        return self.gpu and self._packed_int8_conv(act_signed_bound=True, any_outputs=True)

    @property
    def packed_outputs(self) -> int:
        """Output channels of the packed layouts: ``O`` rounded up to 16 with zero weights (MobileNet's
        24 / 40; the accumulators of the padding are computed and never read)."""
        return -(-self.w_shape[0] // 16) * 16

    @property
    def dot_offset(self) -> int:
        """What the packed int8 conv adds to every activation so both operands have the signedness
        its instruction wants (``vpdpbusd``: unsigned x signed, ``dp4a``: signed x signed); the
        kernel takes ``offset * sum q`` back per output channel (``wsum``)."""
        if self.vnni and self.act_signed:
            return 128
        if self.dp4a and not self.act_signed:
            return -128
        return 0

    @property
    def dot_depth(self) -> int:
        """Input channels per packed dot-product step: 4 bytes (vnni, dp4a) or 2 words (vnni16)."""
        return 2 if self.vnni16 else 4

    @property
    def vnni_channels(self) -> int:
        """Input channels of the packed layouts: ``C`` rounded up to ``dot_depth`` (zero weights,
        zero activations), so a 3-channel stem still takes one ``vpdpbusd`` per 16 outputs x 4
        channels."""
        return -(-self.w_shape[1] // self.dot_depth) * self.dot_depth

    @property
    def packed_cpu_conv(self) -> bool:
        """A conv in a packed dot-product layout on a CPU (vnni, vnni16): its activations and
        accumulators are NHWC inside, so it can also take / give float32 activations channels-last
        (``x_nhwc``, ``out_nhwc``, ``res_nhwc``)."""
        return self.packed_dot and not self.gpu and self.kind == "conv2d"

    @property
    def stem_planes(self) -> bool:
        """A packed CPU conv reading a float NCHW input of at most 4 channels, padding included
        (``vnni_channels``; a stem), in one digit plane: its activation stage quantizes whole
        planes, then interleaves them (``layer.stem_activation_stages``)."""
        return (self.packed_cpu_conv and not self.x_handoff
                and self.vnni_channels <= 4 and not (self.vnni16 and self.act_digits > 1))

    @property
    def strided_pointwise(self) -> bool:
        """A packed CPU 1x1 conv with a stride and no padding: its activation stage quantizes only
        the pixels it reads, ``xq[b, y, x] = x[b, y * sh, x * sw]``."""
        return (self.packed_cpu_conv and not self.stem_planes and tuple(self.conv_w_shape[2:]) == (1, 1)
                and tuple(self.stride) != (1, 1) and not any(self.padding))

    @property
    def blocked_activations(self) -> bool:
        """A vnni conv (or a vnni16 one in one digit plane) on a float NCHW input, not a stem: its
        activation stage is ``xq[b, c / d, h, w, c % d]`` (``d = dot_depth``: 4 bytes or 2 int16
        words), ``d`` planes interleaved into contiguous rows, not NHWC pixels, whose per-channel
        stores LLVM scatters one element at a time. Measured for vnni16 on Zen 5 (int16 preset,
        prepacked, two A/B pairs): ResNet-18's layer1 convs 0.30 -> 0.26 ms, layer2's strided one
        0.17 -> 0.14."""
        return (self.packed_cpu_conv and (self.vnni or (self.vnni16 and self.act_digits == 1))
                and not self.x_handoff and not self.x_nhwc
                and not self.stem_planes and self.vnni_channels <= BLOCKED_MAX_CHANNELS
                and self.x_shape[2] * self.x_shape[3] >= BLOCKED_MIN_PIXELS)

    @property
    def weight_layout(self) -> str:
        """Layout of the integer weights ``q`` inside the layer kernel (``pack_weights`` makes it)."""
        if self.kind == "dense" and not self.vnni16:
            return "OI"
        if self.vnni or self.dp4a or self.vnni16:
            return "vnni" if self.vnni else "dp4a" if self.dp4a else "vnni16"
        return "OHWI" if self.channels_last else "OIHW"

    @property
    def packed_dot(self) -> bool:
        """The weights in one of the packed dot-product layouts (vnni, dp4a, vnni16): blocks of 16
        outputs x ``dot_depth`` channels."""
        return self.weight_layout in PACKED_DOT_LAYOUTS

    @property
    def conv_w_shape(self) -> tuple:
        """``w_shape`` as a conv's ``(O, C/groups, KH, KW)``: a dense layer's ``(O, K)`` as 1x1."""
        return tuple(self.w_shape) if self.kind == "conv2d" else (*self.w_shape, 1, 1)

    @property
    def packed_weight_shape(self) -> tuple:
        O, Cg, KH, KW = self.conv_w_shape
        if self.packed_dot:
            d = self.dot_depth
            return (self.packed_outputs // 16, KH, KW, self.vnni_channels // d, 16, d)
        return {"OI": self.w_shape, "OIHW": self.w_shape, "OHWI": (O, KH, KW, Cg)}[self.weight_layout]

    @property
    def channels_last(self) -> bool:
        """Dense-style conv: activations NHWC and weights OHWI, so the reduction over input
        channels is contiguous and innermost and LLVM emits packed dot products (VNNI)."""
        return self.kind == "conv2d" and self.lowering == "intdot" and self.groups == 1 and self.w_shape[1] >= 3

    @property
    def depthwise(self) -> bool:
        """An intdot depthwise conv on a CPU (one input channel per output, multiplier 1)."""
        return (self.kind == "conv2d" and self.lowering == "intdot" and not self.gpu and self.w_shape[1] == 1
                and self.groups == self.x_shape[1] == self.w_shape[0] > 1)

    @property
    def dw_tap_groups(self) -> int:
        """Groups of ``DW_TAPS`` kernel columns per dot product in a channels-last depthwise conv
        (``x_handoff`` or ``out_handoff``), 0 where it keeps one multiply-add per tap: uint8
        activations x int8 weights summed in int32 (``vpdpbusd``'s operands), channels in blocks
        of 16, kernel columns not dilated (a group's columns are adjacent). Each output pixel's
        16 channels then take ``KH * groups`` dot products (3 for a 3x3 conv, against 9
        multiplies and 9 adds)."""
        if not (self.depthwise and (self.x_handoff or self.out_handoff is not None)):
            return 0
        if (self.act_dtype != "uint8" or self.q_dtype != "int8" or self.acc_dtype != "int32" or self.x_shape[1] % 16
                or self.dilation[1] != 1):
            return 0
        return -(-self.w_shape[3] // DW_TAPS)

    @property
    def dw_pixel_pairs(self) -> bool:
        """A ``dw_tap_groups`` conv at stride 1 with at most 3 columns and a width of whole pixel
        tiles (``DW_PIXEL_TILE``): output pixels in pairs share each step, columns 2p ..
        2p + 3, the second pixel's weights one column on, so each interleaved step feeds two dot
        products. Measured on Zen 4 (2 threads, A/B in one process): MobileNetV2's 144-channel
        56x56 dw 0.048 -> 0.043 ms; at 14x14 and 7x7 (tiles of 7 pixels, pairs split between
        tiles) it lost, 0.0104 -> 0.0118 and 0.0102 -> 0.0122 ms."""
        return (self.dw_tap_groups == 1 and self.stride[1] == 1 and self.w_shape[3] < DW_TAPS
                and self.out_shape[3] % DW_PIXEL_TILE == 0)

    @property
    def handoff_capable(self) -> bool:
        """Can hand activations over to / take them from another such conv: 8-bit vnni convs and
        8-bit depthwise convs with prepacked weights."""
        return self.act_bits == 8 and self.prepacked and (self.vnni or self.depthwise)

    @property
    def handoff(self) -> Handoff:
        """This conv's input format, for a producer that hands its output over in it."""
        channels = self.vnni_channels if self.vnni else self.x_shape[1]
        return Handoff(self.act_bits, self.act_signed, self.frac_bits, self.dot_offset, channels)

    @property
    def x_storage_shape(self) -> tuple:
        """Shape of the kernel's activation argument: ``x_shape``, NHWC when the input is
        channels-last (``x_nhwc``), or NHWC with the padded channels when the producer hands its
        output over (``x_handoff``)."""
        if not (self.x_handoff or self.x_nhwc):
            return self.x_shape
        N, C, H, W = self.x_shape
        return (N, H, W, self.handoff.channels if self.x_handoff else C)

    @property
    def out_storage_shape(self) -> tuple:
        """Shape of the kernel's output: ``out_shape``, NHWC when channels-last (``out_nhwc``),
        or the consumer's NHWC input."""
        if self.out_handoff is None and not self.out_nhwc:
            return self.out_shape
        N, O, OH, OW = self.out_shape
        return (N, OH, OW, O if self.out_handoff is None else self.out_handoff.channels)

    @property
    def out_dtype(self) -> str:
        return "float32" if self.out_handoff is None else self.out_handoff.dtype

    @property
    def out_shape(self) -> tuple:
        if self.kind == "dense":
            return (self.x_shape[0], self.w_shape[0])
        N, _, H, W = self.x_shape
        O, _, KH, KW = self.w_shape
        pt, pl, pb, pr = self.padding
        OH = (H + pt + pb - self.dilation[0] * (KH - 1) - 1) // self.stride[0] + 1
        OW = (W + pl + pr - self.dilation[1] * (KW - 1) - 1) // self.stride[1] + 1
        return (N, O, OH, OW)


def spec_of(func) -> KernelSpec | None:
    """The spec a layer kernel PrimFunc was generated from (its ``psb.spec``), or None for other
    PrimFuncs (samplers, pack and masked kernels, float glue)."""
    text = (func.attrs or {}).get(ATTR_SPEC, None)
    return KernelSpec.from_json(text) if text is not None else None


def can_hand_off(producer: KernelSpec, consumer: KernelSpec) -> bool:
    """Whether ``producer``'s output can reach ``consumer`` as its integer activations: both
    hand-off capable, the shapes meet, and the consumer's channel padding (vnni: to 4) is within
    what the producer computes (a vnni producer's accumulators are padded to 16; a depthwise one
    has exactly its channels)."""
    return (producer.handoff_capable and consumer.handoff_capable and producer.out_shape == consumer.x_shape
            and (producer.vnni or consumer.handoff.channels == producer.w_shape[0]))


#: Columns an NCHW activation row of ``xq`` is padded to (zeros, never read): its stage is
#: vectorized along rows, and an odd row width (30 = 15 lanes) made a 192-channel 28x28 depthwise
#: conv 10x slower per MAC than a 14x14 one.
XQ_ROW_MULTIPLE = 16


#: Inputs taking ``blocked_activations``: at most this many channels, planes of at least this
#: many pixels. Measured on Zen 5 (int8, prepacked, 2 threads, kernels alone, A/B twice): ResNet-18's
#: convs on 64 / 128 channels at 56x56 / 28x28 gained (layer1's first convs 0.17 -> 0.13 ms,
#: layer2's strided one 0.10 -> 0.072), as did MobileNetV2's expansions at 56x56 and 28x28
#: (0.049 -> 0.037 ms); 256 / 512 channels at 14x14 / 7x7 lost (layer3's second block's first
#: conv 0.124 -> 0.175 ms, layer4's strided one 0.073 -> 0.134), as did MobileNetV2's 64- and
#: 96-channel expansions at 14x14 (0.019 -> 0.021-0.026 ms).
BLOCKED_MAX_CHANNELS = 128
BLOCKED_MIN_PIXELS = 28 * 28


def xq_row_width(width: int) -> int:
    """``width`` rounded up to ``XQ_ROW_MULTIPLE``."""
    return -(-width // XQ_ROW_MULTIPLE) * XQ_ROW_MULTIPLE


#: Output pixels of a row a channels-last depthwise conv sums together (up to this many, a divisor
#: of the width; ``schedules/cpu/psb_depthwise_nhwc.py``), each tap's weights loaded once for them:
#: one pixel at a time, its nine products formed one dependent chain of multiply-adds.
#: ``dw_pixel_pairs`` needs widths of whole such tiles.
DW_PIXEL_TILE = 8

#: Kernel columns per dot product of a ``dw_tap_groups`` depthwise conv: a 32-bit lane of
#: ``vpdpbusd`` (or Arm's ``usdot``) sums 4 byte products; a 3x3 conv's fourth column is a zero
#: weight.
DW_TAPS = 4

#: GPU convs round their flattened pixel count up to a multiple of this (see _flat_pixels).
GPU_PIXEL_MULTIPLE = 16
