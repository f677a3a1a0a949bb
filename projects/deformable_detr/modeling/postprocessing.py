"""From raw set predictions to detections: shared by the model and by exported programs."""

from typing import List, Sequence, Tuple

import torch
from detectron2.structures import Boxes, Instances
from torchvision.ops import batched_nms, box_convert

__all__ = ["select_detections"]


def select_detections(
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    image_sizes: Sequence[Tuple[int, int]],
    detections_per_image: int = 100,
    nms_thresh: float = 1.0,
) -> List[Instances]:
    """
    Keep the top ``detections_per_image`` (query, class) pairs by sigmoid score, after
    per-class NMS when ``nms_thresh`` < 1 (``MODEL.DEFORMABLE_DETR.NMS_THRESH_TEST``).

    Args:
        pred_logits: (N, Q, K); pred_boxes: (N, Q, 4) normalized cxcywh (the model's or an
            exported program's outputs).
        image_sizes: N (h, w) of the resized images the boxes are relative to.

    Returns:
        N Instances with ``pred_boxes`` (XYXY absolute, resized-image frame), ``scores``,
        ``pred_classes`` and ``query_indices`` (the query each detection comes from).
    """
    n, num_queries, num_classes = pred_logits.shape
    # Rank and scale in float32 whatever the autocast dtype of the heads.
    pred_logits, pred_boxes = pred_logits.float(), pred_boxes.float()
    prob = pred_logits.sigmoid().view(n, -1)
    use_nms = nms_thresh < 1.0
    # NMS ranks every (query, class) pair: a pair below the top-k may survive it.
    k = prob.shape[1] if use_nms else min(detections_per_image, prob.shape[1])
    scores, topk_indexes = torch.topk(prob, k, dim=1)
    query_index = topk_indexes // num_classes
    labels = topk_indexes % num_classes
    boxes = box_convert(pred_boxes, "cxcywh", "xyxy")
    boxes = torch.gather(boxes, 1, query_index.unsqueeze(-1).repeat(1, 1, 4))

    results = []
    for i, (h, w) in enumerate(image_sizes):
        scale = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
        boxes_i, scores_i, labels_i = boxes[i] * scale, scores[i], labels[i]
        queries_i = query_index[i]
        if use_nms:
            keep = batched_nms(boxes_i, scores_i, labels_i, nms_thresh)
            keep = keep[:detections_per_image]
            boxes_i, scores_i, labels_i = boxes_i[keep], scores_i[keep], labels_i[keep]
            queries_i = queries_i[keep]
        result = Instances((h, w))
        result.pred_boxes = Boxes(boxes_i)
        result.scores = scores_i
        result.pred_classes = labels_i
        result.query_indices = queries_i
        results.append(result)
    return results
