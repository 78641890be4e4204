"""``ferlab evaluate``: a saved model scored on a labelled folder, through the one inference path.

ferlab evaluate runs/x/regularized-cnn/model.ckpt faces/ --class-map contempt=disgust --drop-classes neutral
ferlab evaluate ferplus fer2013/test --labels ferplus_test_votes.csv    # labels: the votes' majority
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ferlab.core.config import is_distributed
from ferlab.core.errors import FerlabError
from ferlab.core.files import write_csv
from ferlab.core.names import canonical
from ferlab.core.stats import wilson
from ferlab.data.datasets import check_drop, check_vote_drop, empty_note, relabel, scan
from ferlab.data.votes import Votes, read_votes
from ferlab.inference.model import Face, Model, calibrated, load_model
from ferlab.reporting.metrics import expected_calibration_error, overlapping, score_and_record

if TYPE_CHECKING:
    from ferlab.training.sharded import Engine


def parse_class_map(text: str | None) -> dict[str, str]:
    """``a=b,c=d`` -> {"a": "b", "c": "d"}."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        if item.count("=") != 1 or not all(part.strip() for part in item.split("=")):
            raise FerlabError(
                f"--class-map takes data=model pairs separated by commas (e.g. anger=angry), got '{item}'."
            )
        a, b = (part.strip() for part in item.split("="))
        out[a] = b
    return out


def map_classes(
    data_classes: list[str], model_classes: list[str], class_map: dict[str, str], drop: list[str]
) -> tuple[dict[str, str], list[str]]:
    """Each data class -> the model class it means (given map first, then built-in synonyms); returns the mapping
    and the notes saying what was mapped and dropped. A class that maps to nothing is one clear sentence."""
    for a, b in class_map.items():
        if b not in model_classes:
            raise FerlabError(
                f"--class-map maps '{a}' to '{b}', which the model does not know ({', '.join(model_classes)})."
            )
    by_synonym = {canonical(c): c for c in model_classes}
    mapping, notes, unknown = {}, [], []
    for c in data_classes:
        if c in drop:
            continue
        target = class_map.get(c) or (c if c in model_classes else by_synonym.get(canonical(c)))
        if target is None:
            unknown.append(c)
            continue
        mapping[c] = target
        if target != c:
            notes.append(f"{c} -> {target}")
    if unknown:
        raise FerlabError(
            f"The data has classes the model does not know: {', '.join(unknown)} (it knows "
            f"{', '.join(model_classes)}); map them with --class-map DATA=MODEL or leave them out with --drop-classes."
        )
    return mapping, notes


def labelled(
    model: Model,
    folder: str | Path,
    class_map: str | None = None,
    drop: list[str] | None = None,
    votes: Votes | None = None,
    engine: Engine | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str], list[dict], list[str]] | None:
    """A folder-per-class tree classified through the inference path as ``model``'s card prescribes, its classes
    (the folders', or with ``votes`` each image's majority) mapped onto the model's: the logits, the labels, the
    files, the skipped files with reasons, and what was mapped. With a distributed ``engine`` the files are
    shared out among its processes; rank 0 gets the answer, the others None."""
    drop = list(drop or [])
    root = Path(os.path.abspath(Path(folder).expanduser()))
    unvoted: list[tuple[str, str]] = []
    if votes is None:
        records = scan(root, drop, "evaluation")
        check_drop(root, drop)
    else:
        check_vote_drop(votes, drop)
        given, unvoted, _ = relabel({"test": scan(root, [], "evaluation")}, votes, drop)
        records = given["test"]
        drop = []  # relabel left the dropped classes out already
        if not records:
            raise FerlabError(f"No image of {folder} has an emotion majority in the votes file {votes.path}.")
    mapping, mapped = map_classes(sorted({r.cls for r in records}), model.classes, parse_class_map(class_map), drop)
    classified = classify_all(model, [r.file for r in records], engine)
    if classified is None:  # another rank of a distributed evaluation
        return None
    faces, reasons = classified
    keep = [(r, f) for r, f in zip(records, faces) if f is not None]
    skipped = [{"file": f, "reason": why} for f, why in unvoted]
    skipped += [{"file": r.file, "reason": why} for r, why in zip(records, reasons) if why]
    if not keep:
        raise FerlabError(f"None of the {len(records)} files in {folder} could be read as images.")
    logits = torch.from_numpy(np.stack([f.logits for _, f in keep]))
    y = torch.tensor([model.classes.index(mapping[r.cls]) for r, _ in keep])
    return logits, y, [r.file for r, _ in keep], skipped, mapped


def classify_all(model: Model, files: list[str], engine: Engine | None) -> tuple[list[Face | None], list[str]] | None:
    """``model.classify_files(files)``, in one process or shared out among ``engine``'s (None on ranks but 0)."""
    if engine is None or not is_distributed(engine):
        return model.classify_files(files)
    from ferlab.training.sharded import map_sharded  # Lightning only where an evaluation is distributed

    def work(indices: list[int]) -> tuple[list[Face | None], list[str]]:
        faces, reasons = model.classify_files([files[i] for i in indices])
        for f in faces:
            if f is not None:
                f.crop = None  # what goes between processes: logits, not pictures
        return faces, reasons

    chunks = map_sharded(len(files), work, engine)
    if chunks is None:
        return None
    faces: list[Face | None] = [None] * len(files)
    reasons = [""] * len(files)
    for indices, (got, why) in chunks:
        for i, f, r in zip(indices, got, why):
            faces[i], reasons[i] = f, r
    return faces, reasons


def evaluate_model(
    checkpoint: str | Path,
    folder: str | Path,
    out: Path,
    class_map: str | None = None,
    drop_classes: list[str] | None = None,
    labels: str | Path | None = None,
    engine: Engine | None = None,
) -> dict | None:
    """Metrics of a saved model (a .ckpt, an .onnx or a shipped model's name) on a folder-per-class tree,
    written into ``out``; mapped and dropped classes, baselines and any overlap with the model's own training
    images are in the returned dict's ``notes``. With ``labels`` (a votes file, as ``ferlab train --labels``
    takes), each image's label is its votes' majority, and ``vote_weighted_accuracy`` is the mean share of an
    image's annotators who voted for the predicted class."""
    model = load_model(checkpoint)
    classes = model.classes
    drop = list(drop_classes or [])
    votes = read_votes(labels, Path(os.path.abspath(Path(folder).expanduser()))) if labels else None
    scored = labelled(model, folder, class_map, drop, votes, engine)
    if scored is None:  # another rank of a distributed evaluation: rank 0 writes and reports
        return None
    logits, y, files, skipped, mapped = scored
    probs = calibrated(logits, model.temperature)
    extra = {}
    if votes is not None:
        preds = probs.argmax(1).tolist()
        agree = [votes.agreement(f, classes[p]) for f, p in zip(files, preds)]
        extra = {"votes": str(labels), "vote_weighted_accuracy": round(float(np.mean(agree)), 4)}
    present = sorted(set(y.tolist()))
    counts = torch.bincount(y, minlength=len(classes))
    notes = []
    if labels is None:
        notes += empty_note(Path(os.path.abspath(Path(folder).expanduser())), drop)
    if mapped:
        notes.append("mapped classes: " + ", ".join(mapped))
    if drop:
        notes.append("dropped classes: " + ", ".join(drop))
    absent = [c for i, c in enumerate(classes) if i not in present]
    if absent:
        notes.append(
            f"the model also knows {', '.join(absent)}, which this data has no images of; "
            "predicting them counts as wrong"
        )
    warnings_ = []
    if skipped:
        warnings_.append(
            f"{len(skipped)} of {len(skipped) + len(files)} files could not be read as images and were left out "
            f"(each with its reason in {out / 'skipped_files.csv'})"
        )
    out.mkdir(parents=True, exist_ok=True)
    (in_train, in_val), unseen, warning = own_images(model, files, probs, y, out)
    warnings_ += [warning] if warning else []
    m = score_and_record(
        probs,
        y,
        files,
        classes,
        out,
        Path(model.name).stem if Path(model.name).suffix else model.name,
        name=str(checkpoint),  # as the user gave it: a shipped model's name or the file's path
        model=model.card["model"],
        checkpoint=str(checkpoint),
        runtime=model.runtime.kind,
        data=str(folder),
        skipped_files=len(skipped),
        chance=round(1 / len(classes), 4),
        majority=round(counts.max().item() / len(y), 4),
        majority_class=classes[int(counts.argmax())],
        ece_uncalibrated=round(expected_calibration_error(logits.softmax(1), y), 4),
        temperature=model.temperature,
        notes=notes,
        warnings=warnings_,
        overlap={"train": in_train, "val": in_val},
        unseen=unseen,
        **extra,
    )
    write_csv(out / "skipped_files.csv", skipped, ["file", "reason"])
    return m


def unseen_accuracy(probs: torch.Tensor, y: torch.Tensor, seen: list[bool]) -> dict:
    """Accuracy on the images the model never trained or chose its epoch on, with its Wilson interval."""
    keep = torch.tensor([not s for s in seen])
    n = int(keep.sum())
    right = int((probs.argmax(1)[keep] == y[keep]).sum())
    lo, hi = wilson(right, n)
    return {
        "n": n,
        "correct": right,
        "accuracy": round(right / n, 4) if n else 0.0,
        "ci95": [round(lo, 4), round(hi, 4)],
    }


def own_images(
    model: Model, files: list[str], probs: torch.Tensor, y: torch.Tensor, out: Path
) -> tuple[tuple[int, int], dict | None, str]:
    """Which evaluation images the model trained on or chose its epoch on (its card's digests): how many of each,
    the accuracy without them, and the warning; they are listed in ``out/overlap_files.csv``."""
    data_card = model.card.get("data", {})
    seen_train = overlapping(files, data_card.get("train_digests"))
    seen_val = overlapping(files, data_card.get("val_digests"))
    seen = [a or b for a, b in zip(seen_train, seen_val)]
    counts = (sum(seen_train), sum(seen_val))
    if not any(seen):
        return counts, None, ""
    unseen = unseen_accuracy(probs, y, seen)
    write_csv(
        out / "overlap_files.csv",
        [{"file": f, "split": "train" if t else "val"} for f, t, s in zip(files, seen_train, seen) if s],
        ["file", "split"],
    )
    without = (
        f"without them the accuracy is {unseen['accuracy']:.4f} (n={unseen['n']})"
        if unseen["n"]
        else "no image is left without them"
    )
    return (
        counts,
        unseen,
        f"{sum(seen)} of {len(files)} evaluation images were among this model's own training images ({counts[0]} in "
        f"its training split, {counts[1]} in its validation split; listed in {out / 'overlap_files.csv'}): this is "
        f"not a fair test; {without}",
    )
