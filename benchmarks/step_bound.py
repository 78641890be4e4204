"""How fast could regularized-cnn's training step get? Its step timed with parts of the network made free.

usage:
    python benchmarks/step_bound.py [--steps 5] [--rounds 15] [--ratio 0.70]

Times one training step (batch 32 at 100x100, fused Adam, NHWC, as ``ferlab train`` runs it) of
regularized-cnn as trained, then with its first block (conv 3->32, max-pooling, ReLU: the layers that move
the largest tensors) replaced by a stand-in that costs nothing forward and backward, then with both conv
blocks free. The variants run interleaved, ``--rounds`` times ``--steps`` steps each, and the medians are
printed. A step with block 1 free is a floor for any kernel written for that block, however fused: with
``--ratio`` (ferlab/Keras seconds per epoch from ``bench.py``) it prints the ratio that such a perfect
kernel would reach, ignoring the per-epoch validation and loop time (so it is optimistic).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from ferlab.models.registry import Body, create_model  # noqa: E402
from ferlab.training.memory import keep_freed_memory  # noqa: E402


class _Free(torch.autograd.Function):
    """A fixed output; zero gradients for the replaced layers' parameters (Adam still steps them)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.shapes = [p.shape for p in params]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, None, *(torch.zeros(s) for s in ctx.shapes))


class Free(nn.Module):
    """Stands in for ``layers``: returns what they returned once, at no cost."""

    def __init__(self, layers: list[nn.Module], example: torch.Tensor):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        with torch.no_grad():
            out = example
            for m in layers:
                out = m(out)
        self.out = out.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Free.apply(x, self.out, *self.layers.parameters())


def variant(free_upto: int) -> nn.Module:
    """regularized-cnn with body layers ``[0:free_upto]`` free (0: as trained)."""
    torch.manual_seed(0)
    net = create_model("regularized-cnn", 6, 100)
    if free_upto:
        layers = list(net.body)
        example = net.normalize(torch.randint(0, 256, (32, 3, 100, 100), dtype=torch.uint8))
        net.body = Body([Free(layers[:free_upto], example), *layers[free_upto:]], units=[0])
    return net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="steps per timing")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timings per variant")
    ap.add_argument("--ratio", type=float, help="ferlab/Keras seconds per epoch for regularized-cnn, from bench.py")
    args = ap.parse_args()
    keep_freed_memory()
    x = torch.randint(0, 256, (32, 3, 100, 100), dtype=torch.uint8)
    y = torch.randint(0, 6, (32,))
    # body layers: conv, pool, relu, dropout, conv, pool, relu, dropout
    names = {0: "as trained", 3: "block 1 free (conv 3->32, pool, ReLU)", 7: "blocks 1 and 2 free"}
    steps = {}
    for upto, name in names.items():
        net = variant(upto).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)

        def step(net: nn.Module = net, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

        for _ in range(3):
            step()
        steps[name] = step
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t) / args.steps * 1e3)
    full = statistics.median(times[names[0]])
    print(f"regularized-cnn training step, batch 32, {torch.get_num_threads()} threads, median of {args.rounds}:")
    for name, ts in times.items():
        ms = statistics.median(ts)
        line = f"  {name:<40} {ms:6.1f} ms  {ms / full:5.2f} of the step"
        if args.ratio and name != names[0]:
            line += f"  -> at best {args.ratio * ms / full:.2f} of Keras"
        print(line)


if __name__ == "__main__":
    main()
