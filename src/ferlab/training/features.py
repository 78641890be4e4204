"""The frozen layers' output, computed once: per fit for both stages of a transfer model, and per process for
every fit whose frozen layers and images are the same.

    >>> features = Features.of("vgg16-transfer", net, data, stages, cached, cfg, "bf16-mixed")   # doctest: +SKIP
    >>> features.inputs(net, units, data)["train"].shape                                          # doctest: +SKIP

The folds of a cross-validation (and its learning curve, and its seeds) train on the same images through the
same frozen ImageNet layers: VGG16's frozen pass at 224 px was a minute of each CK+48 fold on two cores.
:data:`MEMO` keeps each image's output across the fits of one process, keyed by the frozen layers' weights, the
precision and the image's bytes, so an image runs through them once per run, not once per fold. An image's
output does not depend on the batch it ran in, so a fit gives what it would have given alone.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from ferlab.core.config import TrainConfig
from ferlab.data.datasets import Data
from ferlab.inference.model import run_batches
from ferlab.models.registry import Net
from ferlab.training.memory import physical_memory


def device_for(accelerator: str) -> torch.device:
    """Where the Trainer will put this process's model: its CUDA device when asked for or available (under
    multi-GPU DDP each process is started with its ``LOCAL_RANK``), else the CPU."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast(device: torch.device, precision: str):
    """The Trainer's mixed precision, for the frozen pass that runs outside it."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


class FrozenMemo:
    """Each image's output of a frozen module, kept across fits, at most ``share`` of this machine's memory
    (the least recently used module's outputs leave first)."""

    def __init__(self, share: float = 0.125) -> None:
        self.share = share
        self.groups: OrderedDict[tuple, dict[bytes, torch.Tensor]] = OrderedDict()

    @staticmethod
    def key(module: nn.Module, precision: str, device: torch.device) -> tuple:
        h = hashlib.blake2b(repr(module).encode(), digest_size=16)
        for name, t in module.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.digest(), precision, str(device)

    def outputs(self, module: nn.Module, images: torch.Tensor, precision: str, device: torch.device) -> torch.Tensor:
        """``module``'s output for ``images`` (uint8 N x C x H x W), running it only on images it has not seen."""
        if not len(images):
            return run_batches(module, images)
        key = self.key(module, precision, device)
        group = self.groups.pop(key, {})
        self.groups[key] = group  # the most recently used last
        digests = [hashlib.blake2b(img.numpy().tobytes(), digest_size=16).digest() for img in images]
        first: dict[bytes, int] = {}
        for i, d in enumerate(digests):
            if d not in group:
                first.setdefault(d, i)
        if first:
            with autocast(device, precision):
                module.to(device)
                out = run_batches(module, images[list(first.values())])
            group.update(zip(first, out))
        result = torch.stack([group[d] for d in digests])
        self.trim()
        return result

    def trim(self) -> None:
        def size() -> int:
            return sum(t.numel() * t.element_size() for g in self.groups.values() for t in g.values())

        while len(self.groups) > 1 and size() > self.share * physical_memory():
            self.groups.popitem(last=False)
        if size() > self.share * physical_memory():  # one module's outputs alone are too many: keep none
            self.groups.clear()


MEMO = FrozenMemo()


def cache_fits(module: nn.Module, x: torch.Tensor, share: float = 0.25) -> bool:
    """Whether ``module``'s output for all of ``x`` fits in ``share`` of this machine's memory."""
    per_image = run_batches(module, x[:1]).numel() * 4 if len(x) else 0
    return per_image * len(x) <= share * physical_memory()


@dataclass
class Features:
    """The frozen prefix's output over the train and val splits, computed once per fit (None: nothing cached)."""

    shared: dict[str, torch.Tensor] | None
    cut: int
    device: torch.device
    precision: str

    @classmethod
    def of(
        cls,
        name: str,
        net: Net,
        data: Data,
        stages: list[tuple[int | None, float, bool]],
        cached: list[bool],
        cfg: TrainConfig,
        precision: str,
    ) -> Features:
        device = device_for(cfg.accelerator)
        cut = min((net.cut(u) for (u, _, _), c in zip(stages, cached) if c), default=0)
        train, val = data.splits["train"], data.splits["val"]
        if not cut:
            return cls(None, 0, device, precision)
        prefix = net.part(None, cut)
        if not cache_fits(prefix, train.images):
            print(
                f"ferlab: {name}: the frozen layers' output for {len(train)} images would not fit in a quarter "
                "of this machine's memory; running them every step instead (slower, same result).",
                file=sys.stderr,
            )
            return cls(None, 0, device, precision)
        shared = {s: MEMO.outputs(prefix, x.images, precision, device) for s, x in (("train", train), ("val", val))}
        return cls(shared, cut, device, precision)

    def inputs(self, net: Net, units: int | None, data: Data) -> dict[str, torch.Tensor] | None:
        """A stage's training inputs from the shared output: the frozen layers it adds run once more here."""
        if self.shared is None:
            return None
        between = net.part(self.cut, net.cut(units)).to(self.device)
        with autocast(self.device, self.precision):
            return {s: run_batches(between, x) if len(between) else x for s, x in self.shared.items()}
