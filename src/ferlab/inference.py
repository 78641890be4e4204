"""Using trained models: everything is rebuilt from the checkpoint, so preprocessing matches training.

>>> result = evaluate_checkpoint("runs/x/regularized-cnn/model.ckpt", "faces/")   # doctest: +SKIP
>>> result["accuracy"]                                                           # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ferlab.checkpoint import load_checkpoint
from ferlab.data import decode_many, scan, to_tensor, write_csv
from ferlab.errors import FerlabError
from ferlab.evaluate import score_and_record


def evaluate_checkpoint(checkpoint: str | Path, folder: str | Path, out: Path) -> dict:
    """Metrics of a saved model on a folder-per-class tree, written into ``out``."""
    net, card = load_checkpoint(checkpoint)
    classes = card["classes"]
    records = scan(Path(os.path.abspath(Path(folder).expanduser())), [], "evaluation")
    unknown = sorted({r.cls for r in records} - set(classes))
    if unknown:
        raise FerlabError(
            f"{folder} has classes the model was not trained on: {', '.join(unknown)} (it knows {', '.join(classes)})."
        )
    decoded, reasons = decode_many([r.file for r in records], card["preprocess_obj"])
    keep = [(r, d) for r, d in zip(records, decoded) if d is not None]
    skipped = [{"file": r.file, "reason": why} for r, why in zip(records, reasons) if why]
    if not keep:
        raise FerlabError(f"None of the {len(records)} files in {folder} could be read as images.")
    x = to_tensor([d.image for _, d in keep], card["preprocess"]["image_size"])
    y = torch.tensor([classes.index(r.cls) for r, _ in keep])
    out.mkdir(parents=True, exist_ok=True)
    m = score_and_record(
        net,
        x,
        y,
        [r.file for r, _ in keep],
        classes,
        out,
        card["model"],
        model=card["model"],
        checkpoint=str(checkpoint),
        data=str(folder),
        skipped_files=len(skipped),
    )
    write_csv(out / "skipped_files.csv", skipped, ["file", "reason"])
    return m
