"""Metrics: accuracy with its interval, per-class scores, confusion, calibration error, and their files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import (  # noqa: E402
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from ferlab.core.files import save_figure, write_csv, write_text  # noqa: E402
from ferlab.core.stats import wilson  # noqa: E402


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
    write_text(out / "metrics.json", json.dumps(m, indent=1))
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


def digest(file: str) -> int | None:
    """A file's 8-byte content digest as a signed integer (None when it cannot be read)."""
    try:
        return int.from_bytes(hashlib.blake2b(Path(file).read_bytes(), digest_size=8).digest(), "little", signed=True)
    except OSError:
        return None


def digests(files: list[str]) -> torch.Tensor:
    """Sorted 8-byte content digests of files: a card's record of its training images, for the overlap check."""
    return torch.tensor(sorted(d for d in map(digest, files) if d is not None), dtype=torch.int64)


def overlap(files: list[str], known: torch.Tensor | None) -> int:
    return sum(overlapping(files, known))


def overlapping(files: list[str], known: torch.Tensor | None) -> list[bool]:
    """Per file: whether its bytes are among ``known`` (a card's training or validation digests)."""
    if known is None or not len(known):
        return [False] * len(files)
    keys = set(known.tolist())
    return [digest(f) in keys for f in files]
