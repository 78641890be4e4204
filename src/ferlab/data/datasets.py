"""Datasets: folders of labelled images, leakage-free splits and folds."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ferlab.core.config import DataConfig
from ferlab.core.errors import FerlabError
from ferlab.core.files import write_csv
from ferlab.core.names import canonical
from ferlab.data import faces
from ferlab.data.images import (
    IMAGE_SUFFIXES,
    BadImage,
    Decoded,
    Preprocess,
    decode_many,
    detect,
    file_key,
    open_rgb,
    to_tensor,
)
from ferlab.data.votes import Votes, read_votes

SPLITS = ("train", "val", "test")


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


def empty_classes(root: Path, drop: Sequence[str]) -> list[str]:
    """Class folders of ``root`` that hold no file: not classes of the data, which a user should hear about."""
    return [d.name for d in _class_dirs(root, drop) if not _files(d)]


def empty_note(root: Path, drop: Sequence[str]) -> list[str]:
    empty = empty_classes(root, drop)
    if not empty:
        return []
    return [f"the class folder(s) {', '.join(empty)} of {root} hold no files; they are not classes of this data"]


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
    labels: torch.Tensor  # N int64 (with votes: the majority)
    files: list[str]
    targets: torch.Tensor | None = None  # N x classes float32: the vote distribution, when labels come from votes

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
    votes: Votes | None = None  # where the labels came from, when not from folder names
    notes: list[str] = field(default_factory=list)  # what the user should know about the data (warnings)

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
    root = _data_root(cfg.data)
    pattern = _group_pattern(cfg.group_by)
    given, presplit = _given_records(root, cfg, fold)
    votes, unvoted = None, []
    notes = [] if cfg.labels else empty_note(root / "train" if presplit else root, cfg.drop_classes)
    if cfg.labels:
        votes = read_votes(cfg.labels, root)
        check_vote_drop(votes, cfg.drop_classes)
        given, unvoted, notes = relabel(given, votes, cfg.drop_classes)
        classes = [c for c in votes.classes if c not in {canonical(d) for d in cfg.drop_classes}]
    else:
        classes = _classes(given, root)
    records = [r for recs in given.values() for r in recs]
    pre, ok, skipped = _decode(records, {r.file for r in given["train"]}, cfg)
    skipped = unvoted + skipped
    given, missing, duplicates = _arrange(given, ok, classes, pattern, cfg, seed, fold)
    _check_splits(given, classes, pattern, cfg)
    pre = survey([r.file for r in given["train"]], pre, seed=seed)
    splits = {s: _image_set(given[s], ok, classes, pre.image_size, votes) for s in SPLITS}
    boxes = {f: d.box for f, d in ok.items() if d.box is not None}
    method = _split_method(cfg, presplit, missing, fold, pattern, records, duplicates)
    manifest = [r for s in SPLITS for r in given[s]]
    if votes is not None:
        method += f", labels: the majority of the votes in {cfg.labels}"
    return Data(classes, splits, manifest, skipped, pre, description or str(root), method, boxes, votes, notes)


def _image_set(
    records: list[Record], ok: dict[str, Decoded], classes: list[str], size: int, votes: Votes | None
) -> ImageSet:
    targets = None
    if votes is not None:
        targets = torch.tensor(np.array([votes.distribution(r.file, classes) for r in records]), dtype=torch.float32)
        targets = targets.reshape(len(records), len(classes))
    return ImageSet(
        to_tensor([ok[r.file].image for r in records], size),
        torch.tensor([classes.index(r.cls) for r in records], dtype=torch.long),
        [r.file for r in records],
        targets,
    )


def check_vote_drop(votes: Votes, drop: Sequence[str]) -> None:
    """With labels from votes, --drop-classes names classes of the votes file."""
    typos = [d for d in drop if canonical(d) not in votes.classes]
    if typos:
        raise FerlabError(
            f"--drop-classes names {', '.join(typos)}, not a class of the votes file {votes.path} "
            f"(classes: {', '.join(votes.classes)})."
        )


def relabel(
    given: dict[str, list[Record]], votes: Votes, drop: Sequence[str]
) -> tuple[dict[str, list[Record]], list[tuple[str, str]], list[str]]:
    """Each record's class from its votes' majority. Returns the records that have one (of a class not dropped),
    the image files left out with the reason, and warnings about rows that name no file of the folder."""
    dropped = {canonical(d) for d in drop}
    out: dict[str, list[Record]] = {}
    left_out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for s, recs in given.items():
        out[s] = []
        for r in recs:
            seen.add(r.file)
            if r.file not in votes.counts:
                left_out.append((r.file, f"no row in the votes file {votes.path}"))
                continue
            label = votes.majority.get(r.file)
            if label is None:
                left_out.append((r.file, "the votes have no emotion majority (FER+'s rule)"))
            elif label not in dropped:
                out[s].append(dataclasses.replace(r, cls=label))
    notes = []
    unused = len(set(votes.counts) - seen)
    if unused:
        notes.append(f"{unused} rows of the votes file {votes.path} name files that are not in the data folder")
    return out, left_out, notes


def _data_root(data: str | None) -> Path:
    root = Path(os.path.abspath(Path(data).expanduser()))
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise FerlabError(f"The data folder {root} {state}; pass a folder of class sub-folders.")
    return root


def _group_pattern(group_by: str | None) -> re.Pattern[str] | None:
    if not group_by:
        return None
    try:
        return re.compile(group_by)
    except re.error as e:
        raise FerlabError(f"--group-by '{group_by}' is not a valid regular expression ({e}).") from None


def _given_records(root: Path, cfg: DataConfig, fold: tuple[int, int] | None) -> tuple[dict[str, list[Record]], bool]:
    """The records of each split the layout gives (``DIR/<class>`` is all train), and whether it is pre-split."""
    presplit = (root / "train").is_dir() and any((root / s).is_dir() for s in ("val", "test"))
    given: dict[str, list[Record]] = {}
    drop = [] if cfg.labels else cfg.drop_classes  # with votes, --drop-classes names the votes' classes
    if presplit:
        for s in SPLITS:
            if (root / s).is_dir():
                given[s] = scan(root / s, drop, f"{s} split")
    else:
        given["train"] = scan(root, drop, "data")
    if fold is not None and (presplit or cfg.test_dir):
        raise FerlabError(
            "--folds splits one folder-per-class tree itself; it cannot use train/val/test folders or --test-dir."
        )
    check_drop(root / "train" if presplit else root, drop, root)
    if cfg.test_dir:
        given["test"] = scan(Path(os.path.abspath(Path(cfg.test_dir).expanduser())), drop, "test")
    return given, presplit


def _classes(given: dict[str, list[Record]], root: Path) -> list[str]:
    """Training's class folders; every other split must use the same ones."""
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
    return classes


def _decode(
    records: list[Record], train_files: set[str], cfg: DataConfig
) -> tuple[Preprocess, dict[str, Decoded], list[tuple[str, str]]]:
    """Every file decoded once: the preprocessing (grayscale when ``auto`` finds every training image grey), the
    usable files' decoded images by file, and the skipped files with their reasons."""
    pre = preprocess_of(cfg)
    decoded, reasons = decode_many([r.file for r in records], pre)
    if cfg.grayscale == "auto":
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
    return pre, ok, skipped


def _arrange(
    given: dict[str, list[Record]],
    ok: dict[str, Decoded],
    classes: list[str],
    pattern: re.Pattern[str] | None,
    cfg: DataConfig,
    seed: int,
    fold: tuple[int, int] | None,
) -> tuple[dict[str, list[Record]], list[str], int]:
    """The usable records of every split: the ones the layout gives, and the splits it does not give carved
    from the training pool. Returns them, the splits that were carved, and how many files joined a duplicate."""
    given = {s: [r for r in recs if r.file in ok] for s, recs in given.items()}
    for s, recs in given.items():
        for r in recs:
            r.split = s
    missing = [s for s in SPLITS if s not in given]
    if not missing:
        return given, missing, 0
    duplicates = _carve(given["train"], missing, classes, pattern, cfg, seed, fold)
    return {s: [r for recs in given.values() for r in recs if r.split == s] for s in SPLITS}, missing, duplicates


def _carve(
    pool: list[Record],
    missing: list[str],
    classes: list[str],
    pattern: re.Pattern[str] | None,
    cfg: DataConfig,
    seed: int,
    fold: tuple[int, int] | None,
) -> int:
    """Assign each training-pool record its split (``missing`` ones carved out, or a fold's test and the rest's
    train/val), byte-identical files kept in one group; returns how many files joined a duplicate's group."""
    wanted = ["train", *missing]
    labels = np.array([classes.index(r.cls) for r in pool], int)
    groups = [group_of(Path(r.file).name, pattern) for r in pool]
    duplicates = merge_duplicates([r.file for r in pool], groups)
    for r, g in zip(pool, groups):
        r.group = g
    if fold is None:
        fractions = [cfg.split[SPLITS.index(s)] for s in wanted]
        where = assign_splits(labels, groups, fractions, len(classes), seed) if pool else []
        for r, s in zip(pool, where):
            r.split = wanted[s]
        return duplicates
    k, n_folds = fold
    test = assign_folds(labels, groups, n_folds, len(classes), classes, seed) == k
    rest = [i for i in range(len(pool)) if not test[i]]
    inner = assign_splits(labels[rest], [groups[i] for i in rest], cfg.split[:2], len(classes), seed + 1 + k)
    for i in np.flatnonzero(test):
        pool[i].split = "test"
    for i, s in zip(rest, inner):
        pool[i].split = ("train", "val")[s]
    return duplicates


def _check_splits(
    given: dict[str, list[Record]], classes: list[str], pattern: re.Pattern[str] | None, cfg: DataConfig
) -> None:
    """Every record in a group; no group in two splits (it would leak faces from training into test), every
    class trained, no empty split."""
    for r in (r for recs in given.values() for r in recs):
        if not r.group:
            r.group = group_of(Path(r.file).name, pattern)
    if pattern is not None:
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


def _split_method(
    cfg: DataConfig,
    presplit: bool,
    missing: list[str],
    fold: tuple[int, int] | None,
    pattern: re.Pattern[str] | None,
    records: list[Record],
    duplicates: int,
) -> str:
    """How the splits were made, in words (dataset.json, the report and the model card say it)."""
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
    return method


def cap_per_class(data: Data, n: int, seed: int) -> Data:
    """``data`` with at most ``n`` training images per class (a learning curve's point): the first ``n`` of each
    class in one seeded order of the training split, so a larger ``n``'s images hold a smaller one's. Validation
    and test are unchanged; the manifest marks the training images left out as ``unused``."""
    train = data.splits["train"]
    order = np.random.default_rng(seed).permutation(len(train))
    taken: Counter[int] = Counter()
    keep = []
    for i in order.tolist():
        c = int(train.labels[i])
        if taken[c] < n:
            keep.append(i)
            taken[c] += 1
    keep.sort()
    index = torch.tensor(keep, dtype=torch.long)
    subset = ImageSet(
        train.images[index],
        train.labels[index],
        [train.files[i] for i in keep],
        None if train.targets is None else train.targets[index],
    )
    kept = set(subset.files)
    manifest = [
        dataclasses.replace(r, split="unused") if r.split == "train" and r.file not in kept else r
        for r in data.manifest
    ]
    return dataclasses.replace(
        data,
        splits={**data.splits, "train": subset},
        manifest=manifest,
        split_method=f"{data.split_method}; at most {n} training images per class",
    )


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
