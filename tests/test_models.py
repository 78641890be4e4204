"""Every registry model: output shape, finite values, gradients, exact parameter counts, summary table."""

from __future__ import annotations

import pytest
import torch

from ferlab.errors import FerlabError
from ferlab.models import REGISTRY, create_model
from ferlab.summary import param_counts, summarize

from .conftest import run_cli

# (image size for the fast checks, classes)
FAST_SIZE = {"baseline-cnn": 24, "regularized-cnn": 24, "vgg16-transfer": 32, "mobilenetv2-transfer": 32}


def test_registry_covers_the_study():
    assert {"baseline-cnn", "regularized-cnn", "vgg16-transfer", "mobilenetv2-transfer"} <= set(REGISTRY)
    assert set(FAST_SIZE) == set(REGISTRY), "add every new model to FAST_SIZE"


@pytest.mark.parametrize("name", list(REGISTRY))
def test_forward_backward(name):
    torch.manual_seed(0)
    size = FAST_SIZE[name]
    net = create_model(name, num_classes=5, image_size=size)
    for p in net.parameters():  # every parameter, frozen backbones included, must be reachable
        p.requires_grad_(True)
    net.train()
    x = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8)
    out = net(x)
    assert out.shape == (3, 5)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"
    assert all(p.grad.abs().sum() > 0 for p in net.parameters() if p.dim() > 1)


@pytest.mark.parametrize(
    "name,total,trainable",
    [
        ("baseline-cnn", 75_517_766, 75_517_766),
        ("regularized-cnn", 4_353_862, 4_353_862),
        ("vgg16-transfer", 15_246_150, 531_462),
        ("mobilenetv2-transfer", 3_541_766, 1_317_894),
    ],
)
def test_exact_parameter_counts(name, total, trainable):
    net = create_model(name, num_classes=6, image_size=100)
    assert param_counts(net) == (total, trainable)


def test_vgg16_base_is_the_imagenet_conv_base():
    net = create_model("vgg16-transfer", 6, 100)
    assert sum(p.numel() for p in net.body.parameters()) == 14_714_688


def test_uint8_and_float_inputs_agree():
    net = create_model("regularized-cnn", 3, 32).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(net(x), net(x.float() / 255))


def test_unknown_model_and_one_class_are_clear_errors():
    with pytest.raises(FerlabError, match="Unknown model 'resnet'; choose one of: baseline-cnn"):
        create_model("resnet", 6)
    with pytest.raises(FerlabError, match="at least 2 classes, got 1"):
        create_model("baseline-cnn", 1)


def test_summary_table_matches_keras_numbers():
    text = summarize(create_model("baseline-cnn", 6, 100), 100, "baseline-cnn")
    assert "head.1     Linear     (None, 128)          75,497,600" in text
    assert "(None, 64, 96, 96)" in text
    assert text.endswith(
        "Total params: 75,517,766 (288.08 MB)\nTrainable params: 75,517,766 (288.08 MB)\n"
        "Non-trainable params: 0 (0.00 MB)"
    )


def test_summary_cli_shows_trainable_split_of_transfer_model():
    r = run_cli("summary", "vgg16-transfer")
    assert r.returncode == 0, r.stderr
    assert "Total params: 15,246,150 (58.16 MB)" in r.stdout
    assert "Trainable params: 531,462 (2.03 MB)" in r.stdout
    assert "Non-trainable params: 14,714,688 (56.13 MB)" in r.stdout
    r = run_cli("summary", "regularized-cnn")
    assert "Total params: 4,353,862 (16.61 MB)" in r.stdout
