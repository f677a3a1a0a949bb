"""End-to-end: `make demo`'s script on a tiny config, then predict.py on a photo (slow)."""
import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from tiny_deformable_detr import randomize_heads_

from deformable_detr import add_deformable_detr_config
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


# The detections above score 0.3 of the seeded model of _seeded_weights on OSBS_029.png
# (400x400), recorded from a run: XYXY boxes in the photo's pixels.
OSBS_029_DETECTIONS = [
    [225.684616, 258.944305, 258.394501, 302.818359],
    [93.500534, 208.921341, 125.533150, 252.163223],
    [241.968063, 192.082733, 256.673187, 216.265350],
]


# The known detections come from weights seeded with these modules: with denoising's label
# embedding (training only) in the model, the same seed gives other weights and no detections.
SEEDED_STRUCTURE = [
    "MODEL.MOBILENET_V2.PRETRAINED", "False", "MODEL.DEFORMABLE_DETR.DENOISING.ENABLED", "False",
]


def _seeded_weights(path):
    """The demo's structure (TINY) with seeded random weights and heads random enough that
    scores and boxes depend on the image; written as a checkpoint for MODEL.WEIGHTS."""
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list([*TINY, *SEEDED_STRUCTURE])
    torch.manual_seed(0)
    model = build_model(cfg)
    randomize_heads_(model, seed=1)
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def _band(mask, box, width):
    """Pixels of ``mask`` within ``width`` of the outline of ``box``."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    band = np.zeros_like(mask)
    band[max(y0 - width, 0) : y1 + width + 1, max(x0 - width, 0) : x1 + width + 1] = True
    band[y0 + width + 1 : y1 - width, x0 + width + 1 : x1 - width] = False
    return mask[band]


@pytest.mark.slow
def test_predict_py_draws_the_known_detections(tmp_path):
    photo = os.path.join(deepforest_data_dir(), "OSBS_029.png")
    weights = _seeded_weights(tmp_path / "seeded.pth")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    stdout = _run(
        ["predict.py", "--config-file", CONFIG, "--input", photo, "--output", str(tmp_path),
         "--confidence-threshold", "0.3", "--opts", "MODEL.WEIGHTS", weights, *TINY,
         *SEEDED_STRUCTURE],
        env,
    )
    assert f"OSBS_029.png: {len(OSBS_029_DETECTIONS)} detections" in stdout
    original = cv2.imread(photo)
    drawn = cv2.imread(str(tmp_path / "OSBS_029.png"))
    assert drawn.shape == original.shape
    changed = (drawn != original).any(-1)
    # Every known box is outlined: nearly all pixels along its edges were drawn over ...
    for box in OSBS_029_DETECTIONS:
        assert _band(changed, box, width=1).mean() > 0.9, box
    # ... and nothing else: away from the boxes and their labels (drawn above a box's top left
    # corner, or below a small box) the photo is untouched.
    near_a_box = np.zeros_like(changed)
    for x0, y0, x1, y1 in OSBS_029_DETECTIONS:
        near_a_box[max(int(y0) - 20, 0) : int(y1) + 20, max(int(x0) - 4, 0) : int(x1) + 60] = True
    assert not changed[~near_a_box].any()


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
