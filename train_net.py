#!/usr/bin/env python
"""
Deformable DETR training and evaluation script, in the style of Detectron2's tools/train_net.py.

    python train_net.py --config-file configs/deformable_detr_R50_50ep.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file ... --train-coco ann.json:images/ --val-coco val.json:val/ \
        MODEL.DEFORMABLE_DETR.NUM_CLASSES 3
"""

import os
import sys

try:
    import torch
    from detectron2.config import get_cfg
    from detectron2.data import build_detection_test_loader, build_detection_train_loader
    from detectron2.engine import default_argument_parser, default_setup, launch
    from detectron2.evaluation import COCOEvaluator
    from detectron2.solver.build import (
        _generate_optimizer_class_with_gradient_clipping,
        maybe_add_gradient_clipping,
    )

    from deformable_detr import add_deformable_detr_config
    from deformable_detr.checkpoint import AtomicDetectionCheckpointer
    from deformable_detr.data.dataset_mapper import DetrDatasetMapper
    from deformable_detr.data.user_coco import add_user_coco_arguments, setup_user_coco
    from deformable_detr.data.validation import training_dataset_dicts
    from deformable_detr.engine import RobustTrainer
except ImportError as e:
    sys.exit(f"train_net.py: {e}. Run `make setup` (or use .venv/bin/python).")

# SOLVER.OPTIMIZER -> (class, extra keyword arguments from the config)
OPTIMIZERS = {
    "ADAMW": (torch.optim.AdamW, lambda cfg: {}),
    "SGD": (torch.optim.SGD, lambda cfg: {"momentum": cfg.SOLVER.MOMENTUM}),
}
LINEAR_PROJ_NAMES = ("sampling_offsets", "reference_points")


def optimizer_param_groups(cfg, model):
    """Three groups as the official: backbone, sampling offsets / reference points, the rest."""
    base_lr = cfg.SOLVER.BASE_LR
    groups = {
        "backbone": {"params": [], "lr": base_lr * cfg.SOLVER.BACKBONE_MULTIPLIER},
        "linear_proj": {"params": [], "lr": base_lr * cfg.SOLVER.LINEAR_PROJ_MULTIPLIER},
        "other": {"params": [], "lr": base_lr},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone."):
            groups["backbone"]["params"].append(param)
        elif any(key in name for key in LINEAR_PROJ_NAMES):
            groups["linear_proj"]["params"].append(param)
        else:
            groups["other"]["params"].append(param)
    return [g for g in groups.values() if g["params"]]


class Trainer(RobustTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(
            cfg, mapper=DetrDatasetMapper(cfg, True), dataset=training_dataset_dicts(cfg)
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, False))

    @classmethod
    def build_optimizer(cls, cfg, model):
        if cfg.SOLVER.OPTIMIZER not in OPTIMIZERS:
            raise ValueError(
                f"SOLVER.OPTIMIZER must be one of {sorted(OPTIMIZERS)}, "
                f"got {cfg.SOLVER.OPTIMIZER!r}"
            )
        optimizer_cls, extra_kwargs = OPTIMIZERS[cfg.SOLVER.OPTIMIZER]
        clip = cfg.SOLVER.CLIP_GRADIENTS
        if clip.ENABLED and clip.CLIP_TYPE == "full_model":
            # Official: one norm over all parameters; Detectron2 has the wrapper, not the config.
            optimizer_cls = _generate_optimizer_class_with_gradient_clipping(
                optimizer_cls,
                global_clipper=lambda params: torch.nn.utils.clip_grad_norm_(
                    params, clip.CLIP_VALUE, clip.NORM_TYPE
                ),
            )
        else:
            optimizer_cls = maybe_add_gradient_clipping(cfg, optimizer_cls)
        return optimizer_cls(
            optimizer_param_groups(cfg, model),
            lr=cfg.SOLVER.BASE_LR,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            **extra_kwargs(cfg),
        )


def setup(args):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    setup_user_coco(cfg, args)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = add_user_coco_arguments(default_argument_parser()).parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
