"""Inference speed on this machine: PyTorch against ONNX Runtime (fp32 and int8), photos and videos.

usage:
    python benchmarks/infer_bench.py [--models fer2013 regularized-cnn ...] [--video] [--json out.json]
    python benchmarks/infer_bench.py --busy 2        # one photo and one face, quiet and beside 2 neighbours

Per model, each runtime in the same process, interleaved rounds, medians: the latency of one face (a model
input already cropped: what "classify a face" costs) and the throughput of 64-face batches. A registry name
is timed with random weights at its study size (100 px; the VGG-style nets at 48); ``fer2013`` is the shipped
model. int8 is ONNX Runtime's dynamic quantization of the exported graph. Then, for the first model, the whole
photo path (decode a 640x480 JPEG, detect the face, crop, classify: ``ferlab.analyze``), and with ``--video``
frames per second over a generated 640x480 video with one face, every frame and with ``--every 5``.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import LoadMeter  # noqa: E402

from ferlab.apps.export import export_onnx, quantize_int8  # noqa: E402
from ferlab.data.images import Preprocess  # noqa: E402
from ferlab.inference.model import load_model  # noqa: E402
from ferlab.models.checkpoint import save_checkpoint  # noqa: E402
from ferlab.models.registry import REGISTRY, create_model  # noqa: E402

SIZES = {"vgg-small": 48, "vgg-medium": 48}


def model_file(name: str, tmp: Path) -> str:
    if name not in REGISTRY:
        return name  # a shipped model's name or a checkpoint path
    size = SIZES.get(name, 100)
    torch.manual_seed(0)
    net = create_model(name, 7, size, "none", 224 if REGISTRY[name].transfer else None).eval()
    path = tmp / f"{name}.ckpt"
    save_checkpoint(path, net, name, [f"c{i}" for i in range(7)], Preprocess(image_size=size))
    return str(path)


def timed(fn, x: torch.Tensor, rounds: int) -> float:
    fn(x)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_model(name: str, tmp: Path, rounds: int) -> list[dict]:
    ck = model_file(name, tmp)
    torch_model = load_model(ck)
    size = torch_model.pre.image_size
    onnx_path = tmp / f"{Path(ck).stem}.onnx"
    export_onnx(ck, str(onnx_path))
    int8_path = tmp / f"{Path(ck).stem}-int8.onnx"
    quantize_int8(onnx_path, int8_path)
    runtimes = {
        "pytorch": torch_model,
        "onnxruntime fp32": load_model(onnx_path),
        "onnxruntime int8": load_model(int8_path),
    }
    one = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
    batch = torch.randint(0, 256, (64, 3, size, size), dtype=torch.uint8)
    lat = {k: [] for k in runtimes}
    thr = {k: [] for k in runtimes}
    for _ in range(3):  # interleaved: a busy machine slows every runtime alike
        for k, m in runtimes.items():
            lat[k].append(timed(m.probabilities, one, rounds))
            thr[k].append(64 / timed(m.probabilities, batch, max(3, rounds // 5)))
    rows = []
    for k in runtimes:
        rows.append(
            {
                "model": name,
                "runtime": k,
                "input": f"{size}x{size}" + (" (TTA: x2)" if torch_model.card["model_args"].get("tta") else ""),
                "latency_1_face_ms": 1000 * statistics.median(lat[k]),
                "batch64_faces_per_s": statistics.median(thr[k]),
            }
        )
        print(
            f"{name:22s} {k:17s} {rows[-1]['input']:16s} 1 face {rows[-1]['latency_1_face_ms']:7.2f} ms   "
            f"batch-64 {rows[-1]['batch64_faces_per_s']:8.0f} faces/s",
            flush=True,
        )
    return rows


def photo_bytes() -> bytes:
    ck = HERE.parent.parent / "shared" / "datasets" / "ckplus48" / "happy"
    canvas = Image.new("RGB", (640, 480), (110, 120, 135))
    faces = sorted(ck.glob("*.png"))
    if faces:
        canvas.paste(Image.open(faces[-1]).convert("RGB").resize((200, 200)), (220, 120))
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bench_photo(name: str, tmp: Path, rounds: int) -> dict:
    import ferlab

    ck = model_file(name, tmp)
    data = photo_bytes()
    ferlab.analyze(Image.open(io.BytesIO(data)), model=ck)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        faces = ferlab.analyze(Image.open(io.BytesIO(data)), model=ck)
        times.append(time.perf_counter() - t)
    out = {"model": name, "photo_ms": 1000 * statistics.median(times), "faces": len(faces)}
    print(
        f"photo 640x480 JPEG, decode + detect + crop + classify ({name}): {out['photo_ms']:.1f} ms, "
        f"{len(faces)} face(s)"
    )
    return out


def bench_video(name: str, tmp: Path) -> list[dict]:
    import cv2

    from ferlab.apps.video import run_video

    face = np.asarray(Image.open(io.BytesIO(photo_bytes())).convert("RGB"))
    path = tmp / "one-face.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (640, 480))
    for i in range(150):  # 6 s at 25 fps, the face drifting
        writer.write(cv2.cvtColor(np.roll(face, 2 * i, axis=1), cv2.COLOR_RGB2BGR))
    writer.release()
    ck = model_file(name, tmp)
    rows = []
    for every in (1, 5):
        r = run_video([ck], str(path), tmp / f"video-{every}", every=every)
        video_fps = r.frames_read / r.seconds
        rows.append(
            {"model": name, "every": every, "classified_fps": r.frames_classified / r.seconds, "video_fps": video_fps}
        )
        print(
            f"video 640x480, one face, every {every}: {r.frames_classified / r.seconds:.1f} classified frames/s, "
            f"{video_fps:.1f} video frames/s ({r.frames_classified} of {r.frames_read} frames in {r.seconds:.1f} s)"
        )
    return rows


def neighbour(stop) -> None:  # a training-like job: PyTorch matmuls on two threads, until told to stop
    torch.set_num_threads(2)
    a = torch.randn(512, 512)
    while not stop.is_set():
        a = (a @ a).clamp_(-1, 1)


def bench_busy(neighbours: int, rounds: int) -> list[dict]:
    """One photo through ``ferlab.analyze`` and one face through the model, quiet and then beside
    ``neighbours`` spawned PyTorch processes, with ferlab's small-batch thread policy (one intra-op thread for
    at most ``SMALL_BATCH`` images) and without it (every thread), interleaved; medians in ms."""
    import multiprocessing

    import ferlab
    from ferlab.inference import model as inference

    data = photo_bytes()
    model = load_model("fer2013")
    face = torch.randint(0, 256, (1, 3, 48, 48), dtype=torch.uint8)
    policies = {"one thread for small batches": inference.SMALL_BATCH, "every thread": 0}
    rows = []
    ctx = multiprocessing.get_context("spawn")  # forked children of a process running torch/ORT deadlock
    for load in ("quiet", f"{neighbours} neighbours"):
        stop, procs = ctx.Event(), []
        if load != "quiet":
            procs = [ctx.Process(target=neighbour, args=(stop,)) for _ in range(neighbours)]
            for p in procs:
                p.start()
            time.sleep(3)  # let them reach full speed
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(rounds):
            for policy, small in policies.items():
                inference.SMALL_BATCH = small
                for what, fn in (
                    ("photo", lambda: ferlab.analyze(Image.open(io.BytesIO(data)), model=model)),
                    ("face", lambda: model.runtime.logits(face)),
                ):
                    t = time.perf_counter()
                    fn()
                    times.setdefault((policy, what), []).append(1000 * (time.perf_counter() - t))
        stop.set()
        for p in procs:
            p.join()
        for (policy, what), ts in times.items():
            rows.append({"load": load, "policy": policy, "what": what, "ms": statistics.median(ts[1:])})
    inference.SMALL_BATCH = policies["one thread for small batches"]
    print(f"{'load':<14} {'policy':<30} {'photo ms':>9} {'face ms':>8}")
    for load in dict.fromkeys(r["load"] for r in rows):
        for policy in policies:
            ms = {r["what"]: r["ms"] for r in rows if r["load"] == load and r["policy"] == policy}
            print(f"{load:<14} {policy:<30} {ms['photo']:9.1f} {ms['face']:8.2f}")
    for policy in policies:
        q, b = (next(r["ms"] for r in rows if r["load"] == ld and r["policy"] == policy and r["what"] == "photo")
                for ld in ("quiet", f"{neighbours} neighbours"))  # fmt: skip
        print(f"photo, busy / quiet, {policy}: {b / q:.2f}x")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["fer2013", "regularized-cnn", "baseline-cnn", "vgg-small"])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--video", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--busy", type=int, metavar="N", help="only the load test: quiet, then beside N neighbours")
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.busy:
        rows = bench_busy(args.busy, args.rounds)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return
    result: dict = {"rows": []}
    meter = LoadMeter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in args.models:
            result["rows"] += bench_model(name, tmp, args.rounds)
        result["photo"] = bench_photo(args.models[0], tmp, args.rounds)
        if args.video:
            result["video"] = bench_video(args.models[0], tmp)
    result["machine"] = meter.measure()
    print(meter.verdict())
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
