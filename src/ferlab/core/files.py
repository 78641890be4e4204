"""Files in and out: atomic writes (a reader never sees half a file), one CSV reader, fresh output folders.

>>> write_csv(Path("out.csv"), [{"a": 1}], ["a"])          # doctest: +SKIP
>>> read_csv(Path("out.csv"))                               # doctest: +SKIP
[{'a': '1'}]
"""

from __future__ import annotations

import contextlib
import csv
import os
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path

from ferlab.core.errors import FerlabError

CREATED: list[Path] = []  # folders this process made, so a failed command can remove them while still empty


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends, removed when it
    fails. A reader never sees half a file, and two processes writing one file never share a temporary name
    (it holds the process id and a random part). The suffix is kept, so writers that infer the format from it
    (Pillow, matplotlib) still do.

        >>> with atomic(Path("model.ckpt")) as tmp:       # doctest: +SKIP
        ...     torch.save(payload, tmp)
    """
    _remove_orphans(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_orphans(path: Path) -> None:
    """Temporaries of ``path`` that a killed process left (its pid is gone): a training state is a gigabyte."""
    for old in path.parent.glob(f".{path.name}.*-*.tmp{path.suffix}"):
        pid = old.name[len(path.name) + 2 :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            old.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        return True
    return True


def write_bytes(path: Path, data: bytes) -> None:
    """Write atomically; a failure is one sentence and leaves no partial file."""
    if path.is_dir():
        raise FerlabError(f"{path} is a folder; name a file to write.")
    try:
        with atomic(path) as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        raise FerlabError(f"Cannot write {path} ({e.strerror}).") from None


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


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
