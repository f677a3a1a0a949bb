"""
Conversion of the official Deformable DETR checkpoints (fundamentalvision/Deformable-DETR) and of
HuggingFace ``DeformableDetrForObjectDetection`` state dicts into this plugin's module names.

Both sources are first brought to the official key layout; the official layout is then renamed to
the plugin's (Detectron2 ResNet backbone, ``neck.input_proj``) and the 91-way COCO-id class heads
are reduced to Detectron2's 80 contiguous COCO classes. The result is checked key by key and shape
by shape against a model built from a config, so a checkpoint either loads completely or is
rejected with the list of offending keys.
"""

import argparse
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from detectron2.data import MetadataCatalog

from .checkpoint import atomic_write

__all__ = [
    "CheckpointConversionError",
    "DetectedVariant",
    "check_config",
    "check_state_dict_matches",
    "coco_class_rows",
    "convert_state_dict",
    "detect_variant",
    "hf_to_official",
    "load_source_state_dict",
    "official_to_plugin",
    "torchvision_resnet_to_detectron2",
    "write_converted_checkpoint",
]

# Official COCO models predict 91 classes: index = COCO category id (0 and 11 other ids unused).
NUM_COCO_ID_CLASSES = 91
# torchvision's ImageNet normalization, expressed for 0..255 RGB inputs (Detectron2 convention).
IMAGENET_PIXEL_MEAN = (123.675, 116.28, 103.53)
IMAGENET_PIXEL_STD = (58.395, 57.12, 57.375)


class CheckpointConversionError(ValueError):
    """The input cannot be converted: unreadable, another model, or inconsistent with the config."""


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


def _short_list(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _top_level_names(state_dict) -> str:
    return _short_list({k.split(".")[0] for k in state_dict})


def load_source_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """
    Read the tensors of an official ``.pth`` (``{"model": ..., "optimizer": ..., "args": ...}``),
    a HuggingFace ``pytorch_model.bin`` or ``model.safetensors``, or a bare state dict.
    """
    if not os.path.isfile(path):
        raise CheckpointConversionError(f"Input checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise CheckpointConversionError(
                f"Cannot read {path!r} as safetensors: {error}. The file is corrupt or truncated."
            ) from error
    try:
        # Official checkpoints carry their argparse.Namespace; nothing else needs unpickling.
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsupported_global = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if unsupported_global is None:
            raise CheckpointConversionError(
                f"Cannot read checkpoint {path!r}: the file is corrupt, truncated or not a "
                "PyTorch checkpoint."
            ) from error
        raise CheckpointConversionError(
            f"{path!r} holds a Python object of type {unsupported_global.group(1)}, which is not "
            "unpickled for safety. If you trust the file, keep only its weights: "
            "torch.save({'model': torch.load(path, weights_only=False)['model']}, new_path)"
        ) from error
    except (EOFError, OSError, RuntimeError, zipfile.BadZipFile) as error:
        raise CheckpointConversionError(
            f"Cannot read checkpoint {path!r}: {error}. The file is corrupt, truncated or not a "
            "PyTorch checkpoint."
        ) from error
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not loaded:
        raise CheckpointConversionError(f"{path!r} holds no state dict (got {type(loaded)})")
    not_tensors = [k for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointConversionError(
            f"{path!r} is not a model state dict: non-tensor entries {_short_list(not_tensors)}"
        )
    return dict(loaded)


# transformers < 5 names -> current ones, as (pattern, replacement); save_pretrained still writes
# the old names, and the SenseTime/* hub files have them.
_HF_LEGACY_RENAMES = [
    (r"^model\.backbone\.conv_encoder\.", "model.backbone."),
    (r"\.self_attn\.out_proj\.", ".self_attn.o_proj."),
    (r"\.layers\.(\d+)\.fc(\d)\.", r".layers.\1.mlp.fc\2."),
]
_HF_ENCODER_LAYER = {
    "self_attn": "self_attn",
    "self_attn_layer_norm": "norm1",
    "mlp.fc1": "linear1",
    "mlp.fc2": "linear2",
    "final_layer_norm": "norm2",
}
_HF_DECODER_LAYER = {
    "self_attn.o_proj": "self_attn.out_proj",
    "self_attn_layer_norm": "norm2",
    "encoder_attn": "cross_attn",
    "encoder_attn_layer_norm": "norm1",
    "mlp.fc1": "linear1",
    "mlp.fc2": "linear2",
    "final_layer_norm": "norm3",
}
# Fused by hf_to_official into nn.MultiheadAttention's in_proj.
_HF_DECODER_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_HF_TRANSFORMER_PARAMS = (
    "level_embed", "reference_points", "enc_output", "enc_output_norm", "pos_trans",
    "pos_trans_norm",
)


def _rename_hf_key(key: str) -> Optional[str]:
    """Official name of a HF key (current names); "" when unknown, None for decoder q/k/v."""
    if key.startswith("model.backbone.model."):
        return "backbone.0.body." + key[len("model.backbone.model.") :]
    if key.startswith("model.input_proj."):
        return key[len("model.") :]
    if key == "model.query_position_embeddings.weight":
        return "query_embed.weight"
    m = re.match(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m:
        part, index, module, param = m.groups()
        if part == "decoder" and module in _HF_DECODER_QKV:
            return None
        table = _HF_ENCODER_LAYER if part == "encoder" else _HF_DECODER_LAYER
        for hf_name, official_name in table.items():
            if module == hf_name or module.startswith(hf_name + "."):
                module = official_name + module[len(hf_name) :]
                return f"transformer.{part}.layers.{index}.{module}.{param}"
        return ""
    m = re.match(r"^model\.decoder\.((bbox_embed|class_embed)\..+)$", key)
    if m:
        return "transformer.decoder." + m.group(1)
    if key.startswith("model.") and key.split(".")[1] in _HF_TRANSFORMER_PARAMS:
        return "transformer." + key[len("model.") :]
    if re.match(r"^(class_embed|bbox_embed)\.\d+\.", key):
        return key
    return ""


def hf_to_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """
    Rename a HuggingFace ``DeformableDetrForObjectDetection`` state dict (timm/torchvision ResNet
    backbone) to the official layout; the decoder's separate q/k/v projections are fused into
    ``nn.MultiheadAttention``'s ``in_proj_weight``/``in_proj_bias``.
    """
    if "model.level_embed" not in state_dict:
        raise CheckpointConversionError(
            "Not a HuggingFace DeformableDetrForObjectDetection state dict (no "
            f"'model.level_embed'); its keys start with {_top_level_names(state_dict)}"
        )
    if any(".backbone.model.embedder." in k or ".backbone.conv_encoder.model.embedder." in k
           for k in state_dict):
        raise CheckpointConversionError(
            "HF ResNetBackbone weights (use_timm_backbone=False) are not supported: only the "
            "timm/torchvision ResNet layout (conv1, bn1, layer1..4) of the official and "
            "SenseTime/* checkpoints converts to Detectron2's ResNet"
        )
    renamed, qkv, unknown = {}, {}, []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, replacement in _HF_LEGACY_RENAMES:
            key = re.sub(pattern, replacement, key)
        new_key = _rename_hf_key(key)
        if new_key is None:
            qkv[key] = value
        elif not new_key:
            unknown.append(key)
        else:
            renamed[new_key] = value
    if unknown:
        raise CheckpointConversionError(f"Unknown HuggingFace keys: {_short_list(unknown)}")
    layers = sorted({int(re.search(r"layers\.(\d+)\.", k).group(1)) for k in qkv})
    for index in layers:
        prefix = f"model.decoder.layers.{index}.self_attn."
        for param in ("weight", "bias"):
            parts = [f"{prefix}{p}_proj.{param}" for p in ("q", "k", "v")]
            missing = [p for p in parts if p not in qkv]
            if missing:
                raise CheckpointConversionError(f"Missing HuggingFace keys: {_short_list(missing)}")
            renamed[f"transformer.decoder.layers.{index}.self_attn.in_proj_{param}"] = torch.cat(
                [qkv.pop(p) for p in parts]
            )
    return renamed


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
        elif key.startswith("transformer.") or key == "query_embed.weight":
            m = re.match(r"^transformer\.decoder\.class_embed\.(\d+)\.", key)
            converted[key] = _class_rows(value, m, encoder_head, rows, encoder_rows)
        elif re.match(r"^bbox_embed\.\d+\.layers\.\d\.(weight|bias)$", key):
            converted[key] = value
        elif m := re.match(r"^class_embed\.(\d+)\.(weight|bias)$", key):
            converted[key] = _class_rows(value, m, encoder_head, rows, encoder_rows)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointConversionError(
            f"Unknown keys in the official checkpoint: {_short_list(unknown)}"
        )
    return converted


def _class_rows(value, match, encoder_head, rows, encoder_rows):
    if match is None:
        return value
    return value[encoder_rows if int(match.group(1)) == encoder_head else rows].clone()


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


def check_config(cfg, variant: DetectedVariant) -> List[str]:
    """Config keys that contradict the checkpoint or the official pre-processing."""
    dd = cfg.MODEL.DEFORMABLE_DETR
    expected = {
        "NUM_FEATURE_LEVELS": (dd.NUM_FEATURE_LEVELS, variant.num_feature_levels),
        "IN_FEATURES (its length)": (len(dd.IN_FEATURES), variant.num_backbone_levels),
        "WITH_BOX_REFINE": (dd.WITH_BOX_REFINE, variant.with_box_refine),
        "TWO_STAGE": (dd.TWO_STAGE, variant.two_stage),
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

