"""Nothing lost: settings refused before any work, resume after SIGKILL, configs that re-run, DDP, odd files."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ferlab.core.config import DataConfig
from ferlab.data.datasets import load_data
from ferlab.data.images import Preprocess, decode, decode_many

from .conftest import CKPLUS, SHARED, cli, make_tree, only_run, read_csv, run_cli

TINY = ["--image-size", "32", "--no-progress"]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--max-epochs", "0"], "--max-epochs must be at least 1, got 0."),
        (["--max-epochs", "-3"], "--max-epochs must be at least 1, got -3."),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0."),
        (["--image-size", "8", "--models", "vgg-small"], "vgg-small needs an input of at least 16x16 pixels"),
        (["--image-size", "9", "--models", "regularized-cnn"], "regularized-cnn needs an input of at least 10x10"),
        (["--split", "0.5", "0.6", "0.1"], "--split fractions must add up to 1, got 0.5 0.6 0.1 = 1.2."),
        (["--split", "0.2", "0.7", "0.1"], "training should be the largest share"),
        (["--drop-classes", "squre"], "--drop-classes names squre, which is not a class folder"),
        (["--folds", "1"], "--folds must be 0 (one split) or at least 2, got 1."),
        (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1), got 1.5."),
        (["--class-balance", "-0.5"], "--class-balance must be in [0, 1], got -0.5."),
        (["--seed", "-1"], "--seed takes whole numbers from 0 to 4294967295 (NumPy's seed range), got -1."),
        (["--seed", "99999999999999999999"], "--seed takes whole numbers from 0 to 4294967295 (NumPy's seed range)"),
        (["--seeds", "0", "-1"], "--seeds takes whole numbers from 0 to 4294967295 (NumPy's seed range), got -1."),
    ],
)
def test_wrong_settings_are_refused_before_any_work(tmp_path, flags, message):
    data = make_tree(tmp_path / "d", per_class=6)
    t = time.perf_counter()
    r = cli("run", str(data), *TINY, *flags, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert message in r.stderr, r.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing half-written
    assert "ferlab: training" not in r.stderr
    assert time.perf_counter() - t < 120  # refused up front: seconds, not a training run


def test_labels_naming_a_class_the_model_lacks_is_refused(tmp_path):
    data = make_tree(tmp_path / "d", per_class=8)
    r = cli("train", str(data), "--model", "regularized-cnn", *TINY, "--max-epochs", "1", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-2000:]
    (ck,) = (tmp_path / "o").glob("*/regularized-cnn/model.ckpt")
    (tmp_path / "labels.csv").write_text("filename,label\ncircle_000.png,hexagon\n")
    r = cli("predict", "--checkpoint", str(ck), str(data / "circle"), "--labels", str(tmp_path / "labels.csv"))
    assert r.returncode == 2 and "The labels file names classes regularized-cnn does not know: hexagon" in r.stderr


def _run(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ferlab", *args],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def _tables(run: Path) -> dict[str, str]:
    """Every table of a run, without the columns that time things."""
    out = {}
    for f in sorted(run.rglob("*.csv")):
        rows = read_csv(f)
        out[str(f.relative_to(run))] = json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in rows])
    return out


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_gives_the_uninterrupted_tables(tmp_path):
    data = make_tree(tmp_path / "d", per_class=30)
    args = [
        "run", str(data), "--models", "regularized-cnn", "vgg-small", *TINY,
        "--max-epochs", "8", "--patience", "0", "--augment", "on", "--precision", "32",
    ]  # fmt: skip
    r = run_cli(*args, "--out", str(tmp_path / "whole"))
    assert r.returncode == 0, r.stderr[-2000:]
    log = tmp_path / "log.txt"
    proc = _run([*args, "--out", str(tmp_path / "killed")], log)
    deadline = time.time() + 600
    while log.read_text().count("epoch   4 (stage 1)") < 2:  # the second model is half-way through
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = only_run(tmp_path / "killed")
    assert json.loads((run / "status.json").read_text())["state"] == "running"
    assert (run / "vgg-small" / "training-state" / "stage1-last.ckpt").is_file()
    assert (run / "regularized-cnn" / "model.ckpt").is_file()
    r = run_cli("report", str(run))  # a killed run says what it is
    assert r.returncode == 2 and "ferlab run --resume" in r.stderr

    r = run_cli("run", "--resume", str(run), "--max-epochs", "5")
    assert r.returncode == 2 and "train.max_epochs: the run has 8, given 5" in r.stderr
    manifest = (run / "manifest.csv").read_bytes()
    extra = data / "circle" / "late.png"
    extra.write_bytes(next((data / "circle").iterdir()).read_bytes())
    r = cli("run", "--resume", str(run))  # the data changed under the run: its tables would mix two splits
    assert r.returncode == 2 and f"The data is not what {run} was split from: 1 new (first: {extra})" in r.stderr
    assert (run / "manifest.csv").read_bytes() == manifest and "Traceback" not in r.stderr
    extra.unlink()
    r = run_cli("run", "--resume", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "regularized-cnn: finished in an earlier run" in r.stderr
    assert "epoch   1 (stage 1)" not in r.stderr and "epoch   5 (stage 1)" in r.stderr  # continued, not restarted
    assert _tables(run) == _tables(only_run(tmp_path / "whole"))
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert not (run / "vgg-small" / "training-state").exists()


@pytest.mark.slow
def test_a_runs_config_reruns_it_to_identical_tables(tmp_path):
    data = make_tree(tmp_path / "d", per_class=10)
    r = run_cli(
        "run", str(data), "--models", "regularized-cnn", *TINY, "--max-epochs", "2", "--precision", "32",
        "--out", str(tmp_path / "a"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    first = only_run(tmp_path / "a")
    cfg = yaml.safe_load((first / "config.yaml").read_text())
    assert cfg["models"] == ["regularized-cnn"] and "dataset" not in cfg
    r = cli("run", "--config", str(first / "config.yaml"), "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert _tables(first) == _tables(only_run(tmp_path / "b"))


@pytest.mark.slow
def test_two_runs_started_together_get_two_folders_and_logs_have_one_line_per_epoch(tmp_path):
    data = make_tree(tmp_path / "d", per_class=10)
    args = ["train", str(data), "--model", "regularized-cnn", "--image-size", "32", "--max-epochs", "3"]
    procs = [_run([*args, "--out", str(tmp_path / "o")], tmp_path / f"log{i}.txt") for i in range(2)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    assert len(list((tmp_path / "o").iterdir())) == 2
    log = (tmp_path / "log0.txt").read_text()  # progress bars stay off when stderr is not a terminal
    assert "\r" not in log and sum(line.startswith("  epoch ") for line in log.splitlines()) == 3


def test_symlink_loops_and_dangling_links_are_listed_not_lost(tmp_path):
    data = make_tree(tmp_path / "d", per_class=10)
    (data / "circle" / "loop.png").symlink_to(data / "circle" / "loop.png")
    (data / "square" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    loaded = load_data(DataConfig(data=str(data), image_size=16))
    reasons = {Path(f).name: why for f, why in loaded.skipped}
    assert reasons == {"loop.png": "symbolic link loop", "gone.jpg": "broken symbolic link (its target does not exist)"}


@pytest.mark.skipif(
    not (SHARED / "datasets" / "fer2013").is_dir() or not CKPLUS.is_dir(), reason="needs ../shared/datasets"
)
def test_face_detection_is_deterministic_across_threads(tmp_path):
    from .test_faces import composed_photos

    paths = composed_photos(tmp_path, 12)
    pre = Preprocess(image_size=48, face_crop="auto", detector="yunet")
    runs = []
    for _ in range(3):
        from ferlab.data import images as data_module

        data_module._FACES.clear()
        decoded, _ = decode_many(paths * 3, pre)  # eight threads on the same files at once
        runs.append([d.box for d in decoded])
    assert runs[0] == runs[1] == runs[2] and any(b is not None for b in runs[0])


def test_an_extreme_aspect_image_is_skipped_or_decoded_never_fatal(tmp_path):
    Image.fromarray(np.full((3, 5000, 3), 128, np.uint8)).save(tmp_path / "strip.png")
    Image.fromarray(np.full((5000, 3, 3), 128, np.uint8)).save(tmp_path / "pole.png")
    for name in ("strip.png", "pole.png"):
        (d,) = decode(tmp_path / name, Preprocess(image_size=32, face_crop="auto", detector="yunet"))
        assert d.box is None and d.image.shape == (32, 32, 3)


@pytest.mark.slow
def test_two_process_ddp_run_through_the_cli(tmp_path):
    data = make_tree(tmp_path / "d", per_class=30)
    common = ["run", str(data), "--models", "regularized-cnn", *TINY, "--max-epochs", "6", "--precision", "32"]
    r = run_cli(*common, "--out", str(tmp_path / "one"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(*common, "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in r.stderr and len(list((tmp_path / "two").iterdir())) == 1  # rank 0 alone writes
    one, two = only_run(tmp_path / "one"), only_run(tmp_path / "two")
    a, b = (read_csv(x / "test_accuracy_comparison.csv")[0] for x in (one, two))
    assert list(a) == list(b) and b["n_test"] == a["n_test"]  # the test split is scored once, whole
    epochs = read_csv(two / "regularized-cnn" / "epochs.csv")
    assert len(epochs) == 6
    # validation accuracy is synchronised across the ranks over every validation image exactly once (a sampler
    # that pads the 9 images to 10 would count one twice): the kept epoch's accuracy under DDP is the saved
    # model's accuracy on the whole validation split in one process, to the last digit
    import torch

    from ferlab.core.config import StudyConfig, merge
    from ferlab.inference.model import run_batches
    from ferlab.models.checkpoint import load_checkpoint

    cfg = merge(StudyConfig(), yaml.safe_load((two / "config.yaml").read_text()))
    val = load_data(cfg.data, cfg.train.seed).splits["val"]
    net, _ = load_checkpoint(two / "regularized-cnn" / "model.ckpt")
    with torch.no_grad():
        right = int((run_batches(net, val.images).argmax(1) == val.labels).sum())
    assert len(val.labels) == 9 and abs(float(b["val_acc"]) - right / 9) < 1e-4  # 1/9 apart from any other count
    best = max(range(6), key=lambda i: (float(epochs[i]["val_acc"]), -i))  # the first of the best, as kept
    assert b["best_epoch"] == str(best + 1) and abs(float(epochs[best]["val_acc"]) - right / 9) < 1e-4


def test_ranks_started_by_torchrun_agree_on_a_new_run_folder_or_are_refused(tmp_path, monkeypatch):
    """Every rank torchrun starts computes the run folder alone: from --name, or the data's name and the
    launch's id; without either the ranks could not agree, and a folder holding an earlier run is not reused
    silently (it was: every such run went to <out>/distributed-run and skipped the last one's models)."""
    from ferlab.apps import study
    from ferlab.core.config import StudyConfig, merge

    data = make_tree(tmp_path / "d", per_class=10)
    out = tmp_path / "o"
    args = ["run", str(data), "--models", "regularized-cnn", *TINY, "--precision", "32", "--out", str(out)]
    ddp = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    monkeypatch.setattr(study, "share", lambda *a: None)  # nothing handed to ranks that will not start
    for var, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none"}.items():
        monkeypatch.setenv(var, value)
    r = cli(*args, *ddp)
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.strip() == (
        "ferlab: error: Started by torchrun without --standalone or --rdzv-id, the ranks cannot agree on a run "
        "folder; pass --name."
    )
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "4f1c")
    cfg = merge(StudyConfig(), {"out": str(out), "data": {"data": str(data)}})
    assert study.launched_run_dir(cfg, "d") == out / "d-4f1c" and (out / "d-4f1c").is_dir()
    (out / "d-4f1c" / "config.yaml").write_text("models: [regularized-cnn]\n")
    r = cli(*args, *ddp)
    assert r.returncode == 2 and f"{out / 'd-4f1c'} holds an earlier run; continue it with --resume" in r.stderr


def test_ddp_ranks_draw_their_own_augmentations_and_one_process_is_untouched():
    """Each rank reseeds torch per epoch from (seed, stage, epoch, rank): two ranks draw different augmentations
    and dropout masks, a rank draws the same in a resumed epoch, and one process keeps its stream."""
    from types import SimpleNamespace

    import torch

    from ferlab.core.config import TrainConfig
    from ferlab.training.fit import Classifier

    module = Classifier(torch.nn.Identity(), torch.nn.Linear(2, 2), 2, TrainConfig(seed=7), 1e-3, stage=2)

    def draws(world: int, rank: int, epoch: int) -> torch.Tensor:
        module._trainer = SimpleNamespace(world_size=world, global_rank=rank, current_epoch=epoch)
        torch.manual_seed(123)
        module.on_train_epoch_start()
        return torch.rand(5)

    assert not torch.equal(draws(2, 0, 3), draws(2, 1, 3))
    assert torch.equal(draws(2, 1, 3), draws(2, 1, 3)) and not torch.equal(draws(2, 1, 3), draws(2, 1, 4))
    alone = torch.manual_seed(123) and torch.rand(5)
    assert torch.equal(draws(1, 0, 3), alone)  # one process: the stream seeded 123, as it was


class Crash(Exception):
    """A crash injected right after a training-state write."""


@pytest.mark.parametrize("crash_after", [1, 2])
def test_a_fit_resumed_after_a_crash_stops_early_where_the_uninterrupted_fit_does(tmp_path, monkeypatch, crash_after):
    """Early stopping's patience travels in the training state with this epoch's verdict in it: a fit resumed
    from any written epoch stops at the same epoch, with the same best weights, as one never interrupted."""
    import torch

    from ferlab.core.config import StudyConfig, merge
    from ferlab.models.registry import create_model
    from ferlab.training import fit as train

    cfg = merge(
        StudyConfig(),
        {
            "data": {"data": str(make_tree(tmp_path / "d", per_class=30)), "image_size": 32},
            "train": {"max_epochs": 12, "patience": 2, "progress": False, "precision": "32"},
        },
    )
    data = load_data(cfg.data, 0)
    monkeypatch.setattr(train, "STATE_EVERY", 0)  # a state after every epoch, however fast the machine

    def fit(state_dir=None):
        torch.manual_seed(0)
        net = create_model("regularized-cnn", len(data.classes), 32, "none", None)
        return net, train.fit_model("regularized-cnn", net, data, cfg.train, state_dir)

    whole_net, whole = fit()
    stopped = len(whole.epochs)
    assert crash_after < stopped < 12  # early stopping fired, after the crash point: the case under test

    save = train.SaveState.on_train_epoch_end

    def save_then_crash(self, trainer, pl_module):
        save(self, trainer, pl_module)
        if trainer.current_epoch + 1 == crash_after:
            raise Crash

    monkeypatch.setattr(train.SaveState, "on_train_epoch_end", save_then_crash)
    state = tmp_path / "state"
    with pytest.raises(Crash):
        fit(state)
    assert (state / "stage1-last.ckpt").is_file() and not (state / "progress.json").exists()
    monkeypatch.setattr(train.SaveState, "on_train_epoch_end", save)
    net, resumed = fit(state)

    def table(r):
        return [{k: v for k, v in e.items() if k != "seconds"} for e in r.epochs]

    assert table(resumed) == table(whole) and resumed.best_epoch == whole.best_epoch
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), whole_net.state_dict().values()))


def test_ctrl_c_during_an_epoch_is_exit_130_and_a_resumable_status(tmp_path):
    """Lightning answers Ctrl-C inside fit with exit(1); ferlab answers it as before the first epoch: exit 130,
    one line, and status.json saying why and how to resume."""
    data = make_tree(tmp_path / "d", per_class=20)
    cmd = [sys.executable, "-m", "ferlab", "train", str(data), "--model", "vgg-small", *TINY, "--max-epochs", "500",
           "--precision", "32", "--patience", "0", "--out", str(tmp_path / "o")]  # fmt: skip
    # a shell's background job starts with Ctrl-C ignored, and Python then installs no handler for it: the child
    # gets the terminal's default, as a user's ferlab has it
    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "epoch   2" in line:  # mid-training: the next epoch has begun
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, "".join(lines) + rest
    assert "Traceback" not in rest
    assert "ferlab: interrupted; files already written in the run folder are complete." in rest
    status = json.loads((only_run(tmp_path / "o") / "status.json").read_text())
    assert status["state"] == "incomplete" and status["reason"] == "interrupted (Ctrl-C)"


def test_tensorboard_holds_every_epoch_of_the_table_and_the_test_pictures(tmp_path):
    """The default logger writes TensorBoard event files into the model's folder; TensorBoard's own reader
    finds every epoch's numbers equal to epochs.csv's, the learning rate, and the test split's pictures."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_tree(tmp_path / "d", per_class=12)
    r = cli("train", str(data), "--model", "regularized-cnn", *TINY, "--max-epochs", "3", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-2000:]
    folder = only_run(tmp_path / "o") / "regularized-cnn"
    assert list(folder.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0}).Reload()
    table = read_csv(folder / "epochs.csv")
    for tag, column in (("val/acc", "val_acc"), ("val/loss", "val_loss"), ("train/acc", "train_acc")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in logged] == [int(row["epoch"]) for row in table] == [1, 2, 3]
        assert all(abs(v - float(row[column])) < 1e-6 for (_, v), row in zip(logged, table)), tag
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([1e-3] * 3)
    metrics = json.loads((folder / "metrics.json").read_text())
    wrong = metrics["n"] - metrics["correct"]
    images = set(events.Tags()["images"])
    assert images == ({"test/confusion_matrix", "test/misclassified"} if wrong else {"test/confusion_matrix"})
    (confusion,) = events.Images("test/confusion_matrix")
    assert (
        Image.open(io.BytesIO(confusion.encoded_image_string)).size == Image.open(folder / "confusion_matrix.png").size
    )
    for kind, present in (("csv", "csv/metrics.csv"), ("none", None)):
        out = tmp_path / kind
        r = cli("train", str(data), "--model", "regularized-cnn", *TINY, "--max-epochs", "1", "--logger", kind,
                "--out", str(out))  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        model = only_run(out) / "regularized-cnn"
        assert not list(model.glob("events.out.tfevents.*"))
        assert present is None or (model / present).is_file()


def test_mlflow_logs_the_epochs_into_a_local_mlruns(tmp_path, monkeypatch):
    """--logger mlflow (the mlflow extra) with no tracking URI logs to ./mlruns: the run named by its folder,
    every epoch's validation accuracy as in epochs.csv, and the confusion matrix as an artifact."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    data = make_tree(tmp_path / "d", per_class=10)
    args = ["train", str(data), "--model", "regularized-cnn", *TINY, "--max-epochs", "2", "--logger", "mlflow"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "ferlab", *args, "--out", "o"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    folder = only_run(tmp_path / "o") / "regularized-cnn"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("ferlab").experiment_id])
    assert run.info.run_name == f"{folder.parent.name}/regularized-cnn"
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/acc")]
    table = read_csv(folder / "epochs.csv")
    assert [s for s, _ in history] == [1, 2]
    assert all(abs(v - float(row["val_acc"])) < 1e-6 for (_, v), row in zip(history, table))
    assert "confusion_matrix.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
