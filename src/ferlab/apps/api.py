"""ferlab's Python API: classify the faces in images with a shipped or trained model.

    >>> import ferlab
    >>> faces = ferlab.analyze("photo.jpg")                                # doctest: +SKIP
    >>> faces[0]["label"], faces[0]["probabilities"]["happy"], faces[0]["box"]   # doctest: +SKIP
    ('happy', 0.91, [412, 133, 208, 208])
    >>> ferlab.analyze(frame, bgr=True)            # an OpenCV frame           # doctest: +SKIP
    >>> ferlab.analyze(["a.jpg", pil_image, array], model="runs/x/vgg-small/model.ckpt")   # doctest: +SKIP

The CLI (``ferlab predict``) and the server (``ferlab serve``) are thin layers over the same inference path,
so an image gives the same probabilities through each.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ferlab.core.errors import FerlabError
from ferlab.data.faces import POLICIES
from ferlab.data.images import BadImage, NoFace, normalize_mode, open_rgb
from ferlab.inference.model import ALL_FACES, Model, default_model_name, load_model

ImageLike = str | Path | Image.Image | np.ndarray


def to_pil(image: ImageLike, max_pixels: int, bgr: bool = False, where: str = "the image") -> Image.Image:
    """A path, a PIL image or a uint8 array (H x W x 3 RGB, BGR with ``bgr``, H x W x 4, or H x W grayscale)
    as an upright RGB PIL image; anything else is a :class:`FerlabError` saying what was expected."""
    if isinstance(image, (str, Path)):
        if not Path(image).exists():
            raise FerlabError(f"{where}: the file {image} does not exist.")
        if Path(image).is_dir():
            raise FerlabError(f"{where}: {image} is a folder; pass an image file (or a list of them).")
        try:
            return open_rgb(image, max_pixels)
        except BadImage as e:
            raise FerlabError(f"{where}: {image} cannot be used ({e}).") from None
    if isinstance(image, Image.Image):
        if image.width * image.height > max_pixels:
            raise FerlabError(f"{where} has {image.width}x{image.height} pixels, over the limit of {max_pixels:,}.")
        try:  # as a file would be: upright, 16-bit greyscale kept to its top 8 bits, float images refused
            return normalize_mode(ImageOps.exif_transpose(image))
        except BadImage as e:
            raise FerlabError(f"{where} cannot be used ({e}).") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise FerlabError(
                f"{where} is a {image.dtype} array; pass uint8 pixels (0-255), e.g. (array * 255).astype('uint8')."
            )
        if image.ndim == 2:
            arr = np.repeat(image[..., None], 3, axis=2)
        elif image.ndim == 3 and image.shape[2] in (3, 4):
            arr = image[..., :3]
            if bgr:
                arr = arr[..., ::-1]
        else:
            raise FerlabError(
                f"{where} is an array of shape {image.shape}; pass H x W x 3 (RGB, or BGR with bgr=True), "
                "H x W x 4 or H x W grayscale."
            )
        if arr.shape[0] * arr.shape[1] > max_pixels:
            raise FerlabError(f"{where} has {arr.shape[1]}x{arr.shape[0]} pixels, over the limit of {max_pixels:,}.")
        if min(arr.shape[:2]) < 1:
            raise FerlabError(f"{where} is an empty array of shape {image.shape}.")
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    raise FerlabError(
        f"{where} is of type {type(image).__name__}; pass a file path, a PIL image or a uint8 NumPy array (or a list)."
    )


def _model(model: str | Path | Model | None) -> Model:
    if isinstance(model, Model):
        return model
    return load_model(model if model is not None else default_model_name())


def analyze(
    images: ImageLike | Sequence[ImageLike],
    model: str | Path | Model | None = None,
    all_faces: bool = ALL_FACES,
    bgr: bool = False,
    face_crop: str | None = None,
    require_face: bool = False,
) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
    """The faces in an image (or in each of a list of images), each with its emotion.

    Args:
        images: a path, a PIL image or a uint8 NumPy array, or a list of them (all classified in one batch).
        model: a shipped model's name (``ferplus``, the default, or ``fer2013``), a ``.ckpt`` or ``.onnx`` path,
            or a loaded model.
        all_faces: every face found (default), or only the largest.
        bgr: arrays are in OpenCV's BGR order.
        face_crop: override the model's own crop policy (``off``, ``auto`` or ``on``).
        require_face: raise :class:`FerlabError` for an image in which face detection ran and found nothing,
            instead of classifying the whole image (``face_found: False``).

    Returns:
        For one image, a list with one dict per face: ``box`` ([x, y, w, h] in the image, or None for the
        whole image), ``label``, ``probabilities`` (every class, summing to 1, calibrated), ``face_found``
        and ``unusual`` (why the input is unlike the model's training data, or ""). For a list, one such list
        per image.
    """
    if face_crop not in (None, *POLICIES):
        raise FerlabError(f"face_crop must be None, 'off', 'auto' or 'on', not {face_crop!r}.")
    single = not isinstance(images, (list, tuple))
    items = [images] if single else list(images)
    m = _model(model)

    def where(i: int) -> str:
        return "the image" if single else f"image {i} of the list"

    pils = [to_pil(im, m.pre.max_pixels, bgr, where(i)) for i, im in enumerate(items)]
    try:
        faces = m.analyze(pils, all_faces=all_faces, face_crop=face_crop)
    except NoFace as e:
        raise FerlabError(f"No face found in {where(e.index)} (face_crop='on').") from None
    if require_face:
        for i, found in enumerate(faces):
            if found and found[0].note:
                raise FerlabError(f"No face found in {where(i)}.")
    out = [[f.as_dict() for f in found] for found in faces]
    return out[0] if single else out
