"""Time a newcomer's first run: `ferlab run` with no data, from an empty cache (the demo set is drawn and every
model's precision measured first), every model of the study included when the VGG16 weights are given.

    python benchmarks/demo_run.py --weights ../shared/weights/vgg16_imagenet_features.pth

Prints the machine (CPU model number, cores), the wall time, the share of the time the run's own processes
were on the CPU, and the load the rest of the machine put on it: a run beside other work is marked as such.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import LoadMeter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", help="VGG16 conv-base weights (without them the transfer model is left out)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "ferlab", "run", "--no-progress", "--out", str(Path(tmp) / "runs")]
        cmd += ["--weights", args.weights] if args.weights else []
        meter = LoadMeter()
        r = subprocess.run(cmd, env={**os.environ, "FERLAB_CACHE": str(Path(tmp) / "cache")}, capture_output=True)
        m = meter.measure()
        if r.returncode:
            sys.exit(f"ferlab run failed:\n{r.stderr.decode()[-3000:]}")
    print(f"command: {' '.join(cmd[1:])} (empty cache); python {platform.python_version()}")
    print(f"wall time: {m['wall_s']:.0f} s ({m['wall_s'] / 60:.1f} min); the run's own CPU time {m['own_cpu_s']:.0f} s")
    print("the study's comparison table:\n" + r.stdout.decode().strip())
    print(meter.verdict())


if __name__ == "__main__":
    main()
