"""Computational attention on the ResNet-18 / MobileNetV2 shaped nets (random weights).

    python benchmarks/attention_convnets.py [--batch 4] [--images 8] [--seeds 1] [--low 4] [--high 16]
                                            [--models resnet18,mobilenetv2] [--out-dir benchmarks/results]

The weights are random (``benchmarks/models.py``), so there is no accuracy: every configuration is
compared with the full high-n run of the same seed by top-1 agreement and the relative logit error
``||out - high|| / ||high||`` (the full low-n run is the other end). Each configuration is paired
with its random ablation at the same budget (the chosen mask re-drawn with as many pixels per image,
or as many images for ``margin_gate``). The batch dim of the ONNX graphs is made dynamic and fixed to
``--batch``; inputs are the synthetic images of ``benchmarks/run.py``. Work and wall-clock as in
``attention_digits.py`` (2 threads). Writes ``attention_convnets.json`` and ``attention_convnets.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import models as bench_models  # noqa: E402
from attention_digits import ablation_mask  # noqa: E402
from run import synthetic_images  # noqa: E402

import psb_tvm  # noqa: E402

GRID = [("mean_entropy", 1.0, None), ("variance", 1.0, None), ("magnitude", 1.0, None),
        ("margin_gate", 0.5, None), ("margin_gate", 0.9, None), ("magnitude", 0.5, 0.9)]
BUILDERS = {"resnet18": bench_models.resnet18_shaped, "mobilenetv2": bench_models.mobilenetv2_shaped}


def dynamic_batch(proto):
    for vi in list(proto.graph.input) + list(proto.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    del proto.graph.value_info[:]
    return proto


def compare(out, high):
    agree = float((out.argmax(1) == high.argmax(1)).mean())
    err = float(np.linalg.norm(out - high) / np.linalg.norm(high))
    return agree, err


def run_model(name, args):
    t0 = time.perf_counter()
    module = psb_tvm.compile(dynamic_batch(BUILDERS[name]()), samples=args.high,
                             input_shapes={"input": (args.batch, 3, 224, 224)},
                             calibration={"input": synthetic_images(16, seed=1)})
    compile_s = time.perf_counter() - t0
    x = synthetic_images(args.images, seed=2)
    batches = [x[i:i + args.batch] for i in range(0, len(x) - args.batch + 1, args.batch)]
    module.attend(batches[0], low=args.low, high=args.high)  # warm-up (VM creation)
    seeds = list(range(args.seeds))
    high = {(s, b): module.run(xb, samples=args.high, seed=s) for s in seeds for b, xb in enumerate(batches)}
    low = [compare(module.run(xb, samples=args.low, seed=s), high[s, b]) for s in seeds for b, xb in enumerate(batches)]
    last = [l for l in module.layers if l["status"] == "psb" and len(l["out_shape"]) == 4][-1]
    base = {"low_agreement": float(np.mean([a for a, _ in low])), "low_rel_error": float(np.mean([e for _, e in low]))}
    print(f"{name}: compiled in {compile_s:.0f} s; last spatial PSB layer {last['name']} {last['out_shape']}; "
          f"low n={args.low}: agreement {base['low_agreement']:.2f}, rel. error {base['low_rel_error']:.3f}", flush=True)
    rows = []
    for mode, fraction, gate in GRID:
        acc = {k: [] for k in ("agree", "err", "work", "total", "r_agree", "r_err", "r_work")}
        t_att = t_high = 0.0
        for s in seeds:
            for b, xb in enumerate(batches):
                t1 = time.perf_counter()
                r = module.attend(xb, low=args.low, high=args.high, mode=mode, fraction=fraction, gate=gate,
                                  seed=s, mask_seed=s)
                t2 = time.perf_counter()
                module.run(xb, samples=args.high, seed=s)
                t_high += time.perf_counter() - t2
                t_att += t2 - t1
                rr = module.attend(xb, low=args.low, high=args.high, mask=ablation_mask(mode, r, 1000 + s + b), seed=s)
                for key, res in (("", r), ("r_", rr)):
                    a, e = compare(res.output, high[s, b])
                    acc[key + "agree"].append(a)
                    acc[key + "err"].append(e)
                    acc[key + "work"].append(res.high_work_fraction)
                acc["total"].append(r.total_work_fraction)
        row = {"mode": mode, "fraction": fraction, "gate": gate, **{k: float(np.mean(v)) for k, v in acc.items()},
               "wall_attend_s": t_att, "wall_full_high_s": t_high}
        rows.append(row)
        print(f"  {mode:12s} f={fraction} gate={gate}: agree {row['agree']:.2f} err {row['err']:.3f} "
              f"work {row['work']:.3f} | random agree {row['r_agree']:.2f} err {row['r_err']:.3f} "
              f"work {row['r_work']:.3f} | wall {t_att / t_high:.2f}x", flush=True)
    return {"model": name, "compile_s": compile_s, "last_spatial": [last["name"], last["out_shape"]],
            "baseline": base, "rows": rows}


def markdown(report) -> str:
    a = report["args"]
    lines = ["# Computational attention on the benchmark conv nets (random weights)", "",
             f"Generated by `python benchmarks/attention_convnets.py` (batch {a['batch']}, {a['images']} synthetic "
             f"224x224 images, {a['seeds']} seeds, low n={a['low']}, high n={a['high']}, 2 threads; run time "
             f"{report['run_minutes']:.1f} min). Random weights: no accuracy, so `agree` is the top-1 agreement with "
             "the full high-n run of the same seed and `error` the relative logit error to it. `high work` = "
             "(high-n additions done + extra signal pass) / full high-n run; `total work` adds the low-n pass. "
             "`random` = the chosen mask re-drawn at random with the same budget. Wall-clock: whole `attend` "
             "call / `run(samples=high)`.", ""]
    for m in report["models"]:
        base = m["baseline"]
        lines += [f"## {m['model']}", "",
                  f"Last spatial PSB layer `{m['last_spatial'][0]}` {m['last_spatial'][1]}; full low-n run: "
                  f"agreement {100 * base['low_agreement']:.0f}%, error {base['low_rel_error']:.3f}. "
                  f"Compile {m['compile_s']:.0f} s.", "",
                  "| mode | fraction | gate | agree | error | high work | total work | random: agree | random: error "
                  "| random: high work | wall: attend / full high |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            lines.append(f"| {r['mode']} | {r['fraction']} | {r['gate'] if r['gate'] is not None else '-'} | "
                         f"{100 * r['agree']:.0f}% | {r['err']:.3f} | {100 * r['work']:.1f}% | {100 * r['total']:.1f}% | "
                         f"{100 * r['r_agree']:.0f}% | {r['r_err']:.3f} | {100 * r['r_work']:.1f}% | "
                         f"{r['wall_attend_s'] / r['wall_full_high_s']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--low", type=int, default=4)
    parser.add_argument("--high", type=int, default=16)
    parser.add_argument("--models", default="resnet18,mobilenetv2")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report = {"args": vars(args), "models": [run_model(name, args) for name in args.models.split(",")]}
    report["run_minutes"] = (time.perf_counter() - start) / 60
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "attention_convnets.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(os.path.join(args.out_dir, "attention_convnets.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
