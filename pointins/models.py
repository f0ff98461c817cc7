"""The PointINS model a ``Config`` describes."""

from __future__ import annotations

from torch import nn
from torchvision.models import get_model
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .config import Config, PointINSError
from .detectors import PointINSFCOS, PointINSFCOSHead, PointINSRetinaNet, build_pointins

_RESNET_CHANNELS = {"resnet18": [128, 256, 512], "resnet34": [128, 256, 512]}  # deeper ResNets: 512, 1024, 2048


def build_model(config: Config) -> nn.Module:
    """``build_pointins`` for the standard width (``fpn_channels`` 256, ``head_convs`` 4); otherwise the light
    variant: the same ResNet-FPN (P3-P7) and heads, with ``fpn_channels`` wide FPN and towers and ``head_convs``
    convolutions in the class and box towers. On 2 CPU cores the heads, not the ResNet, dominate a step at
    small image sizes; 64 channels and 2 convolutions make a step several times faster."""
    try:
        return _build_model(config)
    except ValueError as error:  # the model classes check their arguments (e.g. an even kernel_size) this way
        raise PointINSError(f"config: {error}") from None


def _build_model(config: Config) -> nn.Module:
    if config.num_classes < 2:
        raise PointINSError(f"config: num_classes must be >= 2 (background + categories); got {config.num_classes}")
    mask_options = dict(tower_convs=config.tower_convs, template_channels=config.template_channels,
                        template_size=config.template_size, mask_channels=config.mask_channels,
                        kernel_size=config.kernel_size, positives_per_image=config.positives_per_image)
    detector_options = dict(min_size=config.min_size, max_size=config.max_size, score_thresh=config.score_thresh,
                            detections_per_img=config.detections_per_img)
    if config.fpn_channels == 256 and config.head_convs == 4:
        return build_pointins(config.detector, config.backbone, num_classes=config.num_classes,
                              weights_backbone=config.weights_backbone, **mask_options, **detector_options)
    if config.weights_backbone is not None:
        raise PointINSError("config: weights_backbone needs the standard model (fpn_channels=256, head_convs=4)")
    # The heads' GroupNorm has 32 groups: 64 channels or more leave every group 2+ values even at a 1 x 1 level
    # (P7 of a small image) of a single image, where GroupNorm refuses to normalise a single value.
    if config.fpn_channels < 64 or config.fpn_channels % 32 or config.head_convs < 0:
        raise PointINSError(f"config: fpn_channels must be a multiple of 32 and >= 64, and head_convs >= 0; got "
                            f"fpn_channels={config.fpn_channels}, head_convs={config.head_convs}")
    channels = config.fpn_channels
    backbone = build_backbone(config)
    if config.detector == "fcos":
        head = PointINSFCOSHead(channels, 1, config.num_classes, num_convs=config.head_convs, **mask_options)
        return PointINSFCOS(backbone, config.num_classes, head=head, **detector_options)
    if config.head_convs != 4:
        raise PointINSError("config: head_convs other than 4 is available for detector=fcos only (torchvision's "
                            "RetinaNetHead has 4 convolutions)")
    return PointINSRetinaNet(backbone, config.num_classes, **detector_options, **mask_options)


def build_backbone(config: Config) -> BackboneWithFPN:
    """The light model's backbone: ``config.backbone`` from scratch with a ``fpn_channels`` wide FPN over its last
    three stages plus P6 and P7 (P3-P7, strides 8 to 128), as torchvision's RetinaNet and FCOS. Its outputs are
    named "0", "1", "2" (P3-P5), "p6" and "p7"."""
    try:
        resnet = get_model(config.backbone, weights=None)
    except ValueError as error:
        raise PointINSError(f"config: backbone {config.backbone!r}: {error}") from None
    in_channels = _RESNET_CHANNELS.get(config.backbone, [512, 1024, 2048])
    channels = config.fpn_channels
    return BackboneWithFPN(resnet, {"layer2": "0", "layer3": "1", "layer4": "2"}, in_channels, channels,
                           extra_blocks=LastLevelP6P7(channels, channels))


__all__ = ["build_backbone", "build_model"]
