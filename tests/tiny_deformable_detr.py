"""Tiny Deformable DETR configs and synthetic data shared by the model tests (CPU, seconds)."""

import json
import re
from pathlib import Path

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances
from PIL import Image

from deformable_detr import add_deformable_detr_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
VARIANTS = {
    "multi_scale": "deformable_detr_R50_50ep.yaml",
    "single_scale": "deformable_detr_R50_single_scale_50ep.yaml",
    "single_scale_dc5": "deformable_detr_R50_single_scale_dc5_50ep.yaml",
    "box_refine": "deformable_detr_R50_box_refine_50ep.yaml",
    "two_stage": "deformable_detr_R50_two_stage_50ep.yaml",
    "dino_style": "deformable_detr_R50_dino_style_12ep.yaml",
}
# Rectangle colors (RGB) of the synthetic classes.
COLORS = [(230, 30, 30), (30, 200, 30), (40, 60, 230)]


def tiny_cfg(variant: str = "multi_scale"):
    """The variant's real YAML with a narrow R-50 (all stages kept) and a tiny transformer."""
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(str(CONFIGS / VARIANTS[variant]))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    dd = cfg.MODEL.DEFORMABLE_DETR
    dd.NUM_CLASSES = 3
    dd.HIDDEN_DIM = 32
    dd.NHEADS = 2
    dd.ENC_LAYERS = 1
    dd.DEC_LAYERS = 2
    dd.DIM_FEEDFORWARD = 64
    dd.NUM_QUERIES = 12
    dd.TWO_STAGE.NUM_PROPOSALS = 12
    cfg.INPUT.MIN_SIZE_TRAIN = (64, 80)
    cfg.INPUT.MAX_SIZE_TRAIN = 128
    cfg.INPUT.MIN_SIZE_TEST = 96
    cfg.INPUT.MAX_SIZE_TEST = 160
    cfg.INPUT.DETR_CROP.RESIZE_SIZES = [64, 72]
    cfg.INPUT.DETR_CROP.SIZE = [48, 64]
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def instances(image_size, boxes, classes) -> Instances:
    """Ground truth with XYXY absolute ``boxes`` in an image of ``image_size`` (h, w)."""
    inst = Instances(image_size)
    inst.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.as_tensor(classes, dtype=torch.int64)
    return inst


def rectangles_image(h, w, boxes, classes, rng) -> np.ndarray:
    """(h, w, 3) uint8 RGB: dark noisy background with filled rectangles colored by class."""
    image = rng.integers(0, 40, size=(h, w, 3)).astype(np.uint8)
    for (x0, y0, x1, y1), c in zip(boxes, classes):
        image[int(y0) : int(y1), int(x0) : int(x1)] = COLORS[c]
    return image


def synthetic_scenes(num_images=4, h=64, w=80, seed=0):
    """Images with 1-2 non-overlapping rectangles: list of (image RGB uint8, boxes, classes)."""
    rng = np.random.default_rng(seed)
    scenes = []
    for i in range(num_images):
        boxes, classes = [], []
        for j in range(1 + i % 2):
            x0 = 4 + 40 * j + int(rng.integers(0, 8))
            y0 = int(rng.integers(4, 24))
            bw, bh = int(rng.integers(16, 30)), int(rng.integers(16, 36))
            boxes.append([x0, y0, min(x0 + bw, w - 2), min(y0 + bh, h - 2)])
            classes.append(int((i + j) % len(COLORS)))
        scenes.append((rectangles_image(h, w, boxes, classes, rng), boxes, classes))
    return scenes


def write_coco_dataset(root: Path, num_images=4, seed=0):
    """Write synthetic scenes as PNGs plus a COCO json; returns (json_path, image_dir)."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, (image, boxes, classes) in enumerate(synthetic_scenes(num_images, seed=seed)):
        name = f"{i}.png"
        Image.fromarray(image).save(image_dir / name)
        images.append({"id": i + 1, "file_name": name, "height": image.shape[0],
                       "width": image.shape[1]})
        for (x0, y0, x1, y1), c in zip(boxes, classes):
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": c + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
            })
    categories = [{"id": c + 1, "name": name} for c, name in enumerate(["red", "green", "blue"])]
    json_path = root / "annotations.json"
    json_path.write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}
    ))
    return json_path, image_dir


def official_head_keys(key, cfg):
    """The official names of the plugin's head parameter ``key`` (``class_embed.i.weight``): one
    per decoder layer for a shared head, and again under ``transformer.decoder`` for the heads
    the official decoder holds (every box head with refinement, class heads with two-stage)."""
    dd = cfg.MODEL.DEFORMABLE_DETR
    kind, index, rest = re.match(r"^(class|bbox)_embed\.(\d+)\.(.+)$", key).groups()
    indices = [int(index)] if dd.WITH_BOX_REFINE else range(dd.DEC_LAYERS)
    keys = [f"{kind}_embed.{i}.{rest}" for i in indices]
    if (kind == "bbox" and dd.WITH_BOX_REFINE) or (kind == "class" and dd.TWO_STAGE.ENABLED):
        keys += ["transformer.decoder." + k for k in keys]
    return keys


def randomize_heads_(model, seed: int = 1):
    """Seeded random class weights and box-head last layers, so that scores and boxes depend on
    the image; drawn per decoder layer (then the two-stage encoder), a shared head once per layer,
    the order the recorded detections of the predictor tests were made with."""
    heads = model.heads
    indices = [heads.head_index(layer) for layer in range(model.transformer.decoder.num_layers)]
    if model.two_stage:
        indices.append(heads.encoder_head_index)
    torch.manual_seed(seed)
    for i in indices:
        torch.nn.init.normal_(heads.class_embed[i].weight, std=0.5)
    for i in indices:
        torch.nn.init.normal_(heads.bbox_embed[i].layers[-1].weight, std=0.1)
    return model
