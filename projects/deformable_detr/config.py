"""Config keys of Deformable DETR, added on top of Detectron2's defaults."""

import logging

from detectron2.config import CfgNode as CN

from .modeling.backbone.mobilenet_v2 import add_mobilenet_v2_config

__all__ = ["add_deformable_detr_config", "check_deformable_detr_config"]

logger = logging.getLogger(__name__)


def add_deformable_detr_config(cfg):
    """
    Add the keys of Deformable DETR (model, solver, input augmentation) to a Detectron2 config.
    Existing Detectron2 keys are reused where they exist: SOLVER.CLIP_GRADIENTS, SOLVER.AMP,
    TEST.DETECTIONS_PER_IMAGE, MODEL.PIXEL_MEAN/STD, INPUT.FORMAT, INPUT.MIN_SIZE_TRAIN.
    """
    cfg.MODEL.DEFORMABLE_DETR = CN()
    _C = cfg.MODEL.DEFORMABLE_DETR
    # Number of foreground classes (no "no-object" class: the classifier is sigmoid-based).
    _C.NUM_CLASSES = 80
    # Number of object queries (decoder slots).
    _C.NUM_QUERIES = 300
    # Width of the transformer and of the neck outputs.
    _C.HIDDEN_DIM = 256
    # Attention heads in encoder/decoder attentions.
    _C.NHEADS = 8
    # Number of encoder layers.
    _C.ENC_LAYERS = 6
    # Number of decoder layers.
    _C.DEC_LAYERS = 6
    # Hidden width of the feed-forward blocks.
    _C.DIM_FEEDFORWARD = 1024
    # Dropout inside the transformer.
    _C.DROPOUT = 0.1
    # Feature levels fed to the transformer; levels beyond IN_FEATURES are strided 3x3 convs.
    _C.NUM_FEATURE_LEVELS = 4
    # Sampling points per head and level in encoder self-attention.
    _C.ENC_N_POINTS = 4
    # Sampling points per head and level in decoder cross-attention.
    _C.DEC_N_POINTS = 4
    # Iterative bounding box refinement: one box/class head per decoder layer.
    _C.WITH_BOX_REFINE = False
    # Look forward twice (DINO), with WITH_BOX_REFINE: a layer's box loss also trains the previous
    # layer's box head (the previous boxes are detached only as the next layer's reference).
    _C.LOOK_FORWARD_TWICE = False
    # Per-class NMS IoU threshold at inference. 1.0 keeps the set prediction as it is (the paper,
    # no NMS); below 1 it removes the duplicates a briefly trained model still predicts.
    _C.NMS_THRESH_TEST = 1.0

    _C.TWO_STAGE = CN()
    # Two-stage variant: queries initialised from the encoder's top-scoring proposals.
    _C.TWO_STAGE.ENABLED = False
    # Proposals kept by the first stage (official: = NUM_QUERIES).
    _C.TWO_STAGE.NUM_PROPOSALS = 300
    # Class-agnostic NMS IoU threshold applied to the encoder proposals before that top-k, so the
    # queries are distinct (DDQ-DETR); 1.0 is the paper's plain top-k.
    _C.TWO_STAGE.PROPOSAL_NMS_THRESH = 1.0
    # Mixed query selection (DINO): the proposals give the reference boxes and positional
    # queries, the content queries are a learned embedding (one per proposal).
    _C.TWO_STAGE.MIXED_QUERY_SELECTION = False

    _C.DENOISING = CN()
    # Denoising training (DN-DETR, contrastive as DINO's CDN): during training only, extra decoder
    # queries from noised ground-truth boxes and labels learn to reconstruct them (positives) or
    # to predict no object (negatives), behind a self-attention mask.
    _C.DENOISING.ENABLED = False
    # Budget of denoising queries per image: groups of 2 x (most boxes in an image of the batch).
    _C.DENOISING.NUM_QUERIES = 100
    # Twice the probability that a denoising query's label is replaced by a random class.
    _C.DENOISING.LABEL_NOISE_RATIO = 0.5
    # Box corner noise in half box sizes: positives below it, negatives between 1x and 2x it.
    _C.DENOISING.BOX_NOISE_SCALE = 1.0

    _C.MATCHER = CN()
    # Matching cost weights of the Hungarian matcher.
    _C.MATCHER.COST_CLASS = 2.0
    _C.MATCHER.COST_BBOX = 5.0
    _C.MATCHER.COST_GIOU = 2.0
    # Predictions matched to each target, per decoder layer and for the two-stage encoder
    # proposals: 1 is the paper's one-to-one matching; k > 1 matches one-to-many (more positives,
    # faster training on small data) and then needs NMS_THRESH_TEST < 1.
    _C.MATCHER.DECODER_REPEATS = 1
    _C.MATCHER.ENCODER_REPEATS = 1

    _C.LOSS = CN()
    # Loss weights: focal classification, L1 box, GIoU box.
    _C.LOSS.CLASS_WEIGHT = 2.0
    _C.LOSS.BBOX_WEIGHT = 5.0
    _C.LOSS.GIOU_WEIGHT = 2.0
    # Sigmoid focal loss parameters (used by both the loss and the matching cost).
    _C.LOSS.FOCAL_ALPHA = 0.25
    _C.LOSS.FOCAL_GAMMA = 2.0
    # Supervise every decoder layer (auxiliary losses).
    _C.LOSS.AUX_LOSS = True
    # Backbone features fed to the neck, from high to low resolution.
    _C.IN_FEATURES = ["res3", "res4", "res5"]
    # Name of the neck in DEFORMABLE_DETR_NECK_REGISTRY.
    _C.NECK = "ChannelMapperNeck"

    # Learning-rate multiplier of the backbone parameters.
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Learning-rate multiplier of sampling_offsets and reference_points linear layers.
    cfg.SOLVER.LINEAR_PROJ_MULTIPLIER = 0.1
    # Optimizer: "ADAMW" or "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.EMA = CN()
    # Exponential moving average of the weights (detrex's model_ema), updated after every step,
    # used by the periodic evaluation and saved in the checkpoints under "ema".
    cfg.SOLVER.EMA.ENABLED = False
    # Weight of the old average at each update.
    cfg.SOLVER.EMA.DECAY = 0.999

    cfg.INPUT.DETR_CROP = CN()
    # DETR-style random crop: applied with probability PROB after a resize to one of RESIZE_SIZES.
    cfg.INPUT.DETR_CROP.ENABLED = True
    cfg.INPUT.DETR_CROP.PROB = 0.5
    # Shortest-edge sizes of the resize that precedes the crop.
    cfg.INPUT.DETR_CROP.RESIZE_SIZES = [400, 500, 600]
    # Crop height and width drawn uniformly in [MIN, MAX] (detectron2 "absolute_range").
    cfg.INPUT.DETR_CROP.SIZE = [384, 600]

    # User COCO datasets as "annotations.json:image_dir"; when set they replace DATASETS.TRAIN/TEST.
    cfg.DATASETS.COCO_TRAIN = []
    cfg.DATASETS.COCO_TEST = []

    # Autocast dtype of SOLVER.AMP.ENABLED: "float16" (with a GradScaler) or "bfloat16".
    cfg.SOLVER.AMP.PRECISION = "float16"

    add_mobilenet_v2_config(cfg)


def check_deformable_detr_config(cfg) -> None:
    """Rules across keys of ``MODEL.DEFORMABLE_DETR``, checked when the model is built: a
    ValueError naming the keys, or a warning for a legal but likely unintended combination."""
    dd = cfg.MODEL.DEFORMABLE_DETR
    if not 0.0 < dd.NMS_THRESH_TEST <= 1.0:
        raise ValueError(
            f"MODEL.DEFORMABLE_DETR.NMS_THRESH_TEST must be in (0, 1], got {dd.NMS_THRESH_TEST}"
        )
    if dd.TWO_STAGE.ENABLED and not dd.WITH_BOX_REFINE:
        raise ValueError(
            "MODEL.DEFORMABLE_DETR.TWO_STAGE.ENABLED True requires WITH_BOX_REFINE True (as the "
            "official code: with_box_refine=True is needed by two_stage)"
        )
    if dd.LOOK_FORWARD_TWICE and not dd.WITH_BOX_REFINE:
        raise ValueError(
            "MODEL.DEFORMABLE_DETR.LOOK_FORWARD_TWICE True acts on iterative box refinement: set "
            "WITH_BOX_REFINE True"
        )
    if not dd.TWO_STAGE.ENABLED and (
        dd.MATCHER.ENCODER_REPEATS > 1 or dd.TWO_STAGE.PROPOSAL_NMS_THRESH < 1.0
        or dd.TWO_STAGE.MIXED_QUERY_SELECTION
    ):
        raise ValueError(
            "MATCHER.ENCODER_REPEATS, TWO_STAGE.PROPOSAL_NMS_THRESH and "
            "TWO_STAGE.MIXED_QUERY_SELECTION act on the two-stage encoder proposals: set "
            "MODEL.DEFORMABLE_DETR.TWO_STAGE.ENABLED True or leave them at their defaults"
        )
    if dd.MATCHER.DECODER_REPEATS > 1 and dd.NMS_THRESH_TEST == 1.0:
        logger.warning(
            "MATCHER.DECODER_REPEATS > 1 trains the model to predict every object several "
            "times; set MODEL.DEFORMABLE_DETR.NMS_THRESH_TEST < 1 to remove the duplicates"
        )
