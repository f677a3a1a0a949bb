"""build_torchvision_resnet_backbone: Detectron2's ResNet-50 with torchvision's DC5 convention."""

import pytest
import torch
import torchvision
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

import deformable_detr  # noqa: F401  (registers the backbone)
from deformable_detr.checkpoint import torchvision_resnet_to_detectron2


def _cfg(name, res5_dilation):
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.RESNETS.RES5_DILATION = res5_dilation
    return cfg


def _build(name, res5_dilation):
    return build_backbone(_cfg(name, res5_dilation), ShapeSpec(channels=3)).eval()


@pytest.mark.parametrize("res5_dilation", [1, 2])
def test_matches_torchvision_resnet50_with_the_same_weights(res5_dilation):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(
        weights=None,
        norm_layer=FrozenBatchNorm2d,
        replace_stride_with_dilation=[False, False, res5_dilation == 2],
    ).eval()
    backbone = _build("build_torchvision_resnet_backbone", res5_dilation)
    weights = {
        torchvision_resnet_to_detectron2(key): value
        for key, value in resnet.state_dict().items()
        if not key.startswith("fc.")
    }
    backbone.load_state_dict(weights, strict=True)

    x = torch.randn(1, 3, 64, 96)
    body = IntermediateLayerGetter(resnet, {"layer2": "res3", "layer3": "res4", "layer4": "res5"})
    with torch.no_grad():
        expected, features = body(x), backbone(x)
    for name in ("res3", "res4", "res5"):
        scale = expected[name].abs().max()
        assert (features[name] - expected[name]).abs().max() < 1e-4 * scale, name
    assert features["res5"].shape[-2:] == ((4, 6) if res5_dilation == 2 else (2, 3))


def test_only_the_first_dc5_block_differs_from_detectron2():
    ours = _build("build_torchvision_resnet_backbone", 2)
    detectron2 = _build("build_resnet_backbone", 2)
    assert ours.state_dict().keys() == detectron2.state_dict().keys()
    assert ours.res5[0].conv2.dilation == (1, 1) and detectron2.res5[0].conv2.dilation == (2, 2)
    assert [b.conv2.dilation for b in ours.res5[1:]] == [(2, 2), (2, 2)]
    plain = _build("build_torchvision_resnet_backbone", 1)
    assert all(b.conv2.dilation == (1, 1) for b in plain.res5)
