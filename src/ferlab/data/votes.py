"""Labels from annotators' votes (FER+'s ten votes per image) instead of folder names.

    >>> votes = read_votes("ferplus_votes.csv", "fer2013/train")            # doctest: +SKIP
    >>> votes.classes[:3], votes.majority["/abs/fer2013/train/angry/x.jpg"]  # doctest: +SKIP
    (['angry', 'contempt', 'disgust'], 'angry')

A votes file is a CSV with a ``file`` column (the image's path relative to the data folder) and one column of
vote counts per class. Columns that are not emotions (``unknown``, ``NF``: not a face) are read but never
become classes. As in FER+'s published recipes, a single vote is dropped as noise; an image's **majority** is
the class holding more than half of the remaining votes, and only images whose majority is an emotion are
used. Its **distribution** is its remaining votes over the emotion classes, normalised: the soft target of
distribution training.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ferlab.core.errors import FerlabError
from ferlab.core.names import canonical

# vote columns that say "no emotion here": an image whose majority is one of these is not used
NOT_EMOTIONS = {"unknown", "nf", "not_face", "not a face", "notface"}


@dataclass
class Votes:
    """A votes file read and checked: per absolute file path, its vote counts (every column) and majority."""

    path: str
    columns: list[str]  # the vote columns as the file spells them
    classes: list[str]  # the emotion columns' canonical names, sorted (the model's classes)
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # file -> votes, in ``columns`` order
    majority: dict[str, str] = field(default_factory=dict)  # file -> majority class (emotion majorities only)

    def distribution(self, file: str, classes: list[str] | None = None) -> np.ndarray:
        """The file's votes over ``classes`` (default: all emotion classes), single votes dropped, summing to 1
        (an image whose majority is one of ``classes`` always has votes left)."""
        classes = self.classes if classes is None else classes
        v = _without_single_votes(self.counts[file])
        out = np.zeros(len(classes))
        for col, n in zip(self.columns, v):
            if canonical(col) in classes:
                out[classes.index(canonical(col))] += n
        return out / out.sum()

    def agreement(self, file: str, cls: str) -> float:
        """The share of the file's annotators (all of their votes) who voted for ``cls``."""
        v = self.counts[file]
        return float(sum(n for col, n in zip(self.columns, v) if canonical(col) == canonical(cls)) / v.sum())


def _is_emotion(column: str) -> bool:
    return column.lower() not in NOT_EMOTIONS


def _without_single_votes(v: np.ndarray) -> np.ndarray:
    return np.where(v > 1, v, 0)


def majority_of(v: np.ndarray, columns: list[str]) -> str | None:
    """FER+'s majority rule: single votes dropped, the top column if it holds more than half of the rest and is
    an emotion (its canonical name); otherwise None."""
    w = _without_single_votes(v)
    top = int(w.argmax())
    if w[top] * 2 > w.sum() and _is_emotion(columns[top]):
        return canonical(columns[top])
    return None


def read_votes(path: str | Path, root: str | Path) -> Votes:
    """Read and check a votes file whose ``file`` column is relative to ``root``; a malformed file is one
    sentence naming the row."""
    path = Path(path).expanduser()
    rows = _rows(path)
    header, body = rows[0], rows[1:]
    columns = _columns(header, path)
    emotions = sorted({canonical(c) for c in columns if _is_emotion(c)})
    votes = Votes(str(path), columns, emotions)
    root = Path(os.path.abspath(Path(root).expanduser()))
    for line, row in enumerate(body, start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise FerlabError(
                f"Row {line} of the votes file {path} has {len(row)} fields; the header has {len(header)}."
            )
        counts = np.array([_count(cell, path, line, col) for cell, col in zip(row[1:], columns)], dtype=np.int64)
        if counts.sum() == 0:
            raise FerlabError(f"Row {line} of the votes file {path} ({row[0]}) has no votes.")
        file = str(root / row[0].strip())
        if file in votes.counts:
            raise FerlabError(f"The votes file {path} lists {row[0]} twice (rows {line} and an earlier one).")
        votes.counts[file] = counts
        label = majority_of(counts, columns)
        if label is not None:
            votes.majority[file] = label
    if not votes.counts:
        raise FerlabError(f"The votes file {path} has a header but no rows of votes.")
    return votes


def _rows(path: Path) -> list[list[str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise FerlabError(f"The votes file {path} does not exist; pass --labels a CSV of per-class votes.") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FerlabError(f"Cannot read the votes file {path} as a CSV ({e.__class__.__name__}).") from None
    if not rows:
        raise FerlabError(f"The votes file {path} is empty; it needs a header: file,<class>,<class>,...")
    return rows


def _columns(header: list[str], path: Path) -> list[str]:
    header = [h.strip() for h in header]
    if not header or header[0] != "file":
        raise FerlabError(
            f"The votes file {path} must start with a 'file' column (the image path relative to the data folder), "
            f"then one column of votes per class; its header is {','.join(header)}."
        )
    columns = header[1:]
    emotions = [canonical(c) for c in columns if _is_emotion(c)]
    if len(set(emotions)) < 2:
        raise FerlabError(
            f"The votes file {path} has {len(set(emotions))} emotion column(s) ({', '.join(columns) or 'none'}); "
            "a classifier needs at least 2."
        )
    if len(set(emotions)) != len(emotions):
        raise FerlabError(f"The votes file {path} names one emotion in two columns ({', '.join(columns)}).")
    return columns


def _count(cell: str, path: Path, line: int, column: str) -> int:
    text = cell.strip()
    if not text.isdigit():
        raise FerlabError(
            f"Row {line} of the votes file {path} has '{cell}' in column {column}; votes must be whole numbers of 0 "
            "or more."
        )
    return int(text)
