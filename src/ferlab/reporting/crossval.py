"""Cross-validation summaries: which model is better, decided by every test subject rather than one split.

    ferlab run ../shared/datasets/ckplus48 --drop-classes contempt --group-by '^(S\\d+)_' --folds 5 --seeds 0 1

Reads the finished folds (and seeds) of a run folder and writes, beside them:

* ``cv_summary.csv``: per model, the mean validation accuracy of the chosen epochs (what a recipe is chosen
  by), and test accuracy over folds (each fold's value the mean over its seeds): mean,
  standard deviation across folds, 95% t-interval for the mean, the mean within-fold standard deviation across
  seeds (seed variance, shown apart from split variance), and the pooled out-of-fold accuracy of the first seed
  (every image predicted once, by the model that never saw it) with its Wilson interval on all N images;
* ``cv_pairs.csv``: per pair of models, the per-fold differences with their mean and t-interval, an exact
  McNemar test on the pooled out-of-fold predictions, Holm-corrected across the pairs, and a verdict. The
  pooled test counts images; where a subject has several (CK+48: about 8), they are not independent and its
  p-value is optimistic, so the verdict also needs the per-fold interval to agree before it says "better";
* ``report_files/`` plots and the run's ``report.html``/``report.md`` with the cross-validation section.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ferlab.core.config import StudyConfig
from ferlab.core.files import read_csv, write_csv
from ferlab.core.stats import mcnemar_holm, mean_interval, wilson
from ferlab.reporting.report import build_cv_report

ALPHA = 0.05
SUMMARY_COLUMNS = [
    "model",
    "folds",
    "seeds",
    "mean_val_acc",
    "mean_test_acc",
    "sd_across_folds",
    "ci95_low",
    "ci95_high",
    "mean_sd_across_seeds",
    "pooled_acc",
    "pooled_ci95_low",
    "pooled_ci95_high",
    "pooled_n",
]
PAIR_COLUMNS = [
    "model_a",
    "model_b",
    "fold_differences",
    "mean_difference",
    "diff_ci95_low",
    "diff_ci95_high",
    "a_right_b_wrong",
    "a_wrong_b_right",
    "mcnemar_p",
    "holm_p",
    "verdict",
]


def collect(results: dict[tuple[int | None, int], Path]) -> dict:
    """Per model: test accuracy per (fold, seed) and the first seed's out-of-fold predictions."""
    seeds = sorted({s for _, s in results})
    acc: dict[str, dict[tuple, float]] = {}
    val: dict[str, list[float]] = {}
    oof: dict[str, dict[str, tuple[str, str]]] = {}
    groups: set[str] = set()
    for (fold, seed), where in sorted(results.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        for row in read_csv(where / "test_accuracy_comparison.csv"):
            acc.setdefault(row["model"], {})[(fold, seed)] = float(row["test_acc"])
            val.setdefault(row["model"], []).append(float(row["val_acc"]))
            if seed == seeds[0]:
                for p in read_csv(where / row["model"] / "predictions.csv"):
                    oof.setdefault(row["model"], {})[p["file"]] = (p["true"], p["predicted"])
        if seed == seeds[0]:
            groups |= {r["group"] for r in read_csv(where / "manifest.csv") if r["split"] == "test"}
    return {"acc": acc, "val": val, "oof": oof, "seeds": seeds, "groups": len(groups)}


def per_fold(acc: dict[tuple, float]) -> tuple[dict[int, float], float]:
    """Each fold's accuracy averaged over seeds (by fold), and the mean within-fold standard deviation across
    seeds."""
    folds = sorted({-1 if f is None else f for f, _ in acc})
    means, sds = {}, []
    for f in folds:
        vals = [v for (ff, _), v in acc.items() if (-1 if ff is None else ff) == f]
        means[f] = float(np.mean(vals))
        sds.append(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0)
    return means, float(np.mean(sds))


CURVE_COLUMNS = [
    "model",
    "per_class",
    "train_images_per_class",
    "mean_test_acc",
    "pooled_acc",
    "pooled_ci95_low",
    "pooled_ci95_high",
    "pooled_n",
]


def learning_curve(run_dir: Path, studies: dict[str, dict[tuple[int | None, int], Path]]) -> None:
    """``learning_curve.csv``: per model and training-set size (at most N images per class, or ``all``), the
    pooled out-of-fold accuracy (first seed) with its Wilson interval, and the mean test accuracy over folds."""
    rows = []
    for n, results in studies.items():
        got = collect(results)
        counts = [json.loads((w / "dataset.json").read_text())["counts"]["train"] for w in results.values()]
        per_class = float(np.mean([np.mean(list(c.values())) for c in counts]))
        for m in got["acc"]:
            pairs = got["oof"].get(m, {})
            right = sum(t == p for t, p in pairs.values())
            lo, hi = wilson(right, len(pairs))
            rows.append(
                {
                    "model": m,
                    "per_class": n,
                    "train_images_per_class": round(per_class, 1),
                    "mean_test_acc": round(float(np.mean(list(per_fold(got["acc"][m])[0].values()))), 4),
                    "pooled_acc": round(right / max(1, len(pairs)), 4),
                    "pooled_ci95_low": round(lo, 4),
                    "pooled_ci95_high": round(hi, 4),
                    "pooled_n": len(pairs),
                }
            )
    write_csv(run_dir / "learning_curve.csv", rows, CURVE_COLUMNS)


def summarize_runs(
    run_dir: Path,
    cfg: StudyConfig,
    results: dict[tuple[int | None, int], Path],
    curve: dict[int, dict[tuple[int | None, int], Path]] | None = None,
) -> None:
    """The cross-validation's summary, pairs and report; with ``curve`` (per N, the studies with at most N
    training images per class) the learning curve too."""
    if curve:
        learning_curve(run_dir, {**{str(n): r for n, r in sorted(curve.items())}, "all": results})
    got = collect(results)
    models = list(got["acc"])
    summary = []
    folds_of = {}
    for m in models:
        means, seed_sd = per_fold(got["acc"][m])
        folds_of[m] = means
        mean, sd, lo, hi = mean_interval(list(means.values()))
        pairs = got["oof"].get(m, {})
        right = sum(t == p for t, p in pairs.values())
        plo, phi = wilson(right, len(pairs))
        summary.append(
            {
                "model": m,
                "folds": len(means),
                "seeds": len(got["seeds"]),
                "mean_val_acc": round(float(np.mean(got["val"][m])), 4),  # what picks a recipe: never test
                "mean_test_acc": round(mean, 4),
                "sd_across_folds": round(sd, 4),
                "ci95_low": round(lo, 4) if lo == lo else "",
                "ci95_high": round(hi, 4) if hi == hi else "",
                "mean_sd_across_seeds": round(seed_sd, 4),
                "pooled_acc": round(right / max(1, len(pairs)), 4),
                "pooled_ci95_low": round(plo, 4),
                "pooled_ci95_high": round(phi, 4),
                "pooled_n": len(pairs),
            }
        )
    write_csv(run_dir / "cv_summary.csv", summary, SUMMARY_COLUMNS)
    oof = {m: {item: truth == predicted for item, (truth, predicted) in got["oof"].get(m, {}).items()} for m in models}
    rows = []
    for pair in mcnemar_holm(oof):
        a, b = pair["model_a"], pair["model_b"]
        shared_folds = sorted(set(folds_of[a]) & set(folds_of[b]))  # paired by fold, not by position
        diffs = [folds_of[a][f] - folds_of[b][f] for f in shared_folds]
        mean, _, lo, hi = mean_interval(diffs)
        row = {
            "model_a": a,
            "model_b": b,
            "fold_differences": " ".join(f"{d:+.3f}" for d in diffs),
            "mean_difference": round(mean, 4),
            "diff_ci95_low": round(lo, 4) if lo == lo else "",
            "diff_ci95_high": round(hi, 4) if hi == hi else "",
            "a_right_b_wrong": pair["a_right_b_wrong"],
            "a_wrong_b_right": pair["a_wrong_b_right"],
            "mcnemar_p": float(f"{pair['mcnemar_p']:.3g}"),  # 3 significant digits: a tiny p is not 0
            "holm_p": float(f"{pair['holm_p']:.3g}"),
        }
        row["verdict"] = verdict(row, got["groups"], "test subjects" if cfg.data.group_by else "test images")
        rows.append(row)
    write_csv(run_dir / "cv_pairs.csv", rows, PAIR_COLUMNS)
    (run_dir / "cv.json").write_text(
        json.dumps(
            {
                "groups": got["groups"],
                "images": len(next(iter(got["oof"].values()), {})),
                "folds": cfg.folds,
                "seeds": got["seeds"],
                "per_fold": {m: list(v.values()) for m, v in folds_of.items()},
            },
            indent=1,
        )
    )

    build_cv_report(run_dir, own=True)  # the run writes its report as it ends


def verdict(row: dict, groups: int, unit: str) -> str:
    """Plain language for one pair: better or worse only when the Holm-corrected McNemar test and the per-fold
    interval of the differences agree; otherwise not distinguishable."""
    a, b = row["model_a"], row["model_b"]
    better = row["a_right_b_wrong"] > row["a_wrong_b_right"]
    lo, hi = row["diff_ci95_low"], row["diff_ci95_high"]
    folds_agree = lo != "" and (lo > 0 if better else hi < 0)
    if row["holm_p"] < ALPHA and folds_agree:
        return (
            f"{a} is {'better' if better else 'worse'} than {b} (Holm-corrected p = {row['holm_p']:.3g}; "
            f"per-fold difference {lo:+.3f} to {hi:+.3f})"
        )
    why = "" if row["holm_p"] >= ALPHA else "; the pooled test differs but the per-fold interval includes 0"
    return f"{a} and {b} are not distinguishable on {groups} {unit} (Holm-corrected p = {row['holm_p']:.3g}{why})"
