"""Metrics: accuracy with its Wilson 95% interval, per-class precision/recall/F1, confusion matrix,
calibration (temperature scaling, expected calibration error, reliability plot), and ``ferlab evaluate``.

>>> m = metrics(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), ["a", "b"])
>>> m["accuracy"], m["n"]
(0.6666666666666666, 3)

    ferlab evaluate runs/x/regularized-cnn/model.ckpt faces/ --class-map contempt=disgust --drop-classes neutral
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as nn_functional  # noqa: E402
from torchmetrics.functional.classification import (  # noqa: E402
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from ferlab.data import check_drop, decode_many, scan, to_tensor  # noqa: E402
from ferlab.errors import FerlabError  # noqa: E402
from ferlab.files import SYNONYMS, save_figure, write_csv  # noqa: E402
from ferlab.inference import Model, load_model  # noqa: E402
from ferlab.stats import wilson  # noqa: E402


def metrics(preds: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    k = len(classes)
    n, correct = len(labels), int((preds == labels).sum())
    low, high = wilson(correct, n)
    kw = {"num_classes": k, "average": "none", "zero_division": 0}
    p, r, f1 = (
        fn(preds, labels, **kw).tolist() for fn in (multiclass_precision, multiclass_recall, multiclass_f1_score)
    )
    support = torch.bincount(labels, minlength=k).tolist()
    present = [i for i in range(k) if support[i] > 0]  # macro-F1 over the classes the test set holds
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "ci95": [low, high],
        "macro_f1": sum(f1[i] for i in present) / len(present) if present else 0.0,
        "per_class": [
            {"class": c, "precision": p[i], "recall": r[i], "f1": f1[i], "support": support[i]}
            for i, c in enumerate(classes)
        ],
        "confusion": multiclass_confusion_matrix(preds, labels, k).tolist(),
    }


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins."""
    if not len(labels):
        return 0.0
    conf, pred = probs.max(1)
    right = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.float().mean().item() * abs(conf[inside].mean().item() - right[inside].mean().item())
    return ece


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


def plot_reliability(probs: torch.Tensor, labels: torch.Tensor, title: str, path: Path, bins: int = 10) -> None:
    """Accuracy against confidence per confidence bin, with each bin's share of the images."""
    conf, pred = probs.max(1)
    right = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    centres, accs, shares = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            centres.append(conf[inside].mean().item())
            accs.append(right[inside].mean().item())
            shares.append(inside.float().mean().item())
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect calibration")
    ax.plot(centres, accs, marker="o", label="this model")
    for c, a, s in zip(centres, accs, shares):
        ax.annotate(f"{100 * s:.0f}%", (c, a), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusion(conf: list[list[int]], classes: list[str], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(0.7 * len(classes) + 2.4, 0.6 * len(classes) + 2))
    t = torch.tensor(conf, dtype=torch.float)
    rates = t / t.sum(1, keepdim=True).clamp(min=1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                f"{int(t[i, j])}",
                ha="center",
                va="center",
                color="white" if rates[i, j] > 0.5 else "black",
                fontsize=10,
            )
    ax.set_xticks(range(len(classes)), classes, rotation=35, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


def write_metrics(m: dict, classes: list[str], out: Path, title: str) -> None:
    """metrics.json, per_class.csv, confusion_matrix.csv and .png into ``out``."""
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(m, indent=1))
    os.replace(tmp, out / "metrics.json")
    write_csv(
        out / "per_class.csv",
        [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()} for row in m["per_class"]],
        ["class", "precision", "recall", "f1", "support"],
    )
    write_csv(
        out / "confusion_matrix.csv",
        [{"true \\ predicted": c, **dict(zip(classes, row))} for c, row in zip(classes, m["confusion"])],
        ["true \\ predicted", *classes],
    )
    plot_confusion(
        m["confusion"],
        classes,
        f"{title}: test accuracy {m['accuracy']:.3f} (n={m['n']})",
        out / "confusion_matrix.png",
    )


def score_and_record(
    probs: torch.Tensor,
    labels: torch.Tensor,
    files: list[str],
    classes: list[str],
    out: Path,
    title: str,
    **facts: object,
) -> dict:
    """Metrics of predicted ``probs`` written into ``out``: metrics.json (with ``facts``), per-class and confusion
    files, a reliability plot and predictions.csv; the one path for a run's test split and ``ferlab evaluate``."""
    conf, preds = probs.max(1)
    m = metrics(preds, labels, classes)
    m["ece"] = round(expected_calibration_error(probs, labels), 4)
    m.update(facts)
    write_metrics(m, classes, out, title)
    plot_reliability(probs, labels, f"{title}: reliability (ECE {m['ece']:.3f}, n={m['n']})", out / "reliability.png")
    write_csv(
        out / "predictions.csv",
        [
            {"file": f, "true": classes[t], "predicted": classes[p], "confidence": round(float(c), 6)}
            for f, t, p, c in zip(files, labels.tolist(), preds.tolist(), conf)
        ],
        ["file", "true", "predicted", "confidence"],
    )
    return m


def parse_class_map(text: str | None) -> dict[str, str]:
    """``a=b,c=d`` -> {"a": "b", "c": "d"}."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        if item.count("=") != 1 or not all(part.strip() for part in item.split("=")):
            raise FerlabError(
                f"--class-map takes data=model pairs separated by commas (e.g. anger=angry), got '{item}'."
            )
        a, b = (part.strip() for part in item.split("="))
        out[a] = b
    return out


def map_classes(
    data_classes: list[str], model_classes: list[str], class_map: dict[str, str], drop: list[str]
) -> tuple[dict[str, str], list[str]]:
    """Each data class -> the model class it means (given map first, then built-in synonyms); returns the mapping
    and the notes saying what was mapped and dropped. A class that maps to nothing is one clear sentence."""
    for a, b in class_map.items():
        if b not in model_classes:
            raise FerlabError(
                f"--class-map maps '{a}' to '{b}', which the model does not know ({', '.join(model_classes)})."
            )
    by_synonym = {SYNONYMS.get(c.lower(), c.lower()): c for c in model_classes}
    mapping, notes, unknown = {}, [], []
    for c in data_classes:
        if c in drop:
            continue
        target = class_map.get(c) or (c if c in model_classes else by_synonym.get(SYNONYMS.get(c.lower(), c.lower())))
        if target is None:
            unknown.append(c)
            continue
        mapping[c] = target
        if target != c:
            notes.append(f"{c} -> {target}")
    if unknown:
        raise FerlabError(
            f"The data has classes the model does not know: {', '.join(unknown)} (it knows "
            f"{', '.join(model_classes)}); map them with --class-map DATA=MODEL or leave them out with --drop-classes."
        )
    return mapping, notes


def digests(files: list[str]) -> torch.Tensor:
    """Sorted 8-byte content digests of files: a card's record of its training images, for the overlap check."""
    out = []
    for f in files:
        try:
            out.append(
                int.from_bytes(hashlib.blake2b(Path(f).read_bytes(), digest_size=8).digest(), "little", signed=True)
            )
        except OSError:
            continue
    return torch.tensor(sorted(out), dtype=torch.int64)


def overlap(files: list[str], known: torch.Tensor | None) -> int:
    if known is None or not len(known):
        return 0
    mine = digests(files)
    return int(torch.isin(mine, known).sum())


def labelled(
    model: Model, folder: str | Path, class_map: str | None = None, drop: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str], list[dict], list[str]]:
    """A folder-per-class tree decoded as ``model``'s card prescribes, its classes mapped onto the model's: the
    uint8 batch, the labels, the files, the skipped files with reasons, and what was mapped."""
    drop = list(drop or [])
    root = Path(os.path.abspath(Path(folder).expanduser()))
    records = scan(root, drop, "evaluation")
    check_drop(root, drop)
    mapping, mapped = map_classes(sorted({r.cls for r in records}), model.classes, parse_class_map(class_map), drop)
    decoded, reasons = decode_many([r.file for r in records], model.pre)
    keep = [(r, d) for r, d in zip(records, decoded) if d is not None]
    skipped = [{"file": r.file, "reason": why} for r, why in zip(records, reasons) if why]
    if not keep:
        raise FerlabError(f"None of the {len(records)} files in {folder} could be read as images.")
    x = to_tensor([d.image for _, d in keep], model.pre.image_size)
    y = torch.tensor([model.classes.index(mapping[r.cls]) for r, _ in keep])
    return x, y, [r.file for r, _ in keep], skipped, mapped


def evaluate_model(
    checkpoint: str | Path,
    folder: str | Path,
    out: Path,
    class_map: str | None = None,
    drop_classes: list[str] | None = None,
) -> dict:
    """Metrics of a saved model (a .ckpt, an .onnx or a shipped model's name) on a folder-per-class tree,
    written into ``out``; mapped and dropped classes, baselines and any overlap with the model's own training
    images are in the returned dict's ``notes``."""
    model = load_model(checkpoint)
    classes = model.classes
    drop = list(drop_classes or [])
    x, y, files, skipped, mapped = labelled(model, folder, class_map, drop)
    logits = model.runtime.logits(x)
    probs = (logits / model.temperature).softmax(1)
    present = sorted(set(y.tolist()))
    counts = torch.bincount(y, minlength=len(classes))
    notes = []
    if mapped:
        notes.append("mapped classes: " + ", ".join(mapped))
    if drop:
        notes.append("dropped classes: " + ", ".join(drop))
    absent = [c for i, c in enumerate(classes) if i not in present]
    if absent:
        notes.append(
            f"the model also knows {', '.join(absent)}, which this data has no images of; "
            "predicting them counts as wrong"
        )
    data_card = model.card.get("data", {})
    in_train = overlap(files, data_card.get("train_digests"))
    in_val = overlap(files, data_card.get("val_digests"))
    warnings_ = []
    if skipped:
        warnings_.append(
            f"{len(skipped)} of {len(skipped) + len(files)} files could not be read as images and were left out "
            f"(each with its reason in {out / 'skipped_files.csv'})"
        )
    if in_train or in_val:
        warnings_.append(
            f"{in_train + in_val} of {len(files)} evaluation images were among this model's own training images "
            f"({in_train} in its training split, {in_val} in its validation split): this is not a fair test"
        )
    out.mkdir(parents=True, exist_ok=True)
    m = score_and_record(
        probs,
        y,
        files,
        classes,
        out,
        Path(model.name).stem if Path(model.name).suffix else model.name,
        name=str(checkpoint),  # as the user gave it: a shipped model's name or the file's path
        model=model.card["model"],
        checkpoint=str(checkpoint),
        runtime=model.runtime.kind,
        data=str(folder),
        skipped_files=len(skipped),
        chance=round(1 / len(classes), 4),
        majority=round(counts.max().item() / len(y), 4),
        majority_class=classes[int(counts.argmax())],
        ece_uncalibrated=round(expected_calibration_error(logits.softmax(1), y), 4),
        temperature=model.temperature,
        notes=notes,
        warnings=warnings_,
        overlap={"train": in_train, "val": in_val},
    )
    write_csv(out / "skipped_files.csv", skipped, ["file", "reason"])
    return m
