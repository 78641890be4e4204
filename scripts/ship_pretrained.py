"""Make a shipped model from a run's checkpoint: the same weights and card, with the card's data description and
licence written for users rather than for the machine that trained it.

usage:
    python scripts/ship_pretrained.py runs/<run>/vgg-small/model.ckpt ferplus \
        --description "FER2013 training images with FER+'s annotator votes as labels" \
        --license "..."

Writes ``src/ferlab/pretrained/NAME.ckpt`` (ferlab.inference.model.PRETRAINED names the shipped files).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ferlab.models.checkpoint import load_checkpoint

PRETRAINED = Path(__file__).resolve().parents[1] / "src" / "ferlab" / "pretrained"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("name")
    ap.add_argument("--description", required=True, help="what the model was trained on, in words")
    ap.add_argument("--license", required=True, help="the terms the weights inherit")
    args = ap.parse_args()
    load_checkpoint(args.checkpoint)  # refuses anything that is not a whole ferlab checkpoint
    payload = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    payload["data"]["description"] = args.description
    payload["license"] = args.license
    payload["calibration"].setdefault("bounded", False)
    target = PRETRAINED / f"{args.name}.ckpt"
    torch.save(payload, target)
    size = target.stat().st_size
    print(f"{target}: {size / 1e6:.2f} MB")
    if size > 8 * 1024 * 1024:
        raise SystemExit("over the 8 MB a shipped model may take")


if __name__ == "__main__":
    main()
