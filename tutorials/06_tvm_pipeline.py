"""Tutorial 6: the PSB rewrite inside your own TVM pipeline.

    python tutorials/06_tvm_pipeline.py [--fast] [--out-dir DIR]

``psb_tvm.compile`` is a declared pipeline of TVM passes (``psb_tvm.pipeline``), and every PSB
transform is a ``tvm.transform`` module pass (``psb_tvm.passes``). This script builds the same
module by hand, the way a TVM user composes passes:

1. import the ONNX model with TVM's own frontend (``relax.frontend.onnx.from_onnx``);
2. normalise it in a hand-written ``tvm.transform.Sequential`` (TVM's passes plus psb_tvm's
   import passes);
3. plan on that module (``psb_tvm.plan``: layer selection, calibration, weight encoding: the
   decisions, not a pass) and rewrite it with ``pipeline.rewrite_passes`` (``RewriteToPSB``, then
   ``HandOffInt8Activations``, which passes integer activations between int8-preset convs, and
   ``FuseResidualAdd``), under a PassContext whose instrument records every pass that runs;
4. build with the registered pipeline ``relax.get_pipeline("psb_cpu", target=...)`` and run the
   Relax VM directly: ``main(x, samples: Shape[L], seed: Shape[1])``.

The result computes the same integers as ``psb_tvm.compile``: outputs bit-identical at every n.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import tvm
import tvm.relax.frontend.onnx  # noqa: F401 - registers TVM's ONNX frontend
from tvm import relax

import psb_tvm
from psb_tvm import pipeline
from psb_tvm.data.digits import DIGITS_ONNX, load_digits_split


@tvm.instrument.pass_instrument
class RecordPasses:
    """A PassContext instrument: the names of the passes that ran, in order."""

    def __init__(self):
        self.names = []

    def run_before_pass(self, _mod, info):
        self.names.append(info.name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="fewer images")
    parser.add_argument("--out-dir", help="unused: this tutorial writes no files")
    args = parser.parse_args(argv)
    batch = 10 if args.fast else 50
    x_train, _, x_test, y_test = load_digits_split()
    x, y = x_test[:batch], y_test[:batch]

    # 1. TVM's own ONNX import, with static shapes.
    mod = relax.frontend.onnx.from_onnx(onnx.load(DIGITS_ONNX), shape_dict={"input": [batch, 1, 8, 8]})

    # 2. Your normalisation: any TVM passes, plus psb_tvm's import clean-up (batch-norm folding,
    #    Clip as Relax ops) so that convs, matmuls and their activations are recognised.
    mod = tvm.transform.Sequential([relax.transform.FoldConstant(), *pipeline.import_passes()])(mod)

    # 3. Decisions on this module (the layers are positional: conv2d_0, ...), then the rewrite.
    plan = psb_tvm.plan(mod, calibration={"input": x_train[:200]})
    print("PSB layers:", ", ".join(f"{l.name} ({l.spec.kind}, {l.spec.act_bits}-bit activations)" for l in plan.layers))
    record = RecordPasses()
    target = plan.target  # "llvm" resolved to this host (mcpu, cores), as compile does
    with tvm.transform.PassContext(opt_level=3, instruments=[record]):
        psb_mod = tvm.transform.Sequential(pipeline.rewrite_passes(plan.layers))(mod)
        print("functions after the rewrite:", ", ".join(sorted(gv.name_hint for gv, f in psb_mod.functions.items()
                                                                 if isinstance(f, relax.Function))))
        # 4. psb_tvm's registered CPU build pipeline (legalize, schedules, checks, lowering).
        ex = tvm.compile(psb_mod, target=target,
                         relax_pipeline=relax.get_pipeline("psb_cpu", target=target, n_max=plan.config.n_max))
    shown = [n for n in record.names if n in ("RewriteToPSB", "HandOffInt8Activations", "FuseResidualAdd", "psb_cpu",
                                              "AssertSampleBounds", "ApplyDefaultSchedule")]
    print("passes seen by the instrument (some):", " -> ".join(dict.fromkeys(shown)))

    vm = relax.VirtualMachine(ex, tvm.cpu())
    L = len(plan.layers)
    reference = psb_tvm.compile(DIGITS_ONNX, input_shapes={"input": (batch, 1, 8, 8)},
                                calibration={"input": x_train[:200]})
    for n in (4, 16) if args.fast else (1, 4, 16, 64):
        out = vm["main"](tvm.runtime.tensor(x), tvm.runtime.ShapeTuple([n] * L), tvm.runtime.ShapeTuple([0])).numpy()
        same = np.array_equal(out, reference.run(x, samples=n, seed=0))
        print(f"n={n}: accuracy {100 * np.mean(out.argmax(1) == y):.1f}%, "
              f"bit-identical to psb_tvm.compile: {same}")


if __name__ == "__main__":
    main()
