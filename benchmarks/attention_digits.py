"""Computational attention on the digits CNN: accuracy vs high-n work, per mask mode, with the
random ablation at the same budget.

    python benchmarks/attention_digits.py [--seeds 5] [--pairs 4:16,8:32] [--out-dir benchmarks/results]

For every (low n, high n) pair: the full low-n and full high-n runs (the baselines), then every
configuration of the grid (mode, fraction, dilation, gate). Each configuration is paired with its
ablation: the mask it chose, re-drawn at random with the same number of pixels per image (per-pixel
modes) or the same number of images (``margin_gate``), run through ``attend(mask=...)``. Every number
is averaged over ``--seeds`` draws of the sample stream (the same seeds for the baselines).

Work: ``high work`` = (high-n additions done + any extra signal pass, e.g. the second low-n draw of
``variance``) / additions of the full high-n run (``AttentionResult.high_work_fraction``); ``total
work`` adds the low-n pass every mode pays. Wall-clock: the whole ``attend`` call (low pass, signal,
masks in numpy, masked high pass) against ``run(samples=high)`` on the same batches, 2 threads.
Writes ``attention_digits.json`` and ``attention_digits.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402

import psb_tvm  # noqa: E402
from psb_tvm import attention  # noqa: E402
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split  # noqa: E402

BATCH = 50
TARGET_SAVING, TARGET_LOSS = 0.33, 0.005

GRID = ([("mean_entropy", f, 0, None) for f in (0.8, 1.0, 1.1)]
        + [("mean_entropy", 1.0, 1, None), ("max_entropy", 0.7, 0, None)]
        + [("variance", f, 0, None) for f in (0.5, 0.8, 1.0, 1.2)]
        + [("magnitude", f, 0, None) for f in (0.5, 0.8, 1.0, 1.2)]
        + [("margin_gate", t, 0, None) for t in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)]
        + [("magnitude", f, 0, g) for f in (0.5, 0.8) for g in (0.95, 0.99)]
        + [("variance", 0.5, 0, g) for g in (0.95, 0.99)])


def ablation_mask(mode, result, seed):
    """The mask ``result`` used, re-drawn at random with the same budget."""
    if mode in attention.IMAGE_MODES:
        images = attention.random_images_like(result.mask.any(axis=(1, 2)), seed)
        return np.broadcast_to(images[:, None, None], result.mask.shape).copy()
    return attention.random_like(result.mask, seed)


def evaluate(module, x, y, seeds, low, high, mode, fraction, dilation, gate):
    stats = {k: [] for k in ("acc", "work", "total", "rand_acc", "rand_work")}
    t_attend = t_high = 0.0
    for seed in seeds:
        preds, rpreds, work, total, rwork = [], [], [], [], []
        for i in range(0, len(x), BATCH):
            xb = x[i:i + BATCH]
            t0 = time.perf_counter()
            r = module.attend(xb, low=low, high=high, mode=mode, fraction=fraction, dilation=dilation, gate=gate,
                              seed=seed, mask_seed=seed)
            t1 = time.perf_counter()
            module.run(xb, samples=high, seed=seed)
            t_high += time.perf_counter() - t1
            t_attend += t1 - t0
            rr = module.attend(xb, low=low, high=high, mask=ablation_mask(mode, r, 1000 + seed + i), seed=seed)
            preds.append(r.output.argmax(1))
            rpreds.append(rr.output.argmax(1))
            work.append(r.high_work_fraction)
            total.append(r.total_work_fraction)
            rwork.append(rr.high_work_fraction)
        stats["acc"].append(float((np.concatenate(preds) == y).mean()))
        stats["rand_acc"].append(float((np.concatenate(rpreds) == y).mean()))
        stats["work"].append(float(np.mean(work)))
        stats["total"].append(float(np.mean(total)))
        stats["rand_work"].append(float(np.mean(rwork)))
    return {"accuracy": float(np.mean(stats["acc"])), "accuracy_std": float(np.std(stats["acc"])),
            "high_work_fraction": float(np.mean(stats["work"])), "total_work_fraction": float(np.mean(stats["total"])),
            "random_accuracy": float(np.mean(stats["rand_acc"])),
            "random_high_work_fraction": float(np.mean(stats["rand_work"])),
            "wall_attend_s": t_attend, "wall_full_high_s": t_high}


def run_pair(module, x, y, seeds, low, high):
    def full(n):
        accs = []
        for seed in seeds:
            preds = [module.run(x[i:i + BATCH], samples=n, seed=seed).argmax(1) for i in range(0, len(x), BATCH)]
            accs.append(float((np.concatenate(preds) == y).mean()))
        return float(np.mean(accs))

    base = {"low": full(low), "high": full(high)}
    print(f"low n={low}: {100 * base['low']:.2f}%  high n={high}: {100 * base['high']:.2f}%", flush=True)
    rows = []
    for mode, fraction, dilation, gate in GRID:
        r = evaluate(module, x, y, seeds, low, high, mode, fraction, dilation, gate)
        rows.append({"mode": mode, "fraction": fraction, "dilation": dilation, "gate": gate, **r})
        print(f"  {mode:12s} f={fraction} d={dilation} gate={gate}: acc {100 * r['accuracy']:.2f}% "
              f"({100 * (r['accuracy'] - base['high']):+.2f}) work {r['high_work_fraction']:.3f} | random "
              f"{100 * r['random_accuracy']:.2f}% work {r['random_high_work_fraction']:.3f} | wall "
              f"{r['wall_attend_s'] / r['wall_full_high_s']:.2f}x", flush=True)
    meeting = [r for r in rows if r["accuracy"] >= base["high"] - TARGET_LOSS - 1e-12
               and r["high_work_fraction"] <= 1 - TARGET_SAVING]
    best = min(meeting, key=lambda r: r["high_work_fraction"]) if meeting else None
    return {"low": low, "high": high, "baseline": base, "rows": rows, "best_meeting_target": best}


def markdown(report) -> str:
    lines = ["# Computational attention on the digits CNN", "",
             f"Generated by `python benchmarks/attention_digits.py` ({report['seeds']} seeds, "
             f"{report['images']} test images, batch {BATCH}, 2 threads; run time {report['run_minutes']:.1f} min).",
             "", "Target: save >= 33% of the high-n work (high work <= 67%) at <= 0.5 point accuracy loss vs the "
             "full high-n run. `high work` counts the high-n additions done plus any extra signal pass "
             "(`variance`: a second low-n draw); `total work` also counts the low-n pass. `random (same budget)` "
             "re-draws each chosen mask at random with the same number of pixels per image (per-pixel modes) "
             "or images per batch (`margin_gate`). Wall-clock: whole `attend` call / `run(samples=high)`, "
             "same batches.", ""]
    for pair in report["pairs"]:
        base = pair["baseline"]
        lines += [f"## low n={pair['low']}, high n={pair['high']}", "",
                  f"Full low-n accuracy {100 * base['low']:.2f}%, full high-n {100 * base['high']:.2f}%.", "",
                  "| mode | fraction | dil. | gate | accuracy | vs full high-n | high work | total work "
                  "| random (same budget) | random vs high-n | wall: attend / full high |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in pair["rows"]:
            lines.append(
                f"| {r['mode']} | {r['fraction']} | {r['dilation']} | {r['gate'] if r['gate'] is not None else '-'} | "
                f"{100 * r['accuracy']:.2f}% | {100 * (r['accuracy'] - base['high']):+.2f} | "
                f"{100 * r['high_work_fraction']:.1f}% | {100 * r['total_work_fraction']:.1f}% | "
                f"{100 * r['random_accuracy']:.2f}% ({100 * r['random_high_work_fraction']:.1f}%) | "
                f"{100 * (r['random_accuracy'] - base['high']):+.2f} | {r['wall_attend_s'] / r['wall_full_high_s']:.2f} |")
        best = pair["best_meeting_target"]
        lines.append("")
        if best:
            lines.append(f"Cheapest configuration meeting the target: `{best['mode']}` fraction {best['fraction']}"
                         f"{'' if best['gate'] is None else ', gate ' + str(best['gate'])}: "
                         f"{100 * (best['accuracy'] - base['high']):+.2f} points at {100 * best['high_work_fraction']:.1f}% "
                         f"high-n work ({100 * best['total_work_fraction']:.1f}% with the low-n pass), wall-clock "
                         f"{best['wall_attend_s'] / best['wall_full_high_s']:.2f}x the full high-n run.")
        else:
            lines.append("No configuration meets the target.")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--pairs", default="4:16,8:32", help="low:high sample-count pairs, comma separated")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    pairs = [tuple(int(v) for v in p.split(":")) for p in args.pairs.split(",")]
    start = time.perf_counter()
    x_train, _, x_test, y_test = load_digits_split()
    module = psb_tvm.compile(DIGITS_ONNX, samples=max(h for _, h in pairs), input_shapes={"input": (BATCH, 1, 8, 8)},
                             calibration={"input": x_train[:256]})
    seeds = list(range(args.seeds))
    module.attend(x_test[:BATCH], low=pairs[0][0], high=pairs[0][1])  # warm-up (VM creation)
    report = {"seeds": args.seeds, "images": len(x_test), "batch": BATCH,
              "pairs": [run_pair(module, x_test, y_test, seeds, lo, hi) for lo, hi in pairs]}
    report["run_minutes"] = (time.perf_counter() - start) / 60
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "attention_digits.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(os.path.join(args.out_dir, "attention_digits.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
