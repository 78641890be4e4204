"""Make a shipped model from a run's checkpoint: the same weights and card, with the card's data description and
licence written for users rather than for the machine that trained it.

usage:
    python scripts/ship_pretrained.py runs/<run>/vgg-small/model.ckpt ferplus \
        --description "FER2013 training images with FER+'s annotator votes as labels" \
        --license "..." [--half]

Writes ``src/ferlab/pretrained/NAME.ckpt`` (ferlab.inference.model.PRETRAINED names the shipped files).
``--half`` stores the weights in float16, half the file (a model over the 8 MB a shipped model may take in
float32, such as vgg-medium's 10.6 MB); loading turns them back into float32, so only their rounding differs,
and the script prints the largest change that makes to a logit on the run's own validation images.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from ferlab.models.checkpoint import load_checkpoint

PRETRAINED = Path(__file__).resolve().parents[1] / "src" / "ferlab" / "pretrained"


def rounding_change(net: torch.nn.Module, shipped: Path, checkpoint: str) -> float:
    """The largest change float16 weights make to a logit, over the run's validation images."""
    from ferlab.data.images import decode_each, to_tensor
    from ferlab.inference.model import run_batches

    run = Path(checkpoint).resolve().parents[1]
    with open(run / "manifest.csv", newline="") as f:
        files = [r["file"] for r in csv.DictReader(f) if r["split"] == "val"]
    half, card = load_checkpoint(shipped)
    pre = card["preprocess_obj"]
    x = to_tensor([d[0].image for d in decode_each(files, pre) if isinstance(d, list)], pre.image_size)
    return float((run_batches(net, x) - run_batches(half, x)).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("name")
    ap.add_argument("--description", required=True, help="what the model was trained on, in words")
    ap.add_argument("--license", required=True, help="the terms the weights inherit")
    ap.add_argument("--half", action="store_true", help="store the weights in float16")
    args = ap.parse_args()
    net, _ = load_checkpoint(args.checkpoint)  # refuses anything that is not a whole ferlab checkpoint
    payload = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    payload["data"]["description"] = args.description
    payload["license"] = args.license
    payload["calibration"].setdefault("bounded", False)
    if args.half:
        payload["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    target = PRETRAINED / f"{args.name}.ckpt"
    torch.save(payload, target)
    size = target.stat().st_size
    print(f"{target}: {size / 1e6:.2f} MB")
    if args.half:
        print(f"float16 weights move a logit by at most {rounding_change(net, target, args.checkpoint):.4f}")
    if size > 8 * 1024 * 1024:
        raise SystemExit("over the 8 MB a shipped model may take")


if __name__ == "__main__":
    main()
