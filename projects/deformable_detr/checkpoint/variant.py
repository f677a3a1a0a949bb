"""The architecture of an official-layout checkpoint, read from its keys and shapes, and the
config keys it needs."""

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.data import MetadataCatalog

from .sources import CheckpointConversionError, _short_list, _top_level_names

__all__ = ["DetectedVariant", "check_config", "coco_class_rows", "detect_variant"]

# Official COCO models predict 91 classes: index = COCO category id (0 and 11 other ids unused).
NUM_COCO_ID_CLASSES = 91
# torchvision's ImageNet normalization, expressed for 0..255 RGB inputs (Detectron2 convention).
IMAGENET_PIXEL_MEAN = (123.675, 116.28, 103.53)
IMAGENET_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class DetectedVariant:
    """Architecture read from the weights. DC5 (a dilated res5) has no parameters of its own."""

    num_feature_levels: int
    num_backbone_levels: int
    with_box_refine: bool
    two_stage: bool
    num_encoder_layers: int
    num_decoder_layers: int
    num_queries: Optional[int]
    hidden_dim: int
    dim_feedforward: int
    num_classes: int

    def describe(self) -> str:
        scale = "multi-scale" if self.num_feature_levels > 1 else "single-scale"
        queries = "from encoder proposals" if self.two_stage else str(self.num_queries)
        levels = f"{self.num_feature_levels} feature level" + "s" * (self.num_feature_levels > 1)
        yes_no = {True: "yes", False: "no"}
        return (
            f"{scale} ({levels}, {self.num_backbone_levels} from the backbone), box refinement: "
            f"{yes_no[self.with_box_refine]}, two-stage: {yes_no[self.two_stage]}, "
            f"{self.num_encoder_layers} encoder / {self.num_decoder_layers} decoder layers, "
            f"hidden dim {self.hidden_dim}, FFN {self.dim_feedforward}, queries: {queries}, "
            f"{self.num_classes} classes. DC5 (dilated res5) cannot be detected from the weights: "
            "it is chosen by the config (MODEL.RESNETS.RES5_DILATION)."
        )


def coco_class_rows() -> List[int]:
    """COCO category ids in the order of Detectron2's contiguous classes 0..79."""
    id_map = MetadataCatalog.get("coco_2017_val").thing_dataset_id_to_contiguous_id
    return [dataset_id for dataset_id, _ in sorted(id_map.items(), key=lambda kv: kv[1])]


def _head_indices(state_dict, prefix: str) -> List[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state_dict if (m := pattern.match(k))})


def _layer_count(state_dict, prefix: str) -> int:
    indices = _head_indices(state_dict, prefix)
    if indices != list(range(len(indices))):
        raise CheckpointConversionError(f"{prefix} has non-contiguous layer indices {indices}")
    return len(indices)


def _fill_aliases(state_dict, source: str) -> None:
    """
    Make every head present under each of its names, as the official model's state dict has it:
    heads shared across decoder layers (no box refinement) and the decoder's references to the
    detector heads (box refinement, two-stage). HF files omit such tied copies; where both copies
    are present they must agree.
    """
    with_box_refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in state_dict)
    two_stage = "transformer.enc_output.weight" in state_dict
    num_layers = len(_head_indices(state_dict, "transformer.decoder.layers"))
    num_pred = num_layers + 1 if two_stage else num_layers
    aliases: List[Tuple[str, str, bool]] = []
    for k in range(num_pred):
        if not with_box_refine:
            aliases += [(f"class_embed.{k}.", "class_embed.0.", True)]
            aliases += [(f"bbox_embed.{k}.", "bbox_embed.0.", True)]
        else:
            aliases += [(f"bbox_embed.{k}.", f"transformer.decoder.bbox_embed.{k}.", True)]
            if source == "hf" and not two_stage:
                # transformers 5 ties the per-layer class heads of box-refine models to the first.
                aliases += [(f"class_embed.{k}.", "class_embed.0.", False)]
        if two_stage:
            aliases += [(f"class_embed.{k}.", f"transformer.decoder.class_embed.{k}.", True)]
    for name, other, must_agree in aliases:
        for suffix in _head_suffixes(state_dict, name, other):
            a, b = name + suffix, other + suffix
            if a in state_dict and b in state_dict:
                if must_agree and not torch.equal(state_dict[a], state_dict[b]):
                    raise CheckpointConversionError(
                        f"{a} and {b} differ although the architecture shares them: the "
                        "checkpoint's variant is inconsistent"
                    )
            elif a in state_dict or b in state_dict:
                state_dict.setdefault(a, state_dict.get(b))
                state_dict.setdefault(b, state_dict.get(a))


def _head_suffixes(state_dict, *prefixes) -> set:
    return {k[len(p) :] for p in prefixes for k in state_dict if k.startswith(p)}


def detect_variant(official: Dict[str, torch.Tensor]) -> DetectedVariant:
    """Read the architecture of an official-layout state dict from its keys and shapes."""
    two_stage = "transformer.enc_output.weight" in official
    required = [
        "transformer.level_embed",
        "input_proj.0.0.weight",
        "class_embed.0.weight",
        "transformer.encoder.layers.0.linear1.weight",
    ] + ([] if two_stage else ["query_embed.weight"])
    missing = [k for k in required if k not in official]
    if missing or not any(k.startswith("backbone.0.body.") for k in official):
        raise CheckpointConversionError(
            "Not a Deformable DETR checkpoint: missing "
            f"{_short_list(missing or ['backbone.0.body.*'])}; its keys start with "
            f"{_top_level_names(official)}"
        )
    num_levels, hidden_dim = official["transformer.level_embed"].shape
    num_input_proj = _layer_count(official, "input_proj")
    backbone_levels = sum(
        official[f"input_proj.{i}.0.weight"].shape[-1] == 1 for i in range(num_input_proj)
    )
    return DetectedVariant(
        num_feature_levels=num_levels,
        num_backbone_levels=backbone_levels,
        with_box_refine=any(k.startswith("transformer.decoder.bbox_embed.") for k in official),
        two_stage=two_stage,
        num_encoder_layers=_layer_count(official, "transformer.encoder.layers"),
        num_decoder_layers=_layer_count(official, "transformer.decoder.layers"),
        num_queries=None if two_stage else official["query_embed.weight"].shape[0],
        hidden_dim=hidden_dim,
        dim_feedforward=official["transformer.encoder.layers.0.linear1.weight"].shape[0],
        num_classes=official["class_embed.0.weight"].shape[0],
    )


def check_config(cfg, variant: DetectedVariant) -> List[str]:
    """Config keys that contradict the checkpoint or the official pre-processing."""
    dd = cfg.MODEL.DEFORMABLE_DETR
    expected = {
        "NUM_FEATURE_LEVELS": (dd.NUM_FEATURE_LEVELS, variant.num_feature_levels),
        "IN_FEATURES (its length)": (len(dd.IN_FEATURES), variant.num_backbone_levels),
        "WITH_BOX_REFINE": (dd.WITH_BOX_REFINE, variant.with_box_refine),
        "TWO_STAGE.ENABLED": (dd.TWO_STAGE.ENABLED, variant.two_stage),
        "ENC_LAYERS": (dd.ENC_LAYERS, variant.num_encoder_layers),
        "DEC_LAYERS": (dd.DEC_LAYERS, variant.num_decoder_layers),
        "HIDDEN_DIM": (dd.HIDDEN_DIM, variant.hidden_dim),
        "DIM_FEEDFORWARD": (dd.DIM_FEEDFORWARD, variant.dim_feedforward),
        "NUM_CLASSES": (dd.NUM_CLASSES, len(coco_class_rows())),
    }
    if not variant.two_stage:
        expected["NUM_QUERIES"] = (dd.NUM_QUERIES, variant.num_queries)
    expected = {"MODEL.DEFORMABLE_DETR." + name: pair for name, pair in expected.items()}
    # The official backbone is torchvision's ResNet (stride in the 3x3 conv) on RGB input.
    expected["MODEL.RESNETS.STRIDE_IN_1X1"] = (cfg.MODEL.RESNETS.STRIDE_IN_1X1, False)
    expected["INPUT.FORMAT"] = (cfg.INPUT.FORMAT, "RGB")
    if cfg.MODEL.RESNETS.RES5_DILATION > 1:
        # Detectron2's builder also dilates the first res5 block; torchvision (official) does not.
        expected["MODEL.BACKBONE.NAME (DC5)"] = (
            cfg.MODEL.BACKBONE.NAME, "build_torchvision_resnet_backbone"
        )
    problems = [
        f"{name} is {actual} but the checkpoint needs {wanted}"
        for name, (actual, wanted) in expected.items()
        if actual != wanted
    ]
    for name, actual, wanted in (
        ("MODEL.PIXEL_MEAN", cfg.MODEL.PIXEL_MEAN, IMAGENET_PIXEL_MEAN),
        ("MODEL.PIXEL_STD", cfg.MODEL.PIXEL_STD, IMAGENET_PIXEL_STD),
    ):
        if len(actual) != 3 or any(abs(a - w) > 1e-3 for a, w in zip(actual, wanted)):
            problems.append(f"{name} is {list(actual)} but the official models use {list(wanted)}")
    return problems
