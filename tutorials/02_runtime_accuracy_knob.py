"""Tutorial 2: the sample count n is an accuracy knob you turn at run time.

    python tutorials/02_runtime_accuracy_knob.py [--fast] [--out-dir DIR]

PSB writes each weight w as s * 2^k * (1 + B/n), B the ones among n binary samples of probability
p: an unbiased estimate whose spread shrinks as the number of samples n grows (as 1/n with the
default stratified samples, where B is floor or ceil of n p; as 1/sqrt(n) with
``PSBConfig(sampler="iid")``, the paper's B ~ Binomial(n, p)). One compiled module accepts every power
of two n <= n_max (64 by default) without recompiling. This tutorial shows, on the digits CNN:

1. accuracy and cost (the paper's additions) vs n;
2. per-layer n: ``run(x, samples={"layer": n, "default": n})``;
3. seeds: the same seed gives the same bits, another seed another draw;
4. Monte Carlo spread over draws with ``sample_stats``;
5. progressive (anytime) refinement with ``session().refine()``: going from n to 2n samples only
   the new half, and the result equals ``run(samples=2n)`` bit for bit;
6. early exit per image with ``session().run_until_confident``;
7. frozen modules: one draw baked in, n and seed fixed.

Nothing is written to disk (``--out-dir`` is accepted for symmetry with the other tutorials).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import psb_tvm
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split
from psb_tvm.demo import median_ms

BATCH = 50


def predict(module, x, **run_kwargs):
    """Logits of ``module`` over ``x``, run in chunks of the compiled batch size."""
    return np.concatenate([module.run(x[i:i + BATCH], **run_kwargs) for i in range(0, len(x), BATCH)])


def accuracy(logits, y):
    return float((logits.argmax(1) == y).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="fewer images, n values and draws")
    parser.add_argument("--out-dir", help="unused: this tutorial writes no files")
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

    x_train, _, x_test, y_test = load_digits_split()
    n_test = 150 if args.fast else len(x_test)
    x_test, y_test = x_test[:n_test], y_test[:n_test]
    ns = (1, 4, 16, 64) if args.fast else (1, 2, 4, 8, 16, 32, 64)
    draws = 4 if args.fast else 16

    # One compile; samples=16 and seed=0 are only the defaults of run().
    module = psb_tvm.compile(DIGITS_ONNX, samples=16, seed=0, input_shapes={"input": (BATCH, 1, 8, 8)},
                             calibration={"input": x_train[:256]})
    float_module = psb_tvm.compile(DIGITS_ONNX, input_shapes={"input": (BATCH, 1, 8, 8)},
                                   config=psb_tvm.PSBConfig(include=()))
    y_float = predict(float_module, x_test)
    print(f"digits CNN, {n_test} test images; PSB layers: {module.psb_layers}; n_max={module.metadata.n_max}")
    print(f"float accuracy: {100 * accuracy(y_float, y_test):.2f}%")

    # ------------------------------------------------------------------ 1. accuracy vs n
    # module.cost(samples) is the paper's cost measure: one addition per weight, sample and
    # output position. It grows linearly with n; the accuracy saturates.
    print("\n1. accuracy vs n (seed 0), relative output error vs float, cost")
    for n in ns:
        logits = predict(module, x_test, samples=n)
        err = np.linalg.norm(logits - y_float) / np.linalg.norm(y_float)
        adds = module.cost(samples=n)["additions"] / BATCH
        print(f"n={n:<3d} accuracy {100 * accuracy(logits, y_test):6.2f}%  rel. error {err:.4f}  "
              f"additions per image {adds / 1e6:7.2f} M")

    # ------------------------------------------------------------------ 2. per-layer n
    # Layers differ in size and sensitivity: spend samples where they matter. Keys are the ONNX
    # node names (module.psb_layers); "default" covers the layers not named.
    first, big = module.psb_layers[0], max(module.cost()["layers"], key=lambda r: r["additions_per_sample"])["name"]
    per_layer = {big: 4, "default": 16}
    logits = predict(module, x_test, samples=per_layer)
    share = module.cost(per_layer)["additions"] / module.cost(16)["additions"]
    print(f"\n2. per-layer n {per_layer} (the largest layer at 4): accuracy {100 * accuracy(logits, y_test):.2f}% "
          f"at {100 * share:.0f}% of the n=16 cost")
    per_layer = {first: 64, "default": 4}
    logits = predict(module, x_test, samples=per_layer)
    print(f"   per-layer n {per_layer}: accuracy {100 * accuracy(logits, y_test):.2f}%")

    # ------------------------------------------------------------------ 3. seeds
    # The seed chooses the draw of the samples; the same (n, seed) gives the same bits on every
    # run and every machine (the C++ runner and the aarch64 build included).
    x = np.ascontiguousarray(x_test[:BATCH])
    a, b, c = module.run(x, samples=4, seed=7), module.run(x, samples=4, seed=7), module.run(x, samples=4, seed=8)
    print(f"\n3. same seed, same bits: {a.tobytes() == b.tobytes()}; another seed differs: {a.tobytes() != c.tobytes()} "
          f"(max |diff| {np.abs(a - c).max():.3f})")

    # ------------------------------------------------------------------ 4. Monte Carlo spread
    # sample_stats runs `draws` independent draws (seeds seed..seed+draws-1): the mean logits are
    # a cheap ensemble, the std shows how noisy a single draw is at that n.
    print(f"\n4. Monte Carlo over {draws} draws (first batch)")
    for n in (1, 4, 16):
        stats = module.sample_stats(x, draws=draws, samples=n, seed=0)
        single = np.mean([accuracy(o, y_test[:BATCH]) for o in stats["outputs"]])
        print(f"n={n:<3d} mean logit std {stats['std'].mean():.4f}  single-draw accuracy {100 * single:.2f}%  "
              f"accuracy of the mean logits {100 * accuracy(stats['mean'], y_test[:BATCH]):.2f}%")

    # ------------------------------------------------------------------ 5. progressive refinement
    # A session starts at a small n and doubles it on request. Samples are nested (the samples
    # for 2n extend those for n), so refine() draws only the n new samples per weight and runs
    # one integer pass: an anytime classifier that can stop whenever the answer is good enough.
    print("\n5. progressive refinement of one batch")
    session = module.session(x, samples=1, seed=0)
    while True:
        n = session.samples[0]
        print(f"n={n:<3d} accuracy {100 * accuracy(session.output, y_test[:BATCH]):6.2f}%")
        if n >= module.metadata.n_max or (args.fast and n >= 16):
            break
        session.refine()
    same = session.output.tobytes() == module.run(x, samples=n, seed=0).tobytes()
    print(f"refined to n={n}: equals run(samples={n}) bit for bit: {same}")
    assert same

    # ------------------------------------------------------------------ 6. early exit
    # run_until_confident refines until the top-1 class is unchanged over `stable` levels and the
    # softmax gap between the two best classes is >= margin. The decision covers a whole batch,
    # so per-image early exit uses a batch-1 module: easy images stop at small n.
    single = psb_tvm.compile(DIGITS_ONNX, samples=1, input_shapes={"input": (1, 1, 8, 8)},
                             calibration={"input": x_train[:256]})
    n_images = 50 if args.fast else len(x_test)
    full = accuracy(predict(module, x_test[:n_images], samples=64), y_test[:n_images])
    print(f"\n6. early exit on {n_images} images, one at a time (fixed n=64: accuracy {100 * full:.2f}%)")
    for margin in (0.5, 0.9):
        used, correct = [], 0
        for i in range(n_images):
            s = single.session(x_test[i:i + 1], samples=1)
            out = s.run_until_confident(margin=margin, stable=2)
            used.append(s.samples[0])
            correct += int(out.argmax(1)[0] == y_test[i])
        values, counts = np.unique(used, return_counts=True)
        histogram = ", ".join(f"n={v}: {c}" for v, c in zip(values, counts))
        print(f"margin {margin}: early-exit accuracy {100 * correct / n_images:.2f}%, mean final n "
              f"{np.mean(used):.1f} (images stopping at {histogram})")

    # ------------------------------------------------------------------ 7. frozen
    # frozen=True samples once at compile time and bakes the counts in as constants: no sampling
    # at run time, but n and seed can no longer change. Its output equals the run-time module's
    # at the same (n, seed).
    frozen = psb_tvm.compile(DIGITS_ONNX, samples=8, seed=0, frozen=True, input_shapes={"input": (BATCH, 1, 8, 8)},
                             calibration={"input": x_train[:256]})
    same = frozen.run(x).tobytes() == module.run(x, samples=8, seed=0).tobytes()
    repeats = 10 if args.fast else 100
    t_frozen = median_ms(lambda: frozen.run(x), repeats)
    t_runtime = median_ms(lambda: module.run(x, samples=8), repeats)
    print(f"\n7. frozen n=8 equals run(samples=8, seed=0) bit for bit: {same}; "
          f"latency frozen {t_frozen:.2f} ms vs run-time n {t_runtime:.2f} ms")
    assert same
    try:
        frozen.run(x, samples=4)
    except psb_tvm.ConfigError as err:
        print(f"   frozen.run(samples=4) -> ConfigError: {err}")


if __name__ == "__main__":
    main()
