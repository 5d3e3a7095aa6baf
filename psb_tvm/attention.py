"""Computational attention (the paper's localized refinement): where to spend high-n work.

A cheap low-n pass runs everywhere; a signal computed from it marks where the network is unsure,
and only there are the PSB layers recomputed at high n (elsewhere the low-n values are kept).
Pure numpy: the masks are tiny next to the layers. Signals (``mode``):

Per-pixel, on the output grid of the last spatial PSB layer (mask ``[N, H, W]``):

- ``mean_entropy``: softmax entropy over channels above ``fraction`` x the image mean;
- ``max_entropy``: entropy above ``fraction`` x the image max;
- ``random``: as many random pixels per image as ``mean_entropy`` picks (the ablation);
- ``variance``: Monte-Carlo disagreement ``sum_c |a - b|`` between the low-n pass and a second,
  independent low-n draw (the PSB uncertainty), above ``fraction`` x the image mean. The second
  draw is an extra pass and is counted as work;
- ``magnitude``: activation magnitude ``sum_c |a|`` above ``fraction`` x the image mean (free: the
  Monte-Carlo spread of a PSB layer grows with its activations).

Per-image, on the classifier output ``[N, K]`` of the low-n pass (whole images refined or skipped):

- ``margin_gate``: every position of the images whose low-n top-1 softmax margin
  ``p(top1) - p(top2)`` is below ``fraction`` (a threshold in [0, 1]);
- ``random_gate``: as many random images per batch as ``margin_gate`` picks (the ablation).

``gate=t`` combines both: a per-pixel mask, kept only in the images whose margin is below ``t``.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError

PIXEL_MODES = ("mean_entropy", "max_entropy", "random", "variance", "magnitude")
IMAGE_MODES = ("margin_gate", "random_gate")
MODES = PIXEL_MODES + IMAGE_MODES
#: Offset of the second low-n draw of ``variance`` from the run's seed (an independent stream).
VARIANCE_SEED_OFFSET = 0x9E3779B9


def entropy_map(features: np.ndarray) -> np.ndarray:
    """Per-pixel entropy (nats) of the softmax over channels of an NCHW tensor -> [N, H, W]."""
    z = features.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=1)


def disagreement_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel L1 distance over channels between two draws of an NCHW tensor -> [N, H, W]."""
    return np.abs(a.astype(np.float64) - b.astype(np.float64)).sum(axis=1)


def magnitude_map(features: np.ndarray) -> np.ndarray:
    """Per-pixel L1 norm over channels of an NCHW tensor -> [N, H, W]."""
    return np.abs(features.astype(np.float64)).sum(axis=1)


def margin(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 softmax probability of each row of ``[N, K]`` logits -> [N] in [0, 1]."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ConfigError(f"an image gate needs classifier logits [N, K>=2], got shape {logits.shape}")
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    top = np.sort(p, axis=1)
    return top[:, -1] - top[:, -2]


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation with a 3x3 square, ``steps`` times."""
    mask = mask.astype(bool)
    for _ in range(steps):
        padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
        grown = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                grown |= padded[:, dy:dy + mask.shape[1], dx:dx + mask.shape[2]]
        mask = grown
    return mask


def check(mode: str, fraction, dilation, gate=None) -> None:
    """Validate the attention parameters (raises ``ConfigError``)."""
    if mode not in MODES:
        raise ConfigError(f"unknown attention mode {mode!r}; expected one of {MODES}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)) \
            or not np.isfinite(fraction) or fraction < 0:
        raise ConfigError(f"fraction must be a non-negative number, got {fraction!r}")
    if isinstance(dilation, bool) or not isinstance(dilation, (int, np.integer)) or dilation < 0:
        raise ConfigError(f"dilation must be a non-negative int, got {dilation!r}")
    if gate is not None and (isinstance(gate, bool) or not isinstance(gate, (int, float, np.integer, np.floating))
                             or not np.isfinite(gate) or gate < 0):
        raise ConfigError(f"gate must be None or a non-negative margin threshold, got {gate!r}")


def random_like(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """A random mask with as many pixels per image as ``mask`` [N, H, W] (the ablation)."""
    rng = np.random.default_rng(seed)
    counts = mask.reshape(len(mask), -1).sum(axis=1)
    out = np.zeros(mask.shape, bool)
    for b, k in enumerate(counts):
        flat = out[b].reshape(-1)
        flat[rng.choice(flat.size, size=int(k), replace=False)] = True
    return out


def random_images_like(gate: np.ndarray, seed: int = 0) -> np.ndarray:
    """A random image gate [N] with as many images as ``gate`` (the ablation)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(gate.shape, bool)
    out[rng.choice(gate.size, size=int(gate.sum()), replace=False)] = True
    return out


def select(score: np.ndarray, mode: str, fraction: float, dilation: int = 0, seed: int = 0) -> np.ndarray:
    """Per-pixel mask [N, H, W] from a score map [N, H, W] (entropy, disagreement or magnitude):
    ``mean_entropy`` / ``variance`` / ``magnitude`` = score > fraction * image mean;
    ``max_entropy`` = score > fraction * image max; ``random`` = as many random pixels per image
    as the mean rule picks (the ablation). Then ``dilation`` steps of 3x3 dilation."""
    check(mode, fraction, dilation)
    if mode in IMAGE_MODES:
        raise ConfigError(f"mode {mode!r} selects images, not pixels: use image_gate()")
    if mode == "max_entropy":
        mask = score > fraction * score.max(axis=(1, 2), keepdims=True)
    else:
        mask = score > fraction * score.mean(axis=(1, 2), keepdims=True)
        if mode == "random":
            mask = random_like(mask, seed)
    return dilate(mask, dilation)


def image_gate(margins: np.ndarray, mode: str, threshold: float, seed: int = 0) -> np.ndarray:
    """Image gate [N]: ``margin_gate`` = margin < threshold; ``random_gate`` = as many random images."""
    if mode not in IMAGE_MODES:
        raise ConfigError(f"image_gate takes a mode in {IMAGE_MODES}, got {mode!r}")
    check(mode, threshold, 0)
    gate = np.asarray(margins) < threshold
    return random_images_like(gate, seed) if mode == "random_gate" else gate


def resize_nearest(mask: np.ndarray, shape: tuple) -> np.ndarray:
    """Nearest-neighbour resize of [N, H, W] to [N, h, w] (each output pixel takes its source cell)."""
    N, H, W = mask.shape
    h, w = shape
    ys = (np.arange(h) * H) // h
    xs = (np.arange(w) * W) // w
    return mask[:, ys][:, :, xs]


def positions(layer_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(pos [P, 3], slot, m) for the masked kernel from a [N, h, w] (conv) or [M] (dense) mask."""
    if layer_mask.ndim == 1:
        idx = np.flatnonzero(layer_mask)
        pos = np.zeros((layer_mask.size, 3), np.int32)
        pos[: idx.size, 0] = idx
    else:
        idx3 = np.argwhere(layer_mask)
        pos = np.zeros((layer_mask.size, 3), np.int32)
        pos[: len(idx3)] = idx3
        idx = idx3
    slot = np.full(layer_mask.shape, -1, np.int32)
    slot[layer_mask] = np.arange(len(idx), dtype=np.int32)
    return pos, slot, int(len(idx))
