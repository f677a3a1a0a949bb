"""Tiny training runs for the robustness tests: configs, a messy COCO dataset, train_net.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image
from tiny_deformable_detr import REPO, synthetic_scenes, tiny_cfg, write_coco_dataset

TRAIN_NET = REPO / "train_net.py"
PYTHON = sys.executable


def tiny_train_cfg(output_dir, dataset_names=(), max_iter=4, checkpoint_period=100, batch=2):
    """``tiny_cfg()`` set up to train ``max_iter`` iterations on CPU without evaluation."""
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = tuple(dataset_names)
    cfg.DATASETS.TEST = ()
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.CHECKPOINT_PERIOD = checkpoint_period
    cfg.TEST.EVAL_PERIOD = 0
    cfg.SEED = 0
    return cfg


def write_config(cfg, path):
    """Writes ``cfg`` as a YAML file that ``train_net.py --config-file`` reads; returns the path."""
    Path(path).write_text(cfg.dump())
    return str(path)


def coco_spec(root, num_images=4):
    """A clean synthetic COCO dataset under ``root`` as ``"ann.json:image_dir"``."""
    json_path, image_dir = write_coco_dataset(Path(root), num_images=num_images)
    return f"{json_path}:{image_dir}"


def write_messy_coco(root):
    """A COCO dataset with every problem of ``validation.py``; returns ``"ann.json:image_dir"``.

    Images: two clean ones; ``missing.png`` (no file); ``truncated.jpg``; ``degenerate.png``
    (one box of negative width, one good box); ``outside.png`` (one box outside the image, one
    crossing its border, one good); ``negative.png`` (no annotations); ``0.png`` listed twice.
    """
    root = Path(root)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    scenes = synthetic_scenes(5, h=64, w=80)
    images, annotations = [], []

    def add(name, boxes_xywh, category=1):
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": name, "height": 64, "width": 80})
        for box in boxes_xywh:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                "bbox": box, "area": abs(box[2] * box[3]), "iscrowd": 0,
            })

    names = ["0.png", "1.png", "degenerate.png", "outside.png", "negative.png"]
    for name, (image, _, _) in zip(names, scenes):
        Image.fromarray(image).save(image_dir / name)
    Image.fromarray(scenes[0][0]).save(image_dir / "truncated.jpg")
    data = (image_dir / "truncated.jpg").read_bytes()
    (image_dir / "truncated.jpg").write_bytes(data[: len(data) // 2])

    for name, (_, boxes, classes) in zip(names[:2], scenes):
        add(name, [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in boxes], classes[0] + 1)
    add("missing.png", [[4, 4, 20, 20]])
    add("truncated.jpg", [[4, 4, 20, 20]])
    add("degenerate.png", [[40, 10, -20, 30], [4, 4, 20, 20]])
    add("outside.png", [[200, 200, 10, 10], [70, 30, 30, 20], [4, 4, 20, 20]])
    add("negative.png", [])
    add("0.png", [[4, 4, 20, 20]])

    categories = [{"id": c + 1, "name": name} for c, name in enumerate(["red", "green", "blue"])]
    json_path = root / "annotations.json"
    json_path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return f"{json_path}:{image_dir}"


def run_train_net(args, log_file, script=TRAIN_NET, **env):
    """Starts ``script args`` (``train_net.py`` or a wrapper of it) on one CPU thread with the
    extra environment variables ``env``, its output going to the open ``log_file`` (a pipe nobody
    reads would block it); returns the Popen."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **env)
    return subprocess.Popen(
        [PYTHON, str(script), *args], cwd=REPO, env=env, stdout=log_file,
        stderr=subprocess.STDOUT,
    )
