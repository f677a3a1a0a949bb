"""
The first stage of two-stage Deformable DETR: one proposal per encoder position, scored by the
encoder head, and the top-k of them turned into decoder queries (paper, appendix A.4).
"""

import math
from typing import List, Tuple

import torch
from torchvision.ops import box_convert, nms

from .position_encoding import sine_embedding

__all__ = ["encoder_proposals", "proposal_position_embedding", "select_proposals", "valid_sizes"]


def valid_sizes(padding_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) padding mask (True on padding, padding at the bottom and right) -> the valid
    height and width of each image, (N,) each."""
    return torch.sum(~padding_mask[:, :, 0], 1), torch.sum(~padding_mask[:, 0, :], 1)


def encoder_proposals(
    padding_mask: torch.Tensor, level_shapes: List[Tuple[int, int]]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    One proposal per encoder position: centred on the pixel, of side 0.05 * 2**level, relative to
    the valid image region.

    Args:
        padding_mask: (N, S) bool, the flattened per-level masks.
        level_shapes: L (H, W) of the levels.

    Returns:
        proposals: (N, S, 4) unactivated (logit) cxcywh, +inf where invalid.
        valid: (N, S, 1) bool, False on padding and on proposals too close to the border.
    """
    n = padding_mask.shape[0]
    proposals = []
    start = 0
    for level, (h, w) in enumerate(level_shapes):
        mask = padding_mask[:, start : start + h * w].view(n, h, w)
        valid_h, valid_w = valid_sizes(mask)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=mask.device),
            torch.arange(w, dtype=torch.float32, device=mask.device),
            indexing="ij",
        )
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0**level)
        proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    valid = valid & ~padding_mask.unsqueeze(-1)
    proposals = torch.log(proposals / (1 - proposals)).masked_fill(~valid, float("inf"))
    return proposals, valid


@torch.no_grad()
def select_proposals(
    scores: torch.Tensor, coords_unact: torch.Tensor, k: int, nms_thresh: float = 1.0
) -> torch.Tensor:
    """
    Indices (N, k) of the top-``k`` proposals by score. With ``nms_thresh`` < 1 class-agnostic
    NMS runs first (distinct queries, as DDQ-DETR), so that neighbouring encoder positions do not
    all become queries for the same object; when fewer than ``k`` survive, the best suppressed
    ones fill the rest.

    Args:
        scores: (N, S) proposal scores; coords_unact: (N, S, 4) unactivated cxcywh boxes.
    """
    if nms_thresh >= 1.0:
        return torch.topk(scores, k, dim=1)[1]
    scores = scores.float()
    boxes = box_convert(coords_unact.float().sigmoid(), "cxcywh", "xyxy")
    # Out of place, image by image: an in-place write into a row view is lost by the ONNX
    # tracer, which then bakes the example input's survivors into the file as a constant.
    kept = []
    for scores_i, boxes_i in zip(scores, boxes):
        keep = _nms_keeping_k(boxes_i, scores_i, nms_thresh, k)
        kept.append(scores_i.new_zeros(scores_i.shape).scatter(0, keep, 1.0))
    kept = torch.stack(kept)
    # Survivors first, each group by score (fixed shapes: traceable and exportable).
    offset = scores.amax(1, keepdim=True) - scores.amin(1, keepdim=True) + 1
    return torch.topk(scores + kept * offset, k, dim=1)[1]


def _nms_keeping_k(boxes: torch.Tensor, scores: torch.Tensor, thresh: float, k: int):
    """
    Indices kept by greedy NMS: all of them, or at least the ``k`` best. Greedy NMS decides a box
    from the higher-scoring boxes alone, so when NMS over the best ``4k`` boxes (then ``8k``, ...)
    keeps ``k``, these are the ``k`` best survivors of NMS over all boxes (up to the order of
    exactly tied scores). NMS over every encoder position was 7% of the demo's training step.
    Traced or compiled, the data-dependent loop would be frozen: there NMS runs over all boxes.
    """
    prefix = 4 * k
    while prefix < scores.shape[0] and not (
        torch.jit.is_tracing() or torch.compiler.is_compiling()
    ):
        best = torch.topk(scores, prefix).indices
        keep = best[nms(boxes[best], scores[best], thresh)]
        if keep.shape[0] >= k:
            return keep
        prefix *= 2
    return nms(boxes, scores, thresh)


def proposal_position_embedding(proposals: torch.Tensor, d_model: int) -> torch.Tensor:
    """(N, K, 4) unactivated boxes -> (N, K, 2 * d_model) sine embedding of their sigmoid."""
    # Official hard-codes 128 features per coordinate, which is d_model // 2 for d_model = 256.
    return sine_embedding(proposals.sigmoid() * (2 * math.pi), d_model // 2).flatten(2)
