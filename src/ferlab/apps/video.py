"""Emotions over a video: every face found, tracked, classified and smoothed, frame after frame.

    ferlab predict interview.mp4 --every 5 --smooth 1.0 --out interview/
    ferlab predict --checkpoint runs/x/vgg-small/model.ckpt webcam.webm --fps 4

Frames are read one at a time with OpenCV (``--every N`` frames, or ``--fps F`` per second), so memory does
not grow with the video. Each sampled frame goes through the model's own preprocessing (:mod:`ferlab.inference`:
face detection and crop as its card says), faces are tied to tracks by box overlap (IoU) from one sampled
frame to the next (a scene cut, where the whole frame changes, ends every track: the face at the same place
after a cut is somebody else), and each track's probabilities are smoothed with an exponential moving average of time
constant ``--smooth`` seconds. Written into the output folder:

* ``video_frames.csv``: time, frame, track, box, label (smoothed), probabilities (smoothed and raw);
* ``video_summary.csv``: per track, its span and the share of its time in each emotion;
* ``annotated.mp4``: the sampled frames with each face's box, track and label;
* ``timeline_track<k>.png``: a track's emotion probabilities over time.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # a damaged video gets one warning line, not FFmpeg's

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ferlab.core.errors import FerlabError  # noqa: E402
from ferlab.core.files import (  # noqa: E402
    plural,
    read_csv,
    save_figure,  # noqa: E402
    write_csv,
)
from ferlab.data.faces import iou  # noqa: E402
from ferlab.data.images import NoFace  # noqa: E402
from ferlab.inference.model import (
    Model,  # noqa: E402
    load_models,  # noqa: E402
)

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".avi", ".webm", ".mkv", ".mpg", ".mpeg", ".wmv"}
TRACK_IOU = 0.3  # a face continues a track when its box overlaps the track's last box this much
TRACK_GAP = 1.0  # seconds a track may go unseen before a face is a new track (at least 1.5 sampling intervals)
# a scene cut: the mean absolute change of hue, saturation and value (OpenCV's 8-bit HSV) from the last sampled
# frame is over this; PySceneDetect's ContentDetector default. A face moving or changing expression changes a
# few percent of the frame and stays far below it.
CUT = 27.0


def _hsv(rgb: np.ndarray) -> np.ndarray:
    """The frame, shrunk to 160 px wide, in HSV: what :data:`CUT` compares."""
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (160, max(1, round(160 * h / w))), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_RGB2HSV).astype(np.int16)


def is_video(path: str | Path) -> bool:
    """A video file, by its first bytes (MP4/MOV, AVI, WebM/Matroska, MPEG) or its extension."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        head = f.read(16)
    return (
        (head[4:8] == b"ftyp" and head[8:12] not in (b"heic", b"heix", b"avif", b"avis", b"mif1", b"msf1"))
        or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
        or head[:4] == b"\x1a\x45\xdf\xa3"
        or head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")
        or p.suffix.lower() in VIDEO_SUFFIXES
    )


@dataclass
class Track:
    ident: int
    box: tuple[int, int, int, int]
    seen: float
    probs: np.ndarray
    labels: dict[str, int] = field(default_factory=dict)
    first: float = 0.0
    frames: int = 0


@dataclass
class VideoResult:
    frames_read: int
    frames_classified: int
    faces: int
    tracks: int
    seconds: float
    lines: list[str]


def _colour(k: int) -> tuple[int, int, int]:
    return [(216, 107, 46), (32, 45, 217), (80, 161, 18), (8, 71, 181), (248, 90, 122), (147, 147, 14)][k % 6]


def run_video(
    checkpoints: list[str],
    path: str,
    out: Path,
    every: int | None = None,
    fps: float | None = None,
    smooth: float = 0.5,
    face_crop: str | None = None,
) -> VideoResult:
    models = load_models(checkpoints)
    if len(models) > 1:
        raise FerlabError("A video is predicted with one model at a time; pass a single --checkpoint.")
    model: Model = models[0]
    if every is not None and fps is not None:
        raise FerlabError("Give --every or --fps, not both.")
    if every is not None and every < 1:
        raise FerlabError(f"--every must be at least 1, got {every}.")
    if fps is not None and fps <= 0:
        raise FerlabError(f"--fps must be positive, got {fps}.")
    if smooth < 0:
        raise FerlabError(f"--smooth must be 0 (off) or more seconds, got {smooth}.")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise FerlabError(f"{path} holds no video stream OpenCV can read.")
    src_fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    if not (0 < src_fps < 1000):
        src_fps = 25.0
    expected = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    step = every or (max(1, round(src_fps / fps)) if fps else 1)
    track_gap = max(TRACK_GAP, 1.5 * step / src_fps)  # sparse sampling must not end every track
    # faces, not whole frames: a model trained on whole images keeps its own policy
    policy = face_crop or ("off" if model.pre.face_crop == "off" and model.pre.faces == "photos" else "on")
    out.mkdir(parents=True, exist_ok=True)
    classes = model.classes
    columns = ["time", "frame", "track", "x", "y", "w", "h", "label", *classes, *(f"raw_{c}" for c in classes)]
    frames_tmp = out / "video_frames.csv.tmp"
    video_tmp = out / "annotated.tmp.mp4"
    writer = None
    tracks: dict[int, Track] = {}
    finished: list[Track] = []
    next_id, frame_no, classified, faces_total, cuts = 1, -1, 0, 0, 0
    last_hsv: np.ndarray | None = None
    t0 = time.perf_counter()
    progress = _Progress(expected // step if expected else 0)
    decode_error = False
    try:
        with open(frames_tmp, "w", newline="") as fh:
            rows = csv.writer(fh, lineterminator="\n")
            rows.writerow(columns)
            while True:
                frame_no += 1
                if frame_no % step:
                    if not cap.grab():
                        break
                    continue
                try:
                    ok, bgr = cap.read()
                except cv2.error:
                    ok, decode_error = False, True
                if not ok or bgr is None:
                    break
                now = frame_no / src_fps
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                try:
                    crops = model.prepare(Image.fromarray(rgb), all_faces=True, face_crop=policy)
                except NoFace:  # a frame without a face
                    crops = []
                faces = model.classify(crops)
                boxes = [f.box or (0, 0, rgb.shape[1], rgb.shape[0]) for f in faces]  # whole frames track as one
                classified += 1
                faces_total += len(faces)
                hsv = _hsv(rgb)
                if last_hsv is not None and last_hsv.shape == hsv.shape and float(np.abs(hsv - last_hsv).mean()) > CUT:
                    finished += tracks.values()  # a new shot: its faces start new tracks
                    tracks.clear()
                    cuts += 1
                last_hsv = hsv
                # tie faces to tracks, best overlaps first
                for k in [k for k, t in tracks.items() if now - t.seen > track_gap]:
                    finished.append(tracks.pop(k))
                pairs = sorted(
                    ((iou(b, t.box), i, k) for i, b in enumerate(boxes) for k, t in tracks.items()), reverse=True
                )
                owner: dict[int, int] = {}
                taken: set[int] = set()
                for overlap, i, k in pairs:
                    if overlap >= TRACK_IOU and i not in owner and k not in taken:
                        owner[i] = k
                        taken.add(k)
                for i, (f, box) in enumerate(zip(faces, boxes)):
                    raw = np.array([f.probabilities[c] for c in classes])
                    if i in owner:
                        t = tracks[owner[i]]
                        alpha = 1.0 if smooth == 0 else 1 - math.exp(-(now - t.seen) / smooth)
                        t.probs = (1 - alpha) * t.probs + alpha * raw
                        t.box, t.seen = box, now
                    else:
                        t = Track(next_id, box, now, raw, first=now)
                        tracks[next_id] = t
                        next_id += 1
                    label = classes[int(np.argmax(t.probs))]
                    t.labels[label] = t.labels.get(label, 0) + 1
                    t.frames += 1
                    rows.writerow(
                        [round(now, 3), frame_no, t.ident, *box, label]
                        + [round(float(v), 5) for v in t.probs]
                        + [round(float(v), 5) for v in raw]
                    )
                    _draw(bgr, box, f"{t.ident}: {label} {t.probs.max():.2f}", _colour(t.ident))
                if writer is None:
                    h, w = bgr.shape[:2]
                    writer = cv2.VideoWriter(str(video_tmp), cv2.VideoWriter_fourcc(*"mp4v"), src_fps / step, (w, h))
                    if not writer.isOpened():
                        raise FerlabError("OpenCV cannot write MP4 (mp4v) video here; the annotated video needs it.")
                writer.write(bgr)
                progress.tick(classified, time.perf_counter() - t0)
    except BaseException:
        frames_tmp.unlink(missing_ok=True)
        video_tmp.unlink(missing_ok=True)
        raise
    finally:
        cap.release()
        progress.done()
        if writer is not None:
            writer.release()
    seconds = time.perf_counter() - t0
    if classified == 0:
        frames_tmp.unlink(missing_ok=True)
        video_tmp.unlink(missing_ok=True)
        raise FerlabError(f"{path} holds no frame that could be decoded; nothing was written.")
    os.replace(frames_tmp, out / "video_frames.csv")
    os.replace(video_tmp, out / "annotated.mp4")
    finished += tracks.values()
    summary = []
    for t in sorted(finished, key=lambda t: t.ident):
        summary.append(
            {
                "track": t.ident,
                "first_time": round(t.first, 3),
                "last_time": round(t.seen, 3),
                "frames": t.frames,
                "main_emotion": max(t.labels, key=t.labels.get),
                **{f"share_{c}": round(t.labels.get(c, 0) / t.frames, 4) for c in classes},
            }
        )
    write_csv(
        out / "video_summary.csv",
        summary,
        ["track", "first_time", "last_time", "frames", "main_emotion", *(f"share_{c}" for c in classes)],
    )
    plot_timelines(out, classes)
    lines = [
        f"{classified} of {plural(frame_no, 'frame')} classified ({classified / max(seconds, 1e-9):.1f} frames/s), "
        f"{plural(faces_total, 'face')} in {plural(len(summary), 'track')} ({plural(cuts, 'scene cut')}); "
        f"{out / 'video_frames.csv'}, {out / 'video_summary.csv'}, {out / 'annotated.mp4'}"
    ]
    read_frames = frame_no
    if decode_error or (expected and read_frames < expected - step):
        print(
            f"ferlab: warning: {path} stopped being decodable after frame {read_frames} of {expected}; "
            "the results cover what could be read.",
            file=sys.stderr,
        )
    return VideoResult(read_frames, classified, faces_total, len(summary), seconds, lines)


def _draw(bgr: np.ndarray, box: tuple[int, int, int, int], text: str, colour: tuple[int, int, int]) -> None:
    x, y, w, h = box
    thick = max(2, bgr.shape[1] // 320)
    cv2.rectangle(bgr, (x, y), (x + w, y + h), colour, thick)
    scale = max(0.5, bgr.shape[1] / 1280)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    top = y - th - 8 if y > th + 8 else y + h
    cv2.rectangle(bgr, (x, top), (x + tw + 6, top + th + 8), colour, -1)
    cv2.putText(bgr, text, (x + 3, top + th + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)


def plot_timelines(out: Path, classes: list[str]) -> None:
    """timeline_track<k>.png for every track seen in at least two sampled frames (read back from the CSV)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_track: dict[str, list[dict]] = {}
    for row in read_csv(out / "video_frames.csv"):
        by_track.setdefault(row["track"], []).append(row)
    for track, rows in by_track.items():
        if len(rows) < 2:
            continue
        times = [float(r["time"]) for r in rows]
        fig, ax = plt.subplots(figsize=(8, 3.2))
        for c in classes:
            ax.plot(times, [float(r[c]) for r in rows], label=c)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("probability (smoothed)")
        ax.set_ylim(0, 1)
        ax.set_title(f"track {track}: emotions over time")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=len(classes), loc="upper center", bbox_to_anchor=(0.5, -0.22))
        fig.tight_layout()
        save_figure(fig, out / f"timeline_track{track}.png")


class _Progress:
    """A tqdm bar with frames/s on a terminal; otherwise a line every 10%."""

    def __init__(self, total: int):
        self.bar = None
        self.total, self.next = total, 0.1
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total or None, unit="frame", file=sys.stderr)

    def tick(self, n: int, seconds: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
        elif self.total and n / self.total >= self.next:
            print(f"  {n} of {self.total} frames, {n / max(seconds, 1e-9):.1f} frames/s", file=sys.stderr, flush=True)
            self.next += 0.1

    def done(self) -> None:
        if self.bar is not None:
            self.bar.close()
