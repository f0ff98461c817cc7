"""PointINS on torchvision's RetinaNet and FCOS: heads with a mask branch, detectors, builders."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torchvision.models import get_model, get_model_weights
from torchvision.models.detection import (FCOS, FCOS_ResNet50_FPN_Weights, RetinaNet,
                                          RetinaNet_ResNet50_FPN_Weights)
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, _validate_trainable_layers
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import boxes as box_ops, misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .mask_branch import PointINSMaskBranch
from .paste import paste_masks

# Keyword arguments of the detectors and builders that configure the mask branch (see PointINSMaskBranch).
MASK_BRANCH_OPTIONS = ("template_channels", "template_size", "mask_channels", "kernel_size", "groups", "tower_convs",
                       "class_specific", "positives_per_image", "backend")


class _PointINSHead:
    """What PointINS adds to a dense detector's head: the mask branch's dense tower in ``forward`` (as
    ``head_outputs["mask_features"]``) and ``loss_mask`` in ``compute_loss``, which receives the detector's own
    anchor matching, so positives are exactly the anchors the box losses train."""

    mask_branch: PointINSMaskBranch

    def forward(self, x: list[Tensor]) -> dict[str, Tensor]:
        outputs = super().forward(x)
        outputs["mask_features"] = self.mask_branch.point_features(x)
        return outputs

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs) -> dict[str, Tensor]:
        losses = super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        regression = head_outputs["bbox_regression"]

        def decode(image: int, anchor_idxs: Tensor) -> Tensor:
            return self.decode_boxes(regression[image, anchor_idxs], anchors[image][anchor_idxs])

        losses["loss_mask"] = self.mask_branch.loss(head_outputs["mask_features"], targets, matched_idxs, decode)
        return losses

    def decode_boxes(self, rel_codes: Tensor, anchors: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class PointINSRetinaNetHead(_PointINSHead, RetinaNetHead):
    """torchvision's ``RetinaNetHead`` plus a ``mask_branch`` with one set of instance-aware weights per anchor.

    ``mask_options`` are ``PointINSMaskBranch``'s keyword arguments."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int,
                 norm_layer: Callable[..., nn.Module] | None = None, **mask_options: Any) -> None:
        super().__init__(in_channels, num_anchors, num_classes, norm_layer=norm_layer)
        self.mask_branch = PointINSMaskBranch(in_channels, num_anchors, num_classes, **mask_options)

    def decode_boxes(self, rel_codes: Tensor, anchors: Tensor) -> Tensor:
        return self.regression_head.box_coder.decode_single(rel_codes, anchors)


class PointINSFCOSHead(_PointINSHead, FCOSHead):
    """torchvision's ``FCOSHead`` plus a ``mask_branch`` with one set of instance-aware weights per location.

    ``mask_options`` are ``PointINSMaskBranch``'s keyword arguments."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 **mask_options: Any) -> None:
        super().__init__(in_channels, num_anchors, num_classes, num_convs)
        self.mask_branch = PointINSMaskBranch(in_channels, num_anchors, num_classes, **mask_options)

    def decode_boxes(self, rel_codes: Tensor, anchors: Tensor) -> Tensor:
        return self.box_coder.decode(rel_codes, anchors)


class _PointINSDetector:
    """The forward pass shared by both detectors.

    torchvision's eval path splits every head output per FPN level (the mask tower's output has one row per
    point, not per anchor) and its ``postprocess_detections`` forgets which anchors it kept; here the detection
    outputs alone are split, ``postprocess_detections`` also returns each detection's ``anchor_idxs`` (its index
    in the image's anchors, all levels concatenated, which gives its FPN level, location and anchor), and the
    mask branch runs at the kept detections only.
    """

    head: _PointINSHead

    @property
    def mask_branch(self) -> PointINSMaskBranch:
        return self.head.mask_branch

    def _init_head(self, head: nn.Module | None, head_type: type, mask_options: dict[str, Any],
                   make_head: Callable[[], nn.Module]) -> None:
        if head is None:
            self.head = make_head()
        elif not isinstance(head, head_type):
            raise TypeError(f"{type(self).__name__}: head must be a {head_type.__name__}; got {type(head).__name__}")
        elif mask_options:
            raise ValueError(f"{type(self).__name__}: pass the mask options {sorted(mask_options)} to the head you "
                             "built, not to the detector")

    def load_detector_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load a state dict of the plain torchvision detector (e.g. COCO-trained RetinaNet or FCOS weights) into
        this model; the mask branch keeps its own parameters. Raises if anything else is missing or unexpected."""
        own = self.state_dict()
        missing = [key for key in own if key not in state_dict and not key.startswith("head.mask_branch.")]
        # FrozenBatchNorm2d (the backbone's norm when pretrained) has no batch counter and drops it on loading.
        unexpected = [key for key in state_dict if key not in own and not key.endswith(".num_batches_tracked")]
        mismatched = [f"{key}: {tuple(value.shape)} != {tuple(own[key].shape)}" for key, value in state_dict.items()
                      if key in own and value.shape != own[key].shape]
        if missing or unexpected or mismatched:  # checked before loading, so a failure changes nothing
            raise RuntimeError(f"{type(self).__name__}.load_detector_state_dict: the state dict does not match the "
                               f"detector: missing {missing}, unexpected {unexpected}, shapes (given != ours) "
                               f"{mismatched}")
        self.load_state_dict(state_dict, strict=False)

    def _check_targets(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None) -> None:
        name = type(self).__name__
        if targets is None:
            raise ValueError(f"{name}: targets are required in training mode")
        if len(targets) != len(images):
            raise ValueError(f"{name}: expected one target per image; got {len(targets)} targets for {len(images)} "
                             "images")
        for i, (image, target) in enumerate(zip(images, targets)):
            for key in ("boxes", "labels", "masks"):
                if not isinstance(target.get(key), Tensor):
                    raise ValueError(f"{name}: targets[{i}][{key!r}] must be a tensor; got "
                                     f"{type(target.get(key)).__name__}")
            boxes, labels, masks = target["boxes"], target["labels"], target["masks"]
            if boxes.dim() != 2 or boxes.shape[1] != 4:
                raise ValueError(f"{name}: targets[{i}]['boxes'] must be (N, 4); got {tuple(boxes.shape)}")
            if labels.shape != boxes.shape[:1]:
                raise ValueError(f"{name}: targets[{i}]['labels'] must be (N,) with N = {boxes.shape[0]} boxes; "
                                 f"got {tuple(labels.shape)}")
            expected = (boxes.shape[0], *image.shape[-2:])
            if tuple(masks.shape) != expected:
                raise ValueError(f"{name}: targets[{i}]['masks'] must be (N, H, W) = {expected} (one mask per box, "
                                 f"the image's size); got {tuple(masks.shape)}")
            degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
            if degenerate.any():
                raise ValueError(f"{name}: targets[{i}]['boxes'] must have x1 < x2 and y1 < y2; got "
                                 f"{boxes[degenerate][0].tolist()}")

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """In training mode, the detector's losses plus ``loss_mask``; in eval mode, per image a dict with
        ``boxes`` (n, 4), ``labels`` (n,), ``scores`` (n,) and ``masks`` (n, 1, H, W) float in [0, 1] at the
        original image size, like Mask R-CNN's.

        Targets are torchvision's dicts with ``boxes`` (N, 4) float x1, y1, x2, y2 in pixels, ``labels`` (N,)
        int64 and ``masks`` (N, H, W) uint8; N may be 0.
        """
        if self.training:
            self._check_targets(images, targets)
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        images, targets = self.transform(images, targets)

        features = self.backbone(images.tensors)
        features = list(features.values()) if isinstance(features, (dict, OrderedDict)) else [features]
        head_outputs = self.head(features)
        anchors = self.anchor_generator(images, features)
        points_per_level = [level.shape[2] * level.shape[3] for level in features]

        if self.training:
            return self._detector_losses(targets, head_outputs, anchors, points_per_level)

        anchors_per_point = self.mask_branch.instances_per_point
        anchors_per_level = [points * anchors_per_point for points in points_per_level]
        split_outputs = {key: list(value.split(anchors_per_level, dim=1))
                         for key, value in head_outputs.items() if key != "mask_features"}
        split_anchors = [list(image_anchors.split(anchors_per_level)) for image_anchors in anchors]
        detections = self.postprocess_detections(split_outputs, split_anchors, images.image_sizes)

        anchor_idxs = [detection.pop("anchor_idxs") for detection in detections]
        mask_logits = self.mask_branch.predict(head_outputs["mask_features"], anchor_idxs,
                                               [detection["labels"] for detection in detections])
        detections = self.transform.postprocess(detections, images.image_sizes, original_sizes)
        for detection, logits, size in zip(detections, mask_logits, original_sizes):
            detection["masks"] = paste_masks(logits.float().sigmoid(), detection["boxes"], size)
        return detections

    def _detector_losses(self, targets, head_outputs, anchors, points_per_level) -> dict[str, Tensor]:
        raise NotImplementedError  # pragma: no cover

    def _level_scores(self, head_outputs: dict[str, list[Tensor]], image: int, level: int) -> Tensor:
        """(anchors of the level, num_classes) detection scores of one image at one level."""
        raise NotImplementedError  # pragma: no cover

    def postprocess_detections(self, head_outputs: dict[str, list[Tensor]], anchors: list[list[Tensor]],
                               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """torchvision's selection (score threshold and top-k per level, class-wise NMS, ``detections_per_img``),
        returning also ``anchor_idxs``: each detection's anchor in the image's anchors of all levels."""
        detections = []
        for image, (image_anchors, image_shape) in enumerate(zip(anchors, image_shapes)):
            boxes, scores, labels, anchor_idxs = [], [], [], []
            level_start = 0
            for level, level_anchors in enumerate(image_anchors):
                level_scores = self._level_scores(head_outputs, image, level)
                num_classes = level_scores.shape[-1]
                flat_scores = level_scores.flatten()
                candidates = torch.where(flat_scores > self.score_thresh)[0]
                top_scores, order = flat_scores[candidates].topk(min(self.topk_candidates, candidates.numel()))
                candidates = candidates[order]
                level_anchor_idxs = torch.div(candidates, num_classes, rounding_mode="floor")
                level_boxes = self.head.decode_boxes(head_outputs["bbox_regression"][level][image][level_anchor_idxs],
                                                     level_anchors[level_anchor_idxs])
                boxes.append(box_ops.clip_boxes_to_image(level_boxes, image_shape))
                scores.append(top_scores)
                labels.append(candidates % num_classes)
                anchor_idxs.append(level_anchor_idxs + level_start)
                level_start += level_anchors.shape[0]
            boxes, scores, labels, anchor_idxs = (torch.cat(boxes), torch.cat(scores), torch.cat(labels),
                                                  torch.cat(anchor_idxs))
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[:self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep],
                               "anchor_idxs": anchor_idxs[keep]})
        return detections


def _mask_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: kwargs.pop(key) for key in MASK_BRANCH_OPTIONS if key in kwargs}


class PointINSRetinaNet(_PointINSDetector, RetinaNet):
    """PointINS on torchvision's RetinaNet: one potential instance per anchor (9 per location by default).

    Args are ``RetinaNet``'s (``backbone``, ``num_classes``, ``min_size``, ``max_size``, ``anchor_generator``,
    thresholds, ...), plus the mask branch's options (``template_channels``, ``template_size``,
    ``mask_channels``, ``kernel_size``, ``groups``, ``tower_convs``, ``class_specific``,
    ``positives_per_image``, ``backend``; see ``PointINSMaskBranch`` for their defaults and why). ``head``, if
    given, must be a ``PointINSRetinaNetHead`` and then carries the mask options itself.
    ``detections_per_img`` defaults to 100 (RetinaNet's is 300), as Mask R-CNN's: every detection is a full-size
    mask in the output, and 300 masks of a COCO-sized image take about 1 GB.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, head: nn.Module | None = None,
                 detections_per_img: int = 100, **kwargs: Any) -> None:
        mask_options = _mask_options(kwargs)
        # RetinaNet builds its default anchor generator before its head; a placeholder head lets the real one be
        # built with that generator's anchor count.
        super().__init__(backbone, num_classes, head=head if head is not None else nn.Identity(),
                         detections_per_img=detections_per_img, **kwargs)
        self._init_head(head, PointINSRetinaNetHead, mask_options, lambda: PointINSRetinaNetHead(
            backbone.out_channels, self.anchor_generator.num_anchors_per_location()[0], num_classes,
            **mask_options))

    def _detector_losses(self, targets, head_outputs, anchors, points_per_level):
        return self.compute_loss(targets, head_outputs, anchors)

    def _level_scores(self, head_outputs, image, level):
        return torch.sigmoid(head_outputs["cls_logits"][level][image])


class PointINSFCOS(_PointINSDetector, FCOS):
    """PointINS on torchvision's FCOS: one potential instance per location.

    Args are ``FCOS``'s (``backbone``, ``num_classes``, ``min_size``, ``max_size``, thresholds, ...) plus the mask
    branch's options, as for ``PointINSRetinaNet``; ``head``, if given, must be a ``PointINSFCOSHead``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, head: nn.Module | None = None,
                 **kwargs: Any) -> None:
        mask_options = _mask_options(kwargs)
        super().__init__(backbone, num_classes, head=head if head is not None else nn.Identity(), **kwargs)
        self._init_head(head, PointINSFCOSHead, mask_options, lambda: PointINSFCOSHead(
            backbone.out_channels, self.anchor_generator.num_anchors_per_location()[0], num_classes,
            **mask_options))

    def _detector_losses(self, targets, head_outputs, anchors, points_per_level):
        return self.compute_loss(targets, head_outputs, anchors, points_per_level)

    def _level_scores(self, head_outputs, image, level):
        return torch.sqrt(torch.sigmoid(head_outputs["cls_logits"][level][image])
                          * torch.sigmoid(head_outputs["bbox_ctrness"][level][image]))


_DETECTORS = {
    "retinanet": (PointINSRetinaNet, RetinaNet_ResNet50_FPN_Weights),
    "fcos": (PointINSFCOS, FCOS_ResNet50_FPN_Weights),
}


def build_pointins(detector: str, backbone_name: str = "resnet50", *, weights=None, progress: bool = True,
                   num_classes: int | None = None, weights_backbone=None,
                   trainable_backbone_layers: int | None = None, **kwargs: Any):
    """PointINS on ``detector`` ("retinanet" or "fcos") with a ResNet-FPN backbone (P3-P7, as torchvision's
    RetinaNet and FCOS), built like torchvision's builders.

    Args:
        detector: "retinanet" or "fcos".
        backbone_name: a torchvision ResNet ("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d",
            ...); "resnet18" is the light choice for CPU work.
        weights: pretrained *detector* weights for the ResNet-50 models only, torchvision's
            ``RetinaNet_ResNet50_FPN_Weights`` / ``FCOS_ResNet50_FPN_Weights`` (or their names): the box and
            class heads start from them, the mask branch from scratch. None (default): nothing is downloaded.
        progress: show download progress bars.
        num_classes: number of classes (torchvision's convention: label 0 is background, unused by these
            detectors); default 91, or the weights' category count.
        weights_backbone: pretrained weights of the ResNet (an enum of ``torchvision.models`` or its name), default
            None: nothing is downloaded.
        trainable_backbone_layers: ResNet stages left trainable, 0 to 5; default 3 with pretrained weights, else 5.
        **kwargs: ``PointINSRetinaNet`` / ``PointINSFCOS`` keywords: the detector's (``min_size``, ``max_size``,
            ``score_thresh``, ...) and the mask branch's (``template_channels``, ``positives_per_image``, ...).
    """
    if detector not in _DETECTORS:
        raise ValueError(f"build_pointins: detector must be one of {sorted(_DETECTORS)}; got {detector!r}")
    model_class, detector_weights_enum = _DETECTORS[detector]
    if weights is not None:
        if backbone_name != "resnet50":
            raise ValueError(f"build_pointins: pretrained detector weights exist for resnet50 only; got "
                             f"backbone_name={backbone_name!r}")
        weights = detector_weights_enum.verify(weights)
        weights_backbone = None
        categories = len(weights.meta["categories"])
        if num_classes is not None and num_classes != categories:
            raise ValueError(f"build_pointins: weights {weights} have {categories} classes; got "
                             f"num_classes={num_classes}")
        num_classes = categories
    elif num_classes is None:
        num_classes = 91
    if weights_backbone is not None:
        weights_backbone = get_model_weights(backbone_name).verify(weights_backbone)

    is_trained = weights is not None or weights_backbone is not None
    trainable_backbone_layers = _validate_trainable_layers(is_trained, trainable_backbone_layers, 5, 3)
    norm_layer = misc_nn_ops.FrozenBatchNorm2d if is_trained else nn.BatchNorm2d
    resnet = get_model(backbone_name, weights=weights_backbone, progress=progress, norm_layer=norm_layer)
    backbone = _resnet_fpn_extractor(resnet, trainable_backbone_layers, returned_layers=[2, 3, 4],
                                     extra_blocks=LastLevelP6P7(256, 256))
    model = model_class(backbone, num_classes, **kwargs)
    if weights is not None:
        model.load_detector_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
        if weights == RetinaNet_ResNet50_FPN_Weights.COCO_V1:
            overwrite_eps(model, 0.0)  # as torchvision's builder: those weights were trained with eps = 0
    return model


def pointins_retinanet_resnet50_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                                    weights_backbone=None, trainable_backbone_layers: int | None = None,
                                    **kwargs: Any) -> PointINSRetinaNet:
    """PointINS on RetinaNet with a ResNet-50-FPN backbone; the keywords are torchvision's
    ``retinanet_resnet50_fpn``'s (see ``build_pointins``), except that ``weights_backbone`` defaults to None so
    that nothing is downloaded unless asked for."""
    return build_pointins("retinanet", "resnet50", weights=weights, progress=progress, num_classes=num_classes,
                          weights_backbone=weights_backbone, trainable_backbone_layers=trainable_backbone_layers,
                          **kwargs)


def pointins_fcos_resnet50_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                               weights_backbone=None, trainable_backbone_layers: int | None = None,
                               **kwargs: Any) -> PointINSFCOS:
    """PointINS on FCOS with a ResNet-50-FPN backbone; the keywords are torchvision's ``fcos_resnet50_fpn``'s
    (see ``build_pointins``), except that ``weights_backbone`` defaults to None."""
    return build_pointins("fcos", "resnet50", weights=weights, progress=progress, num_classes=num_classes,
                          weights_backbone=weights_backbone, trainable_backbone_layers=trainable_backbone_layers,
                          **kwargs)


def pointins_retinanet_resnet18_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                                    weights_backbone=None, trainable_backbone_layers: int | None = None,
                                    **kwargs: Any) -> PointINSRetinaNet:
    """PointINS on RetinaNet with a ResNet-18-FPN backbone, the light model for CPU work. ``weights`` must be None
    (no pretrained detector has this backbone); ``weights_backbone`` may be ``ResNet18_Weights``."""
    return build_pointins("retinanet", "resnet18", weights=weights, progress=progress, num_classes=num_classes,
                          weights_backbone=weights_backbone, trainable_backbone_layers=trainable_backbone_layers,
                          **kwargs)


def pointins_fcos_resnet18_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                               weights_backbone=None, trainable_backbone_layers: int | None = None,
                               **kwargs: Any) -> PointINSFCOS:
    """PointINS on FCOS with a ResNet-18-FPN backbone, the light model for CPU work. ``weights`` must be None;
    ``weights_backbone`` may be ``ResNet18_Weights``."""
    return build_pointins("fcos", "resnet18", weights=weights, progress=progress, num_classes=num_classes,
                          weights_backbone=weights_backbone, trainable_backbone_layers=trainable_backbone_layers,
                          **kwargs)
