import os
import subprocess

import pytest
import torch
from detectron2.modeling import build_model
from tiny_deformable_detr import tiny_cfg
from tiny_training import PYTHON, REPO, coco_spec, tiny_train_cfg, write_config


@pytest.mark.slow
def test_two_gloo_processes_train_to_identical_parameters(tmp_path):
    cfg = tiny_train_cfg(tmp_path / "out", max_iter=3, batch=2)
    config = write_config(cfg, tmp_path / "config.yaml")
    spec = coco_spec(tmp_path / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [PYTHON, str(REPO / "tests" / "distributed_worker.py"), config, spec, str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pth", weights_only=False) for r in range(2)]

    assert [(r["ddp"], r["world_size"]) for r in ranks] == [(True, 2), (True, 2)]
    before, after = ranks[0]["before"], ranks[0]["after"]
    assert any(not torch.equal(before[k], after[k]) for k in after), "training changed nothing"
    for name, value in after.items():
        assert torch.equal(value, ranks[1]["after"][name]), name
    assert (tmp_path / "out" / "model_final.pth").exists()

    # Losses are normalized by the number of boxes averaged over ranks: (1 + 2) / 2.
    criterion = build_model(tiny_cfg()).criterion
    for rank in ranks:
        check = rank["criterion"]
        local = criterion(check["outputs"], check["targets"])
        scale = len(check["targets"][0]["labels"]) / 1.5
        for name, value in check["losses"].items():
            torch.testing.assert_close(value, local[name] * scale)
