"""The built-in synthetic demo set: deterministic, six emotions, 100x100 RGB, labelled synthetic."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from ferlab.data import demo


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


def test_demo_classes_differ_in_the_face_not_in_the_scene(tmp_path):
    root = demo.demo_dataset(per_class=6, root=tmp_path)
    imgs = [np.asarray(Image.open(p), float) for p in (root / "sad").iterdir()]
    assert np.std(imgs, 0).mean() > 20  # pose, skin, lighting and background vary within a class
    # the same face and scene (one seed) in every emotion: only the expression changes, and it changes the
    # face's middle, not the corners of the picture
    faces = {c: np.asarray(demo._face(np.random.default_rng(5), c, 100), float) for c in demo.CLASSES}
    names = list(faces)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = np.abs(faces[a] - faces[b]).mean(2)
            assert diff[30:90, 25:75].mean() > 5 * max(diff[:15, :15].mean(), 0.2), (a, b)


def test_the_demo_runs_with_its_quick_settings_and_a_data_folder_with_the_studys(tmp_path, capsys):
    """`ferlab run` with no data trains small and short (under 3 minutes on 2 cores: benchmarks/demo_run.py);
    flags override the demo's settings, and a data folder, given or in a config, gets the study's defaults."""
    from ferlab.apps.cli import _config, build_parser
    from ferlab.core.config import StudyConfig

    def resolved(*argv: str):
        return _config(build_parser().parse_args(["run", *argv]))

    quick = resolved()
    assert quick.data.data is None and quick.data.image_size <= 48 and quick.train.backbone_size <= 96
    assert quick.train.max_epochs <= 15 and demo.PER_CLASS * len(demo.CLASSES) <= 1110
    said = capsys.readouterr().err
    assert said.startswith("ferlab: demo settings (no data folder given): 48 px images, at most 15 epochs a stage")
    assert resolved("--max-epochs", "3", "--image-size", "64").train.max_epochs == 3
    assert resolved("--image-size", "64").data.image_size == 64
    capsys.readouterr()
    study = StudyConfig()
    for cfg in (resolved(str(tmp_path)), resolved("--config", str(_config_with_data(tmp_path)))):
        assert (cfg.data.image_size, cfg.train.max_epochs, cfg.train.patience, cfg.train.backbone_size) == (
            study.data.image_size,
            study.train.max_epochs,
            study.train.patience,
            study.train.backbone_size,
        )
    assert "demo settings" not in capsys.readouterr().err


def _config_with_data(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  data: {tmp_path}\n")
    return path
