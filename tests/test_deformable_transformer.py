import math

import pytest
import torch
from torch import nn

from deformable_detr.layers import MSDeformAttn
from deformable_detr.modeling.deformable_transformer import (
    DeformableTransformer,
    DeformableTransformerEncoder,
    inverse_sigmoid,
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


def _transformer(two_stage=False, levels=2):
    torch.manual_seed(0)
    return DeformableTransformer(
        d_model=D, nhead=2, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=64,
        dropout=0.0, num_feature_levels=levels, dec_n_points=2, enc_n_points=2,
        two_stage=two_stage, two_stage_num_proposals=7,
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
    ratio = DeformableTransformer.get_valid_ratio(mask)
    assert torch.allclose(ratio, torch.tensor([[6 / 8, 3 / 4]]))
    shapes = torch.tensor([[4, 8], [2, 4]])
    valid = torch.stack([ratio, ratio], 1)
    ref = DeformableTransformerEncoder.get_reference_points(shapes, valid, "cpu")
    assert ref.shape == (1, 32 + 8, 2, 2)
    # Pixel (y=1, x=2) of level 0: centre normalized by the valid extent, then back to the padded
    # frame of each level (times the valid ratio).
    expected = torch.tensor([(2 + 0.5) / 6, (1 + 0.5) / 3]) * torch.tensor([6 / 8, 3 / 4])
    assert torch.allclose(ref[0, 1 * 8 + 2, 0], expected)
    assert torch.allclose(ref[0, 1 * 8 + 2, 1], expected)


def test_encoder_output_proposals():
    t = _transformer(two_stage=True)
    shapes = torch.tensor([[4, 5], [2, 3]])
    memory = torch.randn(2, 26, D)
    mask = torch.zeros(2, 26, dtype=torch.bool)
    mask[1, :20].view(4, 5)[:, 3:] = True
    output_memory, proposals = t.gen_encoder_output_proposals(memory, mask, shapes)
    assert output_memory.shape == (2, 26, D) and proposals.shape == (2, 26, 4)
    # Level 0 pixel (y=1, x=2) of image 0: centre (2.5/5, 1.5/4), size 0.05, as logits.
    expected = inverse_sigmoid(torch.tensor([2.5 / 5, 1.5 / 4, 0.05, 0.05]))
    assert torch.allclose(proposals[0, 1 * 5 + 2], expected, atol=1e-5)
    # Level 1 boxes are twice as large; padded positions get +inf.
    assert torch.allclose(proposals[0, 20, 2:].sigmoid(), torch.tensor([0.1, 0.1]))
    assert torch.isinf(proposals[1, 3]).all() and torch.isfinite(proposals[1, 2]).all()
    # Image 1 has 3 valid columns at level 0: x normalized by 3, not 5.
    assert proposals[1, 2, 0].sigmoid().item() == pytest.approx(2.5 / 3, abs=1e-5)


def test_proposal_pos_embed_is_sine_of_sigmoid():
    t = _transformer(two_stage=True)
    proposals = torch.randn(2, 5, 4)
    pos = t.get_proposal_pos_embed(proposals)
    assert pos.shape == (2, 5, 4 * D // 2)
    x = proposals[0, 0, 0].sigmoid() * 2 * math.pi
    assert pos[0, 0, 0].item() == pytest.approx(math.sin(x.item()), abs=1e-5)
    assert pos[0, 0, 1].item() == pytest.approx(math.cos(x.item()), abs=1e-5)


def test_forward_shapes_one_stage():
    t = _transformer()
    query_embed = torch.randn(9, 2 * D)
    hs, init_ref, inter_refs, enc_class, enc_coord = t(*_inputs(), query_embed)
    assert hs.shape == (3, 2, 9, D)
    assert init_ref.shape == (2, 9, 2) and inter_refs.shape == (3, 2, 9, 2)
    assert ((init_ref > 0) & (init_ref < 1)).all()
    assert enc_class is None and enc_coord is None
    # Without box refinement the reference points stay those of the queries.
    assert torch.equal(inter_refs[-1], init_ref)
    with pytest.raises(ValueError, match="query_embed"):
        t(*_inputs())


def test_forward_box_refinement_updates_detached_references():
    t = _transformer()
    heads = nn.ModuleList(nn.Linear(D, 4) for _ in range(3))
    t.decoder.bbox_embed = heads
    hs, init_ref, inter_refs, _, _ = t(*_inputs(), torch.randn(9, 2 * D))
    assert inter_refs.shape == (3, 2, 9, 4)
    assert not inter_refs.requires_grad
    expected = torch.cat([heads[0](hs[0])[..., :2] + inverse_sigmoid(init_ref),
                          heads[0](hs[0])[..., 2:]], -1).sigmoid()
    assert torch.allclose(inter_refs[0], expected, atol=1e-6)


def test_forward_two_stage():
    t = _transformer(two_stage=True)
    t.decoder.class_embed = nn.ModuleList(nn.Linear(D, 3) for _ in range(4))
    t.decoder.bbox_embed = nn.ModuleList(nn.Linear(D, 4) for _ in range(4))
    hs, init_ref, inter_refs, enc_class, enc_coord = t(*_inputs())
    assert hs.shape == (3, 2, 7, D)
    assert init_ref.shape == (2, 7, 4) and inter_refs.shape == (3, 2, 7, 4)
    assert enc_class.shape == (2, 80 + 20, 3) and enc_coord.shape == (2, 100, 4)
    # The queries start from the top-scoring encoder proposals.
    top = enc_class[0, :, 0].topk(7).indices
    assert torch.allclose(init_ref[0], enc_coord[0, top].sigmoid())


def test_distinct_topk_proposals_suppress_overlaps_then_fill():
    from deformable_detr.modeling.deformable_transformer import inverse_sigmoid

    t = DeformableTransformer(d_model=D, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                              dim_feedforward=64, num_feature_levels=2, two_stage=True,
                              two_stage_num_proposals=7, two_stage_proposal_nms_thresh=0.5)
    # Proposals 0-2 overlap heavily (IoU > 0.5), 3 is apart, 4 overlaps 3 by less than 0.5.
    boxes = torch.tensor([[[0.30, 0.30, 0.2, 0.2], [0.31, 0.30, 0.2, 0.2], [0.30, 0.31, 0.2, 0.2],
                           [0.70, 0.70, 0.2, 0.2], [0.80, 0.70, 0.2, 0.2]]])
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    coords = inverse_sigmoid(boxes)
    assert t.distinct_topk_proposals(scores, coords, 3).tolist() == [[0, 3, 4]]
    # Fewer than k distinct ones: the best suppressed proposals fill the remaining slots.
    assert t.distinct_topk_proposals(scores, coords, 5).tolist() == [[0, 3, 4, 1, 2]]

    t.decoder.class_embed = nn.ModuleList(nn.Linear(D, 3) for _ in range(2))
    t.decoder.bbox_embed = nn.ModuleList(nn.Linear(D, 4) for _ in range(2))
    hs, init_ref, _, enc_class, enc_coord = t(*_inputs())
    top = t.distinct_topk_proposals(enc_class[..., 0], enc_coord, 7)
    assert torch.allclose(init_ref, torch.stack([c[i] for c, i in zip(enc_coord, top)]).sigmoid())

    with pytest.raises(ValueError, match="TWO_STAGE_PROPOSAL_NMS_THRESH"):
        DeformableTransformer(two_stage=True, two_stage_proposal_nms_thresh=0.0)
