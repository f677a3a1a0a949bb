"""Deformable DETR modeling: neck, transformer, matcher, criterion and the meta-architecture."""

from .criterion import SetCriterion
from .deformable_detr import DeformableDETR
from .deformable_transformer import DeformableTransformer, inverse_sigmoid
from .matcher import HungarianMatcher
from .neck import DEFORMABLE_DETR_NECK_REGISTRY, ChannelMapperNeck, build_neck
from .position_encoding import PositionEmbeddingSine

__all__ = [
    "DEFORMABLE_DETR_NECK_REGISTRY",
    "ChannelMapperNeck",
    "DeformableDETR",
    "DeformableTransformer",
    "HungarianMatcher",
    "PositionEmbeddingSine",
    "SetCriterion",
    "build_neck",
    "inverse_sigmoid",
]
