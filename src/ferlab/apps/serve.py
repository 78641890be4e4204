"""``ferlab serve``: a REST API and a web page that classify the faces in uploaded photos.

    ferlab serve                                     # the shipped ferplus model on http://127.0.0.1:8000
    ferlab serve --checkpoint fer2013 --checkpoint runs/x/vgg-small/model.ckpt --port 8080
    curl -F image=@photo.jpg http://127.0.0.1:8000/v1/predict

Endpoints: ``POST /v1/predict`` (multipart field ``image``, repeatable; a raw image body; or JSON
``{"image": BASE64}`` / ``{"images": [...]}``, with or without a ``data:image/...;base64,`` prefix; optional
``model`` and ``all_faces`` as query or JSON fields), ``GET /v1/models`` (each model's card), ``GET /healthz``,
``GET /`` (the page) and ``GET /docs`` (OpenAPI).

Requests share forward passes: a :class:`Batcher` per model collects the faces of requests that arrive within
a few milliseconds and classifies them in one batch on its own thread, while decoding and face detection run
in the server's thread pool, so the event loop never waits on a model. At most ``IN_FLIGHT`` requests are
being worked on at once; the others wait in arrival order, which keeps the slowest requests close to the
median under load. Beyond ``MAX_PENDING`` requests held at once (uploading, waiting or in the works), the next
are refused with 503 before their bodies are read. Bodies are read with a byte limit and refused as soon as they
pass it; no request names a file on disk.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import io
import json
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ferlab.core.errors import FerlabError
from ferlab.data.images import WEB_FORMATS, BadImage, Decoded, NoFace, crop_policy, decode_image
from ferlab.inference.model import ALL_FACES, Face, Model
from ferlab.reporting.cards import public, summary

MAX_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000
FORM_CHUNK = 1 << 16  # a multipart body is handed to the form parser this many bytes at a time
MAX_IMAGES = 16  # images in one request
MAX_FIELDS = 16  # other fields of a multipart form
IN_FLIGHT = 16  # requests being decoded, detected or classified at once (see create_app)
MAX_PENDING = 128  # requests held at once (receiving, waiting or in the works); more are refused with 503
BODY_SECONDS = 60.0  # a request body must have arrived within this (10 MB at 1.4 Mbit/s)


def cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Batcher:
    """One model's forward passes: faces submitted from any thread within ``max_wait`` seconds of each other
    (up to ``max_batch``) are classified together on this batcher's thread."""

    def __init__(self, model: Model, max_batch: int = 64, max_wait: float = 0.004):
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait
        self.queue: queue.Queue[tuple[list[Decoded], concurrent.futures.Future]] = queue.Queue()
        threading.Thread(target=self._run, name=f"ferlab-batcher-{model.label}", daemon=True).start()

    def submit(self, crops: list[Decoded]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not crops:
            future.set_result([])
        else:
            self.queue.put((crops, future))
        return future

    def _run(self) -> None:
        while True:
            items = [self.queue.get()]
            n = len(items[0][0])
            deadline = time.monotonic() + self.max_wait
            while n < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    items.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
                n += len(items[-1][0])
            live = [(c, f) for c, f in items if f.set_running_or_notify_cancel()]  # a gone client's are dropped
            try:
                faces = self.model.classify([c for crops, _ in live for c in crops])
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error, the thread lives on
                for _, f in live:
                    f.set_exception(e)
                continue
            k = 0
            for crops, f in live:
                f.set_result(faces[k : k + len(crops)])
                k += len(crops)


@dataclass
class Upload:
    data: bytes | bytearray
    name: str


class BufferReader(io.RawIOBase):
    """A seekable read-only file over a body's buffer that does not copy it (``io.BytesIO`` copies a bytearray)."""

    def __init__(self, buffer: bytes | bytearray):
        super().__init__()
        self.view, self.pos = memoryview(buffer), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), len(self.view) - self.pos))
        b[:n] = self.view[self.pos : self.pos + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = max(0, offset + (0, self.pos, len(self.view))[whence])
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self.view.release()  # the buffer may be cleared or resized again
        super().close()


class Refused(HTTPException):
    """An HTTP error whose ``detail`` is one sentence."""


STATUS = {"format": 415, "mode": 415, "pixels": 413, "corrupt": 422}  # BadImage.kind -> HTTP status


def _open(upload: Upload, max_pixels: int, used: int = 0) -> Image.Image:
    """Bytes -> upright RGB image through ferlab's one decoder, or a 413/415/422 saying why not; ``used``: pixels
    of the request's earlier images, which count against the same limit."""
    if not upload.data:
        raise Refused(422, f"{upload.name} is empty.")
    try:
        with BufferReader(upload.data) as fp:
            return decode_image(fp, max_pixels, used, WEB_FORMATS)
    except BadImage as e:
        reason = str(e)
        if e.kind == "format":
            reason = "not an image this server can read (JPEG, PNG, WebP, BMP or GIF)"
        elif e.kind == "corrupt":
            reason = "truncated or corrupt"
        raise Refused(STATUS.get(e.kind, 422), f"{upload.name}: {reason}.") from None
    except Exception as e:  # noqa: BLE001 - whatever a decoder raises on hostile data is the client's bad image
        raise Refused(422, f"{upload.name} could not be decoded ({e.__class__.__name__}).") from None


def _base64(text: Any, name: str) -> Upload:
    if not isinstance(text, str):
        raise Refused(422, f"'{name}' must be a base64 string.")
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise Refused(422, f"'{name}' is a data URL without base64 content.")
    try:
        return Upload(base64.b64decode(text, validate=True), f"The base64 image {name}")
    except (binascii.Error, ValueError):
        raise Refused(422, f"'{name}' is not valid base64.") from None


async def read_limited(request: Request, limit: int) -> bytearray:
    """The request body, refused (413) as soon as it passes ``limit`` bytes, before it is all received, and
    (408) when it has not all arrived within ``BODY_SECONDS``: a stalled upload must not hold its place."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Refused(413, f"The request body is {int(declared):,} bytes, over the limit of {limit:,}.")

    async def receive() -> bytearray:  # one buffer, grown in place: the body is held once, not as chunks + copy
        body = bytearray()
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise Refused(413, f"The request body is over the limit of {limit:,} bytes.")
            body += chunk
        return body

    try:  # wait_for, not asyncio.timeout: the same on Python 3.10
        return await asyncio.wait_for(receive(), BODY_SECONDS)
    except asyncio.TimeoutError:
        raise Refused(408, f"The request body did not arrive within {BODY_SECONDS:g} s.") from None


def _flag(value: Any, name: str) -> bool:
    """A boolean option given as JSON true/false or as text (a query or form field)."""
    text = "" if value is None else str(value).lower()
    if text == "":  # JSON null or an empty field: the default
        return ALL_FACES
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise Refused(422, f"'{name}' must be true or false, not {str(value)[:40]!r}.")


async def parse(request: Request, limit: int) -> tuple[list[Upload], dict[str, Any]]:
    """The uploaded images and options of a predict request, whatever its content type."""
    body = await read_limited(request, limit)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    options: dict[str, Any] = dict(request.query_params)
    if ctype == "multipart/form-data":
        return await _parse_form(request, body, options)
    if ctype == "application/json":  # parsing and base64 decoding take a worker thread, not the event loop
        return await run_in_threadpool(_parse_json, body, options)
    if ctype.startswith("image/") or ctype in ("application/octet-stream", "") or is_image(body):
        # an image body under another type (curl --data-binary says application/x-www-form-urlencoded) is
        # taken by its bytes, as files on disk are
        return _parse_image(body, options)
    raise Refused(415, f"Unsupported content type {ctype}; send multipart/form-data, JSON or an image body.")


def is_image(body: bytes) -> bool:
    """Whether ``body``'s header is one of the formats the server decodes (Pillow reads the header only)."""
    try:
        with BufferReader(body) as fp, Image.open(fp, formats=WEB_FORMATS):
            return True
    except Exception:  # noqa: BLE001 - anything Pillow cannot identify is not an image here
        return False


def _form_refused(e: StarletteHTTPException) -> Refused:
    """Starlette's refusal of a multipart form (400 in its own words) as ours."""
    detail = str(e.detail)
    if detail.startswith("Too many files"):
        return Refused(413, f"More than {MAX_IMAGES} images in one request (the limit).")
    if detail.startswith("Too many fields"):
        return Refused(413, f"More than {MAX_FIELDS} form fields in one request.")
    reason = detail[:1].lower() + detail[1:].rstrip(".")
    return Refused(422, f"The multipart form could not be read ({reason}).")


async def _parse_form(
    request: Request, body: bytearray, options: dict[str, Any]
) -> tuple[list[Upload], dict[str, Any]]:
    """A multipart form: the files of its ``image`` field, its other fields as options."""

    starts = iter(range(0, len(body) or 1, FORM_CHUNK))

    async def receive() -> dict:  # the body in small pieces: the parser's parts are never a second whole copy
        i = next(starts, len(body))
        return {
            "type": "http.request",
            "body": bytes(body[i : i + FORM_CHUNK]),
            "more_body": i + FORM_CHUNK < len(body),
        }

    try:
        form = await Request(request.scope, receive).form(max_files=MAX_IMAGES, max_fields=MAX_FIELDS)
    except StarletteHTTPException as e:  # Starlette's parser refuses with 400 and its own words
        raise _form_refused(e) from None
    finally:
        body.clear()  # the parts are the form's now
    try:
        files = [v for k, v in form.multi_items() if k == "image" and hasattr(v, "read")]
        uploads = [Upload(await f.read(), f"The uploaded file '{f.filename or 'image'}'") for f in files]
        options.update({k: v for k, v in form.multi_items() if not hasattr(v, "read")})
    finally:
        await form.close()  # large parts spool to temporary files: gone with the request
    if not uploads:
        raise Refused(422, "The form has no file in its 'image' field.")
    return uploads, options


def _parse_json(body: bytearray, options: dict[str, Any]) -> tuple[list[Upload], dict[str, Any]]:
    """A JSON object: its base64 ``image`` or ``images``, its other fields as options."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise Refused(422, "The JSON body is not valid JSON.") from None
    finally:
        body.clear()  # the document holds it now
    if not isinstance(doc, dict):
        raise Refused(422, 'The JSON body must be an object such as {"image": "<base64>"}.')
    if "images" in doc:
        if not isinstance(doc["images"], list) or not doc["images"]:
            raise Refused(422, "'images' must be a non-empty list of base64 strings.")
        uploads = []
        for i in range(len(doc["images"])):  # each string let go once decoded
            uploads.append(_base64(doc["images"][i], f"images[{i}]"))
            doc["images"][i] = None
    elif "image" in doc:
        uploads = [_base64(doc.pop("image"), "image")]
    else:
        raise Refused(422, 'The JSON body needs an "image" (base64) or "images" (a list of them).')
    options.update({k: v for k, v in doc.items() if k not in ("image", "images")})
    return uploads, options


def _parse_image(body: bytearray, options: dict[str, Any]) -> tuple[list[Upload], dict[str, Any]]:
    """A raw image body."""
    if not body:
        raise Refused(422, "The request has no body; send an image.")
    return [Upload(body, "The request body")], options


@dataclass
class Server:
    """What the handlers of one app share, made once by :func:`create_app` and kept as ``app.state.server``."""

    by_name: dict[str, Model]  # the models by label
    default: str  # the first model's label
    batchers: dict[str, Batcher]
    admitted: asyncio.Semaphore
    decoding: asyncio.Semaphore
    max_bytes: int
    max_pixels: int
    max_pending: int
    pending: int = 0  # predict requests held now: receiving their body, waiting at the door or in the works


def _server(request: Request) -> Server:
    return request.app.state.server


async def one_sentence(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def page() -> str:
    return (resources.files("ferlab.apps") / "web" / "index.html").read_text()


async def healthz(request: Request) -> dict:
    server = _server(request)
    return {"status": "ok", "models": list(server.by_name), "default": server.default}


async def list_models(request: Request) -> dict:
    server = _server(request)
    return {
        "default": server.default,
        "models": [{**summary(m, paths=False), "card": public(m.card, paths=False)} for m in server.by_name.values()],
    }


async def predict(request: Request) -> dict:
    """Each face's box, label and probabilities for one image (or several: ``results``)."""
    server = _server(request)
    max_pending = server.max_pending
    if server.pending >= max_pending:  # refused before its body is read: held bodies stay under a bound
        raise Refused(
            503,
            f"The server is busy ({max_pending} request{' is' if max_pending == 1 else 's are'} ahead); "
            "try again shortly.",
            {"Retry-After": "1"},
        )
    server.pending += 1
    try:
        return await answer(request, server)
    except ClientDisconnect:  # gone mid-upload: nobody to answer, nothing to log
        return Response(status_code=499)
    finally:
        server.pending -= 1


Prepared = list[tuple[tuple[int, int], str, list[Decoded]]]  # per image: its size, crop policy and face crops


def prepare(uploads: list[Upload], model: Model, all_faces: bool, max_pixels: int) -> Prepared:
    """Decode each upload and find its faces (in a worker thread)."""
    out, pixels = [], 0
    for up in uploads:
        im = _open(up, max_pixels, pixels)  # the pixel limit holds for the whole request
        pixels += im.width * im.height
        policy = crop_policy(model.pre, im.size)
        try:
            crops = model.prepare(im, all_faces=all_faces)
        except NoFace:
            crops = []
        out.append((im.size, policy, crops))  # the image itself is dropped here
    return out


async def answer(request: Request, server: Server) -> dict:
    t0 = time.perf_counter()
    uploads, options = await parse(request, server.max_bytes)
    if len(uploads) > MAX_IMAGES:
        raise Refused(413, f"{len(uploads)} images in one request; the limit is {MAX_IMAGES}.")
    name = str(options.get("model") or server.default)
    if name not in server.by_name:
        raise Refused(404, f"No model called '{name}' is served here; served: {', '.join(server.by_name)}.")
    model = server.by_name[name]
    all_faces = _flag(options.get("all_faces", ALL_FACES), "all_faces")
    async with server.admitted:  # waiting here holds no worker thread, so /healthz always answers
        if await request.is_disconnected():  # gone while it waited: its turn goes to the next request
            raise Refused(499, "The client closed the connection before its turn.")
        async with server.decoding:
            prepared = await run_in_threadpool(prepare, uploads, model, all_faces, server.max_pixels)
        future = server.batchers[name].submit([c for _, _, crops in prepared for c in crops])
        faces: list[Face] = await asyncio.wrap_future(future)
    results = _results(prepared, faces)
    elapsed = round(1000 * (time.perf_counter() - t0), 2)
    if len(results) == 1:
        return {"model": name, **results[0], "elapsed_ms": elapsed}
    return {"model": name, "results": results, "elapsed_ms": elapsed}


def _results(prepared: Prepared, faces: list[Face]) -> list[dict[str, Any]]:
    """Each image's answer: its size, its faces (``box`` None where no face was found, as
    :func:`ferlab.analyze` says it) and crop policy."""
    results, k = [], 0
    for (width, height), policy, crops in prepared:
        mine = faces[k : k + len(crops)]
        k += len(crops)
        result: dict[str, Any] = {
            "image": {"width": width, "height": height},
            "faces": [f.as_dict() for f in mine],
            "face_crop": policy,
        }
        if not crops:
            result["note"] = "no face found"
        elif crops[0].note:
            result["note"] = crops[0].note
        results.append(result)
    return results


PREDICT_OPENAPI = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "model": {"type": "string"},
                        "all_faces": {"type": "boolean"},
                    },
                    "required": ["image"],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "description": "base64, optionally a data: URL"},
                        "images": {"type": "array", "items": {"type": "string"}},
                        "model": {"type": "string"},
                        "all_faces": {"type": "boolean"},
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
        "required": True,
    }
}


def create_app(
    models: list[Model], max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS, max_pending: int = MAX_PENDING
) -> FastAPI:
    """The server's app: ``models`` by label, the first the default; at most ``max_pending`` predict requests
    held at once (each may hold up to ``max_bytes`` of body while it waits), the next ones refused with 503."""
    by_name = {m.label: m for m in models}
    app = FastAPI(
        title="ferlab",
        description="Facial-emotion classification: upload a photo, get each face's box and emotion probabilities.",
        version="1",
    )
    app.state.server = Server(
        by_name=by_name,
        default=models[0].label,
        batchers={name: Batcher(m) for name, m in by_name.items()},
        # at most IN_FLIGHT requests are past the door at once (decoding, detecting or waiting for their batch);
        # the rest wait at the door in arrival order. Unbounded, the backlog gathered in front of the classifier
        # and a request could wait for a whole long batch: at 50 clients p99 was 1.5-1.9x p50 rather than
        # 1.2-1.3x.
        admitted=asyncio.Semaphore(IN_FLIGHT),
        # one request decoding and detecting per core (detection runs on one thread): at 50 clients on 2 cores
        # this served 69-82 requests/s where 4 at once served 64-74, side by side (README); at most 4, as before,
        # since decoding a large image takes memory (and a container's CPU quota may be below the cores it sees)
        decoding=asyncio.Semaphore(min(4, cores())),
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        max_pending=max_pending,
    )
    app.add_exception_handler(HTTPException, one_sentence)
    app.get("/", response_class=HTMLResponse, include_in_schema=False)(page)
    app.get("/healthz")(healthz)
    app.get("/v1/models")(list_models)
    app.post("/v1/predict", openapi_extra=PREDICT_OPENAPI)(predict)
    return app


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, or one sentence saying why not (taken, or no such address here); bound
    before the models load, so a busy port is said at once and not after a "serving" line."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:  # no such host name
        raise FerlabError(f"Cannot listen on {host}:{port}: {(e.strerror or str(e)).lower()}.") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # listening now: another server's bind to this port fails at once (bound alone, it would not)
    except OSError as e:
        sock.close()
        raise FerlabError(f"Cannot listen on {host}:{port}: {(e.strerror or str(e)).lower()}.") from None
    return sock


def serve(
    models: list[Model],
    sock: socket.socket,
    max_bytes: int,
    max_pending: int = MAX_PENDING,
    max_pixels: int = MAX_PIXELS,
) -> None:
    import uvicorn

    app = create_app(models, max_bytes, max_pixels, max_pending)
    host, port = sock.getsockname()[:2]
    # a stop (Ctrl-C, SIGTERM) waits at most 5 s for requests still in the works
    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=5, timeout_graceful_shutdown=5)
    print(f"ferlab: serving {', '.join(m.label for m in models)} on http://{host}:{port}/ (API docs at /docs)")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped: no error
        pass
    finally:
        sock.close()
