"""The class and box prediction heads, owned once and called once per decoder layer."""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "PredictionHeads", "inverse_sigmoid", "refine_boxes"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Logit of ``x`` clamped to [0, 1], with both sides kept above ``eps`` to stay finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def refine_boxes(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """
    Boxes predicted relative to a reference, in logit space (the paper's Eq. 5 and appendix A.4).

    Args:
        delta: (..., 4) box head output.
        reference: (..., 2) reference points or (..., 4) reference boxes, normalized (sigmoid
            space). A point only moves the centre; the size is ``delta``'s alone.

    Returns:
        (..., 4) normalized (cx, cy, w, h).
    """
    reference = inverse_sigmoid(reference)
    if reference.shape[-1] == 4:
        return (delta + reference).sigmoid()
    return torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1).sigmoid()


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (official ``MLP``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, outs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class PredictionHeads(nn.Module):
    """
    A linear class head and a 3-layer box MLP per decoder layer: one pair shared by all layers,
    or with iterative box refinement one pair per layer; the two-stage variant adds a pair for
    the encoder proposals after them (:attr:`encoder_head_index`). Initialized as the official
    code: every class starts at probability 0.01, boxes at their reference.
    """

    def __init__(
        self,
        hidden_dim: int,
        num_classes: int,
        num_decoder_layers: int,
        with_box_refine: bool = False,
        two_stage: bool = False,
    ):
        super().__init__()
        self.with_box_refine = with_box_refine
        self.num_decoder_layers = num_decoder_layers
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        prior_prob = 0.01
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        num_heads = (num_decoder_layers + int(two_stage)) if with_box_refine else 1
        self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_heads))
        self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_heads))
        if two_stage:
            # Box sizes come from the proposals, so the heads start without a size offset.
            self.encoder_head_index = num_heads - 1
        else:
            # Small initial boxes (sigmoid(-2) ~ 0.12); official sets it on the first head only.
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)

    def head_index(self, decoder_layer: int) -> int:
        return decoder_layer if self.with_box_refine else 0

    def forward(self, decoder_layer: int, hidden: torch.Tensor):
        """
        Args:
            decoder_layer: index of the decoder layer whose output ``hidden`` (N, Q, C) is.

        Returns:
            logits (N, Q, K) and box deltas (N, Q, 4), which :func:`refine_boxes` turns into
            boxes relative to a reference.
        """
        index = self.head_index(decoder_layer)
        return self.class_embed[index](hidden), self.bbox_embed[index](hidden)
