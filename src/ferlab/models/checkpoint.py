"""Checkpoints are model cards: everything needed to rebuild a model and its preprocessing.

    >>> net, card = load_checkpoint("runs/.../regularized-cnn/model.ckpt")          # doctest: +SKIP
    >>> card["classes"], card["preprocess"]["face_crop"]                            # doctest: +SKIP

Only plain Python values and tensors are stored, so loading uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ferlab.core.errors import FerlabError
from ferlab.core.files import atomic
from ferlab.core.names import same_class
from ferlab.core.version import __version__
from ferlab.data.images import Preprocess
from ferlab.models.registry import REGISTRY, Net, create_model

FORMAT = "ferlab-checkpoint"
VERSION = 1


def save_checkpoint(path: Path, net: Net, model: str, classes: list[str], pre: Preprocess, **card: Any) -> None:
    """Write atomically; ``card`` adds facts such as the training data summary and test metrics."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "ferlab_version": __version__,
        "model": model,
        "model_args": {
            "num_classes": len(classes),
            "image_size": pre.image_size,
            "backbone_size": net.normalize.size,
            "tta": net.tta,
            **({"arch": net.arch} if net.arch else {}),
        },
        "classes": list(classes),
        "preprocess": dataclasses.asdict(pre),
        "normalize": {"mean": list(net.normalize.mean), "std": list(net.normalize.std), "input": "uint8 RGB"},
        **card,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
    }
    with atomic(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path) -> tuple[Net, dict[str, Any]]:
    """Rebuild the model (eval mode, CPU) and return it with its card (everything but the weights)."""
    path = Path(path)
    if not path.is_file():
        raise FerlabError(f"Checkpoint {path} does not exist.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zips, pickles and foreign objects all land here
        raise FerlabError(
            f"{path} is not a ferlab checkpoint or is corrupted ({e.__class__.__name__}); "
            "pass the model.ckpt from a ferlab run folder."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FerlabError(
            f"{path} is a PyTorch file but not a ferlab checkpoint; pass the model.ckpt from a ferlab run folder."
        )
    if payload.get("version", 0) > VERSION:
        raise FerlabError(f"{path} was written by a newer ferlab ({payload.get('ferlab_version')}); upgrade ferlab.")
    if payload["model"] not in REGISTRY:
        raise FerlabError(f"{path} holds model '{payload['model']}', which this ferlab does not know.")
    net = create_model(payload["model"], weights="none", **payload["model_args"])
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError:
        raise FerlabError(f"{path} is corrupted: its weights do not fit a {payload['model']}.") from None
    net.eval()
    card = {k: v for k, v in payload.items() if k != "state_dict"}
    card["preprocess_obj"] = Preprocess(**card["preprocess"])
    return net, card


def transplant(net: Net, source: Net, source_classes: list[str], classes: list[str]) -> list[str]:
    """Start ``net`` from ``source`` (the same architecture): every weight but the last layer's, and that
    layer's rows for the classes both know (matched through the synonyms: anger = angry). Returns those classes;
    the other rows keep their fresh initialisation."""
    own, src = net.state_dict(), source.state_dict()
    last = [name for name, m in net.head.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    row_keys = {f"head.{last}.weight", f"head.{last}.bias"}
    for key, value in src.items():
        if key in row_keys:
            continue
        if key not in own or own[key].shape != value.shape:
            raise FerlabError(f"The source model's weight {key} does not fit this {net.arch or 'model'}.")
        own[key] = value.clone()
    copied = []
    for i, cls in enumerate(classes):
        j = next((j for j, c in enumerate(source_classes) if same_class(c, cls)), None)
        if j is None:
            continue
        copied.append(cls)
        for key in row_keys:
            own[key][i] = src[key][j]
    net.load_state_dict(own)
    return copied
