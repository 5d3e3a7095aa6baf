#!/usr/bin/env bash
# GPU device check (issue 5 item 4): PSB vs TVM fp32 / fp16 on CUDA, checked against CPU references.
#
#   tools/gpu_check.sh prepare [OUT_DIR] [options]   # HERE: full TVM compiler, no GPU needed
#   tools/gpu_check.sh run     [OUT_DIR] [options]   # THERE: GPU machine, no internet, no TVM compiler
#
# OUT_DIR defaults to .gpu_check (in the repo root; added to .git/info/exclude so it travels only
# when carried). prepare compiles (--models digits,mobilenetv2:psb_int8+fp16+fp32@64 --batches 1,64
# --arch sm_90; a model's own variants after ':', '@64' (or '@1/64'): those batches only; else --variants
# psb,psb_iid,psb_int8,fp32,fp16; more: psb_shiftadd, psb_iid_shiftadd, psb_bitserial, psb_iid_bitserial; sampled
# variants also record one attend call on the CPU and replay it there: the masked kernels): the PSB
# module (calibrated, run-time n, seed 0; psb_iid: the i.i.d. sampler), the int8 preset frozen at n=8 (psb_int8: weights
# prepacked for __dp4a), TVM fp32 (psb_tvm.compile with PSBConfig(include=())) and TVM fp16
# (relax.transform.ToMixedPrecision(out_dtype="float16")), exported as .so with the CUDA kernels
# already compiled by nvcc into a fatbin (SASS for --arch plus PTX), so the GPU side needs neither
# NVRTC nor nvcc. It saves the inputs and CPU references (.npy: the same PSB modules built for
# llvm, PSB at n = 1, 8, 16 with the same seed; onnxruntime fp32 for the float variants), TVM's
# runtime libraries (libtvm_runtime*.so, libcudart.so.13) and the apache-tvm-ffi wheel for Python
# 3.12 (the GPU image's), and manifest.json. About 55 MiB with the default models (MobileNetV2's
# batch-1 and batch-64 modules each hold their weights). ResNet-18 does not fit the device tool's
# 64 MiB carry limit: one sampled PSB module is ~60 MB (5 bytes per weight), fp32 ~47 MB.
#
# run loads each module with the tvm_ffi wheel and the carried runtime libraries only (no `tvm`
# package: the Relax VM is driven through its packed functions; inputs/outputs go through torch
# via DLPack), checks outputs against the references (max abs / rel error, top-1 agreement; the
# tolerances are in manifest.json), times each module (PSB at n = 1, 8, 16; median of up to 200
# runs after 10 warm-ups, CUDA events, budget 3 s per row), prints a markdown table and writes
# gpu_check_results.json / .md to $OUT (the device tool's output folder) or OUT_DIR. Exit 0 when
# every check passes. Takes well under a minute for digits.
#
# With the device tool (one call):
#   here:   tools/gpu_check.sh prepare
#   device: run(command="bash tools/gpu_check.sh run", carry=[".gpu_check"], timeout_s=300)
# Dry run of both steps on this CPU (llvm modules, same code path without CUDA):
#   tools/gpu_check.sh prepare /tmp/gc --device cpu --quick && tools/gpu_check.sh run /tmp/gc --device cpu
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmd="${1:?usage: gpu_check.sh prepare|run [OUT_DIR] [options]}"; shift
OUT_DIR="${ROOT}/.gpu_check"
if [[ $# -gt 0 && "$1" != -* ]]; then OUT_DIR="$1"; shift; fi
case "$cmd" in
  prepare)
    PY="${PYTHON:-$( [[ -x /work/venv/bin/python ]] && echo /work/venv/bin/python || echo python3)}"
    if [[ "$OUT_DIR" == "${ROOT}/.gpu_check" ]] && ! grep -qx '/.gpu_check/' "${ROOT}/.git/info/exclude" 2>/dev/null; then
      echo '/.gpu_check/' >> "${ROOT}/.git/info/exclude"
    fi
    exec "$PY" "${ROOT}/tools/gpu_check.py" prepare "$OUT_DIR" "$@" ;;
  run)
    PY="${PYTHON:-python3}"
    if [[ -d "$OUT_DIR/runtime" ]] && ls "$OUT_DIR"/runtime/*.whl >/dev/null 2>&1; then
      SITE="$(mktemp -d /tmp/gpu_check_site.XXXX)"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$OUT_DIR"/runtime/*.whl
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    elif [[ "$*" == *"--device cpu"* ]]; then
      PY="${PYTHON:-$( [[ -x /work/venv/bin/python ]] && echo /work/venv/bin/python || echo python3)}"
    fi
    export TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
    export LD_LIBRARY_PATH="$OUT_DIR/runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    exec "$PY" "${ROOT}/tools/gpu_check.py" run "$OUT_DIR" "$@" ;;
  *) echo "unknown command $cmd (prepare|run)" >&2; exit 2 ;;
esac
