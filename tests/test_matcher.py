import itertools
import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou

from deformable_detr.modeling.matcher import HungarianMatcher


def _giou(a, b):
    """GIoU of two cxcywh boxes, by hand."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _pair_cost(logits, box, label, tgt_box, weights=(2.0, 5.0, 2.0), alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-logits[label]))
    pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    neg = (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)
    l1 = sum(abs(x - y) for x, y in zip(box, tgt_box))
    return weights[0] * (pos - neg) + weights[1] * l1 - weights[2] * _giou(box, tgt_box)


def _random_case(seed, bs, num_queries, num_targets, num_classes=4):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(bs, num_queries, num_classes, generator=g) * 2,
        "pred_boxes": torch.rand(bs, num_queries, 4, generator=g) * 0.5 + 0.25,
    }
    targets = [
        {"labels": torch.randint(0, num_classes, (t,), generator=g),
         "boxes": torch.rand(t, 4, generator=g) * 0.5 + 0.25}
        for t in num_targets
    ]
    return outputs, targets


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    outputs, targets = _random_case(seed, bs=2, num_queries=5, num_targets=[3, 2])
    indices = HungarianMatcher()(outputs, targets)
    for b, (src, tgt) in enumerate(indices):
        logits = outputs["pred_logits"][b].tolist()
        boxes = outputs["pred_boxes"][b].tolist()
        labels = targets[b]["labels"].tolist()
        tgt_boxes = targets[b]["boxes"].tolist()
        cost = [[_pair_cost(logits[q], boxes[q], labels[t], tgt_boxes[t]) for t in
                 range(len(labels))] for q in range(len(boxes))]
        best = min(
            sum(cost[q][t] for t, q in enumerate(perm))
            for perm in itertools.permutations(range(len(boxes)), len(labels))
        )
        assert len(src) == len(tgt) == len(labels)
        assert sorted(tgt.tolist()) == list(range(len(labels)))
        assert len(set(src.tolist())) == len(src)
        found = sum(cost[q][t] for q, t in zip(src.tolist(), tgt.tolist()))
        assert found == pytest.approx(best, abs=1e-4)


def _official_batched_indices(outputs, targets, alpha=0.25, gamma=2.0):
    """The official matcher: all images' queries against all images' targets, then each image's
    block of the cost matrix."""
    bs, num_queries = outputs["pred_logits"].shape[:2]
    prob = outputs["pred_logits"].flatten(0, 1).sigmoid()
    boxes = outputs["pred_boxes"].flatten(0, 1)
    tgt_ids = torch.cat([t["labels"] for t in targets])
    tgt_boxes = torch.cat([t["boxes"] for t in targets])
    neg = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
    pos = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
    giou = generalized_box_iou(
        box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
    )
    cost_class = pos[:, tgt_ids] - neg[:, tgt_ids]
    cost = 5 * torch.cdist(boxes, tgt_boxes, p=1) + 2 * cost_class - 2 * giou
    sizes = [len(t["boxes"]) for t in targets]
    blocks = cost.view(bs, num_queries, -1).split(sizes, -1)
    return [linear_sum_assignment(c[i]) for i, c in enumerate(blocks)]


@pytest.mark.parametrize("seed", range(3))
def test_same_assignment_as_the_official_batched_cost(seed):
    """Each image's cost block is computed alone; the assignment must not change."""
    outputs, targets = _random_case(seed, bs=4, num_queries=300, num_targets=[20, 0, 57, 5])
    for (src, tgt), (ref_src, ref_tgt) in zip(
        HungarianMatcher()(outputs, targets), _official_batched_indices(outputs, targets)
    ):
        assert src.tolist() == ref_src.tolist() and tgt.tolist() == ref_tgt.tolist()


def test_obvious_assignment():
    outputs = {
        "pred_logits": torch.tensor([[[-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]]]),
        "pred_boxes": torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2],
                                     [0.5, 0.5, 0.3, 0.3]]]),
    }
    targets = [{"labels": torch.tensor([0, 1]),
                "boxes": torch.tensor([[0.7, 0.7, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]])}]
    (src, tgt), = HungarianMatcher()(outputs, targets)
    assert dict(zip(tgt.tolist(), src.tolist())) == {0: 1, 1: 0}


def test_saturated_scores_still_match():
    # Probabilities of exactly 0 and 1 in float32: the epsilon keeps the focal cost finite.
    outputs = {
        "pred_logits": torch.tensor([[[-100.0, 100.0], [100.0, -100.0]]]),
        "pred_boxes": torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]]]),
    }
    targets = [{"labels": torch.tensor([0, 1]),
                "boxes": torch.tensor([[0.7, 0.7, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]])}]
    (src, tgt), = HungarianMatcher()(outputs, targets)
    assert dict(zip(tgt.tolist(), src.tolist())) == {0: 1, 1: 0}


def test_empty_targets_and_half_precision_inputs():
    outputs, targets = _random_case(0, bs=2, num_queries=4, num_targets=[0, 2])
    outputs = {k: v.half() for k, v in outputs.items()}
    indices = HungarianMatcher()(outputs, targets)
    assert [len(i) for i, _ in indices] == [0, 2]
    assert all(i.dtype == torch.int64 and j.dtype == torch.int64 for i, j in indices)


def test_all_zero_costs_rejected():
    with pytest.raises(ValueError, match="^cost_class, cost_bbox and cost_giou cannot all be 0$"):
        HungarianMatcher(0, 0, 0)
    # Any one cost alone is a valid matcher.
    for costs in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        HungarianMatcher(*costs)
