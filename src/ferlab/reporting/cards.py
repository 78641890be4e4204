"""Model cards as people read them: ``ferlab info`` and ``ferlab models``.

ferlab info fer2013
ferlab models
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ferlab.inference.model import PRETRAINED, Model, load_model, shipped_models
from ferlab.models.registry import REGISTRY

FER2013_LICENSE = (
    "trained on FER2013 (ICML 2013 challenge, Kaggle): research, non-commercial data; the weights inherit those terms"
)


def public(card: dict, paths: bool = True) -> dict[str, Any]:
    """The card without tensors (digests, face-space components) and internal objects: what people and JSON
    consumers see. Non-finite numbers become None (JSON has none); ``paths=False`` (a server) keeps only the
    last component of any path in it."""

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if not isinstance(x, torch.Tensor) and not k.endswith("_obj")}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v if paths else _no_path(v)

    return clean(card)


def _no_path(v: Any) -> Any:
    """A string that is a path (absolute, or from home or a parent folder) as its last component: a server does
    not tell strangers where its files live."""
    if isinstance(v, str) and (Path(v).is_absolute() or v.startswith(("~", ".."))):
        return Path(v).name
    return v


def crop_rule(pre: dict) -> str:
    """The card's face-crop policy in words: a model trained on face crops crops photos (``auto``) and takes
    images like its training crops whole."""
    if pre.get("face_crop", "off") == "off" and pre.get("faces") == "crops":
        side = 2 * max(pre.get("source_side") or 0, pre.get("image_size") or 0)
        return f"auto for images over {side} px (trained on face crops), off for smaller ones"
    return str(pre.get("face_crop", "off"))


def summary(model: Model, paths: bool = True) -> dict[str, Any]:
    """The facts a user needs before trusting a model's output (``paths=False``: without where files live)."""
    card = model.card
    pre = card.get("preprocess", {})
    training = card.get("training", {})
    data = card.get("data", {}).get("description")
    return {
        "name": model.label,
        "model": card.get("model"),
        "runtime": model.runtime.kind,
        "classes": list(card["classes"]),
        "input": f"{pre.get('image_size')}x{pre.get('image_size')} uint8 RGB"
        + (" (grayscale replicated to 3 channels)" if pre.get("grayscale") else ""),
        "face_crop": pre.get("face_crop"),
        "face_crop_rule": crop_rule(pre),
        "training_images": pre.get("faces") or "unknown",
        "face_margin": pre.get("face_margin"),
        "face_detector": pre.get("detector", "haar"),
        "test_time_augmentation": bool(card.get("model_args", {}).get("tta")),
        "data": data if paths else _no_path(data),
        "split": card.get("data", {}).get("split_method"),
        "val_acc": training.get("val_acc"),
        "test_metrics": card.get("test_metrics"),
        "calibration": card.get("calibration"),
        "precision": training.get("precision"),
        "license": card.get("license"),
        "ferlab_version": card.get("ferlab_version"),
    }


def describe(model: Model) -> str:
    """A readable card: the summary, then the whole card as JSON."""
    facts = summary(model)
    facts["face_crop"] = facts.pop("face_crop_rule")  # the policy in words, not the card's raw "off"
    facts = {k: facts[k] for k in summary(model) if k in facts}
    lines = [f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in facts.items()]
    return "\n".join(lines) + "\n\nfull card:\n" + json.dumps(public(model.card), indent=1, default=str)


def models_table() -> str:
    lines = ["architectures (ferlab train DATA --model NAME):"]
    width = max(len(n) for n in REGISTRY)
    for name, spec in REGISTRY.items():
        lines.append(f"  {name.ljust(width)}  {spec.about}")
    lines.append("shipped models (ferlab predict --checkpoint NAME, ferlab.analyze(..., model=NAME)):")
    shipped = shipped_models()
    if not shipped:
        lines.append("  none in this install")
    for name in shipped:
        m = load_model(name)
        val = m.card.get("training", {}).get("val_acc")
        lines.append(
            f"  {name}  {m.card['model']}, {len(m.classes)} classes ({', '.join(m.classes)}), "
            f"validation accuracy {val:.3f}"
            if val is not None
            else f"  {name}  {m.card['model']}"
        )
    missing = [n for n in PRETRAINED if n not in shipped]
    if missing:
        lines.append(f"  (not installed: {', '.join(missing)})")
    return "\n".join(lines)
