import pathlib
import pickle
import re

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone
from torchvision.models import mobilenet_v2

from deformable_detr.config import add_deformable_detr_config
from deformable_detr.modeling.backbone import MobileNetV2Backbone
from deformable_detr.modeling.backbone import mobilenet_v2 as mnv2_module
from deformable_detr.modeling.backbone.mobilenet_v2 import default_mobilenet_v2_weights


@pytest.fixture(scope="module")
def weights():
    return default_mobilenet_v2_weights()


def test_reproduces_torchvision_features(weights):
    torch.manual_seed(0)
    backbone = MobileNetV2Backbone(["mnv2_s8", "mnv2_s16", "mnv2_s32"], weights=weights).eval()
    reference = mobilenet_v2()
    reference.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    reference.eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        out = backbone(x)
        expected, y = {}, x
        for i, block in enumerate(reference.features):
            y = block(y)
            expected[i] = y
    for name, index in (("mnv2_s8", 6), ("mnv2_s16", 13), ("mnv2_s32", 17)):
        torch.testing.assert_close(out[name], expected[index], rtol=1e-4, atol=1e-4)
    # The ImageNet weights are really loaded (not a random init that happens to be shared).
    first_conv = reference.features[0][0].weight
    torch.testing.assert_close(backbone.features[0][0].weight, first_conv)


def test_runs_channels_last_on_the_cpu():
    backbone = MobileNetV2Backbone(["mnv2_s8", "mnv2_s16", "mnv2_s32"]).eval()
    layouts = []
    backbone.features[0].register_forward_pre_hook(
        lambda _module, inputs: layouts.append(
            inputs[0].is_contiguous(memory_format=torch.channels_last)
        )
    )
    with torch.no_grad():
        backbone(torch.randn(1, 3, 64, 96))
    assert layouts == [True]


def test_output_shape_matches_outputs():
    backbone = MobileNetV2Backbone(["mnv2_s8", "mnv2_s16", "mnv2_s32"])
    out = backbone(torch.randn(1, 3, 160, 224))
    shapes = backbone.output_shape()
    assert list(out) == list(shapes) == ["mnv2_s8", "mnv2_s16", "mnv2_s32"]
    for name, spec in shapes.items():
        assert out[name].shape == (1, spec.channels, 160 // spec.stride, 224 // spec.stride)


def test_frozen_bn_and_freeze_at():
    backbone = MobileNetV2Backbone(["mnv2_s16"], freeze_at=4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    assert len(backbone.features) == 14  # stops at the last requested stage
    for i, block in enumerate(backbone.features):
        assert all(p.requires_grad == (i >= 4) for p in block.parameters())


def test_build_from_config_and_errors(tmp_path):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_mobilenet_v2_backbone"
    cfg.MODEL.MOBILENET_V2.OUT_FEATURES = ["mnv2_s32"]
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    assert backbone.output_shape()["mnv2_s32"] == ShapeSpec(channels=320, stride=32)
    cfg.MODEL.MOBILENET_V2.WEIGHTS = str(tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="missing.pth not found.*make setup"):
        build_backbone(cfg, ShapeSpec(channels=3))
    with pytest.raises(ValueError, match="out_features"):
        MobileNetV2Backbone(["res5"])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        MobileNetV2Backbone(["mnv2_s8"])(torch.randn(1, 4, 32, 32))


def test_missing_weights_package_gives_one_line_hint(monkeypatch):
    monkeypatch.setattr(mnv2_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError) as e:
        default_mobilenet_v2_weights()
    assert "make setup" in str(e.value) and "\n" not in str(e.value)


def test_default_config_returns_strides_8_to_32_and_freezes_before_stride_8():
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_mobilenet_v2_backbone"
    cfg.MODEL.MOBILENET_V2.PRETRAINED = False
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    assert {name: spec.stride for name, spec in backbone.output_shape().items()} == {
        "mnv2_s8": 8, "mnv2_s16": 16, "mnv2_s32": 32}
    trainable = [all(p.requires_grad for p in block.parameters()) for block in backbone.features]
    assert trainable == [False] * 4 + [True] * 14


def test_freeze_at_bounds():
    # Without freeze_at every block trains; 18 freezes all of them; beyond that is an error.
    assert all(p.requires_grad for p in MobileNetV2Backbone(["mnv2_s32"]).parameters())
    frozen = MobileNetV2Backbone(["mnv2_s32"], freeze_at=18)
    assert not any(p.requires_grad for p in frozen.parameters())
    for bad in (-1, 19):
        with pytest.raises(ValueError, match=rf"freeze_at must be in \[0, 18\].*got {bad}"):
            MobileNetV2Backbone(["mnv2_s32"], freeze_at=bad)


def test_weights_package_without_its_file_names_the_path(monkeypatch, tmp_path):
    spec = type("Spec", (), {"submodule_search_locations": [str(tmp_path)]})()
    monkeypatch.setattr(mnv2_module.importlib.util, "find_spec", lambda name: spec)
    missing = f"{re.escape(str(tmp_path))}.*mobilenet_v2-b0353104.pth not found.*make setup"
    with pytest.raises(RuntimeError, match=missing):
        default_mobilenet_v2_weights()


class _TouchOnUnpickle:
    """Unpickling it creates a file: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_weights_file_is_loaded_without_running_pickled_code(tmp_path):
    marker = tmp_path / "code_ran"
    weights = tmp_path / "evil.pth"
    torch.save({"features.0.0.weight": _TouchOnUnpickle(marker)}, weights)
    with pytest.raises(pickle.UnpicklingError):
        MobileNetV2Backbone(["mnv2_s8"], weights=str(weights))
    assert not marker.exists()
