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
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"model name\s*:\s*(.+)", text)
    model = re.search(r"^model\s*:\s*(\d+)", text, re.M)
    return f"{name.group(1) if name else platform.processor()} (model {model.group(1) if model else '?'})"


def busy_jiffies() -> tuple[int, int]:
    """(all CPUs' busy time, steal time) in clock ticks since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq + steal, steal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", help="VGG16 conv-base weights (without them the transfer model is left out)")
    args = ap.parse_args()
    tick = os.sysconf("SC_CLK_TCK")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "ferlab", "run", "--no-progress", "--out", str(Path(tmp) / "runs")]
        cmd += ["--weights", args.weights] if args.weights else []
        load_before = os.getloadavg()[0]
        busy0, steal0 = busy_jiffies()
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env={**os.environ, "FERLAB_CACHE": str(Path(tmp) / "cache")}, capture_output=True)
        wall = time.perf_counter() - t0
        busy1, steal1 = busy_jiffies()
        own = os.times()
        own_cpu = own.children_user + own.children_system
        if r.returncode:
            sys.exit(f"ferlab run failed:\n{r.stderr.decode()[-3000:]}")
    other = max(0.0, (busy1 - busy0) / tick - own_cpu)
    cores = os.cpu_count() or 1
    print(f"machine: {cpu()}, {cores} cores; python {platform.python_version()}")
    print(f"command: {' '.join(cmd[1:])} (empty cache)")
    print(f"wall time: {wall:.0f} s ({wall / 60:.1f} min); the run's own CPU time {own_cpu:.0f} s")
    print(
        f"other work on the machine meanwhile: {other:.0f} CPU-s ({other / (wall * cores):.0%} of its capacity), "
        f"steal {(steal1 - steal0) / tick:.0f} s, load average at the start {load_before:.2f}"
    )
    print("the study's comparison table:\n" + r.stdout.decode().strip())
    if other > 0.1 * wall * cores:
        print("NOT QUIET: other work shared the cores; this timing is not to be trusted")


if __name__ == "__main__":
    main()
