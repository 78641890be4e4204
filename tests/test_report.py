"""The report: McNemar arithmetic, every section rendered in headless Chromium, numbers equal to the CSVs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ferlab.core.stats import mcnemar_exact

from .conftest import ARTIFACTS, read_csv

SECTIONS = (  # every h2 of a single study's report, in order
    "Findings",
    "Dataset",
    "Models",
    "Comparison",
    "Per-class results",
    "Misclassified test images",
    "Predictions on new images",
)


def test_mcnemar_exact_known_values():
    assert mcnemar_exact([True] * 5, [False] * 5) == (5, 0, 0.0625)
    a = [True] + [False] * 9 + [True] * 20
    b = [False] + [True] * 9 + [True] * 20
    assert mcnemar_exact(a, b) == (1, 9, 2 * 11 / 1024)
    assert mcnemar_exact([True, False], [True, False]) == (0, 0, 1.0)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(html: Path, png: Path, tmp: Path) -> str:
    """Screenshot the page to ``png`` and return its DOM after the load event, via headless Chromium."""
    flags = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / 'profile'}",
        "--virtual-time-budget=5000",
        "--hide-scrollbars",
    ]
    url = html.resolve().as_uri()
    subprocess.run(
        [*flags, f"--screenshot={png}", "--window-size=1200,5000", url], check=True, capture_output=True, timeout=120
    )
    return subprocess.run([*flags, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120).stdout


@pytest.mark.slow
def test_report_renders_every_section_and_image(study, tmp_path):
    if chromium() is None:
        if os.environ.get("FERLAB_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium package)")
        pytest.skip("chromium is not installed")
    _, _, (run, _) = study
    html = run / "report.html"
    assert html.is_file() and (run / "report.md").is_file()
    ARTIFACTS.mkdir(exist_ok=True)
    dom = render(html, ARTIFACTS / "report.png", tmp_path)
    for section in SECTIONS:
        assert f">{section}</h2>" in dom, section
    images = re.search(r'data-images="(\d+)"', dom)
    decoded = re.search(r'data-decoded="(\d+)"', dom)
    assert images and decoded, "the page's load handler did not run"
    # samples, 2 x curves, 2 x confusion, misclassified galleries, prediction grid
    assert int(images.group(1)) >= 6 and decoded.group(1) == images.group(1)
    assert 'data-overflow="0"' in dom, "the page is wider than a 1200-pixel window"
    assert "http://" not in html.read_text() and "https://" not in html.read_text(), "self-contained: no network"
    from PIL import Image

    shot = np.asarray(Image.open(ARTIFACTS / "report.png").convert("L"), float)
    # the screenshot shows the page, not a blank or an error page: the top holds dark text on white, and
    # the embedded figures below it make many rows far from uniform
    assert (shot[:400] < 100).mean() > 0.005 and (shot.std(1) > 20).mean() > 0.2


def test_a_finished_run_s_report_does_not_call_it_unfinished(study, tmp_path):
    """The run writes its report before it marks itself finished; only a report written from outside the run
    (``ferlab report`` of a running or killed run) says it had not finished."""
    from ferlab.reporting.report import status_note

    _, _, (run, _) = study
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert "had not finished" not in (run / "report.md").read_text()
    (tmp_path / "status.json").write_text(json.dumps({"state": "running", "pid": 1}))
    assert status_note(tmp_path, own=True) is None
    assert status_note(tmp_path) == (
        f"This run had not finished when this report was written (or was killed); ferlab run --resume {tmp_path} "
        "continues it."
    )


def comparison_rows_in_markdown(md: str) -> dict[str, list[str]]:
    section = md.split("## Comparison", 1)[1].split("## ", 1)[0]
    first_table = section.strip().split("\n\n")[0]  # the McNemar table follows after a paragraph
    rows = [ln.strip("|").split("|") for ln in first_table.splitlines() if "---" not in ln]
    return {r[0].strip(): [c.strip() for c in r] for r in rows[1:]}


def assert_report_matches_csvs(run: Path) -> None:
    md = (run / "report.md").read_text()
    rows = comparison_rows_in_markdown(md)
    for r in read_csv(run / "test_accuracy_comparison.csv"):
        got = rows[r["model"]]
        assert got[1] == f"{int(r['parameters']):,}" and got[2] == r["epochs_run"] and got[3] == r["best_epoch"]
        assert got[4:8] == [r["train_acc"], r["train_acc_eval"], r["val_acc"], r["test_acc"]]
        assert got[8] == f"{r['test_ci95_low']}-{r['test_ci95_high']}" and got[9] == r["n_test"]
        # the gap the report states is the fair one: eval-mode accuracy on the training split minus validation
        assert f"overfitting gap of {100 * (float(r['train_acc_eval']) - float(r['val_acc'])):.1f} points" in md


@pytest.mark.slow
def test_report_numbers_match_the_run_csvs(study):
    _, _, (run, _) = study
    assert_report_matches_csvs(run)
    assert "## Predictions on new images" in (run / "report.md").read_text()
    assert (run / "predictions" / "prediction_grid.png").is_file()
