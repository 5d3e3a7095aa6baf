"""The ``psb-tvm`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

ACCURACY_KNOB = (
    "PSB represents each weight as s*2^k*(1+B/n) with B ~ Binomial(n, p): the sample count n "
    "(a power of two) is the accuracy knob. More samples = closer to float and more work."
)


def _samples_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_demo(args) -> int:
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):  # fail before minutes of compiling, not after
        raise FileNotFoundError(f"cannot write {args.out}: directory {out_dir} does not exist")
    from .demo import digits_study, format_table, median_latency

    study = digits_study(samples=args.samples, batch=args.batch, seed=args.seed, progress=not args.json)
    rows = study["rows"]
    keep = args.export_samples if args.export_samples in study["modules"] else max(study["modules"])
    module = study["modules"][keep]
    x = study["x_test"][: args.batch]
    latency = {"float_ms": median_latency(study["float_module"], x), f"psb_n{keep}_ms": median_latency(module, x)}
    module.export_library(args.out)
    if args.json:
        print(json.dumps({"rows": rows, "untuned_latency": latency, "exported": args.out, "exported_samples": keep}))
        return 0
    print("\nDigits CNN (scikit-learn digits test split, 450 images), PSB vs float, untuned TVM:\n")
    print(format_table(rows))
    print(f"\nUntuned latency, batch {args.batch}: float {latency['float_ms']:.3f} ms, "
          f"PSB n={keep} {latency[f'psb_n{keep}_ms']:.3f} ms")
    print(f"\n{module.report()}\n\nWrote {args.out} (n={keep}); load it with psb_tvm.load({args.out!r}).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psb-tvm", description=f"Compile ONNX models to PSB networks with TVM. {ACCURACY_KNOB}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile the bundled digits CNN at several n, print accuracy vs float, write the .so")
    demo.add_argument("--samples", type=_samples_list, default=[1, 2, 4, 8, 16, 32], help="sample counts to evaluate (default 1,2,4,8,16,32)")
    demo.add_argument("--batch", type=int, default=50, help="compiled batch size (default 50)")
    demo.add_argument("--seed", type=int, default=0, help="sample stream seed (default 0)")
    demo.add_argument("--out", default="digits_psb.so", help="where to write the compiled module (default digits_psb.so)")
    demo.add_argument("--export-samples", type=int, default=16, help="which n to export (default 16)")
    demo.add_argument("--json", action="store_true", help="machine-readable output")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    from .errors import PSBError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (PSBError, FileNotFoundError) as err:
        print(f"psb-tvm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
