"""Atomic writes: a reader never sees half a file, and a killed writer's temporary does not stay behind."""

import os
import subprocess
import sys

import pytest

from ferlab.core.files import atomic


def test_atomic_renames_when_whole_and_removes_its_temporary_on_failure(tmp_path):
    target = tmp_path / "model.ckpt"
    with pytest.raises(RuntimeError), atomic(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".ckpt" and str(os.getpid()) in tmp.name
        tmp.write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"] and target.read_text() == "whole"


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".model.ckpt.{gone.stdout.strip()}-0badc0de.tmp.ckpt"
    orphan.write_text("a gigabyte of training state")
    live = tmp_path / f".model.ckpt.{os.getppid()}-00c0ffee.tmp.ckpt"  # a running process's: left alone
    live.write_text("being written")
    with atomic(tmp_path / "model.ckpt") as tmp:
        tmp.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "model.ckpt"])
