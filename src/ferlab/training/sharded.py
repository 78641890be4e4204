"""Work over a long list on Lightning's distributed engine: every index handled exactly once, by whichever
process (GPU, node or CPU process) Lightning's prediction loop and its unrepeated distributed sampler give it.

    >>> results = map_sharded(len(files), lambda idx: [predict_one(files[i]) for i in idx], Engine(devices="2"))
    ...                                   # doctest: +SKIP

Returns every chunk's result on rank 0 (a list of ``(indices, result)`` in no particular order), None on the
other ranks. Used by ``ferlab predict`` so that a folder of a million images runs on every device of a node
or a cluster with one command; the work function is the one a single process runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader


@dataclass
class Engine:
    """Where the work runs: Lightning's Trainer arguments (``is_distributed`` reads them as training's)."""

    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"


class _Shards(L.LightningModule):
    """predict_step runs ``work`` on one batch of indices; at the end rank 0 gathers every rank's results."""

    def __init__(self, work: Callable[[list[int]], Any]):
        super().__init__()
        self.work, self.done, self.gathered = work, [], None

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> int:
        indices = batch.tolist()
        self.done.append((indices, self.work(indices)))
        return len(indices)

    def on_predict_epoch_end(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, self.done)
            self.gathered = [chunk for rank in everyone for chunk in rank]
        else:
            self.gathered = self.done


def map_sharded(n: int, work: Callable[[list[int]], Any], engine: Engine, chunk: int = 64) -> list | None:
    """``work(indices)`` over 0..n-1 in chunks of at most ``chunk`` indices, across the processes of ``engine``."""
    module = _Shards(work)
    trainer = L.Trainer(
        accelerator=engine.accelerator,
        devices=engine.devices,
        num_nodes=engine.num_nodes,
        strategy=engine.strategy,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        use_distributed_sampler=True,  # prediction: Lightning's unrepeated sampler, every index once
    )
    indices = DataLoader(torch.arange(n), batch_size=chunk, shuffle=False)
    trainer.predict(module, indices, return_predictions=False)
    return module.gathered if trainer.is_global_zero else None
