"""The demo: shapes data, a light PointINS trained on CPU within a time budget, AP, and a picture."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from .config import Config, resolve_config
from .data import CocoInstances, generate_shapes
from .train import train
from .visualize import draw_prediction, draw_target, grid, save_png

# A light model for 2 CPU cores: 64 px images, ResNet-18 from scratch, 64-channel FPN and heads with one
# convolution per tower. At this size a step is dominated by per-operation overhead, not arithmetic, so the
# number of steps that fit in the budget matters more than the width of the heads.
DEMO_DEFAULTS = dict(detector="fcos", backbone="resnet18", fpn_channels=64, head_convs=1, tower_convs=1,
                     positives_per_image=64, min_size=64, max_size=64, batch_size=8, optimizer="adamw", lr=2e-3,
                     warmup_steps=30, schedule="cosine", eval_every=0, checkpoint_every=200, log_every=10,
                     threads=0)
TRAIN_IMAGES, VAL_IMAGES, IMAGE_SIZE = 1000, 100, 64


def demo_config(output_dir: str | Path, overrides: list[str] | None = None) -> Config:
    output_dir = Path(output_dir)
    base = dataclasses.replace(Config(), **DEMO_DEFAULTS, output_dir=str(output_dir / "run"),
                               train_annotations=str(output_dir / "shapes_train" / "annotations.json"),
                               train_images=str(output_dir / "shapes_train" / "images"),
                               val_annotations=str(output_dir / "shapes_val" / "annotations.json"),
                               val_images=str(output_dir / "shapes_val" / "images"))
    return resolve_config(overrides=overrides, base=base)


def measure_step_seconds(config: Config, dataset: CocoInstances, steps: int = 3) -> float:
    """Median seconds per training step of a throwaway copy of the model, to size the schedule to the machine."""
    from .models import build_model
    config = dataclasses.replace(config, num_classes=dataset.num_classes)
    torch.manual_seed(config.seed)
    model = build_model(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = [dataset[i % len(dataset)] for i in range(config.batch_size)]
    images, targets = [b[0] for b in batch], [b[1] for b in batch]
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels: not counted
        tick = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - tick)
    times = sorted(times[1:])
    return times[len(times) // 2]


def fastest_threads(config: Config, dataset: CocoInstances) -> tuple[int, float]:
    """The torch thread count (1 or all cores) that trains fastest here, and its seconds per step. On a CPU shared
    with other work, threads that wait for each other at every operation can make 2 threads several times
    slower than 1; on an idle machine 2 are faster."""
    candidates = sorted({1, torch.get_num_threads()})
    timings = {}
    for threads in candidates:
        torch.set_num_threads(threads)
        timings[threads] = measure_step_seconds(config, dataset)
    threads = min(timings, key=timings.get)
    torch.set_num_threads(threads)
    print("demo: seconds per step by thread count: "
          + ", ".join(f"{t}: {s:.2f}" for t, s in timings.items()) + f"; using {threads}")
    return threads, timings[threads]


def run_demo(output_dir: str | Path = "runs/demo", minutes: float = 10.0, overrides: list[str] | None = None,
             train_images: int = TRAIN_IMAGES, val_images: int = VAL_IMAGES, image_size: int = IMAGE_SIZE,
             progress: bool = True, show: int = 6) -> dict:
    """Generate shapes (``train_images`` to train on, ``val_images`` held out, other seeds), train for as many
    steps as fit in ``minutes`` in all (the schedule is sized from a measured step time unless ``steps=`` is
    overridden; a time limit stops training early if the machine slows down), evaluate, print box and mask AP,
    and write ``output_dir/demo_predictions.png``: ``show`` held-out images, ground truth left, predictions
    right. Returns the metrics with ``"wall_s"``, ``"steps"`` and ``"picture"`` added."""
    started = time.perf_counter()
    output_dir = Path(output_dir)
    config = demo_config(output_dir, overrides)
    generate_shapes(output_dir / "shapes_train", train_images, image_size, seed=0)
    generate_shapes(output_dir / "shapes_val", val_images, image_size, seed=1)
    train_set = CocoInstances(config.train_annotations, config.train_images)
    val_set = CocoInstances(config.val_annotations, config.val_images)

    reserve = 20.0 + 0.2 * val_images  # seconds kept for the final evaluation and the picture
    budget = minutes * 60 - (time.perf_counter() - started) - reserve
    if not any(item.partition("=")[0].strip() == "steps" for item in overrides or []):
        threads, step_seconds = fastest_threads(config, train_set)
        config = dataclasses.replace(config, threads=config.threads or threads)
        budget = minutes * 60 - (time.perf_counter() - started) - reserve
        steps = max(config.warmup_steps + 10, int(budget / step_seconds))
        print(f"demo: {step_seconds:.2f} s per step measured: {steps} steps of {config.batch_size} images")
        config = dataclasses.replace(config, steps=steps)
    config = dataclasses.replace(config, time_limit_minutes=max(0.5, budget / 60))

    model, metrics = train(config, progress=progress)
    print(metrics["summary"], end="")
    picture = output_dir / "demo_predictions.png"
    write_picture(model, val_set, picture, show)
    wall = time.perf_counter() - started
    step = int(json.loads((Path(config.output_dir) / "metrics.json").read_text())["step"])
    print(f"demo: held-out shapes ({len(val_set)} images): box AP {metrics['box']['AP']:.3f}, mask AP "
          f"{metrics['mask']['AP']:.3f} (AP50 {metrics['mask']['AP50']:.3f}) after {step} steps, {wall / 60:.1f} "
          f"min in all; picture: {picture}")
    return {**metrics, "wall_s": wall, "steps": step, "picture": str(picture)}


@torch.no_grad()
def write_picture(model, dataset: CocoInstances, path: Path, count: int, scale: int = 3) -> None:
    """``count`` images of ``dataset``: ground truth beside predictions (score >= 0.5), two pairs per row."""
    model.eval()
    device = next(model.parameters()).device
    names = {label: c["name"] for label, c in zip(range(1, dataset.num_classes), dataset.categories)}
    pairs = []
    for index in range(min(count, len(dataset))):
        image, target = dataset[index]
        output = model([image.to(device)])[0]
        image = (image * 255).round().to(torch.uint8)
        pairs.append([draw_target(image, target, names, scale), draw_prediction(image, output, names, 0.5, scale)])
    rows = [sum(pairs[i:i + 2], []) for i in range(0, len(pairs), 2)]
    save_png(grid(rows), path)
