"""ferlab serve: every endpoint and refusal, the same probabilities as ferlab predict, the page in a real browser."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ferlab.apps.serve import create_app
from ferlab.inference.model import load_models

from .conftest import read_csv, run_cli

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def png(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_file(study) -> Path:
    _, _, (run, _) = study
    return run / "regularized-cnn" / "model.ckpt"


@pytest.fixture(scope="module")
def client(model_file):
    from fastapi.testclient import TestClient

    app = create_app(load_models([str(model_file)]), max_bytes=300_000, max_pixels=40_000_000)
    with TestClient(app) as c:
        yield c


def strings(v) -> list[str]:
    if isinstance(v, dict):
        return [s for x in v.values() for s in strings(x)]
    if isinstance(v, list):
        return [s for x in v for s in strings(x)]
    return [v] if isinstance(v, str) else []


@pytest.mark.slow
def test_endpoints_answer(client):
    h = client.get("/healthz").json()
    assert h == {"status": "ok", "models": ["regularized-cnn"], "default": "regularized-cnn"}
    m = client.get("/v1/models").json()
    assert m["models"][0]["classes"] == ["circle", "square", "triangle"] and "card" in m["models"][0]
    leaks = [s for s in strings(m) if Path(s).is_absolute() or s.startswith(("~", ".."))]
    assert not leaks, leaks  # no server path: the summary's "data" once held the training folder's
    assert m["models"][0]["face_crop"] == "off"  # the card's policy; in words:
    assert (
        m["models"][0]["face_crop_rule"] == "auto for images over 80 px (trained on face crops), off for smaller ones"
    )
    page = client.get("/")
    assert page.status_code == 200 and "getUserMedia" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN, no web font: works offline
    assert client.get("/docs").status_code == 200 and "/v1/predict" in client.get("/openapi.json").text


@pytest.mark.slow
def test_the_same_image_gives_the_same_probabilities_as_ferlab_predict(client, study, model_file, tmp_path):
    _, test, _ = study
    files = sorted((test / "circle").iterdir())[:3] + sorted((test / "square").iterdir())[:3]
    r = run_cli("predict", "--checkpoint", str(model_file), *map(str, files), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    want = {
        Path(row["filename"]).name: row["regularized-cnn_top3"] for row in read_csv(tmp_path / "prediction_results.csv")
    }
    for f in files:
        data = f.read_bytes()
        answers = [
            client.post("/v1/predict", files={"image": (f.name, data, "image/png")}).json(),
            client.post("/v1/predict", content=data, headers={"content-type": "image/png"}).json(),
            client.post("/v1/predict", json={"image": base64.b64encode(data).decode()}).json(),
            client.post(
                "/v1/predict", json={"image": "data:image/png;base64," + base64.b64encode(data).decode()}
            ).json(),
        ]
        for a in answers:
            top = sorted(a["faces"][0]["probabilities"].items(), key=lambda kv: -kv[1])[:3]
            assert " ".join(f"{c}:{p:.3f}" for c, p in top) == want[f.name]
            assert (
                a["image"] == {"width": 40, "height": 40}
                and a["face_crop"] == "off"
                and a["model"] == "regularized-cnn"
            )
            assert abs(sum(a["faces"][0]["probabilities"].values()) - 1) < 1e-4
    batch = client.post("/v1/predict", files=[("image", (f.name, f.read_bytes(), "image/png")) for f in files]).json()
    assert len(batch["results"]) == len(files)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,status,detail",
    [
        ("big", 413, "The request body is 400,000 bytes, over the limit of 300,000."),
        ("text", 415, "The request body: not an image this server can read (JPEG, PNG, WebP, BMP or GIF)."),
        ("truncated", 422, "The request body: truncated or corrupt."),
        ("tiff", 415, "not an image this server can read (JPEG, PNG, WebP, BMP or GIF)."),
        ("bomb", 413, "The request body: 8000x6000 is over the pixel limit of 40,000,000"),
        ("base64", 422, "'image' is not valid base64."),
        ("path", 422, "'image' is not valid base64."),
        ("form", 422, "The form has no file in its 'image' field."),
        ("model", 404, "No model called 'nope' is served here; served: regularized-cnn."),
        ("type", 415, "Unsupported content type text/csv"),
        ("deep", 422, "The JSON body is not valid JSON."),
        ("total", 413, "'1.png': 6000x4000 with the earlier images is over the pixel limit of 40,000,000"),
        ("files", 413, "More than 16 images in one request (the limit)."),
        ("multipart", 422, "The multipart form could not be read (missing boundary in multipart)."),
        ("flag", 422, "'all_faces' must be true or false, not 'maybe'."),
    ],
)
def test_bad_requests_get_one_sentence(client, kind, status, detail, tmp_path):
    good = png(Image.new("RGB", (40, 40), (90, 90, 90)))
    buf = io.BytesIO()
    Image.fromarray(np.ones((8, 8), np.float32)).save(buf, "TIFF")
    post = {
        "big": lambda: client.post("/v1/predict", content=b"\0" * 400_000, headers={"content-type": "image/png"}),
        "text": lambda: client.post("/v1/predict", content=b"hello", headers={"content-type": "image/png"}),
        "truncated": lambda: client.post(
            "/v1/predict", content=good[: len(good) // 2], headers={"content-type": "image/png"}
        ),
        "tiff": lambda: client.post("/v1/predict", content=buf.getvalue(), headers={"content-type": "image/tiff"}),
        "bomb": lambda: client.post(
            "/v1/predict", content=png(Image.new("1", (8000, 6000))), headers={"content-type": "image/png"}
        ),
        "base64": lambda: client.post("/v1/predict", json={"image": "@@@"}),
        "path": lambda: client.post("/v1/predict", json={"image": "/etc/passwd"}),
        "form": lambda: client.post("/v1/predict", data={"model": "regularized-cnn"}, files={"other": ("a.png", good)}),
        "model": lambda: client.post("/v1/predict?model=nope", content=good, headers={"content-type": "image/png"}),
        "type": lambda: client.post("/v1/predict", content=b"a,b", headers={"content-type": "text/csv"}),
        "deep": lambda: client.post(
            "/v1/predict", content=b"[" * 200_000, headers={"content-type": "application/json"}
        ),
        "total": lambda: client.post(
            "/v1/predict", files=[("image", (f"{i}.png", png(Image.new("1", (6000, 4000))))) for i in range(2)]
        ),
        "files": lambda: client.post("/v1/predict", files=[("image", (f"{i}.png", good)) for i in range(17)]),
        "multipart": lambda: client.post("/v1/predict", content=good, headers={"content-type": "multipart/form-data"}),
        "flag": lambda: client.post("/v1/predict?all_faces=maybe", content=good, headers={"content-type": "image/png"}),
    }[kind]
    r = post()
    assert r.status_code == status and detail in r.json()["detail"], r.text


@pytest.mark.slow
def test_no_face_is_a_note_not_an_error(client):
    r = client.post(
        "/v1/predict", content=png(Image.new("RGB", (900, 700), (0, 0, 0))), headers={"content-type": "image/png"}
    )
    body = r.json()
    assert r.status_code == 200 and body["face_crop"] == "auto"  # a photo, unlike the 40 px training images
    assert body["note"] == "no face found: the whole image was classified" and not body["faces"][0]["face_found"]
    assert body["faces"][0]["box"] is None  # as ferlab.analyze says it: no face, no box
    assert body["faces"][0]["unusual"] == "blank image (no contrast)"


@pytest.mark.slow
def test_requests_in_the_works_are_bounded(model_file, monkeypatch):
    """At most IN_FLIGHT requests between decoding and their classified faces, at most one decoding per core;
    without the first bound, requests kept decoding while a slow batch ran and 12 were in the works at once.
    Decoding and classifying are held shut until the bound is reached, so the peaks do not depend on timing."""
    from ferlab.apps import serve

    base = load_models([str(model_file)])[0]
    lock, now, most = threading.Lock(), {"works": 0, "decoding": 0}, {"works": 0, "decoding": 0}
    decode_gate, classify_gate = threading.Event(), threading.Event()

    def count(key: str, step: int) -> None:
        with lock:
            now[key] += step
            most[key] = max(most[key], now[key])

    class Held(type(base)):
        def prepare(self, im, **kw):
            count("works", 1)
            count("decoding", 1)
            decode_gate.wait(10)
            count("decoding", -1)
            return super().prepare(im, **kw)

        def classify(self, crops):
            classify_gate.wait(10)
            out = super().classify(crops)
            count("works", -len(crops))
            return out

    monkeypatch.setattr(serve, "IN_FLIGHT", 3)
    monkeypatch.setattr(serve, "cores", lambda: 2)  # the same bound on any CI machine
    app = create_app([Held(base.name, base.runtime, base.card, base.label)], max_bytes=300_000)
    image = png(Image.new("RGB", (40, 40), (10, 200, 10)))

    async def until(key: str, value: int) -> None:
        for _ in range(500):
            if now[key] == value:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # time for a request past the bound, were there one, to come in

    async def main() -> tuple[list[int], dict, dict]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ferlab") as c:
            posts = [
                asyncio.create_task(c.post("/v1/predict", content=image, headers={"content-type": "image/png"}))
                for _ in range(12)
            ]
            await until("decoding", 2)
            decoding = dict(now)  # two decode (one per core) and nothing else has started
            decode_gate.set()
            await until("works", 3)
            works = dict(now)  # three in the works, the batch held in the classifier
            classify_gate.set()
            answers = await asyncio.gather(*posts)
        return [a.status_code for a in answers], decoding, works

    codes, decoding, works = asyncio.run(main())
    assert codes == [200] * 12
    assert decoding == {"works": 2, "decoding": 2} and works == {"works": 3, "decoding": 0}
    assert most == {"works": 3, "decoding": 2}, most


@pytest.mark.slow
def test_requests_over_the_pending_bound_are_refused_with_503_before_their_body_is_read(model_file):
    base = load_models([str(model_file)])[0]

    class Slow(type(base)):
        def classify(self, crops):
            time.sleep(0.5)
            return super().classify(crops)

    app = create_app([Slow(base.name, base.runtime, base.card, base.label)], max_bytes=300_000, max_pending=3)
    image = png(Image.new("RGB", (40, 40), (10, 200, 10)))
    read = []

    async def streamed():  # a body the server reads only if it takes the request
        read.append(True)
        yield image

    async def main() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ferlab") as c:
            post = lambda body: c.post("/v1/predict", content=body, headers={"content-type": "image/png"})  # noqa: E731
            held = [asyncio.create_task(post(image)) for _ in range(3)]
            await asyncio.sleep(0.1)  # the three are held: the classifier takes 0.5 s
            busy = await post(streamed())
            return list(await asyncio.gather(*held)), busy, await post(image)

    held, busy, after = asyncio.run(main())
    assert [a.status_code for a in held] == [200] * 3
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json() == {"detail": "The server is busy (3 requests are ahead); try again shortly."}
    assert not read, "the refused request's body was read"
    assert after.status_code == 200  # the held requests' places are free again


@pytest.mark.slow
def test_a_stalled_upload_is_refused_with_408_and_frees_its_place(model_file, monkeypatch):
    from ferlab.apps import serve

    monkeypatch.setattr(serve, "BODY_SECONDS", 0.3)
    app = create_app(load_models([str(model_file)]), max_bytes=300_000, max_pending=1)
    image = png(Image.new("RGB", (40, 40), (10, 200, 10)))

    async def stalled():  # a client that sends part of its body, then nothing
        yield image[:100]
        await asyncio.sleep(2)
        yield image[100:]

    async def main() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ferlab") as c:
            post = lambda body: c.post("/v1/predict", content=body, headers={"content-type": "image/png"})  # noqa: E731
            return await post(stalled()), await post(image)

    late, after = asyncio.run(main())
    assert late.status_code == 408 and late.json() == {"detail": "The request body did not arrive within 0.3 s."}
    assert after.status_code == 200  # the one place (max_pending=1) is free again


@pytest.mark.slow
def test_ferlab_serve_takes_its_port_first_and_stops_cleanly_on_ctrl_c(model_file):
    """A second server on a taken port says so in one sentence at once; Ctrl-C stops the first with exit 0 and
    nothing on stderr (uvicorn's own run swallowed it; the server's run with its own socket re-raises it)."""
    import signal
    import subprocess
    import sys

    port = _free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, "-m", "ferlab", "serve", "--checkpoint", str(model_file), "--port", str(port)]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
        assert second.returncode == 2 and "serving" not in second.stdout
        assert f"ferlab: error: Cannot listen on 127.0.0.1:{port}: address already in use." in second.stderr
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200  # the first one is unharmed
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=30)
    finally:
        first.kill()
    assert first.returncode == 0 and err == "", err
    assert out.startswith("ferlab: serving regularized-cnn on http://127.0.0.1:")


def _serve_in_thread(model_file: Path, port: int):
    import uvicorn

    app = create_app(load_models([str(model_file)]))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(model_file):
    port = _free_port()
    server = _serve_in_thread(model_file, port)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True


@pytest.mark.slow
def test_a_streamed_body_over_the_limit_is_refused_before_it_ends(live):
    host, port = live.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: ferlab\r\nContent-Type: image/png\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"\0" * 65536
        for _ in range(162):  # 10.6 MB without a length, over the 10 MB limit; the body's last chunk never comes
            s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        s.settimeout(30)
        head, part = b"", b"-"
        while b"}" not in head and part:  # the status line and headers, then the JSON body; a server that waited
            part = s.recv(65536)  # for the whole body would never answer (a timeout fails the test)
            head += part
    assert head.startswith(b"HTTP/1.1 413") and b"over the limit of 10,485,760 bytes" in head, head[:300]
    assert httpx.get(f"{live}/healthz").json()["status"] == "ok"


@pytest.mark.slow
def test_clients_that_vanish_mid_upload_leave_the_server_healthy(live):
    host, port = live.removeprefix("http://").split(":")
    for _ in range(5):
        s = socket.create_connection((host, int(port)))
        s.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
            + b"\x89PNG" * 100
        )
        s.close()  # gone half-way through its body
    r = httpx.post(
        f"{live}/v1/predict",
        content=png(Image.new("RGB", (40, 40), (200, 10, 10))),
        headers={"content-type": "image/png"},
    )
    assert r.status_code == 200 and httpx.get(f"{live}/healthz").json()["status"] == "ok"


@pytest.mark.slow
def test_eight_clients_for_five_seconds_without_an_error(live):
    spec = importlib.util.spec_from_file_location("serve_load", BENCH / "serve_load.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    image = png(Image.new("RGB", (40, 40), (120, 60, 30)))
    result = asyncio.run(load.drive(f"{live}/v1/predict", image, clients=8, seconds=5))
    assert result["errors"] == 0 and result["requests"] > 40, result


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_the_page_uploads_a_photo_and_draws_each_face_in_a_real_browser(live, study, tmp_path):
    if chromium() is None:
        if os.environ.get("FERLAB_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium package)")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    _, test, _ = study
    photo = sorted((test / "triangle").iterdir())[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium(),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone-width window
        page.goto(live + "/")
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
        page.set_input_files("#file", str(photo))
        page.wait_for_function("document.body.dataset.faces !== undefined", timeout=30000)
        text = page.inner_text("#faces")
        label = httpx.post(
            f"{live}/v1/predict", content=photo.read_bytes(), headers={"content-type": "image/png"}
        ).json()["faces"][0]["label"]
        assert f"Face 1: {label}" in text and "%" in text
        # the canvas shows the photo with a coloured box: not blank, and the box colour is on it
        pixels = page.evaluate(
            "(() => { const c = document.getElementById('canvas'); const d = c.getContext('2d')"
            ".getImageData(0, 0, c.width, c.height).data;"
            " return [c.width, c.height, Array.from(d.slice(0, 4 * c.width))]; })()"
        )
        width, height, top_row = pixels
        assert (width, height) == (40, 40)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scroll
        # each bar is filled in proportion to its probability (an inline span once drew every bar empty)
        fills = page.evaluate(
            "Array.from(document.querySelectorAll('#faces .face:first-child .bar')).map(b => ["
            "b.querySelector('.fill').getBoundingClientRect().width / b.querySelector('.track')"
            ".getBoundingClientRect().width, parseFloat(b.lastChild.textContent) / 100])"
        )
        assert fills and all(abs(shown - p) < 0.01 for shown, p in fills), fills
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    # the first face's box is drawn in the page's first colour (#2e6bd8) along the photo's top edge
    rgba = np.array(top_row).reshape(-1, 4)[:, :3]
    assert (np.abs(rgba - [46, 107, 216]).max(1) < 40).sum() >= 10


@pytest.mark.slow
def test_an_image_body_under_another_content_type_is_taken_by_its_bytes(client):
    """curl --data-binary @photo.jpg says application/x-www-form-urlencoded; the bytes are a JPEG."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (120, 90, 60)).save(buf, "JPEG")
    typed = client.post("/v1/predict", content=buf.getvalue(), headers={"content-type": "image/jpeg"})
    curl = client.post(
        "/v1/predict", content=buf.getvalue(), headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert typed.status_code == curl.status_code == 200, curl.text
    assert curl.json()["faces"] == typed.json()["faces"]
    r = client.post("/v1/predict", content=b"a=1&b=2", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "Unsupported content type application/x-www-form-urlencoded" in r.json()["detail"]


def test_a_body_is_held_once_while_it_is_parsed():
    """The raw JSON body is let go once parsed and each base64 string once decoded; a raw image body is decoded
    through a reader over its buffer, not a copy of it."""
    import json

    from ferlab.apps import serve

    img = png(Image.new("RGB", (8, 8), (1, 2, 3)))
    body = bytearray(json.dumps({"images": [base64.b64encode(img).decode()] * 2, "model": "m"}).encode())
    uploads, options = serve._parse_json(body, {})
    assert len(body) == 0 and [u.data for u in uploads] == [img, img] and options == {"model": "m"}
    raw = bytearray(img)
    im = serve._open(serve.Upload(raw, "The request body"), 1_000)
    assert im.size == (8, 8) and im.getpixel((0, 0)) == (1, 2, 3)
    raw.clear()  # possible only once no view of the buffer is left open
    with serve.BufferReader(b"abcdef") as fp:
        assert fp.read(2) == b"ab" and fp.seek(-1, io.SEEK_END) == 5 and fp.read() == b"f" and fp.read(3) == b""


@pytest.mark.slow
def test_json_bodies_are_parsed_off_the_event_loop(client, monkeypatch):
    from ferlab.apps import serve

    on_loop, real = [], serve._parse_json

    def spy(body, options):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # a worker thread has no running loop
            on_loop.append(False)
        return real(body, options)

    monkeypatch.setattr(serve, "_parse_json", spy)
    good = base64.b64encode(png(Image.new("RGB", (40, 40), (90, 90, 90)))).decode()
    assert client.post("/v1/predict", json={"image": good}).status_code == 200 and on_loop == [False]


def test_serve_takes_its_pixel_limit(monkeypatch):
    from ferlab.apps import serve

    from .conftest import cli

    got = {}
    monkeypatch.setattr(serve, "listen", lambda host, port: None)
    monkeypatch.setattr(serve, "serve", lambda models, sock, *limits: got.update(limits=limits))
    assert cli("serve", "--max-pixels", "5000").returncode == 0 and got["limits"] == (10 * 1024 * 1024, 128, 5000)
    r = cli("serve", "--max-pixels", "0")
    assert r.returncode == 2 and r.stderr.strip() == (
        "ferlab: error: --max-bytes, --max-pending and --max-pixels must be positive and --port between 1 and 65535."
    )
