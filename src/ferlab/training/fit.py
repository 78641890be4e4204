"""Training with Lightning: early stopping on validation accuracy, best weights kept, per-epoch table.

    >>> result = fit_model("regularized-cnn", net, data, TrainConfig(max_epochs=3))   # doctest: +SKIP
    >>> result.epochs[-1]["val_acc"]                                                 # doctest: +SKIP

A transfer model trains in two stages: the head alone on a frozen base, then (``fine_tune``) the base's last
``fine_tune_layers`` layers too at a lower learning rate; the best-validation weights win across both.
Whatever is frozen and sees no augmentation is run once over the data, once for both stages, and its output
cached, so epochs only run what trains.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from ferlab.core.config import TrainConfig, is_distributed
from ferlab.core.errors import FerlabError
from ferlab.core.files import atomic
from ferlab.data.datasets import Data
from ferlab.inference.model import run_batches
from ferlab.models.registry import EMOTION_TRANSFER, REGISTRY, Net
from ferlab.training.features import Features
from ferlab.training.memory import keep_freed_memory
from ferlab.training.precision import choose
from ferlab.training.tracking import log_epoch

warnings.filterwarnings("ignore", ".*number of training batches.*smaller than the logging interval.*")


class Augment(nn.Module):
    """Face augmentation of a whole uint8 batch at once, each image with its own random draw: mirror, rotation,
    scale and shift (one affine resampling, reflected borders), brightness and contrast, and optionally
    erasing a random rectangle (cutout). Returns floats in [0, 1], which every model's ``normalize`` takes.
    """

    def __init__(
        self, rotate: float = 10.0, shift: float = 0.06, zoom: float = 0.08, jitter: float = 0.25, erase: float = 0.0
    ):
        super().__init__()
        self.rotate, self.shift, self.zoom, self.jitter, self.erase = rotate, shift, zoom, jitter, erase

    @staticmethod
    def _uniform(n: int, low: float, high: float) -> torch.Tensor:
        return torch.rand(n) * (high - low) + low

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        angle = torch.deg2rad(self._uniform(n, -self.rotate, self.rotate))
        scale = self._uniform(n, 1 - self.zoom, 1 + self.zoom)
        mirror = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = cos * mirror, -sin
        theta[:, 1, 0], theta[:, 1, 1] = sin * mirror, cos
        theta[:, :, 2] = self._uniform(2 * n, -2 * self.shift, 2 * self.shift).view(n, 2)  # [-1, 1] spans the side
        grid = nn.functional.affine_grid(theta.to(x.device), [n, 1, h, w], align_corners=False)
        x = nn.functional.grid_sample(
            x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False
        )
        if self.jitter:
            mean = x.mean((1, 2, 3), keepdim=True)
            contrast = self._uniform(n, 1 - self.jitter, 1 + self.jitter).view(n, 1, 1, 1).to(x.device)
            bright = self._uniform(n, 1 - self.jitter, 1 + self.jitter).view(n, 1, 1, 1).to(x.device)
            x = ((x - mean) * contrast + mean) * bright
        if self.erase:
            area = self._uniform(n, 0.02, 0.2) * h * w
            aspect = torch.exp(self._uniform(n, -1.2, 1.2))
            eh, ew = (area * aspect).sqrt().clamp(max=h), (area / aspect).sqrt().clamp(max=w)
            y0, x0 = torch.rand(n) * (h - eh), torch.rand(n) * (w - ew)
            rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
            box = (
                (rows >= y0.view(n, 1, 1))
                & (rows < (y0 + eh).view(n, 1, 1))
                & (cols >= x0.view(n, 1, 1))
                & (cols < (x0 + ew).view(n, 1, 1))
                & (torch.rand(n) < self.erase).view(n, 1, 1)
            )
            x = x.masked_fill(box.unsqueeze(1).to(x.device), 0.0)
        return x.clamp(0, 1)


class Classifier(L.LightningModule):
    """``frozen`` (no gradients, eval mode) then ``trainable``; one shared step for train and val
    (the test split is predicted once, outside the Trainer, on the restored best weights)."""

    def __init__(
        self,
        frozen: nn.Module,
        trainable: nn.Module,
        num_classes: int,
        cfg: TrainConfig,
        lr: float,
        augment: nn.Module | None = None,
        tta: bool = False,
        stage: int = 1,
        class_weights: torch.Tensor | None = None,
    ):
        super().__init__()
        self.stage = stage
        self.register_buffer("class_weights", class_weights, persistent=False)  # the training loss's only
        self.frozen, self.trainable, self.augment, self.cfg, self.lr, self.tta = (
            frozen,
            trainable,
            augment,
            cfg,
            lr,
            tta,
        )
        # ModuleDict keys must not shadow nn.Module attributes such as .train
        self.acc = nn.ModuleDict(
            {
                f"{s}_acc": torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
                for s in ("train", "val")
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tta and not self.training:  # as the model's own forward does in eval mode
            return (self._forward(x) + self._forward(x.flip(-1))) / 2
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.frozen(x)
        return self.trainable(x)

    def on_train_epoch_start(self) -> None:
        self.trainable.train()
        self.frozen.eval()  # frozen batch-norm statistics must not drift either
        if self.trainer.world_size > 1:
            # every rank starts from one seed; without this each would draw the same augmentations and dropout
            # masks for its own images. Per epoch, so a resumed epoch draws what it drew the first time
            entropy = [self.cfg.seed, self.stage, self.current_epoch, self.global_rank]
            torch.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    def step(self, batch: tuple[torch.Tensor, ...], split: str) -> torch.Tensor:
        """Loss and accuracy of one batch: (images, labels) or, with votes, (images, majority, vote distribution).
        Training on votes uses the distribution as the target (``vote_target``); validation always reports the
        loss against the majority (``val/loss``, what every model reports) and against the votes."""
        x, y, votes = (*batch, None) if len(batch) == 2 else batch
        if split == "train" and self.augment is not None:
            x = self.augment(x)
        logits = self(x)
        smoothing = self.cfg.label_smoothing
        on_votes = votes is not None and split == "train" and self.cfg.vote_target == "distribution"
        weight = self.class_weights if split == "train" else None
        loss = nn.functional.cross_entropy(logits, votes if on_votes else y, weight, label_smoothing=smoothing)
        acc = self.acc[f"{split}_acc"]
        acc(logits, y)
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log(f"{split}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        if votes is not None and split == "val":
            vote_loss = nn.functional.cross_entropy(logits.float(), votes)
            self.log("val/vote_loss", vote_loss, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self.step(batch, "val")

    def configure_optimizers(self):
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        cfg = self.cfg
        # fused kernels: ~2x faster on CPU for the 75M-parameter dense layer of baseline-cnn
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(
                params, lr=self.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay, fused=True
            )
        else:
            kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
            opt = kind(params, lr=self.lr, weight_decay=cfg.weight_decay, fused=True)
        if cfg.schedule == "constant":
            return opt
        total = max(1, self.trainer.estimated_stepping_batches)
        warmup = max(1, round(0.05 * total))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class EpochTable(Callback):
    """One row per epoch: the per-epoch CSV, and what the report plots."""

    def __init__(self, stage: int, first_epoch: int, echo: bool = False, logger: Logger | None = None):
        self.stage, self.first, self.rows, self.echo, self.logger = stage, first_epoch, [], echo, logger

    @property
    def state_key(self) -> str:
        return f"EpochTable[stage={self.stage}]"

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])

    def on_train_epoch_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):  # runs after that epoch's validation
        m = trainer.callback_metrics
        self.rows.append(
            {
                "epoch": self.first + trainer.current_epoch,
                "stage": self.stage,
                **{f"{s}_{k}": round(float(m[f"{s}/{k}"]), 6) for s in ("train", "val") for k in ("loss", "acc")},
                **({"val_vote_loss": round(float(m["val/vote_loss"]), 6)} if "val/vote_loss" in m else {}),
                "seconds": round(time.perf_counter() - self.t0, 3),
            }
        )
        log_epoch(self.logger, self.rows[-1], trainer.optimizers[0].param_groups[0]["lr"])
        if self.echo and trainer.is_global_zero:  # without a progress bar, one line per epoch (Keras' verbose=2)
            r = self.rows[-1]
            print(
                f"  epoch {r['epoch']:3d} (stage {r['stage']}): train acc {r['train_acc']:.4f} loss "
                f"{r['train_loss']:.4f}, val acc {r['val_acc']:.4f} loss {r['val_loss']:.4f}"
                + (f" (votes {r['val_vote_loss']:.4f})" if "val_vote_loss" in r else "")
                + f", {r['seconds']:.1f} s",
                file=sys.stderr,
                flush=True,
            )


class KeepBest(Callback):
    """The weights of the best validation accuracy (strictly better wins, as in Keras), kept in memory and
    saved inside each training-state checkpoint, so a resumed stage continues with exactly the best it had
    when that state was written; at a stage's end :func:`fit_model` writes them beside ``progress.json``."""

    def __init__(self, module: nn.Module):
        self.module, self.best, self.state = module, -math.inf, None
        self.offset = 0  # epochs of earlier stages: best_epoch counts across stages (0-based)
        self.best_epoch = 0

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "weights": self.state}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.state = state["best"], state["best_epoch"], state.get("weights")

    def on_train_epoch_end(self, trainer, pl_module):
        acc = float(trainer.callback_metrics["val/acc"])
        if acc > self.best:
            self.best, self.best_epoch = acc, self.offset + trainer.current_epoch
            self.state = copy.deepcopy(self.module.state_dict())


class RngState(Callback):
    """The random streams the next epoch draws from (augmentation and dropout: torch's; shuffling: the sampler's
    generator), saved with each epoch's training state so a resumed run continues them exactly."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"torch": torch.get_rng_state(), "sampler": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        self.generator.set_state(state["sampler"])


class SaveState(Callback):
    """After an epoch (and every callback's bookkeeping), the whole training state through Lightning's own
    ``save_checkpoint`` (weights, optimizer, schedule, epoch, early stopping, best-epoch and RNG state),
    through :class:`AtomicCheckpointIO`: written to a temporary file and renamed into place when whole, so a kill
    at any moment leaves the previous state whole; the best weights so far travel inside it (:class:`KeepBest`).

    Written after the first epoch, then after the first epoch that ends at least :data:`STATE_EVERY` times as
    long after the last write as that write took, so writing costs at most about a tenth of training: a
    small model's state is written after nearly every epoch, baseline-cnn's (1.2 GB with its best weights)
    2-3 times in 8 epochs on two cores; a crash loses at most that much work. The epoch that ends a stage
    writes nothing: the stage's end is recorded in ``progress.json`` instead (early stopping decides when
    validation ends, before this runs). Under DDP rank zero's clock decides for every rank (the write is
    collective)."""

    def __init__(self, path: Path):
        self.path = path
        self.due = -math.inf

    def on_train_epoch_end(self, trainer, pl_module):
        last = trainer.should_stop or trainer.current_epoch + 1 >= (trainer.max_epochs or math.inf)
        if trainer.strategy.broadcast(last or time.monotonic() < self.due, src=0):
            return
        t = time.monotonic()
        trainer.save_checkpoint(self.path, weights_only=False)  # collective under DDP; rank 0 writes
        self.due = time.monotonic() + STATE_EVERY * (time.monotonic() - t)


STATE_EVERY = 10  # epochs' time between training-state writes, in multiples of the last write's time


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save checkpoint IO, writing to a temporary file that is renamed when complete.

    Synchronous on purpose: Lightning's ``AsyncCheckpointIO`` around it was measured on a 2-core CPU (6 epochs
    of baseline-cnn) at 63-64 s against 64-65 s written in line and 45-48 s not written: the background
    write competes with training for the same cores, and it cloned the 0.9 GB state first."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_save(checkpoint, Path(path))


def atomic_save(obj: object, path: Path) -> None:
    with atomic(path) as tmp:
        torch.save(obj, tmp)


@dataclass
class FitResult:
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0  # 1-based, counted across stages
    best_val_acc: float = 0.0
    train_acc: float = 0.0  # training accuracy of the best epoch
    seconds: float = 0.0
    precision: str = "32"
    precision_note: str = ""
    # a transfer model's training-split logits with the chosen weights, from the cached frozen output its
    # training used (None where nothing was cached): the fair overfitting gap without another backbone pass
    train_logits: torch.Tensor | None = None


def _loader(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None,
    distributed: bool = False,
    targets: torch.Tensor | None = None,
) -> DataLoader:
    """Batches from in-memory tensors (with ``targets``, the vote distributions, as a third tensor), shuffled by
    ``generator`` when one is given. On one process whole batches are sliced at once (no per-item collation);
    under DDP a plain loader, so Lightning can shard it."""
    ds = TensorDataset(x, y) if targets is None else TensorDataset(x, y, targets)
    pin = torch.cuda.is_available()
    if distributed and generator is None:  # validation: every image scored once across the ranks
        return DataLoader(ds, batch_size, sampler=EveryItemOnce(len(ds)), pin_memory=pin)
    if distributed:
        return DataLoader(ds, batch_size, shuffle=True, generator=generator, pin_memory=pin)
    sampler = RandomSampler(ds, generator=generator) if generator is not None else SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None, pin_memory=pin)


class EveryItemOnce(DistributedSampler):
    """One rank's share of the validation split: items rank, rank + world, ..., without the repeats Lightning's
    DistributedSampler pads with (which synchronised accuracy would count twice). The rank is read when the
    loader is iterated, once DDP has started the processes; being a DistributedSampler, Lightning keeps it."""

    def __init__(self, n: int):  # the base class would ask for the process group, not made yet
        self.n = n

    def _mine(self) -> range:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return range(torch.distributed.get_rank(), self.n, torch.distributed.get_world_size())
        return range(self.n)

    def __iter__(self) -> Iterator[int]:
        return iter(self._mine())

    def __len__(self) -> int:
        return len(self._mine())

    def set_epoch(self, epoch: int) -> None:  # the order never changes
        pass


def is_rank_zero() -> bool:
    """Whether this process is rank 0 of a multi-process run (torchrun, SLURM or Lightning's own launcher,
    which starts the other ranks with LOCAL_RANK set), or the only process."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var]) == 0
    return int(os.environ.get("LOCAL_RANK", "0") or 0) == 0 and int(os.environ.get("NODE_RANK", "0") or 0) == 0


def _stages(name: str, cfg: TrainConfig) -> list[tuple[int | None, float, bool]]:
    """(trainable units, learning rate, augment) per stage."""
    aug = cfg.augment == "on"
    if not REGISTRY[name].transfer:
        return [(None, cfg.lr, aug)]
    stages = [(0, cfg.lr, aug)]
    # an emotion model's every layer already knows faces: its second stage tunes them all (None)
    units = None if name == EMOTION_TRANSFER else cfg.fine_tune_layers
    tuned = cfg.augment in ("on", "fine-tune") or (cfg.augment == "auto" and name == EMOTION_TRANSFER)
    if cfg.fine_tune and (units is None or units > 0):
        stages.append((units, cfg.fine_tune_lr, tuned))
    return stages


def fit_model(
    name: str, net: Net, data: Data, cfg: TrainConfig, state_dir: Path | None = None, logger: Logger | None = None
) -> FitResult:
    """Train ``net`` in place on ``data``'s train split, choosing weights on its val split; each epoch's row
    also goes to ``logger`` (see :mod:`ferlab.training.tracking`).

    With ``state_dir``, the training state is written there as epochs end (``stage<k>-last.ckpt``, how often:
    :class:`SaveState`; finished stages in ``progress.json``, their best weights in ``best-stage<k>.pt``), and
    a fit that finds such a folder continues from the last epoch written: the result is the same as an
    uninterrupted fit's on the same machine.
    """
    keep_freed_memory()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    recorded = cfg.precision_by_model.get(name) if cfg.precision == "auto" else None
    size, side = data.pre.image_size, net.normalize.size
    choice = choose(name, len(data.classes), size, cfg.batch_size, cfg.accelerator, cfg.precision, recorded, side)
    if choice.measured != "forced" and is_rank_zero():
        print(choice.message(name), file=sys.stderr, flush=True)
    result = FitResult(precision=choice.precision, precision_note=choice.message(name).removeprefix("ferlab: "))
    keep = KeepBest(net)
    done_stages = _resume(state_dir, result, keep, net)
    t0 = time.perf_counter() - (sum(e["seconds"] for e in result.epochs) if result.epochs else 0.0)
    stages = _stages(name, cfg)
    # Whatever is frozen in a stage without augmentation is run once over the data; all such stages share
    # the output of their common frozen prefix, so the backbone runs over the data once per fit.
    cached = [cfg.feature_cache and not aug and net.cut(units) > 0 for units, _, aug in stages]
    features = Features.of(name, net, data, stages[done_stages:], cached[done_stages:], cfg, choice.precision)
    for stage, (units, lr, aug) in enumerate(stages, start=1):
        if stage > done_stages:
            inputs = features.inputs(net, units, data) if cached[stage - 1] else None
            run = (choice.precision, result, keep, state_dir, logger)
            _fit_stage(stage, units, lr, aug, inputs, net, data, cfg, *run)
    result.seconds = time.perf_counter() - t0
    best = result.epochs[keep.best_epoch]
    result.best_epoch, result.best_val_acc, result.train_acc = best["epoch"], best["val_acc"], best["train_acc"]
    for p in net.parameters():  # back to the stage-1 state: what the summary and a rebuilt model show
        p.requires_grad_(False)
    for p in net.split_at(0 if REGISTRY[name].transfer else None)[1].parameters():
        p.requires_grad_(True)
    net.cpu().eval()  # the frozen pass may have left layers on the GPU that the Trainer never saw
    # the cached output is the chosen weights' only when no stage trained the layers below the cache's cut
    if features.shared is not None and all(cached[done_stages:]) and is_rank_zero():
        result.train_logits = run_batches(net.part(features.cut, None), features.shared["train"].cpu().float())
    return result


def class_weights(labels: torch.Tensor, num_classes: int, power: float) -> torch.Tensor | None:
    """Each class's loss weight, its count of images to the power ``-power``, scaled so the images' mean weight
    is 1 (so the learning rate means what it meant unweighted); None for ``power`` 0. With votes the count is
    of majority labels."""
    if power == 0:
        return None
    counts = torch.bincount(labels, minlength=num_classes).double()
    w = counts.clamp(min=1).pow(-power)  # loading refuses a class without training images; a subset may not
    return (w * len(labels) / (w * counts).sum()).float()


def _resume(state_dir: Path | None, result: FitResult, keep: KeepBest, net: Net) -> int:
    """Stages a resumed fit finished already (their epochs into ``result``, their best weights into ``net``)."""
    if state_dir is None:
        return 0
    state_dir.mkdir(parents=True, exist_ok=True)
    progress = state_dir / "progress.json"
    if not progress.is_file():
        return 0
    saved = json.loads(progress.read_text())
    if "best" not in saved:
        raise FerlabError(
            f"{state_dir} was written by an earlier ferlab whose training state this one cannot continue; "
            "start the run again."
        )
    result.epochs = saved["epochs"]
    if saved["best"] and (state_dir / saved["best"]).is_file():
        keep.load_state_dict(torch.load(state_dir / saved["best"], map_location="cpu", weights_only=True))
        net.load_state_dict(keep.state)
    return saved["stages_done"]


def _fit_stage(
    stage: int,
    units: int | None,
    lr: float,
    aug: bool,
    inputs: dict[str, torch.Tensor] | None,
    net: Net,
    data: Data,
    cfg: TrainConfig,
    precision: str,
    result: FitResult,
    keep: KeepBest,
    state_dir: Path | None,
    logger: Logger | None = None,
) -> None:
    """One stage: ``units`` trainable (None: all), the rest frozen; epochs and best weights into ``result``/``keep``."""
    # each stage's random streams start from its own seed, so a resumed fit that begins here draws what an
    # uninterrupted one does
    L.seed_everything(cfg.seed + stage - 1, workers=True, verbose=False)
    frozen, trainable = net.split_at(units)
    for p in frozen.parameters():
        p.requires_grad_(False)
    for p in trainable.parameters():
        p.requires_grad_(True)
    train, val = data.splits["train"], data.splits["val"]
    xs = inputs or {"train": train.images, "val": val.images}
    if inputs is not None:
        frozen = nn.Identity()
    augment = Augment(cfg.rotate, cfg.shift, cfg.zoom, cfg.jitter, cfg.erase) if aug else None
    # test-time augmentation in validation too, so the chosen epoch is chosen as the model will predict
    # (not on cached features, which cannot be mirrored)
    weights = class_weights(train.labels, len(data.classes), cfg.class_balance)
    module = Classifier(
        frozen, trainable, len(data.classes), cfg, lr, augment, cfg.tta and inputs is None, stage, weights
    )
    bar = cfg.progress and sys.stderr.isatty()  # a log file gets one line per epoch, not bar frames
    table = EpochTable(stage, first_epoch=len(result.epochs) + 1, echo=not bar, logger=logger)
    keep.offset = len(result.epochs)
    generator = torch.Generator().manual_seed(cfg.seed + stage)
    last = None if state_dir is None else state_dir / f"stage{stage}-last.ckpt"
    trainer = _trainer(cfg, precision, _callbacks(cfg, table, keep, generator, last), last is not None, bar)
    distributed = is_distributed(cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*checkpoint.*")  # resuming from our own state file
        try:
            trainer.fit(
                module,
                _loader(xs["train"], train.labels, cfg.batch_size, generator, distributed, train.targets),
                _loader(xs["val"], val.labels, cfg.batch_size, None, distributed, val.targets),
                ckpt_path=str(last) if last is not None and last.is_file() else None,
            )
        except SystemExit as e:  # Lightning turns Ctrl-C into exit(1): ferlab answers it as everywhere else
            if isinstance(e.__context__, KeyboardInterrupt):
                signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores a second Ctrl-C
                raise KeyboardInterrupt from None
            raise
    result.epochs += table.rows
    if keep.state is not None:
        net.load_state_dict(keep.state)
    if state_dir is not None and is_rank_zero():
        _record_stage(state_dir, stage, keep, result, last)


def _callbacks(
    cfg: TrainConfig, table: EpochTable, keep: KeepBest, generator: torch.Generator, last: Path | None
) -> list[Callback]:
    callbacks: list[Callback] = [table, keep, RngState(generator)]
    if cfg.patience > 0:
        # checked when validation ends, before the epoch-end callbacks: the state SaveState writes then
        # holds this epoch's verdict (checked after it, a resumed fit lost one epoch of patience)
        callbacks.append(EarlyStopping("val/acc", mode="max", patience=cfg.patience, check_on_train_epoch_end=False))
    if last is not None:
        callbacks.append(SaveState(last))
    return callbacks


def _trainer(cfg: TrainConfig, precision: str, callbacks: list[Callback], saves: bool, bar: bool) -> L.Trainer:
    return L.Trainer(
        max_epochs=cfg.max_epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=precision,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()] if saves else None,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        enable_progress_bar=bar,
        deterministic=False,
    )


def _record_stage(state_dir: Path, stage: int, keep: KeepBest, result: FitResult, last: Path) -> None:
    """A finished stage: its best weights in a file of its own, then progress.json naming it (a kill between the
    two leaves the previous stage's record and file as they were); the stage's in-progress state goes."""
    best = f"best-stage{stage}.pt" if keep.state is not None else ""
    if best:
        atomic_save(keep.state_dict(), state_dir / best)
    write_json(state_dir / "progress.json", {"stages_done": stage, "epochs": result.epochs, "best": best})
    for old in state_dir.glob("best-stage*.pt"):
        if old.name != best:
            old.unlink(missing_ok=True)
    last.unlink(missing_ok=True)


def write_json(path: Path, obj: object) -> None:
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(obj))
