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
import sys
from datetime import datetime
from pathlib import Path

from ferlab.config import DataConfig, StudyConfig, TrainConfig, add_flags, load_yaml, merge, overrides_from_args
from ferlab.errors import FerlabError
from ferlab.models import REGISTRY


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
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferlab", description="Train, compare and use facial-emotion classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)
    _study_parser(sub, "run", "the whole study: train every model, test each once, compare them")
    train = _study_parser(sub, "train", "train one model into its own run folder")
    train.add_argument("--model", required=True, choices=list(REGISTRY))
    ev = sub.add_parser("evaluate", help="evaluate a saved model on a folder of labelled images")
    ev.add_argument("checkpoint")
    ev.add_argument("data", help="folder-per-class images (DIR/<class>/<images>)")
    ev.add_argument("--out", help="where to write the metrics (default: runs/<timestamp>-evaluate)")
    pr = sub.add_parser("predict", help="predict new images with one or more saved models")
    pr.add_argument("--checkpoint", action="append", required=True, help="a model.ckpt (repeat for more models)")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    pr.add_argument("--labels", help="CSV of filename,label giving the correct classes")
    pr.add_argument("--all-faces", action="store_true", help="one row per detected face instead of per image")
    pr.add_argument("--out", help="output folder (default: runs/<timestamp>-predict)")
    rp = sub.add_parser("report", help="write report.html and report.md for a run folder")
    rp.add_argument("run_dir")
    sm = sub.add_parser("summary", help="print a Keras-style summary of a model")
    sm.add_argument("model", choices=list(REGISTRY))
    sm.add_argument("--num-classes", type=int, default=6)
    sm.add_argument("--image-size", type=int, default=100)
    sm.add_argument(
        "--backbone-size",
        type=int,
        default=TrainConfig().backbone_size,
        help="transfer models: the side their backbone sees (0: the image size)",
    )
    return parser


def _config(args: argparse.Namespace) -> StudyConfig:
    cfg = StudyConfig()
    if getattr(args, "config", None):
        cfg = merge(cfg, load_yaml(args.config))
    return merge(cfg, overrides_from_args(args))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from ferlab.train import keep_freed_memory

    keep_freed_memory()
    try:
        return _dispatch(args, argv)
    except FerlabError as e:
        print(f"ferlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ferlab: interrupted; files already written in the run folder are complete.", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "summary":
        from ferlab.models import create_model
        from ferlab.summary import summarize

        print(
            summarize(
                create_model(args.model, args.num_classes, args.image_size, "none", args.backbone_size),
                args.image_size,
                args.model,
            )
        )
        return 0
    if args.command == "evaluate":
        from ferlab.inference import evaluate_checkpoint

        out = Path(args.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}-evaluate")
        m = evaluate_checkpoint(args.checkpoint, args.data, out)
        print(
            f"{m['model']}: accuracy {m['accuracy']:.4f} (95% CI {m['ci95'][0]:.4f}-{m['ci95'][1]:.4f}, "
            f"n={m['n']}), macro-F1 {m['macro_f1']:.4f}; details in {out}"
        )
        return 0
    if args.command == "report":
        from ferlab.report import build_report

        html_path, md_path = build_report(args.run_dir)
        print(f"ferlab: wrote {html_path} and {md_path}")
        return 0
    if args.command == "predict":
        from ferlab.predict import run_predict

        out = Path(args.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}-predict")
        rows, skipped = run_predict(args.checkpoint, args.inputs, out, args.labels, args.all_faces)
        if skipped:
            print(
                f"ferlab: warning: {len(skipped)} inputs skipped (reasons in {out / 'skipped_files.csv'})",
                file=sys.stderr,
            )
        print(f"ferlab: {len(rows)} predictions in {out / 'prediction_results.csv'} and {out / 'prediction_grid.png'}")
        return 0
    from ferlab.study import run_study

    cfg = _config(args)
    run_study(cfg, ["ferlab", *argv], models=[args.model] if args.command == "train" else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
