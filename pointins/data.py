"""Data: a COCO-format instance-segmentation dataset read with the COCO API, and the built-in shapes dataset.

A COCO-format dataset is an instances JSON (``images``, ``annotations``, ``categories``) and a folder of images;
masks are polygons or RLE (compressed or not). Categories map to labels 1..K in sorted id order (torchvision's
convention: 0 is the background), so a model for K categories has ``num_classes = K + 1``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from faster_coco_eval import COCO
from faster_coco_eval.core import mask as mask_api
from PIL import Image
from torch import Tensor

from .config import PointINSError

SHAPE_CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]


# ------------------------------------------------------------------------------------------------------ COCO files

def read_json(path: str | os.PathLike, what: str = "annotation file") -> Any:
    """The parsed JSON file, with a PointINSError naming the file for a missing file or malformed JSON."""
    path = Path(path)
    if not path.is_file():
        raise PointINSError(f"{what} {path} does not exist")
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise PointINSError(f"{what} {path} is not valid JSON: {error.msg} at line {error.lineno}, column "
                            f"{error.colno}") from None


def check_coco_dict(data: Any, source: str, require_masks: bool = True) -> None:
    """Check what the loader and the evaluator rely on, naming the file and the offending field."""
    if not isinstance(data, dict):
        raise PointINSError(f"{source}: expected a JSON object with 'images', 'annotations' and 'categories'; got "
                            f"{type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise PointINSError(f"{source}: field '{key}' must be a list; got {type(data.get(key)).__name__}")
    if not data["images"]:
        raise PointINSError(f"{source}: the image list ('images') is empty")
    if not data["categories"]:
        raise PointINSError(f"{source}: the category list ('categories') is empty")
    image_ids = set()
    for i, image in enumerate(data["images"]):
        for key in ("id", "file_name", "height", "width"):
            if not isinstance(image, dict) or key not in image:
                raise PointINSError(f"{source}: images[{i}] has no '{key}'")
        image_ids.add(image["id"])
    category_ids = set()
    for i, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise PointINSError(f"{source}: categories[{i}] must have an 'id' and a 'name'")
        category_ids.add(category["id"])
    for i, ann in enumerate(data["annotations"]):
        name = f"annotations[{i}] (id {ann.get('id')!r})" if isinstance(ann, dict) else f"annotations[{i}]"
        if not isinstance(ann, dict):
            raise PointINSError(f"{source}: {name} is not an object")
        for key in ("id", "image_id", "category_id"):
            if key not in ann:
                raise PointINSError(f"{source}: {name} has no '{key}'")
        if ann["image_id"] not in image_ids:
            raise PointINSError(f"{source}: {name} refers to image_id {ann['image_id']!r}, which is not in 'images'")
        if ann["category_id"] not in category_ids:
            raise PointINSError(f"{source}: {name} refers to category_id {ann['category_id']!r}, which is not in "
                                "'categories'")
        if require_masks:
            segmentation = ann.get("segmentation")
            if not segmentation or not isinstance(segmentation, (list, dict)):
                raise PointINSError(f"{source}: {name} has no mask: field 'segmentation' must be a non-empty list "
                                    "of polygons or an RLE object")
            if isinstance(segmentation, dict) and ("counts" not in segmentation or "size" not in segmentation):
                raise PointINSError(f"{source}: {name}: an RLE 'segmentation' needs 'counts' and 'size'")


def load_coco(path: str | os.PathLike, require_masks: bool = True) -> COCO:
    """The COCO API's index of a checked instances JSON."""
    data = read_json(path)
    check_coco_dict(data, f"annotation file {path}", require_masks)
    return coco_from_dict(data)


def coco_from_dict(data: dict) -> COCO:
    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    return coco


def read_image(path: str | os.PathLike) -> Tensor:
    """(3, H, W) uint8 RGB, with a PointINSError naming the file if it is missing or not an image."""
    path = Path(path)
    if not path.is_file():
        raise PointINSError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
        raise PointINSError(f"image file {path} could not be decoded as an image: {error}") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


class CocoInstances(torch.utils.data.Dataset):
    """A COCO-format instance-segmentation dataset: item ``i`` is ``(image, target)`` with ``image`` (3, H, W)
    float in [0, 1] and ``target`` torchvision's dict (``boxes`` (N, 4) x1, y1, x2, y2 in pixel edges, tight
    around each mask; ``labels`` (N,) int64 in 1..K; ``masks`` (N, H, W) uint8; ``image_id``).

    Crowd annotations (``iscrowd``) and annotations whose mask is empty are left out of the targets (the
    evaluator still sees crowds through the COCO API). ``hflip`` flips an image and its target with that
    probability, decided by ``(seed, epoch, index)`` so that a run and its resumption see the same data.
    """

    def __init__(self, annotations: str | os.PathLike, images: str | os.PathLike, hflip: float = 0.0,
                 seed: int = 0) -> None:
        self.annotations = Path(annotations)
        self.images = Path(images)
        if not self.images.is_dir():
            raise PointINSError(f"image folder {self.images} does not exist (for annotation file {annotations})")
        self.coco = load_coco(self.annotations)
        self.image_ids = sorted(self.coco.getImgIds())
        missing = [self.coco.imgs[i]["file_name"] for i in self.image_ids
                   if not (self.images / self.coco.imgs[i]["file_name"]).is_file()]
        if missing:
            raise PointINSError(f"annotation file {annotations}: {len(missing)} image file(s) missing from "
                                f"{self.images}, e.g. {missing[0]}")
        self.categories = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        self.label_to_category = {i + 1: c["id"] for i, c in enumerate(self.categories)}
        self.category_to_label = {c: label for label, c in self.label_to_category.items()}
        self.hflip = hflip
        self.seed = seed
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return len(self.categories) + 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_ids)

    def target(self, index: int) -> dict[str, Tensor]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        height, width = int(info["height"]), int(info["width"])
        masks, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            try:
                mask = self.coco.annToMask(ann)
            except Exception as error:  # the COCO API's own message is terse: say which annotation
                raise PointINSError(f"annotation file {self.annotations}: annotation id {ann['id']}: its "
                                    f"'segmentation' could not be decoded: {error}") from None
            if mask.shape != (height, width):
                raise PointINSError(f"annotation file {self.annotations}: annotation id {ann['id']}: mask size "
                                    f"{mask.shape} differs from image {image_id}'s (height, width) = "
                                    f"{(height, width)}")
            if mask.any():
                masks.append(torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8)))
                labels.append(self.category_to_label[ann["category_id"]])
        masks = torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.uint8)
        return {"boxes": masks_to_boxes(masks), "labels": torch.tensor(labels, dtype=torch.int64), "masks": masks,
                "image_id": torch.tensor(image_id)}

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        image = read_image(self.images / info["file_name"])
        if tuple(image.shape[-2:]) != (info["height"], info["width"]):
            raise PointINSError(f"image file {self.images / info['file_name']}: size {tuple(image.shape[-2:])} "
                                f"differs from its (height, width) {(info['height'], info['width'])} in "
                                f"{self.annotations}")
        target = self.target(index)
        if self.hflip > 0:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 100_003 + index)
            if torch.rand((), generator=generator) < self.hflip:
                image, target = hflip(image, target)
        return image.float() / 255, target


def masks_to_boxes(masks: Tensor) -> Tensor:
    """(N, 4) float boxes in pixel-edge coordinates, tight around non-empty (N, H, W) masks."""
    if masks.shape[0] == 0:
        return torch.zeros(0, 4)
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    height, width = masks.shape[-2:]
    y1 = rows.float().argmax(dim=1)
    y2 = height - rows.flip(1).float().argmax(dim=1)
    x1 = cols.float().argmax(dim=1)
    x2 = width - cols.flip(1).float().argmax(dim=1)
    return torch.stack([x1, y1, x2, y2], dim=1).float()


def hflip(image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def collate(batch):
    return tuple(zip(*batch))


# ---------------------------------------------------------------------------------------------------- shapes data

def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background: a random colour, a smooth low-frequency field, stripes and pixel noise."""
    base = rng.uniform(0.15, 0.85, 3)
    coarse = rng.normal(0, 0.12, (5, 5, 3))
    # Bilinear upsampling of the coarse field by separable interpolation matrices.
    positions = np.linspace(0, 4, size)
    lower = np.clip(np.floor(positions).astype(int), 0, 3)
    frac = positions - lower
    interp = np.zeros((size, 5))
    interp[np.arange(size), lower] = 1 - frac
    interp[np.arange(size), lower + 1] += frac
    smooth = np.einsum("yi,ijc,xj->yxc", interp, coarse, interp)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(4, 12)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = 0.06 * np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
    noise = rng.normal(0, 0.03, (size, size, 3))
    return np.clip(base + smooth + stripes[..., None] + noise, 0, 1)


def _shape_polygon(rng: np.random.Generator, kind: str, size: int, radius: tuple[float, float]) -> list[float]:
    """Flat [x0, y0, x1, y1, ...] polygon of a randomly placed, sized and rotated shape; ``radius`` is the range of
    its circumradius as a fraction of the image side."""
    radius = rng.uniform(*radius) * size
    cx, cy = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
    if kind == "circle":
        angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    elif kind == "square":
        angles = rng.uniform(0, math.pi / 2) + np.arange(4) * math.pi / 2
    else:
        angles = rng.uniform(0, 2 * math.pi) + np.arange(3) * 2 * math.pi / 3 + rng.uniform(-0.25, 0.25, 3)
    xs = np.clip(cx + radius * np.cos(angles), 0, size)
    ys = np.clip(cy + radius * np.sin(angles), 0, size)
    return [round(float(v), 2) for pair in zip(xs, ys) for v in pair]


def _polygon_mask(polygon: list[float], size: int) -> np.ndarray:
    rle = mask_api.merge(mask_api.frPyObjects([polygon], size, size))
    return mask_api.decode(rle).astype(bool)


def _encode_rle(mask: np.ndarray) -> dict:
    rle = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def generate_shapes(root: str | os.PathLike, num_images: int, image_size: int = 96, seed: int = 0,
                    max_objects: int = 4, mask_format: str = "rle", min_visible: float = 0.5,
                    radius: tuple[float, float] = (0.1, 0.28)) -> Path:
    """Write a COCO-format shapes dataset to ``root`` (``root/images/*.png`` and ``root/annotations.json``);
    returns the JSON's path. Deterministic in ``seed``.

    Each image holds 1 to ``max_objects`` circles, squares and triangles of several sizes (circumradius ``radius``
    times the image side, uniformly), rotations and colours
    on a textured background; later shapes occlude earlier ones, and a shape is redrawn elsewhere unless at least
    ``min_visible`` of it stays visible. Masks are the visible parts. ``mask_format`` "rle" writes every mask as
    compressed RLE; "polygon" writes a polygon for every shape nobody occludes (exact: the image is painted with
    the COCO API's own rasterisation of that polygon) and RLE for the occluded ones, which polygons cannot hold.
    """
    if mask_format not in ("rle", "polygon"):
        raise PointINSError(f"generate_shapes: mask_format must be 'rle' or 'polygon'; got {mask_format!r}")
    if num_images < 1 or max_objects < 1 or image_size < 16:
        raise PointINSError(f"generate_shapes: need num_images >= 1, max_objects >= 1 and image_size >= 16; got "
                            f"{num_images}, {max_objects}, {image_size}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        pixels = _background(rng, image_size)
        shapes: list[tuple[int, list[float], np.ndarray]] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            for _attempt in range(20):
                category = int(rng.integers(1, 4))
                polygon = _shape_polygon(rng, SHAPE_CATEGORIES[category - 1]["name"], image_size, radius)
                mask = _polygon_mask(polygon, image_size)
                # Every earlier shape must keep min_visible of its area once this one is on top.
                if mask.sum() >= 16 and all((full & ~mask & ~_covered(shapes, j + 1, image_size)).sum()
                                            >= min_visible * full.sum() for j, (_, _, full) in enumerate(shapes)):
                    shapes.append((category, polygon, mask))
                    break
        for category, polygon, mask in shapes:
            colour = rng.uniform(0, 1, 3)
            pixels[mask] = np.clip(colour + rng.normal(0, 0.02, (int(mask.sum()), 3)), 0, 1)
        for k, (category, polygon, mask) in enumerate(shapes):
            visible = mask & ~_covered(shapes, k + 1, image_size)
            occluded = bool((mask & ~visible).any())
            segmentation = [polygon] if mask_format == "polygon" and not occluded else _encode_rle(visible)
            rle = mask_api.encode(np.asfortranarray(visible.astype(np.uint8)))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "segmentation": segmentation, "area": float(mask_api.area(rle)),
                                "bbox": [float(v) for v in mask_api.toBbox(rle)], "iscrowd": 0})
        file_name = f"{image_id:06d}.png"
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(root / "images" / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": SHAPE_CATEGORIES}))
    return path


def _covered(shapes, start: int, size: int) -> np.ndarray:
    """Union of the masks of shapes[start:] (those painted on top of shapes[start - 1])."""
    union = np.zeros((size, size), dtype=bool)
    for _, _, mask in shapes[start:]:
        union |= mask
    return union
