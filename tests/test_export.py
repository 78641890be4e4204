"""ONNX export: every registry model round-trips with proven parity, the card travels in the file, ferlab runs it."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch

from ferlab.apps.export import export_onnx
from ferlab.data.images import Preprocess, decode_many, to_tensor
from ferlab.inference.model import load_model
from ferlab.models.checkpoint import save_checkpoint
from ferlab.models.registry import REGISTRY, create_model

from .conftest import CKPLUS, cli, read_csv, requires_ckplus, run_cli

SIZE = {"baseline-cnn": 24, "regularized-cnn": 32, "vgg-small": 32, "vgg-medium": 32}


def real_images(n: int, size: int) -> torch.Tensor:
    files = sorted(CKPLUS.glob("*/*.png"))[:: max(1, len(sorted(CKPLUS.glob("*/*.png"))) // n)][:n]
    decoded, _ = decode_many(files, Preprocess(image_size=size))
    return to_tensor([d.image for d in decoded if d is not None], size)


@requires_ckplus
@pytest.mark.slow
@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registry_model_exports_with_parity_on_real_images(name, tmp_path):
    size = SIZE.get(name, 32)
    torch.manual_seed(0)
    net = create_model(name, 6, size, "none", 0, tta=name == "vgg-small")
    for p in net.parameters():  # trained-looking weights: larger than init, so classes are not near-ties
        p.data.mul_(1.5)
    net.eval()
    classes = ["angry", "disgust", "fear", "happy", "sad", "surprise"]
    pre = Preprocess(image_size=size, grayscale=True, faces="crops", source_side=48, detector="yunet")
    ck = tmp_path / "model.ckpt"
    save_checkpoint(ck, net, name, classes, pre, calibration={"temperature": 1.7}, training={"val_acc": 0.5})
    r = export_onnx(str(ck), str(tmp_path / "model.onnx"))
    assert r.max_diff <= 1e-4
    x = real_images(64, size)
    assert len(x) == 64
    a, b = load_model(ck), load_model(tmp_path / "model.onnx")
    assert b.runtime.kind == "onnxruntime"
    pa, pb = a.probabilities(x), b.probabilities(x)
    assert float((pa - pb).abs().max()) <= 1e-4 and torch.equal(pa.argmax(1), pb.argmax(1))
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert json.loads(meta["classes"]) == classes and meta["grayscale"] == "true" and meta["temperature"] == "1.7"
    assert b.pre == a.pre and b.classes == classes and b.card["model"] == name
    # the graph's own probabilities output is calibrated too: usable without ferlab
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, probs = sess.run(None, {"image": x[:5].numpy()})
    np.testing.assert_allclose(probs, torch.from_numpy(logits).div(1.7).softmax(1).numpy(), atol=1e-6)


def test_export_refuses_a_graph_that_disagrees(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = create_model("regularized-cnn", 3, 32).eval()
    save_checkpoint(tmp_path / "m.ckpt", net, "regularized-cnn", ["a", "b", "c"], Preprocess(image_size=32))
    from ferlab.apps import export

    monkeypatch.setattr(export, "parity", lambda *a: (0.3, 2))
    with pytest.raises(Exception, match="disagrees with the PyTorch model.*nothing was written"):
        export_onnx(str(tmp_path / "m.ckpt"), str(tmp_path / "m.onnx"))
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_predict_and_evaluate_on_onnx_give_the_checkpoints_rows(study, tmp_path):
    _, test, (run, _) = study
    ck = run / "regularized-cnn" / "model.ckpt"
    r = run_cli("export", str(ck), "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 0 and "ONNX Runtime matches PyTorch" in r.stdout, r.stderr[-2000:]
    for model, name in ((str(ck), "ckpt"), (str(tmp_path / "m.onnx"), "onnx")):
        r = run_cli("predict", "--checkpoint", model, str(test), "--out", str(tmp_path / f"p-{name}"))
        assert r.returncode == 0, r.stderr[-2000:]
        r = run_cli("evaluate", model, str(test), "--out", str(tmp_path / f"e-{name}"))
        assert r.returncode == 0, r.stderr[-2000:]
    assert read_csv(tmp_path / "p-ckpt" / "prediction_results.csv") == read_csv(
        tmp_path / "p-onnx" / "prediction_results.csv"
    )
    assert read_csv(tmp_path / "e-ckpt" / "predictions.csv") == read_csv(tmp_path / "e-onnx" / "predictions.csv")
    m = json.loads((tmp_path / "e-onnx" / "metrics.json").read_text())
    assert (
        m["runtime"] == "onnxruntime"
        and m["accuracy"] == json.loads((run / "regularized-cnn" / "metrics.json").read_text())["accuracy"]
    )


def test_corrupt_and_foreign_onnx_files_are_one_sentence(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage" * 10)
    (tmp_path / "img").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "img" / "a.png")
    r = cli("predict", "--checkpoint", str(tmp_path / "junk.onnx"), str(tmp_path / "img"))
    assert r.returncode == 2 and "is not an ONNX model or is corrupted" in r.stderr and "Traceback" not in r.stderr
    foreign = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(foreign, (torch.zeros(1, 3, 32, 32),), str(tmp_path / "foreign.onnx"), dynamo=False)
    r = cli("evaluate", str(tmp_path / "foreign.onnx"), str(tmp_path / "img"))
    assert r.returncode == 2 and "is an ONNX model but not one ferlab exported" in r.stderr


@requires_ckplus
@pytest.mark.slow
def test_int8_is_written_with_its_accuracy_change_or_refused_over_the_limit(tmp_path):
    data = tmp_path / "faces"
    for cls in ("happy", "surprise", "sadness"):
        (data / cls).mkdir(parents=True)
        for f in sorted((CKPLUS / cls).glob("*.png"))[-20:]:
            (data / cls / f.name).symlink_to(f)
    r = run_cli("export", "fer2013", "--out", str(tmp_path / "f.onnx"), "--quantize", "int8", "--data", str(data))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ferlab: int8 on " in r.stderr and "(n=60): accuracy " in r.stderr
    int8 = tmp_path / "f-int8.onnx"
    assert int8.stat().st_size < (tmp_path / "f.onnx").stat().st_size / 2  # int8 weights: a quarter, plus graph
    assert load_model(str(int8)).classes == load_model("fer2013").classes  # the card travelled
    # a limit no quantization can meet: refused in one sentence, the fp32 file kept, no int8 file
    r = run_cli(
        "export", "fer2013", "--out", str(tmp_path / "g.onnx"), "--quantize", "int8", "--data", str(data),
        "--max-drop", "-100",
    )  # fmt: skip
    assert r.returncode == 2 and "so no int8 file was written" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "g.onnx").is_file() and not (tmp_path / "g-int8.onnx").exists()
    # a mistake in the data is refused before anything is written (it once left the fp32 file behind)
    (data / "contempt").mkdir()
    (data / "contempt" / "c.png").symlink_to(sorted((CKPLUS / "contempt").glob("*.png"))[0])
    r = run_cli("export", "fer2013", "--out", str(tmp_path / "h.onnx"), "--quantize", "int8", "--data", str(data))
    assert r.returncode == 2 and "does not know: contempt" in r.stderr and not (tmp_path / "h.onnx").exists()
    r = run_cli(
        "export", "fer2013", "--out", str(tmp_path / "h.onnx"), "--quantize", "int8", "--data", str(tmp_path / "no"),
    )  # fmt: skip
    assert r.returncode == 2 and "folder" in r.stderr and "does not exist" in r.stderr
    assert not (tmp_path / "h.onnx").exists()
    r = run_cli(
        "export", "fer2013", "--out", str(tmp_path / "h.onnx"), "--quantize", "int8", "--data", str(data),
        "--drop-classes", "contempt",
    )  # fmt: skip
    assert r.returncode == 0 and (tmp_path / "h-int8.onnx").is_file(), r.stderr[-2000:]
