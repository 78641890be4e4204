"""Decoding every supported mode, the bad-file corpus, and splits that are stratified and leak-free."""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferlab.core.config import DataConfig
from ferlab.core.errors import FerlabError
from ferlab.data.datasets import assign_splits, load_data
from ferlab.data.images import Preprocess, decode

from .conftest import make_tree, shape_image

PRE = Preprocess(image_size=24)


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def bad_file_corpus(folder: Path) -> dict[str, str]:
    """Generate one file of each kind that must be skipped; returns name -> expected reason fragment."""
    folder.mkdir(parents=True, exist_ok=True)
    good = _png_bytes(shape_image(0, np.random.default_rng(0)))
    (folder / "zero.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "text.jpg").write_text("not an image at all\n")
    Image.new("1", (9000, 9000)).save(folder / "bomb.png")  # 81 Mpx, a few kB on disk
    (folder / "notes.txt").write_text("a stray file in a class folder\n")
    Image.fromarray(np.zeros((8, 8), np.float32), "F").save(folder / "float.tiff")
    return {
        "zero.png": "empty file (0 bytes)",
        "truncated.png": "truncated or corrupt image data",
        "text.jpg": "not an image Pillow can read",
        "bomb.png": "over the pixel limit of 40,000,000",
        "notes.txt": "unsupported file type '.txt'",
        "float.tiff": "unsupported image mode F",
    }


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "1"])
def test_every_mode_decodes_to_rgb(tmp_path, mode):
    base = shape_image(1, np.random.default_rng(1))
    if mode == "I;16":
        im = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)
        assert im.mode == "I;16"
        path = tmp_path / "x.png"
    elif mode == "CMYK":
        im, path = base.convert("CMYK"), tmp_path / "x.jpg"
    else:
        im, path = base.convert(mode), tmp_path / "x.png"
    im.save(path)
    (out,) = decode(path, PRE)
    assert out.image.shape == (24, 24, 3) and out.image.dtype == np.uint8
    if mode in ("L", "I;16"):  # 16-bit keeps its top 8 bits: the same picture as its 8-bit version
        ref = decode_ref(base.convert("L"), tmp_path)
        assert np.abs(out.image.astype(int) - ref.astype(int)).max() <= 1


def decode_ref(im: Image.Image, tmp_path: Path) -> np.ndarray:
    im.save(tmp_path / "ref.png")
    return decode(tmp_path / "ref.png", PRE)[0].image


def test_exif_orientation_is_honoured(tmp_path):
    a = np.zeros((24, 24, 3), np.uint8)
    a[:, 12:] = 255  # right half white
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 3  # rotate 180 degrees for display
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    (out,) = decode(tmp_path / "r.jpg", PRE)
    assert out.image[:, :8].mean() > 200 and out.image[:, -8:].mean() < 50


def test_bad_file_corpus_is_skipped_with_reasons(tmp_path):
    root = make_tree(tmp_path / "d", per_class=12)
    expected = bad_file_corpus(root / "circle")
    data = load_data(DataConfig(data=str(root), image_size=24))
    reasons = {Path(f).name: r for f, r in data.skipped}
    assert set(reasons) == set(expected)
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons[name])
    assert sum(len(s) for s in data.splits.values()) == 36


def test_stratified_split_keeps_class_proportions():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    split = assign_splits(labels, [str(i) for i in range(100)], [0.8, 0.1, 0.1], 3, seed=0)
    for c, n in enumerate([50, 30, 20]):
        per = Counter(split[labels == c].tolist())
        assert abs(per[1] - n * 0.1) <= 1 and abs(per[2] - n * 0.1) <= 1


def test_grouped_split_never_splits_a_group_and_stays_stratified(tmp_path):
    root = make_tree(tmp_path / "g", per_class=40, groups=16)
    cfg = DataConfig(data=str(root), image_size=24, group_by=r"^(G\d+)_")
    data = load_data(cfg, seed=3)
    split_of: dict[str, set[str]] = {}
    for r in data.manifest:
        split_of.setdefault(r.group, set()).add(r.split)
    assert len(split_of) == 16 and all(len(s) == 1 for s in split_of.values())
    counts = data.counts()
    assert all(counts[s][c] > 0 for s in ("train", "val", "test") for c in data.classes)


def _manifest(run_dir_or_data) -> list[tuple]:
    return [(r.file, r.cls, r.group, r.split) for r in run_dir_or_data.manifest]


def test_same_seed_same_manifest_other_seed_other_manifest(tmp_path):
    root = make_tree(tmp_path / "s", per_class=30)
    cfg = DataConfig(data=str(root), image_size=24)
    assert _manifest(load_data(cfg, seed=1)) == _manifest(load_data(cfg, seed=1))
    assert _manifest(load_data(cfg, seed=1)) != _manifest(load_data(cfg, seed=2))


def test_presplit_tree_and_separate_test_folder(tmp_path):
    for split, n in (("train", 10), ("val", 4), ("test", 4)):
        make_tree(tmp_path / "p" / split, per_class=n, seed=n)
    data = load_data(DataConfig(data=str(tmp_path / "p"), image_size=24))
    assert {s: len(v) for s, v in data.splits.items()} == {"train": 30, "val": 12, "test": 12}
    assert data.split_method == "given train/val/test folders"
    # a separate test folder replaces the test split; val is carved from the training pool
    make_tree(tmp_path / "t", per_class=5, seed=9)
    data = load_data(DataConfig(data=str(tmp_path / "p" / "train"), test_dir=str(tmp_path / "t"), image_size=24))
    assert len(data.splits["test"]) == 15 and len(data.splits["train"]) + len(data.splits["val"]) == 30


def test_grayscale_training_makes_colour_test_images_grayscale_too(tmp_path):
    make_tree(tmp_path / "train", per_class=10)
    for f in (tmp_path / "train").rglob("*.png"):
        Image.open(f).convert("L").save(f)
    make_tree(tmp_path / "colour", per_class=4, seed=5)
    data = load_data(DataConfig(data=str(tmp_path / "train"), test_dir=str(tmp_path / "colour"), image_size=24))
    test = data.splits["test"].images.numpy()
    assert data.pre.grayscale and len(test) == 12
    assert (test[:, 0] == test[:, 1]).all() and (test[:, 1] == test[:, 2]).all()  # as prediction will see them


@pytest.mark.parametrize(
    "layout,message",
    [
        ("missing", "The data folder {root} does not exist; pass a folder of class sub-folders."),
        ("empty", "The data folder {root} holds no images in class sub-folders"),
        ("one-class", "Found 1 class folder(s) in {root} (circle); a classifier needs at least 2 classes."),
        ("tiny", "The val split is empty; add images or change --split (now 0.8/0.1/0.1)."),
        ("bad-group", "--group-by '^(X\\d+)_' does not match the file name"),
    ],
)
def test_dataset_mistakes_are_one_sentence(tmp_path, layout, message):
    root = tmp_path / "data"
    group_by = None
    if layout == "empty":
        (root / "a").mkdir(parents=True)
    elif layout == "one-class":
        make_tree(root, classes=("circle",), per_class=5)
    elif layout == "tiny":
        make_tree(root, per_class=1)
    elif layout == "bad-group":
        make_tree(root, per_class=3)
        group_by = r"^(X\d+)_"
    with pytest.raises(FerlabError) as e:
        load_data(DataConfig(data=str(root), image_size=24, group_by=group_by))
    assert str(e.value).startswith(message.format(root=root))


def test_test_classes_must_be_training_classes(tmp_path):
    make_tree(tmp_path / "train", per_class=10)
    make_tree(tmp_path / "test", classes=("circle", "star"), per_class=3)
    with pytest.raises(FerlabError, match="The test set has classes that training does not: star;"):
        load_data(DataConfig(data=str(tmp_path / "train"), test_dir=str(tmp_path / "test"), image_size=24))


def test_manifest_csv_columns(tmp_path):
    from ferlab.data.datasets import write_manifest

    data = load_data(DataConfig(data=str(make_tree(tmp_path / "m", per_class=10)), image_size=24))
    write_manifest(data, tmp_path / "manifest.csv")
    with open(tmp_path / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "class", "group", "split", "face_box"]
    assert Counter(r["split"] for r in rows) == {s: len(v) for s, v in data.splits.items()}


def test_the_face_cache_keeps_the_most_recently_used_files_only():
    from ferlab.data.images import FaceCache

    cache = FaceCache(size=3)
    for k in range(5):
        cache.put((f"f{k}", "yunet"), [(k, k, 10, 10)])
        if k == 2:
            assert cache.get(("f0", "yunet")) == [(0, 0, 10, 10)]  # used again: kept over f1
    assert len(cache.found) == 3
    assert cache.get(("f1", "yunet")) is None and cache.get(("f2", "yunet")) is None
    assert [cache.get((f"f{k}", "yunet")) for k in (0, 3, 4)] == [[(0, 0, 10, 10)], [(3, 3, 10, 10)], [(4, 4, 10, 10)]]


def test_decoding_a_large_image_sets_no_warning_filter_per_call(tmp_path):
    """Pillow's decompression-bomb warning is filtered once, when ferlab is imported (ferlab enforces its own
    limit): decoding in threads never enters warnings.catch_warnings, which is not thread-safe."""
    import warnings

    from ferlab.data import images

    big = tmp_path / "big.png"
    Image.new("RGB", (80, 80), (9, 9, 9)).save(big)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # 6,400 pixels: over Pillow's warning threshold
        mp.setattr(warnings, "catch_warnings", None)  # a call would fail here
        im = images.open_rgb(big, 100_000)
    assert im.size == (80, 80)
