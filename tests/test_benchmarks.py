"""The benchmark helpers measure what they say they measure."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
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
    with torch.no_grad():  # the stand-in hands on what the freed layers computed once
        assert torch.equal(free(x), free.out)
