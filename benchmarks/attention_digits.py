"""Computational attention on the digits CNN: accuracy vs high-n work for mask modes and fractions.

    python benchmarks/attention_digits.py [--seeds 5] [--low 4] [--high 16] [--out-dir benchmarks/results]

Every configuration is averaged over ``--seeds`` draws of the sample stream; the baselines are the
full low-n and full high-n runs with the same seeds. Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402

import psb_tvm  # noqa: E402
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split  # noqa: E402

BATCH = 50


def evaluate(module, x, y, seeds, **kw):
    acc, work, t_attend, t_high = [], [], 0.0, 0.0
    for seed in seeds:
        preds, fractions = [], []
        for i in range(0, len(x), BATCH):
            xb = x[i:i + BATCH]
            t0 = time.perf_counter()
            r = module.attend(xb, seed=seed, mask_seed=seed, **kw)
            t1 = time.perf_counter()
            module.run(xb, samples=kw["high"], seed=seed)
            t_high += time.perf_counter() - t1
            t_attend += t1 - t0
            preds.append(r.output.argmax(1))
            fractions.append(r.high_work_fraction)
        acc.append(float((np.concatenate(preds) == y).mean()))
        work.append(float(np.mean(fractions)))
    return {"accuracy": float(np.mean(acc)), "accuracy_std": float(np.std(acc)), "high_work_fraction": float(np.mean(work)),
            "wall_attend_s": t_attend, "wall_full_high_s": t_high}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--low", type=int, default=4)
    parser.add_argument("--high", type=int, default=16)
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    x_train, _, x_test, y_test = load_digits_split()
    module = psb_tvm.compile(DIGITS_ONNX, samples=args.high, input_shapes={"input": (BATCH, 1, 8, 8)},
                             calibration={"input": x_train[:256]})
    seeds = list(range(args.seeds))

    def full(n):
        accs = []
        for seed in seeds:
            preds = [module.run(x_test[i:i + BATCH], samples=n, seed=seed).argmax(1) for i in range(0, len(x_test), BATCH)]
            accs.append(float((np.concatenate(preds) == y_test).mean()))
        return float(np.mean(accs))

    base = {"low": full(args.low), "high": full(args.high)}
    rows = []
    grid = [("mean_entropy", f, d) for f in (0.8, 0.9, 1.0, 1.1, 1.2) for d in (0, 1)]
    grid += [("max_entropy", f, 0) for f in (0.5, 0.7, 0.9)]
    grid += [("random", f, d) for f in (0.9, 1.0, 1.1) for d in (0, 1)]
    for mode, fraction, dilation in grid:
        r = evaluate(module, x_test, y_test, seeds, low=args.low, high=args.high, mode=mode, fraction=fraction,
                     dilation=dilation)
        rows.append({"mode": mode, "fraction": fraction, "dilation": dilation, **r})
        print(f"{mode:13s} f={fraction:.1f} d={dilation}: acc {100 * r['accuracy']:.2f}% "
              f"work {r['high_work_fraction']:.3f} (full high {100 * base['high']:.2f}%)", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    report = {"low": args.low, "high": args.high, "seeds": args.seeds, "baseline": base, "rows": rows}
    with open(os.path.join(args.out_dir, "attention_digits.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"Digits CNN, low n={args.low}, high n={args.high}, {args.seeds} seeds, 450 test images. "
             f"Full low-n accuracy {100 * base['low']:.2f}%, full high-n {100 * base['high']:.2f}%.", "",
             "| mode | fraction | dilation | accuracy | vs full high-n | high-n work done | wall: attend / full high |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['fraction']} | {r['dilation']} | {100 * r['accuracy']:.2f}% | "
                     f"{100 * (r['accuracy'] - base['high']):+.2f} | {100 * r['high_work_fraction']:.1f}% | "
                     f"{r['wall_attend_s'] / r['wall_full_high_s']:.2f} |")
    with open(os.path.join(args.out_dir, "attention_digits.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
