import pytest
import torch
from detectron2.layers import ShapeSpec
from tiny_deformable_detr import tiny_cfg

from deformable_detr.modeling.neck import (
    DEFORMABLE_DETR_NECK_REGISTRY,
    ChannelMapperNeck,
    build_neck,
)
from deformable_detr.modeling.position_encoding import PositionEmbeddingSine


def _neck(num_levels, in_features=("res3", "res4", "res5")):
    channels = {"res3": 16, "res4": 24, "res5": 40}
    return ChannelMapperNeck(
        in_features=list(in_features),
        in_channels=[channels[f] for f in in_features],
        hidden_dim=32,
        num_levels=num_levels,
        position_encoding=PositionEmbeddingSine(16),
    )


def _features(n=2, h=64, w=96):
    return {
        "res3": torch.randn(n, 16, h // 8, w // 8),
        "res4": torch.randn(n, 24, h // 16, w // 16),
        "res5": torch.randn(n, 40, h // 32, w // 32),
    }


def test_registered_and_built_from_config():
    assert DEFORMABLE_DETR_NECK_REGISTRY.get("ChannelMapperNeck") is ChannelMapperNeck
    cfg = tiny_cfg()
    shapes = {"res3": ShapeSpec(channels=16, stride=8), "res4": ShapeSpec(channels=24, stride=16),
              "res5": ShapeSpec(channels=40, stride=32)}
    neck = build_neck(cfg, shapes)
    assert isinstance(neck, ChannelMapperNeck) and len(neck.input_proj) == 4


def test_multi_level_outputs_official_structure():
    neck = _neck(4)
    padding_mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    padding_mask[1, :, 48:] = True
    srcs, masks, pos = neck(_features(), padding_mask)
    assert [tuple(s.shape) for s in srcs] == [(2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3),
                                              (2, 32, 1, 2)]
    assert [tuple(m.shape) for m in masks] == [(2, 8, 12), (2, 4, 6), (2, 2, 3), (2, 1, 2)]
    assert all(p.shape == s.shape for p, s in zip(pos, srcs))
    assert all(m.dtype == torch.bool for m in masks)
    # Image 1 is padded on its right half at every level; image 0 is not padded.
    assert masks[0][1, :, 6:].all() and not masks[0][1, :, :6].any() and not masks[0][0].any()
    # Extra level: 3x3 stride-2 conv on the raw last backbone map, then GN(32); xavier, bias 0.
    extra = neck.input_proj[3]
    assert extra[0].in_channels == 40 and extra[0].stride == (2, 2) and extra[1].num_groups == 32
    assert all((proj[0].bias == 0).all() for proj in neck.input_proj)


def test_second_extra_level_takes_previous_level():
    neck = _neck(5)
    assert neck.input_proj[4][0].in_channels == 32
    srcs, _, _ = neck(_features(h=128, w=128), torch.zeros(2, 128, 128, dtype=torch.bool))
    assert [s.shape[-1] for s in srcs] == [16, 8, 4, 2, 1]


def test_single_level():
    neck = _neck(1, in_features=("res5",))
    srcs, masks, pos = neck(_features(), torch.zeros(2, 64, 96, dtype=torch.bool))
    assert len(srcs) == len(masks) == len(pos) == 1 and srcs[0].shape == (2, 32, 2, 3)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="num_levels"):
        _neck(2)
    with pytest.raises(ValueError, match="divisible by 32"):
        ChannelMapperNeck(in_features=["res5"], in_channels=[8], hidden_dim=48, num_levels=1,
                          position_encoding=PositionEmbeddingSine(24))
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="IN_FEATURES"):
        build_neck(cfg, {"res5": ShapeSpec(channels=40, stride=32)})
