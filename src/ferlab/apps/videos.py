"""Many videos in one command: a folder of videos (or several files), each video in one process at a time,
shared out over processes, GPUs or nodes by Lightning's prediction loop, with one summary at the end.

    ferlab predict recordings/ --fps 4 --out recordings-emotions/
    ferlab predict recordings/ --accelerator cpu --devices 4 --strategy ddp --out recordings-emotions/

Each video gets its own folder under ``--out`` (named after the file, as :mod:`ferlab.apps.video` writes it for
one video), and ``videos_summary.csv`` has one row per video in the order given: frames read and classified,
faces, tracks, seconds, the main emotion and the share of each emotion over all its faces' sampled frames, or
why the video could not be read (reported once; the other videos go on).
"""

from __future__ import annotations

import glob
import sys
from pathlib import Path

from ferlab.apps.predict import folder_files, natural_key
from ferlab.apps.video import VIDEO_SUFFIXES, check_options, is_video, one_model, run_video
from ferlab.core.config import is_distributed
from ferlab.core.errors import FerlabError
from ferlab.core.files import plural, write_csv
from ferlab.data.images import IMAGE_SUFFIXES


def find_videos(inputs: list[str]) -> list[Path]:
    """The videos ``inputs`` name: video files, and the videos in folders (searched recursively, by file name
    extension) and glob patterns; none when they name none. Images and videos are predicted by separate
    commands, so inputs that hold both are refused."""
    videos: list[Path] = []
    images: list[Path] = []
    for item in inputs:
        p = Path(item)
        if any(ch in item for ch in "*?["):
            files = sorted((Path(f) for f in glob.glob(item, recursive=True)), key=natural_key)
        elif p.is_dir():
            files = folder_files(p)
        else:
            if is_video(p):  # a file named on the command line: by its first bytes too
                videos.append(p)
            elif p.suffix.lower() in IMAGE_SUFFIXES or p.is_file():
                images.append(p)
            continue
        videos += [f for f in files if f.suffix.lower() in VIDEO_SUFFIXES]
        images += [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if videos and images:
        raise FerlabError(
            f"The inputs hold images ({images[0]}) and videos ({videos[0]}); predict them with separate commands."
        )
    return list(dict.fromkeys(videos))


def folder_names(videos: list[Path]) -> list[str]:
    """Each video's output folder name: its file name without the extension, numbered where two are alike."""
    names: list[str] = []
    for v in videos:
        name, k = v.stem, 2
        while name in names:
            name, k = f"{v.stem}-{k}", k + 1
        names.append(name)
    return names


def run_videos(
    checkpoints: list[str],
    videos: list[Path],
    out: Path,
    every: int | None = None,
    fps: float | None = None,
    smooth: float = 0.5,
    face_crop: str | None = None,
    engine=None,
) -> list[str] | None:
    """Every video into its folder under ``out`` and ``videos_summary.csv``; the lines to print (None on the ranks
    other than 0 of a distributed run: rank 0 writes the summary). ``engine``: a distributed
    :class:`ferlab.training.sharded.Engine`, or None for this process alone."""
    check_options(every, fps, smooth)
    classes = one_model(checkpoints).classes  # a wrong checkpoint: one sentence before any video is read
    names = folder_names(videos)
    out.mkdir(parents=True, exist_ok=True)

    options = (every, fps, smooth, face_crop)

    def work(indices: list[int]) -> list[dict]:
        return [one_video(checkpoints, videos[i], out / names[i], options, classes) for i in indices]

    if engine is not None and is_distributed(engine):
        from ferlab.training.sharded import map_sharded  # Lightning only where the videos are shared out

        chunks = map_sharded(len(videos), work, engine, chunk=1)  # one video per process at a time
        if chunks is None:
            return None
        rows = [row for _, done in sorted(chunks, key=lambda c: c[0]) for row in done]
    else:
        rows = work(list(range(len(videos))))
    columns = ["video", "output", "frames_read", "frames_classified", "faces", "tracks", "seconds", "main_emotion"]
    write_csv(out / "videos_summary.csv", rows, [*columns, *(f"share_{c}" for c in classes), "error"])
    failed = sum(bool(r["error"]) for r in rows)
    total = {k: sum(r.get(k) or 0 for r in rows) for k in ("frames_classified", "faces", "tracks")}
    return [
        f"{plural(len(rows) - failed, 'video')} predicted"
        + (f", {failed} could not be read" if failed else "")
        + f": {total['frames_classified']} frames classified, {plural(total['faces'], 'face')} in "
        f"{plural(total['tracks'], 'track')}; one folder per video and {out / 'videos_summary.csv'}"
    ]


def one_video(checkpoints: list[str], path: Path, where: Path, options: tuple, classes: list[str]) -> dict:
    """One video's summary row; a video that cannot be read is one warning and a row that says why."""
    row: dict = {"video": str(path), "output": "", "error": ""}
    try:
        r = run_video(checkpoints, str(path), where, *options, progress_lines=False)
    except FerlabError as e:
        print(f"ferlab: warning: {e}", file=sys.stderr, flush=True)
        return {**row, "error": str(e)}
    print(f"ferlab: {path}: {r.lines[0]}", file=sys.stderr, flush=True)
    seen = sum(r.labels.values())
    shares = {f"share_{c}": round(r.labels.get(c, 0) / seen, 4) if seen else 0.0 for c in classes}
    return {
        **row,
        "output": str(where),
        "frames_read": r.frames_read,
        "frames_classified": r.frames_classified,
        "faces": r.faces,
        "tracks": r.tracks,
        "seconds": round(r.seconds, 2),
        "main_emotion": max(r.labels, key=r.labels.get) if seen else "",
        **shares,
    }
