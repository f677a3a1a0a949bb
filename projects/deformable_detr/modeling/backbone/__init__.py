from .mobilenet_v2 import MobileNetV2Backbone, build_mobilenet_v2_backbone

__all__ = ["MobileNetV2Backbone", "build_mobilenet_v2_backbone"]
