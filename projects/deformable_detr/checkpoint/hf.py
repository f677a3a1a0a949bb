"""HuggingFace ``DeformableDetrForObjectDetection`` state dicts -> the official key layout."""

import re
from typing import Dict, Optional

import torch

from .sources import CheckpointConversionError, _short_list, _top_level_names

__all__ = ["hf_to_official"]


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
