"""Composed photos with known face boxes: faces from ../shared pasted at many sizes, rotations and lighting onto
cluttered backgrounds, plus face-free clutter (stripes like ties, grids like windows, blobs, text-like marks).

    >>> scene = compose(np.random.default_rng(0), faces)          # doctest: +SKIP
    >>> scene.image.shape, scene.boxes                            # doctest: +SKIP

Used by ``faces_bench.py`` (detector precision and recall) and by the tests. Nothing is written to disk
unless asked: the dataset images stay in ../shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@dataclass
class Scene:
    image: np.ndarray  # H x W x 3 uint8 RGB
    boxes: list[tuple[int, int, int, int]]  # where each face is (x, y, w, h): the pasted face square
    sizes: list[int]
    angles: list[float]


def face_files(n: int, seed: int = 0) -> list[Path]:
    """``n`` face images, half from CK+48 and half from FER2013, every class, seeded."""
    rng = np.random.default_rng(seed)
    out = []
    for name, half in (("ckplus48", n // 2), ("fer2013/train", n - n // 2)):
        files = sorted((SHARED / name).glob("*/*"))
        out += [files[i] for i in rng.choice(len(files), half, replace=False)]
    return out


def clutter(rng: np.random.Generator, w: int, h: int, objects: int = 14) -> Image.Image:
    """A busy background: a colour gradient, shapes, stripes (ties), grids (windows), blobs and scribbles."""
    base = np.zeros((h, w, 3), np.float32)
    c0, c1 = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
    t = np.linspace(0, 1, w)[None, :, None]
    base[:] = c0 * (1 - t) + c1 * t
    base += rng.normal(0, 8, base.shape)
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(objects):
        kind = rng.integers(0, 5)
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        s = int(rng.integers(20, max(21, min(w, h) // 3)))
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        if kind == 0:  # a tie: a long diamond with stripes
            pts = [(x, y), (x + s // 5, y + s // 3), (x, y + s), (x - s // 5, y + s // 3)]
            d.polygon(pts, fill=col)
            for k in range(0, s, 8):
                d.line([(x - s // 5, y + k), (x + s // 5, y + k + 6)], fill=(255 - col[0], col[1], col[2]), width=2)
        elif kind == 1:  # a window: a frame with panes
            d.rectangle([x, y, x + s, y + int(s * 1.3)], outline=col, width=4, fill=tuple(v // 2 for v in col))
            d.line([(x + s // 2, y), (x + s // 2, y + int(s * 1.3))], fill=col, width=4)
            d.line([(x, y + int(s * 0.65)), (x + s, y + int(s * 0.65))], fill=col, width=4)
        elif kind == 2:
            d.ellipse([x, y, x + s, y + int(s * rng.uniform(0.5, 1.5))], fill=col)
        elif kind == 3:  # scribbles, text-like marks
            for _ in range(6):
                d.line(
                    [(x, y), (x + int(rng.integers(-s, s)), y + int(rng.integers(-s // 4, s // 4)))], fill=col, width=2
                )
                y += 6
        else:
            d.rectangle([x, y, x + s, y + s // 2], fill=col)
    return im.filter(ImageFilter.GaussianBlur(0.6))


def _paste_face(canvas: Image.Image, face: Image.Image, side: int, angle: float, x: int, y: int, light: float) -> None:
    face = face.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    arr = np.asarray(face, np.float32) / 255
    arr = np.clip(arr**light, 0, 1)  # gamma: darker (light > 1) or brighter faces
    face = Image.fromarray((arr * 255).astype(np.uint8))
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).ellipse([side * 0.02, 0, side * 0.98, side], fill=255)  # feathered oval: no square edge
    mask = mask.filter(ImageFilter.GaussianBlur(max(1, side / 30)))
    if angle:
        face = face.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
        mask = mask.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    off = (face.width - side) // 2
    canvas.paste(face, (x - off, y - off), mask)


def compose(
    rng: np.random.Generator,
    faces: list[Path],
    n_faces: int | None = None,
    size: tuple[int, int] | None = None,
    side_range: tuple[int, int] = (40, 320),
    max_angle: float = 30.0,
) -> Scene:
    """One scene: 1-4 faces (or ``n_faces``; 0 for clutter only) at log-uniform sizes, not overlapping."""
    w, h = size or (int(rng.integers(640, 1281)), int(rng.integers(480, 961)))
    canvas = clutter(rng, w, h)
    n = int(rng.integers(1, 5)) if n_faces is None else n_faces
    boxes, sizes, angles = [], [], []
    for _ in range(n):
        for _attempt in range(30):
            side = int(math.exp(rng.uniform(math.log(side_range[0]), math.log(min(side_range[1], min(w, h) - 10)))))
            x, y = int(rng.integers(5, w - side - 5)), int(rng.integers(5, h - side - 5))
            if all(x + side < bx or bx + bw < x or y + side < by or by + bh < y for bx, by, bw, bh in boxes):
                break
        else:
            continue
        angle = float(rng.uniform(-max_angle, max_angle))
        with Image.open(faces[int(rng.integers(0, len(faces)))]) as f:
            _paste_face(canvas, f, side, angle, x, y, float(np.exp(rng.uniform(-0.5, 0.5))))
        boxes.append((x, y, side, side))
        sizes.append(side)
        angles.append(angle)
    return Scene(np.asarray(canvas), boxes, sizes, angles)


def matches(found: tuple[int, int, int, int], truth: tuple[int, int, int, int]) -> bool:
    """A detection finds a face when its centre lies in the face square and its size is within 2x of it:
    detectors frame faces differently (Haar tight, YuNet with the forehead), and both are right."""
    fx, fy, fw, fh = found
    tx, ty, tw, th = truth
    cx, cy = fx + fw / 2, fy + fh / 2
    return tx <= cx <= tx + tw and ty <= cy <= ty + th and 0.5 <= math.sqrt(fw * fh) / tw <= 2.0


def score(found: list[tuple[int, int, int, int]], truth: list[tuple[int, int, int, int]]) -> tuple[int, int, int]:
    """(true positives, false positives, missed faces), each detection matching at most one face."""
    left = list(truth)
    tp = 0
    for b in found:
        hit = next((t for t in left if matches(b, t)), None)
        if hit is not None:
            left.remove(hit)
            tp += 1
    return tp, len(found) - tp, len(left)
