"""Roofline line: PSB conv kernels against this machine's measured int8 VNNI peak (2 threads).

    python benchmarks/roofline.py [--quick] [--presets int8,int16] [--out-dir benchmarks/results]

1. **Peak**: a C++ microbenchmark compiled at run time (``g++ -O2 -mavx512f -mavx512vnni -mavx512bw
   -mavx512vl``; ``-mavx512vl`` for the 256-bit form) runs 16 independent ``vpdpbusd`` accumulator
   chains (operands in registers, no memory traffic) per thread, 512-bit and 256-bit forms, on 1 and
   2 ``std::thread``\\ s; best wall time of several repetitions. int8 MACs = vpdpbusd count x 64
   (512-bit) or x 32 (256-bit); the better form is the peak. The theoretical figure (cores x
   ``/proc/cpuinfo`` MHz x one 512-bit vpdpbusd per cycle x 64) is reported alongside, labelled.
2. **Kernels**: the PSB layer kernels of the largest ResNet-18 convs and a few MobileNetV2 layers
   (batch 1, 224x224 input), built standalone exactly as ``tests/test_kernels.py`` does (TE kernel +
   the default CPU rules ``PSBDepthwiseConv2D`` / ``PSBConv2D`` for the host target), for the ``int8`` preset (E=3, n_max=8,
   8-bit activations: the ``vpdpbusd`` path where 16 | O) and the default ``int16``
   preset (E=4, n_max=64), run at n=8 with ``TVM_NUM_THREADS=2``; ``time_evaluator`` median.
   The sampler (n=8 samples of every weight) and the kernel's two per-call preparation stages
   (``q``: integer weights from the counts; ``xq``: quantized, padded activations) are timed
   separately with the same stage definitions and schedules, to show where the time goes.
3. Writes ``<out-dir>/roofline.json`` and ``<out-dir>/roofline.md`` and prints the table.

Fractions are of the *measured 2-thread* peak. The int16 preset's products are not int8 MACs (int16
weights); its "fraction" uses the same int8 peak for comparison only.
"""

from __future__ import annotations

import os

THREADS = 2
# Before tvm is imported: the TVM runtime reads TVM_NUM_THREADS once.
os.environ["TVM_NUM_THREADS"] = str(THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

PEAK_SOURCE = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>
// ACC independent vpdpbusd chains per thread, operands in registers: throughput-bound, not latency-bound.
template <int ACC>
__attribute__((noinline)) long long run512(long long iters, int seed) {
  __m512i a = _mm512_set1_epi8((char)(seed | 1)), b = _mm512_set1_epi8((char)(seed + 3));
  __m512i acc[ACC];
  for (int i = 0; i < ACC; ++i) acc[i] = _mm512_set1_epi32(i + seed);
  for (long long it = 0; it < iters; ++it) {
#pragma GCC unroll 32
    for (int i = 0; i < ACC; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
    __asm__ volatile("" : "+v"(a), "+v"(b));  // keep the operands opaque: no hoisting or folding
  }
  __m512i s = acc[0];
  for (int i = 1; i < ACC; ++i) s = _mm512_add_epi32(s, acc[i]);
  return _mm512_reduce_add_epi32(s);
}
template <int ACC>
__attribute__((noinline)) long long run256(long long iters, int seed) {
  __m256i a = _mm256_set1_epi8((char)(seed | 1)), b = _mm256_set1_epi8((char)(seed + 3));
  __m256i acc[ACC];
  for (int i = 0; i < ACC; ++i) acc[i] = _mm256_set1_epi32(i + seed);
  for (long long it = 0; it < iters; ++it) {
#pragma GCC unroll 32
    for (int i = 0; i < ACC; ++i) acc[i] = _mm256_dpbusd_epi32(acc[i], a, b);
    __asm__ volatile("" : "+v"(a), "+v"(b));
  }
  __m256i s = acc[0];
  for (int i = 1; i < ACC; ++i) s = _mm256_add_epi32(s, acc[i]);
  alignas(32) int v[8];
  _mm256_store_si256((__m256i*)v, s);
  long long t = 0;
  for (int i = 0; i < 8; ++i) t += v[i];
  return t;
}
int main(int argc, char** argv) {
  int width = atoi(argv[1]), threads = atoi(argv[2]);
  long long iters = atoll(argv[3]);
  int reps = atoi(argv[4]);
  const int ACC = 16;
  double best = 1e30;
  long long sink = 0;
  for (int r = 0; r < reps; ++r) {
    std::vector<long long> res(threads);
    auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> th;
    for (int t = 0; t < threads; ++t)
      th.emplace_back([&, t] { res[t] = width == 512 ? run512<ACC>(iters, t + r) : run256<ACC>(iters, t + r); });
    for (auto& x : th) x.join();
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (auto v : res) sink += v;
    if (s < best) best = s;
  }
  double macs = (double)threads * iters * ACC * (width / 8);  // 512-bit: 64 u8 x s8 products
  printf("{\"width\": %d, \"threads\": %d, \"accumulators\": %d, \"iters\": %lld, \"reps\": %d, "
         "\"best_s\": %.6g, \"mac_per_s\": %.6g, \"checksum\": %lld}\n",
         width, threads, ACC, iters, reps, best, macs / best, sink);
  return 0;
}
"""
PEAK_FLAGS = ["-O2", "-mavx512f", "-mavx512vnni", "-mavx512bw", "-mavx512vl", "-pthread"]
PEAK_METHOD = ("C++ microbenchmark (g++ " + " ".join(PEAK_FLAGS) + "): 16 independent vpdpbusd accumulator "
               "chains per thread, operands in registers; 512-bit (64 int8 MACs each) and 256-bit (32) forms; "
               "1 and 2 std::threads; best wall time of {reps} repetitions of {iters} iterations; peak = the "
               "better form at 2 threads.")
#: 512-bit vpdpbusd issued per cycle per core (Agner Fog / uops.info: 1 on Cascade Lake, Ice Lake,
#: Sapphire Rapids and Zen 4, whose 512-bit ops are two 256-bit halves). Used only for the
#: theoretical figure.
VPDPBUSD_512_PER_CYCLE = 1

# name -> (model, x_shape, w_shape, geometry, activation, signed activations). Batch 1, 224x224 input.
LAYERS = {
    "resnet18.conv1 (7x7/2 stem)": ("resnet18", (1, 3, 224, 224), (64, 3, 7, 7),
                                    dict(stride=(2, 2), padding=(3, 3, 3, 3)), "relu", True),
    "resnet18.layer1 3x3 64ch 56x56": ("resnet18", (1, 64, 56, 56), (64, 64, 3, 3),
                                       dict(padding=(1, 1, 1, 1)), "relu", False),
    "resnet18.layer2 3x3 128ch 28x28": ("resnet18", (1, 128, 28, 28), (128, 128, 3, 3),
                                        dict(padding=(1, 1, 1, 1)), "relu", False),
    "resnet18.layer3 3x3 256ch 14x14": ("resnet18", (1, 256, 14, 14), (256, 256, 3, 3),
                                        dict(padding=(1, 1, 1, 1)), "relu", False),
    "resnet18.layer4 3x3 512ch 7x7": ("resnet18", (1, 512, 7, 7), (512, 512, 3, 3),
                                      dict(padding=(1, 1, 1, 1)), "relu", False),
    # its input is the previous block's linear projection: signed activations
    "mobilenetv2.features.3.expand 1x1 24->144 56x56": ("mobilenetv2", (1, 24, 56, 56), (144, 24, 1, 1), {},
                                                        ("clip", 0.0, 6.0), True),
    "mobilenetv2.features.3.dw 3x3 dw 144ch 56x56": ("mobilenetv2", (1, 144, 56, 56), (144, 1, 3, 3),
                                                     dict(padding=(1, 1, 1, 1), groups=144), ("clip", 0.0, 6.0),
                                                     False),
    "mobilenetv2.features.18 1x1 320->1280 7x7": ("mobilenetv2", (1, 320, 7, 7), (1280, 320, 1, 1), {},
                                                  ("clip", 0.0, 6.0), False),
}
QUICK_LAYERS = {"quick 3x3 32ch 14x14": ("quick", (1, 32, 14, 14), (32, 32, 3, 3), dict(padding=(1, 1, 1, 1)),
                                         "relu", False)}
LARGE_CONV_MACS = 50_000_000  # "large conv layer" for the issue's >= 30% target
TARGET_FRACTION = 0.30
RUN_SAMPLES = 8
FRAC_BITS = 4


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------- peak
def measure_peak(quick: bool) -> dict:
    """Measured int8 VNNI MAC/s (1 and 2 threads, 512- and 256-bit) and the theoretical figure."""
    iters, reps = (2_000_000, 3) if quick else (20_000_000, 7)
    result = {"method": PEAK_METHOD.format(reps=reps, iters=iters), "runs": [], "theoretical": theoretical_peak()}
    gxx = shutil.which("g++")
    if gxx is None:
        result["error"] = "g++ not found"
        return result
    with tempfile.TemporaryDirectory(prefix="psb_roofline_") as tmp:
        src, exe = pathlib.Path(tmp) / "peak.cc", pathlib.Path(tmp) / "peak"
        src.write_text(PEAK_SOURCE)
        proc = subprocess.run([gxx, *PEAK_FLAGS, str(src), "-o", str(exe)], capture_output=True, text=True)
        if proc.returncode != 0:
            result["error"] = "compile failed: " + proc.stderr[-2000:]
            return result
        objdump = shutil.which("objdump")
        if objdump:
            asm = subprocess.run([objdump, "-d", str(exe)], capture_output=True, text=True).stdout
            result["vpdpbusd_in_binary"] = len(re.findall(r"\bvpdpbusd\b", asm))
        for threads in (1, THREADS):
            for width in (512, 256):
                out = subprocess.run([str(exe), str(width), str(threads), str(iters), str(reps)],
                                     capture_output=True, text=True, check=True).stdout
                run = json.loads(out)
                run["gmac_per_s"] = run["mac_per_s"] / 1e9
                result["runs"].append(run)
    for threads in (1, THREADS):
        best = max((r for r in result["runs"] if r["threads"] == threads), key=lambda r: r["mac_per_s"])
        result[f"threads_{threads}"] = {"gmac_per_s": best["gmac_per_s"], "width": best["width"]}
    result["peak_gmac_per_s"] = result[f"threads_{THREADS}"]["gmac_per_s"]
    result["scaling_2_over_1"] = result[f"threads_{THREADS}"]["gmac_per_s"] / result["threads_1"]["gmac_per_s"]
    return result


def theoretical_peak() -> dict | None:
    try:
        mhz = [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
    except OSError:
        return None
    if not mhz:
        return None
    ghz = max(mhz) / 1000.0
    cores = min(THREADS, len(mhz))
    return {"gmac_per_s": cores * ghz * VPDPBUSD_512_PER_CYCLE * 64, "cores": cores, "ghz": round(ghz, 3),
            "vpdpbusd_512_per_cycle": VPDPBUSD_512_PER_CYCLE,
            "label": (f"theoretical: {cores} cores x {ghz:.3f} GHz (/proc/cpuinfo 'cpu MHz', not the boost clock) "
                      f"x {VPDPBUSD_512_PER_CYCLE} vpdpbusd zmm/cycle (assumed) x 64 MACs")}


# ---------------------------------------------------------------------------- kernels
def make_spec(layer: tuple, preset: str):
    from psb_tvm.schedules.kernels import KernelSpec

    from psb_tvm.config import PSBConfig

    _, x_shape, w_shape, geo, act, signed = layer
    cfg = PSBConfig.preset(preset)
    # the 8-bit activation path of each preset ("auto" keeps 8 bits where rounding allows)
    bits = 8 if cfg.act_bits == "auto" else cfg.act_bits
    return KernelSpec(kind="conv2d", lowering="intdot", x_shape=x_shape, w_shape=w_shape, n_max=cfg.n_max,
                      layer=1, E=cfg.E, P=cfg.P, act_bits=bits, act_signed=signed, frac_bits=FRAC_BITS,
                      activation=act, **geo)


def path_of(spec) -> str:
    return "vnni" if spec.vnni else "vnni16" if spec.vnni16 else "channels_last" if spec.channels_last else "nchw"


def conv_macs(spec) -> int:
    N, O, OH, OW = spec.out_shape
    return N * O * OH * OW * spec.reduction_size


def _asm(lib) -> str:
    mod = lib.mod
    try:
        return mod.imports[0].inspect_source("asm") if mod.imports else mod.inspect_source("asm")
    except Exception:  # noqa: BLE001 - some runtimes cannot show assembly
        return ""


def _compile(func, rule, target):
    """``func`` scheduled by the first of the default rules that applies (depthwise convs by
    ``PSBDepthwiseConv2D``, the rest by ``rule``), compiled."""
    import tvm
    from psb_tvm.schedules.cpu import PSBDepthwiseConv2D

    sch = PSBDepthwiseConv2D().apply(func, target, False) or rule.apply(func, target, False)
    if sch is None:
        raise RuntimeError(f"schedule rule {type(rule).__name__} did not apply")
    return tvm.compile(sch.mod["main"], target=target)


def _stage_funcs(spec):
    """The layer kernel's two per-call preparation stages as standalone PrimFuncs, defined as in
    ``schedules/kernels/`` (layout per path) and scheduled as ``schedule_shared_stages`` does."""
    from psb_tvm.schedules.kernels import COUNTS_DTYPE, xq_row_width
    from psb_tvm.schedules.kernels.layer import _padded, blocked_activation_stage, stem_activation_stages
    from psb_tvm.schedules.kernels.weights import _Encoding, _weight_stage
    from tvm import te, tirx

    N, C, H, W = spec.x_shape
    O, Cg, KH, KW = spec.w_shape
    pt, pl, pb, pr = spec.padding
    counts = te.placeholder(spec.w_shape, COUNTS_DTYPE, name="counts")
    sign, normal, shift = (te.placeholder(spec.w_shape, "int8", name=nm) for nm in ("sign", "normal", "shift"))
    x = te.placeholder(spec.x_shape, "float32", name="x")
    n = tirx.Var("n", "int64")
    padded = _padded(spec, x)
    q = _weight_stage(spec, counts, _Encoding(spec, sign, normal, shift), n)
    nhwc = spec.vnni or spec.vnni16 or spec.channels_last
    dtype = "int16" if spec.vnni16 else spec.act_dtype  # (vnni16's int16 words: the 8-bit activations widened)
    if nhwc and spec.stem_planes:  # padded planes, then 4-channel pixels, as the kernel has them
        xq = stem_activation_stages(spec, lambda b, c, h, w: padded(b, c, h, w).astype(dtype), dtype)
    elif nhwc and spec.blocked_activations:  # blocks of dot_depth planes (channels padded), as the kernel has them
        xq = blocked_activation_stage(spec, lambda b, c, h, w: tirx.if_then_else(
            c < C, padded(b, tirx.min(c, C - 1), h, w).astype(dtype), tirx.const(0, dtype)), H + pt + pb, W + pl + pr)
    elif nhwc:  # (one digit plane)
        xq = te.compute((N, H + pt + pb, W + pl + pr, C), lambda b, h, w, c: padded(b, c, h, w).astype(dtype), name="xq")
    else:  # rows padded as in the kernel (unit stride)
        xq = te.compute((N, C, H + pt + pb, xq_row_width(W + pl + pr)), padded, name="xq")
    qf = te.create_prim_func([counts, sign, normal, shift, n, q]).with_attr("global_symbol", "stage_q")
    xf = te.create_prim_func([x, xq]).with_attr("global_symbol", "stage_xq")
    if nhwc:  # the kernel's NHWC stage schedule keys on the layout (and a stem's on its spec)
        xf = xf.with_attr("psb.layout", path_of(spec))
        if spec.stem_planes or spec.blocked_activations:
            xf = xf.with_attr("psb.spec", spec.to_json())
    return qf, xf, ([int(d) for d in q.shape], q.dtype), ([int(d) for d in xq.shape], xq.dtype)


def _schedule_stage(func, block: str):
    from psb_tvm.schedules.cpu.psb_sampling import _parallel_spatial, schedule_shared_stages
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    if block == "q":
        blk = sch.get_sblock(block)
        _parallel_spatial(sch, blk, len(sch.get_loops(blk)))
    else:
        schedule_shared_stages(sch)  # the kernel's own activation-stage schedule
    return sch


def time_layer(name: str, layer: tuple, preset: str, target, number: int, repeat: int, stages: bool) -> dict:
    import tvm
    from psb_tvm.schedules.cpu import PSBConv2D, PSBSample
    from psb_tvm.schedules.kernels import pack_weights, psb_layer_kernel, psb_sample_kernel

    from psb_tvm import numerics as nm

    dev = tvm.cpu()
    spec = make_spec(layer, preset)
    t0 = time.perf_counter()
    layer_func = psb_layer_kernel(spec, "psb_roofline_kernel")
    layout = layer_func.attrs.get("psb.layout", None)
    lib = _compile(layer_func, PSBConv2D(), target)
    sampler = _compile(psb_sample_kernel(spec, "psb_roofline_sample"), PSBSample(), target)
    build_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    w = rng.standard_normal(spec.w_shape).astype(np.float32)
    enc = nm.encode_weights(w, E=spec.E, P=spec.P, per_channel=True)
    lo, hi = nm.act_range(spec.act_bits, spec.act_signed)
    x = rng.uniform(lo, hi, size=spec.x_shape).astype(np.float32) / 2.0**FRAC_BITS
    O = spec.w_shape[0]
    counts = tvm.runtime.empty(spec.w_shape, "int16", dev)
    thr = tvm.runtime.tensor(enc.threshold, dev)
    sampler(thr, 0, RUN_SAMPLES, 7, counts)
    args = [tvm.runtime.tensor(x, dev), counts] + [tvm.runtime.tensor(a, dev) for a in (
        enc.sign, enc.normal, enc.shift, np.exp2(enc.k_lo.reshape(-1) - FRAC_BITS).astype(np.float32),
        np.zeros(O, np.float32))]
    out = tvm.runtime.empty(spec.out_shape, "float32", dev)

    def median_ms(module, entry, *call_args):
        timer = module.mod.time_evaluator(entry, dev, number=number, repeat=repeat)
        res = timer(*call_args)
        return float(np.median(res.results)) * 1e3, [round(r * 1e3, 5) for r in res.results]

    ms, samples = median_ms(lib, "psb_roofline_kernel", *args, RUN_SAMPLES, out)
    macs = conv_macs(spec)
    asm = _asm(lib)
    row = {
        "layer": name, "model": layer[0], "preset": preset, "E": spec.E, "n_max": spec.n_max, "n": RUN_SAMPLES,
        "x_shape": list(spec.x_shape), "w_shape": list(spec.w_shape), "out_shape": list(spec.out_shape),
        "groups": spec.groups, "q_dtype": spec.q_dtype, "act_dtype": spec.act_dtype, "acc_dtype": spec.acc_dtype,
        "path": path_of(spec), "psb_layout_attr": None if layout is None else str(layout),
        "vpdpbusd_in_asm": len(re.findall(r"\bvpdpbusd\b", asm)), "macs": macs, "ms": ms, "ms_samples": samples,
        "gmac_per_s": macs / (ms * 1e-3) / 1e9, "build_s": round(build_s, 2),
    }
    if spec.vnni:  # output pixels per register tile in _schedule_vnni = independent vpdpbusd chains
        from psb_tvm.schedules.cpu.common import largest_divisor

        row["vnni_pixel_tile"] = largest_divisor(spec.out_shape[3], 8)
    # The frozen form: the same draw's integer weights prepacked at compile time (no weight stage).
    pp_spec = dataclasses.replace(spec, prepacked=True)
    pp_lib = _compile(psb_layer_kernel(pp_spec, "psb_roofline_prepacked"), PSBConv2D(), target)
    packed = pack_weights(pp_spec, nm.weights_from_counts(enc, counts.numpy(), RUN_SAMPLES))
    pp_out = tvm.runtime.empty(spec.out_shape, "float32", dev)
    pp_args = [args[0]] + [tvm.runtime.tensor(a, dev) for a in packed] + args[5:]
    row["prepacked_ms"], _ = median_ms(pp_lib, "psb_roofline_prepacked", *pp_args, RUN_SAMPLES, pp_out)
    np.testing.assert_array_equal(pp_out.numpy(), out.numpy())  # same draw, same bits
    row["prepacked_gmac_per_s"] = macs / (row["prepacked_ms"] * 1e-3) / 1e9
    if spec.groups > 1 and spec.groups == spec.x_shape[1] and preset == "int8":
        row.update(_time_dw_handoff(pp_spec, packed, args[5:], target, median_ms))
    if pp_spec.packed_cpu_conv:  # as the module runs it between packed convs (passes/channels_last_float.py)
        cl_spec = dataclasses.replace(pp_spec, x_nhwc=spec.x_shape[1] > 4, out_nhwc=True)
        cl_lib = _compile(psb_layer_kernel(cl_spec, "psb_roofline_nhwc"), PSBConv2D(), target)
        cl_x = tvm.runtime.tensor(np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if cl_spec.x_nhwc else x, dev)
        cl_out = tvm.runtime.empty(cl_spec.out_storage_shape, "float32", dev)
        row["nhwc_ms"], _ = median_ms(cl_lib, "psb_roofline_nhwc", cl_x, *pp_args[1:], RUN_SAMPLES, cl_out)
        np.testing.assert_array_equal(cl_out.numpy().transpose(0, 3, 1, 2), out.numpy())  # same bits
        row["nhwc_gmac_per_s"] = macs / (row["nhwc_ms"] * 1e-3) / 1e9
    smp_ms, _ = median_ms(sampler, "psb_roofline_sample", thr, 0, RUN_SAMPLES, 7, counts)
    row["sample_ms"] = smp_ms
    row["sample_ns_per_weight_sample"] = smp_ms * 1e6 / (enc.threshold.size * RUN_SAMPLES)
    if stages:
        qf, xf, (qshape, qdt), (xshape, xdt) = _stage_funcs(spec)
        qlib = tvm.compile(_schedule_stage(qf, "q").mod["main"], target=target)
        xlib = tvm.compile(_schedule_stage(xf, "xq").mod["main"], target=target)
        qout, xout = tvm.runtime.empty(qshape, qdt, dev), tvm.runtime.empty(xshape, xdt, dev)
        row["q_stage_ms"], _ = median_ms(qlib, "stage_q", *args[1:5], RUN_SAMPLES, qout)
        row["xq_stage_ms"], _ = median_ms(xlib, "stage_xq", args[0], xout)
        row["stages_fraction"] = (row["q_stage_ms"] + row["xq_stage_ms"]) / ms
    return row


def _time_dw_handoff(spec, packed: list, scale_bias: list, target, median_ms) -> dict:
    """A depthwise conv in the int8 module's own form: between two integer hand-offs, channels-last
    (``dw_nhwc``), uint8 NHWC activations in and out (the consumer: an unsigned 8-bit conv)."""
    import tvm
    from psb_tvm.schedules.cpu import PSBDepthwiseNHWC
    from psb_tvm.schedules.kernels import Handoff, psb_layer_kernel

    dev = tvm.cpu()
    O = spec.w_shape[0]
    h_spec = dataclasses.replace(spec, x_handoff=True, out_handoff=Handoff(8, False, FRAC_BITS, 0, O))
    sch = PSBDepthwiseNHWC().apply(psb_layer_kernel(h_spec, "psb_roofline_dw_handoff"), target, False)
    lib = tvm.compile(sch.mod["main"], target=target)
    N, C, H, W = spec.x_shape
    x = np.random.default_rng(1).integers(0, 256, size=(N, H, W, C)).astype(np.uint8)
    out = tvm.runtime.empty(h_spec.out_storage_shape, h_spec.out_dtype, dev)
    ms, _ = median_ms(lib, "psb_roofline_dw_handoff", tvm.runtime.tensor(x, dev),
                      *[tvm.runtime.tensor(a, dev) for a in packed], *scale_bias, RUN_SAMPLES, out)
    return {"handoff_ms": ms, "handoff_gmac_per_s": conv_macs(spec) / (ms * 1e-3) / 1e9}


def run_layers(layers: dict, presets: list[str], number: int, repeat: int, stages: bool) -> tuple[list, dict]:
    from psb_tvm.target import host_target

    target = host_target()
    rows, errors = [], {}
    for preset in presets:
        for name, layer in layers.items():
            log(f"[roofline] {preset} {name} ...")
            try:
                rows.append(time_layer(name, layer, preset, target, number, repeat, stages))
                r = rows[-1]
                log(f"[roofline]   {r['path']}: {r['ms']:.3f} ms, {r['gmac_per_s']:.1f} GMAC/s "
                    f"(build {r['build_s']} s)")
            except Exception as err:  # noqa: BLE001 - record and go on with the other layers
                errors[f"{preset}: {name}"] = f"{type(err).__name__}: {err}"
                log(f"[roofline]   FAILED: {errors[f'{preset}: {name}']}")
    return rows, errors


# ---------------------------------------------------------------------------- report
def machine() -> dict:
    """The machine description of the latency benchmark (benchmarks/run.py), one definition."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from run import machine as bench_machine

    return bench_machine()


def add_fractions(rows: list, peak: dict) -> None:
    p = peak.get("peak_gmac_per_s")
    for r in rows:
        r["fraction_of_peak"] = r["gmac_per_s"] / p if p else None
        r["prepacked_fraction_of_peak"] = r["prepacked_gmac_per_s"] / p if p and "prepacked_gmac_per_s" in r else None
        if "handoff_gmac_per_s" in r:
            r["handoff_fraction_of_peak"] = r["handoff_gmac_per_s"] / p if p else None
        if "nhwc_gmac_per_s" in r:
            r["nhwc_fraction_of_peak"] = r["nhwc_gmac_per_s"] / p if p else None
        r["large"] = r["macs"] >= LARGE_CONV_MACS and r["groups"] == 1


def markdown(result: dict) -> str:
    peak, rows = result["peak"], result["layers"]
    lines = [f"# Roofline: PSB conv kernels vs int8 VNNI peak ({result['meta']['date']})", ""]
    m = result["meta"]["machine"]
    lines += [f"Machine: {m['cpu_model']} ({m['cpu_family_model']}, LLVM `{m['llvm_cpu']}`), {m['cpus']} vCPUs"
              f"{', ' + m['hypervisor'] + ' guest' if m.get('hypervisor') else ''}; SIMD {', '.join(m['simd'])}; "
              f"TVM {m['versions']['tvm']}; {THREADS} threads. Load average (1/5/15 min) at start "
              f"{result['meta']['load_average_start']}, at end {result['meta']['load_average_end']} "
              "(the 2 vCPUs are shared with other jobs: absolute numbers are noisy).", ""]
    lines += ["## Peak", "", f"Method: {peak['method']}", ""]
    if "error" in peak:
        lines += [f"**Peak measurement failed:** {peak['error']}", ""]
    else:
        lines += ["| threads | 512-bit GMAC/s | 256-bit GMAC/s |", "|---|---|---|"]
        for t in (1, THREADS):
            g = {r["width"]: r["gmac_per_s"] for r in peak["runs"] if r["threads"] == t}
            lines.append(f"| {t} | {g.get(512, 0):.1f} | {g.get(256, 0):.1f} |")
        lines += ["", f"**Measured 2-thread peak: {peak['peak_gmac_per_s']:.1f} GMAC/s** "
                      f"(2-thread / 1-thread = {peak['scaling_2_over_1']:.2f}).", ""]
    if peak.get("theoretical"):
        th = peak["theoretical"]
        lines += [f"{th['label']} = **{th['gmac_per_s']:.1f} GMAC/s** (theoretical, for reference only).", ""]
    lines += ["## Layer kernels", "",
              "Built standalone like `tests/test_kernels.py` (TE kernel + default `PSBDepthwiseConv2D` / "
              "`PSBConv2D` rules, host target), "
              f"run at n={RUN_SAMPLES} with `TVM_NUM_THREADS={THREADS}`; median of `time_evaluator` "
              f"({result['meta']['number']} calls x {result['meta']['repeat']} repeats). MACs = "
              "N·O·OH·OW·(C/groups)·KH·KW. Fraction = achieved GMAC/s / measured 2-thread int8 peak "
              "(int16 rows: int16 weights, compared with the same int8 peak). *Sampled*: the kernel of a module with "
              "run-time n (builds its integer weights from the counts on every call); *frozen*: the kernel of a "
              "`frozen=True` module, same draw, integer weights prepacked at compile time (outputs checked equal). "
              "*Channels-last*: the frozen kernel as the module runs it between packed convs "
              "(passes/channels_last_float.py): float32 NHWC in (a stem: NCHW, the model's input) and out "
              "(outputs checked equal). "
              "`q`, `xq`: the sampled kernel's per-call weight and activation preparation stages timed "
              f"standalone; `sampler`: the separate sampling kernel for {RUN_SAMPLES} samples (sampled modules "
              "only; not part of the layer time).", "",
              "| layer | preset | path | MACs (M) | sampled ms | GMAC/s | % of peak | frozen (prepacked) ms | GMAC/s | "
              "% of peak | channels-last frozen ms | GMAC/s | % of peak | q ms | xq ms | sampler ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def frac(r, key):
        f = r.get(key)
        if f is None:
            return "n/a"
        mark = (" ✓" if f >= TARGET_FRACTION else " ✗") if r.get("large") and r["preset"] == "int8" else ""
        return f"{100 * f:.1f}%{mark}"

    for r in rows:
        path = r["path"] + ("" if r["path"] != "vnni" or r["vpdpbusd_in_asm"] else " (no vpdpbusd!)")
        lines.append(f"| {r['layer']} | {r['preset']} | {path} | {r['macs'] / 1e6:.1f} | {r['ms']:.3f} | "
                     f"{r['gmac_per_s']:.1f} | {frac(r, 'fraction_of_peak')} | {r.get('prepacked_ms', float('nan')):.3f} | "
                     f"{r.get('prepacked_gmac_per_s', float('nan')):.1f} | {frac(r, 'prepacked_fraction_of_peak')} | "
                     f"{r.get('nhwc_ms', float('nan')):.3f} | {r.get('nhwc_gmac_per_s', float('nan')):.1f} | "
                     f"{frac(r, 'nhwc_fraction_of_peak')} | "
                     f"{r.get('q_stage_ms', float('nan')):.3f} | {r.get('xq_stage_ms', float('nan')):.3f} | "
                     f"{r['sample_ms']:.3f} |")
    for r in rows:
        if "handoff_ms" in r:
            lines += ["", f"{r['layer']} as the {r['preset']} module runs it (channels-last `dw_nhwc`, between two "
                          f"integer hand-offs: uint8 NHWC in and out, weights prepacked): {r['handoff_ms']:.3f} ms, "
                          f"{r['handoff_gmac_per_s']:.1f} GMAC/s, {frac(r, 'handoff_fraction_of_peak')} of the peak "
                          "(the issue's target for depthwise convs: >= 25%)."]
    if result.get("errors"):
        lines += ["", "Failed:", ""] + [f"- {k}: {v}" for k, v in result["errors"].items()]
    lines += ["", f"✓ / ✗: int8 preset, groups=1 conv with >= {LARGE_CONV_MACS // 10**6} M MACs, against the "
                  f"issue's target of >= {TARGET_FRACTION:.0%} of the int8 VNNI peak.", ""]
    if result.get("analysis"):
        lines += ["## Why", ""] + result["analysis"] + [""]
    return "\n".join(lines)


def analysis(rows: list) -> list[str]:
    """Observations computed from the rows (the fixed explanation lives in the md template below)."""
    out = []
    large = [r for r in rows if r.get("large") and r["preset"] == "int8" and r.get("fraction_of_peak") is not None]
    for key, label in (("nhwc_fraction_of_peak", "frozen, channels-last (as the module runs them)"),
                       ("prepacked_fraction_of_peak", "frozen (prepacked)"), ("fraction_of_peak", "sampled")):
        rs = [r for r in large if r.get(key) is not None]
        if rs:
            hit = [r for r in rs if r[key] >= TARGET_FRACTION]
            out.append(f"- {label}: {len(hit)} of {len(rs)} large int8 conv layers reach {TARGET_FRACTION:.0%} of "
                       f"the measured peak (best {max(r[key] for r in rs):.1%}, worst {min(r[key] for r in rs):.1%}).")
    for r in rows:
        if r.get("stages_fraction") is not None and r["preset"] == "int8" and r["stages_fraction"] >= 0.15:
            out.append(f"- {r['layer']} ({r['preset']}): the per-call `q` + `xq` stages take "
                       f"{r['stages_fraction']:.0%} of the kernel time.")
    tiles = sorted({(r["out_shape"][3], r["vnni_pixel_tile"]) for r in rows if r.get("vnni_pixel_tile")})
    if tiles:
        out.append("- vnni register tile (output pixels x 16 channels; = independent vpdpbusd chains): "
                   + ", ".join(f"OW={w}: {t}" for w, t in tiles) + ".")
    return out + STATIC_ANALYSIS


STATIC_ANALYSIS = [
    "- **Accumulator chains (vnni path).** `_schedule_vnni` tiles `xt = largest_divisor(OW, 8)` output pixels "
    "x 16 channels; LLVM unrolls the whole reduction and keeps the `xt` accumulators in registers, each an "
    "independent vpdpbusd chain (OW=56: 8, OW=14: 7, OW=7: 7). With a cap of 4 (1-4 chains) the 14x14 and 7x7 "
    "layers were latency-bound and up to 1.7x slower. The epilogue (scale, bias, activation, NHWC -> NCHW) runs "
    "right after each tile while its accumulators are hot; as a separate pass it cost 1.4-3.6x more.",
    "- **Weight stage (sampled modules).** `q = s*(n*normal+counts) << shift` is rebuilt on every call from "
    "four OIHW arrays into the packed `[O/16,KH,KW,C/4,16,4]` layout (column `q ms`). Its cost scales with the "
    "weight count, not the MACs: for 512x512x3x3 (2.4 M weights, 49 MACs per weight) it is most of the kernel. "
    "Frozen modules take `q` prepacked at compile time, which is the gap between the two timing columns.",
    "- **Sampler.** The sampling kernel (sampled modules only) hashes every weight x sample: ~0.5 ns per "
    "weight-sample; with n=8 it costs more than the conv itself for the 256/512-channel layers.",
    "- **Stem and signed activations.** The 7x7/2 stem has C=3: the vnni layout rounds C up to 4 with zero "
    "weights; its input is signed, so the activations go in offset to uint8 (+128) and each output channel is "
    "corrected by -128 x its weight sum (exact); the 3 channels are quantized as padded planes, then "
    "interleaved into 4-channel pixels (shuffles). Depthwise convs on a float input use the NCHW path "
    "(vectorized over output columns, reduction outside). Between integer hand-offs (the int8 module's "
    "MobileNetV2) they run channels-last: 16 channels x up to 8 pixels per tap, the weights in registers, "
    "LLVM's `vpdpwssd` on the widened bytes (16 products per instruction, a quarter of `vpdpbusd`'s: without "
    "a reduction over channels the 4 taps per lane would need interleaved activations).",
    "- **int16 preset.** int16 weights take the vnni16 path: the vnni blocking with int16 words in pairs, one "
    "`vpdpwssd` per 16 outputs x 2 channels (half the products per instruction of `vpdpbusd`, so about half "
    "the int8 rate at best); 16-bit activations whose sums might not fit int32 are summed in int32 over "
    "chunks of channels added up in int64 (signed) or take two base-256 digits (unsigned: twice the work), "
    "not shown here (these rows use 8-bit activations).",
    "- **Noise.** Two vCPUs shared with other jobs: a kernel of 1-3 ms whose 2 threads are split statically "
    "loses a whole time slice when one vCPU is taken; stage and kernel times are medians but can still be off "
    "by ~2x between runs. Compare rows of one run only.",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small layer, short peak run (smoke test)")
    parser.add_argument("--presets", default="int8,int16")
    parser.add_argument("--layers", default=None, help="comma-separated substrings of layer names to keep")
    parser.add_argument("--number", type=int, default=None, help="calls per time_evaluator repeat")
    parser.add_argument("--repeat", type=int, default=None, help="time_evaluator repeats (median taken)")
    parser.add_argument("--no-stages", action="store_true", help="skip the q / xq stage timings")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    args = parser.parse_args(argv)

    layers = QUICK_LAYERS if args.quick else LAYERS
    if args.layers:
        keys = [k.strip() for k in args.layers.split(",")]
        layers = {n: v for n, v in layers.items() if any(k in n for k in keys)}
    number = args.number or (2 if args.quick else 10)
    repeat = args.repeat or (3 if args.quick else 15)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "load_average_start": load_average(),
            "quick": args.quick, "number": number, "repeat": repeat, "n": RUN_SAMPLES, "threads": THREADS,
            "machine": machine()}
    log(f"[roofline] load average {meta['load_average_start']}; measuring the VNNI peak ...")
    peak = measure_peak(args.quick)
    if "peak_gmac_per_s" in peak:
        log(f"[roofline] peak: 1 thread {peak['threads_1']['gmac_per_s']:.1f}, {THREADS} threads "
            f"{peak['peak_gmac_per_s']:.1f} GMAC/s")
    rows, errors = run_layers(layers, presets, number, repeat, not args.no_stages)
    add_fractions(rows, peak)
    meta["load_average_end"] = load_average()
    result = {"meta": meta, "peak": peak, "layers": rows, "errors": errors}
    result["analysis"] = analysis(rows)
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "roofline.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out_dir / "roofline.md").write_text(md)
    print(md)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
