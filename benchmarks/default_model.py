"""Which shipped model should be the default: both scored on the FER+ validation images neither trained on.

usage:
    python benchmarks/default_model.py [--shared ../shared] [--models ferplus fer2013]

``ferplus`` trained on FER+'s split of FER2013's training images (``configs/ferplus.yaml``) and ``fer2013`` on
its own (``configs/fer2013.yaml``), both seed 0. The images in ferplus's validation split and in fer2013's
held-out test split were trained on by neither (ferplus chose its epoch on them, fer2013 never saw them). Each
model is scored there through ``ferlab evaluate DIR --labels ferplus_votes.csv --drop-classes contempt``:
against FER+'s majority, on the seven classes both know (a ``contempt`` answer counts as wrong), with the
vote-weighted accuracy beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ferlab.core.config import StudyConfig, load_yaml, merge
from ferlab.data.datasets import ImageSet, load_data


def recipe_split(config: str, shared: str | Path, split: str, votes: bool) -> ImageSet:
    """One split of FER2013's training images as a shipped recipe (``configs/NAME.yaml``, its seed) makes it;
    with ``votes``, labelled by FER+'s votes as ``configs/ferplus.yaml`` trains."""
    cfg = merge(StudyConfig(), load_yaml(config))
    cfg.data.data = str(Path(shared) / "datasets" / "fer2013" / "train")
    if votes:
        cfg.data.labels = str(Path(shared) / "datasets" / "fer2013" / "ferplus_votes.csv")
    return load_data(cfg.data, cfg.train.seed).splits[split]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--models", nargs="+", default=["ferplus", "fer2013"])
    a = ap.parse_args()
    shared = Path(a.shared).resolve()
    root = shared / "datasets" / "fer2013" / "train"
    files = sorted(
        set(recipe_split("configs/ferplus.yaml", shared, "val", votes=True).files)
        & set(recipe_split("configs/fer2013.yaml", shared, "test", votes=False).files)
    )
    print(f"{len(files)} images in ferplus's validation split and fer2013's held-out test split")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images"
        for f in files:  # the votes file names images by their path under the training folder
            link = data / Path(f).resolve().relative_to(root)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(f).resolve())
        print("model     accuracy (95% CI)        macro-F1  vote-weighted accuracy")
        for model in a.models:
            out = Path(tmp) / model
            votes = str(shared / "datasets" / "fer2013" / "ferplus_votes.csv")
            cmd = [sys.executable, "-m", "ferlab", "evaluate", model, str(data), "--labels", votes]
            r = subprocess.run([*cmd, "--drop-classes", "contempt", "--out", str(out)], capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{model}: ferlab evaluate failed:\n{r.stderr[-2000:]}")
            m = json.loads((out / "metrics.json").read_text())
            low, high = m["ci95"]
            print(
                f"{model:9} {m['accuracy']:.3f} ({low:.3f}-{high:.3f}, n={m['n']})  {m['macro_f1']:.3f}     "
                f"{m['vote_weighted_accuracy']:.3f}"
            )


if __name__ == "__main__":
    main()
