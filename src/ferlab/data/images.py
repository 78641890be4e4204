"""Image folders in, decoded uint8 tensors and a leakage-free split out.

    >>> from ferlab.config import DataConfig
    >>> data = load_data(DataConfig(data="../shared/datasets/ckplus48", drop_classes=["contempt"],
    ...                             group_by=r"^(S\\d+)_"))                        # doctest: +SKIP
    >>> data.splits["train"].images.shape                                         # doctest: +SKIP
    torch.Size([737, 3, 100, 100])

Layouts: ``DIR/<class>/<images>`` (split here, seeded and class-stratified, optionally keeping groups
together) or ``DIR/{train,val,test}/<class>/<images>`` (splits that are missing are carved from train).
Every image is decoded once with Pillow into memory; files that cannot be used are skipped with a reason.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ferlab.data import faces

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
# the decoders ferlab lets Pillow use: never EPS (which runs Ghostscript), PSD and the like
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
WEB_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")  # what the server decodes: a smaller surface for strangers' bytes
# ferlab checks every image's pixel count against its own limit from the header, so Pillow's warning above its
# default limit says nothing new; filtered once here, because warnings.catch_warnings is not thread-safe and
# images are decoded in worker threads
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Preprocess:
    """How a file becomes a model input: travels in every checkpoint, so prediction matches training."""

    image_size: int = 100
    face_crop: str = "off"
    face_margin: float = 0.2
    max_pixels: int = 40_000_000
    grayscale: bool = False  # seen as grayscale replicated to RGB, as the training images were
    faces: str = ""  # what the training images were: "crops" (of faces), "photos" (with faces in them), "" unknown
    source_side: int = 0  # the training images' typical longer side in pixels (crops: what "like them" means)
    detector: str = "haar"  # the face detector training used; prediction uses the same


def crop_policy(pre: Preprocess, size: tuple[int, int], override: str | None = None) -> str:
    """The face-crop policy for one image of ``size`` (width, height): the user's override, else training's
    own policy, else (a model trained on face crops) ``auto`` for an image unlike its training images, a
    photo more than twice their side, and ``off`` for one like them."""
    if override:
        return override
    if pre.face_crop != "off":
        return pre.face_crop
    if pre.faces == "crops" and max(size) > 2 * max(pre.source_side, pre.image_size):
        return "auto"
    return "off"


class BadImage(Exception):
    """A file that cannot be used; its message is the reason listed in skipped_files.csv, its ``kind`` what
    went wrong (``format``, ``pixels``, ``corrupt``, ``mode``; ``file`` for the file itself)."""

    def __init__(self, message: str, kind: str = "file"):
        super().__init__(message)
        self.kind = kind


class NoFace(BadImage):
    """A readable image in which the face-crop policy ``on`` found no face."""


@dataclass
class Decoded:
    image: np.ndarray  # H x W x 3 uint8, cropped and resized
    box: faces.Box | None  # the face box in the original image, when one was cropped
    note: str = ""  # what happened when it matters to the user ("no face found: the whole image")

    @property
    def gray(self) -> bool:
        a = self.image
        return bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


def open_rgb(path: str | Path, max_pixels: int) -> Image.Image:
    """Open an image file as upright RGB, or raise :class:`BadImage` saying why it cannot be used."""
    path = Path(path)
    if path.is_symlink():
        try:
            path.stat()
        except FileNotFoundError:
            raise BadImage("broken symbolic link (its target does not exist)") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise BadImage("symbolic link loop") from None
            raise BadImage(f"unreadable symbolic link ({e.strerror})") from None
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise BadImage(f"unsupported file type '{path.suffix or path.name}'")
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
        with open(path, "rb") as f:
            return decode_image(f, max_pixels)
    except FileNotFoundError:
        raise BadImage("the file does not exist") from None
    except IsADirectoryError:
        raise BadImage("a folder, not an image file") from None
    except PermissionError:
        raise BadImage("not readable (permission denied)") from None
    except OSError as e:
        raise BadImage(f"unreadable ({e.strerror or e})") from None


def decode_image(fp: BinaryIO, max_pixels: int, used: int = 0, formats: tuple[str, ...] = IMAGE_FORMATS) -> Image.Image:
    """Image bytes as upright RGB, or :class:`BadImage` saying why not: the one decoder behind files and the
    server's uploads. Only ``formats`` are tried; the pixel limit (``used`` pixels already spent
    count against it) is checked from the header, before any pixel is decoded."""
    try:
        im = Image.open(fp, formats=formats)
        if used + im.width * im.height > max_pixels:
            raise BadImage(
                f"{im.width}x{im.height}{' with the earlier images' if used else ''} is over the pixel limit "
                f"of {max_pixels:,} (possible decompression bomb)",
                "pixels",
            )
        im.load()
        im = ImageOps.exif_transpose(im)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can read", "format") from None
    except Image.DecompressionBombError:
        raise BadImage(f"over the pixel limit of {max_pixels:,} (possible decompression bomb)", "pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise BadImage(f"truncated or corrupt image data ({e})", "corrupt") from None
    return normalize_mode(im)


def normalize_mode(im: Image.Image) -> Image.Image:
    """Any decoded image as RGB (16-bit greyscale keeps its top 8 bits); an unsupported mode is a BadImage."""
    if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit greyscale: keep the top 8 bits
        a = np.asarray(im)  # uint16 (I;16) or int32 (I): no wider copy of a large image
        if a.dtype != np.uint16:
            a = np.clip(a, 0, 65535)
        im = Image.fromarray((a >> 8).astype(np.uint8), "L")
    elif im.mode == "F":
        raise BadImage("unsupported image mode F (32-bit float)", "mode")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


FACES_KEPT = 65_536  # files whose faces are remembered (a few MB): a study's images, not a photo archive


class FaceCache:
    """The faces found per file (path, mtime, size, detector), the most recently used :data:`FACES_KEPT`, so a
    file a process decodes again (every model of a study, every epoch of a report) is searched once, while a
    million-file prediction holds a bounded amount. Safe to share between decoding threads."""

    def __init__(self, size: int = FACES_KEPT):
        self.size, self.found, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key: tuple) -> list[faces.Box] | None:
        with self.lock:
            if key in self.found:
                self.found.move_to_end(key)
                return self.found[key]
            return None

    def put(self, key: tuple, boxes: list[faces.Box]) -> None:
        with self.lock:
            self.found[key] = boxes
            self.found.move_to_end(key)
            while len(self.found) > self.size:
                self.found.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.found.clear()


_FACES = FaceCache()


def detect(im: Image.Image, detector: str, key: Any = None) -> list[faces.Box]:
    """Faces in the decoded image, largest first; with a ``key`` (a file's identity) remembered per process."""
    if key is not None and (cached := _FACES.get((key, detector))) is not None:
        return cached
    found = faces.find_faces(np.asarray(im), detector)
    if key is not None:
        _FACES.put((key, detector), found)
    return found


def file_key(path: str | Path) -> tuple:
    st = os.stat(path)
    return (str(path), st.st_mtime_ns, st.st_size)


def prepare(
    im: Image.Image, pre: Preprocess, all_faces: bool = False, face_crop: str | None = None, key: Any = None
) -> list[Decoded]:
    """An upright RGB image made into model inputs as ``pre`` prescribes: grayscale when training was, the face
    crop :func:`crop_policy` decides (one entry per face with ``all_faces``), resized to the model's input."""
    if pre.grayscale:  # ITU-R 601 luma, exact for images whose channels are already equal
        im = im.convert("L").convert("RGB")
    policy = crop_policy(pre, im.size, face_crop)
    boxes: list[faces.Box | None] = [None]
    note = ""
    if policy != "off":
        found = detect(im, pre.detector, None if key is None else (*key, pre.grayscale))
        if found:
            boxes = list(found) if all_faces else found[:1]
        elif policy == "on":
            raise NoFace("no face found (--face-crop on)")
        else:
            note = "no face found: the whole image was classified"
    out = []
    for box in boxes:
        crop = im
        if box is not None:
            x, y, w, h = faces.expand(box, pre.face_margin, im.width, im.height)
            crop = im.crop((x, y, x + w, y + h))
        crop = crop.resize((pre.image_size, pre.image_size), Image.Resampling.BILINEAR)
        out.append(Decoded(np.asarray(crop, dtype=np.uint8), box, note))
    return out


def decode(path: str | Path, pre: Preprocess, all_faces: bool = False, face_crop: str | None = None) -> list[Decoded]:
    """Decode one file and :func:`prepare` it."""
    im = open_rgb(path, pre.max_pixels)
    return prepare(im, pre, all_faces, face_crop, key=file_key(path))


def decode_each(
    paths: Sequence[str | Path], pre: Preprocess, all_faces: bool = False, face_crop: str | None = None
) -> list[list[Decoded] | BadImage]:
    """Files decoded and prepared in parallel threads (Pillow and the face detector release the GIL); a file
    that cannot be used gives the :class:`BadImage` saying why, in its place."""

    def one(p: str | Path) -> list[Decoded] | BadImage:
        try:
            return decode(p, pre, all_faces, face_crop)
        except BadImage as e:
            return e
        except Exception as e:  # noqa: BLE001 - an odd file must never stop a run
            return BadImage(f"unreadable ({e.__class__.__name__}: {e})")

    with ThreadPoolExecutor(min(8, (os.cpu_count() or 1) * 2)) as pool:
        return list(pool.map(one, paths))


def decode_many(paths: Sequence[str | Path], pre: Preprocess) -> tuple[list[Decoded | None], list[str]]:
    """Each file's first (largest-face) input, or None and the reason it cannot be used ("" when it can)."""
    results = decode_each(paths, pre)
    return (
        [None if isinstance(r, BadImage) else r[0] for r in results],
        [str(r) if isinstance(r, BadImage) else "" for r in results],
    )


def to_tensor(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    if not images:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------- folder layout
