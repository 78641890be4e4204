"""The study report, built from a run folder alone: report.html (self-contained) and report.md.

    ferlab report runs/20261126-120000-ckplus48

Every number is read from the run's own files (CSV, JSON, YAML), so the report can be rebuilt at any time
and always agrees with them. "Model X is better" is only written when a McNemar exact test on the shared
test images supports it.
"""

from __future__ import annotations

import base64
import csv
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
import yaml  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from ferlab.data import BadImage, Preprocess, decode  # noqa: E402
from ferlab.errors import FerlabError  # noqa: E402
from ferlab.evaluate import save_figure  # noqa: E402

SECTIONS = (
    "Findings",
    "Dataset",
    "Models",
    "Comparison",
    "Per-class results",
    "Misclassified test images",
    "Predictions on new images",
)
ALPHA = 0.05
PRECISION = {"32": "fp32", "bf16-mixed": "bf16 mixed precision", "16-mixed": "fp16 mixed precision"}


def mcnemar_exact(a_right: list[bool], b_right: list[bool]) -> tuple[int, int, float]:
    """(A right & B wrong, A wrong & B right, two-sided exact p) on paired predictions."""
    b = sum(x and not y for x, y in zip(a_right, b_right))
    c = sum(y and not x for x, y in zip(a_right, b_right))
    n = b + c
    if n == 0:
        return b, c, 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return b, c, min(1.0, 2 * tail)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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
    tmp = path.with_name(path.name + ".tmp.png")
    sheet.save(tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- report


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def build_report(run_dir: str | Path) -> tuple[Path, Path]:
    run = Path(run_dir)
    if not (run / "test_accuracy_comparison.csv").is_file():
        raise FerlabError(f"{run} is not a finished ferlab run folder (no test_accuracy_comparison.csv).")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    info = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    comparison = read_csv(run / "test_accuracy_comparison.csv")
    models = [r["model"] for r in comparison]
    if not models:
        raise FerlabError(f"{run} holds no trained models to report on.")
    files = run / "report_files"
    files.mkdir(exist_ok=True)
    pre = Preprocess(
        cfg["data"]["image_size"], cfg["data"]["face_crop"], cfg["data"]["face_margin"], cfg["data"]["max_pixels"]
    )
    ds = cfg["dataset"]
    classes = ds["classes"]
    m = {name: json.loads((run / name / "metrics.json").read_text()) for name in models}
    epochs = {name: read_csv(run / name / "epochs.csv") for name in models}
    preds = {name: read_csv(run / name / "predictions.csv") for name in models}
    doc = Doc(files)

    # pairwise McNemar on the test images every model saw
    pairs = []
    for i, a in enumerate(models):
        for b in models[i + 1 :]:
            truth = {r["file"]: r["true"] for r in preds[a]}
            pb = {r["file"]: r["predicted"] for r in preds[b]}
            shared = [f for f in truth if f in pb]
            pa = {r["file"]: r["predicted"] for r in preds[a]}
            n_ab, n_ba, p = mcnemar_exact([pa[f] == truth[f] for f in shared], [pb[f] == truth[f] for f in shared])
            pairs.append((a, b, n_ab, n_ba, p, len(shared)))

    # ---- findings, written from the numbers
    doc.h2("Findings")
    ranked = sorted(models, key=lambda n: -m[n]["accuracy"])
    best = ranked[0]
    facts = [
        f"Best test accuracy: {best}, {pct(m[best]['accuracy'])} (95% CI {pct(m[best]['ci95'][0])}-"
        f"{pct(m[best]['ci95'][1])}, n={m[best]['n']}), macro-F1 {m[best]['macro_f1']:.3f}."
    ]
    for a, b, n_ab, n_ba, p, n in pairs:
        hi, lo = (a, b) if m[a]["accuracy"] >= m[b]["accuracy"] else (b, a)
        diff = m[hi]["accuracy"] - m[lo]["accuracy"]
        verdict = (
            f"significant at {ALPHA}: {hi} is better on this test set"
            if p < ALPHA
            else f"not significant at {ALPHA}: these {n} test images do not show that {hi} is better"
        )
        facts.append(
            f"{hi} vs {lo}: {100 * diff:+.1f} points; they disagree on {n_ab + n_ba} images "
            f"({a} alone right on {n_ab}, {b} alone right on {n_ba}); McNemar exact p = {p:.3g}, {verdict}."
        )
    gaps = {n: float(r["train_acc"]) - float(r["val_acc"]) for n, r in zip(models, comparison)}
    for n, r in zip(models, comparison):
        facts.append(
            f"{n}: at the chosen epoch {r['best_epoch']} of {r['epochs_run']}, training accuracy "
            f"{pct(float(r['train_acc']))} vs validation {pct(float(r['val_acc']))}: an overfitting gap of "
            f"{100 * gaps[n]:.1f} points."
        )
    if len(models) > 1:
        worst_gap = max(gaps, key=gaps.get)
        facts.append(f"The largest overfitting gap is {worst_gap}'s ({100 * gaps[worst_gap]:.1f} points).")
    params = {r["model"]: int(r["parameters"]) for r in comparison}
    if len(models) > 1:
        big, small = max(params, key=params.get), min(params, key=params.get)
        facts.append(
            f"{big} has {params[big]:,} parameters, {params[big] / params[small]:.1f}x {small}'s "
            f"{params[small]:,}; its test accuracy is {100 * (m[big]['accuracy'] - m[small]['accuracy']):+.1f}"
            f" points relative to {small}."
        )
    conf = np.array(m[best]["confusion"])
    off = [(conf[i, j], i, j) for i in range(len(classes)) for j in range(len(classes)) if i != j and conf[i, j]]
    if off:
        top = sorted(off, reverse=True)[:3]
        facts.append(
            f"{best}'s most frequent confusions: "
            + "; ".join(f"{classes[i]} taken for {classes[j]} {c} of {conf[i].sum()} times" for c, i, j in top)
            + "."
        )
    for left in info.get("left_out", []):
        facts.append(f"{left['model']} was left out of this run: {left['reason']}")
    doc.ul(facts)

    # ---- dataset
    doc.h2("Dataset")
    doc.p(f"{ds['description']}; {len(classes)} classes; split: {ds['split_method']}.")
    counts = ds["counts"]
    doc.table(
        ["class", *counts, "total"],
        [[c, *(counts[s][c] for s in counts), sum(counts[s][c] for s in counts)] for c in classes]
        + [["total", *(sum(counts[s].values()) for s in counts), sum(sum(v.values()) for v in counts.values())]],
    )
    manifest = read_csv(run / "manifest.csv")
    samples = []
    for c in classes:  # one image per group where groups exist: CK+ sequences are near-identical frames
        seen: dict[str, dict] = {}
        for r in manifest:
            if r["class"] == c and r["split"] == "train":
                seen.setdefault(r["group"], r)
        samples += [(r["file"], [(c, (0, 0, 0))]) for r in list(seen.values())[:8]]
    thumbnails(samples, pre, files / "samples.png", cols=8)
    doc.img(
        files / "samples.png",
        "Training-set samples per class, as the models see them (after cropping and "
        f"resizing to {pre.image_size}x{pre.image_size})",
    )
    skipped = read_csv(run / "skipped_files.csv")
    if skipped:
        reasons: dict[str, int] = {}
        for s in skipped:
            key = s["reason"].split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
        doc.p(f"{len(skipped)} files were skipped:")
        doc.table(["reason", "files"], sorted(reasons.items(), key=lambda kv: -kv[1]))
    else:
        doc.p("No file was skipped.")

    # ---- models
    doc.h2("Models")
    for n, r in zip(models, comparison):
        doc.h3(n)
        secs = info.get("fit_seconds", {}).get(n, m[n].get("fit_seconds"))
        precision = PRECISION.get(m[n].get("precision", "32"), m[n].get("precision"))
        doc.p(
            f"Trained for {r['epochs_run']} epochs in {secs:.0f} s ({precision}); "
            f"early stopping chose epoch {r['best_epoch']} (validation accuracy {pct(float(r['val_acc']))})."
        )
        doc.pre((run / n / "summary.txt").read_text().rstrip())
        plot_curves(epochs[n], int(r["best_epoch"]), f"{n}: learning curves", files / f"curves-{n}.png")
        doc.img(
            files / f"curves-{n}.png",
            f"{n}: accuracy and loss per epoch; the dashed line is the epoch whose weights were kept",
        )

    # ---- comparison
    doc.h2("Comparison")
    doc.table(
        ["model", "parameters", "epochs run", "best epoch", "train acc", "val acc", "test acc", "95% CI", "n"],
        [
            [
                r["model"],
                f"{int(r['parameters']):,}",
                r["epochs_run"],
                r["best_epoch"],
                r["train_acc"],
                r["val_acc"],
                r["test_acc"],
                f"{r['test_ci95_low']}-{r['test_ci95_high']}",
                r["n_test"],
            ]
            for r in comparison
        ],
    )
    if pairs:
        doc.p("Pairwise McNemar exact tests on the shared test images (two-sided):")
        doc.table(
            ["model A", "model B", "A right, B wrong", "A wrong, B right", "p-value", f"significant at {ALPHA}"],
            [[a, b, x, y, f"{p:.3g}", "yes" if p < ALPHA else "no"] for a, b, x, y, p, _ in pairs],
        )

    # ---- per class
    doc.h2("Per-class results")
    for n in models:
        doc.h3(n)
        doc.table(
            ["class", "precision", "recall", "F1", "support"],
            [
                [c["class"], f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", c["support"]]
                for c in m[n]["per_class"]
            ]
            + [["macro-F1", "", "", f"{m[n]['macro_f1']:.3f}", m[n]["n"]]],
        )
        doc.img(run / n / "confusion_matrix.png", f"{n}: confusion matrix on the test set (counts)")

    # ---- misclassified
    doc.h2("Misclassified test images")
    for n in models:
        wrong = [r for r in preds[n] if r["true"] != r["predicted"]]
        doc.h3(f"{n}: {len(wrong)} of {len(preds[n])} wrong")
        if wrong:
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
                pre,
                files / f"wrong-{n}.png",
            )
            doc.img(files / f"wrong-{n}.png", f"{n}: misclassified test images (first {min(24, len(wrong))})")

    # ---- predictions
    doc.h2("Predictions on new images")
    table = run / "predictions" / "prediction_results.csv"
    if table.is_file():
        rows = read_csv(table)
        folder = os.path.commonpath([os.path.dirname(r["filename"]) for r in rows])
        if folder:  # the table names files relative to the folder they came from
            doc.p(f"Files under {folder}:")
            for r in rows:
                r["filename"] = os.path.relpath(r["filename"], folder)
        doc.table(list(rows[0]), [list(r.values()) for r in rows[:60]])
        doc.img(
            run / "predictions" / "prediction_grid.png",
            "New images with each model's prediction (green: right, red: wrong, black: truth unknown)",
        )
    else:
        doc.p("This run predicted no new images (ferlab run ... --predict-dir DIR adds them).")

    title = f"ferlab study report: {run.name}"
    html_path, md_path = run / "report.html", run / "report.md"
    for path, text in ((html_path, doc.html(title)), (md_path, doc.markdown(title, run))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return html_path, md_path
