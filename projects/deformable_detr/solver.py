"""The optimizer of Deformable DETR: AdamW (or SGD) with the official three learning rates and
gradient clipping of the whole model's norm."""

import itertools
from typing import Dict, List

import torch
from detectron2.solver.build import maybe_add_gradient_clipping

__all__ = ["OPTIMIZERS", "build_optimizer", "optimizer_param_groups"]

# SOLVER.OPTIMIZER -> (class, extra keyword arguments from the config)
OPTIMIZERS = {
    "ADAMW": (torch.optim.AdamW, lambda cfg: {}),
    "SGD": (torch.optim.SGD, lambda cfg: {"momentum": cfg.SOLVER.MOMENTUM}),
}
LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


def optimizer_param_groups(cfg, model: torch.nn.Module) -> List[Dict]:
    """Three groups as the official: backbone, sampling offsets / reference points, the rest."""
    base_lr = cfg.SOLVER.BASE_LR
    groups = {
        "backbone": {"params": [], "lr": base_lr * cfg.SOLVER.BACKBONE_MULTIPLIER},
        "linear_proj": {"params": [], "lr": base_lr * cfg.SOLVER.LINEAR_PROJ_MULTIPLIER},
        "other": {"params": [], "lr": base_lr},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone."):
            groups["backbone"]["params"].append(param)
        elif any(key in name for key in LINEAR_PROJ_NAMES):
            groups["linear_proj"]["params"].append(param)
        else:
            groups["other"]["params"].append(param)
    return [g for g in groups.values() if g["params"]]


def _with_full_model_clipping(optimizer_cls, max_norm: float, norm_type: float):
    """``optimizer_cls`` whose ``step`` first clips the norm of all its gradients together
    (official ``clip_grad_norm_`` over the model); Detectron2's clipping is per parameter."""

    class FullModelGradientClipping(optimizer_cls):
        def step(self, closure=None):
            params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    FullModelGradientClipping.__name__ = f"{optimizer_cls.__name__}WithFullModelClipping"
    return FullModelGradientClipping


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` over :func:`optimizer_param_groups`, clipped as
    ``SOLVER.CLIP_GRADIENTS`` says (``CLIP_TYPE`` "full_model" as the official code)."""
    if cfg.SOLVER.OPTIMIZER not in OPTIMIZERS:
        raise ValueError(
            f"SOLVER.OPTIMIZER must be one of {sorted(OPTIMIZERS)}, got {cfg.SOLVER.OPTIMIZER!r}"
        )
    optimizer_cls, extra_kwargs = OPTIMIZERS[cfg.SOLVER.OPTIMIZER]
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_cls = _with_full_model_clipping(optimizer_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    else:
        optimizer_cls = maybe_add_gradient_clipping(cfg, optimizer_cls)
    return optimizer_cls(
        optimizer_param_groups(cfg, model),
        lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        **extra_kwargs(cfg),
    )
