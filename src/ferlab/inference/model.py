"""The inference floor: a model file or name in, calibrated probabilities per face out.

    >>> model = load_model("fer2013")                       # a shipped model, a model.ckpt or an exported .onnx
    >>> faces = model.analyze([Image.open("photo.jpg")])    # doctest: +SKIP
    >>> faces[0][0].label, faces[0][0].probabilities        # doctest: +SKIP

Every consumer (evaluate, predict, serve, video, export's parity check, explanations) goes through here, so a
photo gives the same probabilities through every door: decoding and face cropping come from the model's
card (:mod:`ferlab.data`), the forward pass from a :class:`Runtime` (PyTorch or ONNX Runtime, chosen by
the file), and the probabilities are ``softmax(logits / temperature)`` with the card's fitted temperature.
Nothing here imports Lightning or the training code.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ferlab.core.errors import FerlabError
from ferlab.data.images import BadImage, Decoded, NoFace, Preprocess, decode_each, prepare, to_tensor
from ferlab.inference import ood
from ferlab.inference.onnx_runtime import load_onnx
from ferlab.models.checkpoint import load_checkpoint
from ferlab.models.registry import Normalize

# shipped model name -> file in ferlab/pretrained/; the first is the default of predict, analyze and serve
PRETRAINED = {"ferplus": "ferplus.ckpt", "fer2013": "fer2013.ckpt"}
ALL_FACES = True  # every face of an image, as DeepFace and fer answer: the default of every door


# ------------------------------------------------------------------------------------------ batched forward


def inference_batch(module: torch.nn.Module, x: torch.Tensor, device: torch.device) -> int:
    """64 images a pass at 100x100 px; on a CPU proportionally fewer for a larger backbone input: on 2 cores,
    VGG16 at 224x224 ran 1.2x faster per image in batches of 8-16 than of 64 (MobileNetV2 likewise), while
    the CNNs at 100x100 run as fast or faster in 64s."""

    if device.type != "cpu":
        return 64
    first = next(iter(module), None) if isinstance(module, torch.nn.Sequential) else getattr(module, "normalize", None)
    side = (first.size if isinstance(first, Normalize) else None) or x.shape[-1]
    return max(1, min(64, 64 * 100 * 100 // (side * side)))


@torch.inference_mode()
def run_batches(module: torch.nn.Module, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """``module`` over ``x`` in eval mode, ``batch_size`` images at a time (default: see :func:`inference_batch`)."""
    module.eval()
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    batch_size = batch_size or inference_batch(module, x, device)
    if not len(x):
        return torch.empty(0)
    return torch.cat([module(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def calibrated(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Class probabilities of ``logits`` as the card's calibration prescribes: ``softmax(logits / T)``."""
    return (logits / temperature).softmax(-1)


# ------------------------------------------------------------------------------------------------ runtimes


class Runtime:
    """Logits of a uint8 N x 3 x H x W batch; one implementation per model file format."""

    kind = "?"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# Batches of at most this many images run on one intra-op thread on a CPU. PyTorch's threads spin-wait for
# each other between the many small operations of a small batch; when other work shares the cores (a web app,
# a video decoder, a training job), a thread that lost its core stalls all of them, and one face took 4-7x its
# quiet time. One thread costs a small batch little when the machine is quiet (docs/benchmarks.md, threads).
SMALL_BATCH = 8
_THREADS = threading.Lock()


@contextmanager
def threads_for(images: int) -> Iterator[None]:
    """One intra-op thread while a batch of at most :data:`SMALL_BATCH` images runs (process-wide, so under a
    lock); larger batches use every thread."""
    before = torch.get_num_threads()
    if images > SMALL_BATCH or before == 1:
        yield
        return
    with _THREADS:
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)


class TorchRuntime(Runtime):
    kind = "pytorch"

    def __init__(self, net: torch.nn.Module):
        self.net = net.eval()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with threads_for(len(x)):
            return run_batches(self.net, x)


class OnnxRuntime(Runtime):
    kind = "onnxruntime"

    def __init__(self, session: Any):
        self.session = session
        self.input = session.get_inputs()[0].name

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if not len(x):
            return torch.empty(0)
        out = [
            self.session.run(None, {self.input: x[i : i + 64].numpy()})[0] for i in range(0, len(x), 64)
        ]  # the graph takes any batch; 64 keeps memory flat for long lists
        return torch.from_numpy(np.concatenate(out)).float()


# --------------------------------------------------------------------------------------------------- model


@dataclass
class Face:
    """One classified face (or whole image) of one input."""

    box: tuple[int, int, int, int] | None  # x, y, w, h in the upright input image; None: the whole image
    label: str
    probabilities: dict[str, float]
    face_found: bool
    unusual: str = ""  # why this input is unlike the model's training data ("" when it is not)
    crop: np.ndarray | None = field(default=None, repr=False)  # what the model saw (H x W x 3 uint8)
    logits: np.ndarray | None = field(default=None, repr=False)  # before calibration, full precision
    note: str = ""  # what happened in preparing it ("no face found: the whole image was classified")

    def as_dict(self) -> dict[str, Any]:
        return {
            "box": list(self.box) if self.box else None,
            "label": self.label,
            "probabilities": self.probabilities,
            "face_found": self.face_found,
            "unusual": self.unusual,
        }


@dataclass
class Model:
    """A loaded model: its runtime, its card, and the preprocessing the card prescribes."""

    name: str  # what the user called it: a shipped name or the file's path
    runtime: Runtime
    card: dict
    label: str = ""  # how tables and grids name it (default: ``name``)

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    @property
    def pre(self) -> Preprocess:
        return self.card["preprocess_obj"]

    @property
    def classes(self) -> list[str]:
        return list(self.card["classes"])

    @property
    def temperature(self) -> float:
        return float(self.card.get("calibration", {}).get("temperature", 1.0))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities of a uint8 batch as the card's preprocessing made it."""
        return calibrated(self.runtime.logits(x), self.temperature) if len(x) else torch.empty(0, len(self.classes))

    def prepare(self, im: Image.Image, key: Any = None, all_faces: bool = False, face_crop: str | None = None):
        return prepare(im, self.pre, all_faces=all_faces, face_crop=face_crop, key=key)

    def prepare_files(
        self, paths: Sequence[str | Path], all_faces: bool = False, face_crop: str | None = None
    ) -> list[list[Decoded] | BadImage]:
        """Files decoded and prepared as the card prescribes (:func:`~ferlab.data.images.decode_each`)."""
        return decode_each(paths, self.pre, all_faces, face_crop)

    def classify(self, crops: Sequence[Decoded]) -> list[Face]:
        """Faces (or whole images) prepared by :meth:`prepare`, classified in batches: the one forward path of
        every door (evaluate, the study's test split, predict, analyze, serve, video, export's parity check)."""
        if not crops:
            return []
        x = to_tensor([c.image for c in crops], self.pre.image_size)
        logits = self.runtime.logits(x)
        probs = calibrated(logits, self.temperature)
        unusual = ood.flags(self.card.get("ood"), [c.image for c in crops], probs)
        out = []
        for c, p, z, why in zip(crops, probs.tolist(), logits.numpy(), unusual):
            best = int(np.argmax(p))
            out.append(
                Face(
                    c.box,
                    self.classes[best],
                    {k: round(v, 6) for k, v in zip(self.classes, p)},
                    c.box is not None,
                    why or c.note,
                    c.image,
                    z,
                    c.note,
                )
            )
        return out

    def classify_files(self, paths: Sequence[str | Path]) -> tuple[list[Face | None], list[str]]:
        """Each file's largest face (or the whole image, as the card's policy says), classified; a file that
        cannot be used gives None and the reason in the second list ("" for the others). How evaluate and the
        study score labelled images."""
        prepared = self.prepare_files(paths)
        usable = [i for i, p in enumerate(prepared) if not isinstance(p, BadImage)]
        faces: list[Face | None] = [None] * len(prepared)
        for i, face in zip(usable, self.classify([prepared[i][0] for i in usable])):
            faces[i] = face
        return faces, [str(p) if isinstance(p, BadImage) else "" for p in prepared]

    def analyze(
        self, images: Sequence[Image.Image], all_faces: bool = ALL_FACES, face_crop: str | None = None
    ) -> list[list[Face]]:
        """Every image's faces, all classified in one batched pass (:meth:`prepare`, then :meth:`classify`). An
        image in which the policy ``on`` finds no face raises :class:`NoFace` with its ``index`` in ``images``."""
        prepared = []
        for i, im in enumerate(images):
            try:
                prepared.append(self.prepare(im, all_faces=all_faces, face_crop=face_crop))
            except NoFace as e:
                e.index = i
                raise
        flat = self.classify([c for crops in prepared for c in crops])
        out, k = [], 0
        for crops in prepared:
            out.append(flat[k : k + len(crops)])
            k += len(crops)
        return out


def pretrained_path(name: str) -> Path | None:
    """The installed file of a shipped model, or None when this install does not hold it."""
    if name not in PRETRAINED:
        return None
    path = Path(str(resources.files("ferlab") / "pretrained" / PRETRAINED[name]))
    return path if path.is_file() else None


def shipped_models() -> list[str]:
    return [n for n in PRETRAINED if pretrained_path(n) is not None]


def resolve(name_or_path: str | Path) -> Path:
    """An existing path wins over a shipped model's name; anything else is one clear sentence."""
    path = Path(name_or_path).expanduser()
    shipped = pretrained_path(str(name_or_path))
    if path.is_file():
        return path
    if shipped is not None:  # a folder that happens to share a shipped model's name does not hide it
        return shipped
    if path.is_dir():
        found = sorted(path.glob("*/model.ckpt"))
        if len(found) == 1:  # a run folder of one model stands for it, as in predict and serve
            return found[0]
        if found:
            names = ", ".join(f.parent.name for f in found)
            raise FerlabError(
                f"{path} is a run folder of {len(found)} models ({names}); pass one of their model.ckpt files."
            )
        raise FerlabError(f"{path} is a folder; pass a model.ckpt or .onnx file, or a model name.")
    names = ", ".join(shipped_models()) or "none in this install"
    if os.sep in str(name_or_path) or path.suffix.lower() in (".ckpt", ".onnx", ".pt", ".pth"):
        raise FerlabError(f"The checkpoint file {path} does not exist (shipped models, by name: {names}).")
    raise FerlabError(f"No checkpoint file or shipped model called '{name_or_path}' (shipped models: {names}).")


def _is_onnx(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:2] != b"PK" and (path.suffix.lower() == ".onnx" or head[:1] == b"\x08")


@functools.lru_cache(maxsize=16)
def _load(path: str, mtime_ns: int, size: int) -> Model:

    p = Path(path)
    if _is_onnx(p):
        session, card = load_onnx(p)
        return Model(path, OnnxRuntime(session), card)
    net, card = load_checkpoint(p)
    return Model(path, TorchRuntime(net), card)


def load_model(name_or_path: str | Path, cache: bool = True) -> Model:
    """A model from a ``.ckpt``, an exported ``.onnx`` (told apart by content) or a shipped model's name.

    Loaded files are kept per process (keyed by path, modification time and size), so repeated calls are free;
    ``cache=False`` loads afresh and keeps nothing (a study scoring each model it trains once).
    """
    path = resolve(name_or_path)
    st = path.stat()
    model = (_load if cache else _load.__wrapped__)(str(path), st.st_mtime_ns, st.st_size)
    shown = str(name_or_path) if str(name_or_path) in PRETRAINED and not Path(name_or_path).exists() else str(path)
    return Model(shown, model.runtime, model.card)


def default_model_name() -> str:
    """The model used when none is named: the first shipped one."""
    shipped = shipped_models()
    if not shipped:
        raise FerlabError("This install holds no shipped model; pass --checkpoint with a model.ckpt or .onnx file.")
    return shipped[0]


def checkpoint_files(items: list[str]) -> list[str]:
    """``--checkpoint`` values with run folders expanded to their models' checkpoints."""
    out = []
    for item in items:
        p = Path(item)
        if p.is_dir() and not (p / "config.yaml").is_file() and pretrained_path(item) is not None:
            out.append(item)  # a folder named like a shipped model, not a run folder: the shipped model
        elif p.is_dir():
            found = sorted(str(c) for c in p.glob("*/model.ckpt"))
            if not found:
                raise FerlabError(f"The folder {item} holds no model.ckpt; pass a ferlab run folder or a model file.")
            out += found
        else:
            out.append(item)
    return out


def load_models(checkpoints: list[str], cache: bool = True) -> list[Model]:
    """Models labelled by their card's name; two of one architecture by their run folder too."""
    models = [load_model(c, cache) for c in checkpoint_files(checkpoints or [default_model_name()])]
    names = [m.card.get("model", "?") if Path(m.name).exists() else m.name for m in models]
    labels = []
    for m, name in zip(models, names):
        label = name
        if names.count(name) > 1 and Path(m.name).exists():
            p = Path(m.name)
            label = f"{name}@{p.parent.parent.name if p.name == 'model.ckpt' else p.stem}"
        while label in labels:  # the same file twice
            label += "'"
        labels.append(label)
    for m, label in zip(models, labels):
        m.label = label
    return models


os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
