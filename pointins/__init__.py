"""PointINS: point-based instance segmentation with instance-aware convolution, on torchvision's RetinaNet and FCOS."""

from .detectors import (MASK_BRANCH_OPTIONS, PointINSFCOS, PointINSFCOSHead, PointINSRetinaNet, PointINSRetinaNetHead,
                        build_pointins, pointins_fcos_resnet18_fpn, pointins_fcos_resnet50_fpn,
                        pointins_retinanet_resnet18_fpn, pointins_retinanet_resnet50_fpn)
from .mask_branch import PointINSMaskBranch
from .paste import paste_masks

__all__ = [
    "MASK_BRANCH_OPTIONS",
    "PointINSFCOS",
    "PointINSFCOSHead",
    "PointINSMaskBranch",
    "PointINSRetinaNet",
    "PointINSRetinaNetHead",
    "build_pointins",
    "paste_masks",
    "pointins_fcos_resnet18_fpn",
    "pointins_fcos_resnet50_fpn",
    "pointins_retinanet_resnet18_fpn",
    "pointins_retinanet_resnet50_fpn",
]
