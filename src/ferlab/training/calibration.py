"""Calibration: the temperature fitted on validation logits."""

from __future__ import annotations

import math

import matplotlib

from ferlab.core.stats import wilson
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
MIN_ERRORS = 20  # wrong validation answers below which the split is nearly separable and the fit is bounded


def sharpest_supported(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The lowest temperature (at most 1) whose mean confidence on these logits stays within what their accuracy
    supports: the lower end of its Wilson 95% interval. On a (nearly) separable validation split the NLL keeps
    falling as T goes to zero, and a model fitted there would say 0.9995 wherever it is; 60 right answers out of
    60 only show an accuracy of at least 0.94. Confidence falls as T rises, so a bisection on log T finds it."""
    right = int((logits.argmax(1) == labels).sum())
    ceiling = wilson(right, len(labels))[0]

    def confidence(t: float) -> float:
        return (logits.double() / t).softmax(1).max(1).values.mean().item()

    if confidence(1.0) > ceiling:
        return 1.0  # already over-confident unscaled: the bound never softens below T = 1's fit, it only limits
    lo, hi = math.log(0.05), 0.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if confidence(math.exp(mid)) > ceiling else (lo, mid)
    return round(math.exp(hi), 4)


def calibration(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """The card's calibration record: the temperature fitted on these (validation) logits, ECE and NLL before
    and after. On a nearly separable split (fewer than :data:`MIN_ERRORS` wrong answers) the fit never sharpens
    beyond :func:`sharpest_supported`; ``bounded`` says when that decided."""
    few = len(labels) < MIN_CALIBRATION
    errors = int((logits.argmax(1) != labels).sum())
    fitted = 1.0 if few else fit_temperature(logits, labels)
    # with enough wrong answers the likelihood itself says how sharp the model may be
    floor = 1.0 if few else sharpest_supported(logits, labels) if errors < MIN_ERRORS else 0.0
    bounded = fitted < floor
    t = max(fitted, floor)
    before, after = logits.softmax(1), (logits / t).softmax(1)
    method = "temperature scaling on the validation split"
    if bounded:
        method += (
            f", bounded: the likelihood's temperature {fitted:g} would make the model more confident than its "
            f"validation accuracy supports (mean confidence above the lower end of its 95% interval)"
        )
    return {
        "method": f"none: fewer than {MIN_CALIBRATION} validation images" if few else method,
        "bounded": bounded,
        "temperature": t,
        "val_ece_before": round(expected_calibration_error(before, labels), 4),
        "val_ece_after": round(expected_calibration_error(after, labels), 4),
        "val_nll_before": round(nn_functional.cross_entropy(logits, labels).item(), 4),
        "val_nll_after": round(nn_functional.cross_entropy(logits / t, labels).item(), 4),
    }
