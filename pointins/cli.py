"""The ``pointins`` command: ``train``, ``eval``, ``predict`` and ``demo``.

    pointins train --config run.yaml lr=0.01 steps=2000          # also under torchrun, data-parallel
    pointins train --config run.yaml --resume                    # from output_dir/checkpoint.pt
    pointins eval runs/x/checkpoint.pt [--annotations A.json --images DIR]
    pointins predict runs/x/checkpoint.pt photos/ --output preds/
    pointins demo --output runs/demo --minutes 10
    pointins compare --minutes 8                                 # PointINS vs Mask R-CNN, same budget
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .config import PointINSError

MODELS = ("pointins", "maskrcnn")  # as pointins.compare.MODELS, without importing torch for --help
OVERRIDES_HELP = "config overrides as key=value (YAML values), applied after --config"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pointins", description="Train, evaluate, run and compare PointINS.")
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

    compare = commands.add_parser("compare", help="PointINS vs torchvision Mask R-CNN of the same backbone and "
                                                  "widths, trained for the same budget: AP, inference time, a "
                                                  "table and a picture")
    compare.add_argument("--output", help="folder for the data, the tables and the picture (default: a new folder "
                                          "runs/compare/<UTC time>)")
    compare.add_argument("--data", default="shapes", help="built-in data: 'shapes' (the demo's, default) or "
                                                          "'crowded' (more, smaller, overlapping shapes)")
    compare.add_argument("--train-annotations", help="a COCO set instead: training instances JSON")
    compare.add_argument("--train-images", help="a COCO set instead: training image folder")
    compare.add_argument("--val-annotations", help="a COCO set instead: held-out instances JSON")
    compare.add_argument("--val-images", help="a COCO set instead: held-out image folder")
    compare.add_argument("--minutes", type=float, default=8.0, help="training time of each model (default 8)")
    compare.add_argument("--steps", type=int, default=None, help="train each model this many steps instead")
    compare.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, among {','.join(MODELS)}")
    compare.add_argument("--train-count", type=int, default=None, help="built-in training images (default 1000)")
    compare.add_argument("--val-count", type=int, default=None, help="built-in held-out images (default 100)")
    compare.add_argument("--image-size", type=int, default=None, help="side of the built-in images")
    compare.add_argument("--time-images", type=int, default=20, help="held-out images timed (default 20)")
    compare.add_argument("--show", type=int, default=4, help="held-out images in the picture (default 4)")
    compare.add_argument("--quick", action="store_true", help="a smoke test: tiny data, 3 steps each")
    compare.add_argument("--no-progress", action="store_true", help="no progress bar")
    compare.add_argument("overrides", nargs="*", metavar="key=value",
                         help="config overrides shared by both models (fpn_channels, head_convs, lr, ...) and "
                              "PointINS's mask options")
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


def _compare(args) -> None:
    from .compare import TRAIN_IMAGES, VAL_IMAGES, run_compare

    coco = {key: getattr(args, key) for key in ("train_annotations", "train_images", "val_annotations",
                                                "val_images") if getattr(args, key)}
    run_compare(args.output, data=args.data, coco=coco or None, minutes=args.minutes, steps=args.steps,
                models=tuple(name.strip() for name in args.models.split(",") if name.strip()),
                train_images=args.train_count or TRAIN_IMAGES, val_images=args.val_count or VAL_IMAGES,
                image_size=args.image_size, time_images=args.time_images, show=args.show,
                overrides=args.overrides, quick=args.quick, progress=not args.no_progress,
                command=shlex.join(["pointins", *args.argv]))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after options (`eval ckpt --output x lr=1`): argparse's positional with
    # nargs="*" takes only the first run of them, so the rest arrive as unknown arguments.
    args, extras = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if extras:
        if args.command == "predict" or any("=" not in item or item.startswith("-") for item in extras):
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        args.overrides = [*args.overrides, *extras]
    try:
        {"train": _train, "eval": _eval, "predict": _predict, "demo": _demo, "compare": _compare}[args.command](args)
    except PointINSError as error:
        print(f"pointins {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
