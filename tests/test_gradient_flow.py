"""Where the paper and the official code stop gradients, none flow; where they do not, they do.

Official ``deformable_transformer.py`` detaches the two-stage proposal coordinates before they
become the decoder's references and queries, and each refined box before it becomes the next
decoder layer's reference. Forward parity with other implementations cannot see either.
"""

import pytest
import torch
from detectron2.modeling import build_model
from tiny_deformable_detr import tiny_cfg


def _box_heads(model):
    """The per-decoder-layer box heads and, for two-stage, the encoder proposal heads (box,
    class): the only place that reads the model's internals; adapt it here when heads move."""
    num_layers = model.transformer.decoder.num_layers
    heads = model.heads
    decoder_heads = [heads.bbox_embed[heads.head_index(layer)] for layer in range(num_layers)]
    if not model.two_stage:
        return decoder_heads, None
    index = heads.encoder_head_index
    return decoder_heads, (heads.bbox_embed[index], heads.class_embed[index])


def _model_and_outputs(variant):
    torch.manual_seed(0)
    cfg = tiny_cfg(variant)
    cfg.MODEL.DEFORMABLE_DETR.DEC_LAYERS = 3
    model = build_model(cfg).eval()  # no dropout; gradients are still recorded
    # Heads start with zero last layers (official init); random ones make every path non-zero.
    for head in model.heads.bbox_embed:
        torch.nn.init.normal_(head.layers[-1].weight, std=0.1)
    images = [{"image": torch.rand(3, 64, 80) * 255}, {"image": torch.rand(3, 48, 64) * 255}]
    return model, model.raw_outputs(images)


def _flows(output, module):
    """Whether ``output.sum()`` has a non-zero gradient with respect to ``module``'s weights."""
    params = list(module.parameters())
    grads = torch.autograd.grad(output.sum(), params, retain_graph=True, allow_unused=True)
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def test_two_stage_decoder_gets_no_gradient_into_the_proposal_heads():
    model, raw = _model_and_outputs("two_stage")
    _, (proposal_box_head, proposal_class_head) = _box_heads(model)
    decoder_outputs = raw["pred_boxes"].sum() + raw["pred_logits"].sum()
    # The proposal coordinates are detached (official), the top-k choice is not differentiable.
    assert not _flows(decoder_outputs, proposal_box_head)
    assert not _flows(decoder_outputs, proposal_class_head)
    # The encoder proposals themselves train both heads ...
    assert _flows(raw["enc_outputs"]["pred_boxes"], proposal_box_head)
    assert _flows(raw["enc_outputs"]["pred_logits"], proposal_class_head)
    # ... and the decoder still trains the encoder through the memory it attends to.
    assert _flows(decoder_outputs, model.transformer.encoder)
    assert _flows(decoder_outputs, model.transformer.pos_trans)


@pytest.mark.parametrize("variant", ["box_refine", "two_stage"])
def test_refined_boxes_reach_the_next_layer_without_gradient(variant):
    model, raw = _model_and_outputs(variant)
    decoder_heads, _ = _box_heads(model)
    boxes = raw["pred_boxes"]  # (layers, N, Q, 4)
    for layer in range(1, len(decoder_heads)):
        # The reference a layer refines is the previous layer's box, detached (official).
        for earlier in range(layer):
            assert not _flows(boxes[layer], decoder_heads[earlier]), (layer, earlier)
        assert _flows(boxes[layer], decoder_heads[layer]), layer
        # The decoder layers before it still get gradients through the hidden states.
        assert _flows(boxes[layer], model.transformer.decoder.layers[layer - 1]), layer


def test_learned_reference_points_get_gradient_from_every_layer():
    # Without refinement every layer predicts relative to the same learned reference points,
    # which the official code does not detach.
    model, raw = _model_and_outputs("multi_scale")
    for layer_boxes in raw["pred_boxes"]:
        assert _flows(layer_boxes, model.transformer.reference_points)
