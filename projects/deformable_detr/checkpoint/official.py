"""
Conversion of the official Deformable DETR checkpoints (fundamentalvision/Deformable-DETR) and of
HuggingFace ``DeformableDetrForObjectDetection`` state dicts into this plugin's module names.

Both sources are first brought to the official key layout; the official layout is then renamed to
the plugin's (Detectron2 ResNet backbone, ``neck.input_proj``, each head once under ``heads.``)
and the 91-way COCO-id class heads are reduced to Detectron2's 80 contiguous COCO classes. The
result is checked key by key and shape by shape against a model built from a config, so a
checkpoint either loads completely or is rejected with the list of offending keys.
"""

import os
import re
from typing import Callable, Dict, Optional, Tuple

import torch

from .atomic import atomic_write
from .hf import hf_to_official
from .sources import CheckpointConversionError, _short_list
from .variant import (
    NUM_COCO_ID_CLASSES,
    DetectedVariant,
    _fill_aliases,
    check_config,
    coco_class_rows,
    detect_variant,
)

__all__ = [
    "check_state_dict_matches",
    "convert_state_dict",
    "official_to_plugin",
    "torchvision_resnet_to_detectron2",
    "write_converted_checkpoint",
]


def torchvision_resnet_to_detectron2(key: str) -> Optional[str]:
    """torchvision ResNet key ``layer1.0.bn1.weight`` -> Detectron2 ``res2.0.conv1.norm.weight``."""
    m = re.match(r"^(conv1|bn1)\.(.+)$", key)
    if m:
        return "stem.conv1." + ("" if m.group(1) == "conv1" else "norm.") + m.group(2)
    m = re.match(r"^layer(\d)\.(\d+)\.(conv|bn)(\d)\.(.+)$", key)
    if m:
        stage, block, kind, index, param = m.groups()
        norm = "norm." if kind == "bn" else ""
        return f"res{int(stage) + 1}.{block}.conv{index}.{norm}{param}"
    m = re.match(r"^layer(\d)\.(\d+)\.downsample\.([01])\.(.+)$", key)
    if m:
        stage, block, index, param = m.groups()
        norm = "norm." if index == "1" else ""
        return f"res{int(stage) + 1}.{block}.shortcut.{norm}{param}"
    return None


def official_to_plugin(
    official: Dict[str, torch.Tensor], variant: DetectedVariant
) -> Dict[str, torch.Tensor]:
    """
    Rename an official-layout state dict to the plugin's modules and map the class heads from
    the 91 COCO ids to the 80 contiguous classes. In two-stage models the encoder's proposal head
    (the last class head) ranks proposals by its column 0, which the official model trains as
    objectness under the unused COCO id 0: that row stays first.
    """
    if variant.num_classes != NUM_COCO_ID_CLASSES:
        raise CheckpointConversionError(
            f"The class head has {variant.num_classes} outputs; official COCO checkpoints have "
            f"{NUM_COCO_ID_CLASSES} (index = COCO category id). This is a checkpoint of another "
            "dataset and cannot be mapped to Detectron2's COCO classes."
        )
    if variant.two_stage and not variant.with_box_refine:
        raise CheckpointConversionError(
            "Two-stage without box refinement shares one class head between the encoder "
            "proposals (ranked by COCO id 0) and the decoder, so it cannot be reduced to 80 classes"
        )
    rows = torch.tensor(coco_class_rows())
    encoder_rows = torch.cat([torch.tensor([0]), rows[1:]])
    encoder_head = variant.num_decoder_layers if variant.two_stage else None

    converted, unknown = {}, []
    for key, value in official.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("backbone.0.body."):
            d2_key = torchvision_resnet_to_detectron2(key[len("backbone.0.body.") :])
            if d2_key is None:
                unknown.append(key)
                continue
            converted["backbone." + d2_key] = value
        elif key.startswith("input_proj."):
            converted["neck." + key] = value
        elif re.match(r"^transformer\.decoder\.(class|bbox)_embed\.", key):
            continue  # the official decoder's references to the heads below
        elif key.startswith("transformer.") or key == "query_embed.weight":
            converted[key] = value
        elif m := re.match(r"^(class|bbox)_embed\.(\d+)\.(.*)$", key):
            head = int(m.group(2))
            if not variant.with_box_refine and head > 0:
                continue  # one head shared by every decoder layer, listed once per layer
            if m.group(1) == "class":
                value = value[encoder_rows if head == encoder_head else rows].clone()
            converted[f"heads.{key}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointConversionError(
            f"Unknown keys in the official checkpoint: {_short_list(unknown)}"
        )
    return converted


def convert_state_dict(
    state_dict: Dict[str, torch.Tensor], source: str = "official"
) -> Tuple[Dict[str, torch.Tensor], DetectedVariant]:
    """
    Args:
        state_dict: official (``backbone.0.body...``) or HuggingFace (``model....``) tensors.
        source: "official" or "hf".

    Returns:
        The plugin state dict and the variant read from the weights.
    """
    if source not in ("official", "hf"):
        raise ValueError(f"source must be 'official' or 'hf', got {source!r}")
    looks_hf = "model.level_embed" in state_dict
    if looks_hf != (source == "hf"):
        actual = "a HuggingFace" if looks_hf else "not a HuggingFace"
        raise CheckpointConversionError(
            f"--source {source} was given but this is {actual} state dict"
            + ("; pass --source hf" if looks_hf else "")
        )
    official = hf_to_official(state_dict) if source == "hf" else dict(state_dict)
    _fill_aliases(official, source)
    variant = detect_variant(official)
    return official_to_plugin(official, variant), variant


def check_state_dict_matches(
    converted: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]
) -> None:
    """Raise unless ``converted`` has exactly the keys of ``expected``, with the same shapes."""
    missing = set(expected) - set(converted)
    unexpected = set(converted) - set(expected)
    wrong_shape = [
        f"{k} {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(converted)
        if converted[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing in the checkpoint: {_short_list(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_short_list(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches: {_short_list(wrong_shape)}")
    if problems:
        raise CheckpointConversionError(
            "The converted checkpoint does not match the model built from the config; "
            + "; ".join(problems)
        )


def write_converted_checkpoint(
    converted: Dict[str, torch.Tensor],
    variant: DetectedVariant,
    cfg,
    output_path: str,
    build_model: Optional[Callable] = None,
) -> None:
    """
    Check ``converted`` against ``cfg`` and against the state dict of the model built from it,
    then write ``{"model": converted}`` atomically to ``output_path``. Nothing is written when a
    check fails.

    Args:
        cfg: the config the converted weights will be evaluated with.
        build_model: ``cfg -> nn.Module``; defaults to ``detectron2.modeling.build_model``.
    """
    out_dir = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(out_dir):
        raise CheckpointConversionError(f"Output directory {out_dir!r} does not exist")
    problems = check_config(cfg, variant)
    if problems:
        raise CheckpointConversionError(
            f"The config does not match the checkpoint ({variant.describe()}): "
            + "; ".join(problems)
        )
    if build_model is None:
        from detectron2.modeling import build_model
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    check_state_dict_matches(converted, build_model(cfg).state_dict())
    data = {"model": converted, "__author__": "fundamentalvision/Deformable-DETR, converted"}
    atomic_write(output_path, lambda f: torch.save(data, f))
