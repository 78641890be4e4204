"""A Keras-style model summary: layer, type, output shape, parameters, then the totals.

>>> from ferlab.models import create_model
>>> print(summarize(create_model("baseline-cnn", 6), 100))            # doctest: +ELLIPSIS
Model: baseline-cnn...
"""

from __future__ import annotations

import torch
from torch import nn

from ferlab.models.registry import Net

_QUIET = (nn.ReLU, nn.ReLU6, nn.Identity)  # activations are folded into the layer before, as Keras does


def _mb(n: int) -> str:
    return f"{n * 4 / 1024**2:,.2f} MB"


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters."""
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def summarize(model: Net, image_size: int, name: str = "") -> str:
    rows: list[tuple[str, str, str, int]] = []
    hooks = []
    for path, module in model.named_modules():
        if list(module.children()) or isinstance(module, _QUIET):
            continue

        def hook(mod: nn.Module, args: tuple, out: torch.Tensor, path: str = path) -> None:
            shape = "(None, " + ", ".join(str(d) for d in out.shape[1:]) + ")"
            rows.append((path, type(mod).__name__, shape, sum(p.numel() for p in mod.parameters())))

        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    total, trainable = param_counts(model)
    header = ("Layer", "Type", "Output shape", "Param #")
    body = [(p, t, s, f"{n:,}") for p, t, s, n in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(4)]
    line = "  ".join(f"{{:<{w}}}" for w in widths[:3]) + f"  {{:>{widths[3]}}}"
    rule = "-" * (sum(widths) + 6)
    out = [
        f"Model: {name or type(model).__name__} (input 3x{image_size}x{image_size})",
        rule,
        line.format(*header),
        rule,
        *(line.format(*r) for r in body),
        rule,
        f"Total params: {total:,} ({_mb(total)})",
        f"Trainable params: {trainable:,} ({_mb(trainable)})",
        f"Non-trainable params: {total - trainable:,} ({_mb(total - trainable)})",
    ]
    return "\n".join(out)
