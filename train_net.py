#!/usr/bin/env python
"""
Deformable DETR training and evaluation, in the style of Detectron2's tools/train_net.py.

    python train_net.py --config-file configs/deformable_detr_R50_50ep.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file ... --train-coco ann.json:images/ --val-coco val.json:val/ \
        MODEL.DEFORMABLE_DETR.NUM_CLASSES 3
"""

import sys

try:
    # First: the package silences the torch.jit.script warnings detectron2 causes at import.
    import deformable_detr  # noqa: F401
except ImportError as e:
    sys.exit(f"train_net.py: {e}. Run `make setup` (or use .venv/bin/python).")
from detectron2.engine import default_argument_parser, launch

from deformable_detr.data.user_coco import add_user_coco_arguments
from deformable_detr.engine import Trainer, load_evaluation_weights, setup
from deformable_detr.errors import UserInputError


def main(args):
    try:
        cfg = setup(args)
    except UserInputError as error:
        sys.exit(f"train_net.py: error: {error}")
    if args.eval_only:
        model = Trainer.build_model(cfg)
        load_evaluation_weights(cfg, model, resume=args.resume)
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
