"""Prediction: face crops that match training, per-file tables, the picture grid, and exactness vs evaluate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferlab.apps.predict import GRID_PANELS
from ferlab.data.images import Preprocess, decode

from .conftest import CKPLUS, cli, make_tree, requires_ckplus, run_cli, train_tiny
from .test_data import bad_file_corpus


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def ck_face(cls: str, i: int, side: int = 120) -> Image.Image:
    files = sorted((CKPLUS / cls).iterdir())
    return Image.open(files[(i * 7) % len(files)]).convert("RGB").resize((side, side))


def photo(faces: list[Image.Image], seed: int) -> Image.Image:
    """A 'new photo': grey-noise background with the given faces pasted side by side."""
    rng = np.random.default_rng(seed)
    w = 40 + 160 * max(1, len(faces))
    canvas = Image.fromarray(rng.integers(90, 140, (220, w, 3)).astype(np.uint8))
    for k, f in enumerate(faces):
        canvas.paste(f, (30 + 160 * k, 40 + int(rng.integers(0, 40))))
    return canvas


@pytest.fixture(scope="module")
def face_world(tmp_path_factory):
    """Training photos (happy/surprise, one face each, anywhere on the canvas) and new photos with 0-2 faces."""
    if not CKPLUS.is_dir():
        pytest.skip("../shared/datasets/ckplus48 is not present")
    root = tmp_path_factory.mktemp("faces")
    for cls in ("happy", "surprise"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(14):
            photo([ck_face(cls, i)], seed=i).save(root / "train" / cls / f"{cls}_{i}.png")
    new = root / "new"
    (new / "happy").mkdir(parents=True)
    photo([], seed=1).save(new / "no_face.png")
    photo([ck_face("happy", 30)], seed=2).save(new / "happy" / "one_face.png")
    photo([ck_face("happy", 31), ck_face("surprise", 32)], seed=3).save(new / "two_faces.png")
    return root


def test_zero_one_and_two_faces_are_found(face_world):
    new = face_world / "new"
    pre = Preprocess(image_size=48, face_crop="auto")
    assert [d.box for d in decode(new / "no_face.png", pre, all_faces=True)] == [None]
    assert len(decode(new / "happy" / "one_face.png", pre, all_faces=True)) == 1
    two = decode(new / "two_faces.png", pre, all_faces=True)
    assert len(two) == 2 and all(d.box is not None for d in two)
    assert sorted(d.box[0] // 160 for d in two) == [0, 1]  # one box on each pasted face


@pytest.fixture(scope="module")
def two_policies(face_world):
    """Two checkpoints of one architecture trained with different face-crop policies."""
    cks = {}
    for policy in ("auto", "on"):
        out = face_world / f"run-{policy}"
        r = run_cli(
            "train",
            str(face_world / "train"),
            "--model",
            "regularized-cnn",
            "--face-crop",
            policy,
            "--image-size",
            "48",
            "--max-epochs",
            "2",
            "--split",
            "0.6",
            "0.2",
            "0.2",
            "--no-progress",
            "--out",
            str(out),
        )
        assert r.returncode == 0, r.stderr[-2000:]
        (run,) = out.iterdir()
        manifest = read_csv(run / "manifest.csv")
        found = sum(bool(row["face_box"]) for row in manifest)
        # 'on' keeps only photos with a face; 'auto' keeps all, with a box where the cascade found one
        assert found == len(manifest) if policy == "on" else found >= 0.8 * len(manifest)
        cks[policy] = run / "regularized-cnn" / "model.ckpt"
    return cks


@requires_ckplus
@pytest.mark.slow
def test_predict_with_two_crop_policies_writes_table_and_grid(face_world, two_policies, tmp_path):
    new = face_world / "new"
    bad = bad_file_corpus(new / "junk")
    r = run_cli(
        "predict",
        "--checkpoint",
        str(two_policies["auto"]),
        "--checkpoint",
        str(two_policies["on"]),
        str(new),
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_csv(tmp_path / "prediction_results.csv")
    names = [Path(row["filename"]).name for row in rows]
    assert names == ["one_face.png", "no_face.png", "two_faces.png", "two_faces.png"]  # every face, its own row
    assert [(row["face"], row["face_found"], bool(row["box"])) for row in rows] == [
        ("0", "True", True),
        ("0", "False", False),  # no face: the whole image, no box
        ("0", "True", True),
        ("1", "True", True),
    ]
    # two models of one architecture are told apart by their run folders
    a, b = (f"regularized-cnn@{two_policies[p].parent.parent.name}" for p in ("auto", "on"))
    assert list(rows[0]) == [
        "filename",
        "face",
        "box",
        "face_found",
        "correct_class",
        *(f"{m}_{c}" for m in (a, b) for c in ("predicted", "confidence", "top3", "unusual")),
    ]
    assert rows[0]["correct_class"] == "happy" and rows[1]["correct_class"] == ""  # parent folder is a class
    # the table holds what the model computes: the API gives the same top class and confidence for the file
    import ferlab

    (face,) = ferlab.analyze(str(new / "happy" / "one_face.png"), model=str(two_policies["auto"]), all_faces=False)
    assert rows[0][f"{a}_predicted"] == face["label"]
    assert float(rows[0][f"{a}_confidence"]) == round(face["probabilities"][face["label"]], 4)
    assert len(rows[0][f"{a}_top3"].split()) == 2
    # the 'on' model skips the face-less photo and says why; the 'auto' model predicts the whole image
    assert rows[1][f"{a}_predicted"] != "" and rows[1][f"{b}_predicted"] == ""
    assert rows[1][f"{b}_top3"] == "" and rows[1][f"{b}_unusual"] == "no face found (--face-crop on)"
    skipped = {(Path(s["file"]).name, s["model"]): s["reason"] for s in read_csv(tmp_path / "skipped_files.csv")}
    assert ("no_face.png", b) in skipped
    for name, fragment in bad.items():
        assert fragment in skipped[(name, "")]
    grid = Image.open(tmp_path / "prediction_grid.png")
    assert grid.size == (4 * 240, 1 * (240 + 16 * 4 + 8))  # 4 panels in one row, 4 text lines each


@requires_ckplus
@pytest.mark.slow
def test_largest_face_gives_one_row_per_image_with_its_box(face_world, two_policies, tmp_path):
    photo = face_world / "new" / "two_faces.png"
    rows = {}
    for how in ("every", "largest"):
        flag = ["--largest-face"] if how == "largest" else []
        model = str(two_policies["auto"])
        r = cli("predict", "--checkpoint", model, str(photo), *flag, "--out", str(tmp_path / how))
        assert r.returncode == 0, r.stderr[-2000:]
        rows[how] = read_csv(tmp_path / how / "prediction_results.csv")
    assert [row["face"] for row in rows["every"]] == ["0", "1"]
    assert all(len(row["box"].split()) == 4 and row["face_found"] == "True" for row in rows["every"])
    assert rows["largest"] == rows["every"][:1]  # the same face, box and probabilities: the largest one
    # the API answers with the same boxes, largest first
    import ferlab

    faces = ferlab.analyze(str(photo), model=str(two_policies["auto"]))
    assert [" ".join(map(str, f["box"])) for f in faces] == [row["box"] for row in rows["every"]]


def test_predict_mistakes_are_one_sentence(tmp_path):
    r = cli("predict", "--checkpoint", str(tmp_path / "none.ckpt"), str(tmp_path))
    assert r.returncode == 2 and "ferlab: error: The checkpoint file" in r.stderr and "Traceback" not in r.stderr
    assert "does not exist" in r.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.ckpt").write_bytes(b"")
    r = cli("predict", "--checkpoint", str(tmp_path / "m.ckpt"), str(tmp_path / "empty"))
    assert r.returncode == 2 and "is not a ferlab checkpoint or is corrupted" in r.stderr


@pytest.mark.slow
def test_empty_input_folder_and_grid_limit(tmp_path):
    data = make_tree(tmp_path / "d", per_class=10)
    r = train_tiny(data, tmp_path / "o", size=24)
    assert r.returncode == 0, r.stderr[-2000:]
    (ck,) = (tmp_path / "o").glob("*/regularized-cnn/model.ckpt")
    (tmp_path / "empty").mkdir()
    r = run_cli("predict", "--checkpoint", str(ck), str(tmp_path / "empty"))
    assert r.returncode == 2 and "ferlab: error: The folder" in r.stderr and "holds no images to predict." in r.stderr
    many = make_tree(tmp_path / "many", per_class=GRID_PANELS // 3 + 2)
    r = run_cli("predict", "--checkpoint", str(ck), str(many / "*" / "*.png"), "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(read_csv(tmp_path / "p" / "prediction_results.csv")) == 3 * (GRID_PANELS // 3 + 2)
    grid = Image.open(tmp_path / "p" / "prediction_grid.png")
    assert grid.size == (6 * 240, (GRID_PANELS // 6) * (240 + 16 * 3 + 8))  # capped at GRID_PANELS


@pytest.mark.slow
def test_two_processes_predict_every_input_once_into_the_single_process_csv(tmp_path):
    """--devices 2 --strategy ddp shares the inputs out through Lightning's prediction loop (gloo on CPUs): the
    CSV and the skipped files are byte for byte a single process's, each unreadable file reported once."""
    data = make_tree(tmp_path / "imgs", per_class=7)
    (data / "broken.png").write_bytes(b"not an image")
    (data / "loop.png").symlink_to(data / "loop.png")
    models = ["--checkpoint", "ferplus", "--checkpoint", "fer2013"]
    one = cli("predict", *models, str(data), "--out", str(tmp_path / "one"))  # one process: this one
    assert one.returncode == 0, one.stderr[-2000:]
    ddp = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    two = run_cli("predict", *models, str(data), *ddp, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in two.stderr and two.stdout.count("predictions in") == 1  # rank 0 alone reports
    for name in ("prediction_results.csv", "skipped_files.csv"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert len(read_csv(tmp_path / "two" / "prediction_results.csv")) == 21
    assert sorted(Path(s["file"]).name for s in read_csv(tmp_path / "two" / "skipped_files.csv")) == [
        "broken.png",
        "loop.png",
    ]


@pytest.mark.slow
def test_two_processes_evaluate_every_image_once_as_one_process_does(tmp_path):
    data = make_tree(tmp_path / "d", classes=("happy", "sad", "surprise"), per_class=10)
    (data / "happy" / "broken.png").write_bytes(b"not an image")
    ckpt = "ferplus"  # the shipped model, on shapes named after three of its classes
    one = cli("evaluate", str(ckpt), str(data), "--out", str(tmp_path / "one"))  # one process: this one
    assert one.returncode == 0, one.stderr[-2000:]
    ddp = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    two = run_cli("evaluate", str(ckpt), str(data), *ddp, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in two.stderr and two.stdout.count("accuracy") == 1  # rank 0 alone reports
    a, b = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in ("one", "two"))
    assert (b["n"], b["correct"], b["confusion"]) == (a["n"], a["correct"], a["confusion"]) and a["n"] == 30
    for name in ("confusion_matrix.csv", "skipped_files.csv"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
