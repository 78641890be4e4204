"""Cross-validation: folds by group and class, statistics checked by hand, a tiny --folds 3 run through the CLI."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import pytest

from ferlab.core.config import DataConfig
from ferlab.core.errors import FerlabError
from ferlab.core.stats import holm, mcnemar_exact, mean_interval
from ferlab.data.datasets import assign_folds, load_data
from ferlab.reporting.crossval import verdict

from .conftest import cli, make_tree, only_run, read_csv, run_cli


def test_every_group_is_in_exactly_one_test_fold_and_classes_are_balanced():
    rng = np.random.default_rng(0)
    labels, groups = [], []
    for g in range(40):  # 40 subjects, each with 1-3 classes and 2-6 images per class
        for c in rng.choice(4, rng.integers(1, 4), replace=False):
            for _ in range(rng.integers(2, 7)):
                labels.append(int(c))
                groups.append(f"S{g}")
    labels = np.array(labels)
    fold = assign_folds(labels, groups, 5, 4, ["a", "b", "c", "d"], seed=0)
    by_group = defaultdict(set)
    for g, f in zip(groups, fold):
        by_group[g].add(int(f))
    assert all(len(f) == 1 for f in by_group.values()) and set(fold) == set(range(5))
    for c in range(4):  # each class's groups spread over the folds within one group of each other
        per_fold = Counter(next(iter(by_group[g])) for g in {g for g, y in zip(groups, labels) if y == c})
        counts = [per_fold.get(k, 0) for k in range(5)]
        assert max(counts) - min(counts) <= 1, (c, counts)


def test_validation_is_carved_by_group_from_the_training_folds(tmp_path):
    data = make_tree(tmp_path / "d", per_class=20, groups=10)
    seen = defaultdict(set)
    for k in range(3):
        d = load_data(DataConfig(data=str(data), image_size=16, group_by=r"^(G\d+)_"), seed=0, fold=(k, 3))
        where = {r.group: r.split for r in d.manifest}
        for r in d.manifest:
            assert where[r.group] == r.split  # no group in both a fold's train and val (or test)
            if r.split == "test":
                seen[r.group].add(k)
        assert {r.split for r in d.manifest} == {"train", "val", "test"}
    assert sorted(seen) == [f"G{i}" for i in range(10)] and all(len(v) == 1 for v in seen.values())


def test_impossible_folds_are_one_sentence():
    labels = np.array([0, 0, 1, 1, 1, 1])
    with pytest.raises(FerlabError, match="--folds 5 needs at least 5 groups; the data has 4"):
        assign_folds(labels, ["a", "b", "c", "d", "c", "d"], 5, 2, ["x", "y"], 0)
    with pytest.raises(FerlabError, match="Class 'x' has images from only 2 groups, fewer than --folds 3"):
        assign_folds(labels, ["a", "b", "c", "d", "e", "f"], 3, 2, ["x", "y"], 0)


def test_pooled_mcnemar_and_holm_against_hand_computed_values():
    # A right & B wrong on 7 images, the reverse on 1: two-sided exact p = 2 * (1 + 8) / 2**8
    a = [True] * 7 + [False] + [True] * 20
    b = [False] * 7 + [True] + [True] * 20
    assert mcnemar_exact(a, b) == (7, 1, 2 * 9 / 256)
    # Holm for p = 0.01, 0.04, 0.03: sorted 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.06, 0.04*1) = 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.2, 0.001]) == pytest.approx([0.2, 0.002])
    mean, sd, lo, hi = mean_interval([0.8, 0.9, 0.85, 0.95, 0.75])
    # t(0.975, 4) = 2.7764: 0.85 +- 2.7764 * 0.0791 / sqrt(5)
    assert (mean, round(sd, 4)) == (pytest.approx(0.85), 0.0791) and hi - mean == pytest.approx(0.0982, abs=1e-4)


@pytest.mark.slow
def test_folds_3_through_the_cli_and_identical_summaries_with_one_seed(tmp_path):
    data = make_tree(tmp_path / "d", per_class=18, groups=9)
    args = [
        "run", str(data), "--group-by", r"^(G\d+)_", "--folds", "3", "--seeds", "0", "1",
        "--models", "regularized-cnn", "vgg-small", "--image-size", "24", "--max-epochs", "2", "--no-progress",
        "--precision", "32",  # identical reruns are about seeds; auto may measure the arithmetic differently
    ]  # fmt: skip
    runs = []
    for name in ("a", "b"):
        r = run_cli(*args, "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(only_run(tmp_path / name))
    a, b = runs
    assert (a / "cv_summary.csv").read_text() == (b / "cv_summary.csv").read_text()
    assert (a / "cv_pairs.csv").read_text() == (b / "cv_pairs.csv").read_text()
    summary = {r["model"]: r for r in read_csv(a / "cv_summary.csv")}
    assert set(summary) == {"regularized-cnn", "vgg-small"}
    assert summary["vgg-small"]["folds"] == "3" and summary["vgg-small"]["seeds"] == "2"
    assert int(summary["vgg-small"]["pooled_n"]) == 54  # every image predicted once, out of fold
    for k in (1, 2, 3):
        for s in (0, 1):
            assert (a / f"fold-{k}" / f"seed-{s}" / "test_accuracy_comparison.csv").is_file()
    pair = read_csv(a / "cv_pairs.csv")[0]
    assert len(pair["fold_differences"].split()) == 3
    assert any(w in pair["verdict"] for w in ("not distinguishable on 9 test subjects", " better ", " worse "))
    html = (a / "report.html").read_text()
    assert "Cross-validation" in html and "cv-folds.png" not in html  # figures are embedded
    cv = json.loads((a / "cv.json").read_text())
    assert cv["groups"] == 9 and len(cv["per_fold"]["vgg-small"]) == 3
    # a finished fold is never recomputed: resuming a finished run is refused, and a run that lost its last
    # fold computes only that one, to the same summary
    r = cli("run", "--resume", str(a))
    assert r.returncode == 2 and "finished already" in r.stderr
    import shutil

    shutil.rmtree(a / "fold-3")
    (a / "status.json").write_text('{"state": "incomplete", "reason": "killed"}')
    r = run_cli("run", "--resume", str(a))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("finished in an earlier run; not computed again") == 4  # folds 1-2, two seeds each
    assert (a / "cv_summary.csv").read_text() == (b / "cv_summary.csv").read_text()


def test_the_verdict_needs_the_pooled_test_and_the_per_fold_interval_to_agree():
    row = {"model_a": "A", "model_b": "B", "a_right_b_wrong": 30, "a_wrong_b_right": 10, "holm_p": 0.002}
    agree = verdict({**row, "diff_ci95_low": 0.01, "diff_ci95_high": 0.09}, 9, "test subjects")
    assert agree == "A is better than B (Holm-corrected p = 0.002; per-fold difference +0.010 to +0.090)"
    folds_disagree = verdict({**row, "diff_ci95_low": -0.04, "diff_ci95_high": 0.09}, 9, "test subjects")
    assert folds_disagree.startswith("A and B are not distinguishable on 9 test subjects")
    assert "the per-fold interval includes 0" in folds_disagree
    worse = {**row, "a_right_b_wrong": 10, "a_wrong_b_right": 30, "diff_ci95_low": -0.09, "diff_ci95_high": -0.01}
    assert verdict(worse, 9, "test subjects").startswith("A is worse than B")
    weak = verdict({**row, "holm_p": 0.2, "diff_ci95_low": 0.01, "diff_ci95_high": 0.09}, 9, "test subjects")
    assert weak == "A and B are not distinguishable on 9 test subjects (Holm-corrected p = 0.2)"


@pytest.mark.slow
def test_learning_curve_subsets_are_nested_and_never_touch_the_test_fold(tmp_path):
    data = make_tree(tmp_path / "d", per_class=18, groups=18)
    args = [
        "run", str(data), "--group-by", r"^(G\d+)_", "--folds", "2", "--per-class", "2", "5", "--split", "0.7", "0.2",
        "0.1", "--models", "vgg-small", "--image-size", "16", "--max-epochs", "1", "--no-progress",
        "--out", str(tmp_path / "o"),
    ]  # fmt: skip
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    run = only_run(tmp_path / "o")
    for fold in (1, 2):
        splits = {}
        for where in ("", "per-class-2/", "per-class-5/"):
            rows = read_csv(run / f"{where}fold-{fold}" / "manifest.csv")
            splits[where] = {s: {x["file"] for x in rows if x["split"] == s} for s in ("train", "val", "test")}
        full, two, five = splits[""], splits["per-class-2/"], splits["per-class-5/"]
        assert two["test"] == five["test"] == full["test"] and two["val"] == five["val"] == full["val"]
        assert two["train"] < five["train"] < full["train"]  # nested
        assert len(two["train"]) == 3 * 2 and len(five["train"]) == 3 * 5
    curve = read_csv(run / "learning_curve.csv")
    assert [(c["model"], c["per_class"]) for c in curve] == [
        ("vgg-small", "2"),
        ("vgg-small", "5"),
        ("vgg-small", "all"),
    ]
    assert [c["train_images_per_class"] for c in curve][:2] == ["2.0", "5.0"]
    assert all(int(c["pooled_n"]) == 54 for c in curve)  # every image predicted once at every N
    assert "How much data: the learning curve" in (run / "report.md").read_text()
    assert (run / "report_files" / "learning-curve.png").is_file()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--per-class", "5"], "--per-class 5 draws a learning curve over folds; add --folds K."),
        (["--folds", "2", "--per-class", "0"], "--per-class takes image counts of 1 or more, got 0."),
        (["--folds", "2", "--per-class", "5", "5"], "--per-class names a count twice: 5 5."),
    ],
)
def test_learning_curve_settings_are_checked(tmp_path, flags, message):
    r = cli("run", make_tree(tmp_path / "d", per_class=4), "--models", "vgg-small", *flags)
    assert r.returncode == 2 and message in r.stderr
