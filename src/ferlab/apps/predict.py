"""Predict new images with one or more models; a CSV and labelled picture grids.

    ferlab predict photo.jpg                                            # the shipped ferplus model
    ferlab predict --checkpoint runs/x/regularized-cnn/model.ckpt --checkpoint model.onnx photos/ 'more/*.jpg'
    ferlab predict --checkpoint runs/x photos/ --largest-face --out predictions/  # every model of a run folder

Each model prepares an image exactly as its card says (grayscale, face crop, input size) through
:mod:`ferlab.inference`, the same path ``ferlab evaluate``, ``ferlab serve`` and :func:`ferlab.analyze` take.
The correct class is the parent folder's name when it is one of the classes, or comes from ``--labels``
(a CSV of filename,label). Predictions on inputs unlike a model's training data are flagged.
"""

from __future__ import annotations

import csv
import glob
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ferlab.core.config import is_distributed
from ferlab.core.errors import FerlabError
from ferlab.core.files import atomic, write_csv
from ferlab.core.names import canonical, same_class, spelled_as
from ferlab.core.stats import wilson
from ferlab.data.faces import iou
from ferlab.data.images import IMAGE_SUFFIXES, BadImage, Decoded, NoFace, file_key, open_rgb
from ferlab.inference.explain import check_method, heatmaps, overlay
from ferlab.inference.model import ALL_FACES, Model, load_models

if TYPE_CHECKING:
    from ferlab.training.sharded import Engine

GRID_PANELS = 48  # panels per grid page


def natural_key(path: Path) -> list:
    """img2 before img10: digit runs compare as numbers."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(path))]


def folder_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (hidden ones aside), in natural order; broken links and link loops too: they
    are reported as skipped files, not silently left out."""
    found = (p for p in folder.rglob("*") if (p.is_file() or p.is_symlink()) and not p.name.startswith("."))
    return sorted(found, key=natural_key)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (searched recursively) and glob patterns, in natural order, without repeats."""
    found: list[Path] = []
    for item in inputs:
        if any(ch in item for ch in "*?["):
            matches = sorted((Path(p) for p in glob.glob(item, recursive=True)), key=natural_key)
            if not matches:
                raise FerlabError(f"The pattern {item} matches no files.")
            found += [p for p in matches if p.is_file()]
        elif Path(item).is_dir():
            files = folder_files(Path(item))
            if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
                raise FerlabError(f"The folder {item} holds no images to predict.")
            found += files
        elif Path(item).is_file():
            found.append(Path(item))
        else:
            raise FerlabError(f"The input {item} does not exist.")
    return list(dict.fromkeys(found))


def read_labels(path: str) -> dict[str, str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's CSV may start with a BOM
            rows = [r for r in csv.reader(f) if r]
    except OSError as e:
        raise FerlabError(f"Cannot read the labels file {path} ({e.strerror}).") from None
    if rows and rows[0][:2] == ["filename", "label"]:
        rows = rows[1:]
    if not rows or any(len(r) < 2 for r in rows):
        raise FerlabError(f"The labels file {path} must have two columns, filename and label.")

    def key(label: str) -> str:
        return canonical(label)

    out: dict[str, str] = {}
    for name, label, *_ in rows:
        if name in out and key(out[name]) != key(label):  # "anger" and "angry" are one class
            raise FerlabError(f"The labels file {path} gives {name} two labels, {out[name]} and {label}.")
        out[name] = label
    return out


@dataclass
class Row:
    file: Path
    face: int  # 0-based face index, largest first (0 alone with --largest-face)
    box: tuple[int, int, int, int] | None
    true: str
    preds: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # model -> top-3 (class, prob)
    unusual: dict[str, str] = field(default_factory=dict)  # model -> why the input is unlike its training data
    notes: dict[str, str] = field(default_factory=dict)  # model -> why it has no prediction
    crops: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # model -> what it saw (for --explain)


def face_crop_warnings(models: list[Model], override: str | None) -> list[str]:
    """A sentence per model whose card the --face-crop override contradicts."""
    if not override:
        return []
    out = []
    for m in models:
        pre = m.pre
        if override == "off" and (pre.face_crop != "off" or pre.faces == "crops"):
            out.append(
                f"{m.label} was trained on face crops; with --face-crop off whole photos are classified as they are"
            )
        elif override != "off" and pre.face_crop == "off" and pre.faces == "photos":
            out.append(f"{m.label} was trained on whole images; with --face-crop {override} it sees face crops")
    return out


def predict(
    models: list[Model],
    files: list[Path],
    labels: dict[str, str] | None = None,
    all_faces: bool = ALL_FACES,
    face_crop: str | None = None,
    keep_crops: bool = False,
) -> tuple[list[Row], list[dict]]:
    """Rows of predictions and the list of skipped inputs (file, model, reason).

    Each file is decoded once and prepared for every model, then dropped: memory holds the models' small
    input crops, never a folder of full-size photos; crops are classified in batches as they accumulate."""
    table = RowTable(models, labels, keep_crops)
    max_pixels = max(m.pre.max_pixels for m in models)
    for f in files:
        try:
            image = open_rgb(f, max_pixels)
            key = file_key(f)
        except BadImage as e:  # unusable for every model: listed once
            table.skipped.append({"file": str(f), "model": "", "reason": str(e)})
            continue
        except Exception as e:  # noqa: BLE001 - one odd file must never stop a batch
            reason = f"unreadable ({e.__class__.__name__}: {e})"
            table.skipped.append({"file": str(f), "model": "", "reason": reason})
            continue
        for m in models:
            table.add(m, f, image, key, all_faces, face_crop)
    for m in models:
        table.flush(m)
    order = {f: i for i, f in enumerate(files)}
    return sorted(table.rows.values(), key=lambda r: (order[r.file], r.face)), table.skipped


def predict_sharded(
    models: list[Model],
    files: list[Path],
    labels: dict[str, str] | None,
    all_faces: bool,
    face_crop: str | None,
    keep_crops: bool,
    engine: Engine,
) -> tuple[list[Row], list[dict]] | None:
    """:func:`predict` over chunks of ``files`` shared out by Lightning's prediction loop among ``engine``'s
    processes, each file in exactly one chunk; on rank 0 the rows and skipped files in the order one process
    gives them, None on the others."""
    from ferlab.training.sharded import map_sharded  # Lightning only where a prediction is distributed

    def work(indices: list[int]) -> tuple[list[Row], list[dict]]:
        return predict(models, [files[i] for i in indices], labels, all_faces, face_crop, keep_crops)

    chunks = map_sharded(len(files), work, engine)
    if chunks is None:
        return None
    order = {f: i for i, f in enumerate(files)}
    rows = sorted((r for _, (rs, _) in chunks for r in rs), key=lambda r: (order[r.file], r.face))
    # a file's entries stay in model order (one chunk holds each file; the sort is stable)
    skipped = sorted((s for _, (_, sk) in chunks for s in sk), key=lambda s: order[Path(s["file"])])
    return rows, skipped


class RowTable:
    """The rows of a prediction as models add their faces: a face another model found already (IoU >= 0.5)
    shares its row; crops wait in a per-model batch until 256 are pending."""

    def __init__(self, models: list[Model], labels: dict[str, str] | None, keep_crops: bool):
        self.classes, self.labels, self.keep_crops = models[0].classes, labels, keep_crops
        self.rows: dict[tuple[Path, int], Row] = {}
        self.with_face: set[tuple[Path, int]] = set()  # rows some model has a face for (not only a note)
        self.pending: dict[str, list[tuple[tuple[Path, int], Decoded]]] = {m.label: [] for m in models}
        self.skipped: list[dict] = []

    def truth(self, f: Path) -> str:
        if self.labels is not None:
            return self.labels.get(f.name, self.labels.get(str(f), ""))
        parent = f.parent.name
        return spelled_as(parent, self.classes) if any(same_class(parent, c) for c in self.classes) else ""

    def add(self, m: Model, f: Path, image: Image.Image, key: tuple, all_faces: bool, face_crop: str | None) -> None:
        try:
            faces_of_f = m.prepare(image, key=key, all_faces=all_faces, face_crop=face_crop)
        except NoFace as e:  # readable, but this model's policy skips images without a face
            self.skipped.append({"file": str(f), "model": m.label, "reason": str(e)})
            self.rows.setdefault((f, 0), Row(f, 0, None, self.truth(f))).notes[m.label] = str(e)
            return
        except Exception as e:  # noqa: BLE001 - e.g. an image too thin to resize: skipped, not fatal
            self.skipped.append({"file": str(f), "model": m.label, "reason": f"{e.__class__.__name__}: {e}"})
            return
        taken: set[int] = set()
        for d in faces_of_f:
            self.pending[m.label].append((self.row_for(f, d, taken), d))
        if len(self.pending[m.label]) >= 256:
            self.flush(m)

    def row_for(self, f: Path, d: Decoded, taken: set[int]) -> tuple[Path, int]:
        """The file's row for this face: the one whose box another model already found (IoU >= 0.5; models
        with other detectors or crop policies may find other faces, or the same ones in another order), else a
        new row."""
        face = 0
        while (f, face) in self.rows:
            row, noted_only = self.rows[(f, face)], (f, face) not in self.with_face
            if face not in taken and (
                noted_only or row.box == d.box or (row.box and d.box and iou(row.box, d.box) >= 0.5)
            ):
                row.box = d.box if noted_only else row.box  # a row that so far holds only another model's note
                break
            face += 1
        taken.add(face)
        self.rows.setdefault((f, face), Row(f, face, d.box, self.truth(f)))
        self.with_face.add((f, face))
        return f, face

    def flush(self, m: Model) -> None:
        batch = self.pending[m.label]
        for (key, _), face in zip(batch, m.classify([d for _, d in batch])):
            row = self.rows[key]
            row.preds[m.label] = sorted(face.probabilities.items(), key=lambda kv: -kv[1])[:3]
            if self.keep_crops:
                row.crops[m.label] = face.crop
            if face.unusual:
                row.unusual[m.label] = face.unusual
        batch.clear()


def write_table(rows: list[Row], models: list[Model], path: Path) -> None:
    cols = ["filename", "face", "box", "face_found", "correct_class"]
    for m in models:
        cols += [f"{m.label}_predicted", f"{m.label}_confidence", f"{m.label}_top3", f"{m.label}_unusual"]
    out = []
    for r in rows:
        rec = {"filename": str(r.file), "face": r.face, "box": " ".join(map(str, r.box)) if r.box else ""}
        rec.update(face_found=r.box is not None, correct_class=r.true)
        for m in models:
            top = r.preds.get(m.label)
            rec[f"{m.label}_predicted"] = top[0][0] if top else ""
            rec[f"{m.label}_confidence"] = round(top[0][1], 4) if top else ""
            rec[f"{m.label}_top3"] = " ".join(f"{c}:{p:.3f}" for c, p in top) if top else ""
            # a model that predicted nothing here says why where every other reason to doubt a row goes
            rec[f"{m.label}_unusual"] = r.unusual.get(m.label, "") if top else r.notes.get(m.label, "")
        out.append(rec)
    write_csv(path, out, cols)


PANEL, LINE, COLUMNS = 240, 16, 6  # panel width and picture side, text line height, panels per row
COLOURS = {
    "right": (0, 130, 0),
    "wrong": (200, 0, 0),
    "unknown": (0, 0, 0),
    "none": (130, 130, 130),
    "unusual": (190, 110, 0),
}


def panel_height(models: int, truth: bool) -> int:
    return PANEL + LINE * (1 + truth + models) + 8


def grid_size(panels: int, models: int, truth: bool = True) -> tuple[int, int]:
    cols = min(COLUMNS, max(1, panels))
    return cols * PANEL, math.ceil(panels / cols) * panel_height(models, truth)


def draw_grid(rows: list[Row], models: list[Model], path: Path, truth: bool) -> None:
    """One grid page: each panel is an image (the classified face's box drawn) over its name, the correct class
    (when known for any input) and every model's prediction: green when right, red when wrong, black when the
    correct class is unknown, orange with a "?" when the input is unlike the model's training data."""
    width, height = grid_size(len(rows), len(models), truth)
    panel_h = panel_height(len(models), truth)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    side = PANEL - 16
    for k, r in enumerate(rows):
        x0, y0 = (k % COLUMNS) * PANEL + 8, (k // COLUMNS) * panel_h + 4
        try:
            im = open_rgb(r.file, models[0].pre.max_pixels)  # upright, as the face boxes were found
        except BadImage:
            im = Image.new("RGB", (side, side), (230, 230, 230))
        scale = side / max(im.size)
        thumb = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
        ox, oy = x0 + (side - thumb.width) // 2, y0 + (side - thumb.height) // 2
        sheet.paste(thumb, (ox, oy))
        if r.box:
            bx, by, bw, bh = (v * scale for v in r.box)
            draw.rectangle([ox + bx, oy + by, ox + bx + bw, oy + by + bh], outline=(255, 220, 0), width=2)
        lines = panel_lines(r, models, truth, draw, font)
        for i, (text, colour) in enumerate(lines):
            while draw.textlength(text, font=font) > PANEL - 12 and len(text) > 4:
                text = text[:-4] + "..."
            draw.text((x0, y0 + side + 4 + i * LINE), text, fill=colour, font=font)
    with atomic(path) as tmp:
        sheet.save(tmp)


def panel_lines(r: Row, models: list[Model], truth: bool, draw: ImageDraw.ImageDraw, font) -> list[tuple[str, tuple]]:
    """A panel's text lines with their colours: the file (and face), the correct class, each model's answer."""
    name = r.file.name + (f" (face {r.face + 1})" if r.face else "")
    lines = [(name, COLOURS["unknown"])]
    if truth:
        lines.append((f"true: {r.true or '?'}", COLOURS["unknown"]))
    for m in models:
        top = r.preds.get(m.label)
        if not top:
            lines.append((f"{m.label}: -", COLOURS["none"]))
            continue
        verdict = "unknown" if not r.true else ("right" if same_class(top[0][0], r.true) else "wrong")
        if r.unusual.get(m.label):
            verdict = "unusual" if verdict == "unknown" else verdict
        mark = " ?" if r.unusual.get(m.label) else ""
        label, verdict_text = m.label, f": {top[0][0]} {top[0][1]:.2f}{mark}"
        while draw.textlength(label + verdict_text, font=font) > PANEL - 12 and len(label) > 6:
            label = label[:-4] + "..."  # shorten the model's name, never the prediction
        lines.append((label + verdict_text, COLOURS[verdict]))
    return lines


def draw_grids(rows: list[Row], models: list[Model], out: Path) -> list[Path]:
    """Every row on pages of ``GRID_PANELS``: prediction_grid.png, prediction_grid_2.png, ..."""
    truth = any(r.true for r in rows)
    pages = []
    for k in range(0, len(rows), GRID_PANELS):
        page = k // GRID_PANELS + 1
        path = out / ("prediction_grid.png" if page == 1 else f"prediction_grid_{page}.png")
        draw_grid(rows[k : k + GRID_PANELS], models, path, truth)
        pages.append(path)
    for stale in out.glob("prediction_grid_*.png"):  # pages of an earlier, longer prediction into this folder
        if stale not in pages:
            stale.unlink()
    return pages


@dataclass
class Prediction:
    rows: list[Row]
    skipped: list[dict]
    models: list[Model]
    grids: list[Path]
    accuracy: dict[str, tuple[int, int]]  # model -> (right, labelled)
    unusual: dict[str, int]  # model -> predictions flagged


def run_predict(
    checkpoints: list[str],
    inputs: list[str],
    out: Path,
    labels: str | None = None,
    all_faces: bool = ALL_FACES,
    face_crop: str | None = None,
    explain: str | None = None,
    cache: bool = True,
    engine: Engine | None = None,
) -> Prediction | None:
    """Predict ``inputs`` with every model and write the CSV, the skipped files, the grids (and explanations)
    into ``out``; every mistake is refused before anything is written. With a distributed ``engine`` the inputs
    are shared out among its processes and rank 0 writes everything (the other ranks return None)."""
    models = load_models(checkpoints, cache)
    if explain:  # refused before anything is read or written
        for m in models:
            check_method(m, explain)
    for w in face_crop_warnings(models, face_crop):
        print(f"ferlab: warning: {w}", file=sys.stderr)
    files = expand_inputs(inputs)
    known = known_labels(labels, models) if labels else None
    keep = explain is not None
    if engine is not None and is_distributed(engine):
        shared = predict_sharded(models, files, known, all_faces, face_crop, keep, engine)
        if shared is None:
            return None
        rows, skipped = shared
    else:
        rows, skipped = predict(models, files, known, all_faces, face_crop, keep_crops=keep)
    if known is not None:
        warn_unlabelled(rows, labels)
    if not any(r.preds for r in rows):
        first = skipped[0] if skipped else {"file": "-", "reason": "no input"}
        raise FerlabError(
            f"None of the {len(files)} inputs could be predicted (first: {first['file']}: {first['reason']})."
        )
    grids = write_outputs(rows, skipped, models, out, explain)
    unusual = {m.label: sum(m.label in r.unusual for r in rows) for m in models}
    return Prediction(rows, skipped, models, grids, scores(rows, models), unusual)


def scores(rows: list[Row], models: list[Model]) -> dict[str, tuple[int, int]]:
    """(right, labelled) per model; a label names the image, so it scores the image's largest face (face 0), as
    evaluate does."""
    accuracy = {}
    for m in models:
        scored = [r for r in rows if r.true and r.face == 0 and m.label in r.preds]
        accuracy[m.label] = (sum(same_class(r.preds[m.label][0][0], r.true) for r in scored), len(scored))
    return accuracy


def known_labels(path: str, models: list[Model]) -> dict[str, str]:
    """The labels file's classes in the first model's spelling; a class some model does not know is refused."""
    known = read_labels(path)
    for m in models:
        names = {canonical(c) for c in m.classes}
        foreign = sorted({v for v in known.values() if v and canonical(v) not in names})
        if foreign:
            raise FerlabError(
                f"The labels file names classes {m.label} does not know: {', '.join(foreign)} "
                f"(it knows {', '.join(m.classes)})."
            )
    return {f: spelled_as(v, models[0].classes) for f, v in known.items()}


def warn_unlabelled(rows: list[Row], labels: str) -> None:
    inputs = {r.file for r in rows}
    unlabelled = len(inputs - {r.file for r in rows if r.true})
    if unlabelled:
        print(
            f"ferlab: warning: {unlabelled} of {len(inputs)} inputs have no label in {labels} (matched by file "
            "name or path); they are predicted but not scored",
            file=sys.stderr,
        )


def write_outputs(
    rows: list[Row], skipped: list[dict], models: list[Model], out: Path, explain: str | None
) -> list[Path]:
    """prediction_results.csv, skipped_files.csv, the grid pages (and explanations); what an earlier prediction
    into the same folder left and this one did not write again is removed. Returns the pages."""
    out.mkdir(parents=True, exist_ok=True)
    earlier = {f for pattern in OUTPUTS for f in out.glob(pattern)}  # a former prediction's pictures, if any
    write_table(rows, models, out / "prediction_results.csv")
    write_csv(out / "skipped_files.csv", skipped, ["file", "model", "reason"])
    grids = draw_grids(rows, models, out)
    written = set(grids)
    if explain:
        pages, files = explain_rows(rows, models, out, explain)
        grids += pages
        written |= {*pages, *files}
    remove_stale(out, earlier - written)
    return grids


OUTPUTS = ("prediction_grid*.png", "explanation_grid*.png", "explanations/*.png")  # what a predict writes


def remove_stale(out: Path, stale: set[Path]) -> None:
    """Once a prediction's files are all written, the grids and explanations an earlier prediction left in the
    same folder and this one did not write again (``stale``) are removed, so the folder never mixes two
    predictions' pictures."""
    for f in stale:
        f.unlink(missing_ok=True)
    folder = out / "explanations"
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def explain_rows(rows: list[Row], models: list[Model], out: Path, method: str) -> tuple[list[Path], list[Path]]:
    """explanations/<image>[_face<k>]_<model>.png (the crop beside its heatmap for the predicted class) and
    explanation_grid.png pages (every row: the crop, then each model's heatmap): (the pages, the files)."""
    folder = out / "explanations"
    folder.mkdir(exist_ok=True)
    stems = unique_stems(rows)
    maps: dict[tuple[int, str], np.ndarray] = {}
    files: list[Path] = []
    for m in models:
        todo = [(i, r) for i, r in enumerate(rows) if m.label in r.crops]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in m.label)
        for k in range(0, len(todo), 32):
            chunk = todo[k : k + 32]
            targets = [m.classes.index(r.preds[m.label][0][0]) for _, r in chunk]
            for (i, r), heat in zip(chunk, heatmaps(m, [r.crops[m.label] for _, r in chunk], targets, method)):
                maps[(i, m.label)] = overlay(r.crops[m.label], heat)
                side = np.concatenate([r.crops[m.label], maps[(i, m.label)]], axis=1)
                stem = stems[r.file] + (f"_face{r.face + 1}" if r.face else "")
                files.append(folder / f"{stem}_{safe}.png")
                Image.fromarray(side).resize((side.shape[1] * 2, side.shape[0] * 2)).save(files[-1])
    pages = []
    for k in range(0, len(rows), GRID_PANELS):
        page = k // GRID_PANELS + 1
        path = out / ("explanation_grid.png" if page == 1 else f"explanation_grid_{page}.png")
        with atomic(path) as tmp:
            explanation_page(list(enumerate(rows))[k : k + GRID_PANELS], models, maps).save(tmp)
        pages.append(path)
    return pages, files


def unique_stems(rows: list[Row]) -> dict[Path, str]:
    """A file-name stem per input: a/1.jpg and b/1.jpg give 1 and 1-2, never one overwriting the other."""
    stems: dict[Path, str] = {}
    used: set[str] = set()
    for f in dict.fromkeys(r.file for r in rows):
        stem, n = f.stem, 1
        while stem in used:
            n += 1
            stem = f"{f.stem}-{n}"
        stems[f] = stem
        used.add(stem)
    return stems


def explanation_page(
    chunk: list[tuple[int, Row]], models: list[Model], maps: dict[tuple[int, str], np.ndarray], cell: int = 120
) -> Image.Image:
    """One explanation grid page: a row per input, its crop, then each model's heatmap with its prediction."""
    sheet = Image.new("RGB", ((1 + len(models)) * cell + 220, len(chunk) * (cell + 4) + 24), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    for j, m in enumerate(models):
        draw.text((220 + (j + 1) * cell, 4), m.label[:18], fill=(0, 0, 0), font=font)
    for row_no, (i, r) in enumerate(chunk):
        y = 24 + row_no * (cell + 4)
        name = (r.file.name + (f" face {r.face + 1}" if r.face else ""))[:34]
        draw.text((4, y + cell // 2 - 6), name, fill=(0, 0, 0), font=font)
        first = next((r.crops[m.label] for m in models if m.label in r.crops), None)
        if first is not None:
            sheet.paste(Image.fromarray(first).resize((cell, cell)), (220, y))
        for j, m in enumerate(models):
            if (i, m.label) in maps:
                x = 220 + (j + 1) * cell
                sheet.paste(Image.fromarray(maps[(i, m.label)]).resize((cell, cell)), (x, y))
                draw.text((x + 2, y + cell - 14), r.preds[m.label][0][0], fill=(255, 255, 255), font=font)
    return sheet


def summary_lines(p: Prediction) -> list[str]:
    """What the CLI prints after a prediction: accuracy with its interval where labels are known, flags."""
    out = []
    for m in p.models:
        right, n = p.accuracy[m.label]
        if n:
            lo, hi = wilson(right, n)
            out.append(
                f"{m.label}: accuracy {right / n:.3f} (95% CI {lo:.3f}-{hi:.3f}; {right} of {n} labelled inputs right)"
            )
        if p.unusual[m.label]:
            out.append(
                f"{m.label}: {p.unusual[m.label]} of {sum(m.label in r.preds for r in p.rows)} predictions flagged as "
                "unlike its training data (column *_unusual); treat them with caution"
            )
    return out
