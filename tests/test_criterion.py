import math

import pytest
import torch

from deformable_detr.modeling.criterion import SetCriterion

WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 3.0}


def _fixed_matcher(indices):
    return lambda outputs, targets: [
        (torch.tensor(s, dtype=torch.int64), torch.tensor(t, dtype=torch.int64)) for s, t in indices
    ]


def _focal(x, t, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-x))
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    return alpha_t * ce * (1 - p_t) ** gamma


def _case():
    # One image, 2 queries, 2 classes, one target of class 1 matched to query 0.
    logits = [[0.5, -1.0], [2.0, 0.3]]
    outputs = {
        "pred_logits": torch.tensor([logits]),
        # query 0 as xyxy [0, 0, 0.5, 0.5]
        "pred_boxes": torch.tensor([[[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 0.2, 0.2]]]),
    }
    # target as xyxy [0.25, 0.25, 0.75, 0.75]
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    return logits, outputs, targets


def test_losses_match_hand_computation():
    logits, outputs, targets = _case()
    criterion = SetCriterion(2, _fixed_matcher([([0], [0])]), WEIGHTS)
    losses = criterion(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou"}

    onehot = [[0, 1], [0, 0]]
    focal = sum(_focal(logits[q][k], onehot[q][k]) for q in range(2) for k in range(2))
    assert losses["loss_ce"].item() == pytest.approx(2.0 * focal, rel=1e-5)
    l1 = 0.25 + 0.25 + 0.0 + 0.0
    assert losses["loss_bbox"].item() == pytest.approx(5.0 * l1, rel=1e-5)
    # IoU 1/7, enclosing box area 0.5625, union 0.4375.
    giou = 1 / 7 - (0.5625 - 0.4375) / 0.5625
    assert losses["loss_giou"].item() == pytest.approx(3.0 * (1 - giou), rel=1e-5)


def test_focal_parameters_are_used():
    logits, outputs, targets = _case()
    criterion = SetCriterion(
        2, _fixed_matcher([([0], [0])]), WEIGHTS, focal_alpha=0.4, focal_gamma=1.5
    )
    onehot = [[0, 1], [0, 0]]
    focal = sum(
        _focal(logits[q][k], onehot[q][k], alpha=0.4, gamma=1.5) for q in range(2) for k in range(2)
    )
    assert criterion(outputs, targets)["loss_ce"].item() == pytest.approx(2.0 * focal, rel=1e-5)


def test_normalized_by_number_of_boxes():
    logits, outputs, targets = _case()
    two = {k: torch.cat([v, v]) for k, v in outputs.items()}
    criterion = SetCriterion(2, _fixed_matcher([([0], [0]), ([0], [0])]), WEIGHTS)
    single = SetCriterion(2, _fixed_matcher([([0], [0])]), WEIGHTS)(outputs, targets)
    double = criterion(two, targets + targets)
    for k in single:
        assert double[k].item() == pytest.approx(single[k].item(), rel=1e-5)


def test_no_targets_clamps_normalizer_to_one():
    logits, outputs, _ = _case()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    losses = SetCriterion(2, _fixed_matcher([([], [])]), WEIGHTS)(outputs, empty)
    focal = sum(_focal(x, 0) for row in logits for x in row)
    assert losses["loss_ce"].item() == pytest.approx(2.0 * focal, rel=1e-5)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0


def test_aux_and_encoder_losses():
    logits, outputs, targets = _case()
    calls = []

    def matcher(out, tgts):
        calls.append([t["labels"].tolist() for t in tgts])
        return [(torch.tensor([0]), torch.tensor([0]))]

    outputs = dict(outputs)
    outputs["aux_outputs"] = [dict(outputs), dict(outputs)]
    outputs["enc_outputs"] = {k: outputs[k] for k in ("pred_logits", "pred_boxes")}
    losses = SetCriterion(2, matcher, WEIGHTS)(outputs, targets)
    assert set(losses) == {f"{k}{s}" for k in WEIGHTS for s in ("", "_0", "_1", "_enc")}
    # Every output is matched on its own; the encoder against class-agnostic (class 0) targets.
    assert calls == [[[1]], [[1]], [[1]], [[0]]]
    assert losses["loss_bbox_0"].item() == pytest.approx(losses["loss_bbox"].item())
    onehot_enc = [[1, 0], [0, 0]]
    focal_enc = sum(_focal(logits[q][k], onehot_enc[q][k]) for q in range(2) for k in range(2))
    assert losses["loss_ce_enc"].item() == pytest.approx(2.0 * focal_enc, rel=1e-5)


def test_gradients_flow_to_logits_and_boxes():
    _, outputs, targets = _case()
    outputs = {k: v.clone().requires_grad_() for k, v in outputs.items()}
    losses = SetCriterion(2, _fixed_matcher([([0], [0])]), WEIGHTS)(outputs, targets)
    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0
    assert outputs["pred_boxes"].grad[0, 0].abs().sum() > 0
    assert (outputs["pred_boxes"].grad[0, 1] == 0).all()


def test_one_to_many_matching_repeats_targets_per_stage():
    from deformable_detr.modeling.matcher import HungarianMatcher

    # Three queries: two near the one target, one far away.
    outputs = {
        "pred_logits": torch.tensor([[[1.0], [0.5], [-1.0]]]),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.52, 0.5, 0.4, 0.4],
                                     [0.1, 0.1, 0.1, 0.1]]]),
    }
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    outputs["enc_outputs"] = dict(outputs)
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    one = SetCriterion(1, matcher, WEIGHTS)(outputs, targets)
    many = SetCriterion(1, matcher, WEIGHTS, decoder_match_repeats=2,
                        encoder_match_repeats=3)(outputs, targets)
    # Decoder, k=2: queries 0 and 1 are both positives; losses are means over the 2 pairs.
    l1_query1 = 0.02
    assert one["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert many["loss_bbox"].item() == pytest.approx(5.0 * l1_query1 / 2, rel=1e-4)
    focal_two_pos = _focal(1.0, 1) + _focal(0.5, 1) + _focal(-1.0, 0)
    assert many["loss_ce"].item() == pytest.approx(2.0 * focal_two_pos / 2, rel=1e-5)
    # Encoder, k=3: every query is a positive, normalized by 3.
    focal_all_pos = _focal(1.0, 1) + _focal(0.5, 1) + _focal(-1.0, 1)
    assert many["loss_ce_enc"].item() == pytest.approx(2.0 * focal_all_pos / 3, rel=1e-5)

    with pytest.raises(ValueError, match="decoder_match_repeats must be >= 1, got 0"):
        SetCriterion(1, matcher, WEIGHTS, decoder_match_repeats=0)
    with pytest.raises(ValueError, match="encoder_match_repeats must be >= 1, got 0"):
        SetCriterion(1, matcher, WEIGHTS, encoder_match_repeats=0)
