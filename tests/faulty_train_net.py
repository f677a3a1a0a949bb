"""
``train_net.py`` with two test-only instruments, set by environment variables:

- ``KILL_DURING_SAVE=N``: the N-th ``torch.save`` writes half of its bytes, flushes them to the
  file and SIGKILLs the process, so the kill lands in the middle of a checkpoint write.
- ``RECORD_TRAINED_STATE=path``: after training, the live model, optimizer and LR-scheduler
  states are written to ``path``, to compare with what the trainer's checkpointer saved.

Run as ``python tests/faulty_train_net.py <train_net.py arguments>``.
"""

import io
import os
import runpy
import signal
import sys
from pathlib import Path

import torch

from deformable_detr.engine import Trainer

TRAIN_NET = Path(__file__).resolve().parents[1] / "train_net.py"
torch_save = torch.save


def _save_killed_midway(after_calls):
    calls = 0

    def save(obj, f, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls < after_calls:
            return torch_save(obj, f, *args, **kwargs)
        data = io.BytesIO()
        torch_save(obj, data, *args, **kwargs)
        f.write(data.getvalue()[: len(data.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    return save


def _train_and_record(path, train):
    def train_then_record(self):
        result = train(self)
        torch_save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "iteration": self.iter,
            },
            path,
        )
        return result

    return train_then_record


if __name__ == "__main__":
    if "KILL_DURING_SAVE" in os.environ:
        torch.save = _save_killed_midway(int(os.environ["KILL_DURING_SAVE"]))
    if "RECORD_TRAINED_STATE" in os.environ:
        Trainer.train = _train_and_record(
            os.environ["RECORD_TRAINED_STATE"], Trainer.train
        )
    sys.argv = [str(TRAIN_NET), *sys.argv[1:]]
    runpy.run_path(str(TRAIN_NET), run_name="__main__")
