"""Real data: the study's CNNs on CK+48 (6 classes, split by subject), its report and its predictions.

Thresholds were measured on these settings (2-core CPU, seed 0) and asserted with margin; the measured
values are beside each threshold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from .conftest import CKPLUS, SHARED, WEIGHTS, only_run, read_csv, requires_ckplus, requires_weights, run_cli
from .test_report import assert_report_matches_csvs

pytestmark = [requires_ckplus, pytest.mark.realdata, pytest.mark.slow]

CK_ARGS = ["--drop-classes", "contempt", "--group-by", r"^(S\d+)_", "--no-progress"]
# the study's two CNNs at the images' own 48 px, at most 10 epochs (at 100 px and 15 epochs the fixture took
# 7 of the suite's minutes); measured 2026-12-06 on a 2-core AMD EPYC (test n=90): baseline-cnn 0.911,
# regularized-cnn 0.900
MIN_TEST_ACC = {"baseline-cnn": 0.80, "regularized-cnn": 0.78}
# the default recipe (stage 2 fine-tuning conv5_3 on the cached output of the layers before it) with the
# backbone at 112 px and at most 10 epochs a stage, for the suite's time (224 px took 15 of its minutes):
# measured 0.724 on the reference split (n=105; one standard error about 0.044) on a 2-core AMD EPYC in fp32,
# 2026-12-06 (0.829 at 224 px and 100 epochs on an Intel Xeon, 2026-11-26)
VGG_MIN_TEST_ACC = 0.62


@pytest.fixture(scope="session")
def ck_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck")
    r = run_cli(
        "run",
        str(CKPLUS),
        *CK_ARGS,
        "--models",
        "baseline-cnn",
        "regularized-cnn",
        "--image-size",
        "48",
        "--max-epochs",
        "10",
        "--out",
        str(out),
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return only_run(out)


def test_split_is_by_subject_and_stratified(ck_run):
    manifest = read_csv(ck_run / "manifest.csv")
    assert len(manifest) == 927 and {r["class"] for r in manifest} == {
        "anger",
        "disgust",
        "fear",
        "happy",
        "sadness",
        "surprise",
    }
    splits_of = defaultdict(set)
    for r in manifest:
        assert r["group"] == Path(r["file"]).name.split("_")[0]
        splits_of[r["group"]].add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values()), "a subject crosses splits"
    sizes = {s: sum(r["split"] == s for r in manifest) for s in ("train", "val", "test")}
    assert 700 <= sizes["train"] <= 770 and 70 <= sizes["val"] <= 110 and 70 <= sizes["test"] <= 110


def test_both_cnns_learn_ckplus(ck_run):
    rows = {r["model"]: r for r in read_csv(ck_run / "test_accuracy_comparison.csv")}
    for model, floor in MIN_TEST_ACC.items():
        assert float(rows[model]["test_acc"]) >= floor, (model, rows[model])
        assert float(rows[model]["test_ci95_low"]) > 1 / 6, "well above the 1/6 chance level"


def test_report_on_ckplus_matches_its_csvs(ck_run):
    assert_report_matches_csvs(ck_run)
    md = (ck_run / "report.md").read_text()
    assert "118" not in md.split("## Dataset")[0]  # findings speak of this run's numbers, not canned ones
    assert "grouped by '^(S\\d+)_'" in md


def test_predicting_the_test_split_reproduces_the_run(ck_run, tmp_path):
    test_files = [r["file"] for r in read_csv(ck_run / "manifest.csv") if r["split"] == "test"]
    model = "regularized-cnn"
    r = run_cli("predict", "--checkpoint", str(ck_run / model / "model.ckpt"), *test_files, "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_csv(tmp_path / "prediction_results.csv")
    assert len(rows) == len(test_files)
    acc = sum(row[f"{model}_predicted"] == row["correct_class"] for row in rows) / len(rows)
    assert acc == json.loads((ck_run / model / "metrics.json").read_text())["accuracy"]


@pytest.fixture(scope="session")
def reference_split(tmp_path_factory) -> Path:
    """The reference CK+48 6-class subject split (735/87/105) that the README's numbers are quoted on."""
    dst = tmp_path_factory.mktemp("ckref") / "split"
    subprocess.run(
        [sys.executable, str(SHARED / "peers" / "make_split.py"), str(CKPLUS), str(dst), "--seed", "0"],
        check=True,
        capture_output=True,
    )
    return dst


@requires_weights
def test_vgg16_transfer_with_shared_weights_on_the_reference_split(reference_split, tmp_path):
    r = run_cli(
        "train",
        str(reference_split),
        "--model",
        "vgg16-transfer",
        "--backbone-size",
        "112",
        "--max-epochs",
        "10",
        "--no-progress",
        "--out",
        str(tmp_path),
        "--weights",
        str(WEIGHTS / "vgg16_imagenet_features.pth"),
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run = only_run(tmp_path)
    (row,) = read_csv(run / "test_accuracy_comparison.csv")
    assert row["n_test"] == "105" and row["parameters"] == "15246150"
    assert float(row["test_acc"]) >= VGG_MIN_TEST_ACC, row
    epochs = read_csv(run / "vgg16-transfer" / "epochs.csv")
    assert {e["stage"] for e in epochs} == {"1", "2"}
    assert len(read_csv(run / "fine_tuned_accuracy.csv")) == len(epochs)
