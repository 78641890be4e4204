"""Face detection with OpenCV's Haar cascade, and the crop policy shared by training and prediction.

    >>> import numpy as np
    >>> find_faces(np.zeros((100, 100), np.uint8))
    []

Policies: ``off`` keeps the whole image; ``auto`` crops the largest face when one is found and keeps the
whole image otherwise; ``on`` crops the largest face and treats an image without one as unusable.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

Box = tuple[int, int, int, int]  # x, y, width, height in pixels of the decoded image

POLICIES = ("off", "auto", "on")


@functools.cache
def _cascade() -> cv2.CascadeClassifier:
    path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():  # opencv-python-headless 5.x no longer ships the cascades
        raise RuntimeError(f"OpenCV's Haar cascade is missing ({path}); install opencv-python-headless<5.")
    return cascade


def find_faces(gray: np.ndarray) -> list[Box]:
    """Faces in a uint8 grayscale image, largest first."""
    h, w = gray.shape
    # faces under ~1/8 of the short side are background people, not the subject
    min_side = max(20, min(h, w) // 8)
    scale = 1.0
    if max(h, w) > 640:  # detection cost grows with pixels; the subject's face survives downscaling
        scale = 640 / max(h, w)
        gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        min_side = max(20, round(min_side * scale))
    found = _cascade().detectMultiScale(
        cv2.equalizeHist(gray), scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side)
    )
    boxes = [tuple(round(v / scale) for v in b) for b in np.asarray(found).reshape(-1, 4)]
    return sorted(boxes, key=lambda b: (-b[2] * b[3], b[0], b[1]))


def expand(box: Box, margin: float, width: int, height: int) -> Box:
    """The box grown by ``margin`` of its size on every side, clipped to the image."""
    x, y, w, h = box
    dx, dy = round(w * margin), round(h * margin)
    x0, y0 = max(0, x - dx), max(0, y - dy)
    x1, y1 = min(width, x + w + dx), min(height, y + h + dy)
    return x0, y0, x1 - x0, y1 - y0
