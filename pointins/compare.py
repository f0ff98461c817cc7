"""``pointins compare``: PointINS and torchvision's Mask R-CNN side by side, at equal capacity and budget.

Both models are built on the same backbone (``models.build_backbone``: a ResNet from scratch with an
``fpn_channels`` wide FPN, P3-P7) with heads of the same width and depth, see the same images in the same order,
with the same optimizer, schedule and training budget (minutes of training time, or steps), are evaluated by the
same COCO evaluator (``evaluate.evaluate_model``, faster-coco-eval) and are timed at the same number of
detections. The two trainings run interleaved, one step at a time (the model that has trained for less time takes
the next step), so that a change of load on a shared machine slows both alike.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from .config import Config, PointINSError, resolve_config
from .data import CocoInstances, collate, generate_shapes, read_json
from .demo import DEMO_DEFAULTS
from .evaluate import evaluate_model
from .machine import cpu_model, git_commit, package_version
from .models import build_backbone, build_model
from .train import lr_factor, make_optimizer
from .visualize import draw_prediction, draw_target, grid, save_png

MODELS = ("pointins", "maskrcnn")
MODEL_NAMES = {"pointins": "PointINS (FCOS)", "maskrcnn": "Mask R-CNN (torchvision)"}

# Built-in data: ``generate_shapes`` arguments, 1000 training and 100 held-out images by default.
#   shapes:  the demo's data, 1-4 shapes of 13-36 px on 64 px images, each at least half visible.
#   crowded: more, smaller, touching and overlapping shapes: 1-12 shapes of 8-25 px on 96 px images, each at least
#            40% visible.
DATASETS = {
    "shapes": dict(image_size=64, max_objects=4, radius=(0.1, 0.28), min_visible=0.5),
    "crowded": dict(image_size=96, max_objects=12, radius=(0.04, 0.13), min_visible=0.4),
}
TRAIN_IMAGES, VAL_IMAGES = 1000, 100
QUICK = dict(train_images=16, val_images=4, steps=3, time_images=2, show=2,
             overrides=["batch_size=2", "warmup_steps=1", "positives_per_image=8"])


# --------------------------------------------------------------------------------------------------------- models

def build_maskrcnn(config: Config) -> MaskRCNN:
    """torchvision's Mask R-CNN at the capacity of ``build_model(config)``'s light PointINS-FCOS.

    - backbone: ``build_backbone(config)``, the very module PointINS gets (ResNet, ``fpn_channels`` FPN, P3-P7);
    - RPN: 3 anchors per location (aspect ratios 1:2, 1:1, 2:1) of twice the level's stride (16 px at P3 to 256 px
      at P7, so that the smallest built-in shapes, about 8 px, still have an anchor near their size), and a head
      of ``head_convs`` 3x3 convolutions (FCOS's class and box towers have as many);
    - box head: RoIs pooled 7 x 7 from P3-P5, two fully connected layers ``4 * fpn_channels`` wide (torchvision's
      ratio: 1024 for 256 channels);
    - mask head: RoIs pooled 14 x 14 from P3-P5, ``tower_convs + 1`` 3x3 convolutions of ``fpn_channels`` (a PointINS
      mask goes through its dense tower and its mask head's 3x3 convolution), a 2x transposed convolution and
      class-specific 28 x 28 masks;
    - everything else torchvision's defaults (RPN and RoI sampling, NMS 0.7 and 0.5); the same resize,
      ``score_thresh`` and ``detections_per_img`` as PointINS.
    """
    channels = config.fpn_channels
    backbone = build_backbone(config)
    strides = (8, 16, 32, 64, 128)
    anchors = AnchorGenerator(tuple((2 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
    levels = ["0", "1", "2"]
    box_width = 4 * channels
    return MaskRCNN(
        backbone, None, min_size=config.min_size, max_size=config.max_size,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(channels, anchors.num_anchors_per_location()[0], conv_depth=max(1, config.head_convs)),
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
        box_head=TwoMLPHead(channels * 7 * 7, box_width),
        box_predictor=FastRCNNPredictor(box_width, config.num_classes),
        box_score_thresh=config.score_thresh, box_detections_per_img=config.detections_per_img,
        mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
        mask_head=MaskRCNNHeads(channels, [channels] * (config.tower_convs + 1), 1),
        mask_predictor=MaskRCNNPredictor(channels, channels, config.num_classes))


def build(name: str, config: Config) -> nn.Module:
    """Model ``name`` ("pointins" or "maskrcnn") for ``config``, from ``config.seed``."""
    torch.manual_seed(config.seed)
    return build_model(config) if name == "pointins" else build_maskrcnn(config)


def set_score_thresh(model: nn.Module, value: float) -> float:
    """Set the detection score threshold of either model; returns the previous value."""
    owner = model.roi_heads if isinstance(model, MaskRCNN) else model
    previous, owner.score_thresh = owner.score_thresh, value
    return previous


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------------- training

class Trainer:
    """One model's training, a step at a time: the loop of ``pointins train`` (same sampler order, flips, optimizer,
    warm-up, schedule, gradient clipping and per-step seeding) with its own clock. With ``budget_s`` the schedule
    follows the fraction of the budget spent and training ends when the steps' time (data loading included)
    reaches it; otherwise it ends after ``config.steps`` steps."""

    def __init__(self, name: str, model: nn.Module, dataset: CocoInstances, config: Config,
                 budget_s: float | None) -> None:
        self.name, self.model, self.dataset, self.config, self.budget_s = name, model, dataset, config, budget_s
        self.optimizer = make_optimizer(model, config)
        self.sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=config.seed,
                                          drop_last=True)
        self.steps_per_epoch = len(self.sampler) // config.batch_size
        if self.steps_per_epoch == 0:
            raise PointINSError(f"compare: {len(dataset)} training images are fewer than batch_size "
                                f"({config.batch_size})")
        self.step, self.seconds, self.batches, self.losses = 0, 0.0, iter(()), []

    @property
    def done(self) -> bool:
        return self.seconds >= self.budget_s if self.budget_s is not None else self.step >= self.config.steps

    def _next_batch(self):
        batch = next(self.batches, None)
        if batch is None:
            epoch = self.step // self.steps_per_epoch
            self.sampler.set_epoch(epoch)
            self.dataset.set_epoch(epoch)
            self.batches = iter(DataLoader(self.dataset, batch_size=self.config.batch_size, sampler=list(self.sampler),
                                           drop_last=True, collate_fn=collate))
            batch = next(self.batches)
        return batch

    def train_step(self) -> float:
        """One optimizer step; returns its seconds."""
        tick = time.perf_counter()
        self.model.train()
        images, targets = self._next_batch()
        progress = self.seconds / self.budget_s if self.budget_s is not None else None
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * lr_factor(self.step, self.config, progress)
        torch.manual_seed(self.config.seed * 1_000_003 + self.step)
        losses = self.model(list(images), list(targets))
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise RuntimeError(f"compare: {self.name}'s loss became {loss.item()} at step {self.step} "
                               f"({ {k: v.item() for k, v in losses.items()} }); lower lr or raise warmup_steps")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.losses.append({k: round(v.item(), 5) for k, v in losses.items()})
        seconds = time.perf_counter() - tick
        self.seconds += seconds
        return seconds


def train_side_by_side(trainers: list[Trainer], progress: bool = True) -> None:
    """Step the trainers until each is done, always the one that has trained for the least time (with a time
    budget) or the fewest steps, so that they run under the same load."""
    from tqdm import tqdm

    timed = trainers[0].budget_s is not None
    total = sum(t.budget_s if timed else t.config.steps for t in trainers)
    with tqdm(total=round(total), desc="train", unit="s" if timed else "step", disable=not progress,
              dynamic_ncols=True) as bar:
        while True:
            active = [t for t in trainers if not t.done]
            if not active:
                break
            trainer = min(active, key=lambda t: t.seconds if timed else t.step)
            seconds = trainer.train_step()
            bar.update(min(seconds, trainer.budget_s) if timed else 1)
            bar.set_postfix({t.name: t.step for t in trainers})


# ------------------------------------------------------------------------------------------------------ inference

@torch.no_grad()
def time_inference(models: dict[str, nn.Module], images: list[torch.Tensor], rounds: int = 3,
                   detections: int = 100) -> dict[str, dict]:
    """Per model: milliseconds per image (batch of one, median and 20th/80th percentiles) and the mean number of
    detections, with the score threshold at 0 so that each returns ``detections_per_img`` (``detections``)
    detections whenever it has that many candidates after NMS. The models take turns on each image, so that
    both see the same load."""
    thresholds = {name: set_score_thresh(model, 0.0) for name, model in models.items()}
    for model in models.values():
        model.eval()
        model([images[0]])  # warm-up
    times = {name: [] for name in models}
    counts = {name: [] for name in models}
    try:
        for _ in range(rounds):
            for image in images:
                for name, model in models.items():
                    tick = time.perf_counter()
                    output = model([image])[0]
                    times[name].append(time.perf_counter() - tick)
                    counts[name].append(int(output["boxes"].shape[0]))
    finally:
        for name, model in models.items():
            set_score_thresh(model, thresholds[name])
    result = {}
    for name in models:
        ms = sorted(1000 * t for t in times[name])
        result[name] = {"infer_ms": statistics.median(ms), "infer_ms_p20": ms[int(0.2 * (len(ms) - 1))],
                        "infer_ms_p80": ms[int(0.8 * (len(ms) - 1) + 0.999)],
                        "detections": statistics.fmean(counts[name]), "timed_images": len(ms)}
    return result


# ------------------------------------------------------------------------------------------------- the comparison

def environment(command: str) -> dict:
    """The machine, the versions, the date and the command, for the table's header and the JSON/CSV files."""
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": command, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": package_version("torchvision"), "faster_coco_eval": package_version("faster-coco-eval"),
            "git_commit": git_commit(), "load_average_start": round(os.getloadavg()[0], 2)}


def new_run_folder(quick: bool) -> Path:
    """runs/compare/<UTC time>[-quick], a folder that does not exist yet."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + ("-quick" if quick else "")
    path = Path("runs") / "compare" / stamp
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path("runs") / "compare" / f"{stamp}-{suffix}"
    return path


def prepare_data(output: Path, data: str, coco: dict[str, str] | None, train_images: int, val_images: int,
                 image_size: int | None) -> tuple[dict[str, str], dict]:
    """Paths of the training and held-out sets (generated into ``output`` for built-in data) and the resize they
    call for: a built-in set's image size, or for a COCO set the sides of its first training image."""
    if coco:
        missing = [key for key in ("train_annotations", "train_images", "val_annotations", "val_images")
                   if not coco.get(key)]
        if missing:
            raise PointINSError(f"compare: a COCO set needs --train-annotations, --train-images, --val-annotations "
                                f"and --val-images; missing {['--' + key.replace('_', '-') for key in missing]}")
        first = read_json(coco["train_annotations"])
        images = first.get("images") if isinstance(first, dict) else None
        if not images or not isinstance(images[0], dict) or "height" not in images[0] or "width" not in images[0]:
            raise PointINSError(f"annotation file {coco['train_annotations']}: no images with height and width")
        sides = (int(images[0]["height"]), int(images[0]["width"]))
        return dict(coco), {"min_size": min(sides), "max_size": max(sides)}
    if data not in DATASETS:
        raise PointINSError(f"compare: --data must be one of {sorted(DATASETS)}; got {data!r}")
    options = dict(DATASETS[data])
    if image_size is not None:
        options["image_size"] = image_size
    paths = {}
    for split, count, seed in (("train", train_images, 0), ("val", val_images, 1)):
        root = output / "data" / f"{data}_{split}"
        generate_shapes(root, count, seed=seed, **options)
        paths[f"{split}_annotations"], paths[f"{split}_images"] = str(root / "annotations.json"), str(root / "images")
    return paths, {"min_size": options["image_size"], "max_size": options["image_size"]}


def compare_config(paths: dict[str, str], resize: dict, overrides: list[str] | None) -> Config:
    """The demo's light model and schedule (``DEMO_DEFAULTS``) on the given data, then ``overrides``."""
    base = dataclasses.replace(Config(), **{**DEMO_DEFAULTS, **resize}, **paths)
    return resolve_config(overrides=overrides, base=base)


def run_compare(output: str | Path | None = None, *, data: str = "shapes", coco: dict[str, str] | None = None,
                minutes: float | None = 8.0, steps: int | None = None, models: tuple[str, ...] = MODELS,
                train_images: int = TRAIN_IMAGES, val_images: int = VAL_IMAGES, image_size: int | None = None,
                time_images: int = 20, rounds: int = 3, show: int = 4, overrides: list[str] | None = None,
                quick: bool = False, progress: bool = True, command: str | None = None) -> dict:
    """Train ``models`` side by side for ``minutes`` of training time each (or ``steps`` steps each), evaluate
    them, time their inference, and write ``results.md``, ``results.csv``, ``results.json`` and ``compare.png``
    into ``output`` (default: a new folder ``runs/compare/<UTC time>``). Returns the JSON's content.

    ``quick`` shrinks everything to a smoke test (16 training images, 3 steps, 2 timed images)."""
    if quick:
        train_images, val_images, time_images, show = (QUICK["train_images"], QUICK["val_images"],
                                                       QUICK["time_images"], QUICK["show"])
        steps, minutes, rounds = QUICK["steps"], None, 1
        overrides = [*QUICK["overrides"], *(overrides or [])]
    unknown = [name for name in models if name not in MODELS]
    if not models or unknown:
        raise PointINSError(f"compare: models must be among {list(MODELS)}; got {list(models)}")
    if steps is None and (minutes is None or minutes <= 0):
        raise PointINSError(f"compare: give a positive time budget (--minutes) or --steps; got minutes={minutes}")
    if steps is not None:
        overrides = [*(overrides or []), f"steps={steps}"]
    compare_config({}, {}, overrides)  # bad overrides fail before any data is generated
    output = Path(output) if output is not None else new_run_folder(quick)
    output.mkdir(parents=True, exist_ok=True)
    info = environment(command or "pointins compare")

    paths, resize = prepare_data(output, data, coco, train_images, val_images, image_size)
    config = compare_config(paths, resize, overrides)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
        info["threads"] = config.threads
    # One training set per model: each follows its own epochs (flips depend on the epoch).
    train_sets = [CocoInstances(config.train_annotations, config.train_images, hflip=config.hflip, seed=config.seed)
                  for _ in models]
    val_set = CocoInstances(config.val_annotations, config.val_images)
    if val_set.categories != train_sets[0].categories:
        raise PointINSError(f"compare: {config.val_annotations}'s categories differ from "
                            f"{config.train_annotations}'s")
    config = dataclasses.replace(config, num_classes=config.num_classes or train_sets[0].num_classes)

    budget_s = None if steps is not None else minutes * 60
    trainers = [Trainer(name, build(name, config), dataset, config, budget_s)
                for name, dataset in zip(models, train_sets)]
    train_side_by_side(trainers, progress)

    built = {t.name: t.model for t in trainers}
    timed = [val_set[i][0] for i in range(min(time_images, len(val_set)))]
    timings = time_inference(built, timed, rounds, config.detections_per_img)
    rows = []
    for trainer in trainers:
        metrics = evaluate_model(trainer.model, val_set, config.batch_size)
        rows.append({"model": trainer.name, "name": MODEL_NAMES[trainer.name], "fpn_channels": config.fpn_channels,
                     "parameters": parameter_count(trainer.model),
                     "head_parameters": parameter_count(trainer.model) - parameter_count(trainer.model.backbone),
                     "steps": trainer.step, "train_s": round(trainer.seconds, 1),
                     "mask_AP": metrics["mask"]["AP"], "mask_AP50": metrics["mask"]["AP50"],
                     "mask_AP75": metrics["mask"]["AP75"], "box_AP": metrics["box"]["AP"],
                     "box_AP50": metrics["box"]["AP50"], **timings[trainer.name],
                     "final_losses": trainer.losses[-1] if trainer.losses else {}})
        print(f"compare: {MODEL_NAMES[trainer.name]}: {trainer.step} steps in {trainer.seconds / 60:.1f} min, mask AP "
              f"{metrics['mask']['AP']:.3f}, box AP {metrics['box']['AP']:.3f}, "
              f"{timings[trainer.name]['infer_ms']:.1f} ms per image")
    info["load_average_end"] = round(os.getloadavg()[0], 2)
    settings = {"data": "coco" if coco else data, **paths, "train_images": len(trainers[0].dataset),
                "val_images": len(val_set), "budget": f"{minutes} min of training each" if budget_s else
                f"{steps} steps each", "time_images": len(timed), "rounds": rounds,
                "config": dataclasses.asdict(config)}
    result = {"environment": info, "settings": settings, "rows": rows}
    write_picture(built, val_set, output / "compare.png", show)
    write_report(result, output)
    print(f"compare: {output / 'results.md'}")
    return result


# ------------------------------------------------------------------------------------------------------- reporting

def _ratio(rows: list[dict]) -> float | None:
    by_model = {row["model"]: row for row in rows}
    if "pointins" in by_model and "maskrcnn" in by_model and by_model["pointins"]["infer_ms"] > 0:
        return by_model["maskrcnn"]["infer_ms"] / by_model["pointins"]["infer_ms"]
    return None


def markdown(result: dict) -> str:
    info, settings, rows = result["environment"], result["settings"], result["rows"]
    config = settings["config"]
    lines = [f"# PointINS vs Mask R-CNN, {settings['data']} data",
             "",
             f"{info['cpu']}, {info['threads']} thread(s) of {info['cpu_count']} cores (load average "
             f"{info['load_average_start']} at the start, {info['load_average_end']} at the end); {info['date_utc']}; "
             f"Python {info['python']}, torch {info['torch']}, torchvision {info['torchvision']}, faster-coco-eval "
             f"{info['faster_coco_eval']}; commit {info['git_commit']}.",
             "",
             f"Command: `{info['command']}`",
             "",
             f"Training: {settings['budget']}, {settings['train_images']} images of {config['min_size']}-"
             f"{config['max_size']} px, batch {config['batch_size']}, {config['optimizer']} lr {config['lr']}, "
             f"{config['backbone']}-FPN from scratch, FPN and head width {config['fpn_channels']}. Evaluation: COCO "
             f"AP on {settings['val_images']} held-out images. Inference: batch of 1, median (20th-80th percentile) "
             f"over {settings['time_images']} images x {settings['rounds']} rounds, score threshold 0 so that each "
             f"model returns up to {config['detections_per_img']} detections.",
             "",
             "| model | parameters (heads) | steps | mask AP | mask AP50 | mask AP75 | box AP | inference ms / image "
             "| detections |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['parameters'] / 1e6:.2f} M ({row['head_parameters'] / 1e6:.2f} M) | "
                     f"{row['steps']} | **{row['mask_AP']:.3f}** | {row['mask_AP50']:.3f} | {row['mask_AP75']:.3f} | "
                     f"{row['box_AP']:.3f} | **{row['infer_ms']:.1f}** ({row['infer_ms_p20']:.1f}-"
                     f"{row['infer_ms_p80']:.1f}) | {row['detections']:.1f} |")
    ratio = _ratio(rows)
    if ratio is not None:
        lines += ["", f"PointINS's inference is {ratio:.2f}x as fast as Mask R-CNN's."]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("model", "name", "fpn_channels", "parameters", "head_parameters", "steps", "train_s", "mask_AP",
               "mask_AP50", "mask_AP75", "box_AP", "box_AP50", "infer_ms", "infer_ms_p20", "infer_ms_p80",
               "detections", "timed_images")
ENVIRONMENT_COLUMNS = ("date_utc", "command", "cpu", "cpu_count", "threads", "load_average_start",
                       "load_average_end", "python", "torch", "torchvision", "faster_coco_eval", "git_commit")


def write_report(result: dict, output: Path) -> None:
    (output / "results.md").write_text(markdown(result))
    (output / "results.json").write_text(json.dumps(result, indent=1))
    with open(output / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, [*CSV_COLUMNS, "data", "budget", *ENVIRONMENT_COLUMNS])
        writer.writeheader()
        for row in result["rows"]:
            writer.writerow({**{key: row[key] for key in CSV_COLUMNS}, "data": result["settings"]["data"],
                             "budget": result["settings"]["budget"],
                             **{key: result["environment"][key] for key in ENVIRONMENT_COLUMNS}})


def _title(text: str, width: int, height: int = 16) -> torch.Tensor:
    """A white strip (3, height, width) uint8 with ``text`` in black."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(strip).text((4, 2), text, fill="black")
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1)


@torch.no_grad()
def write_picture(models: dict[str, nn.Module], dataset: CocoInstances, path: Path, count: int,
                  scale: int = 3) -> None:
    """``count`` held-out images, one per row: ground truth, then each model's detections scoring >= 0.5."""
    names = {label: c["name"] for label, c in zip(range(1, dataset.num_classes), dataset.categories)}
    rows = []
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        pixels = (image * 255).round().to(torch.uint8)
        row = [draw_target(pixels, target, names, scale)]
        for model in models.values():
            model.eval()
            row.append(draw_prediction(pixels, model([image])[0], names, 0.5, scale))
        rows.append(row)
    width = rows[0][0].shape[-1]
    rows.insert(0, [_title(title, width) for title in ("ground truth", *(MODEL_NAMES[m] for m in models))])
    save_png(_grid_with_titles(rows), path)


def _grid_with_titles(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    titles, pictures = rows[0], grid(rows[1:])
    header = torch.full((3, titles[0].shape[1], pictures.shape[-1]), 255, dtype=torch.uint8)
    left = 0
    for title in titles:
        header[:, :, left:left + title.shape[-1]] = title
        left += title.shape[-1] + 4
    return torch.cat([header, pictures], dim=1)


__all__ = ["DATASETS", "MODELS", "Trainer", "build_maskrcnn", "run_compare", "time_inference",
           "train_side_by_side"]
