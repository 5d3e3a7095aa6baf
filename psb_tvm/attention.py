"""Computational attention (the paper's localized refinement): where to spend high-n work.

A cheap low-n pass gives the output of the last spatial PSB layer; its per-pixel softmax entropy
over channels marks where the network is unsure. Only there are the conv layers recomputed at
high n; elsewhere the low-n values are kept. Pure numpy: the masks are tiny next to the layers.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError

MODES = ("mean_entropy", "max_entropy", "random")


def entropy_map(features: np.ndarray) -> np.ndarray:
    """Per-pixel entropy (nats) of the softmax over channels of an NCHW tensor -> [N, H, W]."""
    z = features.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    return -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=1)


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


def select(entropy: np.ndarray, mode: str, fraction: float, dilation: int = 0, seed: int = 0) -> np.ndarray:
    """Mask [N, H, W]: ``mean_entropy`` = entropy > fraction * image mean; ``max_entropy`` =
    entropy > fraction * image max; ``random`` = as many random pixels per image as
    ``mean_entropy`` picks (the ablation). Then ``dilation`` steps of 3x3 dilation."""
    if mode not in MODES:
        raise ConfigError(f"unknown attention mode {mode!r}; expected one of {MODES}")
    if not np.isfinite(fraction) or fraction < 0:
        raise ConfigError(f"fraction must be a non-negative number, got {fraction!r}")
    if not isinstance(dilation, int) or dilation < 0:
        raise ConfigError(f"dilation must be a non-negative int, got {dilation!r}")
    if mode == "max_entropy":
        mask = entropy > fraction * entropy.max(axis=(1, 2), keepdims=True)
    else:
        mask = entropy > fraction * entropy.mean(axis=(1, 2), keepdims=True)
        if mode == "random":
            rng = np.random.default_rng(seed)
            counts = mask.reshape(len(mask), -1).sum(axis=1)
            mask = np.zeros_like(mask)
            for b, k in enumerate(counts):
                flat = mask[b].reshape(-1)
                flat[rng.choice(flat.size, size=k, replace=False)] = True
    return dilate(mask, dilation)


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
