"""Where did the model look? Saliency heatmaps of a class for what the model saw (the face crop).

    >>> maps = heatmaps(model, crops, targets)                 # N x H x W in [0, 1]   # doctest: +SKIP
    >>> Image.fromarray(overlay(crops[0], maps[0])).save("face.png")                     # doctest: +SKIP

Methods, from Captum: ``gradcam`` (Grad-CAM at the layer the model's registry entry names: its last
convolutional block, upsampled to the input) and ``occlusion`` (the drop in the class's probability when a
patch is greyed out, slid over the image: slower, but it needs only forward passes, so it also explains
exported ONNX models). Test-time mirroring is off while explaining, so the map is of one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps

from ferlab.core.errors import FerlabError
from ferlab.inference.model import Model, TorchRuntime, calibrated, run_batches
from ferlab.models.registry import REGISTRY

METHODS = ("gradcam", "occlusion")


class SinglePass(torch.nn.Module):
    """``net``'s forward without test-time mirroring, on ``net``'s own weights: the network (which the model
    cache shares across the process, and a server's other threads are using) is never switched."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.single_pass(x) if hasattr(self.net, "single_pass") else self.net(x)


def _normalise(maps: torch.Tensor) -> np.ndarray:
    """Each map to [0, 1] (an all-zero map stays zero)."""
    flat = maps.reshape(len(maps), -1)
    low = flat.min(1, keepdim=True).values
    span = (flat.max(1, keepdim=True).values - low).clamp(min=1e-12)
    return ((flat - low) / span).reshape(maps.shape).numpy()


def check_method(model: Model, method: str) -> None:
    """A FerlabError, before any work, when ``method`` cannot explain ``model``."""
    if method not in METHODS:
        raise FerlabError(f"Unknown explanation method '{method}'; choose one of: {', '.join(METHODS)}.")
    if method == "gradcam" and not isinstance(model.runtime, TorchRuntime):
        raise FerlabError(
            f"Grad-CAM needs the PyTorch model and {model.name} is an ONNX file; explain it with "
            "--explain-method occlusion."
        )


def heatmaps(model: Model, crops: Sequence[np.ndarray], targets: Sequence[int], method: str = "gradcam") -> np.ndarray:
    """One heatmap per crop (H x W x 3 uint8, as the model's preprocessing made it) for the class ``targets[i]``."""
    check_method(model, method)
    if not len(crops):
        return np.zeros((0, 0, 0))
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255  # the models take [0, 1] floats too
    target = torch.as_tensor(list(targets))
    size = x.shape[-2:]
    if method == "gradcam":
        from captum.attr import LayerAttribution, LayerGradCam

        net = model.runtime.net
        spec = REGISTRY[model.card["model"]]
        layer = dict(net.named_modules())[spec.target_layer]
        cam = LayerGradCam(SinglePass(net), layer).attribute(x, target=target, relu_attributions=True)
        maps = LayerAttribution.interpolate(cam.detach(), tuple(size), interpolate_mode="bilinear")[:, 0]
        return _normalise(maps.clamp(min=0))
    from captum.attr import Occlusion

    side = size[-1]
    window, stride = max(2, side // 6), max(1, side // 12)

    def probs(t: torch.Tensor) -> torch.Tensor:
        u8 = (t * 255).round().clamp(0, 255).to(torch.uint8)
        if isinstance(model.runtime, TorchRuntime):
            return calibrated(run_batches(SinglePass(model.runtime.net), u8), model.temperature)
        return model.probabilities(u8)

    occ = Occlusion(probs).attribute(
        x,
        target=target,
        sliding_window_shapes=(3, window, window),
        strides=(3, stride, stride),
        baselines=0.5,
        perturbations_per_eval=32,
    )
    return _normalise(occ.sum(1).clamp(min=0))


def overlay(crop: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The crop with the heatmap laid over it in a colour map (red: where the class's evidence is)."""
    colour = colormaps["jet"](heat)[..., :3] * 255
    return np.clip((1 - alpha) * crop.astype(np.float32) + alpha * colour, 0, 255).astype(np.uint8)
