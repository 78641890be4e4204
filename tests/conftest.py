"""Shared fixtures: tiny generated image sets, the real datasets when present, and a CLI runner."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CKPLUS = SHARED / "datasets" / "ckplus48"
WEIGHTS = SHARED / "weights"
ARTIFACTS = ROOT / "test-artifacts"

os.environ.setdefault("FERLAB_CACHE", str(ROOT / "test-artifacts" / "cache"))


def shape_image(cls: int, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """A learnable toy class: a filled circle, square or triangle on a noisy background."""
    bg = tuple(int(v) for v in rng.integers(0, 90, 3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    c = size / 2 + rng.uniform(-4, 4, 2)
    r = size * rng.uniform(0.25, 0.35)
    fg = tuple(int(v) for v in rng.integers(150, 256, 3))
    if cls % 3 == 0:
        d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=fg)
    elif cls % 3 == 1:
        d.rectangle([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=fg)
    else:
        d.polygon([(c[0], c[1] - r), (c[0] - r, c[1] + r), (c[0] + r, c[1] + r)], fill=fg)
    a = np.asarray(im, float) + rng.normal(0, 10, (size, size, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_tree(
    root: Path,
    classes: tuple[str, ...] = ("circle", "square", "triangle"),
    per_class: int = 20,
    groups: int = 0,
    seed: int = 0,
) -> Path:
    """DIR/<class>/<file>.png; with ``groups``, files are named G<k>_... so --group-by '^(G\\d+)_' applies."""
    rng = np.random.default_rng(seed)
    for ci, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            prefix = f"G{n % groups}_" if groups else ""
            shape_image(ci, rng).save(root / cls / f"{prefix}{cls}_{n:03d}.png")
    return root


@pytest.fixture
def tiny_tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "shapes")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "ferlab", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def python_stdout(code: str, timeout: float = 300) -> str:
    """What ``code`` prints, run in a fresh interpreter (which must exit 0)."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI's ``main`` run in this process, its exit status and output captured like :func:`run_cli`'s: the
    same code path without a new interpreter's start (seconds of importing torch), for the many tests of
    mistakes that end before any work."""
    from ferlab.apps.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own refusals
            code = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(["ferlab", *args], code, out.getvalue(), err.getvalue())


requires_ckplus = pytest.mark.skipif(not CKPLUS.is_dir(), reason="../shared/datasets/ckplus48 is not present")
requires_weights = pytest.mark.skipif(
    not (WEIGHTS / "vgg16_imagenet_features.pth").is_file(), reason="../shared/weights is not present"
)


FAST = ["--image-size", "32", "--max-epochs", "3", "--no-progress"]


def train_tiny(data: Path, out: Path, size: int = 32, epochs: int = 1) -> subprocess.CompletedProcess:
    """`ferlab train` of a small regularized-cnn on a generated tree: a real checkpoint in seconds."""
    return cli(
        "train", str(data), "--model", "regularized-cnn", "--image-size", str(size), "--max-epochs", str(epochs),
        "--no-progress", "--out", str(out),
    )  # fmt: skip


def only_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


@pytest.fixture(scope="session")
def study(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    """Two identical seeded runs of the two scratch CNNs, with a separate test folder and new images."""
    base = tmp_path_factory.mktemp("study")
    data = make_tree(base / "shapes", per_class=24)
    test = make_tree(base / "shapes-test", per_class=8, seed=7)
    new = make_tree(base / "new", per_class=2, seed=11)
    runs = []
    for i in range(2):
        out = base / f"out{i}"
        r = run_cli(
            "run",
            str(data),
            "--test-dir",
            str(test),
            "--models",
            "baseline-cnn",
            "regularized-cnn",
            "--predict-dir",
            str(new),
            "--out",
            str(out),
            *FAST,
            "--precision",
            "32",  # identical reruns are about seeds; auto may measure the arithmetic differently run to run
        )
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(only_run(out))
    return data, test, runs


@pytest.fixture(scope="session")
def ck_model(tmp_path_factory) -> Path:
    """vgg-small on CK+48 (6 classes, split by subject), 48 px, 12 epochs: a model trained on face crops, for the
    tests of photos, unusual inputs, explanations and videos."""
    if not CKPLUS.is_dir():
        pytest.skip("../shared/datasets/ckplus48 is not present")
    out = tmp_path_factory.mktemp("ckfaces")
    r = run_cli(
        "train", str(CKPLUS), "--model", "vgg-small", "--drop-classes", "contempt", "--group-by", r"^(S\d+)_",
        "--image-size", "48", "--max-epochs", "12", "--patience", "0", "--schedule", "cosine", "--optimizer",
        "sgd", "--lr", "0.05", "--weight-decay", "5e-4", "--augment", "on", "--no-progress", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return only_run(out)
