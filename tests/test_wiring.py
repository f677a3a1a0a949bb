"""The model built from each YAML uses that YAML's values: loss weights, matching costs, focal
parameters, queries, levels, points, layers, match repeats and NMS thresholds.

A key read into the wrong argument (box-L1 and GIoU weights swapped, a cost taken from the loss
weights, a default instead of the config) fails here even though every loss is still computed.
"""

from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from deformable_detr import add_deformable_detr_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_YAMLS = sorted(CONFIGS.rglob("*.yaml"))


def _attention_shapes(attention):
    return attention.n_heads, attention.n_levels, attention.n_points


# Config key under MODEL.DEFORMABLE_DETR -> the value the built model uses. The only place that
# reads the model's internals: adapt it here when modules move.
WIRING = {
    "LOSS.CLASS_WEIGHT": lambda m: m.criterion.weight_dict["loss_ce"],
    "LOSS.BBOX_WEIGHT": lambda m: m.criterion.weight_dict["loss_bbox"],
    "LOSS.GIOU_WEIGHT": lambda m: m.criterion.weight_dict["loss_giou"],
    "MATCHER.COST_CLASS": lambda m: m.criterion.matcher.cost_class,
    "MATCHER.COST_BBOX": lambda m: m.criterion.matcher.cost_bbox,
    "MATCHER.COST_GIOU": lambda m: m.criterion.matcher.cost_giou,
    "LOSS.FOCAL_ALPHA": lambda m: (m.criterion.focal_alpha, m.criterion.matcher.focal_alpha),
    "LOSS.FOCAL_GAMMA": lambda m: (m.criterion.focal_gamma, m.criterion.matcher.focal_gamma),
    "MATCHER.DECODER_REPEATS": lambda m: m.criterion.decoder_match_repeats,
    "MATCHER.ENCODER_REPEATS": lambda m: m.criterion.encoder_match_repeats,
    "NUM_CLASSES": lambda m: (m.criterion.num_classes, m.heads.class_embed[0].out_features),
    "HIDDEN_DIM": lambda m: m.transformer.d_model,
    "NHEADS": lambda m: {
        _attention_shapes(layer.self_attn)[0] for layer in m.transformer.encoder.layers
    } | {_attention_shapes(layer.cross_attn)[0] for layer in m.transformer.decoder.layers},
    "ENC_LAYERS": lambda m: len(m.transformer.encoder.layers),
    "DEC_LAYERS": lambda m: len(m.transformer.decoder.layers),
    "DIM_FEEDFORWARD": lambda m: m.transformer.encoder.layers[0].linear1.out_features,
    "DROPOUT": lambda m: m.transformer.encoder.layers[0].dropout1.p,
    "NUM_FEATURE_LEVELS": lambda m: {
        _attention_shapes(layer.self_attn)[1] for layer in m.transformer.encoder.layers
    } | {_attention_shapes(layer.cross_attn)[1] for layer in m.transformer.decoder.layers},
    "ENC_N_POINTS": lambda m: {
        _attention_shapes(layer.self_attn)[2] for layer in m.transformer.encoder.layers
    },
    "DEC_N_POINTS": lambda m: {
        _attention_shapes(layer.cross_attn)[2] for layer in m.transformer.decoder.layers
    },
    "WITH_BOX_REFINE": lambda m: m.with_box_refine,
    "TWO_STAGE.ENABLED": lambda m: (m.two_stage, m.transformer.two_stage),
    "TWO_STAGE.NUM_PROPOSALS": lambda m: m.transformer.two_stage_num_proposals,
    "TWO_STAGE.PROPOSAL_NMS_THRESH": lambda m: m.transformer.two_stage_proposal_nms_thresh,
    "LOSS.AUX_LOSS": lambda m: m.aux_loss,
    "NMS_THRESH_TEST": lambda m: m.nms_thresh_test,
    "LOOK_FORWARD_TWICE": lambda m: m.transformer.decoder.look_forward_twice,
    "TWO_STAGE.MIXED_QUERY_SELECTION": lambda m: m.transformer.mixed_query_selection,
    "DENOISING.ENABLED": lambda m: m.denoising is not None,
    "DENOISING.NUM_QUERIES": lambda m: m.denoising and m.denoising.num_queries,
    "DENOISING.LABEL_NOISE_RATIO": lambda m: m.denoising and m.denoising.label_noise_ratio,
    "DENOISING.BOX_NOISE_SCALE": lambda m: m.denoising and m.denoising.box_noise_scale,
    # Two-stage queries are the encoder's top proposals: its learned queries are not built.
    "NUM_QUERIES": lambda m: None if m.two_stage else m.query_embed.num_embeddings,
}
# Keys that feed several places: the expected value is repeated once per place.
REPEATED = {
    "LOSS.FOCAL_ALPHA": 2, "LOSS.FOCAL_GAMMA": 2, "NUM_CLASSES": 2, "TWO_STAGE.ENABLED": 2,
}
SETS = {"NHEADS", "NUM_FEATURE_LEVELS", "ENC_N_POINTS", "DEC_N_POINTS"}


def _load(path):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(str(path))
    return cfg


def _cheap(cfg):
    """Shrinks what the values under test do not depend on: no weights, a narrow backbone."""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.MOBILENET_V2.PRETRAINED = False
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    return cfg


def _value(node, key):
    """``node["A.B"]`` for a dotted key."""
    for part in key.split("."):
        node = node[part]
    return node


def _leaf_keys(node, prefix=""):
    """Every key of a config node as dotted paths to its leaves."""
    keys = set()
    for name, value in node.items():
        if isinstance(value, dict):
            keys |= _leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def _expected(cfg, key):
    dd = cfg.MODEL.DEFORMABLE_DETR
    value = _value(dd, key)
    if key == "NUM_QUERIES" and dd.TWO_STAGE.ENABLED:
        return None
    if key.startswith("DENOISING.") and key != "DENOISING.ENABLED" and not dd.DENOISING.ENABLED:
        return None  # not built
    if key in SETS:
        return {value}
    if key in REPEATED:
        return (value,) * REPEATED[key]
    return value


def _assert_wired(model, cfg):
    wrong = {
        key: (read(model), _expected(cfg, key))
        for key, read in WIRING.items()
        if read(model) != _expected(cfg, key)
    }
    assert not wrong, f"model value != config value: {wrong}"
    assert model.detections_per_image == cfg.TEST.DETECTIONS_PER_IMAGE


def _predictions_shape(model):
    """(decoder layers, queries, classes) of the raw predictions on a 64x64 image."""
    model.eval()
    with torch.no_grad():
        raw = model.raw_outputs([{"image": torch.rand(3, 64, 64) * 255}])
    layers, _, queries, classes = raw["pred_logits"].shape
    return layers, queries, classes


def test_every_config_key_of_the_model_has_a_wiring_check():
    keys = _leaf_keys(_load(CONFIGS / "Base-DeformableDETR.yaml").MODEL.DEFORMABLE_DETR)
    # IN_FEATURES and NECK are checked by the neck's own tests.
    assert keys - set(WIRING) == {"IN_FEATURES", "NECK"}


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_built_model_uses_the_config_values(path):
    cfg = _cheap(_load(path))
    torch.manual_seed(0)
    model = build_model(cfg)
    _assert_wired(model, cfg)


def test_distinct_values_reach_their_own_places():
    """Every wired key set to a value no other key has, so that a swap of two keys cannot hide
    behind equal defaults (the shipped configs all have MATCHER.COST_CLASS == COST_GIOU == 2)."""
    cfg = _cheap(_load(CONFIGS / "deformable_detr_R50_two_stage_50ep.yaml"))
    dd = cfg.MODEL.DEFORMABLE_DETR
    distinct = {
        "LOSS.CLASS_WEIGHT": 1.5, "LOSS.BBOX_WEIGHT": 4.5, "LOSS.GIOU_WEIGHT": 2.5,
        "MATCHER.COST_CLASS": 3.5, "MATCHER.COST_BBOX": 6.5, "MATCHER.COST_GIOU": 0.75,
        "DENOISING.ENABLED": True, "DENOISING.NUM_QUERIES": 30,
        "DENOISING.LABEL_NOISE_RATIO": 0.35, "DENOISING.BOX_NOISE_SCALE": 0.45,
        "LOOK_FORWARD_TWICE": True, "TWO_STAGE.MIXED_QUERY_SELECTION": True,
        "LOSS.FOCAL_ALPHA": 0.3, "LOSS.FOCAL_GAMMA": 1.25,
        "MATCHER.DECODER_REPEATS": 2, "MATCHER.ENCODER_REPEATS": 3,
        "NUM_CLASSES": 7, "HIDDEN_DIM": 64, "NHEADS": 4, "ENC_LAYERS": 1, "DEC_LAYERS": 2,
        "DIM_FEEDFORWARD": 40, "DROPOUT": 0.05, "NUM_FEATURE_LEVELS": 3,
        "ENC_N_POINTS": 5, "DEC_N_POINTS": 6, "NUM_QUERIES": 11, "TWO_STAGE.NUM_PROPOSALS": 13,
        "TWO_STAGE.PROPOSAL_NMS_THRESH": 0.65, "LOSS.AUX_LOSS": False, "NMS_THRESH_TEST": 0.55,
    }
    for key, value in distinct.items():
        cfg.merge_from_list([f"MODEL.DEFORMABLE_DETR.{key}", repr(value)])
    cfg.TEST.DETECTIONS_PER_IMAGE = 17
    torch.manual_seed(0)
    model = build_model(cfg)
    _assert_wired(model, cfg)
    # 13 two-stage queries (64x64 has more encoder tokens than that), 2 layers, 7 classes.
    assert _predictions_shape(model) == (2, 13, 7)

    dd.TWO_STAGE.ENABLED = dd.TWO_STAGE.MIXED_QUERY_SELECTION = False
    dd.WITH_BOX_REFINE = dd.LOOK_FORWARD_TWICE = False
    dd.MATCHER.ENCODER_REPEATS, dd.TWO_STAGE.PROPOSAL_NMS_THRESH = 1, 1.0
    model = build_model(cfg)
    _assert_wired(model, cfg)
    assert _predictions_shape(model) == (2, 11, 7)
