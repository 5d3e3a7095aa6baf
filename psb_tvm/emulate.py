"""Float emulation of a compile plan's PSB layers, for any n, seed and activation width per layer.

One build of ``passes.SimulatePSBLayers`` serves every variant: the weights (float or the represented
sampled weights ``w~``) and each layer's fixed point ``(2^f, lo, hi)`` are run-time arguments. With
the compiled module's draw and widths it reproduces the compiled integer kernels up to float
summation order (``psb_tvm.diagnose`` checks this), so it can score allocations of n and
activation width without compiling each one (``psb_tvm.allocate`` given an ONNX model).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from . import numerics
from .build import build
from .calibration import choose_width
from .compiler import Plan
from .passes import SimulatePSBLayers
from .passes.simulate_psb_layers import emulation_weight_shape
from .target import host_target

#: ``(2^f, lo, hi, q)`` of a layer input left in float: q = 0 selects the unrounded value.
FLOAT_ROW = (1.0, -3.0e38, 3.0e38, 0.0)


class Emulator:
    """``run(chunk, samples, seed, bits)``: outputs, layer inputs and layer outputs in float."""

    def __init__(self, p: Plan):
        self.plan = p
        self.layers = p.layers
        cfg = p.config
        # frac bits of every layer input at each width, chosen exactly as compile chooses them
        self.frac_bits = [{b: choose_width(st, b, cfg.act_range, cfg.act_percentile, cfg.act_headroom,
                                           cfg.act_auto_error)[1] for b in (8, 16)} for st in p.stats]
        self.signed = [st.signed for st in p.stats]
        lib = build(SimulatePSBLayers(p.layers)(p.imported.mod), host_target())[0]
        self._vm = relax.VirtualMachine(lib, tvm.cpu())
        self._weights = {}

    @property
    def compiled_bits(self) -> list:
        """The activation width of every layer in the plan (what ``compile`` builds)."""
        return [l.spec.act_bits for l in self.layers]

    def weights(self, l: int, n: int | None, seed: int = 0):
        """Layer ``l``'s weight argument: float (``n=None``) or ``w~`` of the draw ``(n, seed)``."""
        key = (l, n, seed if n is not None else None)
        if key not in self._weights:
            layer = self.layers[l]
            w = self.plan.sites[layer.site_index].weight
            if n is not None:
                w = numerics.weight_values(layer.enc, numerics.integer_weights(layer.enc, n, seed, layer.site_index,
                                                                            self.plan.config.sampler), n)
            w = np.asarray(w, np.float32)
            if layer.spec.kind == "dense":
                w = np.ascontiguousarray(w.T)
            assert w.shape == emulation_weight_shape(layer)
            self._weights[key] = tvm.runtime.tensor(w, tvm.cpu())
        return self._weights[key]

    def act_rows(self, bits: list) -> np.ndarray:
        """``[L, 4]`` float32: per layer ``None`` (float) or a width (8 / 16) at its calibrated scale."""
        rows = []
        for l, b in enumerate(bits):
            if b is None:
                rows.append(FLOAT_ROW)
                continue
            f = self.frac_bits[l][b]
            lo, hi = numerics.act_range(b, self.signed[l])
            rows.append((2.0 ** f, lo, hi, 1.0))
        return np.asarray(rows, np.float32)

    def run(self, chunk: list, samples: list, seed: int, bits: list) -> tuple[list, list, list]:
        """One chunk (arrays in input order, the compiled batch): ``(outputs, layer inputs, layer
        outputs)``. ``samples[l]``: n or None (float weights); ``bits[l]``: 8, 16 or None."""
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu()) for a in chunk]
        args.append(tvm.runtime.tensor(self.act_rows(bits), tvm.cpu()))
        args += [self.weights(l, n, seed) for l, n in enumerate(samples)]
        res = list(self._vm["main"](*args))
        head = res[0]
        outs = [head.numpy()] if hasattr(head, "numpy") else [o.numpy() for o in head]
        return outs, [r.numpy() for r in res[1::2]], [r.numpy() for r in res[2::2]]
