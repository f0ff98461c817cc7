"""The ``pointins`` command: ``train``, ``eval``, ``predict`` and ``demo``.

    pointins train --config run.yaml lr=0.01 steps=2000          # also under torchrun, data-parallel
    pointins train --config run.yaml --resume                    # from output_dir/checkpoint.pt
    pointins eval runs/x/checkpoint.pt [--annotations A.json --images DIR]
    pointins predict runs/x/checkpoint.pt photos/ --output preds/
    pointins demo --output runs/demo --minutes 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import PointINSError

OVERRIDES_HELP = "config overrides as key=value (YAML values), applied after --config"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pointins", description="Train, evaluate and run PointINS.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train on a COCO-format dataset (run under torchrun for several "
                                              "processes)")
    train.add_argument("--config", help="YAML file of config keys (see pointins.config.Config)")
    train.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="continue from a checkpoint (default: output_dir/checkpoint.pt)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)

    evaluate = commands.add_parser("eval", help="COCO box and mask AP of a checkpoint")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--annotations", help="instances JSON (default: the config's val_annotations)")
    evaluate.add_argument("--images", help="image folder (default: the config's val_images)")
    evaluate.add_argument("--output", help="folder for metrics.json and config.yaml (default: eval/ beside the "
                                           "checkpoint)")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)

    predict = commands.add_parser("predict", help="draw predictions on images and write them as COCO JSON")
    predict.add_argument("checkpoint")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    predict.add_argument("--output", required=True, help="folder for the PNGs and predictions.json")
    predict.add_argument("--min-score", type=float, default=0.5, help="draw detections scoring at least this")
    predict.add_argument("--scale", type=int, default=1, help="enlarge the pictures this many times")
    predict.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="key=value",
                         help="config overrides, e.g. score_thresh=0.3 device=cpu")

    demo = commands.add_parser("demo", help="shapes data, CPU training within a time budget, AP and a picture")
    demo.add_argument("--output", default="runs/demo", help="folder for the data, the run and the picture")
    demo.add_argument("--minutes", type=float, default=10.0, help="time budget of the whole demo")
    demo.add_argument("--image-size", type=int, default=None, help="side of the shapes images (default 64)")
    demo.add_argument("--train-images", type=int, default=None, help="shapes images to train on (default 1000)")
    demo.add_argument("--val-images", type=int, default=None, help="held-out shapes images (default 100)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def _train(args) -> None:
    from .config import resolve_config
    from .train import train

    resume, overrides = args.resume, list(args.overrides)
    if resume and "=" in resume and not Path(resume).exists():  # `--resume lr=0.1`: a bare --resume, then an override
        resume, overrides = "auto", [*overrides, resume]
    config = resolve_config(args.config, overrides)
    if resume == "auto":
        resume = str(Path(config.output_dir) / "checkpoint.pt")
    _, metrics = train(config, resume=resume, progress=not args.no_progress)
    if metrics is not None:
        print(metrics["summary"], end="")


def _eval(args) -> None:
    from .predict import run_eval

    metrics = run_eval(args.checkpoint, args.annotations, args.images, args.output, args.overrides)
    print(metrics["summary"], end="")


def _predict(args) -> None:
    from .predict import run_predict

    path = run_predict(args.checkpoint, args.inputs, args.output, args.min_score, args.overrides, args.scale)
    print(f"predictions: {path}")


def _demo(args) -> None:
    from .demo import run_demo

    from .demo import IMAGE_SIZE, TRAIN_IMAGES, VAL_IMAGES

    run_demo(args.output, args.minutes, args.overrides, args.train_images or TRAIN_IMAGES,
             args.val_images or VAL_IMAGES, args.image_size or IMAGE_SIZE, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after options (`eval ckpt --output x lr=1`): argparse's positional with
    # nargs="*" takes only the first run of them, so the rest arrive as unknown arguments.
    args, extras = parser.parse_known_args(argv)
    if extras:
        if args.command == "predict" or any("=" not in item or item.startswith("-") for item in extras):
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        args.overrides = [*args.overrides, *extras]
    try:
        {"train": _train, "eval": _eval, "predict": _predict, "demo": _demo}[args.command](args)
    except PointINSError as error:
        print(f"pointins {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
