"""Checkpoints of earlier versions of this plugin, brought to the current module names."""

import re
from typing import Dict

import torch

__all__ = ["upgrade_state_dict"]

_ALIASED_HEAD = re.compile(r"^transformer\.decoder\.(class|bbox)_embed\.")
_TOP_LEVEL_HEAD = re.compile(r"^(class|bbox)_embed\.(\d+)\.")


def upgrade_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """
    Before version 0.2 the prediction heads were ``class_embed.i`` / ``bbox_embed.i`` of the
    detector, listed once per decoder layer even when shared, and again under
    ``transformer.decoder`` (the official layout). They are now ``heads.class_embed.i`` /
    ``heads.bbox_embed.i``, each stored once. A state dict of the current layout is returned
    unchanged.
    """
    if not any(_TOP_LEVEL_HEAD.match(key) for key in state_dict):
        return state_dict
    with_box_refine = any(key.startswith("transformer.decoder.bbox_embed.") for key in state_dict)
    upgraded = {}
    for key, value in state_dict.items():
        if _ALIASED_HEAD.match(key):
            continue
        match = _TOP_LEVEL_HEAD.match(key)
        if match is None:
            upgraded[key] = value
        elif with_box_refine or match.group(2) == "0":
            upgraded["heads." + key] = value
    return upgraded
