"""Tutorial 4: tune the kernels with MetaSchedule, then compile with the tuning database.

    python tutorials/04_tuning.py [--fast] [--trials N] [--out-dir DIR]

``psb_tvm.tune(model, target, work_dir, trials, ...)`` searches schedules (MetaSchedule's
evolutionary search guided by an XGBoost cost model) for the kernels ``compile`` builds: the PSB
layer kernels and the float glue between them. It first measures and stores every kernel's
default schedule, so the database's best is never slower than the default. ``trials`` counts the
measured candidates in ``work_dir`` over all calls: calling again with the same work_dir resumes
and only runs the remainder. ``compile(..., tuning_db=work_dir)`` replays the best schedules;
pass it the same model arguments (input shapes, samples, calibration, config) as ``tune``.

Schedules change speed only: the tuned module computes the same integers, so its outputs are
bit-identical to the default module's at every n and seed (checked below).

``--fast`` uses ``trials=0``: only the default schedules are measured and stored (the search
itself takes minutes even for a handful of trials on a small machine); the full run uses 64.
The database goes to ``--out-dir`` (default: a temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile

import numpy as np

import psb_tvm
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split
from psb_tvm.demo import median_ms

BATCH = 16


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="trials=0 (default schedules only), fewer timing runs")
    parser.add_argument("--trials", type=int, help="measured candidates in total (default: 0 with --fast, else 64)")
    parser.add_argument("--out-dir", help="where the tuning database goes (default: a temporary folder)")
    args = parser.parse_args(argv)
    # Kernels are timed with this many threads and must run with the same count.
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    threads = int(os.environ["TVM_NUM_THREADS"])
    trials = args.trials if args.trials is not None else (0 if args.fast else 64)

    with tempfile.TemporaryDirectory(prefix="psb_tutorial04_") as tmp:
        out = pathlib.Path(args.out_dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        run(args, out / "tuning", trials, threads)


def run(args, work_dir: pathlib.Path, trials: int, threads: int):
    x_train, _, x_test, _ = load_digits_split()
    # The model arguments: the same for tune and compile (they define the kernels' shapes).
    model_args = dict(samples=8, input_shapes={"input": (BATCH, 1, 8, 8)}, calibration={"input": x_train[:256]})

    # ------------------------------------------------------------------ 1. tune
    print(f"tuning the digits CNN (batch {BATCH}) with {trials} trials and {threads} threads into {work_dir} ...")
    result = psb_tvm.tune(DIGITS_ONNX, target="llvm", work_dir=str(work_dir), trials=trials,
                          num_threads=threads, progress=False, **model_args)
    print(f"tuned in {result.seconds:.1f} s: {result.trials_run} trials run now, {result.trials_total} in the database")
    print(result.table())  # per kernel: default vs best measured time
    print("database files:", sorted(p.name for p in work_dir.iterdir() if p.is_file()))

    # Tuning resumes: the same call again finds the budget spent and measures nothing new.
    again = psb_tvm.tune(DIGITS_ONNX, target="llvm", work_dir=str(work_dir), trials=trials,
                         num_threads=threads, progress=False, **model_args)
    print(f"second tune() with the same work_dir: {again.trials_run} new trials ({again.trials_total} in total)")

    # ------------------------------------------------------------------ 2. compile with the database
    default = psb_tvm.compile(DIGITS_ONNX, **model_args)
    tuned = psb_tvm.compile(DIGITS_ONNX, tuning_db=str(work_dir), **model_args)
    print(f"\ncompile(tuning_db=...): schedules {tuned.metadata.schedules['tuned']} tuned, "
          f"{tuned.metadata.schedules['default']} default; tuned kernels "
          f"{tuned.metadata.schedules['tuned_kernels']}")

    # ------------------------------------------------------------------ 3. same outputs, bit for bit
    x = np.ascontiguousarray(x_test[:BATCH])
    checks = [(n, seed) for n in (1, 8, 64) for seed in (0, 5)]
    identical = all(tuned.run(x, samples=n, seed=seed).tobytes() == default.run(x, samples=n, seed=seed).tobytes()
                    for n, seed in checks)
    print(f"tuned outputs identical to default outputs at (n, seed) in {checks}: {identical}")
    assert identical

    # ------------------------------------------------------------------ 4. latency
    repeats = 20 if args.fast else 200
    for n in ((8,) if args.fast else (1, 8, 64)):
        t_default = median_ms(lambda: default.run(x, samples=n), repeats)
        t_tuned = median_ms(lambda: tuned.run(x, samples=n), repeats)
        print(f"latency n={n}: default {t_default:.3f} ms, tuned {t_tuned:.3f} ms "
              f"({t_default / t_tuned:.2f}x) over {repeats} runs, {threads} threads")


if __name__ == "__main__":
    main()
