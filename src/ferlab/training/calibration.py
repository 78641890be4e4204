"""Calibration: the temperature fitted on validation logits."""

from __future__ import annotations

import math

import matplotlib

from ferlab.reporting.metrics import expected_calibration_error

matplotlib.use("Agg")
import torch  # noqa: E402
from torch.nn import functional as nn_functional  # noqa: E402


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the negative log-likelihood of ``softmax(logits / T)`` (Guo et al. 2017);
    a golden-section search on log T over [0.05, 20], which is enough for one smooth parameter."""
    if not len(labels):
        return 1.0
    logits = logits.double()

    def nll(log_t: float) -> float:
        return nn_functional.cross_entropy(logits / math.exp(log_t), labels).item()

    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return round(math.exp((lo + hi) / 2), 4)


MIN_CALIBRATION = 50  # validation images below which a fitted temperature is noise, not calibration


def calibration(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """The card's calibration record: the temperature fitted on these (validation) logits, ECE and NLL before
    and after."""
    few = len(labels) < MIN_CALIBRATION
    t = 1.0 if few else fit_temperature(logits, labels)
    before, after = logits.softmax(1), (logits / t).softmax(1)
    return {
        "method": f"none: fewer than {MIN_CALIBRATION} validation images"
        if few
        else "temperature scaling on the validation split",
        "temperature": t,
        "val_ece_before": round(expected_calibration_error(before, labels), 4),
        "val_ece_after": round(expected_calibration_error(after, labels), 4),
        "val_nll_before": round(nn_functional.cross_entropy(logits, labels).item(), 4),
        "val_nll_after": round(nn_functional.cross_entropy(logits / t, labels).item(), 4),
    }
