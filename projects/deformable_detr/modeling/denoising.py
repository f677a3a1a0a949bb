"""
Denoising training (DN-DETR, Li et al. 2022) in its contrastive form (DINO's CDN, Zhang et al.
2023): during training only, extra decoder queries start from noised ground-truth boxes with
possibly flipped labels. Positive queries (noise within ``box_noise_scale`` half-sizes) learn to
reconstruct their box without matching; negative queries (noise between one and two times that)
learn "no object". The queries come in groups, as many as fit in a query budget; an attention mask
keeps the matching queries from seeing them and the groups from seeing each other.
"""

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn
from torchvision.ops import box_convert

from .heads import inverse_sigmoid
from .two_stage import proposal_position_embedding

__all__ = ["DenoisingQueries", "DenoisingQueryGenerator", "denoising_attention_mask"]


@dataclass
class DenoisingQueries:
    """D = num_groups * group_size denoising queries of N images. Group g holds its positives at
    ``g * group_size + j`` and its negatives at ``g * group_size + group_size // 2 + j`` for the
    j-th box of an image; the slots of images with fewer boxes are padding."""

    content: torch.Tensor  # (N, D, C) label embeddings
    query_pos: torch.Tensor  # (N, D, C) position embeddings of the noised boxes
    reference: torch.Tensor  # (N, D, 4) noised boxes, normalized cxcywh
    group_size: int
    num_groups: int
    # Per image: (positive query indices, their target indices), as the matcher returns.
    positive_indices: List[Tuple[torch.Tensor, torch.Tensor]]


def denoising_attention_mask(
    num_denoising: int, group_size: int, num_matching: int, device=None
) -> torch.Tensor:
    """
    The decoder self-attention mask of D denoising queries followed by Q matching queries,
    (D + Q, D + Q) bool, True where query i may not attend to query j: matching queries see only
    matching queries, denoising queries see their own group and the matching queries.
    """
    size = num_denoising + num_matching
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[num_denoising:, :num_denoising] = True
    group = torch.arange(num_denoising, device=device) // group_size
    mask[:num_denoising, :num_denoising] = group[:, None] != group[None, :]
    return mask


class DenoisingQueryGenerator(nn.Module):
    """Builds :class:`DenoisingQueries` from the training targets (DINO's ``prepare_for_cdn``)."""

    def __init__(
        self,
        num_classes: int,
        d_model: int,
        num_queries: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
    ):
        """
        Args:
            num_classes: foreground classes; labels are embedded and flipped among them.
            d_model: width of the decoder queries.
            num_queries: the budget of denoising queries per image; each group has two queries
                per box of the image with most boxes, and as many groups as fit (at least one).
            label_noise_ratio: twice the probability that a label is replaced by a random one
                (DINO's convention: 0.5 flips a quarter of them).
            box_noise_scale: box corners move by up to this many half box sizes for positives,
                and by one to two times that for negatives; 0 keeps the boxes exact.
        """
        super().__init__()
        if num_queries < 2:
            raise ValueError(f"DENOISING.NUM_QUERIES must be >= 2, got {num_queries}")
        if not 0.0 <= label_noise_ratio <= 1.0:
            raise ValueError(
                f"DENOISING.LABEL_NOISE_RATIO must be in [0, 1], got {label_noise_ratio}"
            )
        if box_noise_scale < 0:
            raise ValueError(f"DENOISING.BOX_NOISE_SCALE must be >= 0, got {box_noise_scale}")
        self.num_classes = num_classes
        self.d_model = d_model
        self.num_queries = num_queries
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.label_embed = nn.Embedding(num_classes, d_model)
        # The same sine embedding of a box as the two-stage proposals, projected to a query.
        self.pos_proj = nn.Linear(2 * d_model, d_model)
        self.pos_norm = nn.LayerNorm(d_model)

    def noise_labels(self, labels: torch.Tensor) -> torch.Tensor:
        flip = torch.rand(labels.shape, device=labels.device) < self.label_noise_ratio * 0.5
        random_labels = torch.randint_like(labels, 0, self.num_classes)
        return torch.where(flip, random_labels, labels)

    def noise_boxes(self, boxes: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """(M, 4) cxcywh boxes, (M,) bool -> noised boxes, corners moved by a fraction of the box
        half-size: below ``box_noise_scale`` for positives, between it and twice it otherwise."""
        if self.box_noise_scale == 0:
            return boxes
        half_size = boxes[:, 2:].repeat(1, 2) / 2
        sign = torch.randint_like(boxes, 0, 2) * 2 - 1
        fraction = torch.rand_like(boxes) + negative[:, None].to(boxes.dtype)
        corners = box_convert(boxes, "cxcywh", "xyxy")
        corners = corners + sign * fraction * half_size * self.box_noise_scale
        return box_convert(corners.clamp(0.0, 1.0), "xyxy", "cxcywh")

    def forward(self, targets: List[Dict[str, torch.Tensor]]) -> DenoisingQueries:
        """
        Args:
            targets: N dicts with "labels" (T_i,) int64 and "boxes" (T_i, 4) normalized cxcywh.
        """
        device = self.label_embed.weight.device
        counts = [len(t["labels"]) for t in targets]
        max_boxes = max(max(counts), 1)  # a batch without boxes still gets one padded group
        group_size = 2 * max_boxes
        num_groups = max(self.num_queries // group_size, 1)
        num_denoising = num_groups * group_size
        n = len(targets)
        labels_per_slot = torch.zeros(n, num_denoising, dtype=torch.int64, device=device)
        filled = torch.zeros(n, num_denoising, 1, device=device)
        reference = torch.full((n, num_denoising, 4), 0.5, device=device)
        positive_indices = []
        group_start = torch.arange(num_groups, device=device) * group_size
        for image, (target, count) in enumerate(zip(targets, counts)):
            box_index = torch.arange(count, device=device)
            # (num_groups, 2, count): positives then negatives of every group.
            slots = group_start[:, None, None] + torch.tensor([0, max_boxes], device=device)[
                None, :, None
            ] + box_index[None, None, :]
            negative = torch.tensor([False, True], device=device)[None, :, None].expand_as(slots)
            labels = target["labels"].repeat(2 * num_groups)
            boxes = target["boxes"].repeat(2 * num_groups, 1)
            slots, negative = slots.reshape(-1), negative.reshape(-1)
            labels_per_slot[image, slots] = self.noise_labels(labels)
            filled[image, slots] = 1.0
            reference[image, slots] = self.noise_boxes(boxes, negative)
            positive_indices.append((slots[~negative], box_index.repeat(num_groups)))
        # Padding slots embed a placeholder label and are zeroed: the embedding stays in the
        # graph even for a batch without boxes, as DDP needs every parameter used.
        content = self.label_embed(labels_per_slot) * filled
        query_pos = self.pos_norm(self.pos_proj(
            proposal_position_embedding(inverse_sigmoid(reference), self.d_model)
        ))
        return DenoisingQueries(
            content, query_pos, reference, group_size, num_groups, positive_indices
        )
