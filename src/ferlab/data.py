"""Image folders in, decoded uint8 tensors and a leakage-free split out.

    >>> from ferlab.config import DataConfig
    >>> data = load_data(DataConfig(data="../shared/datasets/ckplus48", drop_classes=["contempt"],
    ...                             group_by=r"^(S\\d+)_"))                        # doctest: +SKIP
    >>> data.splits["train"].images.shape                                         # doctest: +SKIP
    torch.Size([737, 3, 100, 100])

Layouts: ``DIR/<class>/<images>`` (split here, seeded and class-stratified, optionally keeping groups
together) or ``DIR/{train,val,test}/<class>/<images>`` (splits that are missing are carved from train).
Every image is decoded once with Pillow into memory; files that cannot be used are skipped with a reason.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ferlab import faces
from ferlab.config import DataConfig
from ferlab.errors import FerlabError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Preprocess:
    """How a file becomes a model input: travels in every checkpoint, so prediction matches training."""

    image_size: int = 100
    face_crop: str = "off"
    face_margin: float = 0.2
    max_pixels: int = 40_000_000


class BadImage(Exception):
    """A file that cannot be used; its message is the reason listed in skipped_files.csv."""


class NoFace(BadImage):
    """A readable image in which the face-crop policy ``on`` found no face."""


@dataclass
class Decoded:
    image: np.ndarray  # H x W x 3 uint8, cropped and resized
    box: faces.Box | None  # the face box in the original image, when one was cropped


def open_rgb(path: str | Path, max_pixels: int) -> Image.Image:
    """Open an image file as upright RGB, or raise :class:`BadImage` saying why it cannot be used."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise BadImage(f"unsupported file type '{path.suffix or path.name}'")
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
            if im.width * im.height > max_pixels:  # checked from the header, before any pixel is decoded
                raise BadImage(
                    f"{im.width}x{im.height} is over the pixel limit of {max_pixels:,} (possible decompression bomb)"
                )
            im.load()
            im = ImageOps.exif_transpose(im)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can read") from None
    except Image.DecompressionBombError:
        raise BadImage(f"over the pixel limit of {max_pixels:,} (possible decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"truncated or corrupt image data ({e})") from None
    if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit greyscale: keep the top 8 bits
        a = np.asarray(im).astype(np.int64)
        im = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L")
    elif im.mode == "F":
        raise BadImage("unsupported image mode F (32-bit float)")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


_FACES: dict[tuple[str, int, int], list[faces.Box]] = {}  # (path, mtime, size) -> boxes: detect once


def detect(path: str | Path, im: Image.Image) -> list[faces.Box]:
    """Faces in the decoded image, largest first; each file is searched once per process."""
    st = os.stat(path)
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _FACES:
        _FACES[key] = faces.find_faces(np.asarray(im.convert("L")))
    return _FACES[key]


def decode(path: str | Path, pre: Preprocess, all_faces: bool = False) -> list[Decoded]:
    """Decode, face-crop by ``pre.face_crop`` and resize one file; one entry per face with ``all_faces``."""
    im = open_rgb(path, pre.max_pixels)
    boxes: list[faces.Box | None] = [None]
    if pre.face_crop != "off":
        found = detect(path, im)
        if found:
            boxes = list(found) if all_faces else found[:1]
        elif pre.face_crop == "on":
            raise NoFace("no face found (--face-crop on)")
    out = []
    for box in boxes:
        crop = im
        if box is not None:
            x, y, w, h = faces.expand(box, pre.face_margin, im.width, im.height)
            crop = im.crop((x, y, x + w, y + h))
        crop = crop.resize((pre.image_size, pre.image_size), Image.Resampling.BILINEAR)
        out.append(Decoded(np.asarray(crop, dtype=np.uint8), box))
    return out


def decode_many(paths: Sequence[str | Path], pre: Preprocess) -> tuple[list[Decoded | None], list[str]]:
    """Decode files in parallel (Pillow releases the GIL); returns results and reasons (None/'' when ok)."""

    def one(p: str | Path) -> tuple[Decoded | None, str]:
        try:
            return decode(p, pre)[0], ""
        except BadImage as e:
            return None, str(e)
        except Exception as e:  # noqa: BLE001 - an odd file must never stop a run
            return None, f"unreadable ({e.__class__.__name__}: {e})"

    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, paths))
    return [r for r, _ in results], [reason for _, reason in results]


def to_tensor(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    if not images:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------- folder layout


@dataclass
class Record:
    file: str
    cls: str
    group: str = ""
    split: str = ""


def _class_dirs(root: Path, drop: Sequence[str]) -> list[Path]:
    return sorted(
        (d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in drop),
        key=lambda d: d.name,
    )


def _files(class_dir: Path) -> list[Path]:
    return sorted(f for f in class_dir.rglob("*") if f.is_file() and not f.name.startswith("."))


def scan(root: Path, drop: Sequence[str], what: str) -> list[Record]:
    """Records of a folder-per-class tree."""
    if not root.is_dir():
        raise FerlabError(f"The {what} folder {root} does not exist; pass a folder of class sub-folders.")
    records = [Record(str(f), d.name) for d in _class_dirs(root, drop) for f in _files(d)]
    if not any(Path(r.file).suffix.lower() in IMAGE_SUFFIXES for r in records):
        raise FerlabError(
            f"The {what} folder {root} holds no images in class sub-folders (expected {root}/<class>/<image files>)."
        )
    return records


def group_of(name: str, pattern: re.Pattern[str] | None) -> str:
    if pattern is None:
        return name
    m = pattern.search(name)
    if not m:
        raise FerlabError(
            f"--group-by '{pattern.pattern}' does not match the file name '{name}'; every file needs a group."
        )
    return m.group(1) if m.groups() else m.group(0)


def assign_splits(
    labels: np.ndarray, groups: Sequence[str], fractions: Sequence[float], num_classes: int, seed: int
) -> np.ndarray:
    """Stratified, grouped split: returns a split index per item; a group never crosses splits.

    Groups are placed largest first (ties in seeded random order), each into the split whose per-class
    counts it brings closest to the target fractions (least squared error). With one item per group this
    is an ordinary stratified split.
    """
    names = sorted(set(groups))
    index = {g: i for i, g in enumerate(names)}
    gid = np.array([index[g] for g in groups])
    counts = np.zeros((len(names), num_classes))
    np.add.at(counts, (gid, labels), 1)
    frac = np.asarray(fractions, float) / sum(fractions)
    target = frac[:, None] * counts.sum(0)[None, :]
    order = np.random.default_rng(seed).permutation(len(names))
    order = order[np.argsort(-counts[order].sum(1), kind="stable")]
    current = np.zeros_like(target)
    split_of_group = np.empty(len(names), int)
    for g in order:
        before = ((current - target) ** 2).sum(1)
        after = ((current + counts[g] - target) ** 2).sum(1)
        s = int(np.argmin(after - before))
        split_of_group[g] = s
        current[s] += counts[g]
    return split_of_group[gid]


@dataclass
class ImageSet:
    images: torch.Tensor  # N x 3 x H x W uint8
    labels: torch.Tensor  # N int64
    files: list[str]

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class Data:
    classes: list[str]
    splits: dict[str, ImageSet]
    manifest: list[Record]
    skipped: list[tuple[str, str]]
    pre: Preprocess
    description: str
    split_method: str
    boxes: dict[str, faces.Box] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class."""
        out = {}
        for name, s in self.splits.items():
            c = Counter(s.labels.tolist())
            out[name] = {cls: c.get(i, 0) for i, cls in enumerate(self.classes)}
        return out


def preprocess_of(cfg: DataConfig) -> Preprocess:
    return Preprocess(cfg.image_size, cfg.face_crop, cfg.face_margin, cfg.max_pixels)


def load_data(cfg: DataConfig, seed: int = 0, description: str | None = None) -> Data:
    """Find, split and decode a dataset as ``cfg`` describes (``cfg.data`` must be set)."""
    if len(cfg.split) != 3 or min(cfg.split) < 0 or sum(cfg.split) <= 0:
        raise FerlabError(f"--split needs three non-negative train/val/test fractions, got {cfg.split}.")
    if cfg.image_size < 8:
        raise FerlabError(f"--image-size must be at least 8 pixels, got {cfg.image_size}.")
    root = Path(os.path.abspath(Path(cfg.data).expanduser()))
    if not root.is_dir():
        raise FerlabError(f"The data folder {root} does not exist; pass a folder of class sub-folders.")
    pattern = None
    if cfg.group_by:
        try:
            pattern = re.compile(cfg.group_by)
        except re.error as e:
            raise FerlabError(f"--group-by '{cfg.group_by}' is not a valid regular expression ({e}).") from None
    presplit = (root / "train").is_dir() and any((root / s).is_dir() for s in ("val", "test"))
    given: dict[str, list[Record]] = {}
    if presplit:
        for s in SPLITS:
            if (root / s).is_dir():
                given[s] = scan(root / s, cfg.drop_classes, f"{s} split")
    else:
        given["train"] = scan(root, cfg.drop_classes, "data")
    if cfg.test_dir:
        given["test"] = scan(Path(os.path.abspath(Path(cfg.test_dir).expanduser())), cfg.drop_classes, "test")

    classes = sorted({r.cls for r in given["train"]})
    if len(classes) < 2:
        raise FerlabError(
            f"Found {len(classes)} class folder(s) in {root} ({', '.join(classes) or 'none'}); "
            "a classifier needs at least 2 classes."
        )
    for s, recs in given.items():
        extra = sorted({r.cls for r in recs} - set(classes))
        if extra:
            raise FerlabError(
                f"The {s} set has classes that training does not: {', '.join(extra)}; "
                "use the same class folders in every split."
            )

    pre = preprocess_of(cfg)
    records = [r for recs in given.values() for r in recs]
    decoded, reasons = decode_many([r.file for r in records], pre)
    skipped = [(r.file, why) for r, why in zip(records, reasons) if why]
    ok = {r.file: d for r, d in zip(records, decoded) if d is not None}
    for s, recs in given.items():
        for r in recs:
            r.split = s
        given[s] = [r for r in recs if r.file in ok]

    # make the splits the layout does not provide, from the training pool
    missing = [s for s in SPLITS if s not in given]
    if missing:
        pool = given["train"]
        wanted = ["train", *missing]
        fractions = [cfg.split[SPLITS.index(s)] for s in wanted]
        labels = np.array([classes.index(r.cls) for r in pool], int)
        groups = [group_of(Path(r.file).name, pattern) for r in pool]
        for r, g in zip(pool, groups):
            r.group = g
        where = assign_splits(labels, groups, fractions, len(classes), seed) if pool else []
        for r, s in zip(pool, where):
            r.split = wanted[s]
        given = {s: [r for recs in given.values() for r in recs if r.split == s] for s in SPLITS}
    for r in (r for recs in given.values() for r in recs):
        if not r.group:
            r.group = group_of(Path(r.file).name, pattern)
    if pattern is not None:  # a group found in two splits would leak faces from training into test
        seen: dict[str, str] = {}
        for s in SPLITS:
            for r in given[s]:
                if seen.setdefault(r.group, s) != s:
                    raise FerlabError(
                        f"Group '{r.group}' appears in both the {seen[r.group]} and {s} "
                        "folders; move its files so each group is in one split."
                    )

    trained = {r.cls for r in given["train"]}
    for cls in classes:
        if cls not in trained:
            raise FerlabError(
                f"Class '{cls}' has no readable training images; add images or drop it with --drop-classes."
            )
    for s in SPLITS:
        if not given[s]:
            raise FerlabError(
                f"The {s} split is empty; add images or change --split (now {'/'.join(f'{f:g}' for f in cfg.split)})."
            )

    splits = {}
    for s in SPLITS:
        recs = given[s]
        splits[s] = ImageSet(
            to_tensor([ok[r.file].image for r in recs], pre.image_size),
            torch.tensor([classes.index(r.cls) for r in recs], dtype=torch.long),
            [r.file for r in recs],
        )
    boxes = {f: d.box for f, d in ok.items() if d.box is not None}
    if presplit:
        method = "given train/val/test folders" + (", missing splits carved from train" if missing else "")
    else:
        method = "seeded class-stratified split " + "/".join(f"{f:g}" for f in cfg.split)
    if pattern is not None:
        method += f", grouped by '{cfg.group_by}' ({len({r.group for r in records if r.group})} groups)"
    manifest = [r for s in SPLITS for r in given[s]]
    return Data(classes, splits, manifest, skipped, pre, description or str(root), method, boxes)


def write_manifest(data: Data, path: Path) -> None:
    rows = [
        {
            "file": r.file,
            "class": r.cls,
            "group": r.group,
            "split": r.split,
            "face_box": " ".join(map(str, data.boxes[r.file])) if r.file in data.boxes else "",
        }
        for r in data.manifest
    ]
    write_csv(path, rows, ["file", "class", "group", "split", "face_box"])


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Write a CSV atomically: a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
