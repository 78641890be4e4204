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
import ctypes
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback, EarlyStopping
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset
from torchvision.transforms import v2

from ferlab.config import TrainConfig
from ferlab.data import Data
from ferlab.models import REGISTRY, Net, Normalize

for _name in (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.fabric.utilities.seed",
):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # the frozen part, on purpose
warnings.filterwarnings("ignore", ".*number of training batches.*smaller than the logging interval.*")


_ALLOCATOR_TUNED = False


def keep_freed_memory() -> None:
    """Let glibc keep large freed blocks for reuse instead of handing them back to the OS.

    A CPU training step frees and reallocates the same large buffers every time (activations, and the 300 MB
    gradient of baseline-cnn's dense layer). By default glibc serves such blocks with mmap and unmaps them
    on free, so every step pays page faults on fresh memory; with this, a baseline-cnn step went from 0.69 s
    to 0.37 s on a 2-core CPU. No-op where glibc is absent.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GiB come from the reusable heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap instead of trimming
    except (OSError, AttributeError):
        pass
    _ALLOCATOR_TUNED = True


def face_augment() -> v2.Transform:
    """Augmentation suited to faces: mirror, small rotation/scale/shift, brightness/contrast."""
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.92, 1.08)),
            v2.ColorJitter(brightness=0.25, contrast=0.25),
        ]
    )


class Augment(nn.Module):
    """Applies a transform to each image of a uint8 batch with its own random parameters."""

    def __init__(self, transform: v2.Transform):
        super().__init__()
        self.transform = transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.transform(img) for img in x])


class Classifier(L.LightningModule):
    """``frozen`` (no gradients, eval mode) then ``trainable``; one shared step for train and val
    (the test split is predicted once, outside the Trainer, on the restored best weights)."""

    def __init__(
        self,
        frozen: nn.Module,
        trainable: nn.Module,
        num_classes: int,
        lr: float,
        augment: nn.Module | None = None,
    ):
        super().__init__()
        self.frozen, self.trainable, self.augment, self.lr = frozen, trainable, augment, lr
        # ModuleDict keys must not shadow nn.Module attributes such as .train
        self.acc = nn.ModuleDict(
            {
                f"{s}_acc": torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro")
                for s in ("train", "val")
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.frozen(x)
        return self.trainable(x)

    def on_train_epoch_start(self) -> None:
        self.trainable.train()
        self.frozen.eval()  # frozen batch-norm statistics must not drift either

    def step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        x, y = batch
        if split == "train" and self.augment is not None:
            x = self.augment(x)
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        acc = self.acc[f"{split}_acc"]
        acc(logits, y)
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        self.log(f"{split}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self.step(batch, "val")

    def configure_optimizers(self):
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        # the fused kernel is ~2x faster on CPU for the 75M-parameter dense layer of baseline-cnn
        return torch.optim.Adam(params, lr=self.lr, fused=True)


class EpochTable(Callback):
    """One row per epoch: the per-epoch CSV, and what the report plots."""

    def __init__(self, stage: int, first_epoch: int, echo: bool = False):
        self.stage, self.first, self.rows, self.echo = stage, first_epoch, [], echo

    def on_train_epoch_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):  # runs after that epoch's validation
        m = trainer.callback_metrics
        self.rows.append(
            {
                "epoch": self.first + trainer.current_epoch,
                "stage": self.stage,
                **{f"{s}_{k}": round(float(m[f"{s}/{k}"]), 6) for s in ("train", "val") for k in ("loss", "acc")},
                "seconds": round(time.perf_counter() - self.t0, 3),
            }
        )
        if self.echo:  # without a progress bar, one line per epoch (as Keras' verbose=2)
            r = self.rows[-1]
            print(
                f"  epoch {r['epoch']:3d} (stage {r['stage']}): train acc {r['train_acc']:.4f} loss "
                f"{r['train_loss']:.4f}, val acc {r['val_acc']:.4f} loss {r['val_loss']:.4f}, "
                f"{r['seconds']:.1f} s",
                file=sys.stderr,
                flush=True,
            )


class KeepBest(Callback):
    """Keeps the weights of the best validation accuracy in memory (strictly better wins, as in Keras)."""

    def __init__(self, module: nn.Module):
        self.module, self.best, self.state = module, -math.inf, None
        self.offset = 0  # epochs of earlier stages: best_epoch counts across stages (0-based)
        self.best_epoch = 0

    def on_train_epoch_end(self, trainer, pl_module):
        acc = float(trainer.callback_metrics["val/acc"])
        if acc > self.best:
            self.best, self.best_epoch = acc, self.offset + trainer.current_epoch
            self.state = copy.deepcopy(self.module.state_dict())


@dataclass
class FitResult:
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0  # 1-based, counted across stages
    best_val_acc: float = 0.0
    train_acc: float = 0.0  # training accuracy of the best epoch
    seconds: float = 0.0
    precision: str = "32"
    stages: int = 1


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: mixed precision on CUDA (bf16 where supported), fp32 on CPU."""
    if precision != "auto":
        return precision
    if _device(accelerator).type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32"


def _device(accelerator: str) -> torch.device:
    """Where the Trainer will put this process's model: its CUDA device when asked for or available (under
    multi-GPU DDP each process is started with its ``LOCAL_RANK``), else the CPU."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _autocast(device: torch.device, precision: str):
    """The Trainer's mixed precision, for the frozen pass that runs outside it."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """Whole batches sliced from in-memory tensors: no per-item collation."""
    ds = TensorDataset(x, y)
    sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(ds)
    return DataLoader(
        ds,
        sampler=BatchSampler(sampler, batch_size, drop_last=False),
        batch_size=None,
        pin_memory=torch.cuda.is_available(),
    )


def _inference_batch(module: nn.Module, x: torch.Tensor, device: torch.device) -> int:
    """64 images a pass at 100x100 px; on a CPU proportionally fewer for a larger backbone input: on 2 cores,
    VGG16 at 224x224 ran 1.2x faster per image in batches of 8-16 than of 64 (MobileNetV2 likewise), while
    the CNNs at 100x100 run as fast or faster in 64s."""
    if device.type != "cpu":
        return 64
    first = next(iter(module), None) if isinstance(module, nn.Sequential) else getattr(module, "normalize", None)
    side = (first.size if isinstance(first, Normalize) else None) or x.shape[-1]
    return max(1, min(64, 64 * 100 * 100 // (side * side)))


@torch.inference_mode()
def run_batches(module: nn.Module, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """``module`` over ``x`` in eval mode, ``batch_size`` images at a time (default: 12 for a 224x224 backbone
    on a CPU, 64 otherwise; see :func:`_inference_batch`)."""
    module.eval()
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    batch_size = batch_size or _inference_batch(module, x, device)
    return (
        torch.cat([module(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])
        if len(x)
        else torch.empty(0)
    )


def _stages(name: str, cfg: TrainConfig) -> list[tuple[int | None, float, bool]]:
    """(trainable units, learning rate, augment) per stage."""
    aug = cfg.augment == "on"
    if not REGISTRY[name].transfer:
        return [(None, cfg.lr, aug)]
    stages = [(0, cfg.lr, aug)]
    if cfg.fine_tune and cfg.fine_tune_layers > 0:
        stages.append((cfg.fine_tune_layers, cfg.fine_tune_lr, cfg.augment in ("on", "fine-tune")))
    return stages


def _cache_fits(module: nn.Module, x: torch.Tensor, share: float = 0.25) -> bool:
    """Whether ``module``'s output for all of ``x`` fits in ``share`` of this machine's memory."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return True
    per_image = run_batches(module, x[:1]).numel() * 4 if len(x) else 0
    return per_image * len(x) <= share * ram


def fit_model(name: str, net: Net, data: Data, cfg: TrainConfig) -> FitResult:
    """Train ``net`` in place on ``data``'s train split, choosing weights on its val split."""
    keep_freed_memory()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    precision = resolve_precision(cfg.precision, cfg.accelerator)
    train, val = data.splits["train"], data.splits["val"]
    result = FitResult(precision=precision)
    keep = KeepBest(net)
    t0 = time.perf_counter()
    stages = _stages(name, cfg)
    # Whatever is frozen in a stage without augmentation is run once over the data; all such stages share
    # the output of their common frozen prefix, so the backbone runs over the data once per fit.
    cached = [cfg.feature_cache and not aug and net.cut(units) > 0 for units, _, aug in stages]
    shared_cut = min((net.cut(u) for (u, _, _), c in zip(stages, cached) if c), default=0)
    shared = None
    device = _device(cfg.accelerator)
    if shared_cut:
        prefix = net.part(None, shared_cut)
        if _cache_fits(prefix, train.images):
            with _autocast(device, precision):
                prefix.to(device)
                shared = {"train": run_batches(prefix, train.images), "val": run_batches(prefix, val.images)}
        else:
            print(
                f"ferlab: {name}: the frozen layers' output for {len(train)} images would not fit in a quarter "
                "of this machine's memory; running them every step instead (slower, same result).",
                file=sys.stderr,
            )
    for stage, (units, lr, aug) in enumerate(stages, start=1):
        cut = net.cut(units)
        frozen, trainable = net.split_at(units)
        for p in frozen.parameters():
            p.requires_grad_(False)
        for p in trainable.parameters():
            p.requires_grad_(True)
        xs = {"train": train.images, "val": val.images}
        if cached[stage - 1] and shared is not None:
            between = net.part(shared_cut, cut).to(device)  # frozen layers this stage adds to the shared prefix
            with _autocast(device, precision):
                xs = {s: run_batches(between, x) if len(between) else x for s, x in shared.items()}
            frozen = nn.Identity()
        module = Classifier(frozen, trainable, len(data.classes), lr, Augment(face_augment()) if aug else None)
        table = EpochTable(stage, first_epoch=len(result.epochs) + 1, echo=not cfg.progress)
        keep.offset = len(result.epochs)
        trainer = L.Trainer(
            max_epochs=cfg.max_epochs,
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            precision=precision,
            callbacks=[table, keep, EarlyStopping("val/acc", mode="max", patience=cfg.patience)],
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            enable_progress_bar=cfg.progress,
            deterministic=False,
        )
        trainer.fit(
            module,
            _loader(xs["train"], train.labels, cfg.batch_size, True, cfg.seed + stage),
            _loader(xs["val"], val.labels, cfg.batch_size, False, 0),
        )
        result.epochs += table.rows
        if keep.state is not None:
            net.load_state_dict(keep.state)
    result.seconds = time.perf_counter() - t0
    best = result.epochs[keep.best_epoch]
    result.best_epoch, result.best_val_acc, result.train_acc = best["epoch"], best["val_acc"], best["train_acc"]
    result.stages = stage
    for p in net.parameters():  # back to the stage-1 state: what the summary and a rebuilt model show
        p.requires_grad_(False)
    for p in net.split_at(0 if REGISTRY[name].transfer else None)[1].parameters():
        p.requires_grad_(True)
    net.cpu().eval()  # the frozen pass may have left layers on the GPU that the Trainer never saw
    return result
