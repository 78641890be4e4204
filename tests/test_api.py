"""The Python API and the inference floor: names, ferlab.analyze, calibration, precision choice, evaluate's maps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import ferlab
from ferlab.apps.evaluate import map_classes
from ferlab.apps.predict import GRID_PANELS, natural_key
from ferlab.core.errors import FerlabError
from ferlab.inference import model as inference
from ferlab.reporting.metrics import expected_calibration_error
from ferlab.training import precision
from ferlab.training.calibration import fit_temperature

from .conftest import cli, make_tree, only_run, read_csv, run_cli, train_tiny


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    data = make_tree(root / "d", per_class=12)
    r = train_tiny(data, root / "o", epochs=2)
    assert r.returncode == 0, r.stderr[-2000:]
    return only_run(root / "o") / "regularized-cnn" / "model.ckpt"


def test_an_existing_path_wins_over_a_name_and_unknown_names_list_the_shipped(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(inference, "PRETRAINED", {"fer2013": "fer2013.ckpt", "mine": "mine.ckpt"})
    monkeypatch.setattr(inference, "pretrained_path", lambda n: tiny_model if n == "mine" else None)
    assert inference.resolve("mine") == tiny_model
    (tmp_path / "mine").write_bytes(b"x")  # a file called like the shipped model, in the working folder
    monkeypatch.chdir(tmp_path)
    assert inference.resolve("mine") == Path("mine")
    with pytest.raises(
        FerlabError, match=r"No checkpoint file or shipped model called 'nope' \(shipped models: mine\)"
    ):
        inference.resolve("nope")


def test_analyze_takes_paths_arrays_pil_and_lists_and_matches_predict(tiny_model, tmp_path):
    files = sorted((Path(tiny_model).parents[3] / "d" / "circle").iterdir())[:3]
    r = cli("predict", "--checkpoint", str(tiny_model), *map(str, files), "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr[-2000:]
    want = [row["regularized-cnn_top3"] for row in read_csv(tmp_path / "p" / "prediction_results.csv")]

    def top3(face: dict) -> str:
        return " ".join(f"{c}:{p:.3f}" for c, p in sorted(face["probabilities"].items(), key=lambda kv: -kv[1])[:3])

    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    one = ferlab.analyze(str(files[0]), model=str(tiny_model))
    assert isinstance(one, list) and top3(one[0]) == want[0] and one[0]["face_found"] is False
    assert abs(sum(one[0]["probabilities"].values()) - 1) < 1e-4
    assert [top3(f[0]) for f in ferlab.analyze(list(map(str, files)), model=str(tiny_model))] == want
    assert [top3(f[0]) for f in ferlab.analyze(arrays, model=str(tiny_model))] == want
    bgr = [a[..., ::-1].copy() for a in arrays]
    assert [top3(f[0]) for f in ferlab.analyze(bgr, model=str(tiny_model), bgr=True)] == want
    assert top3(ferlab.analyze(Image.open(files[1]), model=str(tiny_model))[0]) == want[1]


@pytest.mark.parametrize(
    "image,message",
    [
        (np.zeros((32, 32, 3), np.float64), "the image is a float64 array; pass uint8 pixels"),
        (np.zeros((2, 3, 32, 32), np.uint8), "the image is an array of shape (2, 3, 32, 32); pass H x W x 3"),
        ([np.zeros((32, 32, 3), np.uint8), "nowhere.png"], "image 1 of the list: the file nowhere.png does not exist."),
        (42, "the image is of type int; pass a file path, a PIL image or a uint8 NumPy array"),
        ("face_crop", "face_crop must be None, 'off', 'auto' or 'on', not 'maybe'."),
        (Path(__file__).parent, "the image: " + str(Path(__file__).parent) + " is a folder; pass an image file"),
    ],
)
def test_analyze_mistakes_are_one_sentence(tiny_model, image, message):
    assert ferlab.FerlabError is FerlabError  # `except ferlab.FerlabError` works without another import
    with pytest.raises(FerlabError) as e:
        if isinstance(image, str) and image == "face_crop":
            ferlab.analyze(np.zeros((32, 32, 3), np.uint8), model=str(tiny_model), face_crop="maybe")
        else:
            ferlab.analyze(image, model=str(tiny_model))
    assert message in str(e.value)


def test_analyze_with_a_face_required_refuses_a_photo_without_one(tiny_model):
    photo = np.full((600, 800, 3), 127, np.uint8)  # a photo-sized image for a model of 40 px crops: detection runs
    faces = ferlab.analyze(photo, model=str(tiny_model))
    assert faces[0]["face_found"] is False and faces[0]["box"] is None
    with pytest.raises(FerlabError, match="No face found in the image."):
        ferlab.analyze(photo, model=str(tiny_model), require_face=True)
    with pytest.raises(
        FerlabError, match="No model file or shipped model|No checkpoint file or shipped model called 'nope'"
    ):
        ferlab.analyze(photo, model="nope")


def test_temperature_scaling_fixes_overconfident_logits():
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2000,))
    clean = torch.nn.functional.one_hot(labels, 4).float() * 1.5 + torch.randn(2000, 4)  # ~70% right
    logits = clean * 4  # the same ranking, four times too sure
    t = fit_temperature(logits, labels)
    assert 2.0 < t < 6.0  # the noisy logits were not calibrated at x1 either
    before = expected_calibration_error(logits.softmax(1), labels)
    after = expected_calibration_error((logits / t).softmax(1), labels)
    assert after < before / 3


def test_class_names_meet_through_synonyms_and_maps():
    mapping, notes = map_classes(
        ["anger", "happiness", "sadness", "surprised", "contempt"],
        ["angry", "happy", "sad", "surprise", "fear"],
        {"contempt": "angry"},
        [],
    )
    assert mapping == {
        "anger": "angry",
        "happiness": "happy",
        "sadness": "sad",
        "surprised": "surprise",
        "contempt": "angry",
    }
    assert "anger -> angry" in notes
    with pytest.raises(FerlabError, match=r"The data has classes the model does not know: contempt \(it knows"):
        map_classes(["anger", "contempt"], ["angry", "happy"], {}, [])
    assert map_classes(["anger", "contempt"], ["angry", "happy"], {}, ["contempt"])[0] == {"anger": "angry"}


@pytest.mark.slow
def test_evaluate_maps_drops_says_baselines_and_warns_of_training_overlap(tiny_model, tmp_path):
    data = Path(tiny_model).parents[3] / "d"
    other = tmp_path / "other"
    for cls, name in (("circle", "Circle"), ("square", "square"), ("triangle", "triangle")):
        (other / name).mkdir(parents=True)
        for f in sorted((data / cls).iterdir())[:4]:
            (other / name / f.name).write_bytes(f.read_bytes())
    (other / "hexagon").mkdir()
    (other / "hexagon" / "h.png").write_bytes(f.read_bytes())
    (other / "ring").mkdir()
    (other / "ring" / "r.png").write_bytes(f.read_bytes())
    (other / "square" / "broken.png").write_bytes(b"not a png")
    r = run_cli("evaluate", str(tiny_model), str(other), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "does not know: hexagon, ring" in r.stderr and "map them with --class-map" in r.stderr
    r = run_cli(
        "evaluate", str(tiny_model), str(other), "--drop-classes", "hexagon", "hexagn", "--class-map", "ring=circle"
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert (
        f"--drop-classes names hexagn, which is not a class folder of {other} "
        "(classes: Circle, hexagon, ring, square, triangle)." in r.stderr
    )
    r = run_cli(
        "evaluate", str(tiny_model), str(other), "--class-map", "ring=circle", "--drop-classes", "hexagon",
        "--out", str(tmp_path / "e"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mapped classes: Circle -> circle, ring -> circle" in r.stderr and "dropped classes: hexagon" in r.stderr
    assert f"{tiny_model} (regularized-cnn): accuracy " in r.stdout  # the model as the user named it
    assert "chance 0.3333, majority class (circle) 0.3846" in r.stdout  # 5 of 13
    assert "were among this model's own training images" in r.stderr  # these files trained it
    assert "warning: 1 of 14 files could not be read as images and were left out" in r.stderr
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["overlap"]["train"] + m["overlap"]["val"] >= 8 and (tmp_path / "e" / "reliability.png").is_file()
    listed = read_csv(tmp_path / "e" / "overlap_files.csv")  # the overlap, named, and the accuracy without it
    assert len(listed) == m["overlap"]["train"] + m["overlap"]["val"] == 13 - m["unseen"]["n"]
    predictions = {row["file"]: row for row in read_csv(tmp_path / "e" / "predictions.csv")}
    fresh = [row for f, row in predictions.items() if f not in {x["file"] for x in listed}]
    assert m["unseen"]["correct"] == sum(row["true"] == row["predicted"] for row in fresh)
    if m["unseen"]["n"]:
        assert f"without them the accuracy is {m['unseen']['accuracy']:.4f} (n={m['unseen']['n']})" in r.stderr
    else:
        assert "no image is left without them" in r.stderr


def test_natural_order():
    names = ["img10.png", "img2.png", "img1.png", "IMG3.png"]
    assert sorted(names, key=lambda n: natural_key(Path(n))) == ["img1.png", "img2.png", "IMG3.png", "img10.png"]


@pytest.mark.slow
def test_predict_pages_the_grid_and_shows_truth_only_when_known(tiny_model, tmp_path):
    many = make_tree(tmp_path / "many", per_class=(GRID_PANELS + 12) // 3)  # a page and 12 more panels
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted(many.glob("*/*.png"))):
        (flat / f"img{i}.png").write_bytes(f.read_bytes())
    r = run_cli("predict", "--checkpoint", str(tiny_model), str(flat), "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_csv(tmp_path / "p" / "prediction_results.csv")
    assert [Path(row["filename"]).name for row in rows[:3]] == ["img0.png", "img1.png", "img2.png"]
    assert [Path(row["filename"]).name for row in rows][10] == "img10.png"
    pages = sorted((tmp_path / "p").glob("prediction_grid*.png"))
    assert [p.name for p in pages] == ["prediction_grid.png", "prediction_grid_2.png"]
    from ferlab.apps.predict import grid_size

    assert Image.open(pages[0]).size == grid_size(GRID_PANELS, 1, truth=False)  # no "true: ?" line without labels
    assert Image.open(pages[1]).size == grid_size(12, 1, truth=False)
    assert f"and {tmp_path / 'p' / 'prediction_grid.png'}, {tmp_path / 'p' / 'prediction_grid_2.png'}\n" in r.stdout


# ------------------------------------------------------------------------------------------- precision auto


def test_auto_precision_is_measured_once_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FERLAB_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(precision, "native_bf16", lambda: True)  # whatever CPU runs the test
    monkeypatch.setattr(precision, "time_steps", lambda net, size, batch: calls.append(size) or ([0.3] * 3, [0.1] * 3))
    first = precision.choose("regularized-cnn", 3, 32, 16)
    assert (first.precision, first.speedup, first.cached) == ("bf16-mixed", 3.0, False) and calls == [32]
    again = precision.choose("regularized-cnn", 3, 32, 16)
    assert again.cached and again.precision == "bf16-mixed" and calls == [32]  # no second timing
    assert "bf16 mixed precision 3.0x faster than fp32" in again.message("regularized-cnn")
    monkeypatch.setattr(precision, "fingerprint", lambda: "another CPU | avx2 | 2 threads | torch x")
    monkeypatch.setattr(precision, "time_steps", lambda net, size, batch: calls.append(size) or ([0.1] * 3, [0.2] * 3))
    other = precision.choose("regularized-cnn", 3, 32, 16)
    assert other.precision == "32" and calls == [32, 32]  # a new machine measures again
    forced = precision.choose("regularized-cnn", 3, 32, 16, precision="bf16-mixed")
    assert forced.measured == "forced" and calls == [32, 32]
    cache = json.loads((tmp_path / "precision.json").read_text())
    assert len(cache) == 2


def test_rounds_that_disagree_give_fp32_and_nothing_cached(tmp_path, monkeypatch):
    """A busy machine can turn bf16's speedup upside down: when the rounds' interval straddles the 10% margin the
    verdict is fp32 for this run, said so, and measured again next time."""
    monkeypatch.setenv("FERLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    monkeypatch.setattr(precision, "time_steps", lambda net, size, batch: ([0.3, 0.1, 0.25], [0.1, 0.2, 0.1]))
    choice = precision.choose("regularized-cnn", 3, 32, 16)
    assert (choice.precision, choice.measured, choice.low, choice.high) == ("32", "undecided", 0.5, 3.0)
    assert "ran 0.50-3.00x fp32's speed over the timed rounds" in choice.message("regularized-cnn")
    assert "fp32 this time, measured again next time" in choice.message("regularized-cnn")
    assert not (tmp_path / "precision.json").exists()


def test_a_recorded_precision_is_trained_with_the_measurement_behind_it_when_this_machine_has_it(tmp_path, monkeypatch):
    """A run's config.yaml records auto's decision per model; a re-run trains that arithmetic, whatever this
    machine would measure now."""
    monkeypatch.setenv("FERLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    monkeypatch.setattr(precision, "time_steps", lambda net, size, batch: ([0.3] * 3, [0.1] * 3))
    assert precision.choose("regularized-cnn", 3, 32, 16).precision == "bf16-mixed"  # measured and cached
    monkeypatch.setattr(precision, "time_steps", lambda *a: pytest.fail("a recorded precision was measured again"))
    same = precision.choose("regularized-cnn", 3, 32, 16, recorded="bf16-mixed")
    assert same.precision == "bf16-mixed" and "bf16 mixed precision 3.0x faster" in same.message("regularized-cnn")
    other = precision.choose("regularized-cnn", 3, 32, 16, recorded="32")
    assert (other.precision, other.measured) == ("32", "recorded")
    assert other.message("m") == (
        "ferlab: precision 32 for m, as decided before training (train.precision_by_model in the run's config.yaml)"
    )


def test_the_probe_times_a_network_at_the_side_it_trains_at(tmp_path, monkeypatch):
    """emotion-transfer shrinks its input to its source's side, and is timed there; a backbone that enlarges it
    (VGG16 at 224) is timed at the data's side, which costs a step seconds less."""
    monkeypatch.setenv("FERLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    seen = []

    def timed(net, size, batch):
        seen.append((size, net.normalize.size))
        return [0.3] * 3, [0.1] * 3

    monkeypatch.setattr(precision, "time_steps", timed)
    precision.choose("emotion-transfer", 6, 100, 32, side=48)
    precision.choose("vgg16-transfer", 6, 100, 32, side=224)
    precision.choose("emotion-transfer", 6, 100, 32)  # no resize: another measurement
    assert seen == [(100, 48), (100, None), (100, None)]
    (machine,) = json.loads((tmp_path / "precision.json").read_text()).values()
    assert sorted(machine) == [
        "emotion-transfer 100px batch 32",
        "emotion-transfer 100px batch 32 at 48px",
        "vgg16-transfer 100px batch 32",
    ]


def test_the_speedup_interval_is_the_rounds_range_then_drops_the_extremes():
    assert precision.interval([1.3, 0.9, 1.2]) == (0.9, 1.3)
    assert precision.interval([1.5, 0.2, 1.4, 1.3, 1.2, 1.3, 1.4, 9.0, 1.25]) == (1.2, 1.5)
    assert precision.straddles([1.3, 1.05, 1.2]) and not precision.straddles([1.3, 1.15, 1.2])


def test_measuring_the_precision_leaves_the_callers_random_stream_alone(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("FERLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    monkeypatch.setattr(precision, "time_steps", lambda net, size, batch: ([0.1 + float(torch.rand(1))], [0.1]))
    torch.manual_seed(5)
    want = torch.rand(4)
    torch.manual_seed(5)
    assert not precision.choose("regularized-cnn", 3, 32, 16).cached  # measured: a net built, inputs drawn
    assert torch.equal(torch.rand(4), want)


@pytest.mark.slow
def test_a_cpu_without_native_bf16_trains_in_fp32_without_timing_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FERLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    monkeypatch.setattr(precision, "time_steps", lambda *a: pytest.fail("bf16 was timed on a CPU without it"))
    choice = precision.choose("vgg16-transfer", 6, 100, 32)
    assert choice.precision == "32" and "no native bf16 arithmetic" in choice.message("vgg16-transfer")
    assert not (tmp_path / "precision.json").exists()  # a rule, not a measurement: nothing to cache


def test_the_chosen_precision_lands_in_the_run_and_the_checkpoint(tmp_path):
    data = make_tree(tmp_path / "d", per_class=8)
    r = train_tiny(data, tmp_path / "o")
    assert r.returncode == 0 and "ferlab: precision " in r.stderr, r.stderr[-2000:]
    run = only_run(tmp_path / "o")
    chosen = json.loads((run / "run.json").read_text())["precision"]["regularized-cnn"]
    assert chosen.startswith("precision ") and "measured" in chosen
    card = inference.load_model(run / "regularized-cnn" / "model.ckpt").card
    assert card["training"]["precision"] in ("32", "bf16-mixed") and card["training"]["precision_note"] == chosen
    assert card["training"]["precision"] in chosen and card["training"]["config"]["precision"] == "auto"
    # the run's config records the arithmetic auto chose, so re-running it trains the same
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["precision_by_model"] == {"regularized-cnn": card["training"]["precision"]}
    assert card["training"]["config"]["precision_by_model"] == config["train"]["precision_by_model"]


def test_summary_takes_a_checkpoint_as_well_as_a_name(tiny_model):
    by_file = cli("summary", str(tiny_model))
    by_name = cli("summary", "regularized-cnn", "--num-classes", "3", "--image-size", "32")
    assert by_file.returncode == 0 and by_name.returncode == 0, by_file.stderr
    assert by_file.stdout.splitlines()[-4:] == by_name.stdout.splitlines()[-4:]  # the same totals
    assert "314,819" in by_file.stdout
    r = cli("summary", "no-such-model")
    assert r.returncode == 2 and "No checkpoint file or shipped model called 'no-such-model'" in r.stderr


def test_small_batches_run_on_one_thread_and_large_ones_on_every_thread():
    """A face or a few run on one intra-op thread (spinning threads collapse when other work shares the CPU);
    a large batch keeps every thread; the process's setting is restored either way."""
    from ferlab.inference import model as inference

    m = inference.load_model("fer2013", cache=False)
    seen = []
    m.runtime.net.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    torch.set_num_threads(2)
    try:
        m.runtime.logits(torch.zeros(1, 3, 48, 48, dtype=torch.uint8))
        m.runtime.logits(torch.zeros(inference.SMALL_BATCH + 1, 3, 48, 48, dtype=torch.uint8))
        assert seen == [1, 2]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
