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

import dataclasses
import errno
import hashlib
import os
import re
import struct
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ferlab import faces
from ferlab.config import DataConfig
from ferlab.errors import FerlabError
from ferlab.files import write_csv

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
# the decoders ferlab lets Pillow use: never EPS (which runs Ghostscript), PSD and the like
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
WEB_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")  # what the server decodes: a smaller surface for strangers' bytes
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Preprocess:
    """How a file becomes a model input: travels in every checkpoint, so prediction matches training."""

    image_size: int = 100
    face_crop: str = "off"
    face_margin: float = 0.2
    max_pixels: int = 40_000_000
    grayscale: bool = False  # seen as grayscale replicated to RGB, as the training images were
    faces: str = ""  # what the training images were: "crops" (of faces), "photos" (with faces in them), "" unknown
    source_side: int = 0  # the training images' typical longer side in pixels (crops: what "like them" means)
    detector: str = "haar"  # the face detector training used; prediction uses the same


def crop_policy(pre: Preprocess, size: tuple[int, int], override: str | None = None) -> str:
    """The face-crop policy for one image of ``size`` (width, height): the user's override, else training's
    own policy, else (a model trained on face crops) ``auto`` for an image unlike its training images, a
    photo more than twice their side, and ``off`` for one like them."""
    if override:
        return override
    if pre.face_crop != "off":
        return pre.face_crop
    if pre.faces == "crops" and max(size) > 2 * max(pre.source_side, pre.image_size):
        return "auto"
    return "off"


class BadImage(Exception):
    """A file that cannot be used; its message is the reason listed in skipped_files.csv, its ``kind`` what
    went wrong (``format``, ``pixels``, ``corrupt``, ``mode``; ``file`` for the file itself)."""

    def __init__(self, message: str, kind: str = "file"):
        super().__init__(message)
        self.kind = kind


class NoFace(BadImage):
    """A readable image in which the face-crop policy ``on`` found no face."""


@dataclass
class Decoded:
    image: np.ndarray  # H x W x 3 uint8, cropped and resized
    box: faces.Box | None  # the face box in the original image, when one was cropped
    note: str = ""  # what happened when it matters to the user ("no face found: the whole image")

    @property
    def gray(self) -> bool:
        a = self.image
        return bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


def open_rgb(path: str | Path, max_pixels: int) -> Image.Image:
    """Open an image file as upright RGB, or raise :class:`BadImage` saying why it cannot be used."""
    path = Path(path)
    if path.is_symlink():
        try:
            path.stat()
        except FileNotFoundError:
            raise BadImage("broken symbolic link (its target does not exist)") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise BadImage("symbolic link loop") from None
            raise BadImage(f"unreadable symbolic link ({e.strerror})") from None
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise BadImage(f"unsupported file type '{path.suffix or path.name}'")
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
        with open(path, "rb") as f:
            return decode_image(f, max_pixels)
    except FileNotFoundError:
        raise BadImage("the file does not exist") from None
    except IsADirectoryError:
        raise BadImage("a folder, not an image file") from None
    except PermissionError:
        raise BadImage("not readable (permission denied)") from None
    except OSError as e:
        raise BadImage(f"unreadable ({e.strerror or e})") from None


def decode_image(fp: BinaryIO, max_pixels: int, used: int = 0, formats: tuple[str, ...] = IMAGE_FORMATS) -> Image.Image:
    """Image bytes as upright RGB, or :class:`BadImage` saying why not: the one decoder behind files and the
    server's uploads. Only ``formats`` are tried; the pixel limit (``used`` pixels already spent
    count against it) is checked from the header, before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp, formats=formats)
            if used + im.width * im.height > max_pixels:
                raise BadImage(
                    f"{im.width}x{im.height}{' with the earlier images' if used else ''} is over the pixel limit "
                    f"of {max_pixels:,} (possible decompression bomb)",
                    "pixels",
                )
            im.load()
            im = ImageOps.exif_transpose(im)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can read", "format") from None
    except Image.DecompressionBombError:
        raise BadImage(f"over the pixel limit of {max_pixels:,} (possible decompression bomb)", "pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise BadImage(f"truncated or corrupt image data ({e})", "corrupt") from None
    return normalize_mode(im)


def normalize_mode(im: Image.Image) -> Image.Image:
    """Any decoded image as RGB (16-bit greyscale keeps its top 8 bits); an unsupported mode is a BadImage."""
    if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit greyscale: keep the top 8 bits
        a = np.asarray(im)  # uint16 (I;16) or int32 (I): no wider copy of a large image
        if a.dtype != np.uint16:
            a = np.clip(a, 0, 65535)
        im = Image.fromarray((a >> 8).astype(np.uint8), "L")
    elif im.mode == "F":
        raise BadImage("unsupported image mode F (32-bit float)", "mode")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


_FACES: dict[tuple, list[faces.Box]] = {}  # (path, mtime, size, detector) -> boxes: each file searched once


def detect(im: Image.Image, detector: str, key: Any = None) -> list[faces.Box]:
    """Faces in the decoded image, largest first; with a ``key`` (a file's identity) searched once per process."""
    if key is not None and (key, detector) in _FACES:
        return _FACES[(key, detector)]
    found = faces.find_faces(np.asarray(im), detector)
    if key is not None:
        _FACES[(key, detector)] = found
    return found


def file_key(path: str | Path) -> tuple:
    st = os.stat(path)
    return (str(path), st.st_mtime_ns, st.st_size)


def prepare(
    im: Image.Image, pre: Preprocess, all_faces: bool = False, face_crop: str | None = None, key: Any = None
) -> list[Decoded]:
    """An upright RGB image made into model inputs as ``pre`` prescribes: grayscale when training was, the face
    crop :func:`crop_policy` decides (one entry per face with ``all_faces``), resized to the model's input."""
    if pre.grayscale:  # ITU-R 601 luma, exact for images whose channels are already equal
        im = im.convert("L").convert("RGB")
    policy = crop_policy(pre, im.size, face_crop)
    boxes: list[faces.Box | None] = [None]
    note = ""
    if policy != "off":
        found = detect(im, pre.detector, None if key is None else (*key, pre.grayscale))
        if found:
            boxes = list(found) if all_faces else found[:1]
        elif policy == "on":
            raise NoFace("no face found (--face-crop on)")
        else:
            note = "no face found: the whole image was classified"
    out = []
    for box in boxes:
        crop = im
        if box is not None:
            x, y, w, h = faces.expand(box, pre.face_margin, im.width, im.height)
            crop = im.crop((x, y, x + w, y + h))
        crop = crop.resize((pre.image_size, pre.image_size), Image.Resampling.BILINEAR)
        out.append(Decoded(np.asarray(crop, dtype=np.uint8), box, note))
    return out


def decode(path: str | Path, pre: Preprocess, all_faces: bool = False, face_crop: str | None = None) -> list[Decoded]:
    """Decode one file and :func:`prepare` it."""
    im = open_rgb(path, pre.max_pixels)
    return prepare(im, pre, all_faces, face_crop, key=file_key(path))


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
    """Every file under a class folder, broken symbolic links included (so they are listed, not lost)."""
    return sorted(f for f in class_dir.rglob("*") if (f.is_file() or f.is_symlink()) and not f.name.startswith("."))


def scan(root: Path, drop: Sequence[str], what: str) -> list[Record]:
    """Records of a folder-per-class tree."""
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise FerlabError(f"The {what} folder {root} {state}; pass a folder of class sub-folders.")
    records = [Record(str(f), d.name) for d in _class_dirs(root, drop) for f in _files(d)]
    if not any(Path(r.file).suffix.lower() in IMAGE_SUFFIXES for r in records):
        raise FerlabError(
            f"The {what} folder {root} holds no images in class sub-folders (expected {root}/<class>/<image files>)."
        )
    return records


def check_drop(root: Path, drop: Sequence[str], shown: Path | None = None) -> None:
    """Every class named to be dropped is a class folder of ``root``: a typo is an error, not a no-op."""
    present = {d.name for d in _class_dirs(root, [])}
    typos = [c for c in drop if c not in present]
    if typos:
        what = "is not a class folder" if len(typos) == 1 else "are not class folders"
        raise FerlabError(
            f"--drop-classes names {', '.join(typos)}, which {what} of {shown or root} "
            f"(classes: {', '.join(sorted(present))})."
        )


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
    return Preprocess(
        cfg.image_size,
        cfg.face_crop,
        cfg.face_margin,
        cfg.max_pixels,
        cfg.grayscale == "on",
        detector=cfg.face_detector,
    )


def survey(files: Sequence[str], pre: Preprocess, sample: int = 200, seed: int = 0) -> Preprocess:
    """Record what the training images are, so prediction can treat new images as training treated these.

    On up to ``sample`` training files: their typical longer side, and how much of each image the face
    detector's largest box fills. Images that a face fills (median box width at least 40% of the image's) or
    small images where the detector rarely fires are face crops: prediction then crops faces out of photos
    unlike them, with the margin that reproduces the training images' framing. Otherwise they are photos.
    """
    if not files:
        return pre
    rng = np.random.default_rng(seed)
    chosen = [files[i] for i in sorted(rng.choice(len(files), min(sample, len(files)), replace=False))]
    sides, fills = [], []
    for f in chosen:
        try:
            im = open_rgb(f, pre.max_pixels)
        except BadImage:
            continue
        sides.append(max(im.size))
        found = detect(im, pre.detector, file_key(f))
        if found:
            fills.append(min(1.0, max(found[0][2:]) / min(im.size)))
    if not sides:
        return pre
    side = int(np.median(sides))
    if pre.face_crop != "off":
        return dataclasses.replace(pre, faces="photos", source_side=side)
    if len(fills) >= 5 and np.median(fills) >= 0.4:
        fill = float(np.median(fills))  # crop side = face side * (1 + 2 * margin) gives this framing
        margin = round(min(0.5, max(0.0, (1 / fill - 1) / 2)), 3)
        return dataclasses.replace(pre, faces="crops", source_side=side, face_margin=margin)
    if len(fills) < 5 and side <= 128:
        return dataclasses.replace(pre, faces="crops", source_side=side)
    return dataclasses.replace(pre, faces="photos", source_side=side)


def merge_duplicates(files: Sequence[str], groups: list[str]) -> int:
    """Put byte-identical files into one group (in place), so a split never has the same image on both sides
    (FER2013 holds about a thousand such sets). Returns how many files joined another's group."""
    parent = {g: g for g in groups}

    def root(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    first: dict[str, str] = {}
    for f, g in zip(files, groups):
        try:
            digest = hashlib.blake2b(Path(f).read_bytes(), digest_size=16).digest()
        except OSError:
            continue
        other = first.setdefault(digest, g)
        a, b = root(other), root(g)
        if a != b:
            parent[max(a, b)] = min(a, b)
    merged = [root(g) for g in groups]
    moved = sum(a != b for a, b in zip(merged, groups))
    groups[:] = merged
    return moved


def assign_folds(
    labels: np.ndarray, groups: Sequence[str], k: int, num_classes: int, classes: Sequence[str], seed: int
) -> np.ndarray:
    """Stratified grouped K-fold: each item's test fold; every group in exactly one fold, each class's groups
    spread over the folds as evenly as the groups allow. Impossible requests are one clear sentence."""
    n_groups = len(set(groups))
    if k > n_groups:
        raise FerlabError(f"--folds {k} needs at least {k} groups; the data has {n_groups}.")
    for c in range(num_classes):
        have = len({g for g, y in zip(groups, labels) if y == c})
        if have < k:
            raise FerlabError(
                f"Class '{classes[c]}' has images from only {have} groups, fewer than --folds {k}: some test folds "
                f"would have none of it; use --folds {max(2, have)} or fewer, or drop the class."
            )
    names = sorted(set(groups))
    index = {g: i for i, g in enumerate(names)}
    gid = np.array([index[g] for g in groups])
    counts = np.zeros((len(names), num_classes))
    np.add.at(counts, (gid, labels), 1)
    has = (counts > 0).astype(float)
    # groups with more classes and more images first (they are the hardest to place), ties in seeded order
    order = np.random.default_rng(seed).permutation(len(names))
    order = order[np.lexsort((-counts[order].sum(1), -has[order].sum(1)))]
    groups_in = np.zeros((k, num_classes))  # per fold and class: how many groups hold that class
    images_in = np.zeros(k)
    fold_of = np.empty(len(names), int)
    for g in order:
        # the fold where this group's classes are rarest (least squared growth), then the fold with fewest images
        growth = ((groups_in + has[g]) ** 2).sum(1) - (groups_in**2).sum(1)
        f = int(np.lexsort((np.arange(k), images_in, growth))[0])
        fold_of[g] = f
        groups_in[f] += has[g]
        images_in[f] += counts[g].sum()
    return fold_of[gid]


def load_data(
    cfg: DataConfig, seed: int = 0, description: str | None = None, fold: tuple[int, int] | None = None
) -> Data:
    """Find, split and decode a dataset as ``cfg`` describes (``cfg.data`` must be set).

    With ``fold=(k, K)``: test is the k-th (0-based) of K stratified grouped folds, and validation is carved,
    by group again, from the other folds (``cfg.split``'s train:val proportion)."""
    root = Path(os.path.abspath(Path(cfg.data).expanduser()))
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise FerlabError(f"The data folder {root} {state}; pass a folder of class sub-folders.")
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
    if fold is not None and (presplit or cfg.test_dir):
        raise FerlabError(
            "--folds splits one folder-per-class tree itself; it cannot use train/val/test folders or --test-dir."
        )
    check_drop(root / "train" if presplit else root, cfg.drop_classes, root)
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
    if cfg.grayscale == "auto":
        train_files = {r.file for r in given["train"]}
        train_decoded = [d for r, d in zip(records, decoded) if d is not None and r.file in train_files]
        if train_decoded and all(d.gray for d in train_decoded):
            # prediction will turn colour photos into what the model saw; the grayscale training images decode
            # the same either way, colour images of the other splits are decoded again as the model sees them
            pre = dataclasses.replace(pre, grayscale=True)
            colour = [i for i, d in enumerate(decoded) if d is not None and not d.gray]
            again, why = decode_many([records[i].file for i in colour], pre)
            for i, d, w in zip(colour, again, why):
                decoded[i], reasons[i] = d, w
    skipped = [(r.file, why) for r, why in zip(records, reasons) if why]
    ok = {r.file: d for r, d in zip(records, decoded) if d is not None}
    for s, recs in given.items():
        for r in recs:
            r.split = s
        given[s] = [r for r in recs if r.file in ok]

    # make the splits the layout does not provide, from the training pool
    missing = [s for s in SPLITS if s not in given]
    duplicates = 0
    if missing:
        pool = given["train"]
        wanted = ["train", *missing]
        fractions = [cfg.split[SPLITS.index(s)] for s in wanted]
        labels = np.array([classes.index(r.cls) for r in pool], int)
        groups = [group_of(Path(r.file).name, pattern) for r in pool]
        duplicates = merge_duplicates([r.file for r in pool], groups)
        for r, g in zip(pool, groups):
            r.group = g
        if fold is not None:
            k, n_folds = fold
            test = assign_folds(labels, groups, n_folds, len(classes), classes, seed) == k
            rest = [i for i in range(len(pool)) if not test[i]]
            inner = assign_splits(labels[rest], [groups[i] for i in rest], cfg.split[:2], len(classes), seed + 1 + k)
            for i in np.flatnonzero(test):
                pool[i].split = "test"
            for i, s in zip(rest, inner):
                pool[i].split = ("train", "val")[s]
        else:
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

    pre = survey([r.file for r in given["train"]], pre, seed=seed)
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
    elif fold is not None:
        method = f"test: fold {fold[0] + 1} of {fold[1]} (stratified), validation carved from the other folds"
    else:
        method = "seeded class-stratified split " + "/".join(f"{f:g}" for f in cfg.split)
    if pattern is not None:
        method += f", grouped by '{cfg.group_by}' ({len({r.group for r in records if r.group})} groups)"
    if missing and duplicates:
        method += f", byte-identical files kept together ({duplicates} files joined a duplicate's group)"
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
