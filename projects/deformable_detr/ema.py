"""
Exponential moving average (EMA) of the model weights, as detrex's ``model_ema``: updated after
every training step, used for evaluation, saved in and restored from the checkpoints.
"""

import contextlib
from typing import Dict

import torch
from detectron2.engine import HookBase
from torch import nn

__all__ = ["EMAHook", "ModelEMA"]


class ModelEMA:
    """
    ``ema = decay * ema + (1 - decay) * weight`` for every floating-point parameter and buffer of
    a model; integer buffers (BatchNorm's counters) are copied. It starts empty and takes the
    model's weights at the first :meth:`update` or :meth:`initialize`, so that weights loaded after
    it was built (``MODEL.WEIGHTS``) are where the average starts. A checkpointable:
    :meth:`state_dict` / :meth:`load_state_dict`.
    """

    def __init__(self, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"SOLVER.EMA.DECAY must be in [0, 1), got {decay}")
        self.decay = decay
        self.weights: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def initialize(self, model: nn.Module) -> None:
        self.weights = {name: value.detach().clone() for name, value in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if not self.weights:
            self.initialize(model)
            return
        for name, value in model.state_dict().items():
            average = self.weights[name]
            if average.is_floating_point():
                average.lerp_(value.detach(), 1.0 - self.decay)
            else:
                average.copy_(value)

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module):
        """Within the block ``model`` holds the averaged weights; its own are restored after."""
        if not self.weights:
            yield model
            return
        own = {name: value.detach().clone() for name, value in model.state_dict().items()}
        model.load_state_dict(self.weights)
        try:
            yield model
        finally:
            model.load_state_dict(own)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return dict(self.weights)

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        self.weights = {name: value.detach().clone() for name, value in state_dict.items()}


class EMAHook(HookBase):
    """Updates a :class:`ModelEMA` of ``model`` after every optimizer step; before training it
    starts from the model's weights unless a resumed checkpoint already gave it its own."""

    def __init__(self, model_ema: ModelEMA, model: nn.Module):
        self.model_ema = model_ema
        self.model = model

    def before_train(self):
        if not self.model_ema.weights:
            self.model_ema.initialize(self.model)
            return
        # Checkpoints load onto the CPU; the average lives where the model does.
        self.model_ema.weights = {
            name: self.model_ema.weights[name].to(value.device)
            for name, value in self.model.state_dict().items()
        }

    def after_step(self):
        self.model_ema.update(self.model)
