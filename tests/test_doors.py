"""One inference path: a photo gets the same probabilities through every door that turns images into them."""

import io

import numpy as np
import pytest
import torch

from ferlab.apps.api import analyze
from ferlab.apps.evaluate import labelled
from ferlab.apps.predict import predict
from ferlab.apps.serve import create_app
from ferlab.apps.study import score_test
from ferlab.data.datasets import ImageSet
from ferlab.inference.model import calibrated, load_model, pretrained_path

from .test_faces import composed_photos, pytestmark  # noqa: F401 - skipped where ../shared/datasets is absent


@pytest.mark.slow
def test_a_crop_trained_model_answers_alike_through_every_door(ck_model, tmp_path):
    """vgg-small trained on 48 px CK+48 crops crops faces out of photos (its card's rule): evaluate, the study's
    test scoring, predict, ferlab.analyze and the server must all crop the same face and give the same numbers."""
    answers_alike(ck_model / "vgg-small" / "model.ckpt", tmp_path)


@pytest.mark.slow
def test_the_shipped_ferplus_answers_alike_through_every_door(tmp_path):
    answers_alike(pretrained_path("ferplus"), tmp_path)


def answers_alike(checkpoint, tmp_path) -> None:
    from fastapi.testclient import TestClient

    photos = composed_photos(tmp_path / "photos" / "happy", 4)
    model = load_model(checkpoint)
    assert model.pre.faces == "crops"
    classes = model.classes

    logits, _, files, skipped, _ = labelled(model, tmp_path / "photos")
    assert not skipped and files == [str(p) for p in photos]
    evaluated = calibrated(logits, model.temperature).numpy()
    study, _, _ = score_test(checkpoint, ImageSet(torch.empty(0), torch.zeros(len(photos)), [str(p) for p in photos]))
    assert np.array_equal(study.numpy(), evaluated)

    def same(a: dict, b: dict) -> bool:
        """Equal to the 6 decimals every door prints, up to float32 noise: a forward pass over a batch of other
        faces can move the 7th digit, and a rounding boundary can then move the 6th by one."""
        return a.keys() == b.keys() and max(abs(a[c] - b[c]) for c in a) <= 2e-6

    rows, _ = predict([model], photos)
    client = TestClient(create_app([model]))
    for k, photo in enumerate(photos):
        want = {c: round(float(p), 6) for c, p in zip(classes, evaluated[k])}
        first = analyze(str(photo), model=model)[0]  # largest face first, as evaluate takes it
        assert same(first["probabilities"], want)
        row = next(r for r in rows if r.file == photo and r.face == 0)  # its largest face, as evaluate takes it
        top3 = row.preds[model.label]
        assert [c for c, _ in top3] == sorted(want, key=lambda c: -want[c])[:3]
        assert same(dict(top3), {c: want[c] for c, _ in top3})
        answer = client.post("/v1/predict", files={"image": (photo.name, io.BytesIO(photo.read_bytes()))}).json()
        assert same(answer["faces"][0]["probabilities"], want)
        assert answer["faces"][0]["box"] == first["box"]
    assert any(r.box for r in rows)  # faces were cropped out of the photos, not whole images classified
