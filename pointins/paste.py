"""Pasting box-relative masks into the image, all instances at once."""

from __future__ import annotations

import torch
from torch import Tensor


def _interpolation_matrix(low: Tensor, high: Tensor, cells: int, first_pixel: Tensor, pixels: int) -> Tensor:
    """(n, pixels, cells) bilinear weights that sample a row of ``cells`` mask cells stretched over [low, high)
    at the centres of pixels ``first_pixel, ..., first_pixel + pixels - 1``, with zeros beyond the mask's edge
    (like ``grid_sample(..., padding_mode="zeros")``)."""
    centres = first_pixel[:, None] + torch.arange(pixels, device=low.device, dtype=low.dtype) + 0.5
    extent = (high - low).clamp(min=torch.finfo(low.dtype).eps)
    # Position of each pixel centre in cell units, where cell j's centre is at j.
    source = (centres - low[:, None]) / extent[:, None] * cells - 0.5
    cell = torch.arange(cells, device=low.device, dtype=low.dtype)
    return (1.0 - (source[:, :, None] - cell).abs()).clamp(min=0.0)


def _window(low: Tensor, high: Tensor, cells: int, size: int) -> tuple[Tensor, int]:
    """First pixel (n,) and common length of windows inside [0, size) holding every pixel a mask can touch: its
    box and the fading edge, half a cell wide, either side."""
    half_cell = 0.5 * (high - low).clamp(min=0) / cells
    first = (torch.floor(low - half_cell) - 1).clamp(0, size)
    last = (torch.ceil(high + half_cell) + 1).clamp(0, size)
    length = int((last - first).max()) if low.numel() else 0
    length = max(1, min(length, size))
    return first.clamp(max=size - length), length


def paste_masks(masks: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Paste each mask into its box of an image of ``image_size``; everything outside the box is 0.

    The box-relative mask of instance i covers ``boxes[i]`` (x1, y1, x2, y2 in pixel-edge coordinates: pixel
    (y, x) spans [x, x + 1) x [y, y + 1)) and is sampled bilinearly at pixel centres, fading to 0 over half a
    cell beyond the box edge. This is what torchvision's ``paste_masks_in_image`` does for boxes rounded to whole
    pixels, but in one batched operation: bilinear resampling of an axis-aligned box is separable, so the pasted
    masks are ``Wy @ mask @ Wx^T`` with per-instance interpolation matrices, two batched matmuls (over a window
    around each box) instead of a Python loop over instances.

    Args:
        masks: (n, 1, Mh, Mw) or (n, Mh, Mw), e.g. mask probabilities.
        boxes: (n, 4) float boxes in the image's pixel coordinates.
        image_size: (H, W) of the output.

    Returns:
        (n, 1, H, W) float32 (float64 for float64 masks), on the masks' device, also under autocast.
    """
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"paste_masks: masks must be (n, 1, Mh, Mw) or (n, Mh, Mw); got {tuple(masks.shape)}")
        masks = masks[:, 0]
    if masks.dim() != 3 or boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.shape[0] != masks.shape[0]:
        raise ValueError(f"paste_masks: expected masks (n, Mh, Mw) and boxes (n, 4) with the same n; got masks "
                         f"{tuple(masks.shape)} and boxes {tuple(boxes.shape)}")
    height, width = int(image_size[0]), int(image_size[1])
    dtype = torch.float64 if masks.dtype == torch.float64 else torch.float32
    masks, boxes = masks.to(dtype), boxes.to(device=masks.device, dtype=dtype)
    # Under autocast, bmm would run in half precision: pixel positions need the full float32 mantissa.
    with torch.autocast(masks.device.type, enabled=False):
        # Each mask is computed in a window around its box only (all windows of one size, so still one batched
        # matmul), then written into the zeroed images: the work scales with the boxes, not the image.
        top, window_height = _window(boxes[:, 1], boxes[:, 3], masks.shape[1], height)
        left, window_width = _window(boxes[:, 0], boxes[:, 2], masks.shape[2], width)
        rows = _interpolation_matrix(boxes[:, 1], boxes[:, 3], masks.shape[1], top, window_height)
        columns = _interpolation_matrix(boxes[:, 0], boxes[:, 2], masks.shape[2], left, window_width)
        windows = torch.bmm(torch.bmm(rows, masks), columns.transpose(1, 2))
        pasted = masks.new_zeros(masks.shape[0], height, width)
        instance = torch.arange(masks.shape[0], device=masks.device)[:, None, None]
        row_index = (top.long()[:, None] + torch.arange(window_height, device=masks.device))[:, :, None]
        column_index = (left.long()[:, None] + torch.arange(window_width, device=masks.device))[:, None, :]
        pasted[instance, row_index, column_index] = windows
        return pasted[:, None]
