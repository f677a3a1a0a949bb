"""Trains with the package's Trainer in 2 CPU processes (Gloo) for ``test_distributed.py``.

    python tests/distributed_worker.py CONFIG.yaml ANN.json:IMAGE_DIR RESULTS_DIR

Each rank saves to RESULTS_DIR/rank<r>.pth its parameters before and after training, whether
its model is wrapped in DDP, and the criterion's losses on rank-dependent targets.
"""

import os
import sys

import torch
from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from deformable_detr.engine import Trainer, setup

WORLD_SIZE = 2


def _criterion_check(criterion):
    """Rank r has r + 1 targets; the criterion must normalize by their mean over ranks."""
    torch.manual_seed(0)
    outputs = {"pred_logits": torch.randn(1, 12, 3), "pred_boxes": torch.rand(1, 12, 4) * 0.5 + 0.2}
    count = comm.get_rank() + 1
    targets = [{"labels": torch.zeros(count, dtype=torch.int64),
                "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(count, 1)}]
    return {"outputs": outputs, "targets": targets, "losses": criterion(outputs, targets)}


def main(config_file, coco_spec, results_dir):
    args = default_argument_parser().parse_args(
        ["--config-file", config_file, "--num-gpus", str(WORLD_SIZE)]
    )
    args.train_coco, args.val_coco = [coco_spec], []
    cfg = setup(args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    model = trainer.model
    result = {
        "ddp": isinstance(model, DistributedDataParallel),
        "world_size": comm.get_world_size(),
        "before": before,
        "after": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "criterion": _criterion_check(model.module.criterion),
    }
    torch.save(result, os.path.join(results_dir, f"rank{comm.get_rank()}.pth"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    launch(main, WORLD_SIZE, dist_url="auto", args=tuple(sys.argv[1:4]))
