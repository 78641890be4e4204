"""The study: train every model on one split, evaluate each once on test, write the comparison.

    >>> from ferlab.config import StudyConfig, merge
    >>> cfg = merge(StudyConfig(), {"data": {"data": "../shared/datasets/ckplus48"}})   # doctest: +SKIP
    >>> run_dir = run_study(cfg, argv=["ferlab", "run"])                              # doctest: +SKIP

Run folder (``runs/<timestamp>-<name>/``): config.yaml, command.txt, manifest.csv, skipped_files.csv,
test_accuracy_comparison.csv, the original study's <label>_accuracy.csv files, and one folder per model
with summary.txt, epochs.csv, metrics.json, per_class.csv, confusion_matrix.{csv,png}, predictions.csv and
model.ckpt (a model card: it rebuilds the model and its preprocessing alone).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import yaml

from ferlab import demo
from ferlab.checkpoint import save_checkpoint
from ferlab.config import StudyConfig, to_dict
from ferlab.data import Data, load_data, write_csv, write_manifest
from ferlab.errors import FerlabError
from ferlab.evaluate import score_and_record
from ferlab.models import REGISTRY, STUDY, Net, create_model
from ferlab.summary import param_counts, summarize
from ferlab.train import FitResult, fit_model

COMPARISON_COLUMNS = [
    "model",
    "parameters",
    "epochs_run",
    "best_epoch",
    "train_acc",
    "val_acc",
    "test_acc",
    "test_ci95_low",
    "test_ci95_high",
    "n_test",
]
EPOCH_COLUMNS = ["epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    say(f"ferlab: warning: {msg}")


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def open_data(cfg: StudyConfig) -> Data:
    if cfg.data.data is None:
        say(f"ferlab: no data folder given: using the {demo.DESCRIPTION}")
        data_cfg = type(cfg.data)(**{**to_dict(cfg.data), "data": str(demo.demo_dataset())})
        return load_data(data_cfg, cfg.train.seed, description=demo.DESCRIPTION)
    return load_data(cfg.data, cfg.train.seed)


def new_run_dir(cfg: StudyConfig, suffix: str = "") -> Path:
    name = cfg.name or (Path(cfg.data.data).name if cfg.data.data else "demo-synthetic")
    base = Path(cfg.out) / f"{datetime.now():%Y%m%d-%H%M%S}-{name}{suffix}"
    run_dir, n = base, 1
    while True:
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            n += 1
            run_dir = base.with_name(f"{base.name}-{n}")
        except OSError as e:
            raise FerlabError(f"Cannot create the run folder {run_dir} ({e.strerror}); choose another --out.") from None


def record_run(run_dir: Path, cfg: StudyConfig, data: Data, argv: list[str]) -> None:
    resolved = to_dict(cfg)
    resolved["dataset"] = {
        "description": data.description,
        "split_method": data.split_method,
        "classes": data.classes,
        "counts": data.counts(),
        "skipped_files": len(data.skipped),
    }
    write_text(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    write_text(run_dir / "command.txt", shlex.join(argv) + "\n")
    write_manifest(data, run_dir / "manifest.csv")
    write_csv(run_dir / "skipped_files.csv", [{"file": f, "reason": r} for f, r in data.skipped], ["file", "reason"])
    n = sum(len(s) for s in data.splits.values())
    if data.skipped:
        warn(
            f"skipped {len(data.skipped)} of {n + len(data.skipped)} files that cannot be used "
            f"(reasons in {run_dir / 'skipped_files.csv'})"
        )
    counts = ", ".join(f"{s} {len(v)}" for s, v in data.splits.items())
    say(
        f"ferlab: {data.description}: {len(data.classes)} classes ({', '.join(data.classes)}); {counts}; "
        f"{data.split_method}"
    )


@dataclass
class Trained:
    name: str
    row: dict
    fit: FitResult


def train_and_test(name: str, net: Net, data: Data, cfg: StudyConfig, run_dir: Path) -> Trained:
    """Train one model into ``run_dir/name``; test once, on its best-validation weights."""
    out = run_dir / name
    out.mkdir(exist_ok=True)
    write_text(out / "summary.txt", summarize(net, data.pre.image_size, name) + "\n")
    say(f"ferlab: training {name} ({param_counts(net)[0]:,} parameters)")
    fit = fit_model(name, net, data, cfg.train)
    write_csv(out / "epochs.csv", fit.epochs, EPOCH_COLUMNS)

    test = data.splits["test"]
    m = score_and_record(
        net,
        test.images,
        test.labels,
        test.files,
        data.classes,
        out,
        name,
        model=name,
        best_epoch=fit.best_epoch,
        epochs_run=len(fit.epochs),
        fit_seconds=round(fit.seconds, 2),
        precision=fit.precision,
        train_acc=fit.train_acc,
        val_acc=fit.best_val_acc,
    )
    card = {
        "data": {"description": data.description, "split_method": data.split_method, "counts": data.counts()},
        "training": {
            "best_epoch": fit.best_epoch,
            "epochs_run": len(fit.epochs),
            "val_acc": fit.best_val_acc,
            "train_acc": fit.train_acc,
            "seconds": round(fit.seconds, 2),
            "config": to_dict(cfg.train),
        },
        "test_metrics": {k: m[k] for k in ("n", "correct", "accuracy", "ci95", "macro_f1")},
    }
    save_checkpoint(out / "model.ckpt", net, name, data.classes, data.pre, **card)
    row = {
        "model": name,
        "parameters": param_counts(net)[0],
        "epochs_run": len(fit.epochs),
        "best_epoch": fit.best_epoch,
        "train_acc": round(fit.train_acc, 4),
        "val_acc": round(fit.best_val_acc, 4),
        "test_acc": round(m["accuracy"], 4),
        "test_ci95_low": round(m["ci95"][0], 4),
        "test_ci95_high": round(m["ci95"][1], 4),
        "n_test": m["n"],
    }
    say(
        f"ferlab: {name}: test accuracy {m['accuracy']:.3f} (95% CI {m['ci95'][0]:.3f}-{m['ci95'][1]:.3f}, "
        f"n={m['n']}), best epoch {fit.best_epoch} of {len(fit.epochs)}, {fit.seconds:.0f} s"
    )
    return Trained(name, row, fit)


def predict_new_images(folder: str, done: list[Trained], run_dir: Path) -> None:
    """The study's last step: the best from-scratch model (by validation accuracy) and each transfer model
    predict new images."""
    from ferlab.predict import run_predict

    scratch = [t for t in done if not REGISTRY[t.name].transfer]
    chosen = [max(scratch, key=lambda t: t.fit.best_val_acc)] if scratch else []
    chosen += [t for t in done if REGISTRY[t.name].transfer]
    try:
        rows, skipped = run_predict(
            [str(run_dir / t.name / "model.ckpt") for t in chosen], [folder], run_dir / "predictions"
        )
    except FerlabError as e:  # the trained models stay; only this last step is missing
        warn(f"no predictions on new images: {e}")
        return
    say(
        f"ferlab: predicted {len(rows)} new images with {', '.join(t.name for t in chosen)} "
        f"({run_dir / 'predictions' / 'prediction_results.csv'})"
    )


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def run_study(cfg: StudyConfig, argv: list[str], models: list[str] | None = None) -> Path:
    """Train and compare ``models`` (default: the study's three); returns the run folder."""
    t0 = time.perf_counter()
    models = models or cfg.models or list(STUDY)
    for m in models:
        if m not in REGISTRY:
            raise FerlabError(f"Unknown model '{m}'; choose from: {', '.join(REGISTRY)}.")
    if cfg.predict_dir:  # a typo here should not surface only after the training
        from ferlab.predict import expand_inputs

        expand_inputs([cfg.predict_dir])
    data = open_data(cfg)
    nets: dict[str, Net] = {}
    left_out: list[dict] = []
    for name in models:  # weights are fetched before any run folder exists: a failed start leaves nothing
        try:
            torch.manual_seed(cfg.train.seed)  # initial weights are part of what one seed reproduces
            nets[name] = create_model(
                name, len(data.classes), data.pre.image_size, cfg.train.weights, cfg.train.backbone_size
            )
        except FerlabError as e:
            if len(models) == 1 or not REGISTRY[name].transfer:
                raise
            # the rest of the study still stands without a transfer model whose weights cannot be had
            warn(f"{name} left out of this study: {e}")
            left_out.append({"model": name, "reason": str(e)})
    run_dir = new_run_dir(cfg, "" if len(models) > 1 else f"-{models[0]}")
    record_run(run_dir, cfg, data, argv)
    done = [train_and_test(name, net, data, cfg, run_dir) for name, net in nets.items()]
    rows = [t.row for t in done]
    write_csv(run_dir / "test_accuracy_comparison.csv", rows, COMPARISON_COLUMNS)
    if cfg.predict_dir and done:
        predict_new_images(cfg.predict_dir, done, run_dir)
    for t in done:
        write_csv(
            run_dir / f"{REGISTRY[t.name].study_label}_accuracy.csv",
            [{"epoch": e["epoch"], "training_accuracy": e["train_acc"]} for e in t.fit.epochs],
            ["epoch", "training_accuracy"],
        )
    summary = {
        "models": [t.name for t in done],
        "left_out": left_out,
        "fit_seconds": {t.name: round(t.fit.seconds, 2) for t in done},
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }
    write_text(run_dir / "run.json", json.dumps(summary, indent=1))
    if done:
        from ferlab.report import build_report

        build_report(run_dir)
    print(format_table(rows, COMPARISON_COLUMNS))
    say(f"ferlab: run folder {run_dir} ({time.perf_counter() - t0:.0f} s)")
    return run_dir
