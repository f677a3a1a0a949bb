"""Detectron2's ResNet with torchvision's dilation convention, as the official DC5 model uses it."""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, ResNet
from detectron2.modeling.backbone.resnet import build_resnet_backbone

__all__ = ["build_torchvision_resnet_backbone"]


@BACKBONE_REGISTRY.register()
def build_torchvision_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """
    ``build_resnet_backbone``, except that with ``MODEL.RESNETS.RES5_DILATION: 2`` (DC5) the 3x3
    conv of the first res5 block stays undilated, like torchvision's
    ``replace_stride_with_dilation`` (official ``--dilation``); Detectron2 dilates all res5 blocks.
    Identical to ``build_resnet_backbone`` otherwise.
    """
    backbone = build_resnet_backbone(cfg, input_shape)
    if cfg.MODEL.RESNETS.RES5_DILATION > 1 and hasattr(backbone, "res5"):
        first_conv = backbone.res5[0].conv2
        first_conv.dilation = (1, 1)
        first_conv.padding = (1, 1)
    return backbone
