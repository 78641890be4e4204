"""Explanations that pass the sanity checks, and emotion timelines of generated videos."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ferlab.apps.video import is_video
from ferlab.inference.explain import heatmaps
from ferlab.inference.model import load_model

from .conftest import CKPLUS, only_run, read_csv, requires_ckplus, run_cli

REGION = (2, 2, 12, 12)  # x, y, w, h: the only place where the two classes differ


def region_share(heat: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """The share of a heatmap's mass inside ``box`` (x, y, w, h): the sanity test's measure."""
    x, y, w, h = box
    total = float(heat.sum())
    return float(heat[y : y + h, x : x + w].sum()) / total if total > 0 else 0.0


def region_image(cls: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    a = rng.integers(40, 216, (size, size, 3)).astype(np.uint8)
    x, y, w, h = REGION
    a[y : y + h, x : x + w] = (235, 235, 235) if cls == 0 else (20, 20, 20)
    a[y : y + h, x : x + w] += rng.integers(0, 15, (h, w, 3)).astype(np.uint8)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def region_model(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    root = tmp_path_factory.mktemp("region")
    rng = np.random.default_rng(0)
    for cls, name in enumerate(("bright", "dark")):
        (root / "d" / name).mkdir(parents=True)
        for i in range(60):
            region_image(cls, rng).save(root / "d" / name / f"{i}.png")
    r = run_cli(
        "train", str(root / "d"), "--model", "regularized-cnn", "--image-size", "32", "--max-epochs", "6",
        "--no-progress", "--precision", "32", "--out", str(root / "o"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    crops = [np.asarray(region_image(i % 2, rng)) for i in range(16)]
    return only_run(root / "o") / "regularized-cnn" / "model.ckpt", crops


@pytest.mark.slow
def test_gradcam_looks_at_the_deciding_region_and_changes_with_random_weights(region_model):
    ck, crops = region_model
    model = load_model(ck)
    targets = [i % 2 for i in range(len(crops))]
    assert (model.probabilities(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)).argmax(1).tolist()) == targets
    maps = heatmaps(model, crops, targets, "gradcam")
    assert maps.shape == (16, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    x, y, w, h = REGION
    grown = (max(0, x - 2), max(0, y - 2), w + 4, h + 4)  # Grad-CAM's coarse map spills over the edge a little
    shares = [region_share(m, grown) for m in maps]
    assert np.median(shares) > 0.5, shares  # the region is 20% of the image
    occl = heatmaps(model, crops, targets, "occlusion")
    assert np.median([region_share(m, grown) for m in occl]) > 0.5
    # the model-parameter randomisation test (Adebayo et al. 2018): random weights, different maps (on a copy:
    # loaded models are shared within a process)
    import copy

    from ferlab.inference.model import Model, TorchRuntime

    randomised = copy.deepcopy(model.runtime.net)
    torch.manual_seed(1)
    for p in randomised.parameters():
        torch.nn.init.normal_(p, std=0.05)
    random_maps = heatmaps(Model("random", TorchRuntime(randomised), model.card), crops, targets, "gradcam")
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(maps, random_maps) if b.std() > 0]
    assert np.nanmedian(corr) < 0.5, corr


@pytest.mark.slow
def test_explaining_never_switches_the_shared_network(region_model):
    """The loaded network is shared process-wide (a server's other requests use it meanwhile): explaining takes
    one forward pass without mirroring, without switching the network's test-time mirroring off."""
    ck, crops = region_model
    model = load_model(ck)
    net = model.runtime.net
    seen: list[tuple[bool, int]] = []
    hook = net.body.register_forward_pre_hook(lambda _, args: seen.append((net.tta, len(args[0]))))
    tta, net.tta = net.tta, True
    try:
        maps = heatmaps(model, crops[:4], [0, 1, 0, 1], "gradcam")
        assert seen == [(True, 4)]  # one pass over the 4 crops, none over their mirror images
        occlusion = heatmaps(model, crops[:4], [0, 1, 0, 1], "occlusion")
    finally:
        hook.remove()
        net.tta = tta
    assert all(t for t, _ in seen) and maps.shape == occlusion.shape == (4, 32, 32)


@pytest.mark.slow
def test_predict_explain_writes_heatmaps_and_a_grid(region_model, tmp_path):
    ck, _ = region_model
    rng = np.random.default_rng(3)
    for i in range(3):
        region_image(i % 2, rng).save(tmp_path / f"img{i}.png")
    (tmp_path / "again").mkdir()
    region_image(1, rng).save(tmp_path / "again" / "img0.png")  # the same name in another folder
    r = run_cli(
        "predict",
        "--checkpoint",
        str(ck),
        *(str(tmp_path / f"img{i}.png") for i in range(3)),
        str(tmp_path / "again" / "img0.png"),
        "--explain",
        "--out",
        str(tmp_path / "p"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = sorted(p.name for p in (tmp_path / "p" / "explanations").iterdir())
    assert out == ["img0-2_regularized-cnn.png"] + [f"img{i}_regularized-cnn.png" for i in range(3)]
    grid = Image.open(tmp_path / "p" / "explanation_grid.png")
    assert grid.height >= 4 * 120
    # a new prediction into the same folder replaces the pictures: none of the old explanations stay beside it
    r = run_cli("predict", "--checkpoint", str(ck), str(tmp_path / "img1.png"), "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "prediction_grid.png",
        "prediction_results.csv",
        "skipped_files.csv",
    ]


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10) -> None:
    h, w = frames[0].shape[:2]
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for f in frames:
        out.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    out.release()


def ck_faces(cls: str, n: int, side: int) -> list[np.ndarray]:
    files = sorted((CKPLUS / cls).iterdir())[-n:]  # the last frames: the peak of the expression
    return [np.asarray(Image.open(f).convert("RGB").resize((side, side))) for f in files]


@pytest.fixture(scope="module")
def face_video(tmp_path_factory) -> Path:
    """40 frames at 10 fps: a CK+48 face drifting right, happy for 2 s then surprised for 2 s."""
    root = tmp_path_factory.mktemp("video")
    happy, surprise = ck_faces("happy", 1, 150)[0], ck_faces("surprise", 1, 150)[0]
    rng = np.random.default_rng(0)
    bg = rng.integers(90, 150, (480, 640, 3)).astype(np.uint8)
    frames = []
    for i in range(40):
        f = bg.copy()
        x = 120 + 6 * i
        f[150:300, x : x + 150] = happy if i < 20 else surprise
        frames.append(f)
    write_video(root / "faces.mp4", frames)
    return root / "faces.mp4"


@requires_ckplus
@pytest.mark.slow
def test_a_video_face_is_tracked_classified_and_its_change_seen(face_video, ck_model, tmp_path):
    ck = ck_model / "vgg-small" / "model.ckpt"
    assert is_video(face_video) and not is_video(sorted((CKPLUS / "happy").iterdir())[0])
    r = run_cli(
        "predict",
        "--checkpoint",
        str(ck),
        str(face_video),
        "--every",
        "2",
        "--smooth",
        "0.3",
        "--out",
        str(tmp_path / "v"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_csv(tmp_path / "v" / "video_frames.csv")
    assert [int(r["frame"]) for r in rows] == list(range(0, 40, 2))  # one row per sampled frame and face
    assert {r["track"] for r in rows} == {"1"}  # the drifting face keeps its track
    labels = [r["label"] for r in rows]
    assert labels[2] == "happy" and labels[-1] == "surprise"
    change = next(i for i, label in enumerate(labels) if label == "surprise")
    assert 9 <= change <= 13, labels  # the switch is at frame 20 (row 10); smoothing may delay it a little
    summary = read_csv(tmp_path / "v" / "video_summary.csv")
    assert len(summary) == 1 and 0.3 <= float(summary[0]["share_happy"]) <= 0.7
    cap = cv2.VideoCapture(str(tmp_path / "v" / "annotated.mp4"))
    assert cap.get(cv2.CAP_PROP_FRAME_COUNT) == 20
    assert (tmp_path / "v" / "timeline_track1.png").is_file()


@requires_ckplus
@pytest.mark.slow
def test_a_scene_cut_ends_every_track(ck_model, tmp_path):
    """After a cut, the face at nearly the same place is somebody else's: it must not inherit the track (and its
    smoothed emotion) of the face before the cut."""
    happy, surprise = ck_faces("happy", 1, 150)[0], ck_faces("surprise", 1, 150)[0]
    frames = []
    for i in range(20):
        f = np.full((480, 640, 3), (40, 90, 160) if i < 10 else (170, 150, 90), np.uint8)
        x = 200 if i < 10 else 215  # the boxes overlap far above TRACK_IOU across the cut
        f[150:300, x : x + 150] = happy if i < 10 else surprise
        frames.append(f)
    write_video(tmp_path / "cut.mp4", frames)
    ck = ck_model / "vgg-small" / "model.ckpt"
    r = run_cli(
        "predict", "--checkpoint", str(ck), str(tmp_path / "cut.mp4"), "--smooth", "5", "--out", str(tmp_path / "v")
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 tracks (1 scene cut)" in r.stdout, r.stdout
    rows = read_csv(tmp_path / "v" / "video_frames.csv")
    assert [r["track"] for r in rows] == ["1"] * 10 + ["2"] * 10
    assert rows[10]["label"] == "surprise"  # its own face from its first frame, nothing carried over


@pytest.mark.slow
def test_a_folder_of_videos_is_shared_out_one_video_per_process_into_one_summary(tmp_path, region_model):
    """--devices 2 --strategy ddp gives each process one video at a time: every video's folder is byte for byte a
    single process's, the summary has the same rows in the same order, and an unreadable video is reported once."""
    ck, _ = region_model
    rng = np.random.default_rng(3)
    folder = tmp_path / "videos"
    for name, n in (("clip0.mp4", 12), ("clip1.mp4", 8), ("clip2.mp4", 10), ("sub/clip0.mp4", 6)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        write_video(folder / name, [rng.integers(0, 256, (48, 64, 3)).astype(np.uint8) for _ in range(n)])
    (folder / "broken.mp4").write_text("no video here")
    args = ["predict", "--checkpoint", str(ck), str(folder), "--face-crop", "off", "--every", "2"]
    one = run_cli(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    assert "4 videos predicted, 1 could not be read: 18 frames classified, 18 faces in" in one.stdout, one.stdout
    two = run_cli(*args, "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in two.stderr and two.stdout.count("videos predicted") == 1  # rank 0 alone reports
    assert two.stderr.count("holds no video stream OpenCV can read") == 1
    rows = [read_csv(tmp_path / x / "videos_summary.csv") for x in ("one", "two")]
    for r in rows[0] + rows[1]:
        r.pop("seconds")
        r["output"] = Path(r["output"]).name
    assert rows[0] == rows[1]
    assert [(Path(r["video"]).name, r["output"], r["frames_classified"]) for r in rows[0]] == [
        ("broken.mp4", "", ""),
        ("clip0.mp4", "clip0", "6"),
        ("clip1.mp4", "clip1", "4"),
        ("clip2.mp4", "clip2", "5"),
        ("clip0.mp4", "clip0-2", "3"),
    ]
    assert "holds no video stream" in rows[0][0]["error"] and rows[0][1]["main_emotion"]
    assert abs(sum(float(v) for k, v in rows[0][1].items() if k.startswith("share_")) - 1) < 1e-3
    for name in ("clip0", "clip1", "clip2", "clip0-2"):
        a, b = (tmp_path / x / name / "video_frames.csv" for x in ("one", "two"))
        assert a.read_bytes() == b.read_bytes(), name


@pytest.mark.slow
def test_truncated_empty_and_non_videos(tmp_path, region_model):
    ck, _ = region_model
    frames = [np.full((120, 160, 3), 8 * i, np.uint8) for i in range(30)]
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(tmp_path / "whole.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
    for f in frames:
        writer.write(f)
    writer.release()
    data = (tmp_path / "whole.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    r = run_cli(
        "predict",
        "--checkpoint",
        str(ck),
        str(tmp_path / "cut.avi"),
        "--face-crop",
        "off",
        "--out",
        str(tmp_path / "cut"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("ferlab: warning:") == 1 and "stopped being decodable after frame" in r.stderr
    rows = read_csv(tmp_path / "cut" / "video_frames.csv")
    assert 0 < len(rows) < 30  # what could be read
    cv2.VideoWriter(str(tmp_path / "zero.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h)).release()
    r = run_cli("predict", "--checkpoint", str(ck), str(tmp_path / "zero.avi"), "--out", str(tmp_path / "zero"))
    assert r.returncode == 2 and "holds no frame that could be decoded; nothing was written." in r.stderr
    assert not (tmp_path / "zero" / "video_frames.csv").exists()
    (tmp_path / "notes.mp4").write_text("no video here")
    r = run_cli("predict", "--checkpoint", str(ck), str(tmp_path / "notes.mp4"), "--out", str(tmp_path / "n"))
    assert r.returncode == 2 and "holds no video stream OpenCV can read" in r.stderr and "Traceback" not in r.stderr
