from pathlib import Path

import pytest
from detectron2.config import get_cfg

from deformable_detr import add_deformable_detr_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_YAMLS = sorted(CONFIGS.rglob("*.yaml"))


def _load(path):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(str(path))
    return cfg


def test_configs_exist():
    names = {p.name for p in ALL_YAMLS}
    assert {"Base-DeformableDETR.yaml", "deformable_detr_R50_50ep.yaml",
            "deformable_detr_R50_single_scale_50ep.yaml",
            "deformable_detr_R50_single_scale_dc5_50ep.yaml",
            "deformable_detr_R50_box_refine_50ep.yaml",
            "deformable_detr_R50_two_stage_50ep.yaml"} <= names


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_loads(path):
    cfg = _load(path)
    assert cfg.MODEL.META_ARCHITECTURE == "DeformableDETR"


def test_base_recipe_is_the_official_one():
    cfg = _load(CONFIGS / "deformable_detr_R50_50ep.yaml")
    dd = cfg.MODEL.DEFORMABLE_DETR
    assert (dd.NUM_QUERIES, dd.HIDDEN_DIM, dd.NHEADS) == (300, 256, 8)
    assert (dd.ENC_LAYERS, dd.DEC_LAYERS) == (6, 6)
    assert (dd.DIM_FEEDFORWARD, dd.DROPOUT, dd.NUM_FEATURE_LEVELS) == (1024, 0.1, 4)
    assert (dd.MATCHER.COST_CLASS, dd.MATCHER.COST_BBOX, dd.MATCHER.COST_GIOU) == (2, 5, 2)
    assert (dd.LOSS.CLASS_WEIGHT, dd.LOSS.BBOX_WEIGHT, dd.LOSS.GIOU_WEIGHT) == (2, 5, 2)
    assert not dd.WITH_BOX_REFINE and not dd.TWO_STAGE.ENABLED
    # The paper: one-to-one matching, plain top-k proposals, no NMS.
    assert (dd.MATCHER.DECODER_REPEATS, dd.MATCHER.ENCODER_REPEATS) == (1, 1)
    assert (dd.TWO_STAGE.PROPOSAL_NMS_THRESH, dd.NMS_THRESH_TEST) == (1.0, 1.0)
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False and cfg.MODEL.RESNETS.NORM == "FrozenBN"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2 and cfg.INPUT.FORMAT == "RGB"
    s = cfg.SOLVER
    assert (s.OPTIMIZER, s.BASE_LR, s.WEIGHT_DECAY, s.IMS_PER_BATCH) == ("ADAMW", 2e-4, 1e-4, 32)
    assert (s.BACKBONE_MULTIPLIER, s.LINEAR_PROJ_MULTIPLIER) == (0.1, 0.1)
    iters_per_epoch = 118287 / 32
    assert round(s.MAX_ITER / iters_per_epoch) == 50 and round(s.STEPS[0] / iters_per_epoch) == 40
    assert s.CLIP_GRADIENTS.ENABLED and s.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert s.CLIP_GRADIENTS.CLIP_VALUE == 0.1
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 100


def test_variants_differ_only_where_expected():
    single = _load(CONFIGS / "deformable_detr_R50_single_scale_50ep.yaml")
    assert single.MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS == 1
    assert single.MODEL.DEFORMABLE_DETR.IN_FEATURES == ["res5"]
    dc5 = _load(CONFIGS / "deformable_detr_R50_single_scale_dc5_50ep.yaml")
    assert dc5.MODEL.RESNETS.RES5_DILATION == 2
    assert dc5.MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS == 1
    refine = _load(CONFIGS / "deformable_detr_R50_box_refine_50ep.yaml")
    assert refine.MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE
    assert not refine.MODEL.DEFORMABLE_DETR.TWO_STAGE.ENABLED
    two = _load(CONFIGS / "deformable_detr_R50_two_stage_50ep.yaml")
    assert two.MODEL.DEFORMABLE_DETR.TWO_STAGE.ENABLED and two.MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE


def test_dino_style_config_turns_every_convergence_option_on():
    cfg = _load(CONFIGS / "deformable_detr_R50_dino_style_12ep.yaml")
    dd = cfg.MODEL.DEFORMABLE_DETR
    assert dd.TWO_STAGE.ENABLED and dd.WITH_BOX_REFINE and dd.LOOK_FORWARD_TWICE
    assert dd.TWO_STAGE.MIXED_QUERY_SELECTION and dd.DENOISING.ENABLED and cfg.SOLVER.EMA.ENABLED
    assert dd.NUM_QUERIES == dd.TWO_STAGE.NUM_PROPOSALS == 900
    iters_per_epoch = 118287 / cfg.SOLVER.IMS_PER_BATCH
    assert round(cfg.SOLVER.MAX_ITER / iters_per_epoch) == 12
    assert round(cfg.SOLVER.STEPS[0] / iters_per_epoch) == 11


def test_new_options_are_off_by_default():
    cfg = _load(CONFIGS / "deformable_detr_R50_two_stage_50ep.yaml")
    dd = cfg.MODEL.DEFORMABLE_DETR
    assert not dd.LOOK_FORWARD_TWICE and not dd.TWO_STAGE.MIXED_QUERY_SELECTION
    assert not dd.DENOISING.ENABLED and not cfg.SOLVER.EMA.ENABLED
