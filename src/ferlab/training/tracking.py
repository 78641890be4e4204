"""Experiment tracking through Lightning's loggers: each model's epochs and, once it is tested, its confusion
matrix and misclassified test images, for TensorBoard (the default), MLflow or Lightning's CSV logger.

    tensorboard --logdir runs/      # every run, fold and model side by side, each named by its folder

TensorBoard's event files go into each model's folder (``runs/<run>/[fold-k/]<model>/events.out.tfevents.*``),
so a run's curves travel with it. MLflow logs to ``$MLFLOW_TRACKING_URI``, or to ``./mlruns`` when none is set
(``pip install 'ferlab[mlflow]'``). The CSV logger writes ``<model>/csv/metrics.csv``. Epochs are numbered as in
``epochs.csv``, continuing across a transfer model's two stages.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger
from PIL import Image

from ferlab.core.errors import FerlabError

LOGGERS = ("tensorboard", "csv", "mlflow", "none")
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "'ferlab[mlflow]'")}


def check_logger(kind: str) -> None:
    """A FerlabError, before any work, when ``kind``'s package is not installed."""
    if kind in NEEDS:
        module, package = NEEDS[kind]
        if importlib.util.find_spec(module) is None:
            raise FerlabError(f"--logger {kind} needs {module}: pip install {package} (or pass --logger none).")


def open_logger(kind: str, folder: Path, name: str) -> Logger | None:
    """The logger of one model's training, writing into (or, for MLflow, naming its run after) ``folder``."""
    if kind == "tensorboard":
        return TensorBoardLogger(folder, name="", version="", default_hp_metric=False)
    if kind == "csv":
        return CSVLogger(folder, name="", version="csv")
    if kind == "mlflow":
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a folder beside the runs, as MLflow's own default was: MLflow 3 asks to allow it explicitly
            uri = Path("mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return MLFlowLogger(experiment_name="ferlab", run_name=name, tracking_uri=uri)
    return None


def log_epoch(logger: Logger | None, row: dict, lr: float) -> None:
    """One row of the epoch table (the numbers ``epochs.csv`` holds) at step = its epoch."""
    if logger is None:
        return
    metrics = {f"{split}/{what}": row[f"{split}_{what}"] for split in ("train", "val") for what in ("loss", "acc")}
    if "val_vote_loss" in row:
        metrics["val/vote_loss"] = row["val_vote_loss"]
    logger.log_metrics({**metrics, "lr": lr, "epoch_seconds": row["seconds"], "stage": row["stage"]}, row["epoch"])


def log_test(logger: Logger | None, confusion_png: Path, wrong: torch.Tensor, captions: Sequence[str]) -> None:
    """The test split's confusion-matrix plot and its misclassified images (``wrong``: N x 3 x H x W uint8, at
    most a grid's worth, named by ``captions``), then the logger is closed."""
    if logger is None:
        return
    confusion = np.asarray(Image.open(confusion_png).convert("RGB"))
    if isinstance(logger, TensorBoardLogger):
        from torchvision.utils import make_grid

        writer = logger.experiment
        writer.add_image("test/confusion_matrix", confusion, 0, dataformats="HWC")
        if len(wrong):
            writer.add_image("test/misclassified", make_grid(wrong, nrow=8, padding=2, pad_value=255), 0)
            writer.add_text("test/misclassified", "  \n".join(captions), 0)
    elif isinstance(logger, MLFlowLogger):
        client = logger.experiment
        client.log_image(logger.run_id, confusion, "confusion_matrix.png")
        if len(wrong):
            grid = np.concatenate([np.transpose(w.numpy(), (1, 2, 0)) for w in wrong[:8]], axis=1)
            client.log_image(logger.run_id, grid, "misclassified.png")
            client.log_text(logger.run_id, "\n".join(captions), "misclassified.txt")
    logger.finalize("success")
