"""Necks turning backbone features into the multi-level inputs of the deformable transformer."""

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry
from torch import nn

from .position_encoding import PositionEmbeddingSine

DEFORMABLE_DETR_NECK_REGISTRY = Registry("DEFORMABLE_DETR_NECK")
DEFORMABLE_DETR_NECK_REGISTRY.__doc__ = """
Registry for Deformable DETR necks, which map backbone features to the multi-level inputs of the
deformable transformer.

The registered object is called with `obj(cfg, input_shape)` where `input_shape` is the backbone's
`output_shape()` (dict of name -> ShapeSpec), and must return an `nn.Module` whose
`forward(features, padding_mask)` returns three lists with one entry per level: feature maps
(N, C, H_l, W_l), padding masks (N, H_l, W_l) bool and position encodings (N, C, H_l, W_l).
"""


def build_neck(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """Build the neck named by ``cfg.MODEL.DEFORMABLE_DETR.NECK``."""
    name = cfg.MODEL.DEFORMABLE_DETR.NECK
    return DEFORMABLE_DETR_NECK_REGISTRY.get(name)(cfg, input_shape)


@DEFORMABLE_DETR_NECK_REGISTRY.register()
class ChannelMapperNeck(nn.Module):
    """
    The official ``input_proj``: a Conv1x1 + GroupNorm(32) per backbone level, then
    ``num_levels - len(in_features)`` extra levels made by Conv3x3 stride 2 + GroupNorm(32), the
    first one applied to the last backbone feature map and the next ones to the previous level.
    Each level gets a padding mask resized from the image padding mask and a sine position
    encoding of that mask.
    """

    @configurable
    def __init__(
        self,
        *,
        in_features: List[str],
        in_channels: List[int],
        hidden_dim: int,
        num_levels: int,
        position_encoding: nn.Module,
    ):
        """
        Args:
            in_features: backbone feature names, from high to low resolution.
            in_channels: channels of each of ``in_features``.
            hidden_dim: output channels of every level (divisible by 32 for GroupNorm).
            num_levels: number of output levels, at least ``len(in_features)``.
            position_encoding: maps a (N, H, W) padding mask to (N, hidden_dim, H, W).
        """
        super().__init__()
        if len(in_features) != len(in_channels) or not in_features:
            raise ValueError(
                f"in_features {in_features} and in_channels {in_channels} must be non-empty "
                "and of the same length"
            )
        if num_levels < len(in_features):
            raise ValueError(
                f"num_levels ({num_levels}) must be >= len(in_features) ({len(in_features)})"
            )
        if hidden_dim % 32 != 0:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by 32 for GroupNorm(32)")
        self.in_features = list(in_features)
        self.num_levels = num_levels
        self.position_encoding = position_encoding

        projections = [
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
            for c in in_channels
        ]
        extra_in = in_channels[-1]
        for _ in range(num_levels - len(in_features)):
            projections.append(
                nn.Sequential(
                    nn.Conv2d(extra_in, hidden_dim, kernel_size=3, stride=2, padding=1),
                    nn.GroupNorm(32, hidden_dim),
                )
            )
            extra_in = hidden_dim
        self.input_proj = nn.ModuleList(projections)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_features = cfg.MODEL.DEFORMABLE_DETR.IN_FEATURES
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.DEFORMABLE_DETR.IN_FEATURES {missing} are not produced by the backbone "
                f"(it outputs {sorted(input_shape)}); check MODEL.RESNETS.OUT_FEATURES"
            )
        hidden_dim = cfg.MODEL.DEFORMABLE_DETR.HIDDEN_DIM
        return {
            "in_features": in_features,
            "in_channels": [input_shape[f].channels for f in in_features],
            "hidden_dim": hidden_dim,
            "num_levels": cfg.MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS,
            "position_encoding": PositionEmbeddingSine(hidden_dim // 2, normalize=True),
        }

    def forward(
        self, features: Dict[str, torch.Tensor], padding_mask: torch.Tensor
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        """
        Args:
            features: backbone outputs, containing every name in ``in_features``.
            padding_mask: (N, H, W) bool at input resolution, True on padded pixels.

        Returns:
            srcs, masks, pos: lists of ``num_levels`` tensors (N, C, H_l, W_l),
            (N, H_l, W_l) bool and (N, C, H_l, W_l).
        """
        srcs = []
        for name, proj in zip(self.in_features, self.input_proj):
            srcs.append(proj(features[name]))
        last = features[self.in_features[-1]]
        for proj in self.input_proj[len(self.in_features) :]:
            srcs.append(proj(last))
            last = srcs[-1]

        masks, pos = [], []
        for src in srcs:
            mask = F.interpolate(padding_mask[None].float(), size=src.shape[-2:])[0].to(torch.bool)
            masks.append(mask)
            pos.append(self.position_encoding(mask).to(src.dtype))
        return srcs, masks, pos
