"""Tutorial 3: computational attention — spend high-n work only where the network is unsure.

    python tutorials/03_attention.py [--fast] [--out-dir DIR] [--low 4] [--high 16]

``module.attend(x, low=, high=, mode=, fraction=)`` (the paper's localized refinement):

1. one cheap pass at n=``low`` everywhere;
2. the per-pixel softmax entropy (over channels) of the last PSB conv layer's output marks the
   uncertain pixels: ``mean_entropy`` keeps pixels above ``fraction`` x the image's mean entropy,
   ``max_entropy`` above ``fraction`` x its max, ``random`` as many random pixels (an ablation:
   is the entropy a good guide?); ``dilation`` grows the mask by 3x3 steps;
3. every conv layer is recomputed at n=``high`` only at the masked positions (resized to its
   resolution); the others keep their low-n value and are not computed at all.

The result carries the output, the mask, and the cost: ``high_work_fraction`` is the share of the
full high-n additions (the paper's cost measure) that the masked pass did. This tutorial prints
accuracy and work for several modes and fractions, next to the full low-n and high-n runs with
the same seeds. Nothing is written to disk (``--out-dir`` is accepted for symmetry).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import psb_tvm
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split

BATCH = 50


def full_run(module, x, y, n, seeds):
    """Accuracy of plain ``run`` at n (every pixel at n), averaged over seeds; also the predictions."""
    accs, preds = [], {}
    for seed in seeds:
        p = np.concatenate([module.run(x[i:i + BATCH], samples=n, seed=seed).argmax(1) for i in range(0, len(x), BATCH)])
        accs.append(float((p == y).mean()))
        preds[seed] = p
    return float(np.mean(accs)), preds


def attended(module, x, y, seeds, high_preds, **kw):
    """Accuracy, top-1 agreement with the full high-n run, and high-n work fraction of ``attend``."""
    accs, agree, work = [], [], []
    for seed in seeds:
        preds = []
        for i in range(0, len(x), BATCH):
            r = module.attend(x[i:i + BATCH], seed=seed, mask_seed=seed, **kw)
            preds.append(r.output.argmax(1))
            work.append(r.high_work_fraction)
        p = np.concatenate(preds)
        accs.append(float((p == y).mean()))
        agree.append(float((p == high_preds[seed]).mean()))
    return float(np.mean(accs)), float(np.mean(agree)), float(np.mean(work))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="fewer images, seeds and configurations")
    parser.add_argument("--out-dir", help="unused: this tutorial writes no files")
    parser.add_argument("--low", type=int, default=4, help="n of the cheap pass (default 4)")
    parser.add_argument("--high", type=int, default=16, help="n of the refinement (default 16)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

    x_train, _, x_test, y_test = load_digits_split()
    n_test = 150 if args.fast else len(x_test)
    x_test, y_test = x_test[:n_test], y_test[:n_test]
    seeds = [0] if args.fast else [0, 1, 2, 3, 4]
    module = psb_tvm.compile(DIGITS_ONNX, samples=args.high, input_shapes={"input": (BATCH, 1, 8, 8)},
                             calibration={"input": x_train[:256]})
    low, high = args.low, args.high

    # ------------------------------------------------------------------ one call, looked at closely
    x = np.ascontiguousarray(x_test[:BATCH])
    r = module.attend(x, low=low, high=high, mode="mean_entropy", fraction=1.0)
    print(f"digits CNN, {n_test} test images, low n={low}, high n={high}, seeds {seeds}")
    print(f"\none attend() call on a batch of {BATCH}: mask {r.mask.dtype} {r.mask.shape} "
          f"(the last PSB conv layer's resolution), {100 * r.mask.mean():.1f}% of its pixels refined")
    print("fraction of positions recomputed at high n, per PSB layer:",
          {name: round(f, 3) for name, f in r.layer_fractions.items()})
    print(f"high-n work fraction {r.high_work_fraction:.3f}; additions: " +
          ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in r.additions.items()))
    print("wall-clock: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in r.seconds.items()))
    # An explicit mask (0/1, [N, H, W] at that layer's resolution) replaces the entropy rule: all
    # ones is the full high-n run, all zeros the low-n run, bit for bit.
    ones = module.attend(x, low=low, high=high, mask=np.ones_like(r.mask))
    zeros = module.attend(x, low=low, high=high, mask=np.zeros_like(r.mask))
    print(f"all-ones mask == run(samples={high}): {ones.output.tobytes() == module.run(x, samples=high).tobytes()}; "
          f"all-zeros mask == run(samples={low}): {zeros.output.tobytes() == module.run(x, samples=low).tobytes()}")

    # ------------------------------------------------------------------ accuracy vs work
    acc_low, _ = full_run(module, x_test, y_test, low, seeds)
    acc_high, high_preds = full_run(module, x_test, y_test, high, seeds)
    print(f"\nfull low-n (n={low}) accuracy: {100 * acc_low:.2f}%   (high-n work fraction 0)")
    print(f"full high-n (n={high}) accuracy: {100 * acc_high:.2f}%   (high-n work fraction 1)")
    if args.fast:
        grid = [("mean_entropy", 1.0, 0), ("max_entropy", 0.7, 0), ("random", 1.0, 0)]
    else:
        grid = [("mean_entropy", f, d) for f in (0.8, 1.0, 1.2) for d in (0, 1)]
        grid += [("max_entropy", f, 0) for f in (0.5, 0.7, 0.9)]
        grid += [("random", f, 0) for f in (0.8, 1.0, 1.2)]
    print("\n| mode | fraction | dilation | accuracy | vs full high-n | agreement with high-n | high-n work |")
    print("|---|---|---|---|---|---|---|")
    for mode, fraction, dilation in grid:
        acc, agree, work = attended(module, x_test, y_test, seeds, high_preds, low=low, high=high, mode=mode,
                                    fraction=fraction, dilation=dilation)
        print(f"| {mode} | {fraction} | {dilation} | {100 * acc:.2f}% | {100 * (acc - acc_high):+.2f} | "
              f"{100 * agree:.2f}% | {100 * work:.1f}% |")
    print("\nmean_entropy vs random at the same number of pixels shows whether the entropy picks the right "
          "pixels; dilation and lower fractions buy accuracy with more work.")


if __name__ == "__main__":
    main()
