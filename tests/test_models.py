"""Every registry model: output shape, finite values, gradients, exact parameter counts, summary table."""

from __future__ import annotations

import pytest
import torch

from ferlab.core.errors import FerlabError
from ferlab.models.registry import REGISTRY, create_model
from ferlab.models.summary import param_counts, summarize

from .conftest import cli

# (image size for the fast checks, classes)
FAST_SIZE = {
    "baseline-cnn": 24,
    "regularized-cnn": 24,
    "vgg16-transfer": 32,
    "mobilenetv2-transfer": 32,
    "vgg-small": 16,
    "vgg-medium": 16,
    "emotion-transfer": 16,
}


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
        ("vgg-small", 1_174_758, 1_174_758),
        ("vgg-medium", 2_639_958, 2_639_958),
        ("emotion-transfer", 1_174_758, 1_542),  # vgg-small's, the head alone trainable in stage 1
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
    r = cli("summary", "vgg16-transfer")
    assert r.returncode == 0, r.stderr
    assert "Total params: 15,246,150 (58.16 MB)" in r.stdout
    assert "Trainable params: 531,462 (2.03 MB)" in r.stdout
    assert "Non-trainable params: 14,714,688 (56.13 MB)" in r.stdout
    r = cli("summary", "regularized-cnn")
    assert "Total params: 4,353,862 (16.61 MB)" in r.stdout


def test_regularized_cnn_pools_before_relu_as_the_same_function():
    """Pool-then-ReLU in NHWC must equal the textbook ReLU-then-pool in NCHW, outputs and gradients."""
    from torch import nn

    torch.manual_seed(0)
    net = create_model("regularized-cnn", 6, 40).eval()  # eval: dropout off, so both sides are deterministic
    ref = nn.Sequential(
        net.body[0], nn.ReLU(), nn.MaxPool2d(2), net.body[4], nn.ReLU(), nn.MaxPool2d(2), *net.head
    ).eval()
    x = torch.randn(4, 3, 40, 40)
    mine = net.head(net.body(x.contiguous(memory_format=torch.channels_last)))
    theirs = ref(x)
    torch.testing.assert_close(mine, theirs)
    (g_mine,) = torch.autograd.grad(mine.square().sum(), net.body[0].weight)
    (g_ref,) = torch.autograd.grad(theirs.square().sum(), net.body[0].weight)
    torch.testing.assert_close(g_mine, g_ref)
    assert net.body[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
def test_dropout_keeps_the_right_share_and_scales(channels_last):
    from ferlab.models.registry import Dropout

    torch.manual_seed(0)
    x = torch.rand(16, 32, 40, 40) + 1  # no zeros of its own
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    drop = Dropout(0.25).train()
    torch.manual_seed(1)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005  # 819,200 draws: 0.005 is > 10 standard errors
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    # each channel and position is dropped independently: no stripes from a mis-laid mask
    per_channel = kept.float().mean(dim=(0, 2, 3))
    assert per_channel.min() > 0.72 and per_channel.max() < 0.78
    torch.manual_seed(1)
    assert torch.equal(drop(x), y), "the mask comes from torch's seeded generator"
    x.requires_grad_(True)
    drop(x).sum().backward()
    assert x.grad.unique().tolist() == [0.0, pytest.approx(1 / 0.75)]
    assert torch.equal(drop.eval()(x), x)
