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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # a damaged video gets one warning line, not FFmpeg's

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ferlab.core.errors import FerlabError  # noqa: E402
from ferlab.core.files import (  # noqa: E402
    atomic,
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
    labels: dict[str, int] = field(default_factory=dict)  # face-frames per (smoothed) emotion


class Tracker:
    """Faces tied to tracks by box overlap (IoU) from one sampled frame to the next, each track's probabilities
    smoothed with an exponential moving average of time constant ``smooth`` seconds (0: off)."""

    def __init__(self, classes: list[str], smooth: float, gap: float):
        self.classes, self.smooth, self.gap = classes, smooth, gap
        self.tracks: dict[int, Track] = {}
        self.finished: list[Track] = []
        self.next_id, self.cuts = 1, 0
        self.last_hsv: np.ndarray | None = None

    def update(
        self, now: float, rgb: np.ndarray, boxes: list[tuple[int, int, int, int]], raws: list[np.ndarray]
    ) -> list[tuple[Track, str]]:
        """Each face's track and smoothed label in the sampled frame ``rgb`` at ``now`` seconds."""
        self._end_at_cut(rgb)
        for k in [k for k, t in self.tracks.items() if now - t.seen > self.gap]:
            self.finished.append(self.tracks.pop(k))
        owner = self._match(boxes)
        return [self._follow(owner.get(i), now, box, raw) for i, (box, raw) in enumerate(zip(boxes, raws))]

    def _end_at_cut(self, rgb: np.ndarray) -> None:
        hsv = _hsv(rgb)
        last = self.last_hsv
        if last is not None and last.shape == hsv.shape and float(np.abs(hsv - last).mean()) > CUT:
            self.finished += self.tracks.values()  # a new shot: its faces start new tracks
            self.tracks.clear()
            self.cuts += 1
        self.last_hsv = hsv

    def _match(self, boxes: list[tuple[int, int, int, int]]) -> dict[int, int]:
        """Face index -> track id: tie faces to tracks, best overlaps first."""
        pairs = sorted(
            ((iou(b, t.box), i, k) for i, b in enumerate(boxes) for k, t in self.tracks.items()), reverse=True
        )
        owner: dict[int, int] = {}
        taken: set[int] = set()
        for overlap, i, k in pairs:
            if overlap >= TRACK_IOU and i not in owner and k not in taken:
                owner[i] = k
                taken.add(k)
        return owner

    def _follow(self, k: int | None, now: float, box: tuple[int, int, int, int], raw: np.ndarray) -> tuple[Track, str]:
        """Track ``k`` moved to ``box`` with its probabilities smoothed, or a new track when ``k`` is None."""
        if k is not None:
            t = self.tracks[k]
            alpha = 1.0 if self.smooth == 0 else 1 - math.exp(-(now - t.seen) / self.smooth)
            t.probs = (1 - alpha) * t.probs + alpha * raw
            t.box, t.seen = box, now
        else:
            t = Track(self.next_id, box, now, raw, first=now)
            self.tracks[self.next_id] = t
            self.next_id += 1
        label = self.classes[int(np.argmax(t.probs))]
        t.labels[label] = t.labels.get(label, 0) + 1
        t.frames += 1
        return t, label

    def all_tracks(self) -> list[Track]:
        """Every track, ended or not, in order of appearance."""
        return sorted([*self.finished, *self.tracks.values()], key=lambda t: t.ident)


class _SampledFrames:
    """Every ``step``-th frame of an open video as (frame number, BGR image); the frames between are grabbed, not
    decoded. ``read`` is the number of frames read once the stream has ended."""

    def __init__(self, cap: cv2.VideoCapture, fps: float, step: int):
        self.cap, self.fps, self.step = cap, fps, step
        self.read = 0
        self.decode_error = False

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        frame_no = -1
        while True:
            frame_no += 1
            self.read = frame_no
            if frame_no % self.step:
                if not self.cap.grab():
                    return
                continue
            try:
                ok, bgr = self.cap.read()
            except cv2.error:
                ok, self.decode_error = False, True
            if not ok or bgr is None:
                return
            yield frame_no, bgr


class _FrameOutputs:
    """video_frames.csv (a row per face) and the annotated video (a frame per sampled frame), written as they come;
    the video is opened at the first frame's size. Both are closed when the ``with`` block ends."""

    def __init__(self, csv_path: Path, video_path: Path, fps: float, classes: list[str]):
        self.file = open(csv_path, "w", newline="")  # noqa: SIM115 (closed by __exit__)
        self.rows = csv.writer(self.file, lineterminator="\n")
        self.rows.writerow(
            ["time", "frame", "track", "x", "y", "w", "h", "label", *classes, *(f"raw_{c}" for c in classes)]
        )
        self.video_path, self.fps = video_path, fps
        self.writer: cv2.VideoWriter | None = None

    def __enter__(self) -> _FrameOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.release()

    def face(self, bgr: np.ndarray, now: float, frame_no: int, t: Track, label: str, raw: np.ndarray) -> None:
        self.rows.writerow(
            [round(now, 3), frame_no, t.ident, *t.box, label]
            + [round(float(v), 5) for v in t.probs]
            + [round(float(v), 5) for v in raw]
        )
        _draw(bgr, t.box, f"{t.ident}: {label} {t.probs.max():.2f}", _colour(t.ident))

    def frame(self, bgr: np.ndarray) -> None:
        if self.writer is None:
            h, w = bgr.shape[:2]
            self.writer = cv2.VideoWriter(str(self.video_path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self.writer.isOpened():
                raise FerlabError("OpenCV cannot write MP4 (mp4v) video here; the annotated video needs it.")
        self.writer.write(bgr)


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
    progress_lines: bool = True,
) -> VideoResult:
    model = one_model(checkpoints)
    check_options(every, fps, smooth)
    cap, src_fps, expected = _open_video(path)
    step = every or (max(1, round(src_fps / fps)) if fps else 1)
    frames = _SampledFrames(cap, src_fps, step)
    # sparse sampling must not end every track
    tracker = Tracker(model.classes, smooth, max(TRACK_GAP, 1.5 * step / src_fps))
    # faces, not whole frames: a model trained on whole images keeps its own policy
    policy = face_crop or ("off" if model.pre.face_crop == "off" and model.pre.faces == "photos" else "on")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    progress = _Progress(expected // step if expected else 0, progress_lines)
    # both files appear only once the whole video is done
    try:
        with atomic(out / "annotated.mp4") as video_tmp, atomic(out / "video_frames.csv") as frames_tmp:
            with _FrameOutputs(frames_tmp, video_tmp, src_fps / step, model.classes) as outputs:
                classified, faces = _classify_frames(model, policy, frames, tracker, outputs, progress)
            seconds = time.perf_counter() - t0
            if classified == 0:
                raise FerlabError(f"{path} holds no frame that could be decoded; nothing was written.")
    finally:
        cap.release()
        progress.done()
    n_tracks = _write_summary(out / "video_summary.csv", tracker.all_tracks(), model.classes)
    plot_timelines(out, model.classes)
    lines = [
        f"{classified} of {plural(frames.read, 'frame')} classified ({classified / max(seconds, 1e-9):.1f} frames/s), "
        f"{plural(faces, 'face')} in {plural(n_tracks, 'track')} ({plural(tracker.cuts, 'scene cut')}); "
        f"{out / 'video_frames.csv'}, {out / 'video_summary.csv'}, {out / 'annotated.mp4'}"
    ]
    if frames.decode_error or (expected and frames.read < expected - step):
        print(
            f"ferlab: warning: {path} stopped being decodable after frame {frames.read} of {expected}; "
            "the results cover what could be read.",
            file=sys.stderr,
        )
    labels: dict[str, int] = {}
    for t in tracker.all_tracks():
        for label, n in t.labels.items():
            labels[label] = labels.get(label, 0) + n
    return VideoResult(frames.read, classified, faces, n_tracks, seconds, lines, labels)


def one_model(checkpoints: list[str]) -> Model:
    models = load_models(checkpoints)
    if len(models) > 1:
        raise FerlabError("A video is predicted with one model at a time; pass a single --checkpoint.")
    return models[0]


def check_options(every: int | None, fps: float | None, smooth: float) -> None:
    if every is not None and fps is not None:
        raise FerlabError("Give --every or --fps, not both.")
    if every is not None and every < 1:
        raise FerlabError(f"--every must be at least 1, got {every}.")
    if fps is not None and fps <= 0:
        raise FerlabError(f"--fps must be positive, got {fps}.")
    if smooth < 0:
        raise FerlabError(f"--smooth must be 0 (off) or more seconds, got {smooth}.")


def _open_video(path: str) -> tuple[cv2.VideoCapture, float, int]:
    """The capture, its frame rate (25 when the file does not say) and its frame count (0 when unknown)."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise FerlabError(f"{path} holds no video stream OpenCV can read.")
    src_fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    if not (0 < src_fps < 1000):
        src_fps = 25.0
    return cap, src_fps, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)


def _classify_frames(
    model: Model, policy: str, frames: _SampledFrames, tracker: Tracker, outputs: _FrameOutputs, progress: _Progress
) -> tuple[int, int]:
    """Each sampled frame through the model and the tracker into the outputs; the frames classified and the faces
    found."""
    classified = faces_total = 0
    for frame_no, bgr in frames:
        now = frame_no / frames.fps
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        try:
            crops = model.prepare(Image.fromarray(rgb), all_faces=True, face_crop=policy)
        except NoFace:  # a frame without a face
            crops = []
        faces = model.classify(crops)
        boxes = [f.box or (0, 0, rgb.shape[1], rgb.shape[0]) for f in faces]  # whole frames track as one
        raws = [np.array([f.probabilities[c] for c in tracker.classes]) for f in faces]
        classified += 1
        faces_total += len(faces)
        for (t, label), raw in zip(tracker.update(now, rgb, boxes, raws), raws):
            outputs.face(bgr, now, frame_no, t, label, raw)
        outputs.frame(bgr)
        progress.tick(classified)
    return classified, faces_total


def _write_summary(path: Path, tracks: list[Track], classes: list[str]) -> int:
    """video_summary.csv: per track, its span and the share of its frames in each emotion; the number of tracks."""
    summary = [
        {
            "track": t.ident,
            "first_time": round(t.first, 3),
            "last_time": round(t.seen, 3),
            "frames": t.frames,
            "main_emotion": max(t.labels, key=t.labels.get),
            **{f"share_{c}": round(t.labels.get(c, 0) / t.frames, 4) for c in classes},
        }
        for t in tracks
    ]
    write_csv(
        path, summary, ["track", "first_time", "last_time", "frames", "main_emotion", *(f"share_{c}" for c in classes)]
    )
    return len(summary)


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

    def __init__(self, total: int, enabled: bool = True):
        self.bar = None
        self.total, self.next = (total if enabled else 0), 0.1
        self.t0 = time.perf_counter()
        if sys.stderr.isatty() and enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total or None, unit="frame", file=sys.stderr)

    def tick(self, n: int) -> None:
        seconds = time.perf_counter() - self.t0
        if self.bar is not None:
            self.bar.update(1)
        elif self.total and n / self.total >= self.next:
            print(f"  {n} of {self.total} frames, {n / max(seconds, 1e-9):.1f} frames/s", file=sys.stderr, flush=True)
            self.next += 0.1

    def done(self) -> None:
        if self.bar is not None:
            self.bar.close()
