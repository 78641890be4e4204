"""``ferlab export``: a model as an ONNX file that carries its own preprocessing and card.

    ferlab export runs/x/regularized-cnn/model.ckpt --format onnx --out regularized.onnx
    ferlab export fer2013 --quantize int8 --data faces/ --out fer2013-int8.onnx

The graph takes what a ferlab model takes, a uint8 N x 3 x H x W RGB batch (any N), and does the rest inside:
scaling and normalisation, a transfer model's resize to its backbone input, test-time mirroring where the
model uses it. It returns ``logits`` and ``probabilities`` (softmax of the logits over the card's fitted
temperature). The model card (classes in order, input size, grayscale, face-crop policy and margin, face
detector, training summary, calibration, out-of-distribution statistics) is in the file's metadata, so
``ferlab predict --checkpoint model.onnx`` and any ONNX Runtime user get the same answers as the checkpoint.
Before writing, the export runs both on generated images and refuses a file that disagrees.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ferlab.apps.evaluate import labelled
from ferlab.core.errors import FerlabError
from ferlab.core.files import write_bytes
from ferlab.data.images import Decoded
from ferlab.inference.model import Model, OnnxRuntime, TorchRuntime, calibrated, load_model
from ferlab.inference.onnx_runtime import ARRAYS_KEY, CARD_KEY, load_onnx, pack_arrays

OPSET = 17
TOLERANCE = 1e-4  # largest allowed difference of any probability between PyTorch and ONNX Runtime


class Exported(nn.Module):
    def __init__(self, net: nn.Module, temperature: float):
        super().__init__()
        self.net, self.temperature = net, temperature

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return logits, calibrated(logits, self.temperature)


def card_metadata(card: dict) -> dict[str, str]:
    """The card as ONNX metadata: JSON for the facts, one packed blob for its arrays."""
    plain, arrays = {}, {}
    for key, value in card.items():
        if key in ("preprocess_obj", "state_dict"):
            continue
        if isinstance(value, dict):
            plain[key] = {k: v for k, v in value.items() if not isinstance(v, torch.Tensor)}
            arrays.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)})
        elif not isinstance(value, torch.Tensor):
            plain[key] = value
    plain["exported_from"] = {"format": "ferlab-checkpoint", "model": card.get("model")}
    meta = {CARD_KEY: json.dumps(plain, default=str)}
    if arrays:
        meta[ARRAYS_KEY] = pack_arrays(arrays)
    # the facts an ONNX user looks for first, as plain keys
    pre = card["preprocess"]
    meta.update(
        classes=json.dumps(card["classes"]),
        input="uint8 RGB N x 3 x {0} x {0}".format(pre["image_size"]),
        grayscale=str(bool(pre.get("grayscale"))).lower(),
        face_crop=str(pre.get("face_crop")),
        face_margin=str(pre.get("face_margin")),
        temperature=str(card.get("calibration", {}).get("temperature", 1.0)),
    )
    return meta


def generated_inputs(size: int, n: int = 16, seed: int = 0) -> torch.Tensor:
    """Noise, flat greys and smooth gradients: the parity check's images (no dataset needed)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (n // 2, 3, size, size), generator=g, dtype=torch.uint8)
    ramp = torch.linspace(0, 255, size).view(1, 1, 1, size)
    smooth = [((ramp * (k + 1) / (n // 2)).expand(1, 3, size, size) + 20 * k) % 256 for k in range(n - n // 2)]
    return torch.cat([noise, torch.cat(smooth).to(torch.uint8)])


def parity(torch_model: Model, onnx_model: Model, x: torch.Tensor) -> tuple[float, int]:
    """(largest probability difference, number of images whose predicted class differs)."""
    crops = [Decoded(np.ascontiguousarray(image), None) for image in x.permute(0, 2, 3, 1).numpy()]
    a, b = (
        calibrated(torch.from_numpy(np.stack([f.logits for f in m.classify(crops)])), m.temperature)
        for m in (torch_model, onnx_model)
    )  # full precision: the faces' printed probabilities are rounded to 6 decimals
    return float((a - b).abs().max()), int((a.argmax(1) != b.argmax(1)).sum())


@dataclass
class ExportResult:
    path: Path
    max_diff: float
    size_bytes: int
    int8_path: Path | None = None
    accuracy: tuple[float, float] | None = None  # fp32, int8 on the given folder


def _onnx_bytes(model: Model) -> bytes:
    import onnx

    net = model.runtime.net.eval()
    size = model.pre.image_size
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Exported(net, model.temperature),
            (torch.zeros(2, 3, size, size, dtype=torch.uint8),),
            buf,
            input_names=["image"],
            output_names=["logits", "probabilities"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in card_metadata(model.card).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "ferlab"
    return proto.SerializeToString()


def _as_model(path: Path, name: str) -> Model:
    session, card = load_onnx(path)
    return Model(name, OnnxRuntime(session), card)


def accuracy_on(
    model: Model, folder: str, class_map: str | None = None, drop: list[str] | None = None
) -> tuple[float, int]:
    """Accuracy of a model on a folder-per-class tree, decoded and mapped as ``ferlab evaluate`` does; its size."""

    logits, y, *_ = labelled(model, folder, class_map, drop)
    return float((logits.argmax(1) == y).float().mean()), len(y)


def export_onnx(
    checkpoint: str,
    out: str | None = None,
    quantize: str | None = None,
    data: str | None = None,
    max_drop: float = 1.0,
    class_map: str | None = None,
    drop_classes: list[str] | None = None,
) -> ExportResult:
    """``checkpoint`` as an ONNX file whose probabilities match PyTorch's (checked before anything is written);
    with ``quantize``, also an int8 file if it costs at most ``max_drop`` accuracy points on ``data`` (whose
    classes are mapped as ``ferlab evaluate`` maps them). A mistake in the data is found before any file is
    written."""
    if max_drop != max_drop:  # NaN: every comparison with it is false, so int8 would always be kept
        raise FerlabError("--max-drop must be a number of accuracy points, got nan.")
    model = load_model(checkpoint)
    if not isinstance(model.runtime, TorchRuntime):
        raise FerlabError(f"{checkpoint} is already an ONNX model; export takes a .ckpt or a shipped model's name.")
    if quantize and not data:
        raise FerlabError("--quantize int8 needs --data DIR, a labelled folder on which to measure what int8 costs.")
    if not quantize and (data or class_map or drop_classes):
        raise FerlabError("--data, --class-map and --drop-classes measure what --quantize int8 costs; give it too.")
    src = Path(model.name)
    target = Path(out) if out else (src.with_suffix(".onnx") if src.exists() else Path(f"{model.name}.onnx"))
    if not target.parent.is_dir():  # as every other command: a missing folder is a typo more often than a wish
        raise FerlabError(f"The folder {target.parent} for the exported file does not exist; create it first.")
    blob = _onnx_bytes(model)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "model.onnx"
        candidate.write_bytes(blob)
        exported = _as_model(candidate, str(target))
        diff, flipped = parity(model, exported, generated_inputs(model.pre.image_size))
        if diff > TOLERANCE or flipped:
            raise FerlabError(
                f"The exported graph disagrees with the PyTorch model (largest probability difference {diff:.2e}, "
                f"{flipped} predictions differ; allowed {TOLERANCE:g}); nothing was written."
            )
        result = ExportResult(target, diff, len(blob))
        if quantize:  # the data is read (and any mistake in it refused) before a file is written
            acc32 = accuracy_on(exported, data, class_map, drop_classes)
        write_bytes(target, blob)
        if quantize:
            result.int8_path, result.accuracy = _quantize(
                candidate, acc32, data, target, max_drop, class_map, drop_classes
            )
    return result


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """ONNX Runtime's dynamic int8 quantization of the weights, on the graph with its constants folded first
    (the exporter leaves some convolution weights as computed values, which the quantizer cannot take), the
    card's metadata carried over."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process is for static quantization
    folded = int8_path.with_name(int8_path.stem + "-folded.onnx")
    quant_pre_process(str(fp32_path), str(folded), skip_symbolic_shape=True)
    quantize_dynamic(str(folded), str(int8_path), weight_type=QuantType.QInt8)
    folded.unlink()
    meta = onnx.load(str(fp32_path), load_external_data=False).metadata_props
    graph = onnx.load(str(int8_path))
    del graph.metadata_props[:]
    graph.metadata_props.extend(meta)
    onnx.save(graph, str(int8_path))


def _quantize(
    fp32_path: Path,
    fp32_accuracy: tuple[float, int],
    data: str,
    target: Path,
    max_drop: float,
    class_map: str | None,
    drop_classes: list[str] | None,
) -> tuple[Path, tuple]:
    """Dynamic int8 quantization of weights, kept only if it costs at most ``max_drop`` points."""
    int8_path = fp32_path.with_name("model-int8.onnx")
    quantize_int8(fp32_path, int8_path)
    int8 = _as_model(int8_path, str(target))
    acc32, n = fp32_accuracy
    acc8, _ = accuracy_on(int8, data, class_map, drop_classes)
    drop = 100 * (acc32 - acc8)
    print(
        f"ferlab: int8 on {data} (n={n}): accuracy {acc8:.4f} against fp32 {acc32:.4f} ({-drop:+.2f} points)",
        file=sys.stderr,
    )
    if drop > max_drop:
        raise FerlabError(
            f"int8 quantization costs {drop:.2f} points of accuracy on {data} (limit {max_drop:g}), so no int8 "
            f"file was written; the fp32 model is at {target}."
        )
    final = target.with_name(target.stem + "-int8.onnx")
    write_bytes(final, int8_path.read_bytes())
    return final, (acc32, acc8)
