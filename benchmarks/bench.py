"""ferlab speed benchmark: per model and for the whole study, optionally beside the Keras yardstick.

usage:
    python benchmarks/bench.py SPLIT_DIR [--models ...] [--epochs 3] [--json out.json]
                               [--keras-python /path/to/venv/bin/python] [--full-run]

SPLIT_DIR is a train/val/test folder-per-class tree, such as the reference CK+48 split made by
``python ../shared/peers/make_split.py ../shared/datasets/ckplus48 /tmp/ckref --seed 0``.

Per model it measures, each in a fresh process so peak memory is the model's own: the median seconds of a
training epoch (and training images/s), the one-time frozen-feature extraction of transfer models, the
latency of predicting one image and the throughput of 256-image batches, the training FLOP/s achieved
against this machine's measured matmul FLOP/s (fp32 and bf16), and peak resident memory. With
``--keras-python`` it runs ../shared/peers/keras_study.py on the same split in that interpreter and prints
ferlab/Keras ratios; with ``--full-run`` it times the whole ``ferlab run`` (three models, tables, report).
With ``--precision auto`` (the default) on a CPU with native bf16, each model trains in fp32 and in bf16 mixed
precision, each in its own process, and ``--precision auto``'s probe runs fresh (uncached) beside them: a table
prints the probe's fp32/bf16 step ratio beside the epochs' ratio (the goal: within 25%), and the other tables
take the precision the probe picks, as a first run on the machine would. ``--models all`` takes every
registry model.
Where CUDA is available everything runs there (``--precision auto``: mixed precision), matmul FLOP/s is the
GPU's, and peak GPU memory is reported beside the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import LoadMeter  # noqa: E402

KERAS_STUDY = HERE.parent.parent / "shared" / "peers" / "keras_study.py"
VGG_WEIGHTS = HERE.parent.parent / "shared" / "weights" / "vgg16_imagenet_features.pth"
WEIGHTS = {
    "vgg16-transfer": VGG_WEIGHTS,
    "mobilenetv2-transfer": HERE.parent.parent / "shared" / "weights" / "mobilenet_v2-b0353104.pth",
}
KERAS_NAMES = {"baseline-cnn": "m1", "regularized-cnn": "m2", "vgg16-transfer": "vgg"}


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    if DEVICE.type == "cuda":
        n, reps = 8192, 20
    a, b = torch.randn(n, n, dtype=dtype, device=DEVICE), torch.randn(n, n, dtype=dtype, device=DEVICE)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def train_flops_per_image(net: torch.nn.Module, size: int) -> float:
    """Forward + backward FLOPs of one training image, counted by PyTorch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    for p in net.parameters():
        p.requires_grad_(True)
    x = torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8)
    counter = FlopCounterMode(display=False)
    with counter:
        out = net(x)
        out.sum().backward()
    return counter.get_total_flops() / 8


def build(name: str, data, cfg) -> torch.nn.Module:
    """A registry model as the study builds it, with the shared folder's ImageNet weights for transfer models."""
    from ferlab.apps.study import build_from_source
    from ferlab.core.config import StudyConfig
    from ferlab.models.registry import EMOTION_TRANSFER, create_model

    if name == EMOTION_TRANSFER:  # from the shipped model, with its classes' head rows
        return build_from_source(data, StudyConfig(train=cfg))
    weights = WEIGHTS.get(name)
    if weights is not None and not weights.is_file():
        sys.exit(f"{name} needs {weights}")
    return create_model(name, len(data.classes), data.pre.image_size, str(weights or "none"), cfg.backbone_size)


def one_model(name: str, split: str, epochs: int, precision: str) -> dict:
    """Runs inside a child process: everything measured for one model."""
    from ferlab.core.config import DataConfig, TrainConfig
    from ferlab.data.datasets import load_data
    from ferlab.inference.model import run_batches
    from ferlab.models.registry import REGISTRY
    from ferlab.training.fit import fit_model

    data = load_data(DataConfig(data=split))
    transfer = REGISTRY[name].transfer
    # the study's own recipe: transfer models at the default backbone size, both stages
    cfg = TrainConfig(max_epochs=epochs, patience=10**6, progress=False, precision=precision)
    torch.manual_seed(0)
    net = build(name, data, cfg)
    t = time.perf_counter()
    fit = fit_model(name, net, data, cfg)
    total = time.perf_counter() - t
    # a transfer model's epoch: stage 2's (its last layers train on the cached output of the rest), the slower
    secs = [e["seconds"] for e in fit.epochs if e["stage"] == max(e["stage"] for e in fit.epochs)]
    epoch_s = statistics.median(secs)
    out = {
        "model": name,
        "epochs_timed": len(secs),
        "epoch_s_median": epoch_s,
        "train_images_per_s": len(data.splits["train"]) / epoch_s,
        "precision": fit.precision,
        "precision_note": fit.precision_note,
        "fit_s": total,
        "setup_s": total - sum(e["seconds"] for e in fit.epochs),
    }  # for transfer models: mostly the one-time frozen-feature pass
    if transfer:
        out["stage1_epoch_s"] = statistics.median(e["seconds"] for e in fit.epochs if e["stage"] == 1)
        # stage 1 without the cache (the backbone runs every step), for the speed-up
        torch.manual_seed(0)
        slow = build(name, data, cfg)
        nocache = fit_model(
            name,
            slow,
            data,
            TrainConfig(
                max_epochs=1, patience=10**6, progress=False, fine_tune=False, feature_cache=False, precision=precision
            ),
        )
        out["stage1_epoch_s_without_feature_cache"] = statistics.median(e["seconds"] for e in nocache.epochs)
    net.to(DEVICE).eval()  # inference where training ran
    one = data.splits["test"].images[:1]
    lat = []
    for _ in range(21):
        t = time.perf_counter()
        run_batches(net, one)
        lat.append(time.perf_counter() - t)
    out["latency_1_image_ms"] = 1000 * statistics.median(lat[1:])
    batch = data.splits["test"].images.repeat(3, 1, 1, 1)[:256]
    run_batches(net, batch)
    t = time.perf_counter()
    run_batches(net, batch)
    out["throughput_batch256_images_per_s"] = 256 / (time.perf_counter() - t)
    if not transfer:
        per_image = train_flops_per_image(net.cpu(), data.pre.image_size)
        out["train_gflop_per_image"] = per_image / 1e9
        out["achieved_train_gflops"] = per_image * out["train_images_per_s"] / 1e9
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if DEVICE.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def probe(name: str, split: str) -> dict:
    """Runs inside a child process: what ``--precision auto`` measures on a first run, uncached."""
    from ferlab.core.config import DataConfig, TrainConfig
    from ferlab.data.datasets import load_data
    from ferlab.training.precision import measure

    data = load_data(DataConfig(data=split))
    side = build(name, data, TrainConfig()).normalize.size  # as fit_model passes it
    choice = measure(name, len(data.classes), data.pre.image_size, TrainConfig().batch_size, side)
    return {**choice.__dict__, "note": choice.message(name).removeprefix("ferlab: ")}


def child(a: argparse.Namespace, name: str, precision: str | None, env: dict) -> dict:
    """One model's measurement in a fresh process: its epochs in ``precision``, or (None) auto's probe."""
    what = ["--probe", name] if precision is None else ["--one", name, "--epochs", str(a.epochs)]
    r = subprocess.run(
        [sys.executable, __file__, a.split, *what, "--precision", precision or "auto"], capture_output=True, text=True
    )
    if r.returncode:
        sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
    row = json.loads(r.stdout.strip().splitlines()[-1])
    if precision is None:
        print(f"{name}: probe {row['speedup']:.2f}x ({row['low']:.2f}-{row['high']:.2f})", flush=True)
        return row
    if row.get("achieved_train_gflops") is not None:
        row["fp32_peak_share"] = row["achieved_train_gflops"] / env["matmul_gflops_fp32"]
    print(f"{name}: {row['epoch_s_median']:.2f} s/epoch in {precision}", flush=True)
    return row


def probe_row(name: str, pick: dict, measured: dict[str, dict]) -> dict:
    """The probe's fp32/bf16 step ratio beside the epochs' ratio; within 25% is the goal."""
    epochs = measured["32"]["epoch_s_median"] / measured["bf16-mixed"]["epoch_s_median"]
    return {
        "model": name,
        "probe_fp32_ms": pick["fp32_ms"],
        "probe_bf16_ms": pick["bf16_ms"],
        "probe_ratio": pick["speedup"],
        "probe_interval": f"{pick['low']:.2f}-{pick['high']:.2f}",
        "epoch_fp32_s": measured["32"]["epoch_s_median"],
        "epoch_bf16_s": measured["bf16-mixed"]["epoch_s_median"],
        "epoch_ratio": epochs,
        "probe_over_epoch": pick["speedup"] / epochs,
        "within_25%": "yes" if abs(pick["speedup"] / epochs - 1) <= 0.25 else "NO",
        "auto_picks": pick["precision"],
        "best": "bf16-mixed" if epochs >= 1 else "32",
    }


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:,.2f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    return "\n".join(
        ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
        + ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("split")
    ap.add_argument(
        "--models",
        nargs="+",
        default=["baseline-cnn", "regularized-cnn", "vgg16-transfer"],
        help="registry models, or 'all' (the study's three by default)",
    )
    ap.add_argument("--epochs", type=int, default=3, help="timed training epochs per model")
    ap.add_argument(
        "--precision",
        default="auto",
        help="auto: on a CPU with native bf16, every model trains in fp32 and in bf16 beside auto's probe, and the "
        "tables take the precision the probe picks; 32, bf16-mixed: that precision only",
    )
    ap.add_argument("--keras-python", help="python of a venv with tensorflow-cpu (see keras_study.py)")
    ap.add_argument("--keras-epochs", type=int, default=3)
    ap.add_argument("--full-run", action="store_true", help="also time the whole `ferlab run` on the split")
    ap.add_argument("--json", default="benchmark.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one_model(a.one, a.split, a.epochs, a.precision)))
        return
    if a.probe:
        print(json.dumps(probe(a.probe, a.split)))
        return

    from ferlab.training.precision import fingerprint

    meter = LoadMeter()
    env = {
        "machine": fingerprint(),
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "matmul_gflops_fp32": matmul_flops(torch.float32) / 1e9,
        "matmul_gflops_bf16": matmul_flops(torch.bfloat16) / 1e9,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(
        f"matmul (2048^3 on a CPU, 8192^3 on CUDA): fp32 {env['matmul_gflops_fp32']:.0f} GFLOP/s, "
        f"bf16 {env['matmul_gflops_bf16']:.0f} GFLOP/s ({env['device']}, {env['threads']} CPU threads)",
        flush=True,
    )
    from ferlab.models.registry import REGISTRY
    from ferlab.training.precision import native_bf16

    if a.models == ["all"]:
        a.models = list(REGISTRY)

    both = a.precision == "auto" and DEVICE.type == "cpu" and native_bf16()
    rows, probes = [], []
    for name in a.models:
        if not both:
            rows.append(child(a, name, a.precision, env))
            continue
        measured = {p: child(a, name, p, env) for p in ("32", "bf16-mixed")}
        pick = child(a, name, None, env)  # auto's probe, as a first run on this machine measures it
        probes.append(probe_row(name, pick, measured))
        rows.append({**measured[pick["precision"]], "precision_note": pick["note"]})

    keras = {}
    if a.keras_python:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "keras.json"
            cmd = [
                a.keras_python,
                str(KERAS_STUDY),
                a.split,
                str(out),
                "--max-epochs",
                str(a.keras_epochs),
                "--models",
                *[KERAS_NAMES[m] for m in a.models if m in KERAS_NAMES],
            ]
            if VGG_WEIGHTS.is_file():
                cmd += ["--vgg-weights", str(VGG_WEIGHTS)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"keras_study.py failed:\n{r.stderr[-3000:]}")
            keras = json.loads(out.read_text())
        for row in rows:
            k = keras.get(KERAS_NAMES.get(row["model"], ""))
            if k:
                row["keras_epoch_s"] = k["epoch_s_median"]
                row["ratio_ferlab_over_keras"] = row["epoch_s_median"] / k["epoch_s_median"]

    full = None
    if a.full_run:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "ferlab",
                    "run",
                    a.split,
                    "--out",
                    tmp,
                    "--no-progress",
                    "--weights",
                    str(VGG_WEIGHTS),
                    "--predict-dir",
                    str(Path(a.split) / "test"),
                ],
                capture_output=True,
                text=True,
            )
            full = {"seconds": time.perf_counter() - t, "returncode": r.returncode, "table": r.stdout.strip()}
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)

    print(f"machine: {env['machine']}")
    for row in rows:
        print(f"{row['model']}: {row['precision_note']}")
    if probes:
        print("\n--precision auto's probe against the epochs it predicts (fp32 time / bf16 time):")
        print(table(probes, list(probes[0])))
    cols = [
        "model",
        "precision",
        "epoch_s_median",
        "keras_epoch_s",
        "ratio_ferlab_over_keras",
        "train_images_per_s",
        "setup_s",
        "stage1_epoch_s",
        "stage1_epoch_s_without_feature_cache",
        "latency_1_image_ms",
        "throughput_batch256_images_per_s",
        "train_gflop_per_image",
        "achieved_train_gflops",
        "fp32_peak_share",
        "peak_rss_mb",
        "peak_gpu_mb",
    ]
    print()
    print(table(rows, cols))
    if full:
        print(f"\nferlab run (three models, tables, predictions, report): {full['seconds']:.0f} s")
        print(full["table"])
    env["load"] = meter.measure()
    print(meter.verdict())
    record = {"env": env, "models": rows, "probes": probes, "keras": keras, "full_run": full}
    Path(a.json).write_text(json.dumps(record, indent=1))
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
