"""Names shared by compiled modules and the runtime that loads them (the module's ABI)."""

METADATA_FUNC = "psb_metadata"  # Relax function returning the metadata JSON inside every module

# PrimFunc attributes of the PSB kernels (schedules/kernels/ sets them; the schedule rules,
# passes and tuning dispatch on them).
ATTR_KIND = "psb.kind"  # "conv2d", "dense", "sample", "pack", "conv2d_masked", "dense_masked"
ATTR_LOWERING = "psb.lowering"  # "intdot", "shiftadd", "bitserial"
ATTR_LAYOUT = "psb.layout"  # the weight layout of the kernel ("vnni", "ohwi", "dp4a", "gemm", ...)
ATTR_SAMPLER = "psb.sampler"  # "stratified" or "iid" (samplers)
ATTR_LAYER_KERNELS = "psb_layer_kernels"  # module attr: {layer id: {kernel prefix: PrimFunc name}} (shared kernels)
ATTR_INT8_HANDOFFS = "psb_int8_handoffs"  # module attr: [[producer site, consumer site], ...] of main
ATTR_SPEC = "psb.spec"  # a layer kernel's KernelSpec as JSON (KernelSpec.to_json / from_json)
ATTR_TUNED = "psb.tuned"  # set by passes.ApplyPSBTuningDatabase on the kernels it scheduled
