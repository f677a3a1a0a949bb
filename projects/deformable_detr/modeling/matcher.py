"""Hungarian matching between predictions and ground truth (focal class cost, L1 and GIoU)."""

from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou


class HungarianMatcher(nn.Module):
    """
    One-to-one assignment of ground-truth objects to queries minimizing
    ``cost_class * focal + cost_bbox * L1 + cost_giou * (-GIoU)``; unmatched queries are background.
    Costs are computed in float32 so that the assignment does not depend on AMP.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("cost_class, cost_bbox and cost_giou cannot all be 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def forward(
        self, outputs: Dict[str, torch.Tensor], targets: List[Dict[str, torch.Tensor]]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: "pred_logits" (N, Q, K) class logits, "pred_boxes" (N, Q, 4) normalized cxcywh.
            targets: N dicts with "labels" (T_i,) int64 and "boxes" (T_i, 4) normalized cxcywh.

        Returns:
            N pairs (query_indices, target_indices), each int64 of length min(Q, T_i).
        """
        # Not a decorator: mutmut (make mutation) does not mutate decorated functions.
        with torch.no_grad():
            # Each image's own block of the cost matrix only: the official code computes all
            # images' queries against all images' targets and discards the off-diagonal
            # blocks, batch-size times the work (the two-stage encoder cost spans every pixel).
            costs = [
                self._cost(logits, boxes, t["labels"], t["boxes"]).cpu()
                for logits, boxes, t in zip(outputs["pred_logits"], outputs["pred_boxes"], targets)
            ]
        indices = [linear_sum_assignment(c) for c in costs]
        return [
            (torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64))
            for i, j in indices
        ]

    def _cost(self, logits, boxes, tgt_ids, tgt_bbox) -> torch.Tensor:
        """(Q, T) matching cost of one image's ``logits`` (Q, K) and ``boxes`` (Q, 4)."""
        out_prob = logits.float().sigmoid()
        out_bbox = boxes.float()
        tgt_bbox = tgt_bbox.float()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost_class = (1 - alpha) * (out_prob**gamma) * (-(1 - out_prob + 1e-8).log())
        pos_cost_class = alpha * ((1 - out_prob) ** gamma) * (-(out_prob + 1e-8).log())
        cost_class = pos_cost_class[:, tgt_ids] - neg_cost_class[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(
            box_convert(out_bbox, "cxcywh", "xyxy"), box_convert(tgt_bbox, "cxcywh", "xyxy")
        )
        return (
            self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        )
