"""Load on ``ferlab serve``: requests/s and latency percentiles for N concurrent clients, and a soak run's memory.

usage:
    python benchmarks/serve_load.py [--checkpoint fer2013] [--image FILE] [--clients 1 50] [--seconds 20]
                                    [--soak 10000] [--json out.json]

Starts ``ferlab serve`` on 127.0.0.1 (a free port) in a child process, waits for /healthz, then for each
client count drives POST /v1/predict (multipart, one image) from that many concurrent asyncio clients for
``--seconds`` (it stops by itself), and prints requests/s, p50/p95/p99 latency, the error count and the CPU
time a request cost in the server and in this load generator (they share the machine's cores, so requests/s
can be at most the core count divided by their sum). With
``--soak N`` it then sends N requests from 8 clients and samples the server's resident memory (VmRSS) every
500 requests: it should stop growing after warm-up. The default image is a 640x480 photo composed from a
CK+48 face (one face to detect and classify).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import LoadMeter  # noqa: E402

CKPLUS = HERE.parent.parent / "shared" / "datasets" / "ckplus48"


def default_image() -> bytes:
    """640x480 JPEG with one face (from CK+48 when present, else a blank frame)."""
    canvas = Image.new("RGB", (640, 480), (110, 120, 135))
    faces = sorted((CKPLUS / "happy").glob("*.png")) if CKPLUS.is_dir() else []
    if faces:
        canvas.paste(Image.open(faces[-1]).convert("RGB").resize((200, 200)), (220, 120))
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoints: list[str], port: int, log: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "ferlab", "serve", "--port", str(port)]
    for c in checkpoints:
        args += ["--checkpoint", c]
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - the server's log stays open while it runs
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ferlab serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("ferlab serve did not answer /healthz within 60 s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def multipart_request(url: str, image: bytes) -> bytes:
    """One complete HTTP/1.1 POST of ``image`` as the multipart field ``image``, the way a browser sends it."""
    parts = httpx.URL(url)
    boundary = "ferlab-load-4f2a9c"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="photo.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST {parts.raw_path.decode()} HTTP/1.1\r\nHost: {parts.host}:{parts.port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes, bool]:
    """Send one request on a kept-alive connection: the status code and body of its answer, and whether the
    server closes the connection after it. An answer without a Content-Length is a ValueError (an error)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip().lower() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if "content-length" not in headers:
        raise ValueError("an answer without a Content-Length")
    body = await reader.readexactly(int(headers["content-length"]))
    return status, body, headers.get("connection") == "close"


async def drive(url: str, image: bytes, clients: int, seconds: float = 0, total: int = 0, on_done=None) -> dict:
    """``clients`` concurrent clients for ``seconds`` (or until ``total`` requests); latencies and errors.

    Each client keeps one HTTP/1.1 connection open and sends one prepared multipart request after another on
    it, reading each answer in full and checking it (status 200, JSON with ``faces``). It is a bare asyncio
    client rather than httpx because the load generator shares the server's two cores: httpx spent 7-14 ms
    of CPU a request at 50 clients, a third of the machine, which is load a real server never carries."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    stop = time.perf_counter() + seconds if seconds else float("inf")
    request = multipart_request(url, image)
    host, port = httpx.URL(url).host, httpx.URL(url).port

    async def client() -> None:
        nonlocal errors, sent
        conn = None
        while time.perf_counter() < stop and (not total or sent < total):
            sent += 1
            t = time.perf_counter()
            try:
                conn = conn or await asyncio.open_connection(host, port)
                status, body, closing = await asyncio.wait_for(exchange(*conn, request), 30)
                ok = status == 200 and "faces" in json.loads(body)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                ok, closing = False, True  # a broken connection is not used again
            if closing:  # (or the server said so, after an error say): the next request opens a new one
                if conn:
                    conn[1].close()
                conn = None
            latencies.append(time.perf_counter() - t)
            errors += not ok
            if on_done is not None:
                on_done(len(latencies))
        if conn:
            conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return 1000 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    return {
        "clients": clients,
        "requests": len(lat),
        "errors": errors,
        "requests_per_s": len(lat) / wall,
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_ms": 1000 * statistics.fmean(lat) if lat else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", action="append", default=[])
    ap.add_argument("--image", help="the image every request sends (default: a composed 640x480 photo)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 50])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--repeat", type=int, default=1, help="runs per client count (the server goals take 5)")
    ap.add_argument("--soak", type=int, default=0, help="requests of the memory soak (0: none)")
    ap.add_argument("--json")
    args = ap.parse_args()
    image = Path(args.image).read_bytes() if args.image else default_image()
    port = free_port()
    t0 = time.perf_counter()
    proc = start_server(args.checkpoint, port)
    url = f"http://127.0.0.1:{port}/v1/predict"
    first = httpx.post(url, files={"image": ("photo.jpg", image, "image/jpeg")}, timeout=60)
    startup = time.perf_counter() - t0
    print(f"server start to first answer: {startup:.2f} s ({first.status_code}, {len(first.json()['faces'])} faces)")
    results = {"startup_s": startup, "cpu": os.cpu_count(), "runs": []}
    whole = LoadMeter(pids=[proc.pid])  # the server's CPU is the benchmark's own
    try:
        for n in [n for n in args.clients for _ in range(args.repeat)]:
            server0, client0 = cpu_seconds(proc.pid), time.process_time()
            meter = LoadMeter(pids=[proc.pid])
            r = asyncio.run(drive(url, image, n, seconds=args.seconds))
            r["machine"] = meter.measure()
            # CPU a request costs, in the server and in this load generator (which shares the machine's cores)
            r["server_cpu_ms"] = 1000 * (cpu_seconds(proc.pid) - server0) / max(1, r["requests"])
            r["client_cpu_ms"] = 1000 * (time.process_time() - client0) / max(1, r["requests"])
            # what the cores could serve if they did nothing but this server's work, and the share reached
            r["cpu_bound_per_s"] = (os.cpu_count() or 1) * 1000 / max(1e-9, r["server_cpu_ms"])
            r["bound_share"] = r["requests_per_s"] / r["cpu_bound_per_s"]
            results["runs"].append(r)
            print(
                f"{n:3d} clients: {r['requests_per_s']:7.1f} req/s, p50 {r['p50_ms']:7.1f} ms, p95 {r['p95_ms']:7.1f} "
                f"ms, p99 {r['p99_ms']:7.1f} ms, {r['errors']} errors of {r['requests']}; CPU a request: server "
                f"{r['server_cpu_ms']:.1f} ms, load generator {r['client_cpu_ms']:.1f} ms; {r['bound_share']:.0%} of "
                f"the CPU bound ({r['cpu_bound_per_s']:.1f} req/s)"
                + ("" if r["machine"]["quiet"] else f" (NOT QUIET: other work took {r['machine']['other_share']:.0%})"),
                flush=True,
            )
        for n in args.clients if args.repeat > 1 else []:
            runs = [r for r in results["runs"] if r["clients"] == n]
            print(
                f"{n:3d} clients, {len(runs)} runs: p99 {max(r['p99_ms'] for r in runs):.0f} ms at worst, "
                f"{sum(r['errors'] for r in runs)} errors, {min(r['bound_share'] for r in runs):.0%}-"
                f"{max(r['bound_share'] for r in runs):.0%} of the CPU bound"
            )
        if args.soak:
            samples = []

            def sample(done: int) -> None:
                if done % 500 == 0:
                    samples.append((done, rss_mb(proc.pid)))

            r = asyncio.run(drive(url, image, 8, total=args.soak, on_done=sample))
            results["soak"] = {**r, "rss_mb": samples}
            print(f"soak: {r['requests']} requests, {r['errors']} errors; resident memory (MB) every 500 requests:")
            print("  " + " ".join(f"{mb:.0f}" for _, mb in samples))
        print(whole.verdict())
    finally:
        proc.terminate()
        proc.wait(10)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
