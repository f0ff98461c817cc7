"""The training loop: single process or data-parallel under ``torchrun``, checkpoints, resumption, logs, curves."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .config import Config, PointINSError, config_to_dict, model_mismatches, write_config
from .data import CocoInstances, collate
from .evaluate import evaluate_model
from .models import build_model

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "step", "config", "categories")
LOSS_NAMES = {"fcos": ("classification", "bbox_regression", "bbox_ctrness", "mask"),
              "retinanet": ("classification", "bbox_regression", "mask")}
AP_COLUMNS = ("box_AP", "box_AP50", "mask_AP", "mask_AP50")


# ------------------------------------------------------------------------------------------------ processes, devices

@dataclasses.dataclass
class Process:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def select_device(config: Config, local_rank: int = 0) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise PointINSError("config: device='cuda' but CUDA is not available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def start_processes(config: Config) -> Process:
    """One process, or this process's place in a ``torchrun`` group (from its environment variables): NCCL on
    CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(config, local_rank)
    if world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Process(dist.get_rank(), dist.get_world_size(), device)
    return Process(0, 1, device)


# ------------------------------------------------------------------------------------------------------- checkpoints

def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by ``train``, loaded with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise PointINSError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights-only errors all mean "not a checkpoint of ours"
        raise PointINSError(f"checkpoint {path} could not be loaded as a PointINS checkpoint: {error}") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise PointINSError(f"checkpoint {path} is not a PointINS checkpoint: missing {missing}")
    return checkpoint


def check_checkpoint_config(checkpoint: dict[str, Any], config: Config, path) -> None:
    mismatches = model_mismatches(checkpoint["config"], config)
    if mismatches:
        raise PointINSError(f"checkpoint {path} was trained with another model config: " + "; ".join(mismatches))


def load_model_state(model: nn.Module, checkpoint: dict[str, Any], path) -> None:
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise PointINSError(f"checkpoint {path}: its 'model' does not fit the configured model: {error}") from None


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, step: int, config: Config,
                    categories: list[dict]) -> None:
    """Plain data and tensors only (loadable with ``weights_only=True``), written atomically."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "step": step, "config": config_to_dict(config), "categories": categories}
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


# ------------------------------------------------------------------------------------------ optimiser and schedule

def make_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(step: int, config: Config, progress: float | None = None) -> float:
    """Multiplier of ``lr`` after ``step`` optimizer steps: linear warm-up, then the schedule. A run with a time
    budget passes ``progress``, the fraction of its budget spent, which then replaces the fraction of
    ``config.steps`` (after warm-up, for "cosine") that the schedule follows."""
    if step < config.warmup_steps:
        return config.warmup_factor + (1 - config.warmup_factor) * step / config.warmup_steps
    if config.schedule == "step":
        done = step / config.steps if progress is None else progress
        return 0.1 ** sum(done >= milestone for milestone in (2 / 3, 8 / 9))
    if progress is None:
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))


# --------------------------------------------------------------------------------------------------- logs and plots

class CsvLog:
    """``log.csv``: one row per ``log_every`` steps (losses, lr, throughput) and one per evaluation (AP)."""

    def __init__(self, path: Path, detector: str, resume_step: int | None) -> None:
        self.path = path
        self.columns = ["step", "epoch", "lr", "images_per_s", "loss",
                        *(f"loss_{name}" for name in LOSS_NAMES[detector]), *AP_COLUMNS]
        rows = []
        if resume_step is not None and path.is_file():  # keep the history up to the resumed step
            with open(path, newline="") as handle:
                rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, self.columns)
            writer.writeheader()
            writer.writerows({key: row.get(key, "") for key in self.columns} for row in rows)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.columns, restval="").writerow(row)


def plot_log(csv_path: Path, png_path: Path) -> None:
    """Loss curves and AP against step, from ``log.csv``, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    figure, (loss_axes, ap_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for column in [c for c in (rows[0].keys() if rows else []) if c.startswith("loss")]:
        points = [(int(r["step"]), float(r[column])) for r in rows if r[column]]
        if points:
            loss_axes.plot(*zip(*points), label=column)
    loss_axes.set(xlabel="step", ylabel="loss", yscale="log", title="training losses")
    for column in AP_COLUMNS:
        points = [(int(r["step"]), float(r[column])) for r in rows if r.get(column)]
        if points:
            ap_axes.plot(*zip(*points), marker="o", label=column)
    ap_axes.set(xlabel="step", ylabel="AP", ylim=(0, 1), xlim=loss_axes.get_xlim(), title="validation AP")
    for axes in (loss_axes, ap_axes):
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------------ the loop

def load_datasets(config: Config) -> tuple[CocoInstances, CocoInstances | None, Config]:
    """The training and (if configured) validation sets, and the config with ``num_classes`` resolved."""
    if not config.train_annotations or not config.train_images:
        raise PointINSError("config: train_annotations and train_images must name the training data")
    train_set = CocoInstances(config.train_annotations, config.train_images, hflip=config.hflip, seed=config.seed)
    val_set = None
    if config.val_annotations or config.val_images:
        if not (config.val_annotations and config.val_images):
            raise PointINSError("config: give both val_annotations and val_images, or neither")
        val_set = CocoInstances(config.val_annotations, config.val_images)
        if val_set.categories != train_set.categories:
            raise PointINSError(f"val annotation file {config.val_annotations}: its 'categories' differ from "
                                f"{config.train_annotations}'s")
    if config.num_classes == 0:
        config = dataclasses.replace(config, num_classes=train_set.num_classes)
    elif config.num_classes < train_set.num_classes:
        raise PointINSError(f"config: num_classes={config.num_classes} but {config.train_annotations} has "
                            f"{len(train_set.categories)} categories (needs num_classes >= "
                            f"{train_set.num_classes})")
    return train_set, val_set, config


def _ap_row(metrics: dict) -> dict[str, float]:
    return {"box_AP": metrics["box"]["AP"], "box_AP50": metrics["box"]["AP50"],
            "mask_AP": metrics["mask"]["AP"], "mask_AP50": metrics["mask"]["AP50"]}


def train(config: Config, resume: str | os.PathLike | None = None, progress: bool = True,
          stop_after: int | None = None) -> tuple[nn.Module, dict | None]:
    """Train as ``config`` says; returns the trained model (unwrapped) and the last evaluation's metrics (None
    without a validation set).

    Writes to ``config.output_dir`` (rank 0 only): ``config.yaml`` (resolved), ``checkpoint.pt`` (every
    ``checkpoint_every`` steps and at the end), ``log.csv``, ``curves.png`` and ``metrics.json``. ``resume``: a
    checkpoint whose model config matches; training continues from its step with the same data order, so the
    result equals an uninterrupted run. ``stop_after``: stop (with a checkpoint) once this many steps are done,
    as an interruption would.
    """
    process = start_processes(config)
    try:
        return _train(config, process, resume, progress, stop_after)
    finally:
        if process.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: Config, process: Process, resume, progress: bool, stop_after: int | None):
    if config.threads > 0 and process.device.type == "cpu":
        torch.set_num_threads(config.threads)
    train_set, val_set, config = load_datasets(config)
    if config.batch_size < 1 or config.steps < 1:
        raise PointINSError(f"config: batch_size and steps must be >= 1; got {config.batch_size}, {config.steps}")
    output_dir = Path(config.output_dir)
    torch.manual_seed(config.seed)
    model = build_model(config).to(process.device)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    step = 0
    if resume is not None:
        checkpoint = load_checkpoint(resume)
        check_checkpoint_config(checkpoint, config, resume)
        load_model_state(model, checkpoint, resume)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        step = int(checkpoint["step"])
        del checkpoint

    if process.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_config(config, output_dir)
        log = CsvLog(output_dir / "log.csv", config.detector, step if resume is not None else None)
    process.barrier()
    ddp_model = model
    if process.distributed:
        ddp_model = DistributedDataParallel(model, device_ids=[process.device.index] if process.device.type == "cuda"
                                            else None)

    sampler = DistributedSampler(train_set, num_replicas=process.world_size, rank=process.rank, shuffle=True,
                                 seed=config.seed, drop_last=True)
    steps_per_epoch = len(sampler) // config.batch_size
    if steps_per_epoch == 0:
        raise PointINSError(f"{config.train_annotations}: {len(train_set)} images are fewer than batch_size "
                            f"({config.batch_size}) x processes ({process.world_size})")
    autocast = process.device.type == "cuda" and config.amp
    images_per_step = config.batch_size * process.world_size
    last_stop = config.steps if stop_after is None else min(config.steps, stop_after)
    metrics = None

    from tqdm import tqdm
    bar = tqdm(total=config.steps, initial=step, desc="train", disable=not (progress and process.is_main),
               dynamic_ncols=True)
    started = tick = time.perf_counter()
    timed_out = False
    model.train()
    while step < last_stop:
        epoch, skip = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        # Skipping the batches an interrupted epoch already used, without loading them.
        indices = list(sampler)[skip * config.batch_size:]
        loader = DataLoader(train_set, batch_size=config.batch_size, sampler=indices, drop_last=True,
                            collate_fn=collate, num_workers=config.workers)
        for images, targets in loader:
            # Reseeding per step makes the mask branch's positive sampling independent of where a run resumed.
            torch.manual_seed(config.seed * 1_000_003 + step)
            images = [image.to(process.device, non_blocking=True) for image in images]
            targets = [{k: v.to(process.device, non_blocking=True) for k, v in t.items()} for t in targets]
            with torch.autocast(process.device.type, dtype=torch.bfloat16, enabled=autocast):
                losses = ddp_model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise RuntimeError(f"train: the loss became {loss.item()} at step {step} "
                                   f"({ {k: v.item() for k, v in losses.items()} }); lower lr or raise warmup_steps")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            # Throughput over the whole step, data loading included.
            speed = images_per_step / (time.perf_counter() - tick)
            tick = time.perf_counter()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{speed:.1f}")

            timed_out = (config.time_limit_minutes > 0
                         and time.perf_counter() - started > config.time_limit_minutes * 60)
            if process.distributed:  # every rank must stop at the same step
                flag = torch.tensor([float(timed_out)], device=process.device)
                dist.broadcast(flag, 0)
                timed_out = bool(flag.item())
            done = step >= last_stop or timed_out
            if process.is_main and (step % config.log_every == 0 or done or step == 1):
                log.write({"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                           "images_per_s": round(speed, 3), "loss": loss.item(),
                           **{f"loss_{name[5:] if name.startswith('loss_') else name}": value.item()
                              for name, value in losses.items()}})
            evaluate_now = val_set is not None and ((config.eval_every and step % config.eval_every == 0) or done)
            if evaluate_now:
                if process.is_main:
                    metrics = evaluate_model(model, val_set, config.batch_size, process.device)
                    model.train()
                    log.write({"step": step, "epoch": epoch, **_ap_row(metrics)})
                    bar.write(f"step {step}: box AP {metrics['box']['AP']:.3f}, mask AP {metrics['mask']['AP']:.3f}")
                process.barrier()
            if process.is_main and (step % config.checkpoint_every == 0 or done):
                save_checkpoint(output_dir / "checkpoint.pt", model, optimizer, scheduler, step, config,
                                train_set.categories)
                plot_log(output_dir / "log.csv", output_dir / "curves.png")
            process.barrier()
            if done:
                break
        if timed_out:
            break
    bar.close()
    if process.is_main and metrics is not None:
        (output_dir / "metrics.json").write_text(json.dumps(
            {"step": step, "box": metrics["box"], "mask": metrics["mask"]}, indent=1))
    return model, metrics
