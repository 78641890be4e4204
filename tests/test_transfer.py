"""Transfer models: loading backbone weights, clear errors, frozen means frozen, feature cache == no cache."""

from __future__ import annotations

import re
import urllib.error

import pytest
import torch
import torchvision

from ferlab.apps import cli
from ferlab.core.config import DataConfig, TrainConfig
from ferlab.core.errors import FerlabError
from ferlab.data.datasets import load_data
from ferlab.inference.model import run_batches
from ferlab.models.registry import create_model
from ferlab.training.features import FrozenMemo
from ferlab.training.fit import fit_model

from .conftest import make_tree


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory):
    """A full torchvision MobileNetV2 state dict (classifier keys included) with known random values."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("w") / "mnv2.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def vgg_features_file(tmp_path_factory):
    """Only the features.* keys, as ../shared/weights/vgg16_imagenet_features.pth has them."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("w") / "vgg_features.pth"
    sd = torchvision.models.vgg16(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in sd.items()}, path)
    return path


def test_backbone_weights_load_from_files(mobilenet_file, vgg_features_file):
    net = create_model("mobilenetv2-transfer", 4, 32, weights=str(mobilenet_file))
    want = torch.load(mobilenet_file, weights_only=True)
    for k, v in net.body.state_dict().items():
        torch.testing.assert_close(v, want[f"features.{k}"])
    net = create_model("vgg16-transfer", 4, 32, weights=str(vgg_features_file))
    want = torch.load(vgg_features_file, weights_only=True)
    torch.testing.assert_close(net.body[28].weight, want["features.28.weight"])


def test_wrong_weight_files_are_one_sentence(tmp_path, mobilenet_file):
    with pytest.raises(FerlabError, match=r"does not fit VGG16: \d+ missing and \d+ unexpected backbone keys"):
        create_model("vgg16-transfer", 4, 32, weights=str(mobilenet_file))
    (tmp_path / "junk.pth").write_text("hello")
    with pytest.raises(FerlabError, match=r"junk.pth is not a PyTorch state dict \("):
        create_model("vgg16-transfer", 4, 32, weights=str(tmp_path / "junk.pth"))
    sd = torchvision.models.mobilenet_v2(weights=None, width_mult=0.5).state_dict()
    torch.save(sd, tmp_path / "narrow.pth")
    with pytest.raises(
        FerlabError,
        match=r"does not fit MobileNetV2: features.0.0.weight has shape \(16, 3, 3, 3\), "
        r"expected \(32, 3, 3, 3\)\.",
    ):
        create_model("mobilenetv2-transfer", 4, 32, weights=str(tmp_path / "narrow.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(FerlabError, match="holds no 'features.\\*' keys: it is not a torchvision VGG16 state dict"):
        create_model("vgg16-transfer", 4, 32, weights=str(tmp_path / "other.pth"))
    with pytest.raises(FerlabError, match="Weights file .*missing.pth does not exist"):
        create_model("vgg16-transfer", 4, 32, weights=str(tmp_path / "missing.pth"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty torch cache: what a fresh machine without internet sees."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def refuse(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_offline_without_weights_names_both_ways_out(offline, tmp_path, capsys):
    with pytest.raises(FerlabError) as e:
        create_model("vgg16-transfer", 4, 32, weights="imagenet")
    assert str(e.value).startswith("ImageNet weights for VGG16 are not cached at ")
    assert "pass --weights PATH to a torchvision VGG16 state dict, or --weights none" in str(e.value)
    data = make_tree(tmp_path / "d", per_class=10)
    assert cli.main(["train", str(data), "--model", "vgg16-transfer", "--out", str(tmp_path / "o")]) == 2
    assert "ferlab: error: ImageNet weights for VGG16 are not cached" in capsys.readouterr().err
    assert not (tmp_path / "o").exists(), "no run folder for a run that cannot start"


def test_study_leaves_out_a_transfer_model_without_weights(offline, tmp_path, capsys):
    data = make_tree(tmp_path / "d", per_class=10)
    rc = cli.main(
        [
            "run",
            str(data),
            "--models",
            "regularized-cnn",
            "vgg16-transfer",
            "--out",
            str(tmp_path / "o"),
            "--image-size",
            "32",
            "--max-epochs",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "ferlab: warning: vgg16-transfer left out of this study: ImageNet weights" in capsys.readouterr().err
    (run,) = (tmp_path / "o").iterdir()
    assert (run / "test_accuracy_comparison.csv").read_text().count("\n") == 2  # header + regularized-cnn
    assert "vgg16-transfer" in (run / "run.json").read_text()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return load_data(DataConfig(data=str(make_tree(tmp_path_factory.mktemp("t") / "d", per_class=10)), image_size=32))


@pytest.mark.parametrize("name", ["vgg16-transfer", "mobilenetv2-transfer"])
def test_stage_one_leaves_the_frozen_base_unchanged(tiny_data, name):
    torch.manual_seed(0)
    net = create_model(name, 3, 32, weights="none")
    body = {k: v.clone() for k, v in net.body.state_dict().items()}  # batch-norm statistics included
    head = {k: v.clone() for k, v in net.head.state_dict().items()}
    fit_model(name, net, tiny_data, TrainConfig(max_epochs=2, fine_tune=False, progress=False, precision="32"))
    for k, v in net.body.state_dict().items():
        assert torch.equal(v, body[k]), k
    assert any(not torch.equal(v, head[k]) for k, v in net.head.state_dict().items())


@pytest.mark.parametrize("fine_tune", [False, True])
def test_feature_cache_trains_the_same_model_as_the_full_forward(tiny_data, fine_tune):
    """Both stages on one shared frozen pass == every stage running its frozen layers every step."""
    states, tables, logits = [], [], []
    for cache in (True, False):
        torch.manual_seed(0)
        net = create_model("vgg16-transfer", 3, 32, weights="none")
        result = fit_model(
            "vgg16-transfer",
            net,
            tiny_data,
            TrainConfig(max_epochs=2, fine_tune=fine_tune, progress=False, feature_cache=cache, precision="32"),
        )
        states.append(net.state_dict())
        tables.append([(e["stage"], e["train_acc"], e["val_acc"]) for e in result.epochs])
        logits.append(result.train_logits)
    assert tables[0] == tables[1] and len(tables[0]) == (4 if fine_tune else 2)
    # the training split's logits for the fair overfitting gap come from the cache, as a full forward gives them
    assert logits[1] is None
    torch.testing.assert_close(logits[0], run_batches(net, tiny_data.splits["train"].images), atol=1e-4, rtol=1e-4)
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], atol=2e-5, rtol=1e-4)


def test_frozen_outputs_are_computed_once_per_image_across_fits():
    """The folds of a cross-validation share each image's frozen-layer output: only unseen images run, and a
    change of weights or precision runs them again."""

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.seen = torch.nn.Conv2d(3, 4, 3), 0

        def forward(self, x):
            self.seen += len(x)
            return self.conv(x.float())

    memo, net, cpu = FrozenMemo(), Counting(), torch.device("cpu")
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    memo.outputs(net, images[:6], "32", cpu)
    assert net.seen == 6
    later = memo.outputs(net, torch.cat([images[3:], images[3:4]]), "32", cpu)  # 4 new images, one twice
    assert net.seen == 10 and later.shape == (8, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(later, net.conv(torch.cat([images[3:], images[3:4]]).float()))
    memo.outputs(net, images[:2], "bf16-mixed", cpu)
    assert net.seen == 12
    with torch.no_grad():
        net.conv.bias += 1
    assert torch.equal(memo.outputs(net, images[:1], "32", cpu), net.conv(images[:1].float()).detach())
    assert net.seen == 13


@pytest.mark.parametrize("layers,trained", [(1, {"28"}), (3, {"24", "26", "28"})])
def test_fine_tuning_unfreezes_only_the_last_layers(tiny_data, layers, trained):
    torch.manual_seed(0)
    net = create_model("vgg16-transfer", 3, 32, weights="none")
    before = {k: v.clone() for k, v in net.body.state_dict().items()}
    cfg = TrainConfig(max_epochs=3, patience=5, progress=False, fine_tune_layers=layers, fine_tune_lr=1e-2)
    result = fit_model("vgg16-transfer", net, tiny_data, cfg)
    assert {e["stage"] for e in result.epochs} == {1, 2}
    changed = {k.split(".")[0] for k, v in net.body.state_dict().items() if not torch.equal(v, before[k])}
    # VGG16's conv layers 11-13 (block 5) are features 24, 26 and 28; stage 2's best weights may be stage 1's
    # (then nothing changed), so check the best epoch's stage
    assert changed == (trained if result.epochs[result.best_epoch - 1]["stage"] == 2 else set())


def test_backbone_size_travels_in_the_checkpoint(tmp_path):
    from ferlab.data.images import Preprocess
    from ferlab.models.checkpoint import load_checkpoint, save_checkpoint
    from ferlab.models.summary import summarize

    torch.manual_seed(0)
    net = create_model("mobilenetv2-transfer", 3, 32, weights="none", backbone_size=64).eval()
    assert re.search(r"normalize\s+Normalize\s+\(None, 3, 64, 64\)", summarize(net, 32))
    save_checkpoint(tmp_path / "m.ckpt", net, "mobilenetv2-transfer", ["a", "b", "c"], Preprocess(image_size=32))
    again, card = load_checkpoint(tmp_path / "m.ckpt")
    assert card["model_args"]["backbone_size"] == 64
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(again(x), net(x))


def test_inference_batches_shrink_with_the_backbone_input():
    """CPU inference passes: 12 images of a 224x224 backbone (faster per image than 64 there), 64 otherwise."""
    from ferlab.inference.model import inference_batch as _inference_batch

    cpu, x = torch.device("cpu"), torch.zeros(2, 3, 100, 100, dtype=torch.uint8)
    vgg = create_model("vgg16-transfer", 6, 100, "none", 224)
    assert _inference_batch(vgg, x, cpu) == _inference_batch(vgg.part(None, vgg.cut(1)), x, cpu) == 12
    features = torch.zeros(2, 512, 14, 14)  # cached conv5_2 output: the rest runs on small maps
    assert _inference_batch(vgg.part(vgg.cut(1), None), features, cpu) == 64
    assert _inference_batch(create_model("regularized-cnn", 6, 100), x, cpu) == 64
    assert _inference_batch(vgg, x, torch.device("cuda")) == 64
