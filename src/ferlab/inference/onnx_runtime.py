"""Reading an exported ferlab ONNX file: an ONNX Runtime session and the model card from its metadata.

    >>> session, card = load_onnx("model.onnx")                       # doctest: +SKIP

The card travels in the file's ``metadata_props`` (written by :mod:`ferlab.export`): ``ferlab_card`` holds the
JSON card and ``ferlab_arrays`` the few arrays a card carries (face-space statistics, training-file digests),
so the ONNX file alone predicts exactly as the checkpoint it came from.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ferlab.core.errors import FerlabError
from ferlab.data.images import Preprocess

CARD_KEY, ARRAYS_KEY = "ferlab_card", "ferlab_arrays"


def pack_arrays(arrays: dict[str, torch.Tensor]) -> str:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: v.numpy() for k, v in arrays.items()})
    return base64.b64encode(buf.getvalue()).decode()


def unpack_arrays(text: str) -> dict[str, torch.Tensor]:
    with np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False) as z:
        return {k: torch.from_numpy(z[k]) for k in z.files}


def put_arrays(card: dict, arrays: dict[str, torch.Tensor]) -> None:
    """Put ``section.key`` arrays back into the card."""
    for dotted, value in arrays.items():
        section, key = dotted.split(".", 1)
        card.setdefault(section, {})[key] = value


def load_onnx(path: str | Path) -> tuple[Any, dict]:
    """An inference session (CPU) and the card; a file that is not a ferlab ONNX model is one clear sentence."""
    import onnx
    import onnxruntime as ort

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf decode errors have many types
        raise FerlabError(
            f"{path} is not an ONNX model or is corrupted ({e.__class__.__name__}); pass a file from ferlab export."
        ) from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if CARD_KEY not in meta:
        raise FerlabError(
            f"{path} is an ONNX model but not one ferlab exported (no model card in its metadata); "
            "export it with ferlab export."
        )
    try:
        card = json.loads(meta[CARD_KEY])
        if ARRAYS_KEY in meta:
            put_arrays(card, unpack_arrays(meta[ARRAYS_KEY]))
        card["preprocess_obj"] = Preprocess(**card["preprocess"])
    except (ValueError, KeyError, TypeError) as e:
        raise FerlabError(
            f"{path} has a damaged ferlab model card ({e.__class__.__name__}); export it again."
        ) from None
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise FerlabError(f"ONNX Runtime cannot run {path} ({e.__class__.__name__}); export it again.") from None
    return session, card
