from .mobilenet_v2 import MobileNetV2Backbone, build_mobilenet_v2_backbone
from .torchvision_resnet import build_torchvision_resnet_backbone

__all__ = [
    "MobileNetV2Backbone",
    "build_mobilenet_v2_backbone",
    "build_torchvision_resnet_backbone",
]
