"""Prediction at scale: images/s of `ferlab predict` on a large generated folder, in one process and shared out
among N processes by Lightning's prediction loop (`--devices N --strategy ddp`, gloo on CPUs).

    python benchmarks/predict_scale.py [--images 2000] [--processes 1 2] [--checkpoint ferplus]

The folder holds 640x480 photos with one face each (a CK+48 face pasted on a noisy background, so each image
is decoded, searched for a face, cropped and classified); each command runs in a fresh process, start-up
included, and the CSVs of every run are checked to be identical.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import LoadMeter  # noqa: E402

CKPLUS = HERE.parent.parent / "shared" / "datasets" / "ckplus48"


def make_folder(root: Path, n: int) -> None:
    faces = sorted((CKPLUS / "happy").iterdir())[:50] if CKPLUS.is_dir() else []
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        photo = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
        if faces:
            face = Image.open(faces[i % len(faces)]).convert("RGB").resize((160, 160))
            photo.paste(face, (int(rng.integers(0, 480)), int(rng.integers(0, 320))))
        photo.save(root / f"photo_{i:06d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--checkpoint", default="ferplus")
    args = ap.parse_args()
    meter = LoadMeter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        make_folder(folder, args.images)
        csvs = []
        for n in args.processes:
            out = Path(tmp) / f"out-{n}"
            cmd = [sys.executable, "-m", "ferlab", "predict", "--checkpoint", args.checkpoint, str(folder)]
            cmd += ["--out", str(out)]
            if n > 1:
                cmd += ["--accelerator", "cpu", "--devices", str(n), "--strategy", "ddp"]
            t = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if r.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
            csvs.append((out / "prediction_results.csv").read_bytes())
            print(f"{n} process{'es' if n > 1 else ''}: {args.images / wall:.1f} images/s ({wall:.1f} s)", flush=True)
        print("CSVs identical across runs:", all(c == csvs[0] for c in csvs))
    print(meter.verdict())


if __name__ == "__main__":
    main()
