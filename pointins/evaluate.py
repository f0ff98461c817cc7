"""COCO box and mask AP with faster-coco-eval, in memory."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core import mask as mask_api
from torch import Tensor, nn

from .data import CocoInstances, collate

# The 12 numbers of COCO's summary, in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = {"bbox": "box", "segm": "mask"}


def detections_to_coco(output: dict[str, Tensor], image_id: int, label_to_category: dict[int, int],
                       mask_threshold: float = 0.5) -> list[dict]:
    """One image's model output as COCO result dicts: ``bbox`` [x, y, w, h], ``score``, ``category_id`` and the
    mask thresholded at ``mask_threshold`` as compressed RLE (``counts`` a str, so the list is JSON-ready)."""
    boxes = output["boxes"].detach().float().cpu()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    masks = (output["masks"].detach()[:, 0] >= mask_threshold).cpu().numpy().astype(np.uint8)
    results = []
    for k in range(boxes.shape[0]):
        if int(labels[k]) not in label_to_category:
            continue
        x1, y1, x2, y2 = boxes[k].tolist()
        rle = mask_api.encode(np.asfortranarray(masks[k]))
        results.append({"image_id": int(image_id), "category_id": int(label_to_category[int(labels[k])]),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[k]),
                        "segmentation": {"size": [int(s) for s in rle["size"]],
                                         "counts": rle["counts"].decode("ascii")},
                        "area": float(mask_api.area(rle))})
    return results


def coco_summary(coco_gt: COCO, results: list[dict], iou_type: str) -> tuple[list[float], str]:
    """COCO's 12 summary numbers for ``iou_type`` ("bbox" or "segm") and the printed summary. With no results at
    all every number is 0 (the COCO API cannot load an empty result list); images without results count as
    images where nothing was found."""
    if not results:
        return [0.0] * 12, f"no detections: every {iou_type} AP and AR is 0\n"
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        evaluator = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=print)
        evaluator.params.imgIds = sorted(coco_gt.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    lines = [line for line in buffer.getvalue().splitlines() if "Average" in line]
    # COCO's convention: -1 where a metric has no ground truth (e.g. no large objects); kept as is.
    return [float(v) for v in evaluator.stats[:12]], "\n".join(lines) + "\n"


def evaluate_results(coco_gt: COCO, results: list[dict]) -> dict[str, dict[str, float]]:
    """``{"box": {...}, "mask": {...}}``, each the 12 named numbers, plus ``"summary"``: the printed tables."""
    metrics, summaries = {}, []
    for iou_type, name in IOU_TYPES.items():
        stats, text = coco_summary(coco_gt, results, iou_type)
        metrics[name] = dict(zip(STAT_NAMES, stats))
        summaries.append(f"{name} ({iou_type}):\n{text}")
    metrics["summary"] = "".join(summaries)
    return metrics


@torch.no_grad()
def predict_dataset(model: nn.Module, dataset: CocoInstances, batch_size: int = 4, device="cpu",
                    progress: bool = False) -> list[dict]:
    """COCO results of ``model`` on every image of ``dataset`` (no flips), in image order."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    if progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc="eval", leave=False)
    results = []
    for images, targets in loader:
        outputs = model([image.to(device) for image in images])
        for output, target in zip(outputs, targets):
            results += detections_to_coco(output, int(target["image_id"]), dataset.label_to_category)
    return results


def evaluate_model(model: nn.Module, dataset: CocoInstances, batch_size: int = 4, device="cpu",
                   progress: bool = False) -> dict[str, dict[str, float]]:
    """Box and mask AP of ``model`` on ``dataset`` (see ``evaluate_results``)."""
    flip, dataset.hflip = dataset.hflip, 0.0
    try:
        results = predict_dataset(model, dataset, batch_size, device, progress)
    finally:
        dataset.hflip = flip
    return evaluate_results(dataset.coco, results)
