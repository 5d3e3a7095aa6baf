"""Per-layer error diagnosis: where does a compiled model lose accuracy, and is that the scheme's?

For every PSB layer (and at the outputs) the relative error against float is measured for
- ``compiled``: the compiled module (its ``probe`` function returns every PSB layer's output);
- ``scheme``: the same sampled weights ``w~`` with float activations (what sampling costs);
- ``activation``: float weights with the layer inputs rounded to their fixed point;
- ``emulation``: both at once, in float: the compiled integer kernels must agree with it up to
  float summation order, so ``kernel`` (compiled vs emulation) measures the rewrite and kernels.
The errors of a layer include everything upstream (each variant runs the whole network).
A layer is flagged when ``compiled > (1 + tolerance) * (scheme + activation) + floor``: an error
that neither sampling nor activation rounding explains. Saturation: how many layer inputs fall
outside the fixed-point range chosen at calibration (clipped by the kernel).
"""

from __future__ import annotations

import json
import math
import pathlib
from dataclasses import asdict, dataclass, field

import numpy as np

from . import numerics
from .build import build
from .compiler import lower_plan, plan
from .datasets import chunks, load_inputs
from .emulate import Emulator
from .errors import ConfigError
from .files import write_text
from .runtime import PSBModule

#: Emulated variants (``psb_tvm.emulate``): (sampled weights, rounded activations).
VARIANTS = {"float": (False, False), "scheme": (True, False), "activation": (False, True), "emulation": (True, True)}
#: Relative error below which no layer is flagged (float32 summation-order differences).
ERROR_FLOOR = 1e-4


@dataclass
class LayerDiagnosis:
    """Errors (relative L2 vs float, over all inputs) and saturation of one PSB layer."""

    name: str
    op: str
    samples: int
    act_dtype: str
    frac_bits: int
    calibrated_max: float  # the range calibration saw (|x| max)
    observed_max: float  # |x| max of the layer input on these inputs
    saturated: int  # inputs outside the fixed-point range (clipped)
    elements: int
    compiled: float
    scheme: float
    activation: float
    emulation: float
    kernel: float  # compiled vs emulation
    excess: bool = False

    @property
    def explained(self) -> float:
        return self.scheme + self.activation

    @property
    def saturated_fraction(self) -> float:
        return self.saturated / max(1, self.elements)


@dataclass
class Diagnosis:
    """The result of :func:`diagnose`."""

    layers: list
    output: dict  # compiled / scheme / activation / emulation / kernel at the model outputs
    samples: dict
    seed: int
    tolerance: float
    inputs: int
    config: dict
    first_excess: str | None = None  # the first flagged layer (or "output"), None when all is explained
    notes: list = field(default_factory=list)

    @property
    def saturated_layers(self) -> list:
        return [l.name for l in self.layers if l.saturated]

    def to_dict(self) -> dict:
        return {"samples": self.samples, "seed": self.seed, "tolerance": self.tolerance, "inputs": self.inputs,
                "config": self.config, "first_excess": self.first_excess, "output": self.output,
                "saturated_layers": self.saturated_layers, "notes": self.notes,
                "layers": [{**asdict(l), "explained": l.explained, "saturated_fraction": l.saturated_fraction}
                           for l in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def markdown(self) -> str:
        o = self.output
        lines = [f"# PSB error diagnosis ({self.inputs} inputs, seed {self.seed})", "",
                 "Relative L2 error vs float. scheme: sampled weights, float activations; act: float weights, "
                 "fixed-point activations; kernel: compiled vs the float emulation of both. "
                 f"Flag: compiled > {1 + self.tolerance:g} x (scheme + act).", "",
                 f"**Output**: compiled {o['compiled']:.4g}, scheme {o['scheme']:.4g}, act {o['activation']:.4g}, "
                 f"kernel {o['kernel']:.2g}" + (" **EXCESS**" if o["excess"] else ""), "",
                 "| # | layer | op | n | act | f | saturated | compiled | scheme | act | ratio | kernel | flag |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for i, l in enumerate(self.layers):
            ratio = l.compiled / l.explained if l.explained > 0 else float("nan")
            sat = f"{l.saturated} ({100 * l.saturated_fraction:.2g}%)" if l.saturated else "0"
            lines.append(f"| {i} | {l.name} | {l.op} | {l.samples} | {l.act_dtype} | {l.frac_bits} | {sat} | "
                         f"{l.compiled:.4g} | {l.scheme:.4g} | {l.activation:.4g} | {ratio:.2f} | {l.kernel:.2g} | "
                         f"{'EXCESS' if l.excess else ''} |")
        lines.append("")
        if self.first_excess:
            lines.append(f"First unexplained error: **{self.first_excess}**.")
        else:
            lines.append("Every layer's error is explained by sampling and activation rounding.")
        if self.saturated_layers:
            lines.append(f"Saturated inputs (outside the calibrated range) in: {', '.join(self.saturated_layers)}.")
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def plot(self, path) -> str | None:
        """Per-layer errors as a PNG (``None`` when matplotlib is missing)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        x = np.arange(len(self.layers))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(x) + 3), 4))
        for key, style in (("compiled", "o-"), ("scheme", "s--"), ("activation", "^:")):
            ax.plot(x, [max(getattr(l, key), 1e-7) for l in self.layers], style, label=key, ms=3)
        bad = [i for i, l in enumerate(self.layers) if l.excess]
        if bad:
            ax.plot(bad, [self.layers[i].compiled for i in bad], "rx", ms=9, label="excess")
        ax.set_yscale("log")
        ax.set_xlabel("PSB layer (graph order)")
        ax.set_ylabel("relative error vs float")
        ax.set_title("PSB error by layer")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return str(path)

    def write(self, out_dir, prefix: str = "diagnosis", plots: bool = True) -> dict:
        """Write ``<prefix>.json``, ``<prefix>.md`` and (``plots``) ``<prefix>.png`` into ``out_dir``."""
        out = pathlib.Path(out_dir)
        files = {"json": out / f"{prefix}.json", "markdown": out / f"{prefix}.md"}
        write_text(files["json"], self.to_json())
        write_text(files["markdown"], self.markdown())
        written = {k: str(v) for k, v in files.items()}
        if plots and self.plot(out / f"{prefix}.png"):
            written["plot"] = str(out / f"{prefix}.png")
        return written


class _Sums:
    """Running squared-error sums of one quantity against its reference."""

    def __init__(self):
        self.num, self.den = 0.0, 0.0

    def add(self, value, reference):
        v, r = np.asarray(value, np.float64), np.asarray(reference, np.float64)
        self.num += float(np.sum(np.square(v - r)))
        self.den += float(np.sum(np.square(r)))

    @property
    def rel(self) -> float:
        return math.sqrt(self.num / self.den) if self.den > 0 else (0.0 if self.num == 0 else math.inf)


def _rows(a: np.ndarray, valid: int, batch: int) -> np.ndarray:
    """The rows of the ``valid`` real samples of a chunk (dense layers fold the batch into rows)."""
    return a[: a.shape[0] // batch * valid]


def _excess(compiled: float, explained: float, tolerance: float) -> bool:
    return compiled > (1 + tolerance) * explained + ERROR_FLOOR


def diagnose(model, inputs, *, samples=16, seed: int = 0, input_shapes: dict | None = None, calibration=None,
             config=None, tolerance: float = 0.25, max_inputs: int | None = None, preprocess=None,
             progress: bool = True):
    """Compile ``model`` (an ONNX path / bytes / proto) for this host and explain its error per layer.

    ``inputs``: ``{input name: array [N, ...]}``, one array (single-input models), an ``.npz`` /
    ``.npy`` path or a folder (as ``psb_tvm.evaluate``, with its ``preprocess``); ``samples``: n,
    a per-layer map, or a list of these (one compile serves all: a list of diagnoses comes back);
    ``calibration`` / ``config`` / ``input_shapes`` as for ``psb_tvm.compile``; ``tolerance``: how
    far the compiled error may exceed ``scheme + activation`` before a layer is flagged.
    """
    from tqdm import tqdm

    if not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ConfigError(f"tolerance must be a number >= 0, got {tolerance!r}")
    several = isinstance(samples, (list, tuple))
    points = list(samples) if several else [samples]
    if not points:
        raise ConfigError("samples is an empty list")
    steps = tqdm(total=2 + len(points), desc="diagnose", disable=not progress, leave=False)
    p = plan(model, "llvm", seed, input_shapes, calibration, config)
    if not p.layers:
        raise ConfigError("the model has no PSB layer to diagnose (every linear layer stays float)")
    mod, metadata, tgt = lower_plan(p, points[0], seed)
    module = PSBModule(*build(mod, tgt, metadata=metadata))
    steps.update()
    data, _, _ = load_inputs(inputs, module.inputs, preprocess)
    if max_inputs is not None:
        data = {k: v[:max_inputs] for k, v in data.items()}
    seed = module._resolve_seed(seed)
    emulator = Emulator(p)
    steps.update()
    results = []
    for point in points:
        results.append(_diagnose(module, emulator, data, point, seed, tolerance))
        steps.update()
    steps.close()
    return results if several else results[0]


def _diagnose(module: PSBModule, emulator: Emulator, data: dict, samples, seed: int, tolerance: float) -> Diagnosis:
    p, metadata = emulator.plan, module.metadata
    per_layer = module.resolve_samples(samples)
    L = len(p.layers)
    compiled_bits = emulator.compiled_bits
    variants = {name: (per_layer if sampled else [None] * L, compiled_bits if rounded else [None] * L)
                for name, (sampled, rounded) in VARIANTS.items()}
    names = ("compiled", "scheme", "activation", "emulation")
    layer_sums = [{k: _Sums() for k in names + ("kernel",)} for _ in range(L)]
    out_sums = {k: _Sums() for k in names + ("kernel",)}
    saturated, elements, observed = [0] * L, [0] * L, [0.0] * L
    count = 0
    for chunk, valid in chunks(module, data):
        runs = {name: emulator.run(chunk, n, seed, bits) for name, (n, bits) in variants.items()}
        c_outs, c_layers = module.layer_outputs(*chunk, samples=samples, seed=seed)
        runs["compiled"] = (list(c_outs), None, c_layers)
        batch = len(chunk[0])

        def rows(a):
            return _rows(a, valid, batch)

        ref_outs, _, ref_layers = runs["float"]
        for key in names:
            for o, r in zip(runs[key][0], ref_outs):
                out_sums[key].add(rows(o), rows(r))
            for l in range(L):
                layer_sums[l][key].add(rows(runs[key][2][l].reshape(ref_layers[l].shape)), rows(ref_layers[l]))
        for o, r in zip(c_outs, runs["emulation"][0]):
            out_sums["kernel"].add(rows(o), rows(r))
        for l, layer in enumerate(p.layers):
            layer_sums[l]["kernel"].add(rows(c_layers[l].reshape(ref_layers[l].shape)), rows(runs["emulation"][2][l]))
            x = rows(runs["emulation"][1][l])
            saturated[l] += int(np.count_nonzero(numerics.saturated(x, layer.spec.frac_bits, layer.spec.act_bits,
                                                                     layer.spec.act_signed)))
            elements[l] += x.size
            observed[l] = max(observed[l], float(np.max(np.abs(x))) if x.size else 0.0)
        count += valid

    info = {l["name"]: l for l in module.layers}
    layers = []
    for l, layer in enumerate(p.layers):
        s = layer_sums[l]
        d = LayerDiagnosis(name=layer.name, op=layer.spec.kind, samples=per_layer[l], act_dtype=layer.spec.act_dtype,
                           frac_bits=layer.spec.frac_bits, calibrated_max=float(info[layer.name]["act_max_abs"]),
                           observed_max=observed[l], saturated=saturated[l], elements=elements[l],
                           compiled=s["compiled"].rel, scheme=s["scheme"].rel, activation=s["activation"].rel,
                           emulation=s["emulation"].rel, kernel=s["kernel"].rel)
        d.excess = _excess(d.compiled, d.explained, tolerance)
        layers.append(d)
    output = {k: v.rel for k, v in out_sums.items()}
    output["excess"] = _excess(output["compiled"], output["scheme"] + output["activation"], tolerance)
    first = next((l.name for l in layers if l.excess), "output" if output["excess"] else None)
    notes = []
    if metadata.calibration.startswith("fallback"):
        notes.append("no calibration data: activation ranges come from synthetic inputs")
    if output["excess"] and not any(l.excess for l in layers) and output["kernel"] <= 1e-3:
        notes.append("only the output exceeds scheme + activation: every PSB layer is explained and the kernels match "
                     "their emulation, so the two errors compound in the layers after the last PSB layer (e.g. a "
                     "saturating softmax), they are not a defect")
    if any(l.kernel > 1e-3 for l in layers):
        worst = max(layers, key=lambda l: l.kernel)
        notes.append(f"the compiled kernels differ from their float emulation by up to {worst.kernel:.2g} "
                     f"(layer {worst.name}): more than float rounding")
    return Diagnosis(layers=layers, output=output, samples=dict(zip(module.psb_layers, per_layer)), seed=seed,
                     tolerance=float(tolerance), inputs=count, config=p.config.to_dict(), first_excess=first,
                     notes=notes)
