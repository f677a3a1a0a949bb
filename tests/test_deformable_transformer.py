import math
import warnings

import pytest
import torch
from torch import nn
from torchvision.ops import box_convert, nms

from deformable_detr.layers import MSDeformAttn
from deformable_detr.modeling.deformable_transformer import (
    DeformableTransformer,
    DeformableTransformerEncoder,
    flatten_levels,
    valid_ratio,
)
from deformable_detr.modeling.heads import PredictionHeads, inverse_sigmoid
from deformable_detr.modeling.two_stage import (
    encoder_proposals,
    proposal_position_embedding,
    select_proposals,
)

D = 32


def _inputs(n=2, shapes=((8, 10), (4, 5)), pad_right_of_image1=True):
    srcs = [torch.randn(n, D, h, w) for h, w in shapes]
    masks = [torch.zeros(n, h, w, dtype=torch.bool) for h, w in shapes]
    if pad_right_of_image1:
        for m in masks:
            m[1, :, m.shape[-1] // 2 :] = True
    pos = [torch.randn(n, D, h, w) for h, w in shapes]
    return srcs, masks, pos


def _transformer(two_stage=False, levels=2, **options):
    torch.manual_seed(0)
    return DeformableTransformer(
        d_model=D, nhead=2, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=64,
        dropout=0.0, num_feature_levels=levels, dec_n_points=2, enc_n_points=2,
        two_stage=two_stage, two_stage_num_proposals=7, **options,
    )


def test_inverse_sigmoid_inverts_and_stays_finite():
    x = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    y = inverse_sigmoid(x)
    assert torch.isfinite(y).all()
    assert torch.allclose(y[1:4].sigmoid(), x[1:4], atol=1e-6)


def test_official_parameter_names_and_init():
    t = _transformer()
    names = dict(t.named_parameters())
    for name in ["level_embed", "reference_points.weight",
                 "encoder.layers.0.self_attn.sampling_offsets.weight",
                 "encoder.layers.1.linear1.weight", "encoder.layers.0.norm1.weight",
                 "decoder.layers.2.cross_attn.value_proj.weight",
                 "decoder.layers.0.self_attn.in_proj_weight", "decoder.layers.0.norm3.bias"]:
        assert name in names, name
    assert isinstance(t.decoder.layers[0].self_attn, nn.MultiheadAttention)
    assert (t.reference_points.bias == 0).all()
    # MSDeformAttn keeps its own init after the transformer's xavier pass.
    for m in t.modules():
        if isinstance(m, MSDeformAttn):
            assert (m.sampling_offsets.weight == 0).all() and (m.attention_weights.bias == 0).all()
    two = _transformer(two_stage=True)
    assert {"enc_output.weight", "enc_output_norm.weight", "pos_trans.weight",
            "pos_trans_norm.weight"} <= set(dict(two.named_parameters()))
    assert not hasattr(two, "reference_points")


def test_valid_ratio_and_encoder_reference_points():
    mask = torch.zeros(1, 4, 8, dtype=torch.bool)
    mask[:, 3:, :] = True
    mask[:, :, 6:] = True
    ratio = valid_ratio(mask)
    assert torch.allclose(ratio, torch.tensor([[6 / 8, 3 / 4]]))
    shapes = [(4, 8), (2, 4)]
    valid = torch.stack([ratio, ratio], 1)
    ref = DeformableTransformerEncoder.get_reference_points(shapes, valid, "cpu")
    assert ref.shape == (1, 32 + 8, 2, 2)
    # Pixel (y=1, x=2) of level 0: centre normalized by the valid extent, then back to the padded
    # frame of each level (times the valid ratio).
    expected = torch.tensor([(2 + 0.5) / 6, (1 + 0.5) / 3]) * torch.tensor([6 / 8, 3 / 4])
    assert torch.allclose(ref[0, 1 * 8 + 2, 0], expected)
    assert torch.allclose(ref[0, 1 * 8 + 2, 1], expected)


def test_encoder_output_proposals():
    shapes = [(4, 5), (2, 3)]
    mask = torch.zeros(2, 26, dtype=torch.bool)
    mask[1, :20].view(4, 5)[:, 3:] = True
    proposals, valid = encoder_proposals(mask, shapes)
    assert proposals.shape == (2, 26, 4) and valid.shape == (2, 26, 1)
    # Level 0 pixel (y=1, x=2) of image 0: centre (2.5/5, 1.5/4), size 0.05, as logits.
    expected = inverse_sigmoid(torch.tensor([2.5 / 5, 1.5 / 4, 0.05, 0.05]))
    assert torch.allclose(proposals[0, 1 * 5 + 2], expected, atol=1e-5)
    # Level 1 boxes are twice as large; padded positions get +inf and are not valid.
    assert torch.allclose(proposals[0, 20, 2:].sigmoid(), torch.tensor([0.1, 0.1]))
    assert torch.isinf(proposals[1, 3]).all() and torch.isfinite(proposals[1, 2]).all()
    assert not valid[1, 3] and valid[1, 2]
    # Image 1 has 3 valid columns at level 0: x normalized by 3, not 5.
    assert proposals[1, 2, 0].sigmoid().item() == pytest.approx(2.5 / 3, abs=1e-5)


def test_encoder_proposals_drop_border_positions_on_every_level():
    # Level 0 is wider than 50 columns, so its first and last centres fall outside (0.01, 0.99):
    # the official code marks those invalid as well as the padding.
    shapes = [(3, 60), (2, 4), (1, 2)]
    mask = torch.zeros(2, 180 + 8 + 2, dtype=torch.bool)
    mask[1, :180].view(3, 60)[:, 55:] = True
    mask[1, 180:188].view(2, 4)[:, 3:] = True
    mask[1, 189] = True
    proposals, valid = encoder_proposals(mask, shapes)

    expected = torch.full((2, 190, 4), float("inf"))
    start = 0
    for level, (h, w) in enumerate(shapes):
        for image in range(2):
            level_mask = mask[image, start : start + h * w].view(h, w)
            valid_w = int((~level_mask[0]).sum())
            valid_h = int((~level_mask[:, 0]).sum())
            for y in range(h):
                for x in range(w):
                    box = torch.tensor([(x + 0.5) / valid_w, (y + 0.5) / valid_h,
                                        0.05 * 2**level, 0.05 * 2**level])
                    if not level_mask[y, x] and ((box > 0.01) & (box < 0.99)).all():
                        expected[image, start + y * w + x] = inverse_sigmoid(box)
        start += h * w
    assert torch.equal(valid[..., 0], torch.isfinite(expected).all(-1))
    assert not valid[0, 0] and not valid[0, 59] and valid[0, 1] and valid[0, 58]
    assert not valid[1, 0] and not valid[1, 54] and valid[1, 53]
    assert torch.allclose(proposals, expected, atol=1e-5)


def test_proposal_pos_embed_is_sine_of_sigmoid():
    proposals = torch.randn(2, 5, 4)
    pos = proposal_position_embedding(proposals, D)
    assert pos.shape == (2, 5, 4 * D // 2)
    x = proposals[0, 0, 0].sigmoid() * 2 * math.pi
    assert pos[0, 0, 0].item() == pytest.approx(math.sin(x.item()), abs=1e-5)
    assert pos[0, 0, 1].item() == pytest.approx(math.cos(x.item()), abs=1e-5)
    y = proposals[0, 0, 1].sigmoid() * 2 * math.pi  # the next coordinate's features follow
    assert pos[0, 0, D // 2].item() == pytest.approx(math.sin(y.item()), abs=1e-5)


def _heads(with_box_refine=False, two_stage=False, num_layers=3):
    torch.manual_seed(1)
    heads = PredictionHeads(D, 3, num_layers, with_box_refine, two_stage)
    with torch.no_grad():  # untrained box heads predict no offset: randomize them
        for parameter in heads.parameters():
            parameter.normal_(0, 0.1)
    return heads


def _decoder_references(t, *args):
    """Runs ``t(*args)``; returns its outputs and the reference points each decoder layer got."""
    references = []
    hooks = [
        layer.cross_attn.register_forward_pre_hook(
            lambda module, inputs: references.append(inputs[1])
        )
        for layer in t.decoder.layers
    ]
    try:
        outputs = t(*args)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, references


def test_forward_shapes_one_stage():
    t = _transformer()
    query_embed = torch.randn(9, 2 * D)
    outputs, references = _decoder_references(t, *_inputs(), _heads(), query_embed)
    assert outputs["pred_logits"].shape == (3, 2, 9, 3)
    assert outputs["pred_boxes"].shape == (3, 2, 9, 4) and "enc_outputs" not in outputs
    assert ((outputs["pred_boxes"] > 0) & (outputs["pred_boxes"] < 1)).all()
    # Without box refinement every layer gets the queries' reference points.
    assert references[0].shape == (2, 9, 2, 2)
    assert all(torch.equal(r, references[0]) for r in references)
    with pytest.raises(ValueError, match="query_embed"):
        t(*_inputs(), _heads())


def test_forward_box_refinement_feeds_each_layers_detached_boxes_to_the_next():
    t = _transformer()
    heads = _heads(with_box_refine=True)
    outputs, references = _decoder_references(t, *_inputs(), heads, torch.randn(9, 2 * D))
    valid_ratios = torch.stack([valid_ratio(m) for m in _inputs()[1]], 1).repeat(1, 1, 2)
    for layer in (1, 2):
        assert references[layer].shape == (2, 9, 2, 4) and not references[layer].requires_grad
        expected = outputs["pred_boxes"][layer - 1][:, :, None] * valid_ratios[:, None]
        torch.testing.assert_close(references[layer], expected, rtol=0, atol=0)
    # The next layer's loss does not train this layer's box head (official detach).
    outputs["pred_boxes"][2].sum().backward()
    previous_grad = heads.bbox_embed[1].layers[0].weight.grad  # zeros from the stack, or None
    assert previous_grad is None or not previous_grad.any()
    assert heads.bbox_embed[2].layers[0].weight.grad.abs().sum() > 0


def _box_head_grads(heads, loss_layer, look_forward_twice):
    t = _transformer(look_forward_twice=look_forward_twice)
    torch.manual_seed(2)
    outputs = t(*_inputs(), heads, torch.randn(9, 2 * D))
    heads.zero_grad(set_to_none=True)
    outputs["pred_boxes"][loss_layer].sum().backward()
    return outputs, [
        head.layers[0].weight.grad is not None and bool(head.layers[0].weight.grad.any())
        for head in heads.bbox_embed
    ]


def test_look_forward_twice_moves_the_detach_one_layer_back_with_the_same_outputs():
    heads = _heads(with_box_refine=True)
    plain, plain_grads = _box_head_grads(heads, 2, look_forward_twice=False)
    twice, twice_grads = _box_head_grads(heads, 2, look_forward_twice=True)
    torch.testing.assert_close(twice["pred_boxes"], plain["pred_boxes"], rtol=0, atol=0)
    torch.testing.assert_close(twice["pred_logits"], plain["pred_logits"], rtol=0, atol=0)
    # Layer 2's box loss trains layer 1's box head too, but not layer 0's.
    assert plain_grads == [False, False, True]
    assert twice_grads == [False, True, True]


def test_forward_two_stage_queries_start_on_the_top_proposals():
    t = _transformer(two_stage=True)
    heads = _heads(with_box_refine=True, two_stage=True)
    outputs, references = _decoder_references(t, *_inputs(), heads)
    assert outputs["pred_logits"].shape == (3, 2, 7, 3)
    encoder = outputs["enc_outputs"]
    assert encoder["pred_logits"].shape == (2, 80 + 20, 3)
    assert encoder["pred_boxes"].shape == (2, 100, 4)
    # The queries start from the top-scoring encoder proposals, scored by the encoder head.
    top = encoder["pred_logits"][0, :, 0].topk(7).indices
    first = references[0][0, :, 0] / torch.cat([valid_ratio(_inputs()[1][0])[0]] * 2)
    torch.testing.assert_close(first, encoder["pred_boxes"][0, top], rtol=1e-6, atol=1e-6)
    assert heads.encoder_head_index == 3


def test_mixed_query_selection_learns_contents_and_takes_positions_from_the_proposals():
    t = _transformer(two_stage=True, mixed_query_selection=True)
    heads = _heads(with_box_refine=True, two_stage=True)
    srcs, masks, pos = _inputs()
    levels = flatten_levels(srcs, masks, pos, t.level_embed)
    memory = t.encoder(levels)
    query_pos, tgt, reference, encoder = t.two_stage_queries(memory, levels, heads)
    assert query_pos.shape == tgt.shape == (2, 7, D)
    for image in range(2):  # the same learned contents in every image
        torch.testing.assert_close(tgt[image], t.tgt_embed.weight, rtol=0, atol=0)
    top = encoder["pred_logits"][:, :, 0].topk(7).indices
    torch.testing.assert_close(
        reference, torch.stack([encoder["pred_boxes"][i, top[i]] for i in range(2)]),
        rtol=1e-6, atol=1e-6,
    )
    expected_pos = t.pos_trans_norm(t.pos_trans(
        proposal_position_embedding(inverse_sigmoid(reference), D)
    ))
    torch.testing.assert_close(query_pos, expected_pos, rtol=1e-4, atol=1e-4)
    assert t(srcs, masks, pos, heads)["pred_boxes"].shape == (3, 2, 7, 4)
    with pytest.raises(ValueError, match="two_stage"):
        _transformer(two_stage=False, mixed_query_selection=True)


def test_distinct_topk_proposals_suppress_overlaps_then_fill():
    # Proposals 0-2 overlap heavily (IoU > 0.5), 3 is apart, 4 overlaps 3 by less than 0.5.
    boxes = torch.tensor([[[0.30, 0.30, 0.2, 0.2], [0.31, 0.30, 0.2, 0.2], [0.30, 0.31, 0.2, 0.2],
                           [0.70, 0.70, 0.2, 0.2], [0.80, 0.70, 0.2, 0.2]]])
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    coords = inverse_sigmoid(boxes)
    assert select_proposals(scores, coords, 3, 0.5).tolist() == [[0, 3, 4]]
    # Fewer than k distinct ones: the best suppressed proposals fill the remaining slots.
    assert select_proposals(scores, coords, 5, 0.5).tolist() == [[0, 3, 4, 1, 2]]
    assert select_proposals(scores, coords, 3).tolist() == [[0, 1, 2]]  # plain top-k

    t = DeformableTransformer(d_model=D, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                              dim_feedforward=64, num_feature_levels=2, two_stage=True,
                              two_stage_num_proposals=7, two_stage_proposal_nms_thresh=0.5)
    heads = _heads(with_box_refine=True, two_stage=True, num_layers=1)
    outputs, references = _decoder_references(t, *_inputs(pad_right_of_image1=False), heads)
    encoder = outputs["enc_outputs"]
    top = select_proposals(encoder["pred_logits"][..., 0], inverse_sigmoid(encoder["pred_boxes"]),
                           7, 0.5)
    expected = torch.stack([b[i] for b, i in zip(encoder["pred_boxes"], top)])
    torch.testing.assert_close(references[0][:, :, 0], expected, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="TWO_STAGE.PROPOSAL_NMS_THRESH"):
        DeformableTransformer(two_stage=True, two_stage_proposal_nms_thresh=0.0)


def _clustered_proposals(clusters, positions=3000):
    """Scores and boxes (2 images) jittered around ``clusters`` centres: about one NMS survivor
    per centre."""
    generator = torch.Generator().manual_seed(clusters)
    centres = torch.rand(clusters, 2, generator=generator)
    cluster = torch.randint(clusters, (2, positions), generator=generator)
    xy = centres[cluster] + 0.003 * torch.randn(2, positions, 2, generator=generator)
    boxes = torch.cat([xy, torch.full((2, positions, 2), 0.1)], -1).clamp(0.01, 0.99)
    return torch.randn(2, positions, generator=generator), boxes


@pytest.mark.parametrize("clusters", [400, 45, 30])
def test_distinct_topk_proposals_equal_nms_over_all_positions(clusters):
    # With 400 centres NMS over the best 4k boxes keeps k, with 45 the prefix grows (to all boxes
    # in one image), with 30 fewer than k survive at all.
    k = 50
    scores, boxes = _clustered_proposals(clusters)
    xyxy = box_convert(boxes, "cxcywh", "xyxy")
    expected = []
    for scores_i, boxes_i in zip(scores, xyxy):
        keep = nms(boxes_i, scores_i, 0.7)
        suppressed = torch.ones_like(scores_i, dtype=torch.bool).index_fill(0, keep, False)
        rest = torch.nonzero(suppressed)[:, 0]
        rest = rest[scores_i[rest].argsort(descending=True)]
        expected.append(torch.cat([keep, rest])[:k])
    selected = select_proposals(scores, inverse_sigmoid(boxes), k, 0.7)
    assert selected.tolist() == torch.stack(expected).tolist()


def test_traced_distinct_topk_proposals_do_not_freeze_the_example_prefix():
    # Traced where the first prefix suffices, then run where it does not: a prefix loop traced
    # into the graph would keep only the example's best 4k proposals.
    def select(scores, coords):
        return select_proposals(scores, coords, 50, 0.7)

    example, other = (_clustered_proposals(clusters) for clusters in (400, 45))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation
        traced = torch.jit.trace(select, (example[0], inverse_sigmoid(example[1])))
    other_coords = inverse_sigmoid(other[1])
    assert traced(other[0], other_coords).tolist() == select(other[0], other_coords).tolist()
