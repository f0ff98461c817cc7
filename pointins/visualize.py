"""Pictures of instances: masks, boxes and labels drawn with torchvision's drawing utilities."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

# Fixed, distinguishable colours, one per instance in order.
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4",
           "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000", "#ffd8b1", "#000075"]


def draw_instances(image: Tensor, boxes: Tensor, masks: Tensor, captions: list[str], scale: int = 1) -> Tensor:
    """``image`` (3, H, W) uint8 with boolean ``masks`` (n, H, W) filled half-transparently, ``boxes`` (n, 4)
    outlined and ``captions`` written; ``scale`` enlarges the picture first (nearest neighbour) so that labels
    stay legible on small images. Returns (3, scale*H, scale*W) uint8."""
    if scale != 1:
        image = F.interpolate(image[None].float(), scale_factor=scale, mode="nearest")[0].to(torch.uint8)
        masks = F.interpolate(masks[None].float(), scale_factor=scale, mode="nearest")[0] > 0.5 \
            if masks.shape[0] else masks.new_zeros(0, *image.shape[-2:], dtype=torch.bool)
        boxes = boxes * scale
    colours = [PALETTE[i % len(PALETTE)] for i in range(boxes.shape[0])]
    if boxes.shape[0] == 0:
        return image
    image = draw_segmentation_masks(image, masks.bool(), alpha=0.45, colors=colours)
    return draw_bounding_boxes(image, boxes.float(), labels=captions, colors=colours, width=2)


def draw_prediction(image: Tensor, output: dict[str, Tensor], names: dict[int, str], min_score: float = 0.5,
                    scale: int = 1) -> Tensor:
    """A model's output (``boxes``, ``labels``, ``scores``, ``masks`` (n, 1, H, W) probabilities) on ``image``
    (uint8), detections scoring at least ``min_score`` only, captioned "name score"."""
    keep = output["scores"] >= min_score
    captions = [f"{names.get(int(label), str(int(label)))} {float(score):.2f}"
                for label, score in zip(output["labels"][keep], output["scores"][keep])]
    return draw_instances(image, output["boxes"][keep].cpu(), output["masks"][keep, 0].cpu() >= 0.5, captions, scale)


def draw_target(image: Tensor, target: dict[str, Tensor], names: dict[int, str], scale: int = 1) -> Tensor:
    """Ground truth (``boxes``, ``labels``, ``masks``) on ``image`` (uint8), captioned with the class name."""
    captions = [names.get(int(label), str(int(label))) for label in target["labels"]]
    return draw_instances(image, target["boxes"], target["masks"].bool(), captions, scale)


def grid(rows: list[list[Tensor]], gap: int = 4) -> Tensor:
    """Pictures (3, H, W) uint8 of one size laid out in rows, on white."""
    height, width = rows[0][0].shape[-2:]
    columns = max(len(row) for row in rows)
    canvas = torch.full((3, len(rows) * (height + gap) - gap, columns * (width + gap) - gap), 255, dtype=torch.uint8)
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            top, left = r * (height + gap), c * (width + gap)
            canvas[:, top:top + height, left:left + width] = picture
    return canvas


def save_png(picture: Tensor, path: str | os.PathLike) -> None:
    """(3, H, W) uint8 as a PNG file."""
    Image.fromarray(picture.permute(1, 2, 0).cpu().numpy()).save(path, format="PNG")
