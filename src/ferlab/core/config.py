"""One typed config tree with defaults in code; YAML files and CLI flags override it strictly.

    >>> cfg = StudyConfig()
    >>> cfg = merge(cfg, {"train": {"max_epochs": 5}})
    >>> cfg.train.max_epochs
    5

Every field carries its help text, so the CLI flags (``--max-epochs``) come from here for free. An unknown
key or a value of the wrong type is a :class:`FerlabError` naming what was expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ferlab.core.errors import FerlabError


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its one-line help text (and default factory for lists)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataConfig:
    data: str | None = opt(
        None, "image folder: DIR/<class>/*.png or DIR/{train,val,test}/<class>/; none = the built-in synthetic demo set"
    )
    test_dir: str | None = opt(None, "separate folder-per-class test set (overrides any test split)")
    image_size: int = opt(100, "images are resized to SIZE x SIZE pixels")
    split: list[float] = opt([0.8, 0.1, 0.1], "train/val/test fractions for splits that must be made")
    group_by: str | None = opt(
        None,
        "regex on the file name whose first group keeps a group in one split "
        r"(CK+48 subjects: '^(S\d+)_')",
    )
    labels: str | None = opt(
        None,
        "CSV of per-class votes (a 'file' column relative to the data folder, then one column of votes per class, "
        "as FER+'s): classes and labels come from the votes' majority instead of the folder names",
    )
    drop_classes: list[str] = opt([], "classes to leave out (e.g. contempt): class folders, or the votes' classes")
    max_pixels: int = opt(40_000_000, "images with more pixels are skipped as decompression bombs")
    face_crop: str = opt(
        "off",
        "crop the largest face before resizing: off, auto (when found) or on (skip images without a face)",
        choices=("off", "auto", "on"),
    )
    face_margin: float = opt(0.2, "margin added around a detected face box, as a fraction of its size")
    face_detector: str = opt(
        "yunet",
        "face detector for --face-crop and for predicting photos: yunet (OpenCV's YuNet CNN) or haar (OpenCV's "
        "Haar cascade); recorded in the checkpoint, so prediction uses the one training used",
        choices=("yunet", "haar"),
    )
    grayscale: str = opt(
        "auto",
        "convert images to grayscale (replicated to 3 channels) in training and prediction: auto (when every "
        "training image is grayscale, so colour photos are later seen as the model saw its data), on or off",
        choices=("auto", "on", "off"),
    )


@dataclass
class TrainConfig:
    max_epochs: int = opt(100, "most epochs per training stage")
    batch_size: int = opt(32, "images per optimisation step")
    lr: float = opt(1e-3, "learning rate (the peak of a schedule)")
    optimizer: str = opt("adam", "adam, adamw or sgd (momentum 0.9, Nesterov)", choices=("adam", "adamw", "sgd"))
    weight_decay: float = opt(0.0, "weight decay (decoupled for adamw)")
    schedule: str = opt(
        "constant",
        "learning-rate schedule per stage: constant, or cosine (linear warm-up over the first 5% of the "
        "stage's max epochs, then cosine decay to zero at the last)",
        choices=("constant", "cosine"),
    )
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy loss")
    class_balance: float = opt(
        0.0,
        "weight each class's training loss by its count of training images to the power -B, scaled so the "
        "average image weighs 1: 0 unweighted, 1 inverse frequency, 0.5 its square root (for rare classes)",
    )
    logger: str = opt(
        "tensorboard",
        "experiment tracking through Lightning's loggers: tensorboard (event files in each model's folder: "
        "tensorboard --logdir runs/), csv, mlflow ($MLFLOW_TRACKING_URI, else ./mlruns) or none",
        choices=("tensorboard", "csv", "mlflow", "none"),
    )
    vote_target: str = opt(
        "distribution",
        "with --labels votes: train on each image's vote distribution (cross-entropy to the normalised votes) "
        "or on its majority label",
        choices=("distribution", "majority"),
    )
    patience: int = opt(10, "early stopping: epochs without a better validation accuracy (0: never stop early)")
    seed: int = opt(0, "seed for the split, initialisation, shuffling and augmentation")
    precision: str = opt(
        "auto",
        "32, bf16-mixed, 16-mixed or auto (on a CPU: whichever of fp32 and bf16-mixed trained this model faster "
        "when timed on this machine, cached per CPU, core count and torch version; on CUDA: mixed precision)",
        choices=("auto", "32", "bf16-mixed", "16-mixed"),
    )
    precision_by_model: dict[str, str] = opt(
        {},
        "per model, the precision --precision auto trains it in: a run writes here what auto decided before "
        "training, so its config.yaml trains the same arithmetic again (config files only)",
        choices=("32", "bf16-mixed", "16-mixed"),
    )
    augment: str = opt(
        "auto",
        "face augmentation (flip, small affine, brightness/contrast) on training batches: off, on (every "
        "stage of every model), fine-tune (stage 2 of transfer models; the frozen part then runs every step) or "
        "auto (emotion-transfer's stage 2, chosen on validation; off for the other models)",
        choices=("auto", "off", "on", "fine-tune"),
    )
    rotate: float = opt(10.0, "augmentation: largest rotation, degrees")
    shift: float = opt(0.06, "augmentation: largest shift, as a fraction of the image side")
    zoom: float = opt(0.08, "augmentation: largest scale change, as a fraction")
    jitter: float = opt(0.25, "augmentation: largest brightness and contrast change, as a fraction")
    erase: float = opt(0.0, "augmentation: probability of erasing a random rectangle (cutout)")
    tta: bool = opt(False, "test-time augmentation: average the logits of each image and its mirror image")
    weights: str = opt("imagenet", "transfer-model backbone weights: imagenet, none or a .pth state dict")
    init: str | None = opt(
        None,
        "emotion-transfer's starting point: a shipped model's name (ferplus, fer2013) or a ferlab checkpoint of a "
        "vgg-small or vgg-medium (default: fer2013, chosen on validation); `train --init` trains emotion-transfer",
    )
    backbone_size: int = opt(
        224,
        "transfer models resize the image to SIZE x SIZE inside the model, for their backbone (ImageNet's 224 "
        "by default: on CK+48 its features are 21 points better than at 100, at 5x the compute); 0 keeps the "
        "image size",
    )
    fine_tune: bool = opt(True, "transfer models: stage 2 unfreezes the backbone's last layer(s)")
    fine_tune_lr: float = opt(1e-4, "learning rate of fine-tuning stage 2")
    fine_tune_layers: int = opt(
        1,
        "how many of the backbone's last layers stage 2 unfreezes (VGG16: conv layers, 3 = block 5; "
        "MobileNetV2: inverted-residual blocks)",
    )
    feature_cache: bool = opt(
        True,
        "run a frozen, unaugmented backbone once and train on its cached features (same result, many times faster)",
    )
    progress: bool = opt(
        True, "show a progress bar when stderr is a terminal (off, or not a terminal: one line per epoch)"
    )
    accelerator: str = opt("auto", "cpu, gpu or auto", choices=("auto", "cpu", "gpu", "cuda"))
    devices: str = opt("auto", "devices per node for the Lightning Trainer (e.g. 1, 4 or auto)")
    num_nodes: int = opt(1, "nodes for multi-node training (Lightning's num_nodes)")
    strategy: str = opt(
        "auto", "Lightning's distributed strategy: auto, ddp, ddp_spawn, ddp_find_unused_parameters_true, ..."
    )


@dataclass
class StudyConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    models: list[str] = opt([], "models to train (default: the study's models)")
    out: str = opt("runs", "parent folder of run folders")
    name: str | None = opt(None, "run folder name suffix (default: the data folder's name)")
    predict_dir: str | None = opt(None, "after the study, predict these new images with the best models")
    folds: int = opt(
        0,
        "K-fold cross-validation: every group (--group-by) in exactly one test fold, folds stratified by class, "
        "validation carved from the training folds; 0: one split",
    )
    seeds: list[int] = opt([], "repeat each study with these training seeds on the same split(s) (default: --seed)")
    per_class: list[int] = opt(
        [],
        "learning curve: with --folds, the cross-validation again with at most N training images per class, for "
        "each N (the test folds unchanged; a larger N's images hold a smaller one's)",
    )
    keep_checkpoints: bool = opt(
        False, "keep each model's per-epoch training state (training-state/) after it finishes, not only model.ckpt"
    )


def is_distributed(cfg: Any) -> bool:
    """Whether Lightning arguments (``devices``, ``num_nodes``, ``strategy`` of a TrainConfig or anything shaped
    like one) ask for more than one process."""
    devices = str(cfg.devices)
    many = (devices.isdigit() and int(devices) > 1) or "," in devices or devices == "-1"
    return many or cfg.num_nodes > 1 or cfg.strategy.startswith(("ddp", "fsdp", "deepspeed"))


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(value, inner, where)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise FerlabError(f"Config key '{where}' must be a list of {inner.__name__}, got {value!r}.")
        return [_check_type(v, inner, where) for v in value]
    if origin is dict:
        key, inner = typing.get_args(tp)
        if not isinstance(value, dict):
            what = f"a mapping of {key.__name__} to {inner.__name__}"
            raise FerlabError(f"Config key '{where}' must be {what}, got {value!r}.")
        return {_check_type(k, key, where): _check_type(v, inner, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise FerlabError(f"Config key '{where}' must be {tp.__name__}, got {value!r}.")
    return value


def merge(cfg: Any, overrides: dict[str, Any], prefix: str = "") -> Any:
    """Return a copy of ``cfg`` with ``overrides`` applied; unknown keys and wrong types are errors."""
    if not isinstance(overrides, dict):
        raise FerlabError(f"Config section '{prefix or 'top level'}' must be a mapping, got {overrides!r}.")
    hints = typing.get_type_hints(type(cfg))
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in overrides.items():
        where = f"{prefix}{key}"
        if key not in fields:
            raise FerlabError(f"Unknown config key '{where}'; expected one of: {', '.join(fields)}.")
        if dataclasses.is_dataclass(hints[key]):
            changes[key] = merge(getattr(cfg, key), value, f"{where}.")
            continue
        value = _check_type(value, hints[key], where)
        choices = fields[key].metadata.get("choices")
        if choices and isinstance(value, dict):
            bad = next((v for v in value.values() if v not in choices), None)
            if bad is not None:
                raise FerlabError(f"Config key '{where}' takes values among {', '.join(choices)}, got {bad!r}.")
        elif choices and value not in choices:
            raise FerlabError(f"Config key '{where}' must be one of {', '.join(choices)}, got {value!r}.")
        changes[key] = value
    return dataclasses.replace(cfg, **changes)


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise FerlabError(f"Cannot read config file {path}: {e.strerror}.") from None
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise FerlabError(f"Config file {path} is not valid YAML ({e.__class__.__name__}).") from None
    return loaded


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def add_flags(parser: argparse.ArgumentParser, cls: type, section: str, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per field of dataclass ``cls``; parsed values land in ``section.field`` dests."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name in skip or dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict:  # dicts: config only
            continue
        flag = "--" + f.name.replace("_", "-")
        dest = f"{section}.{f.name}"  # "" section: a top-level field
        text = f.metadata.get("help")  # argparse formats help with %: a literal "5%" must be "5%%"
        kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": text and text.replace("%", "%%")}
        inner = tp
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            inner = next(a for a in typing.get_args(tp) if a is not type(None))
        if inner is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(inner) is list:
            (elem,) = typing.get_args(inner)
            kw.update(nargs="+", type=elem, metavar=elem.__name__.upper())
        else:
            kw.update(type=inner, metavar=f.name.upper())
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kw)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Turn ``section.field`` dests of parsed flags into a nested override dict for :func:`merge`."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if "." in dest:
            section, key = dest.split(".", 1)
            if section:
                out.setdefault(section, {})[key] = value
            else:
                out[key] = value
    return out
