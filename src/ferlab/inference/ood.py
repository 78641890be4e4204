"""Saying when an input is unlike a model's training data.

    >>> stats = fit(train_crops, val_crops, val_probs)        # doctest: +SKIP  (at training; kept in the card)
    >>> flags(stats, crops, probs)                            # doctest: +SKIP
    ['', 'unlike the training faces (distance 3.1, threshold 1.4)', 'blank image (no contrast)']

Three checks on what the model actually saw (the crop, after the card's preprocessing), none of which needs
the model's internals, so PyTorch and ONNX models flag alike:

* **blank**: an image with (almost) no contrast, such as an all-black frame;
* **face space**: the distance of the crop from the training crops' principal components ("eigenfaces" of
  24x24 grayscale, each crop normalised to zero mean and unit variance); the threshold is the 99th
  percentile of the validation crops' distances, so about 1 in 100 real validation faces is flagged;
* **low confidence**: the calibrated top probability below the validation set's 5th percentile.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

SIDE = 24
BLANK_STD = 2.0  # grey levels: below this an image holds nothing to classify
DISTANCE_QUANTILE = 0.99
CONFIDENCE_QUANTILE = 0.05


def vectors(crops: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(N x 576 normalised 24x24 grayscale vectors, per-crop standard deviation in grey levels)."""
    out = np.empty((len(crops), SIDE * SIDE), np.float32)
    stds = np.empty(len(crops), np.float32)
    for i, c in enumerate(crops):
        g = np.asarray(Image.fromarray(c).convert("L").resize((SIDE, SIDE), Image.Resampling.BILINEAR), np.float32)
        g = g.reshape(-1)
        stds[i] = g.std()
        out[i] = (g - g.mean()) / max(float(stds[i]), 1e-3)
    return out, stds


def _distance(v: np.ndarray, mean: np.ndarray, comps: np.ndarray) -> np.ndarray:
    d = v - mean
    resid = d - (d @ comps.T) @ comps
    return np.sqrt((resid**2).mean(1))


def fit(
    train_crops: Sequence[np.ndarray],
    val_crops: Sequence[np.ndarray],
    val_probs: torch.Tensor,
    components: int = 32,
    max_train: int = 4000,
    seed: int = 0,
) -> dict:
    """The statistics :func:`flags` needs, from the training crops and the validation crops and probabilities."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(train_crops))[:max_train]
    v, stds = vectors([train_crops[i] for i in idx])
    v = v[stds >= BLANK_STD]
    mean = v.mean(0)
    _, _, vt = np.linalg.svd(v - mean, full_matrices=False)
    comps = vt[: min(components, len(vt))]
    val_v, val_std = vectors(val_crops)
    dist = _distance(val_v[val_std >= BLANK_STD], mean, comps)
    top = val_probs.max(1).values.numpy() if len(val_probs) else np.ones(1)
    return {
        "method": f"face-space distance ({len(comps)} components of {SIDE}x{SIDE} grayscale), calibrated confidence",
        "mean": torch.from_numpy(mean).half(),
        "components": torch.from_numpy(np.ascontiguousarray(comps)).half(),
        "distance_threshold": float(np.quantile(dist, DISTANCE_QUANTILE)) if len(dist) else float("inf"),
        "confidence_threshold": float(np.quantile(top, CONFIDENCE_QUANTILE)),
    }


def flags(stats: dict | None, crops: Sequence[np.ndarray], probs: torch.Tensor) -> list[str]:
    """Per crop: why it is unlike the training data, or "" when it is not. Without ``stats`` (a checkpoint
    from before these were recorded) only blank images are flagged."""
    if not len(crops):
        return []
    v, stds = vectors(crops)
    out = ["blank image (no contrast)" if s < BLANK_STD else "" for s in stds]
    if not stats:
        return out
    mean = stats["mean"].float().numpy()
    comps = stats["components"].float().numpy()
    dist = _distance(v, mean, comps)
    top = probs.max(1).values.tolist()
    for i in range(len(out)):
        if out[i]:
            continue
        if dist[i] > stats["distance_threshold"]:
            out[i] = f"unlike the training faces (distance {dist[i]:.2f}, threshold {stats['distance_threshold']:.2f})"
        elif top[i] < stats["confidence_threshold"]:
            out[i] = f"low confidence ({top[i]:.2f}, below {stats['confidence_threshold']:.2f})"
    return out
