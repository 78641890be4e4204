"""The ``ferlab`` command.

    ferlab run                                   # the whole study on the built-in synthetic demo set
    ferlab run ../shared/datasets/ckplus48 --drop-classes contempt --group-by '^(S\\d+)_'
    ferlab train DATA --model regularized-cnn --max-epochs 20
    ferlab evaluate runs/<run>/regularized-cnn/model.ckpt DATA
    ferlab predict --checkpoint runs/<run>/vgg16-transfer/model.ckpt photos/ --out predictions/
    ferlab report runs/<run>
    ferlab summary baseline-cnn

A mistake a user can make ends in one ``ferlab: error: ...`` sentence and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ferlab.core.config import (
    DataConfig,
    StudyConfig,
    TrainConfig,
    add_flags,
    is_distributed,
    load_yaml,
    merge,
    overrides_from_args,
)
from ferlab.core.errors import FerlabError
from ferlab.core.files import plural
from ferlab.core.version import __version__
from ferlab.data import demo

if TYPE_CHECKING:
    from ferlab.training.sharded import Engine


def _study_parser(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument(
        "data.data",
        nargs="?",
        default=argparse.SUPPRESS,
        metavar="DATA",
        help="image folder (DIR/<class>/ or DIR/{train,val,test}/<class>/); "
        "omit it for the built-in synthetic demo set",
    )
    p.add_argument("--config", help="YAML file with the settings that differ from the defaults")
    add_flags(p, DataConfig, "data", skip=("data",))
    add_flags(p, TrainConfig, "train")
    add_flags(p, StudyConfig, "", skip=("models",) if name == "train" else ())
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run that was killed: finished models are kept, the interrupted one continues from its "
        "last written epoch (other flags, if given, must match the run's settings)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferlab", description="Train, compare and use facial-emotion classifiers.")
    parser.add_argument("--version", action="version", version=f"ferlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _study_parser(sub, "run", "the whole study: train every model, test each once, compare them")
    train = _study_parser(sub, "train", "train one model into its own run folder")
    train.add_argument(
        "--model", help="the model to train, a registry name (ferlab models lists them; default: the config's one)"
    )
    _evaluate_parser(sub)
    _predict_parser(sub)
    rp = sub.add_parser("report", help="write report.html and report.md for a run folder")
    rp.add_argument("run_dir")
    _summary_parser(sub)
    _export_parser(sub)
    _serve_parser(sub)
    sub.add_parser("models", help="list the registry's architectures and the shipped pretrained models")
    info = sub.add_parser("info", help="print a checkpoint's model card")
    info.add_argument("checkpoint", help="a model.ckpt, an exported .onnx or a shipped model's name")
    return parser


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("evaluate", help="evaluate a saved model on a folder of labelled images")
    ev.add_argument("checkpoint", help="a model.ckpt, an exported .onnx or a shipped model's name (e.g. fer2013)")
    ev.add_argument("data", help="folder-per-class images (DIR/<class>/<images>)")
    ev.add_argument("--out", help="where to write the metrics (default: runs/<timestamp>-evaluate)")
    ev.add_argument(
        "--class-map",
        help="data=model class names where synonyms do not meet (e.g. contempt=disgust,joy=happy); "
        "anger/angry, sadness/sad, happiness/happy, surprised/surprise ... are mapped already",
    )
    ev.add_argument(
        "--drop-classes",
        nargs="+",
        default=[],
        metavar="CLASS",
        help="data class folders (or --labels classes) to leave out",
    )
    ev.add_argument(
        "--labels",
        help="CSV of per-class votes (as train --labels takes): score against each image's majority and report "
        "the vote-weighted accuracy too",
    )
    _scale_flags(ev, "evaluation at scale")


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser("predict", help="predict new images with one or more saved models")
    pr.add_argument(
        "--checkpoint",
        action="append",
        help="a model.ckpt, an exported .onnx, a run folder (all its models) or a shipped model's name; repeat "
        "for more models (default: the shipped ferplus model)",
    )
    pr.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders or glob patterns; or a video, or several videos or folders of them (one output "
        "folder per video and videos_summary.csv)",
    )
    pr.add_argument("--labels", help="CSV of filename,label giving the correct classes")
    pr.add_argument(
        "--largest-face", action="store_true", help="one row per image (its largest face) instead of one per face"
    )
    pr.add_argument("--all-faces", action="store_true", help=argparse.SUPPRESS)  # the default: kept for scripts
    pr.add_argument(
        "--face-crop",
        choices=("off", "auto", "on"),
        help="override the model's own policy: off (whole image), auto (the face when one is found) or on "
        "(skip images without a face); by default each model crops as its training images were",
    )
    pr.add_argument(
        "--explain",
        action="store_true",
        help="also write each face's heatmap for its predicted class into explanations/ and explanation_grid.png",
    )
    pr.add_argument(
        "--explain-method",
        choices=("gradcam", "occlusion"),
        help="how --explain explains (implies it): gradcam (the default) or occlusion (forward passes only: it "
        "explains ONNX models too)",
    )
    pr.add_argument("--every", type=int, help="videos: classify every Nth frame")
    pr.add_argument("--fps", type=float, help="videos: classify this many frames per second")
    pr.add_argument(
        "--smooth", type=float, help="videos: smooth each face's probabilities over this many seconds (default 0.5)"
    )
    pr.add_argument("--out", help="output folder (default: runs/<timestamp>-predict)")
    _scale_flags(pr, "prediction at scale (images; several videos: one per process at a time)")


def _scale_flags(parser: argparse.ArgumentParser, what: str) -> None:
    scale = parser.add_argument_group(f"{what}: the inputs shared out by Lightning's prediction loop, each one once")
    scale.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu", "cuda"))
    scale.add_argument("--devices", default="auto", help="processes per node: devices (e.g. 2, 4 or auto)")
    scale.add_argument("--num-nodes", type=int, default=1, help="nodes (Lightning's num_nodes)")
    scale.add_argument("--strategy", default="auto", help="Lightning's strategy, e.g. ddp (gloo on CPUs)")


def _out_dir(args: argparse.Namespace, kind: str) -> Path:
    """--out, or a new runs/<timestamp>-<kind>; the processes Lightning starts for a distributed command inherit
    the first one's folder."""
    var = f"FERLAB_{kind.upper()}_DIR"
    inherited = os.environ.get(var) if is_distributed(args) else None
    out = Path(args.out or inherited or new_output_dir(kind))
    if is_distributed(args):
        os.environ[var] = str(out)
    return out


def _engine(args: argparse.Namespace) -> Engine | None:
    """The Lightning engine the scale flags ask for, or None for one process."""
    if not is_distributed(args):
        return None
    from ferlab.training.sharded import Engine

    return Engine(args.accelerator, args.devices, args.num_nodes, args.strategy)


def _summary_parser(sub: argparse._SubParsersAction) -> None:
    sm = sub.add_parser("summary", help="print a Keras-style summary of a model or a checkpoint's model")
    sm.add_argument("model", help="a registry model name, a model.ckpt or a shipped model's name")
    sm.add_argument("--num-classes", type=int, default=6)
    sm.add_argument("--image-size", type=int, default=100)
    sm.add_argument(
        "--backbone-size",
        type=int,
        default=TrainConfig().backbone_size,
        help="transfer models: the side their backbone sees (0: the image size)",
    )


def _export_parser(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="export a model to ONNX (preprocessing and model card inside)")
    ex.add_argument("checkpoint", help="a model.ckpt or a shipped model's name")
    ex.add_argument("--format", choices=("onnx",), default="onnx", help="the export format")
    ex.add_argument("--out", help="the file to write (default: beside the checkpoint, or NAME.onnx)")
    ex.add_argument(
        "--quantize",
        choices=("int8",),
        help="also write an int8 model (ONNX Runtime dynamic quantization) if it costs at most --max-drop points",
    )
    ex.add_argument("--data", help="labelled folder-per-class images on which --quantize measures the accuracy change")
    ex.add_argument("--max-drop", type=float, default=1.0, help="most accuracy points int8 may cost (default 1)")
    ex.add_argument(
        "--class-map",
        help="--data's class names mapped onto the model's, as in evaluate: data=model pairs, e.g. anger=angry",
    )
    ex.add_argument("--drop-classes", nargs="+", default=[], metavar="CLASS", help="--data class folders to leave out")


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="serve models over HTTP: a REST API and a web page")
    sv.add_argument(
        "--checkpoint",
        action="append",
        help="a model.ckpt, .onnx, run folder or shipped model's name; repeat to serve several (default: ferplus)",
    )
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-bytes", type=int, default=10 * 1024 * 1024, help="largest request body (default 10 MB)")
    sv.add_argument(
        "--max-pending",
        type=int,
        default=128,
        help="most predict requests held at once, received, waiting or being worked on; more get 503 (default 128)",
    )
    sv.add_argument(
        "--max-pixels",
        type=int,
        default=40_000_000,
        help="most pixels in one request, read from the image headers before decoding; more get 413 (default 40 "
        "megapixels; a decoded pixel takes 3-6 bytes, twice that while a rotated photo is turned upright)",
    )


def new_output_dir(kind: str) -> str:
    """runs/<timestamp>-<kind>: a fresh folder, made now (removed again if the command fails before writing)."""
    from ferlab.core.files import unique_dir

    return str(unique_dir(Path("runs"), kind))


def merge_dicts(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _config(args: argparse.Namespace) -> StudyConfig:
    """The defaults, then the --config file, then the flags; with no data folder at all, the demo's quick
    settings come between the defaults and the rest (:data:`ferlab.data.demo.SETTINGS`)."""
    loaded = load_yaml(args.config) if getattr(args, "config", None) else {}
    given = overrides_from_args(args)
    cfg = merge(StudyConfig(), loaded)
    if merge(cfg, given).data.data is None:
        cfg = merge(merge(merge(StudyConfig(), demo.SETTINGS), loaded), given)
        d, t = cfg.data, cfg.train
        patience = f"patience {t.patience}" if t.patience else "no early stopping"
        print(
            f"ferlab: demo settings (no data folder given): {d.image_size} px images, at most {t.max_epochs} epochs "
            f"a stage, {patience}, transfer backbones at {t.backbone_size} px; flags override them, and a data "
            "folder gets the study's own defaults",
            file=sys.stderr,
        )
        return cfg
    return merge(cfg, given)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        code = _dispatch(args, argv)
    except FerlabError as e:
        print(f"ferlab: error: {e}", file=sys.stderr)
        _remove_empty_folders()
        return 2
    except KeyboardInterrupt:
        print("ferlab: interrupted; files already written in the run folder are complete.", file=sys.stderr)
        _remove_empty_folders()
        return 130
    except BrokenPipeError:  # output piped into head & co.: stop quietly
        sys.stderr.close()
        return 0
    except OSError as e:
        # an --out that names a file, a folder the user cannot write, a path under /proc: one sentence
        if e.filename is None or not e.strerror:
            raise
        print(f"ferlab: error: cannot use {e.filename}: {e.strerror.lower()}.", file=sys.stderr)
        _remove_empty_folders()
        return 2
    _close_process_group()
    return code


def _close_process_group() -> None:
    """A multi-process command (``--devices 2``, ``--num-nodes``) destroys its process group once its work is
    done: left to the interpreter's exit, Gloo's worker threads could outlive it and abort the process
    ("terminate called without an active exception", exit -6) after every file was written. Only on success:
    after an error another rank may still be inside a collective, which destroying would hang."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _remove_empty_folders() -> None:
    from ferlab.core.files import remove_empty_created

    remove_empty_created()


# Each handler imports what its command needs inside itself, so that the CLI loads only that
# (torch, onnxruntime, the web server ...) and `ferlab --help` stays fast.


def _summary(args: argparse.Namespace) -> int:
    from ferlab.models.registry import REGISTRY, create_model
    from ferlab.models.summary import summarize

    if args.model in REGISTRY:
        net = create_model(args.model, args.num_classes, args.image_size, "none", args.backbone_size)
        print(summarize(net, args.image_size, args.model))
        return 0
    from ferlab.inference.model import TorchRuntime, load_model

    model = load_model(args.model)
    if not isinstance(model.runtime, TorchRuntime):
        raise FerlabError(f"{args.model} is an ONNX file; ferlab summary needs a registry name or a .ckpt.")
    print(summarize(model.runtime.net, model.pre.image_size, model.card["model"]))
    return 0


def _export(args: argparse.Namespace) -> int:
    from ferlab.apps.export import export_onnx

    r = export_onnx(
        args.checkpoint, args.out, args.quantize, args.data, args.max_drop, args.class_map, args.drop_classes
    )
    print(
        f"ferlab: wrote {r.path} ({r.size_bytes / 1e6:.1f} MB; ONNX Runtime matches PyTorch within "
        f"{r.max_diff:.1e} on generated inputs)"
    )
    if r.int8_path:
        print(f"ferlab: wrote {r.int8_path} (int8: accuracy {r.accuracy[1]:.4f} against fp32 {r.accuracy[0]:.4f})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ferlab.apps.serve import listen, serve
    from ferlab.inference.model import load_models

    if min(args.max_bytes, args.max_pending, args.max_pixels) < 1 or not 0 < args.port < 65536:
        raise FerlabError(
            "--max-bytes, --max-pending and --max-pixels must be positive and --port between 1 and 65535."
        )
    sock = listen(args.host, args.port)
    serve(load_models(args.checkpoint or []), sock, args.max_bytes, args.max_pending, args.max_pixels)
    return 0


def _models(args: argparse.Namespace) -> int:
    from ferlab.reporting.cards import models_table

    print(models_table())
    return 0


def _info(args: argparse.Namespace) -> int:
    from ferlab.inference.model import load_model
    from ferlab.reporting.cards import describe

    print(describe(load_model(args.checkpoint)))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from ferlab.apps.evaluate import evaluate_model

    out = _out_dir(args, "evaluate")
    m = evaluate_model(
        args.checkpoint, args.data, out, args.class_map, args.drop_classes, args.labels, engine=_engine(args)
    )
    if m is None:  # another rank of a distributed evaluation: rank 0 writes and reports
        return 0
    for note in m["notes"]:
        print(f"ferlab: {note}", file=sys.stderr)
    for w in m["warnings"]:
        print(f"ferlab: warning: {w}", file=sys.stderr)
    print(
        f"{m['name']} ({m['model']}): accuracy {m['accuracy']:.4f} (95% CI {m['ci95'][0]:.4f}-{m['ci95'][1]:.4f}, "
        f"n={m['n']}; chance {m['chance']:.4f}, majority class ({m['majority_class']}) {m['majority']:.4f}), "
        f"macro-F1 {m['macro_f1']:.4f}, expected calibration error {m['ece']:.4f} "
        f"(uncalibrated {m['ece_uncalibrated']:.4f})"
        + (f", vote-weighted accuracy {m['vote_weighted_accuracy']:.4f}" if "vote_weighted_accuracy" in m else "")
        + f"; details in {out}"
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from ferlab.reporting.report import build_report

    html_path, md_path = build_report(args.run_dir)
    print(f"ferlab: wrote {html_path} and {md_path}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from ferlab.apps.videos import find_videos

    out = _out_dir(args, "predict")
    videos = find_videos(args.inputs)
    if not videos:
        return _predict_images(args, out)
    if len(args.inputs) == 1 and Path(args.inputs[0]).is_file():
        return _predict_video(args, str(videos[0]), out)
    return _predict_videos(args, videos, out)


def _explain(args: argparse.Namespace) -> str | None:
    """The explanation method predict was asked for (--explain-method implies --explain), or None."""
    return args.explain_method or ("gradcam" if args.explain else None)


def _refuse_image_options(args: argparse.Namespace, videos: str) -> None:
    image_only = (("--labels", args.labels), ("--largest-face", args.largest_face), ("--explain", _explain(args)))
    used = [f for f, v in image_only if v]
    if used:
        them = "it" if len(used) == 1 else "them"
        raise FerlabError(f"{', '.join(used)}: for images only; leave {them} out for {videos}.")


def _predict_video(args: argparse.Namespace, video: str, out: Path) -> int:
    from ferlab.apps.video import run_video

    _refuse_image_options(args, f"the video {video}")
    if is_distributed(args):
        raise FerlabError(
            "--devices/--num-nodes/--strategy share videos out, one per process: pass several videos or a folder "
            f"of them (the video {video} runs in one process)."
        )
    smooth = 0.5 if args.smooth is None else args.smooth
    r = run_video(args.checkpoint or [], video, out, args.every, args.fps, smooth, args.face_crop)
    for line in r.lines:
        print(f"ferlab: {line}")
    return 0


def _predict_videos(args: argparse.Namespace, videos: list[Path], out: Path) -> int:
    from ferlab.apps.videos import run_videos

    _refuse_image_options(args, "videos")
    smooth = 0.5 if args.smooth is None else args.smooth
    checkpoints = args.checkpoint or []
    lines = run_videos(checkpoints, videos, out, args.every, args.fps, smooth, args.face_crop, _engine(args))
    for line in lines or []:  # None: another rank of a distributed run; rank 0 reports
        print(f"ferlab: {line}")
    return 0


def _predict_images(args: argparse.Namespace, out: Path) -> int:
    from ferlab.apps.predict import run_predict, summary_lines

    video_only = (("--every", args.every), ("--fps", args.fps), ("--smooth", args.smooth))
    used = [f for f, v in video_only if v is not None]
    if used:
        raise FerlabError(f"{', '.join(used)}: for videos only, and none of the inputs is a video.")
    engine = _engine(args)
    p = run_predict(
        args.checkpoint or [],
        args.inputs,
        out,
        args.labels,
        not args.largest_face,
        args.face_crop,
        _explain(args),
        engine=engine,
    )
    if p is None:  # another rank of a distributed prediction: rank 0 writes and reports
        return 0
    if p.skipped:
        print(
            f"ferlab: warning: {plural(len(p.skipped), 'input')} skipped (reasons in {out / 'skipped_files.csv'})",
            file=sys.stderr,
        )
    for line in summary_lines(p):
        print(f"ferlab: {line}")
    grids = ", ".join(str(out / g.name) for g in p.grids)
    done = sum(bool(r.preds) for r in p.rows)  # a row no model could predict says why in its own cells
    print(f"ferlab: {plural(done, 'prediction')} in {out / 'prediction_results.csv'} and {grids}")
    return 0


def _study(args: argparse.Namespace, argv: list[str]) -> int:
    """ferlab run and ferlab train."""
    from ferlab.apps.study import run_study

    given = overrides_from_args(args)
    if getattr(args, "config", None):
        loaded = load_yaml(args.config)
        given = merge_dicts(loaded, given)
    if args.resume:
        from ferlab.apps.study import prepare_resume

        run_dir = Path(args.resume)
        cfg = prepare_resume(run_dir, StudyConfig(), given)
        run_study(cfg, ["ferlab", *argv], resume=run_dir)
        return 0
    cfg = _config(args)
    models = _train_models(args, cfg) if args.command == "train" else None
    run_study(cfg, ["ferlab", *argv], models=models)
    return 0


def _train_models(args: argparse.Namespace, cfg: StudyConfig) -> list[str]:
    """The one model ferlab train trains: --model, emotion-transfer with --init, or the config's only one."""
    if cfg.train.init and (args.model or "emotion-transfer") != "emotion-transfer":
        raise FerlabError(
            f"--init starts emotion-transfer from {cfg.train.init}, in the source's architecture; leave out "
            f"--model {args.model} (or pass --model emotion-transfer)."
        )
    if cfg.train.init:
        return ["emotion-transfer"]
    if args.model:
        return [args.model]
    if len(cfg.models) == 1:
        return cfg.models
    raise FerlabError("ferlab train needs --model NAME (or a --config whose models list names one model).")


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "summary": _summary,
    "export": _export,
    "serve": _serve,
    "models": _models,
    "info": _info,
    "evaluate": _evaluate,
    "report": _report,
    "predict": _predict,
}


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    handler = _COMMANDS.get(args.command)
    if handler is None:  # run and train
        return _study(args, argv)
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
