import re
import signal
import time

import pytest
import torch
from tiny_training import coco_spec, run_train_net, tiny_train_cfg, write_config

MAX_ITER = 40


def _train_args(tmp_path):
    cfg = tiny_train_cfg(tmp_path / "out", max_iter=MAX_ITER, checkpoint_period=4)
    config = write_config(cfg, tmp_path / "config.yaml")
    return ["--config-file", config, "--train-coco", coco_spec(tmp_path / "data")]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_reaches_the_final_iteration(tmp_path):
    args = _train_args(tmp_path)
    out = tmp_path / "out"
    with open(tmp_path / "first.log", "w") as log_file:
        first = run_train_net(args, log_file)
        deadline = time.monotonic() + 180
        while not (out / "last_checkpoint").exists() and first.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    first_log = (tmp_path / "first.log").read_text()
    assert first.returncode == -signal.SIGKILL, first_log[-3000:]
    assert not (out / "model_final.pth").exists()

    with open(tmp_path / "second.log", "w") as log_file:
        second = run_train_net([*args, "--resume"], log_file)
        second.wait(timeout=300)
    log = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, log[-3000:]
    start = int(re.search(r"Starting training from iteration (\d+)", log).group(1))
    assert 0 < start < MAX_ITER and start % 4 == 0
    final = torch.load(out / "model_final.pth", weights_only=False)
    assert final["iteration"] == MAX_ITER - 1
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
