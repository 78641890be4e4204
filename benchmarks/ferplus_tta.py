"""Test-time views for the shipped ``ferplus`` model, scored on its own validation split.

usage:
    python benchmarks/ferplus_tta.py [--shared ../shared] [--model ferplus] [--views all|mirror]

Rebuilds the split ``configs/ferplus.yaml`` trains on (FER2013's training images with FER+'s votes, seed 0,
85/10/5 stratified by majority) and scores the validation images (against the majority) with the logits
averaged over several views of each face: none, the mirror image (what ``tta: true`` does inside the model),
and the mirror plus shifted or zoomed crops (FER+'s and VGG-Face's 10-crop idea). Only the validation split
is read: it is what chooses a recipe. Each line gives accuracy, macro-F1 and the recall of the two rarest
classes (contempt and disgust, about a hundred training images each). ``--views mirror`` scores only the
image alone and with its mirror, for a checkpoint of a recipe try (``--model runs/.../model.ckpt``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ferlab.inference.model import load_model
from ferlab.reporting.metrics import metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_model import recipe_split  # noqa: E402


def shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``x`` moved by (dx, dy) pixels, the uncovered border repeating the edge (as training's shifts fill)."""
    p = max(abs(dx), abs(dy))
    pad = F.pad(x.float(), (p, p, p, p), mode="replicate")
    h, w = x.shape[-2:]
    return pad[..., p + dy : p + dy + h, p + dx : p + dx + w].round().to(torch.uint8)


def zoomed(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The centre ``scale`` of ``x`` resized back to its side."""
    side = x.shape[-1]
    n = round(side * scale)
    o = (side - n) // 2
    crop = x[..., o : o + n, o : o + n].float()
    out = F.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


def views(d: int) -> dict[str, Callable[[torch.Tensor], list[torch.Tensor]]]:
    corners = ((d, d), (d, -d), (-d, d), (-d, -d))
    sides = ((d, 0), (-d, 0), (0, d), (0, -d))
    return {
        f"image + 4 corner shifts of {d} px, each mirrored (10 views)": lambda x: (
            [x] + [shifted(x, dx, dy) for dx, dy in corners]
        ),
        f"image + 4 side shifts of {d} px, each mirrored (10 views)": lambda x: (
            [x] + [shifted(x, dx, dy) for dx, dy in sides]
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--model", default="ferplus", help="a shipped model's name or a model.ckpt trained on that split")
    ap.add_argument("--views", choices=("all", "mirror"), default="all")
    a = ap.parse_args()
    t = time.perf_counter()
    val = recipe_split("configs/ferplus.yaml", a.shared, "val", votes=True)
    print(f"validation split: {len(val)} images ({time.perf_counter() - t:.0f} s to load)")
    model = load_model(a.model)
    net = model.runtime.net  # the PyTorch network (eval mode); argmax needs no temperature

    @torch.inference_mode()
    def logits(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([net.single_pass(x[i : i + 256]) for i in range(0, len(x), 256)])

    def mirrored(xs: list[torch.Tensor]) -> torch.Tensor:
        return sum(logits(v) + logits(v.flip(-1)) for v in xs) / (2 * len(xs))

    x = val.images
    tries: dict[str, torch.Tensor] = {"the image alone": logits(x), "image + mirror (tta: true)": mirrored([x])}
    for d in (2, 3, 4) if a.views == "all" else ():
        for name, make in views(d).items():
            tries[name] = mirrored(make(x))
    for scale in (0.9, 0.85) if a.views == "all" else ():
        tries[f"image + centre {scale:.0%} zoomed, each mirrored (4 views)"] = mirrored([x, zoomed(x, scale)])
    print("accuracy (right/n)   macro-F1  recall: contempt disgust  views")
    for name, out in tries.items():
        m = metrics(out.argmax(1), val.labels, model.classes)
        recall = {c["class"]: c["recall"] for c in m["per_class"]}
        print(
            f"{m['accuracy']:.4f} ({m['correct']}/{m['n']})  {m['macro_f1']:.3f}     "
            f"{recall.get('contempt', float('nan')):.2f}     {recall.get('disgust', float('nan')):.2f}     {name}"
        )


if __name__ == "__main__":
    main()
