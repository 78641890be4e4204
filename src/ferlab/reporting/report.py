"""The study report, built from a run folder alone: report.html (self-contained) and report.md.

    ferlab report runs/20261126-120000-ckplus48

Every number is read from the run's own files (CSV, JSON, YAML), so the report can be rebuilt at any time
and always agrees with them. "Model X is better" is only written when a McNemar exact test on the shared
test images supports it.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from ferlab.core.errors import FerlabError  # noqa: E402
from ferlab.core.errors import FerlabError as _Error
from ferlab.core.files import atomic, read_csv, save_figure  # noqa: E402
from ferlab.core.stats import mcnemar_holm  # noqa: E402
from ferlab.data.images import BadImage, Preprocess, decode  # noqa: E402
from ferlab.inference.explain import heatmaps, overlay
from ferlab.inference.model import load_model
from ferlab.reporting.metrics import plot_confusion

ALPHA = 0.05
PRECISION = {"32": "fp32", "bf16-mixed": "bf16 mixed precision", "16-mixed": "fp16 mixed precision"}


# ------------------------------------------------------------------------------------------ document blocks


@dataclass
class Block:
    kind: str  # h2, h3, p, ul, table, img, pre
    data: object


class Doc:
    def __init__(self, files: Path):
        self.blocks: list[Block] = []
        self.files = files  # the PNGs that report.md links to

    def h2(self, t: str) -> None:
        self.blocks.append(Block("h2", t))

    def h3(self, t: str) -> None:
        self.blocks.append(Block("h3", t))

    def p(self, t: str) -> None:
        self.blocks.append(Block("p", t))

    def ul(self, items: list[str]) -> None:
        self.blocks.append(Block("ul", items))

    def pre(self, t: str) -> None:
        self.blocks.append(Block("pre", t))

    def table(self, header: list[str], rows: list[list[object]]) -> None:
        self.blocks.append(Block("table", (header, rows)))

    def img(self, path: Path, alt: str) -> None:
        self.blocks.append(Block("img", (path, alt)))

    def html(self, title: str) -> str:
        out = [
            f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        ]
        for b in self.blocks:
            if b.kind in ("h2", "h3", "p"):
                ident = f" id='{b.data.lower().replace(' ', '-')}'" if b.kind == "h2" else ""
                out.append(f"<{b.kind}{ident}>{html.escape(b.data)}</{b.kind}>")
            elif b.kind == "ul":
                out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.data) + "</ul>")
            elif b.kind == "pre":
                out.append(f"<pre>{html.escape(b.data)}</pre>")
            elif b.kind == "table":
                header, rows = b.data
                out.append(  # in its own scroll box: a wide table never widens the page
                    "<div class='table'><table><tr>"
                    + "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
                    + "</tr>"
                    + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
                    + "</table></div>"
                )
            elif b.kind == "img":
                path, alt = b.data
                data = base64.b64encode(path.read_bytes()).decode()
                out.append(
                    f"<figure><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"
                    f"<figcaption>{html.escape(alt)}</figcaption></figure>"
                )
        out.append(IMAGE_CHECK + "</body></html>")
        return "\n".join(out)

    def markdown(self, title: str, base: Path) -> str:
        out = [f"# {title}", ""]
        for b in self.blocks:
            if b.kind == "h2":
                out += [f"## {b.data}", ""]
            elif b.kind == "h3":
                out += [f"### {b.data}", ""]
            elif b.kind == "p":
                out += [b.data, ""]
            elif b.kind == "ul":
                out += [f"- {i}" for i in b.data] + [""]
            elif b.kind == "pre":
                out += ["```", b.data, "```", ""]
            elif b.kind == "table":
                header, rows = b.data
                out += ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
                out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows] + [""]
            elif b.kind == "img":
                path, alt = b.data
                out += [f"![{alt}]({path.relative_to(base).as_posix()})", ""]
        return "\n".join(out)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{border-bottom:2px solid #444}h2{margin-top:2em;
border-bottom:1px solid #ccc}table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f2f2f2}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.8em}img{max-width:100%}div.table{overflow-x:auto}
figure{margin:1em 0}figcaption{font-size:.85em;color:#555}"""

# marks the page once loaded: how many embedded images decoded, and by how many pixels the page is wider
# than the window (the report test reads these attributes)
IMAGE_CHECK = """<script>window.addEventListener('load',()=>{const imgs=[...document.images];
document.body.dataset.images=imgs.length;document.body.dataset.decoded=
imgs.filter(i=>i.complete&&i.naturalWidth>0).length;const d=document.documentElement;
document.body.dataset.overflow=Math.max(0,d.scrollWidth-d.clientWidth);});</script>"""


# --------------------------------------------------------------------------------------------------- plots


def plot_curves(epochs: list[dict], best_epoch: int, title: str, path: Path) -> None:
    ep = [int(e["epoch"]) for e in epochs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "acc", "accuracy"), (axes[1], "loss", "cross-entropy loss")):
        ax.plot(ep, [float(e[f"train_{key}"]) for e in epochs], label=f"train {label}", marker=".")
        ax.plot(ep, [float(e[f"val_{key}"]) for e in epochs], label=f"validation {label}", marker=".")
        ax.axvline(best_epoch, color="gray", linestyle="--", label=f"chosen epoch {best_epoch}")
        stage2 = [int(e["epoch"]) for e in epochs if e.get("stage") == "2"]
        if stage2:
            ax.axvspan(stage2[0] - 0.5, stage2[-1] + 0.5, color="orange", alpha=0.1, label="fine-tuning stage")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=12)


def thumbnails(
    items: list[tuple[str, list[tuple[str, tuple[int, int, int]]]]],
    pre: Preprocess,
    path: Path,
    cols: int = 8,
    side: int = 96,
) -> None:
    """A sheet of decoded images (as the model saw them), each with coloured caption lines."""
    n_lines = max(len(lines) for _, lines in items)
    cell_h = side + 6 + 15 * n_lines
    rows = math.ceil(len(items) / cols)
    sheet = Image.new("RGB", (cols * (side + 10), rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (file, lines) in enumerate(items):
        x, y = (k % cols) * (side + 10) + 5, (k // cols) * cell_h + 3
        try:
            im = Image.fromarray(decode(file, pre)[0].image).resize((side, side))
            sheet.paste(im, (x, y))
        except (BadImage, OSError):
            draw.rectangle([x, y, x + side, y + side], outline=(200, 0, 0))
        for i, (text, colour) in enumerate(lines):
            draw.text((x, y + side + 3 + 15 * i), text, fill=colour, font=_font())
    with atomic(path) as tmp:
        sheet.save(tmp)


def wrong_heatmaps(checkpoint: Path, wrong: list[dict], path: Path, side: int = 96) -> bool:
    """Rows of (image as the model saw it, Grad-CAM for the predicted class, for the true class); False when the
    model cannot be loaded or explained (the gallery above still stands)."""
    if not wrong or not checkpoint.is_file():
        return False

    try:
        model = load_model(checkpoint, cache=False)  # a run of many folds must not keep every model
        crops, keep = [], []
        for r in wrong:
            try:
                crops.append(decode(r["file"], model.pre)[0].image)
                keep.append(r)
            except (BadImage, OSError):
                continue
        if not crops:
            return False
        idx = model.classes.index
        pred = heatmaps(model, crops, [idx(r["predicted"]) for r in keep])
        true = heatmaps(model, crops, [idx(r["true"]) for r in keep])
    except (_Error, KeyError, ValueError, RuntimeError):
        return False
    cols = 2  # two triples per row
    cell_w, cell_h = 3 * side + 16, side + 22
    sheet = Image.new("RGB", (cols * cell_w, math.ceil(len(keep) / cols) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (r, crop, hp, ht) in enumerate(zip(keep, crops, pred, true)):
        x, y = (k % cols) * cell_w + 4, (k // cols) * cell_h + 2
        for j, im in enumerate((crop, overlay(crop, hp), overlay(crop, ht))):
            sheet.paste(Image.fromarray(im).resize((side, side)), (x + j * side, y))
        draw.text((x, y + side + 3), f"pred {r['predicted']} | true {r['true']}"[:40], fill=(200, 0, 0), font=_font())
    with atomic(path) as tmp:
        sheet.save(tmp)
    return True


# ------------------------------------------------------------------------------------------------- report


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def status_note(run: Path, own: bool = False) -> str | None:
    """A sentence for a run folder that did not finish, from its status.json; ``own``: the run itself is writing
    this report as its last step (it marks itself finished after), so "running" is not news."""
    path = run / "status.json"
    if not path.is_file():
        return None
    status = json.loads(path.read_text())
    if status.get("state") == "incomplete":
        return (
            f'This run is incomplete: it stopped with "{status.get("reason", "?")}". Continue it with '
            f"{status.get('resume', f'ferlab run --resume {run}')}; what is reported here is what had finished."
        )
    if status.get("state") == "running" and not own:
        return (
            "This run had not finished when this report was written (or was killed); "
            f"ferlab run --resume {run} continues it."
        )
    return None


@dataclass
class Study:
    """A finished run folder (or a fold's), read once: everything the report's sections draw on."""

    run: Path
    own: bool  # written by the run itself, as it ends
    info: dict
    comparison: list[dict]
    models: list[str]
    metrics: dict[str, dict]
    epochs: dict[str, list[dict]]
    preds: dict[str, list[dict]]
    dataset: dict
    pre: Preprocess
    classes: list[str]
    pairs: list[dict]
    files: Path  # report_files/, where the report's PNGs go


def read_study(run: Path, own: bool = False) -> Study:
    if not (run / "test_accuracy_comparison.csv").is_file():
        note = status_note(run)
        if note:
            raise FerlabError(f"{run} has no finished study to report on yet. {note}")
        raise FerlabError(f"{run} is not a finished ferlab run folder (no test_accuracy_comparison.csv).")
    info = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    comparison = read_csv(run / "test_accuracy_comparison.csv")
    models = [r["model"] for r in comparison]
    if not models:
        raise FerlabError(f"{run} holds no trained models to report on.")
    files = run / "report_files"
    files.mkdir(exist_ok=True)
    if not (run / "dataset.json").is_file():
        raise FerlabError(f"{run} has no dataset.json: it was written by an earlier ferlab; run the study again.")
    ds = json.loads((run / "dataset.json").read_text())
    metrics = {name: json.loads((run / name / "metrics.json").read_text()) for name in models}
    epochs = {name: read_csv(run / name / "epochs.csv") for name in models}
    preds = {name: read_csv(run / name / "predictions.csv") for name in models}
    # pairwise McNemar on the test images every model saw, Holm-corrected over the pairs
    right = {n: {r["file"]: r["predicted"] == r["true"] for r in preds[n]} for n in models}
    return Study(
        run=run,
        own=own,
        info=info,
        comparison=comparison,
        models=models,
        metrics=metrics,
        epochs=epochs,
        preds=preds,
        dataset=ds,
        pre=Preprocess(**ds["preprocess"]),
        classes=ds["classes"],
        pairs=mcnemar_holm(right),
        files=files,
    )


def build_report(run_dir: str | Path, own: bool = False) -> tuple[Path, Path]:
    """report.html and report.md of a run folder (or a fold's); ``own``: written by the run itself, as it ends."""
    run = Path(run_dir)
    if (run / "cv_summary.csv").is_file():
        return build_cv_report(run, own)
    study = read_study(run, own)
    doc = Doc(study.files)
    for section in (
        findings_section,
        dataset_section,
        models_section,
        comparison_section,
        per_class_section,
        misclassified_section,
        predictions_section,
    ):
        section(doc, study)
    return write_report(doc, f"ferlab study report: {run.name}", run)


# ---- findings, written from the numbers


def findings_heading(doc: Doc, run: Path, own: bool) -> None:
    """Every report opens with its findings, after a word on a run that did not finish."""
    doc.h2("Findings")
    note = status_note(run, own)
    if note:
        doc.p(note)


def findings_section(doc: Doc, s: Study) -> None:
    findings_heading(doc, s.run, s.own)
    m = s.metrics
    best = sorted(s.models, key=lambda n: -m[n]["accuracy"])[0]
    facts = [
        f"Best test accuracy: {best}, {pct(m[best]['accuracy'])} (95% CI {pct(m[best]['ci95'][0])}-"
        f"{pct(m[best]['ci95'][1])}, n={m[best]['n']}), macro-F1 {m[best]['macro_f1']:.3f}."
    ]
    facts += pair_facts(s) + gap_facts(s) + size_facts(s) + confusion_facts(s, best)
    for left in s.info.get("left_out", []):
        facts.append(f"{left['model']} was left out of this run: {left['reason']}")
    doc.ul(facts)


def pair_facts(s: Study) -> list[str]:
    m, facts = s.metrics, []
    for pair in s.pairs:
        a, b, n_ab, n_ba, n = (pair[k] for k in ("model_a", "model_b", "a_right_b_wrong", "a_wrong_b_right", "n"))
        p, adj = pair["mcnemar_p"], pair["holm_p"]
        hi, lo = (a, b) if m[a]["accuracy"] >= m[b]["accuracy"] else (b, a)
        diff = m[hi]["accuracy"] - m[lo]["accuracy"]
        verdict = (
            f"significant at {ALPHA}: {hi} is better on this test set"
            if adj < ALPHA
            else f"not significant at {ALPHA}: these {n} test images do not show that {hi} is better"
        )
        corrected = f", Holm-corrected over {len(s.pairs)} pairs p = {adj:.3g}" if len(s.pairs) > 1 else ""
        facts.append(
            f"{hi} vs {lo}: {100 * diff:+.1f} points; they disagree on {n_ab + n_ba} images "
            f"({a} alone right on {n_ab}, {b} alone right on {n_ba}); McNemar exact p = {p:.3g}{corrected}, {verdict}."
        )
    return facts


def gap_facts(s: Study) -> list[str]:
    # the fair gap: the training split in eval mode with the chosen weights (runs before it only had the epoch
    # table's running accuracy, with dropout and augmentation on, which is not comparable)
    fair = all(r.get("train_acc_eval") not in (None, "") for r in s.comparison)
    gaps = {
        n: float(r["train_acc_eval" if fair else "train_acc"]) - float(r["val_acc"])
        for n, r in zip(s.models, s.comparison)
    }
    facts = []
    for n, r in zip(s.models, s.comparison):
        if fair:
            facts.append(
                f"{n}: with the weights of the chosen epoch {r['best_epoch']} of {r['epochs_run']}, accuracy on its "
                f"own training images (eval mode) {pct(float(r['train_acc_eval']))} vs validation "
                f"{pct(float(r['val_acc']))}: an overfitting gap of {100 * gaps[n]:.1f} points."
            )
        else:
            facts.append(
                f"{n}: at the chosen epoch {r['best_epoch']} of {r['epochs_run']}, running training accuracy "
                f"(dropout and augmentation on) {pct(float(r['train_acc']))} vs validation {pct(float(r['val_acc']))}: "
                f"a gap of {100 * gaps[n]:.1f} points, not a fair measure of overfitting."
            )
    if len(s.models) > 1:
        worst_gap = max(gaps, key=gaps.get)
        facts.append(f"The largest overfitting gap is {worst_gap}'s ({100 * gaps[worst_gap]:.1f} points).")
    return facts


def size_facts(s: Study) -> list[str]:
    if len(s.models) < 2:
        return []
    m = s.metrics
    params = {r["model"]: int(r["parameters"]) for r in s.comparison}
    big, small = max(params, key=params.get), min(params, key=params.get)
    return [
        f"{big} has {params[big]:,} parameters, {params[big] / params[small]:.1f}x {small}'s "
        f"{params[small]:,}; its test accuracy is {100 * (m[big]['accuracy'] - m[small]['accuracy']):+.1f}"
        f" points relative to {small}."
    ]


def confusion_facts(s: Study, best: str) -> list[str]:
    classes = s.classes
    conf = np.array(s.metrics[best]["confusion"])
    off = [(conf[i, j], i, j) for i in range(len(classes)) for j in range(len(classes)) if i != j and conf[i, j]]
    if not off:
        return []
    top = sorted(off, reverse=True)[:3]
    return [
        f"{best}'s most frequent confusions: "
        + "; ".join(f"{classes[i]} taken for {classes[j]} {c} of {conf[i].sum()} times" for c, i, j in top)
        + "."
    ]


# ---- the other sections


def dataset_section(doc: Doc, s: Study) -> None:
    ds, classes, pre = s.dataset, s.classes, s.pre
    doc.h2("Dataset")
    doc.p(f"{ds['description']}; {len(classes)} classes; split: {ds['split_method']}.")
    counts = ds["counts"]
    doc.table(
        ["class", *counts, "total"],
        [[c, *(counts[split][c] for split in counts), sum(counts[split][c] for split in counts)] for c in classes]
        + [
            ["total", *(sum(counts[split].values()) for split in counts), sum(sum(v.values()) for v in counts.values())]
        ],
    )
    manifest = read_csv(s.run / "manifest.csv")
    samples = []
    for c in classes:  # one image per group where groups exist: CK+ sequences are near-identical frames
        seen: dict[str, dict] = {}
        for r in manifest:
            if r["class"] == c and r["split"] == "train":
                seen.setdefault(r["group"], r)
        samples += [(r["file"], [(c, (0, 0, 0))]) for r in list(seen.values())[:8]]
    thumbnails(samples, pre, s.files / "samples.png", cols=8)
    doc.img(
        s.files / "samples.png",
        "Training-set samples per class, as the models see them (after cropping and "
        f"resizing to {pre.image_size}x{pre.image_size})",
    )
    skipped = read_csv(s.run / "skipped_files.csv")
    if skipped:
        reasons: dict[str, int] = {}
        for row in skipped:
            key = row["reason"].split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
        doc.p(f"{len(skipped)} files were skipped:")
        doc.table(["reason", "files"], sorted(reasons.items(), key=lambda kv: -kv[1]))
    else:
        doc.p("No file was skipped.")


def models_section(doc: Doc, s: Study) -> None:
    doc.h2("Models")
    for n, r in zip(s.models, s.comparison):
        m = s.metrics[n]
        doc.h3(n)
        secs = s.info.get("fit_seconds", {}).get(n, m.get("fit_seconds"))
        precision = PRECISION.get(m.get("precision", "32"), m.get("precision"))
        if m.get("precision_note"):
            precision += "; " + m["precision_note"]
        doc.p(
            f"Trained for {r['epochs_run']} epochs in {secs:.0f} s ({precision}); "
            f"validation chose epoch {r['best_epoch']} (validation accuracy {pct(float(r['val_acc']))})."
        )
        doc.pre((s.run / n / "summary.txt").read_text().rstrip())
        plot_curves(s.epochs[n], int(r["best_epoch"]), f"{n}: learning curves", s.files / f"curves-{n}.png")
        doc.img(
            s.files / f"curves-{n}.png",
            f"{n}: accuracy and loss per epoch; the dashed line is the epoch whose weights were kept",
        )


def comparison_section(doc: Doc, s: Study) -> None:
    doc.h2("Comparison")
    doc.table(
        [
            "model",
            "parameters",
            "epochs run",
            "best epoch",
            "train acc (running)",
            "train acc (eval)",
            "val acc",
            "test acc",
            "95% CI",
            "n",
        ],
        [
            [
                r["model"],
                f"{int(r['parameters']):,}",
                r["epochs_run"],
                r["best_epoch"],
                r["train_acc"],
                r.get("train_acc_eval") or "-",
                r["val_acc"],
                r["test_acc"],
                f"{r['test_ci95_low']}-{r['test_ci95_high']}",
                r["n_test"],
            ]
            for r in s.comparison
        ],
    )
    if s.pairs:
        mcnemar_table(doc, s.pairs)


def mcnemar_table(doc: Doc, pairs: list[dict]) -> None:
    doc.p("Pairwise McNemar exact tests on the shared test images (two-sided), Holm-corrected for the number of pairs:")
    doc.table(
        [
            "model A",
            "model B",
            "A right, B wrong",
            "A wrong, B right",
            "p-value",
            "Holm p",
            f"significant at {ALPHA}",
        ],
        [
            [
                r["model_a"],
                r["model_b"],
                r["a_right_b_wrong"],
                r["a_wrong_b_right"],
                f"{r['mcnemar_p']:.3g}",
                f"{r['holm_p']:.3g}",
                "yes" if r["holm_p"] < ALPHA else "no",
            ]
            for r in pairs
        ],
    )


def per_class_section(doc: Doc, s: Study) -> None:
    doc.h2("Per-class results")
    for n in s.models:
        m = s.metrics[n]
        doc.h3(n)
        doc.table(
            ["class", "precision", "recall", "F1", "support"],
            [
                [c["class"], f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", c["support"]]
                for c in m["per_class"]
            ]
            + [["macro-F1", "", "", f"{m['macro_f1']:.3f}", m["n"]]],
        )
        doc.img(s.run / n / "confusion_matrix.png", f"{n}: confusion matrix on the test set (counts)")


def misclassified_section(doc: Doc, s: Study) -> None:
    doc.h2("Misclassified test images")
    for n in s.models:
        wrong = [r for r in s.preds[n] if r["true"] != r["predicted"]]
        doc.h3(f"{n}: {len(wrong)} of {len(s.preds[n])} wrong")
        if not wrong:
            continue
        thumbnails(
            [
                (
                    r["file"],
                    [
                        (f"true {r['true']}", (0, 0, 0)),
                        (f"pred {r['predicted']} {float(r['confidence']):.2f}", (200, 0, 0)),
                    ],
                )
                for r in wrong[:24]
            ],
            s.pre,
            s.files / f"wrong-{n}.png",
        )
        doc.img(s.files / f"wrong-{n}.png", f"{n}: misclassified test images (first {min(24, len(wrong))})")
        if wrong_heatmaps(s.run / n / "model.ckpt", wrong[:12], s.files / f"wrong-heat-{n}.png"):
            doc.img(
                s.files / f"wrong-heat-{n}.png",
                f"{n}: where it looked (Grad-CAM), for the predicted class (middle) and the true class (right)",
            )


def predictions_section(doc: Doc, s: Study) -> None:
    doc.h2("Predictions on new images")
    table = s.run / "predictions" / "prediction_results.csv"
    if not table.is_file():
        doc.p("This run predicted no new images (ferlab run ... --predict-dir DIR adds them).")
        return
    rows = read_csv(table)
    folder = os.path.commonpath([os.path.dirname(r["filename"]) for r in rows])
    if folder:  # the table names files relative to the folder they came from
        doc.p(f"Files under {folder}:")
        for r in rows:
            r["filename"] = os.path.relpath(r["filename"], folder)
    doc.table(list(rows[0]), [list(r.values()) for r in rows[:60]])
    for col in (c for c in rows[0] if c.endswith("_unusual")):
        flagged = sum(bool(r[col]) for r in rows)
        doc.p(
            f"{col.removesuffix('_unusual')}: {flagged} of {len(rows)} predictions flagged as unlike the model's "
            "training data (column " + col + ")" + ("; treat them with caution." if flagged else ".")
        )
    doc.img(
        s.run / "predictions" / "prediction_grid.png",
        "New images with each model's prediction (green: right, red: wrong, black: truth unknown)",
    )


def write_report(doc: Doc, title: str, run: Path) -> tuple[Path, Path]:
    html_path, md_path = run / "report.html", run / "report.md"
    for path, text in ((html_path, doc.html(title)), (md_path, doc.markdown(title, run))):
        with atomic(path) as tmp:
            tmp.write_text(text)
    return html_path, md_path


# ---------------------------------------------------------------------------------------- cross-validation


def plot_folds(per_fold: dict[str, list[float]], title: str, path: Path) -> None:
    """One row per model: each fold's test accuracy as a dot, the mean as a bar."""
    models = list(per_fold)
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(models) + 1.4))
    for i, m in enumerate(models):
        vals = per_fold[m]
        ax.scatter(vals, [i] * len(vals), s=36, alpha=0.75, zorder=3)
        ax.plot([np.mean(vals)] * 2, [i - 0.3, i + 0.3], color="black", linewidth=2)
    ax.set_yticks(range(len(models)), models)
    ax.set_xlabel("test accuracy per fold (dots) and mean (bar)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.set_ylim(-0.6, len(models) - 0.4)
    fig.tight_layout()
    save_figure(fig, path)


@dataclass
class CVStudy:
    """A cross-validation run folder, read once: its summary, pairs and folds."""

    run: Path
    own: bool  # written by the run itself, as it ends
    summary: list[dict]
    pairs: list[dict]
    cv: dict
    folds: int
    seeds: list[int]
    files: Path  # report_files/, where the report's PNGs go
    units: list[Path]  # the fold folders, or the run itself where it has none


def read_cv_study(run: Path, own: bool = False) -> CVStudy:
    summary = read_csv(run / "cv_summary.csv")
    pairs = read_csv(run / "cv_pairs.csv")
    cv = json.loads((run / "cv.json").read_text())
    files = run / "report_files"
    files.mkdir(exist_ok=True)
    return CVStudy(
        run=run,
        own=own,
        summary=summary,
        pairs=pairs,
        cv=cv,
        folds=cv["folds"],
        seeds=cv["seeds"],
        files=files,
        units=sorted(run.glob("fold-*"), key=lambda p: int(p.name.split("-")[1])) or [run],
    )


def build_cv_report(run_dir: str | Path, own: bool = False) -> tuple[Path, Path]:
    """The cross-validation run's report: the summary, the pairwise verdicts, per-fold dots, pooled confusions."""

    run = Path(run_dir)
    study = read_cv_study(run, own)
    doc = Doc(study.files)
    sections = (cv_findings_section, cv_summary_section, cv_pairs_table, cv_plots, cv_curve_section, cv_folds_section)
    for section in sections:
        section(doc, study)
    return write_report(doc, f"ferlab cross-validation report: {run.name}", run)


def cv_findings_section(doc: Doc, s: CVStudy) -> None:
    findings_heading(doc, s.run, s.own)
    doc.ul(
        [
            f"{r['model']}: mean test accuracy {pct(float(r['mean_test_acc']))} over {r['folds']} folds"
            + (f" (95% CI {pct(float(r['ci95_low']))}-{pct(float(r['ci95_high']))})" if r["ci95_low"] else "")
            + f", fold-to-fold standard deviation {100 * float(r['sd_across_folds']):.1f} points"
            + (f", seed-to-seed {100 * float(r['mean_sd_across_seeds']):.1f}" if len(s.seeds) > 1 else "")
            + f"; pooled out-of-fold {pct(float(r['pooled_acc']))} (Wilson 95% "
            f"{pct(float(r['pooled_ci95_low']))}-{pct(float(r['pooled_ci95_high']))}, n={r['pooled_n']})."
            for r in s.summary
        ]
        + [r["verdict"][0].upper() + r["verdict"][1:] + "." for r in s.pairs]
    )


def cv_summary_section(doc: Doc, s: CVStudy) -> None:
    k, seeds = s.folds, s.seeds
    doc.h2("Cross-validation")
    doc.p(
        (f"{k}-fold cross-validation: every group in exactly one test fold" if k else "One split")
        + (f", {len(seeds)} training seeds per fold ({', '.join(map(str, seeds))})" if len(seeds) > 1 else "")
        + ". Each fold is a complete study in its own folder, with its own report."
    )
    doc.table(
        [
            "model",
            "folds",
            "mean val acc",
            "mean test acc",
            "sd across folds",
            "95% CI of the mean",
            "sd across seeds",
            "pooled acc",
            "pooled 95% CI",
            "n",
        ],
        [
            [
                r["model"],
                r["folds"],
                r.get("mean_val_acc", "-"),
                r["mean_test_acc"],
                r["sd_across_folds"],
                f"{r['ci95_low']}-{r['ci95_high']}" if r["ci95_low"] else "-",
                r["mean_sd_across_seeds"] if len(seeds) > 1 else "-",
                r["pooled_acc"],
                f"{r['pooled_ci95_low']}-{r['pooled_ci95_high']}",
                r["pooled_n"],
            ]
            for r in s.summary
        ],
    )


def cv_pairs_table(doc: Doc, s: CVStudy) -> None:
    if not s.pairs:
        return
    doc.p(
        "Pairs: per-fold differences of test accuracy (A minus B) with their mean and t-interval, and an exact "
        "McNemar test on the pooled out-of-fold predictions of the first seed, Holm-corrected across the pairs."
    )
    doc.table(
        [
            "model A",
            "model B",
            "per-fold differences",
            "mean",
            "95% CI",
            "A right, B wrong",
            "A wrong, B right",
            "p",
            "Holm p",
            "verdict",
        ],
        [
            [
                r["model_a"],
                r["model_b"],
                r["fold_differences"],
                r["mean_difference"],
                f"{r['diff_ci95_low']}-{r['diff_ci95_high']}" if r["diff_ci95_low"] else "-",
                r["a_right_b_wrong"],
                r["a_wrong_b_right"],
                f"{float(r['mcnemar_p']):.3g}",
                f"{float(r['holm_p']):.3g}",
                r["verdict"],
            ]
            for r in s.pairs
        ],
    )


def cv_plots(doc: Doc, s: CVStudy) -> None:
    """Each fold's test accuracy per model, then each model's confusion matrix pooled over the folds."""
    plot_folds(s.cv["per_fold"], "test accuracy per fold", s.files / "cv-folds.png")
    doc.img(s.files / "cv-folds.png", "Test accuracy of each model on each fold (mean over seeds) and the mean")
    first = f"seed-{s.seeds[0]}"
    seed_dirs = [u / first if (u / first).is_dir() else u for u in s.units]
    classes = json.loads((seed_dirs[0] / "dataset.json").read_text())["classes"]
    for r in s.summary:
        conf = np.zeros((len(classes), len(classes)), int)
        for u in seed_dirs:
            for row in read_csv(u / r["model"] / "predictions.csv"):
                conf[classes.index(row["true"]), classes.index(row["predicted"])] += 1
        path = s.files / f"cv-confusion-{r['model']}.png"
        plot_confusion(conf.tolist(), classes, f"{r['model']}: pooled out-of-fold (n={conf.sum()})", path)
        doc.img(path, f"{r['model']}: confusion matrix pooled over the folds' test images (first seed)")


def cv_curve_section(doc: Doc, s: CVStudy) -> None:
    """The learning curve (``--per-class``): pooled out-of-fold accuracy against training images per class."""
    path = s.run / "learning_curve.csv"
    if not path.is_file():
        return
    rows = read_csv(path)
    doc.h2("How much data: the learning curve")
    doc.p(
        "The same cross-validation with at most N training images per class (the test folds unchanged; a larger "
        "N's images hold a smaller one's). Pooled out-of-fold accuracy of the first seed with its Wilson 95% "
        "interval, and the mean test accuracy over folds."
    )
    doc.table(
        [
            "model",
            "images per class (at most)",
            "mean training images per class",
            "pooled acc",
            "95% CI",
            "mean test acc",
        ],
        [
            [
                r["model"],
                r["per_class"],
                r["train_images_per_class"],
                r["pooled_acc"],
                f"{r['pooled_ci95_low']}-{r['pooled_ci95_high']}",
                r["mean_test_acc"],
            ]
            for r in rows
        ],
    )
    plot_curve(rows, s.files / "learning-curve.png")
    doc.img(s.files / "learning-curve.png", "Pooled out-of-fold accuracy against training images per class")


def plot_curve(rows: list[dict], path: Path) -> None:
    """One line per model: pooled accuracy (with its interval as error bars) against training images per class."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((float(r["train_images_per_class"]), r) for r in rows if r["model"] == m)
        x = [p[0] for p in pts]
        y = np.array([float(p[1]["pooled_acc"]) for p in pts])
        lo = y - np.array([float(p[1]["pooled_ci95_low"]) for p in pts])
        hi = np.array([float(p[1]["pooled_ci95_high"]) for p in pts]) - y
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=m)
    ax.set_xscale("log")
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("pooled out-of-fold accuracy")
    ax.set_title("learning curve", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def cv_folds_section(doc: Doc, s: CVStudy) -> None:
    doc.h2("Folds")
    units = s.units
    studies = [u for d in units for u in ([d] if (d / "report.html").is_file() else sorted(d.glob("seed-*")))]
    doc.ul([f"{u.relative_to(s.run)}/report.html" for u in studies])
