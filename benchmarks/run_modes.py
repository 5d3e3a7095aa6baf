"""Cost of every run mode on one model, side by side: the paper's op count and measured wall-clock.

    python benchmarks/run_modes.py [--repeats 30] [--out-dir benchmarks/results]

Modes on the digits CNN (batch 50): run-time n (one module, n chosen per call), frozen modules
(one draw baked in, no sampling at run time), one progressive refinement step (n -> 2n from a
kept session), and attention (low-n pass + masked high-n pass). 2 threads (TVM_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402

import psb_tvm  # noqa: E402
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split  # noqa: E402
from psb_tvm.demo import median_ms  # noqa: E402

BATCH = 50


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    x_train, _, x_test, y_test = load_digits_split()
    shapes, calib = {"input": (BATCH, 1, 8, 8)}, {"input": x_train[:256]}
    x = x_test[:BATCH]
    module = psb_tvm.compile(DIGITS_ONNX, samples=16, input_shapes=shapes, calibration=calib)
    float_mod = psb_tvm.compile(DIGITS_ONNX, input_shapes=shapes, config=psb_tvm.PSBConfig(include=()))
    rows = [{"mode": "TVM fp32 (same compiler, untuned)", "additions": None,
             "ms": median_ms(lambda: float_mod.run(x), args.repeats)}]
    for n in (1, 4, 8, 16, 64):
        rows.append({"mode": f"run-time n={n}", "additions": module.cost(n)["additions"],
                     "ms": median_ms(lambda n=n: module.run(x, samples=n), args.repeats)})
    for n in (4, 16):
        frozen = psb_tvm.compile(DIGITS_ONNX, samples=n, input_shapes=shapes, calibration=calib, frozen=True)
        rows.append({"mode": f"frozen n={n}", "additions": module.cost(n)["additions"],
                     "ms": median_ms(lambda f=frozen: f.run(x), args.repeats)})
    int8 = psb_tvm.compile(DIGITS_ONNX, samples=8, input_shapes=shapes, calibration=calib,
                           config=psb_tvm.PSBConfig.preset("int8"))
    rows.append({"mode": "int8 preset run-time n=8", "additions": int8.cost(8)["additions"],
                 "ms": median_ms(lambda: int8.run(x), args.repeats)})

    def refine_step():
        session = module.session(x, samples=8, seed=1)
        t = time.perf_counter()
        session.refine()
        return time.perf_counter() - t

    refine_step()
    step = 1e3 * float(np.median([refine_step() for _ in range(args.repeats)]))
    rows.append({"mode": "refinement step 8 -> 16 (kept session)", "additions": module.cost(16)["additions"],
                 "ms": step, "note": "samples only [8, 16), then one integer pass; in the additions model every layer after the "
                                     "first sees new inputs, so a full 2n pass is counted"})
    result = module.attend(x, low=4, high=16, mode="mean_entropy", fraction=1.0)
    ms = median_ms(lambda: module.attend(x, low=4, high=16, mode="mean_entropy", fraction=1.0), args.repeats)
    adds = result.additions["low_pass"] + result.additions["high_pass"]
    rows.append({"mode": "attention low 4 + high 16 (mean_entropy, f=1.0)", "additions": int(adds), "ms": ms,
                 "note": f"high-n work done {100 * result.high_work_fraction:.1f}%"})
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}")
    lines = [f"Run modes on the digits CNN, batch {BATCH} ({machine}); medians of {args.repeats} runs.", "",
             "| mode | additions (paper's cost) | wall-clock ms | note |", "|---|---|---|---|"]
    for r in rows:
        adds = f"{r['additions'] / 1e6:.1f} M" if r["additions"] is not None else "-"
        lines.append(f"| {r['mode']} | {adds} | {r['ms']:.3f} | {r.get('note', '')} |")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "run_modes.json"), "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out_dir, "run_modes.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
