"""Files in and out: atomic writes (a reader never sees half a file), one CSV reader, fresh output folders.

>>> write_csv(Path("out.csv"), [{"a": 1}], ["a"])          # doctest: +SKIP
>>> read_csv(Path("out.csv"))                               # doctest: +SKIP
[{'a': '1'}]
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from ferlab.core.errors import FerlabError

# names datasets use for one emotion -> the name most datasets use (evaluate's class maps, --labels files)
SYNONYMS = {
    "anger": "angry",
    "angry": "angry",
    "mad": "angry",
    "disgusted": "disgust",
    "disgust": "disgust",
    "fear": "fear",
    "fearful": "fear",
    "afraid": "fear",
    "scared": "fear",
    "happy": "happy",
    "happiness": "happy",
    "joy": "happy",
    "neutral": "neutral",
    "calm": "neutral",
    "sad": "sad",
    "sadness": "sad",
    "surprise": "surprise",
    "surprised": "surprise",
    "contempt": "contempt",
}

CREATED: list[Path] = []  # folders this process made, so a failed command can remove them while still empty


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename; a failure is one sentence and leaves no partial file."""
    if path.is_dir():
        raise FerlabError(f"{path} is a folder; name a file to write.")
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FerlabError(f"Cannot write {path} ({e.strerror}).") from None


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def unique_dir(parent: Path, name: str) -> Path:
    """Make ``parent/<timestamp>-<name>`` (``-2``, ``-3``... when taken) atomically: two commands started in the
    same second never share a folder."""
    base = parent / f"{datetime.now():%Y%m%d-%H%M%S}-{name}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            CREATED.append(path)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        except OSError as e:
            raise FerlabError(f"Cannot create the folder {path} ({e.strerror}); choose another --out.") from None


def remove_empty_created() -> None:
    """Remove the folders :func:`unique_dir` made in this process that are still empty (a command that failed)."""
    for path in reversed(CREATED):
        with contextlib.suppress(OSError):  # rmdir only removes an empty folder: nothing written is lost
            path.rmdir()


def plural(n: int, noun: str) -> str:
    """'1 input', '2 inputs': counts in messages."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
