"""End-to-end: `make demo`'s script on a tiny config, then predict.py on a photo (slow)."""
import json
import os
import re
import subprocess
import sys

import cv2
import pytest
import yaml

from deformable_detr.data.trees import deepforest_data_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "demo", "deformable_detr_mnv2_trees.yaml")
# A model small enough to train 60 iterations in seconds; the demo's structure otherwise.
TINY = [
    "MODEL.DEFORMABLE_DETR.HIDDEN_DIM", "64", "MODEL.DEFORMABLE_DETR.NHEADS", "4",
    "MODEL.DEFORMABLE_DETR.DIM_FEEDFORWARD", "128", "MODEL.DEFORMABLE_DETR.ENC_LAYERS", "1",
    "MODEL.DEFORMABLE_DETR.DEC_LAYERS", "2", "MODEL.DEFORMABLE_DETR.NUM_QUERIES", "50",
    "MODEL.DEFORMABLE_DETR.TWO_STAGE.NUM_PROPOSALS", "50",
    "INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MIN_SIZE_TEST", "256",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "5e-4", "SOLVER.MAX_ITER", "60",
    "SOLVER.STEPS", "()", "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0", "SEED", "1",
]


def _run(args, env):
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    # One thread: on a busy machine, OpenMP spin-waits of two threads slow training down a lot.
    env = dict(os.environ, DETECTRON2_DATASETS=str(root / "datasets"), OMP_NUM_THREADS="1")
    out = root / "output"
    # Threshold 0: the 60-iteration model scores low, yet its detections are measured and drawn.
    stdout = _run(
        ["tools/trees_demo.py", "--config-file", CONFIG, "--output", str(out), "--num-vis", "2",
         "--vis-threshold", "0", *TINY],
        env,
    )
    return out, stdout, env


@pytest.mark.slow
def test_short_training_lowers_loss_and_writes_outputs(demo_run):
    out, stdout, _ = demo_run
    with open(out / "metrics.json") as f:
        records = [json.loads(line) for line in f]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert len(losses) == 3  # written every 20 iterations
    assert losses[-1] < 0.9 * losses[0], losses
    assert any("bbox/AP50" in r for r in records)
    assert "AP50 =" in stdout
    assert (out / "model_final.pth").is_file()
    assert cv2.imread(str(out / "metrics.png")) is not None
    drawn = sorted(os.listdir(out / "predictions"))
    assert len(drawn) == 2
    tile = cv2.imread(str(out / "predictions" / drawn[0]))
    # titled prediction | gap | titled truth, the titles on a 28-pixel white band
    assert tile.shape[0] == 28 + 400 and tile.shape[1] == 2 * 400 + 8
    assert (tile[:28, :400] < 128).any() and (tile[:28, 408:] < 128).any()  # text drawn
    assert (tile[:28, :400] != tile[:28, 408:]).any()  # different titles
    # the whole-job ETA every 20 iterations; no periodic evaluation here, the final one counts
    assert "[demo] iteration 20/60: ETA of the whole job" in stdout
    assert "+ 1 evaluation" in stdout
    assert re.search(r"inside the detected box, averaged over \d+ detections scoring >= 0.0: "
                     r"level 0 [\d.]+%, level 1 [\d.]+%, level 2 [\d.]+%, all levels", stdout)
    assert "the share of its sampling points inside (unweighted): level 0" in stdout
    assert re.search(r"the same for the untrained model \(its top \d+ per image\): level 0", stdout)
    sampling = sorted(os.listdir(out / "sampling"))
    assert len(sampling) == 4 and sampling[0].endswith("_det0.png")  # 2 tiles, 2 detections
    assert max(cv2.imread(str(out / "sampling" / sampling[0])).shape) == 400  # zoomed


@pytest.mark.slow
def test_predict_py_writes_image(demo_run, tmp_path):
    out, _, env = demo_run
    photo = os.path.join(deepforest_data_dir(), "OSBS_029.png")
    _run(
        ["predict.py", "--config-file", CONFIG, "--input", photo, "--output", str(tmp_path),
         "--confidence-threshold", "0.0", "--opts", "MODEL.WEIGHTS",
         str(out / "model_final.pth"), *TINY],
        env,
    )
    drawn = cv2.imread(str(tmp_path / "OSBS_029.png"))
    assert drawn is not None and drawn.shape == cv2.imread(photo).shape
    assert (drawn != cv2.imread(photo)).any()  # boxes were drawn


def test_demo_seed_is_fixed_by_the_config_and_varied_from_make():
    with open(CONFIG) as f:
        assert yaml.safe_load(f)["SEED"] >= 0  # Detectron2 draws a random seed when negative
    make = ["make", "--dry-run", "--always-make", "demo"]
    fixed = subprocess.run(make, cwd=REPO, capture_output=True, text=True, check=True).stdout
    varied = subprocess.run(
        [*make, "SEED=7"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    run = [line for line in fixed.splitlines() if "tools/trees_demo.py" in line]
    assert len(run) == 1 and "SEED" not in run[0]
    assert [line for line in varied.splitlines() if "tools/trees_demo.py" in line] == [
        run[0].rstrip() + " SEED 7"
    ]
