"""The built-in synthetic demo set: deterministic, six emotions, 100x100 RGB, labelled synthetic."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from ferlab import demo


def digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def test_demo_set_is_deterministic_and_shaped_like_the_study(tmp_path):
    a = demo.demo_dataset(per_class=3, root=tmp_path / "a")
    b = demo.demo_dataset(per_class=3, root=tmp_path / "b")
    assert digest(a) == digest(b) and len(digest(a)) == 18
    assert sorted(p.name for p in a.iterdir()) == list(demo.CLASSES)
    im = Image.open(next((a / "happy").iterdir()))
    assert im.size == (100, 100) and im.mode == "RGB"
    assert all(p.name.startswith("synthetic_") for p in a.rglob("*.png"))
    assert "SYNTHETIC" in demo.DESCRIPTION
    assert demo.demo_dataset(per_class=3, root=tmp_path / "a") == a  # generated once, then reused


def test_demo_classes_differ_but_faces_vary(tmp_path):
    root = demo.demo_dataset(per_class=6, root=tmp_path)
    means = {c: np.mean([np.asarray(Image.open(p), float) for p in (root / c).iterdir()], 0) for c in demo.CLASSES}
    imgs = [np.asarray(Image.open(p), float) for p in (root / "sad").iterdir()]
    assert np.std(imgs, 0).mean() > 20  # pose, skin, lighting and background vary within a class
    assert len({round(float(m.mean()), 3) for m in means.values()}) == 6
