"""Running a trained checkpoint: evaluation on a COCO-format set and predictions on image files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .config import Config, PointINSError, config_from_dict, update_config, parse_overrides, write_config
from .data import CocoInstances, read_image
from .evaluate import detections_to_coco, evaluate_model
from .models import build_model
from .train import check_checkpoint_config, load_checkpoint, load_model_state, select_device
from .visualize import draw_prediction, save_png

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def load_trained(checkpoint_path: str | os.PathLike, overrides: list[str] | None = None
                 ) -> tuple[nn.Module, Config, list[dict]]:
    """The model of a checkpoint in eval mode on the configured device, its config (the checkpoint's, with
    ``overrides`` applied: thresholds, data, device; a model field that differs is an error) and categories."""
    checkpoint = load_checkpoint(checkpoint_path)
    saved = checkpoint["config"]
    config = config_from_dict(saved, f"checkpoint {checkpoint_path} (its 'config')")
    if overrides:
        config = update_config(config, parse_overrides(overrides), "command-line override")
    check_checkpoint_config(checkpoint, config, checkpoint_path)
    model = build_model(config)
    load_model_state(model, checkpoint, checkpoint_path)
    model.to(select_device(config)).eval()
    return model, config, list(checkpoint["categories"])


def run_eval(checkpoint_path, annotations: str | None = None, images: str | None = None,
             output_dir: str | None = None, overrides: list[str] | None = None) -> dict:
    """Box and mask AP of a checkpoint on a COCO-format set (default: the config's validation set); writes
    ``metrics.json`` and the resolved ``config.yaml`` to ``output_dir`` (default: ``eval`` beside the
    checkpoint) and returns the metrics."""
    model, config, _ = load_trained(checkpoint_path, overrides)
    annotations = annotations or config.val_annotations
    images = images or config.val_images
    if not annotations or not images:
        raise PointINSError("eval: give --annotations and --images (the checkpoint's config names no validation "
                            "set)")
    dataset = CocoInstances(annotations, images)
    metrics = evaluate_model(model, dataset, config.batch_size, next(model.parameters()).device)
    output = Path(output_dir) if output_dir else Path(checkpoint_path).parent / "eval"
    output.mkdir(parents=True, exist_ok=True)
    write_config(config, output)
    (output / "metrics.json").write_text(json.dumps({"annotations": str(annotations), "box": metrics["box"],
                                                     "mask": metrics["mask"]}, indent=1))
    return metrics


def image_files(inputs: list[str]) -> list[Path]:
    """Image files named directly or found (non-recursively, sorted) in named folders."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise PointINSError(f"predict: input {path} does not exist")
    if not files:
        raise PointINSError(f"predict: the image list is empty: no {'/'.join(IMAGE_SUFFIXES)} files in {inputs}")
    return files


@torch.no_grad()
def run_predict(checkpoint_path, inputs: list[str], output_dir: str, min_score: float = 0.5,
                overrides: list[str] | None = None, scale: int = 1) -> Path:
    """Predictions of a checkpoint on image files: ``output_dir/<image stem>.png`` with the masks, boxes and
    labels scoring at least ``min_score`` drawn, and ``output_dir/predictions.json``, a COCO-format dataset
    (``images``, ``categories`` and every detection as an ``annotation`` with its ``score`` and RLE mask).
    Returns the JSON's path."""
    files = image_files(inputs)
    model, config, categories = load_trained(checkpoint_path, overrides)
    device = next(model.parameters()).device
    label_to_category = {i + 1: c["id"] for i, c in enumerate(categories)}
    names = {i + 1: c["name"] for i, c in enumerate(categories)}
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    write_config(config, output)
    images, annotations = [], []
    stems = set()
    for image_id, path in enumerate(files, start=1):
        image = read_image(path)
        result = model([(image.float() / 255).to(device)])[0]
        images.append({"id": image_id, "file_name": str(path), "height": int(image.shape[1]),
                       "width": int(image.shape[2])})
        for detection in detections_to_coco(result, image_id, label_to_category):
            annotations.append({"id": len(annotations) + 1, "iscrowd": 0, **detection})
        stem = path.stem if path.stem not in stems else f"{path.stem}_{image_id}"
        stems.add(stem)
        save_png(draw_prediction(image, result, names, min_score, scale), output / f"{stem}.png")
    json_path = output / "predictions.json"
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return json_path
