import pytest
import torch
from detectron2.modeling import build_model
from tiny_deformable_detr import instances, tiny_cfg
from torchvision.ops import box_convert

from deformable_detr.modeling.deformable_transformer import DeformableTransformer, valid_ratio
from deformable_detr.modeling.denoising import DenoisingQueryGenerator, denoising_attention_mask
from deformable_detr.modeling.heads import PredictionHeads

D = 32


def _targets():
    """Two images with 2 and 0 boxes (normalized cxcywh)."""
    return [
        {"labels": torch.tensor([2, 0]),
         "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.4, 0.2]])},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]


def _generator(num_queries=10, label_noise_ratio=0.0, box_noise_scale=0.0):
    torch.manual_seed(0)
    return DenoisingQueryGenerator(3, D, num_queries, label_noise_ratio, box_noise_scale)


def test_attention_mask_hides_denoising_from_matching_and_groups_from_each_other():
    # Two groups of two denoising queries (0-1, 2-3), then two matching queries (4-5).
    x, o = True, False
    expected = torch.tensor([
        [o, o, x, x, o, o],
        [o, o, x, x, o, o],
        [x, x, o, o, o, o],
        [x, x, o, o, o, o],
        [x, x, x, x, o, o],
        [x, x, x, x, o, o],
    ])
    assert torch.equal(denoising_attention_mask(4, 2, 2), expected)


def test_without_noise_queries_start_on_their_boxes_with_their_labels():
    generator = _generator(num_queries=10)
    queries = generator(_targets())
    # Groups of 2 x 2 boxes; 10 // 4 = 2 groups.
    assert (queries.group_size, queries.num_groups) == (4, 2)
    assert queries.content.shape == queries.query_pos.shape == (2, 8, D)
    boxes, labels = _targets()[0]["boxes"], _targets()[0]["labels"]
    for start in (0, 2, 4, 6):  # positives and negatives of both groups
        torch.testing.assert_close(queries.reference[0, start : start + 2], boxes)
        torch.testing.assert_close(
            queries.content[0, start : start + 2], generator.label_embed(labels)
        )
    # The image without boxes has only padding: no content, no positives.
    assert not queries.content[1].any()
    query_index, target_index = queries.positive_indices[0]
    assert query_index.tolist() == [0, 1, 4, 5] and target_index.tolist() == [0, 1, 0, 1]
    assert queries.positive_indices[1][0].numel() == 0


def test_box_noise_keeps_positives_within_and_negatives_beyond_the_scale():
    torch.manual_seed(0)
    generator = DenoisingQueryGenerator(3, D, box_noise_scale=0.5)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(2000, 1)
    negative = torch.arange(2000) % 2 == 1
    noised = generator.noise_boxes(boxes, negative)
    # Corner shifts in half box sizes (0.1 here): positives < 0.5, negatives in [0.5, 1).
    shift = (box_convert(noised, "cxcywh", "xyxy") - box_convert(boxes, "cxcywh", "xyxy")).abs()
    shift = shift / 0.1
    assert shift[~negative].max() < 0.5 + 1e-4
    assert shift[negative].min() > 0.5 - 1e-4 and shift[negative].max() < 1.0 + 1e-4
    assert shift[~negative].mean() > 0.2  # it does move them


def test_label_noise_flips_about_half_the_ratio():
    torch.manual_seed(0)
    generator = DenoisingQueryGenerator(80, D, label_noise_ratio=0.5)
    labels = torch.zeros(20000, dtype=torch.int64)
    changed = (generator.noise_labels(labels) != labels).float().mean().item()
    # A quarter are redrawn, 79 of 80 of those to another class.
    assert changed == pytest.approx(0.25 * 79 / 80, abs=0.02)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="NUM_QUERIES"):
        DenoisingQueryGenerator(3, D, num_queries=1)
    with pytest.raises(ValueError, match="LABEL_NOISE_RATIO"):
        DenoisingQueryGenerator(3, D, label_noise_ratio=1.5)
    with pytest.raises(ValueError, match="BOX_NOISE_SCALE"):
        DenoisingQueryGenerator(3, D, box_noise_scale=-1)


def _transformer_inputs():
    torch.manual_seed(3)
    shapes = ((8, 10), (4, 5))
    srcs = [torch.randn(2, D, h, w) for h, w in shapes]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in shapes]
    for m in masks:
        m[1, :, m.shape[-1] // 2 :] = True
    pos = [torch.randn(2, D, h, w) for h, w in shapes]
    return srcs, masks, pos


def test_denoising_queries_start_on_their_boxes_and_do_not_change_the_matching_queries():
    torch.manual_seed(0)
    t = DeformableTransformer(
        d_model=D, nhead=2, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64,
        dropout=0.0, num_feature_levels=2, dec_n_points=2, enc_n_points=2, two_stage=True,
        two_stage_num_proposals=5,
    )
    heads = PredictionHeads(D, 3, 2, with_box_refine=True, two_stage=True)
    queries = _generator()(_targets())
    references = []
    hook = t.decoder.layers[0].cross_attn.register_forward_pre_hook(
        lambda module, inputs: references.append(inputs[1])
    )
    with_dn = t(*_transformer_inputs(), heads, denoising=queries)
    hook.remove()
    plain = t(*_transformer_inputs(), heads)

    ratios = valid_ratio(_transformer_inputs()[1][0])[0].repeat(2)
    first = references[0][0, :2, 0] / ratios  # image 0's first positives, level 0
    torch.testing.assert_close(first, _targets()[0]["boxes"], rtol=0, atol=1e-6)
    assert with_dn["denoising"]["pred_boxes"].shape == (2, 2, 8, 4)
    # The mask hides the denoising queries: the matching queries decode as without them.
    torch.testing.assert_close(with_dn["pred_logits"], plain["pred_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(with_dn["pred_boxes"], plain["pred_boxes"], rtol=0, atol=1e-6)


def _model(variant="two_stage", **denoising):
    cfg = tiny_cfg(variant)
    cfg.MODEL.DEFORMABLE_DETR.DROPOUT = 0.0
    for key, value in denoising.items():
        cfg.MODEL.DEFORMABLE_DETR.DENOISING[key] = value
    torch.manual_seed(0)
    return build_model(cfg)


def _batch(counts=(5, 0)):
    torch.manual_seed(4)
    batch = []
    for count in counts:
        boxes = [[4 + 12 * i, 6, 14 + 12 * i, 30] for i in range(count)]
        batch.append({"image": torch.rand(3, 64, 80) * 255,
                      "instances": instances((64, 80), boxes, [i % 3 for i in range(count)])})
    return batch


@pytest.mark.parametrize("variant", ["multi_scale", "two_stage"])
def test_training_reconstructs_positives_at_every_layer_and_reaches_the_label_embedding(variant):
    model = _model(variant, ENABLED=True, NUM_QUERIES=20)
    model.train()
    losses = model(_batch((5, 0)))  # very different box counts, one image without any
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert name + "_dn" in losses and name + "_dn_0" in losses
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grad = model.denoising.label_embed.weight.grad
    assert grad is not None and (grad.abs().sum(1) > 0).tolist() == [True, True, True]
    # A batch without any box still trains (one padded group, nothing to reconstruct), with
    # every parameter in the graph (DDP without find_unused_parameters).
    model.zero_grad(set_to_none=True)
    losses = model(_batch((0, 0)))
    assert losses["loss_bbox_dn"].item() == 0 and torch.isfinite(losses["loss_ce_dn"])
    sum(losses.values()).backward()
    assert model.denoising.label_embed.weight.grad is not None


def test_denoising_losses_pair_positives_with_their_own_boxes():
    model = _model(ENABLED=True, NUM_QUERIES=20)
    targets = _targets()
    queries = _generator(num_queries=8)(targets)
    # Positives predict exactly their box; negatives and padding predict something else.
    boxes = torch.full((1, 2, 8, 4), 0.9)
    query_index, target_index = queries.positive_indices[0]
    boxes[:, 0, query_index] = targets[0]["boxes"][target_index]
    denoising = {"pred_logits": torch.zeros(1, 2, 8, 3), "pred_boxes": boxes,
                 "positive_indices": queries.positive_indices, "num_groups": queries.num_groups}
    losses = model.criterion.denoising_losses(denoising, targets, num_boxes=2.0)
    assert losses["loss_bbox_dn"].item() == 0 and losses["loss_giou_dn"].abs().item() < 1e-5
    boxes[:, 0, query_index[0]] = 0.5  # one positive off its box
    losses = model.criterion.denoising_losses(denoising, targets, num_boxes=2.0)
    assert losses["loss_bbox_dn"].item() > 0


def test_with_all_options_off_inference_is_unchanged_and_never_builds_denoising_queries(
    monkeypatch
):
    plain = _model()
    with_dn = _model(ENABLED=True)
    missing, unexpected = with_dn.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("denoising.") for key in missing)
    plain.eval()
    with_dn.eval()

    def fail(*args):
        raise AssertionError("denoising queries built at inference")

    monkeypatch.setattr(with_dn.denoising, "forward", fail)
    images = [{"image": x["image"]} for x in _batch((1, 1))]
    with torch.no_grad():
        expected, got = plain(images), with_dn(images)
    for a, b in zip(expected, got):
        assert torch.equal(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)
        assert torch.equal(a["instances"].scores, b["instances"].scores)
