"""The built-in demo set: deterministic SYNTHETIC cartoon faces in six emotions (not real people).

    >>> root = demo_dataset()          # generated once into the cache, then reused
    >>> sorted(p.name for p in root.iterdir())
    ['angry', 'disgust', 'fear', 'happy', 'sad', 'surprise']

Each class has typical brow, eye and mouth shapes, drawn with per-face noise that makes neighbouring
classes overlap, over random pose, scale, skin tone, hair, lighting, background and sensor noise: learnable,
not trivial. Files are written to a temporary folder and renamed into place, so a half-made set is never used.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise")
PER_CLASS = 185  # 1,110 images: about the size of the original study's data
VERSION = 2
DESCRIPTION = "built-in SYNTHETIC demo faces (generated cartoons, not real people)"
# what `ferlab run` with no data trains with, under any --config or flags: the demo shows the whole study and
# its report in under 3 minutes on 2 cores, where the study's own defaults (100 px, 100 epochs a stage,
# patience 10, VGG16 at 224 px) take 6-13. Measured with `python benchmarks/demo_run.py` (docs/benchmarks.md):
# at 15 epochs every model is above chance on these faces; with early stopping the scratch CNNs stopped there
SETTINGS = {
    "data": {"image_size": 48},
    "train": {"max_epochs": 15, "patience": 0, "backbone_size": 96},
}

# brow tilt (+: inner ends raised), brow height, eye opening, mouth curve (+: smile), mouth opening,
# mouth width, nose wrinkle
_SHAPES = {
    "angry": (-1.0, -0.6, 0.75, -0.3, 0.05, 0.85, 0.2),
    "disgust": (-0.4, -0.3, 0.55, -0.6, 0.15, 0.9, 1.0),
    "fear": (0.9, 0.6, 1.25, -0.3, 0.5, 1.25, 0.0),
    "happy": (0.0, 0.1, 0.7, 1.0, 0.3, 1.2, 0.0),
    "sad": (0.9, 0.0, 0.75, -0.9, 0.0, 0.9, 0.0),
    "surprise": (0.1, 1.0, 1.4, 0.0, 1.0, 0.75, 0.0),
}
_NOISE = (0.35, 0.3, 0.18, 0.3, 0.2, 0.12, 0.3)
_SKIN = np.array(
    [(255, 224, 196), (241, 194, 150), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 56, 32)], float
)


def cache_dir() -> Path:
    base = os.environ.get("FERLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ferlab"
    )
    return Path(base)


def _face(rng: np.random.Generator, emotion: str, size: int) -> Image.Image:
    s = 2 * size  # draw at twice the size, then downsample for smooth edges
    tilt, brow_h, eye, curve, mouth_open, mouth_w, wrinkle = np.array(_SHAPES[emotion]) + rng.normal(
        0, 1, 7
    ) * np.array(_NOISE)
    eye, mouth_w = max(eye, 0.25), max(mouth_w, 0.5)

    c0, c1 = rng.uniform(30, 225, (2, 3))
    ramp = np.linspace(0, 1, s)[:, None, None]
    bg = c0 * (1 - ramp) + c1 * ramp
    img = Image.fromarray(np.broadcast_to(bg, (s, s, 3)).astype(np.uint8))

    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    k = s / 200 * rng.uniform(0.8, 1.15)  # face scale
    cx = cy = s / 2
    i, j = rng.choice(len(_SKIN), 2)
    w = rng.uniform()
    skin = tuple(int(v) for v in np.clip(_SKIN[i] * w + _SKIN[j] * (1 - w) + rng.normal(0, 8, 3), 0, 255))
    dark = tuple(int(v * 0.45) for v in skin)
    hair = tuple(int(v) for v in rng.uniform(10, 200) * rng.uniform(0.5, 1.0, 3))
    d.ellipse([cx - 68 * k, cy - 88 * k, cx + 68 * k, cy + 40 * k], fill=hair)  # hair behind the face
    d.ellipse([cx - 60 * k, cy - 75 * k, cx + 60 * k, cy + 80 * k], fill=skin)
    for side in (-1, 1):
        ex, ey = cx + side * 24 * k, cy - 14 * k
        ew, eh = 15 * k, 8 * k * eye
        d.ellipse([ex - ew, ey - eh, ex + ew, ey + eh], fill=(245, 245, 245))
        pr = min(5 * k, eh)
        d.ellipse([ex - pr, ey - pr, ex + pr, ey + pr], fill=(30, 20, 15))
        by = cy - 32 * k - brow_h * 7 * k
        inner = (cx + side * 9 * k, by - tilt * 6 * k)
        outer = (cx + side * 38 * k, by + tilt * 6 * k)
        d.line([inner, outer], fill=hair if sum(hair) < 300 else dark, width=max(3, int(8 * k)))
    d.line(
        [(cx, cy - 5 * k), (cx - 6 * k, cy + 18 * k), (cx + 4 * k, cy + 20 * k)], fill=dark, width=max(1, int(2 * k))
    )
    if wrinkle > 0.5:
        for dy in (0, 5):
            d.arc(
                [cx - 12 * k, cy - 6 * k + dy * k, cx + 12 * k, cy + 6 * k + dy * k],
                200,
                340,
                fill=dark,
                width=max(1, int(2 * k)),
            )
    mw, my = 30 * k * mouth_w, cy + 42 * k
    xs = np.linspace(-1, 1, 25)
    top = [(cx + x * mw, my + curve * 10 * k * (1 - x * x) - curve * 4 * k) for x in xs]  # y grows down
    if mouth_open > 0.25:
        bottom = [(cx + x * mw, y + mouth_open * 16 * k * (1 - x * x)) for (_, y), x in zip(top, xs)]
        d.polygon(top + bottom[::-1], fill=(70, 20, 25), outline=dark)
    else:
        d.line(top, fill=(150, 50, 60), width=max(3, int(7 * k)))

    layer = layer.rotate(
        rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR, translate=tuple(rng.uniform(-0.07, 0.07, 2) * s)
    )
    img.paste(layer, (0, 0), layer)
    a = np.asarray(img, float)
    light = np.linspace(*rng.uniform(0.65, 1.2, 2), s)  # light from one side
    a = a * (light[None, :, None] if rng.uniform() < 0.5 else light[:, None, None])
    a = a + rng.normal(0, rng.uniform(2, 9), a.shape)
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))
    return img.resize((size, size), Image.Resampling.LANCZOS)


def _draw_class(folder: Path, ci: int, per_class: int, size: int) -> None:
    emotion = CLASSES[ci]
    (folder / emotion).mkdir()
    for n in range(per_class):
        rng = np.random.default_rng([VERSION, ci, n])
        _face(rng, emotion, size).save(folder / emotion / f"synthetic_{emotion}_{n:04d}.png")


def demo_dataset(per_class: int = PER_CLASS, size: int = 100, root: Path | None = None) -> Path:
    """The demo set's folder (``<cache>/demo-v1-<n>x<size>/<class>/*.png``), generating it on first use."""
    root = root or cache_dir()
    dest = root / f"demo-v{VERSION}-{per_class}x{size}"
    if dest.is_dir():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root))
    try:
        # one class per task on a thread per core (Pillow and NumPy release the GIL: 18 -> 8 s on 2 cores);
        # each face has its own seed, so the files do not depend on the order
        with ThreadPoolExecutor(min(len(CLASSES), os.cpu_count() or 1)) as pool:
            list(pool.map(lambda ci: _draw_class(tmp, ci, per_class, size), range(len(CLASSES))))
        os.replace(tmp, dest)
    except OSError:
        if not dest.is_dir():  # another process may have won the race; otherwise a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
