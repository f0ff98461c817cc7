"""The PointINS mask branch: a dense mask tower, then templates, instance-aware weights and masks at chosen points."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

import pointins_ops


class PointINSMaskBranch(nn.Module):
    """Mask branch of PointINS, shared by every FPN level.

    A *point* is one location of one FPN level. A *potential instance* is one prediction of the detector at a
    point: RetinaNet has one per anchor (``instances_per_point = A``), FCOS one per location. The branch works in
    three stages:

    1. ``tower``: ``tower_convs`` x (3x3 conv, GroupNorm, ReLU) over every level, densely (it is a convolution);
       its output at a point is the point feature ``f`` of ``in_channels`` values.
    2. At the points that are used only (sampled positives in training, kept detections at inference):
       the template branch maps ``f`` to an instance-agnostic template ``(C_t, S, S)``, and the weight branch
       maps ``f`` to one set of instance-aware parameters per potential instance: a kernel
       ``(C_m, C_t / groups, k, k)`` and a bias ``(C_m,)``. Both branches are linear maps of the point feature
       (1x1 convolutions evaluated at the point), so nothing is computed at points nobody asked for.
    3. ``pointins_ops.instance_aware_conv`` convolves each instance's point template with that instance's own
       kernel (``padding = k // 2``: the feature keeps the template's size), and a light mask head
       (ReLU, 3x3 conv, ReLU, 2x transposed conv, ReLU, 1x1 conv) turns the ``(C_m, S, S)`` feature into mask
       logits of ``(2S, 2S)`` in the coordinates of the instance's box.

    Args:
        in_channels: channels of the FPN features (and of the tower).
        instances_per_point: potential instances per point (RetinaNet's anchors per location; 1 for FCOS).
        num_classes: the detector's number of classes; used only when ``class_specific`` is true.
        template_channels: C_t, default 16. Templates are shared by every instance of a point and are the
            largest tensor the branch makes per point (C_t * S * S values); 16 channels carry enough shape
            detail for 28 x 28 masks (PointINS's choice) while keeping the template layer small (256 x 3136).
        template_size: S, default 14, so masks are 28 x 28 like Mask R-CNN's.
        mask_channels: C_m, default 16. The kernels are generated per instance, C_m * C_t / groups * k * k + C_m
            values each (2320 by default); 16 keeps the weight branch (that many outputs per anchor) affordable.
        kernel_size: k, default 3 (odd, so ``padding = k // 2`` keeps the size): a 3x3 kernel lets each instance
            mix neighbouring template cells, which a 1x1 cannot, at 9x the parameters of a 1x1.
        groups: groups of the instance-aware convolution, default 1 (every mask channel sees every template
            channel); larger values divide the generated parameters by ``groups``.
        tower_convs: depth of the mask tower, default 4, the depth of RetinaNet's and FCOS's box and class towers,
            so masks see features as deep as the boxes do. The tower is the branch's only dense cost; 1 or 2 is
            enough for small CPU experiments.
        class_specific: one mask per class (the mask head ends with ``num_classes`` channels and the instance's
            label picks one) instead of one class-agnostic mask. Default False, as in PointINS: the kernels are
            generated from a point feature that already encodes the instance's class, so one output suffices.
        positives_per_image: positives sampled per image for the mask loss, default 64. Dense detectors match
            tens to hundreds of anchors per image; sampling bounds the branch's training cost independently of
            the number of objects while leaving several positives for each object of a typical image.
        backend: the ``backend`` passed to ``pointins_ops.instance_aware_conv`` ("auto", "cpu", "cuda",
            "triton" or "torch"); an attribute, so it can be changed on a built model.
        norm_groups: GroupNorm groups of the tower, default 32 (reduced to a divisor of ``in_channels``).
    """

    def __init__(self, in_channels: int, instances_per_point: int, num_classes: int, *, template_channels: int = 16,
                 template_size: int = 14, mask_channels: int = 16, kernel_size: int = 3, groups: int = 1,
                 tower_convs: int = 4, class_specific: bool = False, positives_per_image: int = 64,
                 backend: str = "auto", norm_groups: int = 32) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("instances_per_point", instances_per_point),
                            ("num_classes", num_classes), ("template_channels", template_channels),
                            ("template_size", template_size), ("mask_channels", mask_channels),
                            ("kernel_size", kernel_size), ("groups", groups), ("positives_per_image",
                                                                               positives_per_image)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PointINSMaskBranch: {name} must be a positive int; got {value!r}")
        if not isinstance(tower_convs, int) or tower_convs < 0:
            raise ValueError(f"PointINSMaskBranch: tower_convs must be an int >= 0; got {tower_convs!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"PointINSMaskBranch: kernel_size must be odd so that padding kernel_size // 2 keeps "
                             f"the template size; got {kernel_size}")
        if template_channels % groups or mask_channels % groups:
            raise ValueError(f"PointINSMaskBranch: template_channels and mask_channels must be divisible by groups; "
                             f"got {template_channels}, {mask_channels} and groups={groups}")
        if backend not in pointins_ops.BACKENDS:
            raise ValueError(f"PointINSMaskBranch: backend must be one of {pointins_ops.BACKENDS}; got {backend!r}")

        self.instances_per_point = instances_per_point
        self.num_classes = num_classes
        self.template_channels = template_channels
        self.template_size = template_size
        self.mask_channels = mask_channels
        self.kernel_size = kernel_size
        self.groups = groups
        self.class_specific = class_specific
        self.positives_per_image = positives_per_image
        self.backend = backend

        layers: list[nn.Module] = []
        for _ in range(tower_convs):
            layers += [nn.Conv2d(in_channels, in_channels, 3, padding=1),
                       nn.GroupNorm(math.gcd(norm_groups, in_channels), in_channels), nn.ReLU()]
        self.tower = nn.Sequential(*layers)
        for layer in self.tower:
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

        # The point feature comes out of GroupNorm + ReLU, so each value has a second moment of about 1/2. The
        # initial scales below make templates of unit variance and kernels of variance 1 / fan_in, so the mask
        # feature starts at unit scale whatever C_t, C_m and k are.
        feature_second_moment = 0.5 if tower_convs > 0 else 1.0
        self.template_layer = nn.Linear(in_channels, template_channels * template_size ** 2)
        nn.init.normal_(self.template_layer.weight, std=(1.0 / (in_channels * feature_second_moment)) ** 0.5)
        nn.init.zeros_(self.template_layer.bias)

        kernel_fan_in = template_channels // groups * kernel_size ** 2
        self.kernel_numel = mask_channels * kernel_fan_in
        params_per_instance = self.kernel_numel + mask_channels
        # One linear map per potential instance of a point, stored as one tensor so that a batch of instances of
        # mixed anchors indexes it, and every anchor's slice is a parameter of the same module.
        self.instance_weight = nn.Parameter(torch.empty(instances_per_point, params_per_instance, in_channels))
        self.instance_bias = nn.Parameter(torch.zeros(instances_per_point, params_per_instance))
        nn.init.normal_(self.instance_weight,
                        std=(1.0 / (in_channels * feature_second_moment * kernel_fan_in)) ** 0.5)
        with torch.no_grad():  # generated biases start at zero: no instance starts with an offset mask
            self.instance_weight[:, self.kernel_numel:].zero_()

        out_masks = num_classes if class_specific else 1
        self.mask_head = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(mask_channels, mask_channels, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(mask_channels, mask_channels, 2, stride=2), nn.ReLU(),
            nn.Conv2d(mask_channels, out_masks, 1),
        )
        for layer in self.mask_head:
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        # Logits start near 0 (probability 1/2, loss log 2) rather than at the random scale of the layers above.
        nn.init.normal_(self.mask_head[-1].weight, std=0.01)

    @property
    def mask_size(self) -> int:
        """Side of the predicted masks: 2S."""
        return 2 * self.template_size

    def point_features(self, features: list[Tensor]) -> Tensor:
        """The tower over every FPN level, as (N, sum over levels of H*W, in_channels).

        Points are flattened level by level, row-major within a level: the order of torchvision's anchors with
        the anchor axis removed, so anchor ``a`` of an image belongs to point ``a // instances_per_point``.
        """
        flat = [self.tower(level).flatten(2).transpose(1, 2) for level in features]
        return torch.cat(flat, dim=1)

    def instance_params(self, features: Tensor, kinds: Tensor) -> tuple[Tensor, Tensor]:
        """Instance-aware kernels (N, C_m, C_t/groups, k, k) and biases (N, C_m) from each instance's point
        feature (N, in_channels) and its potential-instance number (N,) in [0, instances_per_point)."""
        if self.instances_per_point == 1:
            params = F.linear(features, self.instance_weight[0], self.instance_bias[0])
        else:
            # Instances are sorted by anchor so each anchor's linear map runs once, on its own instances: 1/A of
            # the work of evaluating every anchor's map at every point.
            order = torch.argsort(kinds)
            counts = torch.bincount(kinds, minlength=self.instances_per_point).tolist()
            chunks = [F.linear(chunk, self.instance_weight[kind], self.instance_bias[kind])
                      for kind, chunk in enumerate(features[order].split(counts)) if chunk.shape[0] > 0]
            sorted_params = torch.cat(chunks) if chunks else features.new_zeros(0, self.instance_weight.shape[1])
            params = torch.empty_like(sorted_params).index_copy(0, order, sorted_params)
        kernels = params[:, :self.kernel_numel].reshape(
            -1, self.mask_channels, self.template_channels // self.groups, self.kernel_size, self.kernel_size)
        return kernels, params[:, self.kernel_numel:]

    def forward(self, point_features: Tensor, index: Tensor, kinds: Tensor,
                labels: Tensor | None = None) -> Tensor:
        """Mask logits (N, 2S, 2S) of N instances.

        Args:
            point_features: (P, in_channels), the tower's output at P distinct points.
            index: (N,) int64 in [0, P): the point of each instance (its template).
            kinds: (N,) int64 in [0, instances_per_point): which potential instance of its point each one is.
            labels: (N,) class of each instance; required when the masks are class-specific.
        """
        templates = self.template_layer(point_features).view(
            -1, self.template_channels, self.template_size, self.template_size)
        kernels, biases = self.instance_params(point_features[index], kinds)
        # The op takes a single dtype; the templates' decides (the parameters can differ under mixed precision).
        mask_features = pointins_ops.instance_aware_conv(
            templates, kernels.to(templates.dtype), biases.to(templates.dtype), index,
            padding=self.kernel_size // 2, groups=self.groups, backend=self.backend)
        logits = self.mask_head(mask_features)
        if not self.class_specific:
            return logits[:, 0]
        if labels is None:
            raise ValueError("PointINSMaskBranch: labels are required when class_specific is true")
        return logits[torch.arange(logits.shape[0], device=logits.device), labels]

    def predict(self, point_features: Tensor, anchor_idxs: list[Tensor], labels: list[Tensor]) -> list[Tensor]:
        """Mask logits for detections: per image, (n_i, 2S, 2S) for the anchors ``anchor_idxs[i]`` (indices into
        that image's flattened anchors) with labels ``labels[i]``. ``point_features`` is ``point_features()``'s
        output for the batch. Detections that share a point share its template."""
        num_points = point_features.shape[1]
        anchors = torch.cat(anchor_idxs)
        image_of = torch.cat([torch.full_like(a, i) for i, a in enumerate(anchor_idxs)])
        global_points = image_of * num_points + torch.div(anchors, self.instances_per_point, rounding_mode="floor")
        points, index = torch.unique(global_points, return_inverse=True)
        logits = self(point_features.flatten(0, 1)[points], index, anchors % self.instances_per_point,
                      torch.cat(labels))
        return list(logits.split([a.shape[0] for a in anchor_idxs]))

    def loss(self, point_features: Tensor, targets: list[dict[str, Tensor]], matched_idxs: list[Tensor],
             decode_boxes) -> Tensor:
        """Mask loss of a batch: binary cross-entropy between the mask logits of up to ``positives_per_image``
        randomly sampled positive anchors per image and their matched ground-truth mask, projected with
        ``roi_align`` onto the anchor's predicted box (detached, clipped to the image) and thresholded at 0.5.

        Args:
            point_features: ``point_features()``'s output for the batch.
            targets: the transformed targets, with ``boxes``, ``labels`` and ``masks`` (M, H, W) in the resized
                image's coordinates.
            matched_idxs: per image, the ground-truth index of each anchor (negative: not a positive).
            decode_boxes: ``decode_boxes(image, anchor_idxs) -> (n, 4)`` the detector's predicted boxes.

        Images without positives add nothing; a batch without any gives a zero that still depends on every
        parameter of the branch, so data-parallel training sees the same parameters used on every rank.
        """
        num_points = point_features.shape[1]
        global_anchors, mask_targets, labels = [], [], []
        for image, (target, matched) in enumerate(zip(targets, matched_idxs)):
            positives = torch.where(matched >= 0)[0]
            if positives.numel() > self.positives_per_image:
                keep = torch.randperm(positives.numel(), device=positives.device)[:self.positives_per_image]
                positives = positives[keep]
            if positives.numel() == 0:
                continue
            gt_index = matched[positives]
            boxes = sanitize_boxes(decode_boxes(image, positives).detach(), target["masks"].shape[-2:])
            mask_targets.append(project_masks_on_boxes(target["masks"], gt_index, boxes, self.mask_size))
            labels.append(target["labels"][gt_index])
            global_anchors.append(positives + image * num_points * self.instances_per_point)

        unused = sum(parameter.sum() for parameter in self.parameters()) * 0.0
        if not global_anchors:
            return unused + point_features.sum() * 0.0
        anchors = torch.cat(global_anchors)
        points, index = torch.unique(torch.div(anchors, self.instances_per_point, rounding_mode="floor"),
                                     return_inverse=True)
        logits = self(point_features.flatten(0, 1)[points], index, anchors % self.instances_per_point,
                      torch.cat(labels))
        return F.binary_cross_entropy_with_logits(logits.float(), torch.cat(mask_targets).float()) + unused


def project_masks_on_boxes(gt_masks: Tensor, gt_index: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Mask targets (n, size, size) in {0, 1}: ground-truth mask ``gt_masks[gt_index[i]]`` (M, H, W) resampled
    with ``roi_align`` over box ``boxes[i]`` (pixel-edge coordinates, as ``paste_masks`` uses) and thresholded at
    0.5. Cell (r, c) of the target is the mask's average around the box point it stands for, so pasting the
    target back into the box reproduces the ground truth up to resampling."""
    boxes = boxes.float()
    rois = torch.cat([gt_index[:, None].to(boxes.dtype), boxes], dim=1)
    projected = roi_align(gt_masks[:, None].to(boxes.dtype), rois, size, aligned=True)[:, 0]
    return (projected >= 0.5).to(projected.dtype)


def sanitize_boxes(boxes: Tensor, image_size) -> Tensor:
    """Boxes clipped to the image like the detector's outputs, and at least one pixel wide and high (an untrained
    FCOS predicts boxes of size zero), so that mask targets are always defined."""
    height, width = int(image_size[0]), int(image_size[1])
    x1, y1, x2, y2 = boxes.unbind(1)
    x1, x2 = torch.minimum(x1, x2).clamp(0, width), torch.maximum(x1, x2).clamp(0, width)
    y1, y2 = torch.minimum(y1, y2).clamp(0, height), torch.maximum(y1, y2).clamp(0, height)
    grow_x = (1.0 - (x2 - x1)).clamp(min=0) / 2
    grow_y = (1.0 - (y2 - y1)).clamp(min=0) / 2
    return torch.stack([x1 - grow_x, y1 - grow_y, x2 + grow_x, y2 + grow_y], dim=1)
