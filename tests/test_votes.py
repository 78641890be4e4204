"""Labels from annotators' votes: the majority rule, the distribution loss, training and evaluating on votes,
and every malformed votes file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ferlab.core.config import TrainConfig
from ferlab.core.errors import FerlabError
from ferlab.data.votes import majority_of, read_votes
from ferlab.training.fit import Classifier, class_weights

from .conftest import cli, make_tree, only_run, read_csv

COLUMNS = ["neutral", "happiness", "sadness", "contempt", "unknown", "NF"]


def write_votes(path: Path, rows: list[tuple[str, list[int]]], header: list[str] | None = None) -> Path:
    lines = [",".join(["file", *(header or COLUMNS)])]
    lines += [",".join([f, *map(str, v)]) for f, v in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "votes, expected",
    [
        ([6, 3, 1, 0, 0, 0], "neutral"),  # the single sadness vote is dropped: 6 of 9
        ([4, 3, 3, 0, 0, 0], None),  # 4 of 10: no majority
        ([5, 4, 1, 0, 0, 0], "neutral"),  # 5 of 9 once the single vote is gone
        ([1, 1, 1, 1, 6, 0], None),  # the majority is "unknown": not an emotion
        ([0, 0, 0, 0, 2, 8], None),  # not a face
        ([0, 2, 0, 7, 1, 0], "contempt"),
        ([0, 6, 0, 0, 0, 0], "happy"),  # happiness is spelled happy, as every ferlab model says it
    ],
)
def test_majority_rule(votes: list[int], expected: str | None) -> None:
    assert majority_of(np.array(votes), COLUMNS) == expected


def test_distribution_drops_single_votes_and_non_emotions(tmp_path: Path) -> None:
    path = write_votes(tmp_path / "v.csv", [("a/x.png", [6, 3, 1, 0, 0, 0]), ("a/y.png", [0, 2, 0, 7, 1, 0])])
    votes = read_votes(path, tmp_path)
    assert votes.classes == ["contempt", "happy", "neutral", "sad"]
    x, y = str(tmp_path / "a/x.png"), str(tmp_path / "a/y.png")
    np.testing.assert_allclose(votes.distribution(x), [0, 3 / 9, 6 / 9, 0])
    np.testing.assert_allclose(votes.distribution(y), [7 / 9, 2 / 9, 0, 0])
    np.testing.assert_allclose(votes.distribution(y, ["contempt", "happy"]), [7 / 9, 2 / 9])
    # agreement counts every annotator, the single and the "unknown" votes too
    assert votes.agreement(y, "contempt") == pytest.approx(0.7)
    assert votes.agreement(x, "sad") == pytest.approx(0.1)
    assert votes.majority == {x: "neutral", y: "contempt"}


def test_distribution_loss_is_cross_entropy_to_the_votes() -> None:
    """Training on votes: -sum(t * log softmax(z)), worked by hand for one image; validation keeps the
    majority's loss and adds the votes'."""
    z = torch.tensor([[2.0, 0.0, 0.0]])
    t = torch.tensor([[0.5, 0.5, 0.0]])
    y = torch.tensor([0])
    logz = math.log(math.exp(2) + 2)
    by_hand = 0.5 * (logz - 2) + 0.5 * logz
    losses = {}
    for target in ("distribution", "majority"):
        module = Classifier(torch.nn.Identity(), torch.nn.Identity(), 3, TrainConfig(vote_target=target), 0.1)
        module.log = lambda name, value, **kw: losses.__setitem__((target, name), value)  # noqa: B023
        losses[target] = float(module.step((z, y, t), "train"))
        module.step((z, y, t), "val")
    assert losses["distribution"] == pytest.approx(by_hand, abs=1e-6)
    assert losses["majority"] == pytest.approx(logz - 2, abs=1e-6)
    assert float(losses[("distribution", "val/loss")]) == pytest.approx(logz - 2, abs=1e-6)
    assert float(losses[("distribution", "val/vote_loss")]) == pytest.approx(by_hand, abs=1e-6)


def test_class_balance_weights_the_training_loss_only() -> None:
    """--class-balance B weighs a class by count^-B, scaled so the images' mean weight is 1: with counts 6, 3
    and 1 and B = 1 the weights are 10/18 * (1, 2, 6); validation's loss stays unweighted."""
    labels = torch.tensor([0] * 6 + [1] * 3 + [2])
    w = class_weights(labels, 3, 1.0)
    assert w.tolist() == pytest.approx([10 / 18, 20 / 18, 60 / 18])
    assert float((w[labels]).mean()) == pytest.approx(1.0)
    assert class_weights(labels, 3, 0.0) is None
    root = 6**0.5 + 3**0.5 + 1  # sum over images of count^-0.5: 6/sqrt(6) + 3/sqrt(3) + 1
    assert class_weights(labels, 3, 0.5).tolist() == pytest.approx([10 / c**0.5 / root for c in (6, 3, 1)])
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 2])
    t = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    logp = torch.log_softmax(z, 1)
    logged = {}
    module = Classifier(torch.nn.Identity(), torch.nn.Identity(), 3, TrainConfig(), 0.1, class_weights=w)
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    # soft targets: the batch mean of -sum_c w_c t_c log p_c
    by_hand = -float(((t * w * logp).sum(1)).mean())
    assert float(module.step((z, y, t), "train")) == pytest.approx(by_hand, abs=1e-6)
    module.step((z, y, t), "val")
    assert float(logged["val/loss"]) == pytest.approx(-float(logp[[0, 1], y].mean()), abs=1e-6)
    # hard targets: PyTorch's weighted mean, sum_i w_yi * -log p_i,yi / sum_i w_yi
    module = Classifier(
        torch.nn.Identity(), torch.nn.Identity(), 3, TrainConfig(vote_target="majority"), 0.1, class_weights=w
    )
    module.log = lambda name, value, **kw: None
    by_hand = -float((w[y] * logp[[0, 1], y]).sum() / w[y].sum())
    assert float(module.step((z, y, t), "train")) == pytest.approx(by_hand, abs=1e-6)


@pytest.mark.parametrize(
    "header, rows, message",
    [
        (
            "name,neutral,happiness",
            ["a/x.png,1,2"],
            "must start with a 'file' column",
        ),
        ("file,neutral", ["a/x.png,1"], "has 1 emotion column(s) (neutral); a classifier needs at least 2."),
        ("file,neutral,happiness", ["a/x.png,3,-1"], "has '-1' in column happiness; votes must be whole numbers"),
        ("file,neutral,happiness", ["a/x.png,3,2.5"], "has '2.5' in column happiness; votes must be whole numbers"),
        ("file,neutral,happiness", ["a/x.png,3"], "Row 2 of the votes file"),
        ("file,neutral,happiness", ["a/x.png,0,0"], "has no votes"),
        ("file,neutral,happiness", ["a/x.png,3,1", "a/x.png,1,3"], "lists a/x.png twice"),
        ("file,neutral,happiness", [], "has a header but no rows of votes"),
    ],
)
def test_malformed_votes_file_is_one_sentence(tmp_path: Path, header: str, rows: list[str], message: str) -> None:
    path = tmp_path / "votes.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    with pytest.raises(FerlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_votes(path, tmp_path)


def test_missing_votes_file(tmp_path: Path) -> None:
    data = make_tree(tmp_path / "d", per_class=4)
    out = tmp_path / "out"
    r = cli("train", str(data), "--model", "vgg-small", "--labels", str(tmp_path / "no.csv"), "--out", str(out))
    assert r.returncode == 2
    assert not out.exists() or not any(out.iterdir())  # refused before anything was written
    assert r.stderr.strip().endswith(f"The votes file {tmp_path / 'no.csv'} does not exist; pass --labels a CSV of "
                                     "per-class votes.")  # fmt: skip


def shapes_with_votes(tmp_path: Path) -> tuple[Path, Path]:
    """A shapes tree whose folder names say nothing: the votes say circle, square or triangle (as happy, sad and
    contempt), one file has no row, one has no majority, one row names a file that is not there."""
    data = make_tree(tmp_path / "shapes", classes=("a", "b", "c"), per_class=24)
    rows = []
    for i, folder in enumerate("abc"):
        for f in sorted((data / folder).iterdir()):
            v = [0, 0, 0, 0, 0, 0]
            v[(1, 2, 3)[i]] = 7
            v[0] = 3  # neutral: a minority on every image
            rows.append((f"{folder}/{f.name}", v))
    rows.pop(0)  # the first file has no row
    no_majority = rows[0]
    rows[0] = (no_majority[0], [4, 3, 3, 0, 0, 0])
    rows.append(("a/gone.png", [0, 9, 0, 0, 1, 0]))
    return data, write_votes(tmp_path / "votes.csv", rows)


def test_train_and_evaluate_on_votes(tmp_path: Path) -> None:
    data, votes = shapes_with_votes(tmp_path)
    r = cli(
        "train", str(data), "--labels", str(votes), "--model", "regularized-cnn", "--image-size", "32",
        "--max-epochs", "3", "--no-progress", "--out", str(tmp_path / "out"), "--drop-classes", "neutral",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 rows of the votes file" in r.stderr and "name files that are not in the data folder" in r.stderr
    run = only_run(tmp_path / "out")
    dataset = json.loads((run / "dataset.json").read_text())
    assert dataset["classes"] == ["contempt", "happy", "sad"]
    assert sum(dataset["counts"][s][c] for s in dataset["counts"] for c in dataset["classes"]) == 70
    skipped = {Path(row["file"]).name: row["reason"] for row in read_csv(run / "skipped_files.csv")}
    assert skipped == {
        "a_000.png": f"no row in the votes file {votes}",
        "a_001.png": "the votes have no emotion majority (FER+'s rule)",
    }
    epochs = read_csv(run / "regularized-cnn" / "epochs.csv")
    assert list(epochs[0]) == [
        "epoch", "stage", "train_loss", "train_acc", "val_loss", "val_acc", "val_vote_loss", "seconds"
    ]  # fmt: skip
    # with neutral dropped every image's distribution is one-hot: the votes' loss is the majority's
    assert all(float(e["val_vote_loss"]) == pytest.approx(float(e["val_loss"]), abs=1e-4) for e in epochs)
    model = run / "regularized-cnn" / "model.ckpt"

    r = cli("evaluate", str(model), str(data), "--labels", str(votes), "--out", str(tmp_path / "ev"))
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n"] == 70
    # every image: 7 of 10 annotators voted its majority, 0 the other two model classes
    assert m["vote_weighted_accuracy"] == pytest.approx(0.7 * m["accuracy"], abs=1e-4)
    assert "vote-weighted accuracy" in r.stdout


def test_drop_classes_with_votes_names_the_votes_classes(tmp_path: Path) -> None:
    data, votes = shapes_with_votes(tmp_path)
    r = cli("train", str(data), "--model", "vgg-small", "--labels", str(votes), "--drop-classes", "a")
    assert r.returncode == 2
    assert r.stderr.strip().endswith(
        f"--drop-classes names a, not a class of the votes file {votes} (classes: contempt, happy, neutral, sad)."
    )
