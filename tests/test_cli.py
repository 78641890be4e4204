"""The real CLI end to end on tiny generated data: run folders, tables, reruns, evaluate, user mistakes."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest
import yaml

from ferlab.core.config import StudyConfig, merge
from ferlab.core.errors import FerlabError

from .conftest import FAST, cli, make_tree, only_run, python_stdout, run_cli


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_run_folder_holds_the_whole_record(study):
    _, _, (run, _) = study
    for name in (
        "config.yaml",
        "command.txt",
        "manifest.csv",
        "skipped_files.csv",
        "run.json",
        "dataset.json",
        "status.json",
        "test_accuracy_comparison.csv",
        "model1_accuracy.csv",
        "model2_accuracy.csv",
    ):
        assert (run / name).is_file(), name
    for model in ("baseline-cnn", "regularized-cnn"):
        for name in (
            "summary.txt",
            "epochs.csv",
            "metrics.json",
            "per_class.csv",
            "confusion_matrix.csv",
            "confusion_matrix.png",
            "predictions.csv",
            "reliability.png",
            "model.ckpt",
        ):
            assert (run / model / name).is_file(), (model, name)
        assert not (run / model / "training-state").exists()  # removed once the model finished
        epochs = read_csv(run / model / "epochs.csv")
        assert list(epochs[0]) == ["epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"]
        assert [int(e["epoch"]) for e in epochs] == list(range(1, len(epochs) + 1))
    rows = read_csv(run / "test_accuracy_comparison.csv")
    assert [r["model"] for r in rows] == ["baseline-cnn", "regularized-cnn"]
    assert list(rows[0]) == [
        "model",
        "parameters",
        "epochs_run",
        "best_epoch",
        "train_acc",
        "train_acc_eval",
        "val_acc",
        "test_acc",
        "test_ci95_low",
        "test_ci95_high",
        "n_test",
    ]
    assert rows[0]["n_test"] == "24" and rows[0]["parameters"] == str(64 * 28 * 28 * 128 + 128 + 896 + 18496 + 387)
    for r in rows:
        assert float(r["test_ci95_low"]) <= float(r["test_acc"]) <= float(r["test_ci95_high"])
        best = read_csv(run / r["model"] / "epochs.csv")[int(r["best_epoch"]) - 1]
        assert float(best["val_acc"]) == pytest.approx(float(r["val_acc"]), abs=1e-4)
        assert max(float(e["val_acc"]) for e in read_csv(run / r["model"] / "epochs.csv")) == pytest.approx(
            float(r["val_acc"]), abs=1e-4
        )
    m1 = read_csv(run / "model1_accuracy.csv")
    assert list(m1[0]) == ["epoch", "training_accuracy"] and len(m1) == int(rows[0]["epochs_run"])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["max_epochs"] == 3 and cfg["data"]["image_size"] == 32
    assert "dataset" not in cfg  # what the data turned out to be is beside the config, so the config re-runs
    ds = json.loads((run / "dataset.json").read_text())
    assert ds["counts"]["test"] == {"circle": 8, "square": 8, "triangle": 8}
    assert ds["preprocess"]["image_size"] == 32 and ds["preprocess"]["grayscale"] is False


@pytest.mark.slow
def test_same_seed_reproduces_every_table(study):
    _, _, (a, b) = study
    assert (a / "test_accuracy_comparison.csv").read_text() == (b / "test_accuracy_comparison.csv").read_text()
    assert (a / "manifest.csv").read_text() == (b / "manifest.csv").read_text()
    for model in ("baseline-cnn", "regularized-cnn"):
        strip = [{k: v for k, v in e.items() if k != "seconds"} for e in read_csv(a / model / "epochs.csv")]
        assert strip == [{k: v for k, v in e.items() if k != "seconds"} for e in read_csv(b / model / "epochs.csv")]


@pytest.mark.slow
def test_regularized_cnn_learns_the_toy_shapes(study):
    _, _, (run, _) = study
    row = {r["model"]: r for r in read_csv(run / "test_accuracy_comparison.csv")}["regularized-cnn"]
    # on the separate 24-image test folder, above chance (1/3) even at the low end of its 95% interval
    assert float(row["test_ci95_low"]) > 1 / 3, row
    epochs = read_csv(run / "regularized-cnn" / "epochs.csv")
    assert float(epochs[-1]["train_loss"]) < 0.95 * float(epochs[0]["train_loss"])


@pytest.mark.slow
def test_evaluate_reproduces_the_run_test_accuracy(study, tmp_path):
    _, test, (run, _) = study
    for model in ("baseline-cnn", "regularized-cnn"):
        r = run_cli("evaluate", str(run / model / "model.ckpt"), str(test), "--out", str(tmp_path / model))
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads((tmp_path / model / "metrics.json").read_text())
        want = json.loads((run / model / "metrics.json").read_text())
        assert got["accuracy"] == want["accuracy"] and got["confusion"] == want["confusion"]


@pytest.mark.slow
def test_predicting_the_test_split_reproduces_evaluate_exactly(study, tmp_path):
    _, test, (run, _) = study
    cks = [str(run / m / "model.ckpt") for m in ("baseline-cnn", "regularized-cnn")]
    r = run_cli("predict", "--checkpoint", cks[0], "--checkpoint", cks[1], str(test), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_csv(tmp_path / "prediction_results.csv")
    assert len(rows) == 24 and all(row["correct_class"] for row in rows)
    for model in ("baseline-cnn", "regularized-cnn"):
        acc = sum(row[f"{model}_predicted"] == row["correct_class"] for row in rows) / len(rows)
        assert acc == json.loads((run / model / "metrics.json").read_text())["accuracy"]


@pytest.mark.slow
def test_predict_takes_correct_classes_from_a_labels_file(study, tmp_path):
    _, test, (run, _) = study
    files = sorted((test / "circle").iterdir())[:2]
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate([*files, files[0]]):  # a flat folder: no class in the path, so the labels file must tell
        (flat / f"img{i}.png").write_bytes(f.read_bytes())
    # as a spreadsheet saves it: a byte-order mark before the header
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,label\nimg0.png,circle\nimg1.png,square\nimg1.png,square\n", encoding="utf-8-sig")
    ck = str(run / "regularized-cnn" / "model.ckpt")
    r = run_cli("predict", "--checkpoint", ck, str(flat), "--labels", str(labels), "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_csv(tmp_path / "p" / "prediction_results.csv")
    assert [row["correct_class"] for row in rows] == ["circle", "square", ""]
    assert f"warning: 1 of 3 inputs have no label in {labels} (matched by file name or path)" in r.stderr
    labels.write_text("img0.png,circle\nimg0.png,Circle\n")  # one class, spelt twice: fine
    r = run_cli("predict", "--checkpoint", ck, str(flat), "--labels", str(labels), "--out", str(tmp_path / "q"))
    assert r.returncode == 0, r.stderr[-2000:]
    labels.write_text("img0.png,circle\nimg0.png,square\n")  # a conflicting repeat is refused, not last-wins
    r = run_cli("predict", "--checkpoint", ck, str(flat), "--labels", str(labels), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and f"The labels file {labels} gives img0.png two labels, circle and square." in r.stderr


@pytest.mark.slow
def test_train_one_model_into_its_own_folder(tmp_path):
    data = make_tree(tmp_path / "d", per_class=12)
    r = run_cli("train", str(data), "--model", "regularized-cnn", "--out", str(tmp_path / "o"), *FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    run = only_run(tmp_path / "o")
    assert run.name.endswith("-d-regularized-cnn")
    assert [r["model"] for r in read_csv(run / "test_accuracy_comparison.csv")] == ["regularized-cnn"]


def _one_error_line(r, message: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("ferlab: error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "The data folder {tmp}/nowhere does not exist; pass a folder of class sub-folders."),
        ("one-class", "a classifier needs at least 2 classes."),
        ("data-is-a-file", "The data folder {tmp}/a.png is a file, not a folder; pass a folder of class sub-folders."),
        ("unknown-model", "Unknown model 'resnet'; choose from: baseline-cnn, regularized-cnn"),
        ("bad-checkpoint", "is not a ferlab checkpoint or is corrupted"),
        ("bad-config", "Unknown config key 'train.epochs'; expected one of: max_epochs,"),
        ("out-is-a-file", "cannot use {tmp}/out: file exists."),
        ("out-under-proc", "cannot use /proc/ferlab-out: no such file or directory."),
        (
            "explain-onnx",
            "Grad-CAM needs the PyTorch model and {tmp}/f.onnx is an ONNX file; explain it with --explain-method "
            "occlusion.",
        ),
        ("video-option-on-images", "--every, --smooth: for videos only, and none of the inputs is a video."),
        ("images-and-videos", "The inputs hold images ({tmp}/d/a/a_000.png) and videos ({tmp}/v.mp4); predict them"),
        ("one-video-sharded", "--devices/--num-nodes/--strategy share videos out, one per process: pass several"),
        (
            "export-data-alone",
            "--data, --class-map and --drop-classes measure what --quantize int8 costs; give it too.",
        ),
        ("serve-busy-port", "Cannot listen on 127.0.0.1:{port}: address already in use."),
        (
            "serve-pending",
            "--max-bytes, --max-pending and --max-pixels must be positive and --port between 1 and 65535.",
        ),
    ],
)
def test_user_mistakes_exit_2_with_one_sentence(tmp_path, case, message):
    out = tmp_path / "out"
    if case == "missing":
        r = cli("run", str(tmp_path / "nowhere"), "--out", str(out))
    elif case == "data-is-a-file":
        (tmp_path / "a.png").write_bytes(b"")
        r = cli("run", str(tmp_path / "a.png"), "--out", str(out))
    elif case == "one-class":
        r = cli("run", str(make_tree(tmp_path / "d", classes=("only",), per_class=4)), "--out", str(out))
    elif case == "unknown-model":
        r = cli("run", str(make_tree(tmp_path / "d", per_class=4)), "--models", "resnet", "--out", str(out))
    elif case == "bad-checkpoint":
        (tmp_path / "x.ckpt").write_bytes(b"garbage")
        r = cli("evaluate", str(tmp_path / "x.ckpt"), str(make_tree(tmp_path / "d", per_class=2)))
    elif case == "out-under-proc":  # an OSError other than the usual four once ended in a traceback
        r = cli("predict", str(make_tree(tmp_path / "d", per_class=1)), "--out", "/proc/ferlab-out")
    elif case == "explain-onnx":  # refused before the CSV and grid were written, not after
        assert cli("export", "fer2013", "--out", str(tmp_path / "f.onnx")).returncode == 0
        d = make_tree(tmp_path / "d", per_class=1)
        r = cli("predict", "--checkpoint", str(tmp_path / "f.onnx"), str(d), "--explain", "--out", str(out))
    elif case == "video-option-on-images":  # was silently ignored
        d = make_tree(tmp_path / "d", per_class=1)
        r = cli("predict", str(d), "--every", "5", "--smooth", "0", "--out", str(out))
    elif case in ("images-and-videos", "one-video-sharded"):
        (tmp_path / "v.mp4").write_bytes(b"\0\0\0\x18ftypmp42" + bytes(64))
        d = [str(make_tree(tmp_path / "d", classes=("a",), per_class=1))] if case == "images-and-videos" else []
        ddp = ["--devices", "2", "--accelerator", "cpu"] if case == "one-video-sharded" else []
        r = cli("predict", *d, str(tmp_path / "v.mp4"), *ddp, "--out", str(out))
    elif case == "export-data-alone":  # was silently ignored
        r = cli("export", "fer2013", "--drop-classes", "contempt", "--out", str(out / "f.onnx"))
    elif case == "serve-busy-port":  # said at once, before the models load and before any "serving" line
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            r = cli("serve", "--port", str(port))
        message = message.replace("{port}", str(port))
        assert "serving" not in r.stdout
    elif case == "serve-pending":
        r = cli("serve", "--max-pending", "0", "--port", str(8000))
    elif case == "out-is-a-file":
        out.write_text("not a folder")
        r = cli("predict", str(make_tree(tmp_path / "d", per_class=1)), "--out", str(out))
    else:
        (tmp_path / "c.yaml").write_text("train:\n  epochs: 3\n")
        r = cli("run", "--config", str(tmp_path / "c.yaml"), "--out", str(out))
    _one_error_line(r, message.format(tmp=tmp_path))
    assert not out.is_dir() or not any(out.iterdir()), "a failed start must not leave a half-made run folder"


def test_config_merge_is_strict_and_typed():
    cfg = merge(StudyConfig(), {"train": {"max_epochs": 7, "lr": 1}, "data": {"split": [0.7, 0.15, 0.15]}})
    assert cfg.train.max_epochs == 7 and cfg.train.lr == 1.0 and cfg.data.split == [0.7, 0.15, 0.15]
    with pytest.raises(FerlabError, match=r"Config key 'train.max_epochs' must be int, got 'ten'\."):
        merge(StudyConfig(), {"train": {"max_epochs": "ten"}})
    with pytest.raises(FerlabError, match=r"Config key 'data.face_crop' must be one of off, auto, on"):
        merge(StudyConfig(), {"data": {"face_crop": "maybe"}})
    recorded = merge(StudyConfig(), {"train": {"precision_by_model": {"baseline-cnn": "bf16-mixed"}}})
    assert recorded.train.precision_by_model == {"baseline-cnn": "bf16-mixed"}
    with pytest.raises(FerlabError, match=r"'train.precision_by_model' takes values among 32, bf16-mixed, 16-mixed"):
        merge(StudyConfig(), {"train": {"precision_by_model": {"baseline-cnn": "bf17"}}})
    with pytest.raises(FerlabError, match=r"'train.precision_by_model' must be a mapping of str to str, got 'bf16'"):
        merge(StudyConfig(), {"train": {"precision_by_model": "bf16"}})


def test_shipped_configs_load():
    """Every YAML in configs/ is valid against today's config tree (a renamed key would break it)."""
    from ferlab.core.config import load_yaml

    root = Path(__file__).resolve().parents[1] / "configs"
    for f in sorted(root.glob("*.yaml")):
        merge(StudyConfig(), load_yaml(f))
    deep = merge(StudyConfig(), load_yaml(root / "transfer-deep.yaml"))
    assert (deep.train.backbone_size, deep.train.fine_tune_layers, deep.train.augment) == (112, 6, "fine-tune")


def test_every_command_prints_its_help(capsys):
    """Help is formatted with %: one unescaped "5%" in a config field's help made `ferlab run --help` crash."""
    import argparse

    from ferlab.apps.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"run", "train", "predict", "serve", "export"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as done:
            parser.parse_args([name, "--help"])
        assert done.value.code == 0, name
        assert "usage: ferlab " + name in capsys.readouterr().out


def test_explain_is_a_flag_that_leaves_the_next_path_alone(tmp_path):
    """`--explain photo.png` once read photo.png as the method; every page written is named in the summary."""
    d = make_tree(tmp_path / "d", per_class=1)
    photo = next(d.rglob("*.png"))
    r = cli("predict", "--explain", str(photo), "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p" / "explanations").is_dir()
    pages = [tmp_path / "p" / "prediction_grid.png", tmp_path / "p" / "explanation_grid.png"]
    assert all(p.is_file() for p in pages) and f"and {pages[0]}, {pages[1]}\n" in r.stdout


def test_predict_names_broken_links_and_loops_among_the_skipped_files(tmp_path):
    d = make_tree(tmp_path / "d", per_class=2)
    (d / "circle" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (d / "circle" / "loop.png").symlink_to(d / "circle" / "loop.png")
    r = cli("predict", str(d), "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    skipped = {Path(row["file"]).name for row in read_csv(tmp_path / "p" / "skipped_files.csv")}
    assert skipped == {"gone.png", "loop.png"}
    assert "2 inputs skipped" in r.stderr


def test_an_empty_class_folder_is_said_in_train_and_evaluate(tmp_path):
    d = make_tree(tmp_path / "d", per_class=10)
    (d / "hexagon").mkdir()
    r = cli("train", str(d), "--model", "vgg-small", "--image-size", "16", "--max-epochs", "1", "--no-progress",
            "--out", str(tmp_path / "o"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    note = f"the class folder(s) hexagon of {d} hold no files; they are not classes of this data"
    assert note in r.stderr
    model = next((tmp_path / "o").glob("*/vgg-small/model.ckpt"))
    r = cli("evaluate", str(model), str(d), "--out", str(tmp_path / "e"))
    assert r.returncode == 0 and note in r.stderr


def test_export_refuses_a_missing_folder_as_every_command_does(tmp_path):
    r = cli("export", "fer2013", "--out", str(tmp_path / "no" / "such" / "f.onnx"))
    assert r.returncode == 2
    assert f"The folder {tmp_path / 'no' / 'such'} for the exported file does not exist; create it first." in r.stderr
    assert not (tmp_path / "no").exists()


def test_a_run_folder_names_its_model_in_evaluate_export_and_info(study, tmp_path):
    """predict and serve take a run folder; evaluate, export and info take one of a single model, and name the
    models of a folder with several."""
    data, _, (run, _) = study
    r = cli("info", run)
    assert r.returncode == 2
    want = f"{run} is a run folder of 2 models (baseline-cnn, regularized-cnn); pass one of their model.ckpt files."
    assert want in r.stderr
    one = tmp_path / "one"
    one.mkdir()
    (one / "regularized-cnn").symlink_to(run / "regularized-cnn")
    r = cli("info", one)
    assert r.returncode == 0 and "regularized-cnn" in r.stdout
    r = cli("evaluate", one, data, "--out", tmp_path / "e")
    assert r.returncode == 0, r.stderr


def test_a_finished_command_destroys_its_process_group():
    """Left to the interpreter's exit, Gloo's threads aborted about one 2-process run in four (measured with a
    bare all_gather_object: 4 of 15, and 0 of 15 destroyed); a command that failed keeps the group, since another
    rank may still be inside a collective."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import os, torch.distributed as dist\n"
        f"os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='{port}')\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "from ferlab.apps.cli import main\n"
        "print(main(['info', 'nope']), dist.is_initialized())\n"
        "print(main(['models']), dist.is_initialized())\n"
    )
    lines = python_stdout(code).splitlines()
    assert lines[0] == "2 True" and lines[-1] == "0 False", lines
