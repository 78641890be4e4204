"""The benchmark helpers measure what they say they measure."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from ferlab.models.registry import create_model

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _freed(net: nn.Module) -> list[str]:
    return [type(m).__name__ for m in net.body[0].layers]


def test_step_bound_frees_exactly_the_named_blocks():
    sb = _load("step_bound")
    assert _freed(sb.variant(3)) == ["Conv2d", "MaxPool2d", "ReLU"]
    assert _freed(sb.variant(7)) == ["Conv2d", "MaxPool2d", "ReLU", "Dropout", "Conv2d", "MaxPool2d", "ReLU"]
    net = sb.variant(3).train()
    x = torch.randint(0, 256, (32, 3, 100, 100), dtype=torch.uint8)
    logits = net(x)
    assert logits.shape == (32, 6)
    nn.functional.cross_entropy(logits, torch.zeros(32, dtype=torch.long)).backward()
    free, rest = net.body[0], list(net.body)[1:]
    assert all(p.grad is not None and not p.grad.any() for p in free.parameters())
    assert all(p.grad.abs().sum() > 0 for m in rest for p in m.parameters())
    # the stand-in hands on exactly what the real layers compute on its example batch: rebuild the untouched
    # model and its example with the same seed and run the freed layers for real
    torch.manual_seed(0)
    real = create_model("regularized-cnn", 6, 100)
    example = real.normalize(torch.randint(0, 256, (32, 3, 100, 100), dtype=torch.uint8))
    with torch.no_grad():
        want = real.body[2](real.body[1](real.body[0](example)))
        torch.testing.assert_close(free(example), want)
        assert want.abs().sum() > 0


def test_the_load_meter_tells_other_work_from_its_own():
    """Busy time of a process the benchmark does not own counts as other work (and marks the run NOT QUIET);
    the same process named as the benchmark's own (a server it drives) does not."""
    import subprocess
    import time

    machine = _load("machine")
    spin = "import time\nt = time.time()\nwhile time.time() - t < 1.0: pass"
    for own in (False, True):
        spinner = subprocess.Popen([sys.executable, "-c", spin])
        meter = machine.LoadMeter(pids=[spinner.pid] if own else [])
        time.sleep(1.5)
        m, said = meter.measure(), meter.verdict()  # the spinner is done, not waited for: not in os.times()
        spinner.wait()
        if own:
            assert m["own_cpu_s"] >= 0.8
        else:
            assert m["other_cpu_s"] >= 0.8 and not m["quiet"] and "NOT QUIET" in said
