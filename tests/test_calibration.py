"""Temperature scaling that cannot collapse: a (nearly) separable validation split never sharpens a model beyond
what its accuracy supports."""

from __future__ import annotations

import torch

from ferlab.core.stats import wilson
from ferlab.reporting.metrics import expected_calibration_error
from ferlab.training.calibration import calibration, fit_temperature


def confidence(logits: torch.Tensor, t: float) -> float:
    return (logits / t).softmax(1).max(1).values.mean().item()


def test_a_separable_validation_split_does_not_drive_the_temperature_to_zero():
    """60 validation images, all right with a margin: the likelihood alone wants T = 0.05 (0.9999 on
    everything); the bound keeps the mean confidence at the lower end of 60/60's interval, 0.940."""
    torch.manual_seed(0)
    labels = torch.arange(60) % 3
    logits = torch.nn.functional.one_hot(labels, 3).float() * 2 + torch.rand(60, 3) * 0.5
    assert fit_temperature(logits, labels) < 0.06
    c = calibration(logits, labels)
    assert c["bounded"] is True and "bounded" in c["method"]
    assert 0.05 < c["temperature"] < 1.0
    assert abs(confidence(logits, c["temperature"]) - wilson(60, 60)[0]) < 1e-3


def test_an_overconfident_model_is_softened_as_before():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2000,))
    logits = (torch.nn.functional.one_hot(labels, 4).float() * 1.5 + torch.randn(2000, 4)) * 4
    c = calibration(logits, labels)
    assert c["bounded"] is False and c["temperature"] == fit_temperature(logits, labels) > 2


def test_an_underconfident_model_is_still_sharpened():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2000,))
    logits = (torch.nn.functional.one_hot(labels, 4).float() * 1.5 + torch.randn(2000, 4)) / 3
    c = calibration(logits, labels)
    assert c["bounded"] is False  # hundreds of wrong answers: the likelihood's temperature stands
    assert c["temperature"] == fit_temperature(logits, labels) < 0.5  # sharpened
    ece = expected_calibration_error((logits / c["temperature"]).softmax(1), labels)
    assert ece < expected_calibration_error(logits.softmax(1), labels) / 3
