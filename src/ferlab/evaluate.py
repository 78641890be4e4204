"""Test metrics: accuracy with its Wilson 95% interval, per-class precision/recall/F1, confusion matrix.

>>> m = metrics(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), ["a", "b"])
>>> m["accuracy"], m["n"]
(0.6666666666666666, 3)
"""

from __future__ import annotations

import json
import math
import os
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

from ferlab.data import write_csv  # noqa: E402
from ferlab.train import run_batches  # noqa: E402


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); sound for small n and p near 1."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


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


def save_figure(fig: plt.Figure, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


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
    net: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    files: list[str],
    classes: list[str],
    out: Path,
    title: str,
    **facts: object,
) -> dict:
    """Predict ``images`` once and write metrics.json (with ``facts``), per-class and confusion files and
    predictions.csv into ``out``; the one path for a run's test split and for ``ferlab evaluate``."""
    conf, preds = run_batches(net, images).softmax(1).max(1)
    m = metrics(preds, labels, classes)
    m.update(facts)
    write_metrics(m, classes, out, title)
    write_csv(
        out / "predictions.csv",
        [
            {"file": f, "true": classes[t], "predicted": classes[p], "confidence": round(float(c), 6)}
            for f, t, p, c in zip(files, labels.tolist(), preds.tolist(), conf)
        ],
        ["file", "true", "predicted", "confidence"],
    )
    return m
