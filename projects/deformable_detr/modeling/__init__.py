"""Deformable DETR modeling: neck, transformer, matcher, criterion and the meta-architecture."""

from .backbone import (
    MobileNetV2Backbone,
    build_mobilenet_v2_backbone,
    build_torchvision_resnet_backbone,
)
from .criterion import SetCriterion
from .deformable_detr import DeformableDETR
from .deformable_transformer import DeformableTransformer, inverse_sigmoid
from .matcher import HungarianMatcher
from .neck import DEFORMABLE_DETR_NECK_REGISTRY, ChannelMapperNeck, build_neck
from .position_encoding import PositionEmbeddingSine
from .postprocessing import select_detections

__all__ = [
    "DEFORMABLE_DETR_NECK_REGISTRY",
    "ChannelMapperNeck",
    "DeformableDETR",
    "DeformableTransformer",
    "HungarianMatcher",
    "MobileNetV2Backbone",
    "PositionEmbeddingSine",
    "SetCriterion",
    "build_mobilenet_v2_backbone",
    "build_neck",
    "build_torchvision_resnet_backbone",
    "inverse_sigmoid",
    "select_detections",
]
