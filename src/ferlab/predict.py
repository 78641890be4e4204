"""Predict new images with one or more checkpoints; a CSV and a labelled picture grid.

    ferlab predict --checkpoint runs/x/regularized-cnn/model.ckpt --checkpoint runs/x/vgg16-transfer/model.ckpt \\
        photos/ 'more/*.jpg' --out predictions/

Each checkpoint rebuilds its own model and preprocessing (input size, face-crop policy), so an image is
prepared for every model exactly as that model's training images were. The correct class is the parent
folder's name when it is one of the classes, or comes from ``--labels`` (a CSV of filename,label).
"""

from __future__ import annotations

import csv
import glob
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ferlab.checkpoint import load_checkpoint
from ferlab.data import IMAGE_SUFFIXES, BadImage, NoFace, Preprocess, decode, open_rgb, to_tensor, write_csv
from ferlab.errors import FerlabError
from ferlab.train import run_batches

GRID_PANELS = 48  # the picture grid shows at most this many rows of the table


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (searched recursively) and glob patterns, in a stable order, without repeats."""
    found: list[Path] = []
    for item in inputs:
        if any(ch in item for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise FerlabError(f"The pattern {item} matches no files.")
            found += [p for p in matches if p.is_file()]
        elif Path(item).is_dir():
            files = sorted(p for p in Path(item).rglob("*") if p.is_file() and not p.name.startswith("."))
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
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
    except OSError as e:
        raise FerlabError(f"Cannot read the labels file {path} ({e.strerror}).") from None
    if rows and rows[0][:2] == ["filename", "label"]:
        rows = rows[1:]
    if not rows or any(len(r) < 2 for r in rows):
        raise FerlabError(f"The labels file {path} must have two columns, filename and label.")
    return {r[0]: r[1] for r in rows}


@dataclass
class Model:
    label: str
    net: torch.nn.Module
    card: dict

    @property
    def pre(self) -> Preprocess:
        return self.card["preprocess_obj"]


@dataclass
class Row:
    file: Path
    face: int  # 0-based face index with --all-faces, else 0
    box: tuple[int, int, int, int] | None
    true: str
    preds: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # model -> top-3 (class, prob)
    notes: dict[str, str] = field(default_factory=dict)  # model -> why it has no prediction


def load_models(checkpoints: list[str]) -> list[Model]:
    models, seen = [], {}
    for ck in checkpoints:
        net, card = load_checkpoint(ck)
        label = card["model"]
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # two checkpoints of one architecture: numbered in the order given
            label = f"{label}#{seen[label]}"
        models.append(Model(label, net, card))
    return models


def predict(
    models: list[Model], files: list[Path], labels: dict[str, str] | None = None, all_faces: bool = False
) -> tuple[list[Row], list[dict]]:
    """Rows of predictions and the list of skipped inputs (file, model, reason)."""
    if all_faces:
        for m in models:
            if m.pre.face_crop == "off":
                raise FerlabError(
                    f"--all-faces needs models trained with --face-crop auto or on; {m.label} was "
                    "trained on whole images."
                )
    classes = models[0].card["classes"]
    skipped: list[dict] = []
    rows: dict[tuple[Path, int], Row] = {}
    unreadable: set[Path] = set()

    def truth(f: Path) -> str:
        if labels is not None:
            return labels.get(f.name, labels.get(str(f), ""))
        return f.parent.name if f.parent.name in classes else ""

    for m in models:
        decoded, keys = [], []
        for f in files:
            if f in unreadable:
                continue
            try:
                faces_of_f = decode(f, m.pre, all_faces=all_faces)
            except NoFace as e:  # readable, but this model was trained with --face-crop on
                skipped.append({"file": str(f), "model": m.label, "reason": str(e)})
                rows.setdefault((f, 0), Row(f, 0, None, truth(f))).notes[m.label] = str(e)
                continue
            except BadImage as e:  # unusable for every model: listed once
                unreadable.add(f)
                skipped.append({"file": str(f), "model": "", "reason": str(e)})
                continue
            for i, d in enumerate(faces_of_f):
                key = (f, i)
                if key not in rows:
                    rows[key] = Row(f, i, d.box, truth(f))
                decoded.append(d.image)
                keys.append(key)
        if not decoded:
            continue
        probs = run_batches(m.net, to_tensor(decoded, m.pre.image_size)).softmax(1)
        top = probs.topk(min(3, probs.shape[1]), dim=1)
        names = m.card["classes"]
        for key, vals, idx in zip(keys, top.values.tolist(), top.indices.tolist()):
            rows[key].preds[m.label] = [(names[i], v) for i, v in zip(idx, vals)]
    ordered = sorted(rows.values(), key=lambda r: (files.index(r.file), r.face))
    return ordered, skipped


def write_table(rows: list[Row], models: list[Model], path: Path, all_faces: bool) -> None:
    cols = ["filename", *(["face", "box"] if all_faces else []), "correct_class"]
    for m in models:
        cols += [f"{m.label}_predicted", f"{m.label}_confidence", f"{m.label}_top3"]
    out = []
    for r in rows:
        rec = {"filename": str(r.file), "correct_class": r.true}
        if all_faces:
            rec.update(face=r.face, box=" ".join(map(str, r.box)) if r.box else "")
        for m in models:
            top = r.preds.get(m.label)
            rec[f"{m.label}_predicted"] = top[0][0] if top else ""
            rec[f"{m.label}_confidence"] = round(top[0][1], 4) if top else ""
            rec[f"{m.label}_top3"] = " ".join(f"{c}:{p:.3f}" for c, p in top) if top else r.notes.get(m.label, "")
        out.append(rec)
    write_csv(path, out, cols)


PANEL, LINE, COLUMNS = 240, 16, 6  # panel width and picture side, text line height, panels per row
COLOURS = {"right": (0, 130, 0), "wrong": (200, 0, 0), "unknown": (0, 0, 0), "none": (130, 130, 130)}


def grid_size(panels: int, models: int) -> tuple[int, int]:
    cols = min(COLUMNS, max(1, panels))
    return cols * PANEL, math.ceil(panels / cols) * (PANEL + LINE * (2 + models) + 8)


def draw_grid(rows: list[Row], models: list[Model], path: Path) -> int:
    """The picture grid: each panel is an image (face box drawn) over its name, the correct class and every
    model's prediction: green when right, red when wrong, black when the correct class is unknown.
    Returns the number of panels (at most ``GRID_PANELS``)."""
    rows = rows[:GRID_PANELS]
    width, height = grid_size(len(rows), len(models))
    panel_h = PANEL + LINE * (2 + len(models)) + 8
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    side = PANEL - 16
    for k, r in enumerate(rows):
        x0, y0 = (k % COLUMNS) * PANEL + 8, (k // COLUMNS) * panel_h + 4
        im = open_rgb(r.file, models[0].pre.max_pixels)  # upright, as the face boxes were found
        scale = side / max(im.size)
        thumb = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
        ox, oy = x0 + (side - thumb.width) // 2, y0 + (side - thumb.height) // 2
        sheet.paste(thumb, (ox, oy))
        if r.box:
            bx, by, bw, bh = (v * scale for v in r.box)
            draw.rectangle([ox + bx, oy + by, ox + bx + bw, oy + by + bh], outline=(255, 220, 0), width=2)
        name = r.file.name + (f" (face {r.face + 1})" if r.face else "")
        lines = [(name, COLOURS["unknown"]), (f"true: {r.true or '?'}", COLOURS["unknown"])]
        for m in models:
            top = r.preds.get(m.label)
            if not top:
                lines.append((f"{m.label}: -", COLOURS["none"]))
                continue
            verdict = "unknown" if not r.true else ("right" if top[0][0] == r.true else "wrong")
            label, verdict_text = m.label, f": {top[0][0]} {top[0][1]:.2f}"
            while draw.textlength(label + verdict_text, font=font) > PANEL - 12 and len(label) > 6:
                label = label[:-4] + "..."  # shorten the model's name, never the prediction
            lines.append((label + verdict_text, COLOURS[verdict]))
        for i, (text, colour) in enumerate(lines):
            while draw.textlength(text, font=font) > PANEL - 12 and len(text) > 4:
                text = text[:-4] + "..."
            draw.text((x0, y0 + side + 4 + i * LINE), text, fill=colour, font=font)
    tmp = path.with_name(path.name + ".tmp.png")
    sheet.save(tmp)
    tmp.replace(path)
    return len(rows)


def run_predict(
    checkpoints: list[str], inputs: list[str], out: Path, labels: str | None = None, all_faces: bool = False
) -> tuple[list[Row], list[dict]]:
    models = load_models(checkpoints)
    files = expand_inputs(inputs)
    rows, skipped = predict(models, files, read_labels(labels) if labels else None, all_faces)
    if not rows:
        first = skipped[0] if skipped else {"file": "-", "reason": "no input"}
        raise FerlabError(
            f"None of the {len(files)} inputs could be predicted (first: {first['file']}: {first['reason']})."
        )
    out.mkdir(parents=True, exist_ok=True)
    write_table(rows, models, out / "prediction_results.csv", all_faces)
    write_csv(out / "skipped_files.csv", skipped, ["file", "model", "reason"])
    draw_grid(rows, models, out / "prediction_grid.png")
    return rows, skipped
