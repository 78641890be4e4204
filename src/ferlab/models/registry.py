"""The model registry and its one factory; every model carries its own input normalization.

    >>> net = create_model("regularized-cnn", num_classes=6, image_size=100)
    >>> sum(p.numel() for p in net.parameters())
    4353862

A model is a :class:`Net`: ``normalize`` (uint8 RGB in, what the weights expect out), ``body`` (the
convolutional part) and ``head``. ``body.units`` marks where its fine-tunable layers start (a VGG16 conv
layer, a MobileNetV2 inverted-residual block): what transfer fine-tuning unfreezes from the end, and where
the frozen-feature cache cuts.
"""

from __future__ import annotations

import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ferlab.core.errors import FerlabError

if TYPE_CHECKING:  # torchvision is imported where a transfer model is built: it costs seconds to import
    import torchvision

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """uint8 [0, 255] (or float [0, 1]) RGB to ``(x / 255 - mean) / std``: the model owns its scaling.

    With ``size``, the image is first resized (bilinear) to ``size`` x ``size``: a pretrained backbone can run
    at a larger input than the data pipeline's, and a checkpoint still rebuilds exactly what it saw.
    With ``channels_last``, the output is laid out NHWC in memory, for a body whose weights are too.
    """

    def __init__(
        self,
        mean: tuple[float, ...] = (0.0, 0.0, 0.0),
        std: tuple[float, ...] = (1.0, 1.0, 1.0),
        size: int | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        self.mean, self.std, self.size, self.channels_last = tuple(mean), tuple(std), size, channels_last
        # folded into one multiply-add; not persistent, so state dicts hold only learned weights
        self.register_buffer("scale", 1 / (255 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer(
            "shift", -torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:  # cheapest on the uint8 input; every op after keeps the layout
            x = x.contiguous(memory_format=torch.channels_last)
        if x.dtype == torch.uint8:
            x = x.float()
        else:  # float input in [0, 1]
            x = x * 255
        if self.size and x.shape[-2:] != (self.size, self.size):
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return torch.addcmul(self.shift, x, self.scale)

    def extra_repr(self) -> str:
        return (
            f"mean={self.mean}, std={self.std}"
            + (f", size={self.size}" if self.size else "")
            + (", channels_last" if self.channels_last else "")
        )


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a mask 10x cheaper to draw on CPUs, where drawing one Bernoulli number per element
    was a quarter of regularized-cnn's training step: each random 64-bit word gives eight bytes, and an
    element is kept where its byte is at least ``p * 256`` (so ``p`` is rounded to a multiple of 1/256;
    0.25 and 0.5 are exact). Other devices use PyTorch's own kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        n = x.numel()
        # the full signed range: random_() alone never sets the top bit, which would drop every 8th element
        # with probability 1/2 whatever p is
        bits = torch.empty((n + 7) // 8, dtype=torch.int64).random_(-(2**63), None).view(torch.uint8)[:n]
        keep = bits >= round(self.p * 256)
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            b, c, h, w = x.shape  # the mask in x's memory order: elementwise ops stay one linear pass
            keep = keep.view(b, h, w, c).permute(0, 3, 1, 2)
        else:
            keep = keep.view(x.shape)
        return x * keep.to(x.dtype).mul_(1 / (1 - self.p))


class Body(nn.Sequential):
    """A sequential backbone that knows where its fine-tunable units start (``units``: indices into itself)."""

    def __init__(self, layers: list[nn.Module], units: list[int]):
        super().__init__(*layers)
        self.units = units


class Net(nn.Module):
    """``normalize`` -> ``body`` -> ``head``. With ``tta`` (test-time augmentation), eval-mode logits are the
    mean of the image's and its mirror image's: the model carries it, so every consumer gets the same."""

    def __init__(self, normalize: Normalize, body: Body, head: nn.Module, tta: bool = False):
        super().__init__()
        self.normalize, self.body, self.head, self.tta = normalize, body, head, tta
        self.arch: str | None = None  # emotion-transfer: the architecture of the model it started from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tta and not self.training:  # one pass over both: a third faster than two for one face
            image, mirror = self.single_pass(torch.cat([x, x.flip(-1)])).chunk(2)
            return (image + mirror) / 2
        return self.single_pass(x)

    def single_pass(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of ``x`` alone (no mirror image), whatever ``tta`` says."""
        return self.head(self.body(self.normalize(x)))

    def cut(self, trainable_units: int | None) -> int:
        """The body index where the last ``trainable_units`` units start (None: 0, all; 0: the body's end)."""
        if trainable_units is None:
            return 0
        if trainable_units == 0:
            return len(self.body)
        return self.body.units[max(0, len(self.body.units) - trainable_units)]

    def part(self, start: int | None, stop: int | None) -> nn.Sequential:
        """Body layers ``[start:stop]``; ``start=None`` puts ``normalize`` first, ``stop=None`` the head last."""
        first = [self.normalize] if start is None else []
        last = [self.head] if stop is None else []
        return nn.Sequential(*first, *list(self.body)[start or 0 : stop], *last)

    def split_at(self, trainable_units: int | None) -> tuple[nn.Sequential, nn.Sequential]:
        """(frozen prefix, trainable rest) with the last ``trainable_units`` body units trainable."""
        cut = self.cut(trainable_units)
        return self.part(None, cut), self.part(cut, None)


def channels_last(net: Net) -> Net:
    """``net`` with NHWC weights and an NHWC input from ``normalize`` (oneDNN's preferred layout on CPU)."""
    net.normalize.channels_last = True
    return net.to(memory_format=torch.channels_last)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., Net]
    about: str
    transfer: bool  # a pretrained backbone: frozen first, then fine-tuned
    study_label: str  # the original study's file name stem for its per-epoch training accuracy
    min_size: int  # the smallest input side (for transfer models: the backbone's input) its layers accept
    target_layer: str  # the module (a name in Net.named_modules()) whose activations explanations use


REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, about: str, min_size: int, target_layer: str, transfer: bool = False, study_label: str = ""):
    def deco(fn: Callable[..., Net]) -> Callable[..., Net]:
        REGISTRY[name] = ModelSpec(
            name, fn, about, transfer, study_label or name.replace("-", "_"), min_size, target_layer
        )
        return fn

    return deco


def create_model(
    name: str,
    num_classes: int,
    image_size: int = 100,
    weights: str | None = "none",
    backbone_size: int | None = None,
    tta: bool = False,
    arch: str | None = None,
) -> Net:
    """Build a registered model.

    Args:
        weights: transfer models' backbone: ``imagenet``, ``none`` or a torchvision state-dict path
            (emotion-transfer's weights come from its source model: see ``models.checkpoint.transplant``).
        backbone_size: transfer models resize their input to this side before the backbone (None or 0: as given).
        tta: average eval-mode logits over the image and its mirror image.
        arch: emotion-transfer's architecture, its source model's (one of :data:`EMOTION_SOURCES`).
    """
    if name not in REGISTRY:
        raise FerlabError(f"Unknown model '{name}'; choose one of: {', '.join(REGISTRY)}.")
    if num_classes < 2:
        raise FerlabError(f"A classifier needs at least 2 classes, got {num_classes}.")
    spec = REGISTRY[name]
    if spec.transfer:
        if name == EMOTION_TRANSFER:  # its backbone input is its source's side, not --backbone-size
            net = spec.build(num_classes, image_size, arch or EMOTION_SOURCES[0])
        elif backbone_size and backbone_size < 32:
            raise FerlabError(
                f"--backbone-size must be at least 32 pixels (or 0 for the image size), got {backbone_size}."
            )
        else:
            net = spec.build(num_classes, image_size, weights or "none")
        net.normalize.size = backbone_size if backbone_size and backbone_size != image_size else None
    else:
        net = spec.build(num_classes, image_size)
    net.tta = tta
    return net


@register(
    "baseline-cnn",
    "the original Model 1: two convs, flatten, dense 128 (no pooling, no dropout)",
    min_size=5,
    target_layer="body.3",
    study_label="model1",
)
def baseline_cnn(num_classes: int, image_size: int) -> Net:
    side = image_size - 4  # two 'valid' 3x3 convolutions
    # in-place activations: one large buffer less per layer and step
    body = Body([nn.Conv2d(3, 32, 3), nn.ReLU(inplace=True), nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True)], units=[0])
    head = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes))
    return Net(Normalize(), body, head)


@register(
    "regularized-cnn",
    "the original Model 2: Model 1 with max-pooling and dropout",
    min_size=10,
    target_layer="body.6",
    study_label="model2",
)
def regularized_cnn(num_classes: int, image_size: int) -> Net:
    side = ((image_size - 2) // 2 - 2) // 2
    # Max-pooling before ReLU is the same function as after it (both are monotonic) with the ReLU on a quarter
    # of the values; NHWC memory makes the CPU's max-pooling and convolutions about 2x faster here.
    body = Body(
        [
            nn.Conv2d(3, 32, 3),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            Dropout(0.25),
            nn.Conv2d(32, 64, 3),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            Dropout(0.25),
        ],
        units=[0, 4],
    )
    head = nn.Sequential(
        nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(), Dropout(0.5), nn.Linear(128, num_classes)
    )
    return channels_last(Net(Normalize(), body, head))


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _vgg_style(num_classes: int, widths: tuple[int, ...]) -> Net:
    layers: list[nn.Module] = []
    units, cin = [], 3
    for width in widths:
        units.append(len(layers))
        layers += [*_conv_bn(cin, width), *_conv_bn(width, width), nn.MaxPool2d(2)]
        cin = width
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(cin, num_classes))
    # NHWC: oneDNN's convolutions and batch norm are fastest in it on CPUs, in fp32 and bf16 alike
    return channels_last(Net(Normalize(), Body(layers, units), head))


@register(
    "vgg-small",
    "VGG-style CNN for 48-64 px faces: 4 blocks of two 3x3 conv-BN-ReLU and max-pooling (32-64-128-256 "
    "channels), global average pooling, dropout 0.3",
    min_size=16,
    target_layer="body.26",
)
def vgg_small(num_classes: int, image_size: int) -> Net:
    return _vgg_style(num_classes, (32, 64, 128, 256))


@register(
    "vgg-medium",
    "vgg-small 1.5x wider (48-96-192-384 channels): 2.2x the parameters and compute",
    min_size=16,
    target_layer="body.26",
)
def vgg_medium(num_classes: int, image_size: int) -> Net:
    return _vgg_style(num_classes, (48, 96, 192, 384))


def _transfer_head(channels: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 1024),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(1024, num_classes),
    )


def _load_backbone(features: nn.Module, weights: str, arch: str, enum: torchvision.models.WeightsEnum) -> None:
    """Fill ``features`` (torchvision's ``model.features``) from ImageNet, a file, or leave it random."""
    if weights == "none":
        return
    if weights == "imagenet":
        try:
            state = enum.get_state_dict(progress=True, check_hash=True)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            where = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
            raise FerlabError(
                f"ImageNet weights for {arch} are not cached at {where} and could not be downloaded "
                f"({e.__class__.__name__}); pass --weights PATH to a torchvision {arch} state dict, "
                "or --weights none to train from random weights."
            ) from None
        source = f"ImageNet ({enum})"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FerlabError(
                f"Weights file {path} does not exist; pass a torchvision {arch} state dict, imagenet or none."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle, zip and tensor errors all mean the same here
            raise FerlabError(f"Weights file {path} is not a PyTorch state dict ({e.__class__.__name__}).") from None
        source = str(path)
    if not isinstance(state, dict) or not any(str(k).startswith("features.") for k in state):
        raise FerlabError(
            f"Weights file {source} holds no 'features.*' keys: it is not a torchvision {arch} state dict."
        )
    own = features.state_dict()
    sub = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    missing, extra = sorted(set(own) - set(sub)), sorted(set(sub) - set(own))
    if missing or extra:
        raise FerlabError(
            f"Weights file {source} does not fit {arch}: "
            f"{len(missing)} missing and {len(extra)} unexpected backbone keys "
            f"(e.g. {(missing or extra)[0]})."
        )
    for k, v in sub.items():
        if not isinstance(v, torch.Tensor) or v.shape != own[k].shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise FerlabError(
                f"Weights file {source} does not fit {arch}: features.{k} has shape {got}, "
                f"expected {tuple(own[k].shape)}."
            )
    features.load_state_dict(sub)


def _transfer_net(
    features: nn.Sequential,
    units: list[int],
    channels: int,
    num_classes: int,
    weights: str,
    arch: str,
    enum: torchvision.models.WeightsEnum,
) -> Net:
    """A torchvision backbone (ImageNet normalization, frozen for stage 1) under the GAP + dense head."""
    _load_backbone(features, weights, arch, enum)
    for p in features.parameters():
        p.requires_grad_(False)
    body = Body(list(features), units=units)
    return Net(Normalize(IMAGENET_MEAN, IMAGENET_STD), body, _transfer_head(channels, num_classes))


@register(
    "vgg16-transfer",
    "ImageNet VGG16 conv base, global average pooling, dense 1024, dropout 0.5",
    min_size=32,
    target_layer="body.29",
    transfer=True,
    study_label="fine_tuned",
)
def vgg16_transfer(num_classes: int, image_size: int, weights: str) -> Net:
    import torchvision

    features = torchvision.models.vgg16(weights=None).features
    convs = [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]  # 13 units, the last with pool 5
    # NHWC: the frozen pass over the data is about 1.3x faster on CPU (oneDNN's preferred layout)
    return channels_last(
        _transfer_net(
            features, convs, 512, num_classes, weights, "VGG16", torchvision.models.VGG16_Weights.IMAGENET1K_V1
        )
    )


@register(
    "mobilenetv2-transfer",
    "ImageNet MobileNetV2 features, global average pooling, dense 1024, dropout 0.5",
    min_size=32,
    target_layer="body.18",
    transfer=True,
    study_label="mobilenetv2_fine_tuned",
)
def mobilenetv2_transfer(num_classes: int, image_size: int, weights: str) -> Net:
    import torchvision

    features = torchvision.models.mobilenet_v2(weights=None).features
    # 19 units: the stem, 17 inverted-residual blocks, the final 1x1 conv
    return _transfer_net(
        features,
        list(range(len(features))),
        1280,
        num_classes,
        weights,
        "MobileNetV2",
        torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1,
    )


EMOTION_TRANSFER = "emotion-transfer"
EMOTION_SOURCES = ("vgg-small", "vgg-medium")  # architectures emotion-transfer can start from


@register(
    EMOTION_TRANSFER,
    "a face-emotion model (shipped fer2013, or --init NAME|CHECKPOINT) with a new head for this data's classes "
    "(matching classes keep their rows): the head first, then the whole network at --fine-tune-lr",
    min_size=16,
    target_layer="body.26",
    transfer=True,
    study_label="emotion_transfer",
)
def emotion_transfer(num_classes: int, image_size: int, arch: str) -> Net:
    """The source's architecture (its weights come later: ``models.checkpoint.transplant``), body frozen for
    stage 1 as every transfer model's."""
    if arch not in EMOTION_SOURCES:
        raise FerlabError(
            f"emotion-transfer starts from a {' or '.join(EMOTION_SOURCES)} model, not a {arch}; pass --init a "
            "shipped model or a checkpoint of one of those."
        )
    net = REGISTRY[arch].build(num_classes, image_size)
    net.arch = arch
    for p in net.body.parameters():
        p.requires_grad_(False)
    return net


STUDY = ("baseline-cnn", "regularized-cnn", "vgg16-transfer", EMOTION_TRANSFER)
