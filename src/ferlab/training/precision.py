"""``--precision auto``: the arithmetic a model trains in, measured on the machine it runs on.

    >>> choose("regularized-cnn", num_classes=6, image_size=100, batch_size=32)      # doctest: +SKIP
    Choice(precision='bf16-mixed', speedup=2.1, fp32_ms=..., bf16_ms=..., measured='2026-11-27', cached=False)

On a CUDA device the rule is fixed (bf16 mixed precision where supported, else fp16). On a CPU the answer
depends on the chip: bf16 matmul ran 3.3x faster than fp32 on a Xeon with AMX, 2.2x on an EPYC with
avx512_bf16, and half as fast on a Xeon without either. So the first time a model trains on a machine, a few
training steps are timed in fp32 and in bf16 mixed precision, in interleaved rounds, and bf16 is chosen when
every round (the interval of the rounds' speedups) says it beats fp32 by 10%, enough to be worth its
rounding. A machine busy with other work can turn the answer upside down (bf16 3.7x slower under load on a
Xeon where it is 1.6x faster quiet); rounds that disagree give fp32 for this run, and nothing is cached. A
decided answer is cached per machine fingerprint (the CPU's name, family, model and stepping, its bf16/AMX
flags, core count, torch version) in ferlab's cache folder; a change of any of them measures again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch
from torch import nn

from ferlab.core.files import atomic
from ferlab.models.registry import create_model
from ferlab.training.memory import keep_freed_memory

MARGIN = 1.10  # bf16 must be this much faster than fp32 to be chosen
FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "avx2")


@dataclass
class Choice:
    precision: str
    speedup: float  # fp32 step time / bf16 step time (1.0 where nothing was measured)
    fp32_ms: float
    bf16_ms: float
    measured: str  # the date of the measurement, or the rule that decided
    cached: bool = False
    low: float = 0.0  # the interval of the per-round speedups (0: not measured)
    high: float = 0.0

    def message(self, model: str) -> str:
        if self.measured == NO_BF16:
            return (
                f"ferlab: precision 32 on this CPU for {model}: it has no native bf16 arithmetic (avx512_bf16 or "
                "AMX), where bf16 mixed precision runs slower than fp32, so it is not measured"
            )
        if self.measured == RECORDED:
            return (
                f"ferlab: precision {self.precision} for {model}, as decided before training "
                "(train.precision_by_model in the run's config.yaml)"
            )
        if self.measured in ("cuda", "forced"):
            return f"ferlab: precision {self.precision} ({'CUDA rule' if self.measured == 'cuda' else 'as given'})"
        if self.measured == UNDECIDED:
            return (
                f"ferlab: precision 32 on this CPU for {model}: bf16 mixed precision ran "
                f"{self.low:.2f}-{self.high:.2f}x fp32's speed over the timed rounds "
                f"({self.bf16_ms:.0f} vs {self.fp32_ms:.0f} ms a step), not clearly {MARGIN:.2f}x faster "
                "(a busy machine?); fp32 this time, measured again next time"
            )
        faster = "faster" if self.speedup >= 1 else "slower"
        ratio = self.speedup if self.speedup >= 1 else 1 / self.speedup
        return (
            f"ferlab: precision {self.precision} on this CPU for {model}: bf16 mixed precision {ratio:.1f}x {faster} "
            f"than fp32 ({self.bf16_ms:.0f} vs {self.fp32_ms:.0f} ms a step), measured {self.measured}"
            + (" (cached)" if self.cached else "")
        )


def env_name(key: str) -> str:
    return "FERLAB_PRECISION_" + "".join(c if c.isalnum() else "_" for c in key).upper()


def share(model: str, image_size: int, batch_size: int, choice: Choice) -> None:
    """Hand a decision to the processes Lightning starts later (they inherit this environment), so every rank of
    a multi-process run trains in the same precision."""
    key = f"{model} {image_size}px batch {min(batch_size, 32)}"
    os.environ[env_name(key)] = json.dumps({k: v for k, v in asdict(choice).items() if k != "cached"})


def cache_file() -> Path:
    base = os.environ.get("FERLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ferlab"
    )
    return Path(base) / "precision.json"


NO_BF16 = "no native bf16"
UNDECIDED = "undecided"  # the rounds' interval straddled the margin: fp32, and nothing cached
RECORDED = "recorded"  # given by a run's config (train.precision_by_model): decided before its training
DECIDED: dict[str, Choice] = {}  # this process's decisions, whose notes a recorded precision carries


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and ":" in line:
                return set(line.split(":", 1)[1].split())
    return set()


def native_bf16() -> bool:
    """Whether this CPU computes bf16 itself (AVX-512 BF16 or AMX). Without either, PyTorch emulates it: measured
    here 2.4-7.7x slower than fp32 for the study's CNNs on an AVX2 AMD EPYC, and timing that emulation for a
    large model took minutes."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def fingerprint() -> str:
    """What the measured answer depends on: the CPU (its name, family, model and stepping: Xeons of different
    generations all call themselves "Intel(R) Xeon(R) Processor" on some machines) and its relevant flags,
    the cores, torch's version."""
    name, flags, ident = platform.processor() or platform.machine(), set(), {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name":
                name = value
            elif key in ("cpu family", "model", "stepping") and key not in ident:
                ident[key] = value
            elif key == "flags":
                flags = set(value.split())
                break  # the first processor's block says it all
    cpu = f"{name} (family {ident.get('cpu family', '?')} model {ident.get('model', '?')} stepping "
    cpu += f"{ident.get('stepping', '?')})"
    have = ",".join(f for f in FLAGS if f in flags)
    return f"{cpu} | {have} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def _load() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _save(cache: dict) -> None:
    path = cache_file()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic(path) as tmp:
            tmp.write_text(json.dumps(cache, indent=1))


def interval(ratios: list[float]) -> tuple[float, float]:
    """A distribution-free interval for the median of per-round ratios: their range up to 5 rounds (94% for 5),
    the second smallest to the second largest from 6 (96% for 9)."""
    s = sorted(ratios)
    k = 0 if len(s) <= 5 else 1
    return s[k], s[-1 - k]


def time_steps(
    net: nn.Module, size: int, batch: int, rounds: int = 9, budget: float = 4.0
) -> tuple[list[float], list[float]]:
    """Seconds of a training step (forward, backward, Adam) in fp32 and in bf16 autocast, per round: warm-up
    steps of each (oneDNN builds its kernels on first use: two, or one where the first pair took over 2 s),
    then rounds of steps of each, interleaved so a machine's changing load hits both alike; a round lasts at
    least 0.1 s, so short steps are timed in bulk. At least 3 rounds; more, up to ``rounds``, only while the
    rounds' speedups straddle :data:`MARGIN` and ``budget`` seconds are not spent: a large model's
    measurement on a first run costs seconds, not a minute."""
    for p in net.parameters():
        p.requires_grad_(True)
    net.train()
    opt = torch.optim.Adam(net.parameters(), 1e-4, fused=True)  # as training runs it: unfused, the 75M-parameter
    # dense layer of baseline-cnn made the step 2-3x slower than a real one in both precisions, hiding bf16's gain
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    y = torch.zeros(batch, dtype=torch.long)

    def step(bf16: bool) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    a, b = step(False), step(True)
    if a + b < 2.0:
        a, b = step(False), step(True)
    per_round = max(1, math.ceil(0.1 / max(1e-4, min(a, b))))
    fp32: list[float] = []
    bf16: list[float] = []
    start = time.perf_counter()
    while len(fp32) < 3 or (
        len(fp32) < rounds and time.perf_counter() - start < budget and straddles([a / b for a, b in zip(fp32, bf16)])
    ):
        fp32.append(sum(step(False) for _ in range(per_round)) / per_round)
        bf16.append(sum(step(True) for _ in range(per_round)) / per_round)
    return fp32, bf16


def straddles(ratios: list[float]) -> bool:
    low, high = interval(ratios)
    return low < MARGIN <= high


def known(key: str) -> Choice | None:
    """A decision already made for ``key``: by rank 0 of a multi-process run before it started the others, or
    measured on this machine before (cached)."""
    inherited = os.environ.get(env_name(key))
    if inherited:
        return Choice(**{**json.loads(inherited), "cached": True})
    entry = _load().get(fingerprint(), {}).get(key)
    try:
        return Choice(**{**entry, "cached": True}) if entry else None
    except TypeError:  # an entry from another ferlab version, or edited by hand: measure again
        return None


def choose(
    model: str,
    num_classes: int,
    image_size: int,
    batch_size: int,
    accelerator: str = "auto",
    precision: str = "auto",
    recorded: str | None = None,
    side: int | None = None,
) -> Choice:
    """The precision to train ``model`` in: ``recorded`` (a run's decision, with the measurement behind it when
    this machine has it), as given, the CUDA rule, or measured on this CPU (cached). ``side``: the side the
    network resizes its input to, if any (see :func:`measure`)."""
    side = side if side and side < image_size else None
    key = f"{model} {image_size}px batch {min(batch_size, 32)}" + (f" at {side}px" if side else "")
    if recorded:  # with the measurement behind it where this process or this machine's cache has it
        same = DECIDED.get(key) or known(key)
        return same if same and same.precision == recorded else Choice(recorded, 1.0, 0.0, 0.0, RECORDED)
    if precision != "auto":
        return Choice(precision, 1.0, 0.0, 0.0, "forced")
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return Choice("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed", 1.0, 0.0, 0.0, "cuda")
    decided = known(key)
    if decided:
        return decided

    choice = measure(model, num_classes, image_size, batch_size, side) if native_bf16() else None
    choice = DECIDED[key] = choice or Choice("32", 1.0, 0.0, 0.0, NO_BF16)
    if choice.measured in (UNDECIDED, NO_BF16):  # a rule, or rounds that disagree: nothing kept for good
        return choice
    cache = _load()  # another process may have written meanwhile
    cache.setdefault(fingerprint(), {})[key] = {k: v for k, v in asdict(choice).items() if k != "cached"}
    _save(cache)
    return choice


def measure(model: str, num_classes: int, image_size: int, batch_size: int, side: int | None = None) -> Choice:
    """Time ``model``'s training step in fp32 and bf16 on this CPU (:func:`time_steps`) and decide, uncached.

    The network runs at the side it trains at, capped at the data's: emotion-transfer shrinks 100 px images to
    its source's 48 inside itself, and timed at 100 its bf16 speedup came out 2.2x against the epochs' 1.7x
    (1.66x at 48). A transfer backbone that enlarges them to 224 is timed at the data's side: one VGG16 step at
    224 takes seconds, and what matters is the chip's bf16 rate against its fp32 rate on those layers (at 100
    px the probe's ratio was within 1% of the epochs')."""
    side = side if side and side < image_size else None
    keep_freed_memory()  # as training runs: without it, page faults on the fresh buffers of every step hide bf16's gain
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(0)
        net = create_model(model, num_classes, image_size, "none", side)
        fp32s, bf16s = time_steps(net, image_size, min(batch_size, 32))
    fp32, bf16 = statistics.median(fp32s), statistics.median(bf16s)
    low, high = interval([a / b for a, b in zip(fp32s, bf16s)])
    return Choice(
        "bf16-mixed" if low >= MARGIN else "32",
        round(fp32 / bf16, 2),
        round(1000 * fp32, 1),
        round(1000 * bf16, 1),
        UNDECIDED if low < MARGIN <= high else date.today().isoformat(),
        low=round(low, 2),
        high=round(high, 2),
    )
