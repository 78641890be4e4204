"""What a benchmark ran on, and whether it had the machine to itself: every script in benchmarks/ prints it.

    meter = LoadMeter()              # before the timed work
    ...                              # the work, in this process, its children, or `pids` it names
    print(meter.verdict(pids=[server.pid]))

On a shared machine timings can be upside down (bf16 3.7x slower than fp32 beside other work on a Xeon where
it is 1.6x faster quiet), so a run states the load average, the CPU time stolen by the hypervisor and the CPU
time other processes used meanwhile (all of /proc/stat's busy time less this benchmark's own), and marks a run
where that other work took more than a tenth of the machine as NOT QUIET.
"""

from __future__ import annotations

import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

QUIET_SHARE = 0.10  # other work above this share of the machine's CPU capacity: the run is not quiet


def cpu() -> str:
    """The CPU's name and model number (several Xeon generations share one name; the number tells them apart)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"model name\s*:\s*(.+)", text)
    model = re.search(r"^model\s*:\s*(\d+)", text, re.M)
    return f"{name.group(1) if name else platform.processor()} (model {model.group(1) if model else '?'})"


def busy_jiffies() -> tuple[int, int]:
    """(all CPUs' busy time, steal time) in clock ticks since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq + steal, steal


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used, from /proc/<pid>/stat; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class LoadMeter:
    """The machine's load over a stretch of benchmarking; see :meth:`verdict`."""

    pids: list[int] = field(default_factory=list)  # other processes whose CPU is the benchmark's own (a server)
    load_before: float = field(default_factory=lambda: os.getloadavg()[0])
    start: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.busy0, self.steal0 = busy_jiffies()
        self.own0 = own_cpu()
        self.pid0 = {p: process_cpu(p) for p in self.pids}

    def measure(self) -> dict:
        """Wall seconds, this benchmark's CPU seconds, other work's CPU seconds and share, steal, load average."""
        tick = os.sysconf("SC_CLK_TCK")
        busy, steal = busy_jiffies()
        wall = time.perf_counter() - self.start
        own = own_cpu() - self.own0 + sum(process_cpu(p) - c for p, c in self.pid0.items())
        other = max(0.0, (busy - self.busy0) / tick - own)
        cores = os.cpu_count() or 1
        share = other / max(1e-9, wall * cores)
        return {
            "wall_s": round(wall, 2),
            "own_cpu_s": round(own, 1),
            "other_cpu_s": round(other, 1),
            "other_share": round(share, 3),
            "steal_s": round((steal - self.steal0) / tick, 1),
            "load_average_before": round(self.load_before, 2),
            "load_average_after": round(os.getloadavg()[0], 2),
            "quiet": share <= QUIET_SHARE,
        }

    def verdict(self) -> str:
        m = self.measure()
        line = (
            f"machine: {cpu()}, {os.cpu_count()} cores; other work meanwhile {m['other_cpu_s']:.0f} CPU-s "
            f"({m['other_share']:.0%} of the machine), steal {m['steal_s']:.0f} s, load average "
            f"{m['load_average_before']:.2f} before and {m['load_average_after']:.2f} after"
        )
        if not m["quiet"]:
            line += "\nNOT QUIET: other work shared the cores; these timings are not to be trusted"
        return line
