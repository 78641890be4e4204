"""The study: train every model on one split (or on each fold of a cross-validation), test each once, compare.

    >>> from ferlab.config import StudyConfig, merge
    >>> cfg = merge(StudyConfig(), {"data": {"data": "../shared/datasets/ckplus48"}})   # doctest: +SKIP
    >>> run_dir = run_study(cfg, argv=["ferlab", "run"])                              # doctest: +SKIP

Run folder (``runs/<timestamp>-<name>/``): config.yaml (the resolved settings: ``--config`` re-runs it),
dataset.json, command.txt, status.json, manifest.csv, skipped_files.csv, test_accuracy_comparison.csv, the
original study's <label>_accuracy.csv files, and one folder per model with summary.txt, epochs.csv,
metrics.json, per_class.csv, confusion_matrix.{csv,png}, reliability.png, predictions.csv and model.ckpt
(a model card: it rebuilds the model and its preprocessing alone). With ``--folds K`` (and ``--seeds``) each
fold (and seed) is such a study in ``fold-<k>/`` (``fold-<k>/seed-<s>/``), and the run folder adds
cv_summary.csv, cv_pairs.csv and the cross-validation section of the report.

While a model trains, its folder holds ``training-state/`` (written as epochs end): ``ferlab run --resume
RUN_DIR`` continues a run that was killed, without retraining what finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ferlab.apps.predict import expand_inputs, run_predict
from ferlab.core.config import StudyConfig, merge, to_dict
from ferlab.core.errors import FerlabError
from ferlab.core.files import read_csv, unique_dir, write_csv, write_text
from ferlab.data import demo
from ferlab.data.datasets import Data, ImageSet, cap_per_class, load_data, write_manifest
from ferlab.inference import ood
from ferlab.inference.model import calibrated, default_model_name, load_model, resolve, run_batches, shipped_models
from ferlab.models.checkpoint import load_checkpoint, save_checkpoint, transplant
from ferlab.models.registry import EMOTION_TRANSFER, REGISTRY, STUDY, Net, create_model
from ferlab.models.summary import param_counts, summarize
from ferlab.reporting.cards import FER2013_LICENSE
from ferlab.reporting.crossval import summarize_runs
from ferlab.reporting.metrics import digests, score_and_record
from ferlab.reporting.report import build_report
from ferlab.training.calibration import calibration
from ferlab.training.fit import FitResult, fit_model, is_distributed, is_rank_zero
from ferlab.training.memory import keep_freed_memory
from ferlab.training.precision import choose, share
from ferlab.training.tracking import Logger, check_logger, log_test, open_logger

COMPARISON_COLUMNS = [
    "model",
    "parameters",
    "epochs_run",
    "best_epoch",
    "train_acc",
    "train_acc_eval",
    "val_acc",
    "test_acc",
    "test_ci95_low",
    "test_ci95_high",
    "n_test",
]
EPOCH_COLUMNS = ["epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"]
# settings that change how a run looks, not what it computes: a resumed run may differ in them
NOT_COMPARED = {"train.progress", "keep_checkpoints", "predict_dir"}


def say(msg: str) -> None:
    if is_rank_zero():
        print(msg, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    say(f"ferlab: warning: {msg}")


# ------------------------------------------------------------------------------------------ settings checks


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise FerlabError(msg)


def check_config(cfg: StudyConfig, models: list[str]) -> None:
    """Every setting that cannot work, refused in one sentence before any data is read or model trained."""
    t, d = cfg.train, cfg.data
    check_training(cfg)
    check_logger(t.logger)
    for m in models:
        need(m in REGISTRY, f"Unknown model '{m}'; choose from: {', '.join(REGISTRY)}.")
    need(len(set(models)) == len(models), f"--models names a model twice: {' '.join(models)}.")
    for m in t.precision_by_model:
        need(m in REGISTRY, f"train.precision_by_model names an unknown model '{m}'; models: {', '.join(REGISTRY)}.")
    split = d.split
    need(len(split) == 3, f"--split needs three fractions (train val test), got {len(split)}.")
    need(min(split) >= 0, f"--split fractions must not be negative, got {' '.join(map(str, split))}.")
    need(
        abs(sum(split) - 1) < 1e-6,
        f"--split fractions must add up to 1, got {' '.join(map(str, split))} = {sum(split):g}.",
    )
    need(
        split[0] > 0 and split[1] > 0,
        "--split needs a training and a validation share above 0 (validation picks the epoch).",
    )
    need(
        split[0] >= split[1] and split[0] >= split[2],
        f"--split gives training {split[0]:g}, less than validation {split[1]:g} or test {split[2]:g}; "
        "training should be the largest share.",
    )
    need(d.image_size >= 8, f"--image-size must be at least 8 pixels, got {d.image_size}.")
    need(d.max_pixels >= 1, f"--max-pixels must be positive, got {d.max_pixels}.")
    need(0 <= d.face_margin <= 1, f"--face-margin must be 0-1 (a fraction of the face box), got {d.face_margin}.")
    need(
        t.backbone_size == 0 or t.backbone_size >= 32,
        f"--backbone-size must be 0 or at least 32, got {t.backbone_size}.",
    )
    for m in models:
        spec = REGISTRY[m]
        side = (t.backbone_size or d.image_size) if spec.transfer else d.image_size
        need(
            side >= spec.min_size,
            f"{m} needs an input of at least {spec.min_size}x{spec.min_size} pixels"
            + (" at its backbone" if spec.transfer else "")
            + f", but would get {side}x{side}; raise --image-size"
            + (" or --backbone-size" if spec.transfer else "")
            + ".",
        )


def check_training(cfg: StudyConfig) -> None:
    """The training settings and the run's folds, seeds and learning-curve sizes."""
    t = cfg.train
    need(t.max_epochs >= 1, f"--max-epochs must be at least 1, got {t.max_epochs}.")
    need(t.batch_size >= 1, f"--batch-size must be at least 1, got {t.batch_size}.")
    need(t.patience >= 0, f"--patience must be 0 (never stop early) or more, got {t.patience}.")
    need(
        t.lr > 0 and t.fine_tune_lr > 0,
        f"learning rates must be positive, got --lr {t.lr} --fine-tune-lr {t.fine_tune_lr}.",
    )
    need(t.weight_decay >= 0, f"--weight-decay must not be negative, got {t.weight_decay}.")
    need(0 <= t.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {t.label_smoothing}.")
    need(0 <= t.class_balance <= 1, f"--class-balance must be in [0, 1], got {t.class_balance}.")
    need(0 <= t.erase <= 1, f"--erase is a probability in [0, 1], got {t.erase}.")
    need(0 <= t.rotate <= 180, f"--rotate must be 0-180 degrees, got {t.rotate}.")
    for name, v in (("shift", t.shift), ("zoom", t.zoom), ("jitter", t.jitter)):
        need(0 <= v < 1, f"--{name} must be in [0, 1), got {v}.")
    need(t.fine_tune_layers >= 0, f"--fine-tune-layers must not be negative, got {t.fine_tune_layers}.")
    need(t.num_nodes >= 1, f"--num-nodes must be at least 1, got {t.num_nodes}.")
    devices = str(t.devices)
    need(
        devices in ("auto", "-1") or all(p.strip().isdigit() for p in devices.split(",")) and devices != "0",
        f"--devices must be auto, a positive count or a comma-separated list of device ids, got '{devices}'.",
    )
    if t.accelerator in ("gpu", "cuda"):
        need(
            torch.cuda.is_available(),
            f"--accelerator {t.accelerator} asks for a GPU, but this machine has no CUDA device.",
        )
    need(cfg.folds == 0 or cfg.folds >= 2, f"--folds must be 0 (one split) or at least 2, got {cfg.folds}.")
    need(len(set(cfg.seeds)) == len(cfg.seeds), f"--seeds names a seed twice: {' '.join(map(str, cfg.seeds))}.")
    for flag, values in (("--seed", [t.seed]), ("--seeds", cfg.seeds)):
        bad = [v for v in values if not 0 <= v < 2**32]
        need(
            not bad,
            f"{flag} takes whole numbers from 0 to {2**32 - 1} (NumPy's seed range), got {bad[:1][0] if bad else ''}.",
        )
    per_class = " ".join(map(str, cfg.per_class))
    need(
        not cfg.per_class or cfg.folds >= 2,
        f"--per-class {per_class} draws a learning curve over folds; add --folds K.",
    )
    need(all(n >= 1 for n in cfg.per_class), f"--per-class takes image counts of 1 or more, got {per_class}.")
    need(len(set(cfg.per_class)) == len(cfg.per_class), f"--per-class names a count twice: {per_class}.")


def differences(saved: dict, given: dict, prefix: str = "") -> list[str]:
    """``key: run has A, given B`` for every setting that differs (the NOT_COMPARED ones aside)."""
    out = []
    for key in sorted(set(saved) | set(given)):
        where = f"{prefix}{key}"
        a, b = saved.get(key), given.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{where}.")
        elif a != b and where not in NOT_COMPARED:
            out.append(f"{where}: the run has {a!r}, given {b!r}")
    return out


# ------------------------------------------------------------------------------------------------ records


def open_data(cfg: StudyConfig, fold: tuple[int, int] | None = None) -> Data:
    if cfg.data.data is None:
        if fold is None or fold[0] == 0:
            say(f"ferlab: no data folder given: using the {demo.DESCRIPTION}")
        data_cfg = type(cfg.data)(**{**to_dict(cfg.data), "data": str(demo.demo_dataset())})
        return load_data(data_cfg, cfg.train.seed, description=demo.DESCRIPTION, fold=fold)
    return load_data(cfg.data, cfg.train.seed, fold=fold)


def dataset_record(data: Data) -> dict:
    """What the data turned out to be: written beside the config (dataset.json), not into it, so a run's
    config.yaml can be passed back to --config."""
    return {
        "description": data.description,
        "split_method": data.split_method,
        "classes": data.classes,
        "counts": data.counts(),
        "skipped_files": len(data.skipped),
        "preprocess": dataclasses.asdict(data.pre),
    }


def record_split(out: Path, data: Data) -> None:
    """dataset.json, manifest.csv and skipped_files.csv of one split; a split a run recorded earlier (a resumed
    run) must be the same one, or the run's tables would mix two splits."""
    if (out / "manifest.csv").is_file():
        check_same_split(out / "manifest.csv", data)
    write_text(out / "dataset.json", json.dumps(dataset_record(data), indent=1))
    write_manifest(data, out / "manifest.csv")
    write_csv(out / "skipped_files.csv", [{"file": f, "reason": r} for f, r in data.skipped], ["file", "reason"])


def check_same_split(manifest: Path, data: Data) -> None:
    """A FerlabError naming what changed when ``data`` does not split as ``manifest`` recorded."""
    was = {r["file"]: (r["class"], r["split"]) for r in read_csv(manifest)}
    now = {r.file: (r.cls, r.split) for r in data.manifest}
    gone, new = sorted(was.keys() - now.keys()), sorted(now.keys() - was.keys())
    moved = sorted(f for f in was.keys() & now.keys() if was[f] != now[f])
    if not (gone or new or moved):
        return
    changes = [
        f"{len(files)} {what} (first: {files[0]})"
        for files, what in ((gone, "gone"), (new, "new"), (moved, "in another class or split"))
        if files
    ]
    raise FerlabError(
        f"The data is not what {manifest.parent} was split from: {'; '.join(changes)}; resume with the data the "
        "run started with, or start a new run."
    )


def set_status(run_dir: Path, state: str, **facts: object) -> None:
    """status.json: running, finished, or incomplete (with the reason); ``ferlab report`` and ``--resume`` read it."""
    if is_rank_zero():
        write_text(run_dir / "status.json", json.dumps({"state": state, **facts}, indent=1))


# ----------------------------------------------------------------------------------------------- one model


@dataclass
class Trained:
    name: str
    row: dict
    fit: FitResult


def finished(out: Path) -> Trained | None:
    """A model that finished in an earlier (interrupted) run of this folder: read back, not retrained."""
    name = out.name
    if not ((out / "model.ckpt").is_file() and (out / "metrics.json").is_file() and (out / "row.json").is_file()):
        return None
    m = json.loads((out / "metrics.json").read_text())
    epochs = [
        {k: (int(v) if k in ("epoch", "stage") else float(v)) for k, v in e.items()}
        for e in read_csv(out / "epochs.csv")
    ]
    fit = FitResult(
        epochs=epochs,
        best_epoch=m["best_epoch"],
        best_val_acc=m["val_acc"],
        train_acc=m["train_acc"],
        seconds=m["fit_seconds"],
        precision=m.get("precision", "32"),
        precision_note=m.get("precision_note", ""),
    )
    return Trained(name, json.loads((out / "row.json").read_text()), fit)


def train_and_test(name: str, net: Net, data: Data, cfg: StudyConfig, split_dir: Path) -> Trained | None:
    """Train one model into ``split_dir/name`` (continuing its saved training state, if any); test it once, on
    its best-validation weights. Ranks other than 0 of a multi-process run only train (None)."""
    out = split_dir / name
    if is_rank_zero():
        out.mkdir(exist_ok=True)
        write_text(out / "summary.txt", summarize(net, data.pre.image_size, name) + "\n")
        say(f"ferlab: training {name} ({param_counts(net)[0]:,} parameters)")
    state_dir = out / "training-state"
    keep_freed_memory()
    logger = open_logger(cfg.train.logger, out, tracking_name(cfg, out)) if is_rank_zero() else None
    fit = fit_model(name, net, data, cfg.train, state_dir, logger)
    if not is_rank_zero():
        return None
    votes = ["val_vote_loss"] if fit.epochs and "val_vote_loss" in fit.epochs[0] else []
    write_csv(out / "epochs.csv", fit.epochs, [*EPOCH_COLUMNS[:-1], *votes, EPOCH_COLUMNS[-1]])

    calib, unusual, train_acc_eval = validate(name, net, data, fit, cfg.train.seed)
    t = calib["temperature"]
    card = model_card(data, fit, calib, unusual, train_acc_eval, cfg)
    if hasattr(net, "source"):
        card["init"] = net.source
    # the test split is scored from the saved model card, through the one inference path `ferlab evaluate` takes;
    # the card is then written again with the test metrics in it
    save_checkpoint(out / "model.ckpt", net, name, data.classes, data.pre, **card)
    probs, labels, files = score_test(out / "model.ckpt", data.splits["test"])
    m = score_and_record(
        probs,
        labels,
        files,
        data.classes,
        out,
        name,
        model=name,
        best_epoch=fit.best_epoch,
        epochs_run=len(fit.epochs),
        fit_seconds=round(fit.seconds, 2),
        precision=fit.precision,
        precision_note=fit.precision_note,
        train_acc=fit.train_acc,
        train_acc_eval=round(train_acc_eval, 6),
        val_acc=fit.best_val_acc,
        temperature=t,
    )
    log_misclassified(logger, out, probs, labels, files, data)
    card["test_metrics"] = {k: m[k] for k in ("n", "correct", "accuracy", "ci95", "macro_f1", "ece")}
    save_checkpoint(out / "model.ckpt", net, name, data.classes, data.pre, **card)
    row = comparison_row(name, net, fit, train_acc_eval, m)
    write_text(out / "row.json", json.dumps(row))  # last: its presence marks the model finished
    if not cfg.keep_checkpoints:
        shutil.rmtree(state_dir, ignore_errors=True)
    say(
        f"ferlab: {name}: test accuracy {m['accuracy']:.3f} (95% CI {m['ci95'][0]:.3f}-{m['ci95'][1]:.3f}, "
        f"n={m['n']}), best epoch {fit.best_epoch} of {len(fit.epochs)}, {fit.seconds:.0f} s"
    )
    return Trained(name, row, fit)


def tracking_name(cfg: StudyConfig, out: Path) -> str:
    """A model's name in an experiment tracker: its folder under the runs folder (run[/fold-k]/model)."""
    try:
        return out.resolve().relative_to(Path(cfg.out).resolve()).as_posix()
    except ValueError:  # a resumed run that lives elsewhere
        return f"{out.parent.name}/{out.name}"


def log_misclassified(
    logger: Logger | None, out: Path, probs: torch.Tensor, labels: torch.Tensor, files: list[str], data: Data
) -> None:
    """The tracker's end-of-training pictures: the confusion matrix and the first 32 misclassified test images."""
    predicted = probs.argmax(1)
    wrong = [i for i in range(len(labels)) if predicted[i] != labels[i]][:32]
    names = data.classes
    captions = [
        f"{Path(files[i]).name}: true {names[int(labels[i])]}, predicted {names[int(predicted[i])]}" for i in wrong
    ]
    log_test(logger, out / "confusion_matrix.png", data.splits["test"].images[wrong], captions)


def validate(name: str, net: Net, data: Data, fit: FitResult, seed: int) -> tuple[dict, dict, float]:
    """What the validation and training splits say about the chosen weights: the calibration (temperature) and
    the out-of-distribution statistics (from validation, as the epoch was chosen), and the training split's
    accuracy in eval mode."""
    train, val = data.splits["train"], data.splits["val"]
    val_logits = run_batches(net, val.images)
    calib = calibration(val_logits, val.labels)
    t = calib["temperature"]
    if calib["method"].startswith("none"):
        warn(f"{name}: not calibrated: {calib['method'].removeprefix('none: ')} (its confidences are the raw softmax)")
    else:
        say(
            f"ferlab: {name}: temperature {t:.3f} fitted on validation"
            + (" (bounded: validation is nearly separable)" if calib["bounded"] else "")
            + f": expected calibration error {calib['val_ece_before']:.3f} -> {calib['val_ece_after']:.3f}"
        )
    unusual = ood.fit(
        list(train.images.permute(0, 2, 3, 1).numpy()),
        list(val.images.permute(0, 2, 3, 1).numpy()),
        calibrated(val_logits, t),
        seed=seed,
    )
    # the overfitting gap, measured fairly: the training split in eval mode with the chosen weights (the
    # epoch table's training accuracy ran with dropout and augmentation on, and over a moving model)
    train_logits = fit.train_logits if fit.train_logits is not None else run_batches(net, train.images)
    return calib, unusual, float((train_logits.argmax(1) == train.labels).float().mean())


def model_card(data: Data, fit: FitResult, calib: dict, unusual: dict, train_acc_eval: float, cfg: StudyConfig) -> dict:
    """What the checkpoint tells about how its model was made (the test metrics join it once scored)."""
    train, val = data.splits["train"], data.splits["val"]
    card = {
        "data": {
            "description": data.description,
            "split_method": data.split_method,
            "counts": data.counts(),
            "train_digests": digests(train.files),
            "val_digests": digests(val.files),
        },
        "training": {
            "best_epoch": fit.best_epoch,
            "epochs_run": len(fit.epochs),
            "val_acc": fit.best_val_acc,
            "train_acc": fit.train_acc,
            "train_acc_eval": train_acc_eval,
            "seconds": round(fit.seconds, 2),
            "precision": fit.precision,
            "precision_note": fit.precision_note,
            "config": to_dict(cfg.train),
        },
        "calibration": calib,
        "ood": unusual,
    }
    if "FER2013" in data.description.upper():
        card["license"] = FER2013_LICENSE
    return card


def comparison_row(name: str, net: Net, fit: FitResult, train_acc_eval: float, m: dict) -> dict:
    return {
        "model": name,
        "parameters": param_counts(net)[0],
        "epochs_run": len(fit.epochs),
        "best_epoch": fit.best_epoch,
        "train_acc": round(fit.train_acc, 4),
        "train_acc_eval": round(train_acc_eval, 4),
        "val_acc": round(fit.best_val_acc, 4),
        "test_acc": round(m["accuracy"], 4),
        "test_ci95_low": round(m["ci95"][0], 4),
        "test_ci95_high": round(m["ci95"][1], 4),
        "n_test": m["n"],
    }


def score_test(checkpoint: Path, test: ImageSet) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The test split's calibrated probabilities, labels and files, from the saved card alone (as ``ferlab
    evaluate`` scores it); a file its preprocessing cannot use is one sentence."""
    model = load_model(checkpoint, cache=False)
    faces, reasons = model.classify_files(test.files)
    broken = [(f, why) for f, why in zip(test.files, reasons) if why]
    if broken:
        raise FerlabError(f"The test image {broken[0][0]} cannot be scored by the saved model ({broken[0][1]}).")
    logits = torch.from_numpy(np.stack([f.logits for f in faces]))
    return calibrated(logits, model.temperature), test.labels, list(test.files)


def predict_new_images(folder: str, done: list[Trained], run_dir: Path) -> None:
    """The study's last step: the best from-scratch model (by validation accuracy) and each transfer model
    predict new images."""

    scratch = [t for t in done if not REGISTRY[t.name].transfer]
    chosen = [max(scratch, key=lambda t: t.fit.best_val_acc)] if scratch else []
    chosen += [t for t in done if REGISTRY[t.name].transfer]
    try:
        checkpoints = [str(run_dir / t.name / "model.ckpt") for t in chosen]
        p = run_predict(checkpoints, [folder], run_dir / "predictions", cache=False)  # no model kept per fold
    except FerlabError as e:  # the trained models stay; only this last step is missing
        warn(f"no predictions on new images: {e}")
        return
    say(
        f"ferlab: predicted {len(p.rows)} new images with {', '.join(t.name for t in chosen)} "
        f"({run_dir / 'predictions' / 'prediction_results.csv'})"
    )


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- one split


def build(name: str, data: Data, cfg: StudyConfig, seed: int) -> Net:
    torch.manual_seed(seed)  # initial weights are part of what one seed reproduces
    if name == EMOTION_TRANSFER:
        return build_from_source(data, cfg)
    return create_model(
        name, len(data.classes), data.pre.image_size, cfg.train.weights, cfg.train.backbone_size, cfg.train.tta
    )


# emotion-transfer's source when --init names none: on CK+48's five subject folds its validation accuracy is
# 0.99-1.00 from either shipped model (one image apart), and its validation loss is lower from fer2013
# (0.061 against 0.090 from ferplus): docs/study.md, emotion-transfer's recipe
SOURCE = "fer2013"


def build_from_source(data: Data, cfg: StudyConfig) -> Net:
    """emotion-transfer: the source model's architecture and weights with a new head for ``data``'s classes (the
    rows of classes both know copied). It takes the data's images and resizes them inside itself to the
    source's input size, as transfer models do for their backbone; ``net.source`` says where it started."""
    init = cfg.train.init or (SOURCE if SOURCE in shipped_models() else default_model_name())
    source, card = load_checkpoint(resolve(init))
    arch = card["model_args"].get("arch") or card["model"]
    side = source.normalize.size or card["model_args"]["image_size"]
    net = create_model(
        EMOTION_TRANSFER, len(data.classes), data.pre.image_size, backbone_size=side, tta=cfg.train.tta, arch=arch
    )
    copied = transplant(net, source, card["classes"], data.classes)
    net.source = {"model": str(init), "architecture": arch, "input_size": side, "classes_from_source": copied}
    return net


def run_split(cfg: StudyConfig, data: Data, split_dir: Path, models: list[str], left_out: list[dict]) -> list[Trained]:
    """Every model on one split into ``split_dir``: the tables, predictions and report of a single study."""
    t0 = time.perf_counter()
    if is_rank_zero():
        record_split(split_dir, data)
    done = []
    for name in models:
        trained = finished(split_dir / name) if is_rank_zero() else None
        if trained is not None:
            say(f"ferlab: {name}: finished in an earlier run of {split_dir}; not trained again")
        else:
            trained = train_and_test(name, build(name, data, cfg, cfg.train.seed), data, cfg, split_dir)
        if trained is not None:
            done.append(trained)
    if not is_rank_zero():
        return []
    rows = [t.row for t in done]
    write_csv(split_dir / "test_accuracy_comparison.csv", rows, COMPARISON_COLUMNS)
    if cfg.predict_dir and done:
        predict_new_images(cfg.predict_dir, done, split_dir)
    for t in done:
        write_csv(
            split_dir / f"{REGISTRY[t.name].study_label}_accuracy.csv",
            [{"epoch": e["epoch"], "training_accuracy": e["train_acc"]} for e in t.fit.epochs],
            ["epoch", "training_accuracy"],
        )
    summary = {
        "models": [t.name for t in done],
        "left_out": left_out,
        "fit_seconds": {t.name: round(t.fit.seconds, 2) for t in done},
        "precision": {t.name: t.fit.precision_note or t.fit.precision for t in done},
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }
    write_text(split_dir / "run.json", json.dumps(summary, indent=1))
    if done:
        build_report(split_dir, own=True)  # the run writes its report as it ends
    print(format_table(rows, COMPARISON_COLUMNS))
    return done


# ----------------------------------------------------------------------------------------------- the study


def resolve_models(cfg: StudyConfig, models: list[str] | None) -> list[str]:
    return list(models or cfg.models or STUDY)


def load_run_config(run_dir: Path) -> StudyConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FerlabError(f"{run_dir} is not a ferlab run folder (no config.yaml); pass the folder a run printed.")
    return merge(StudyConfig(), yaml.safe_load(path.read_text()) or {})


def prepare_resume(run_dir: Path, cfg: StudyConfig, given: dict) -> StudyConfig:
    """The saved configuration of ``run_dir``, refused if ``given`` (the flags of this command) differs from it."""
    saved = load_run_config(run_dir)
    status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").is_file() else {}
    if status.get("state") == "finished":
        raise FerlabError(f"{run_dir} finished already; there is nothing to resume.")
    wanted = merge(saved, given) if given else saved
    diff = differences(to_dict(saved), to_dict(wanted))
    if diff:
        raise FerlabError(f"--resume {run_dir} with other settings than the run's: " + "; ".join(diff) + ".")
    return wanted


def units(cfg: StudyConfig) -> list[tuple[int | None, int]]:
    """(fold or None, seed) for every study the run holds."""
    seeds = cfg.seeds or [cfg.train.seed]
    folds = list(range(cfg.folds)) if cfg.folds else [None]
    return [(f, s) for f in folds for s in seeds]


def unit_dir(run_dir: Path, cfg: StudyConfig, fold: int | None, seed: int, per_class: int | None = None) -> Path:
    path = run_dir if per_class is None else run_dir / f"per-class-{per_class}"
    if fold is not None:
        path = path / f"fold-{fold + 1}"
    if len(cfg.seeds) > 1:
        path = path / f"seed-{seed}"
    return path


def run_study(cfg: StudyConfig, argv: list[str], models: list[str] | None = None, resume: Path | None = None) -> Path:
    """Train and compare ``models`` (default: the study's three) on one split, or on every fold and seed;
    returns the run folder. With ``resume``, continues that run folder."""
    t0 = time.perf_counter()
    models = resolve_models(cfg, models)
    cfg = dataclasses.replace(cfg, models=list(models))  # saved resolved, so the config re-runs exactly this
    check_config(cfg, models)
    if cfg.predict_dir:  # a typo here should not surface only after the training
        expand_inputs([cfg.predict_dir])
    plan = units(cfg)
    first = open_data(cfg, (plan[0][0], cfg.folds) if cfg.folds else None)
    left_out, sides = leave_out_unavailable(models, first, cfg)
    cfg = decide_precisions(cfg, models, first, sides)
    run_dir = place_run(cfg, models, resume)
    if is_rank_zero():
        start_run(run_dir, cfg, argv, first, unit_dir(run_dir, cfg, *plan[0]))
    try:
        results = {}
        for fold, seed in plan:
            data = first if (fold, seed) == plan[0] or fold is None else None  # seeds share one split
            results[(fold, seed)] = run_unit(run_dir, cfg, models, left_out, (fold, seed), data)
        curve = {
            n: {(fold, seed): run_unit(run_dir, cfg, models, left_out, (fold, seed), None, n) for fold, seed in plan}
            for n in cfg.per_class
        }
        if is_rank_zero() and (cfg.folds or len(cfg.seeds) > 1):
            summarize_runs(run_dir, cfg, results, curve)
    except BaseException as e:
        why = "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else str(e) or e.__class__.__name__
        set_status(run_dir, "incomplete", reason=why, resume=f"ferlab run --resume {run_dir}")
        raise
    set_status(run_dir, "finished", wall_seconds=round(time.perf_counter() - t0, 2))
    say(f"ferlab: run folder {run_dir} ({time.perf_counter() - t0:.0f} s)")
    return run_dir


def decide_precisions(cfg: StudyConfig, models: list[str], data: Data, sides: dict[str, int | None]) -> StudyConfig:
    """Each model's arithmetic under ``--precision auto``, decided before anything trains (measured here) and
    recorded in the config, so config.yaml trains the same arithmetic again and every fold and seed of the run
    trains in one; every rank of a multi-process run takes rank 0's decision."""
    size, batch, t = data.pre.image_size, cfg.train.batch_size, cfg.train
    if t.precision != "auto":  # the config says it already
        return cfg
    decided = dict(t.precision_by_model)
    for name in models:
        if name in decided:
            continue
        choice = choose(name, len(data.classes), size, batch, t.accelerator, t.precision, side=sides.get(name))
        if choice.measured not in ("forced", "cuda") and not choice.cached and is_rank_zero():
            say(choice.message(name))
        if is_distributed(t) and is_rank_zero():
            share(name, size, batch, choice)
        decided[name] = choice.precision
    return dataclasses.replace(cfg, train=dataclasses.replace(t, precision_by_model=decided))


def leave_out_unavailable(models: list[str], data: Data, cfg: StudyConfig) -> tuple[list[dict], dict[str, int | None]]:
    """Build every model once before any run folder exists (weights are fetched now: a failed start leaves
    nothing); a transfer model whose weights cannot be had leaves the study (removed from ``models``), which
    still stands without it. Returns what was left out and why, and the side each model resizes its input to
    (None: as given)."""
    left_out: list[dict] = []
    sides: dict[str, int | None] = {}
    for name in list(models):
        try:
            sides[name] = build(name, data, cfg, cfg.train.seed).normalize.size
        except FerlabError as e:
            if len(models) == 1 or not REGISTRY[name].transfer or (name == EMOTION_TRANSFER and cfg.train.init):
                raise
            warn(f"{name} left out of this study: {e}")
            left_out.append({"model": name, "reason": str(e)})
            models.remove(name)
    return left_out, sides


def start_run(run_dir: Path, cfg: StudyConfig, argv: list[str], first: Data, first_dir: Path) -> None:
    """The run folder's record of what was asked (config.yaml re-runs it) and the first split, said once."""
    write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_text(run_dir / "command.txt", shlex.join(argv) + "\n")
    set_status(run_dir, "running", pid=os.getpid())
    for note in first.notes:
        warn(note)
    if first.skipped:
        n = sum(len(s) for s in first.splits.values())
        warn(
            f"skipped {len(first.skipped)} of {n + len(first.skipped)} files that cannot be used "
            f"(reasons in {first_dir / 'skipped_files.csv'})"
        )
    counts = ", ".join(f"{s} {len(v)}" for s, v in first.splits.items())
    say(
        f"ferlab: {first.description}: {len(first.classes)} classes ({', '.join(first.classes)}); {counts}; "
        f"{first.split_method}"
    )


def run_unit(
    run_dir: Path,
    cfg: StudyConfig,
    models: list[str],
    left_out: list[dict],
    unit: tuple[int | None, int],
    data: Data | None,
    per_class: int | None = None,
) -> Path:
    """One study of the run (a fold and a seed, with at most ``per_class`` training images per class) into its
    folder, unless an earlier run of it finished it; ``data``: the split when it is already open."""
    fold, seed = unit
    where = unit_dir(run_dir, cfg, fold, seed, per_class)
    if fold is not None or len(cfg.seeds) > 1:
        if (where / "run.json").is_file():
            say(f"ferlab: {where.relative_to(run_dir)} finished in an earlier run; not computed again")
            return where
        say(
            f"ferlab: {where.relative_to(run_dir)}: "
            + (f"fold {fold + 1} of {cfg.folds}" if fold is not None else "")
            + (f", seed {seed}" if len(cfg.seeds) > 1 else "")
            + (f", at most {per_class} training images per class" if per_class else "")
        )
        if is_rank_zero():
            where.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = open_data(cfg, (fold, cfg.folds) if fold is not None else None)
    if per_class is not None:  # one order per fold, whatever the seed and N: the subsets are nested
        data = cap_per_class(data, per_class, seed=10_000 + (fold or 0))
    unit_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
    run_split(unit_cfg, data, where, models, left_out)
    return where


def launched_run_dir(cfg: StudyConfig, name: str) -> Path:
    """The run folder of a run whose ranks torchrun or SLURM started: every rank computes the same name without
    talking to the others (``--name``, else the data's name and the launch's id), and rank 0 makes it. A folder
    that holds an earlier run is continued only with ``--resume``."""
    if not cfg.name:
        launch = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if launch == "none":
            raise FerlabError(
                "Started by torchrun without --standalone or --rdzv-id, the ranks cannot agree on a run folder; "
                "pass --name."
            )
        name = f"{name}-{launch}"
    path = Path(cfg.out) / name
    if is_rank_zero():
        if (path / "config.yaml").is_file():
            raise FerlabError(f"{path} holds an earlier run; continue it with --resume {path}, or pass another --name.")
        path.mkdir(parents=True, exist_ok=True)
    return path


def place_run(cfg: StudyConfig, models: list[str], resume: Path | None) -> Path:
    """The run folder: the one being resumed, the one rank 0 made (for the other ranks of a multi-process run,
    which Lightning starts with this process's environment), or a new one."""
    if resume is not None:
        return resume
    inherited = os.environ.get("FERLAB_RUN_DIR")
    if inherited and not is_rank_zero():
        return Path(inherited)
    name = cfg.name or (Path(cfg.data.data).name if cfg.data.data else "demo-synthetic")
    if not is_rank_zero() or (is_distributed(cfg.train) and os.environ.get("RANK")):
        return launched_run_dir(cfg, name)
    run_dir = unique_dir(Path(cfg.out), name + ("" if len(models) > 1 else f"-{models[0]}"))
    os.environ["FERLAB_RUN_DIR"] = str(run_dir)  # for ranks Lightning may start later
    return run_dir
