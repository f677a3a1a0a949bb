"""Builtin tree-crown datasets ``trees_train`` and ``trees_val`` (one class, "tree").

The source is the set of aerial RGB photos with Pascal-VOC boxes shipped inside the
``deepforest`` PyPI package (``deepforest/data/``). Large photos are cut into overlapping tiles;
every photo is split by image region (a horizontal cut) so that no ``trees_val`` tile shares a
pixel with ``trees_train``. The tiles and one COCO JSON per split are written once into
``$DETECTRON2_DATASETS/trees/`` (default ``./datasets/trees``) and loaded with Detectron2's
``load_coco_json``, so evaluation uses ``COCOEvaluator``.
"""
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Dict, List, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from tqdm import tqdm

__all__ = ["TreeSource", "TREE_SOURCES", "prepare_trees", "register_trees", "deepforest_data_dir"]

logger = logging.getLogger(__name__)

# Bump when the tiling or the JSON layout changes, so caches written by older code are rebuilt.
CACHE_VERSION = 1
INSTALL_HINT = "run `make setup` (or `pip install --no-deps deepforest==2.1.0`)"


@dataclass(frozen=True)
class TreeSource:
    """One annotated photo and the rows ``[y0, y1)`` of it that belong to each split."""

    image: str
    annotation: str
    split_rows: Tuple[Tuple[str, float, float], ...]


# Val takes a bottom band of each large photo (600 rows of the 2299x2472 one, 400 rows of the
# 1249x1035 one); the two 400x400 photos are train only. Fractions are of the photo height.
TREE_SOURCES = (
    TreeSource(
        "2019_YELL_2_528000_4978000_image_crop2.png",
        "2019_YELL_2_528000_4978000_image_crop2.xml",
        (("train", 0.0, 1872 / 2472), ("val", 1872 / 2472, 1.0)),
    ),
    TreeSource(
        "2019_YELL_2_541000_4977000_image_crop.png",
        "2019_YELL_2_541000_4977000_image_crop.xml",
        (("train", 0.0, 635 / 1035), ("val", 635 / 1035, 1.0)),
    ),
    TreeSource("OSBS_029.png", "OSBS_029.xml", (("train", 0.0, 1.0),)),
    TreeSource("SOAP_061.png", "SOAP_061.xml", (("train", 0.0, 1.0),)),
)
SPLITS = ("train", "val")


def deepforest_data_dir() -> str:
    """The ``data/`` folder of the installed ``deepforest`` package, found without importing it
    (importing it pulls in heavy optional dependencies that are not installed)."""
    spec = importlib.util.find_spec("deepforest")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"The tree photos come from the `deepforest` package: {INSTALL_HINT}.")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _read_voc_boxes(path: str) -> np.ndarray:
    """All boxes of a Pascal-VOC XML file as (K, 4) float XYXY; every label counts as a tree."""
    root = ET.parse(path).getroot()
    boxes = [
        [float(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")]
        for obj in root.iter("object")
    ]
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _tile_starts(length: int, tile: int, stride: int) -> List[int]:
    """Tile origins covering ``[0, length)``; the last tile is aligned to the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def _crop_boxes(
    boxes: np.ndarray, x0: int, y0: int, x1: int, y1: int, min_visible: float, min_side: float
) -> np.ndarray:
    """Boxes clipped to the window ``[x0, x1) x [y0, y1)`` in window coordinates, keeping those
    with at least ``min_visible`` of their area and ``min_side`` pixels per side left."""
    clipped = boxes.copy()
    clipped[:, 0::2] = boxes[:, 0::2].clip(x0, x1)
    clipped[:, 1::2] = boxes[:, 1::2].clip(y0, y1)
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = (w >= min_side) & (h >= min_side) & (w * h >= min_visible * area)
    return clipped[keep] - np.array([x0, y0, x0, y0], dtype=np.float64)


def _fingerprint(data_dir: str, *tiling_params) -> str:
    """Hash of the cache version, tiling parameters and source files (name and size)."""
    parts = [f"v{CACHE_VERSION}", repr(tiling_params)]
    for src in TREE_SOURCES:
        for name in (src.image, src.annotation):
            parts.append(f"{name}:{os.path.getsize(os.path.join(data_dir, name))}")
        parts.append(repr(src.split_rows))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _cache_is_valid(cache_dir: str, fingerprint: str) -> bool:
    """True when the manifest matches ``fingerprint`` and every listed file has its size."""
    try:
        with open(os.path.join(cache_dir, "manifest.json")) as f:
            manifest = json.load(f)
        if manifest.get("fingerprint") != fingerprint:
            return False
        return all(
            os.path.getsize(os.path.join(cache_dir, name)) == size
            for name, size in manifest["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _write_split_tiles(
    data_dir: str, out_dir: str, tile_size: int, overlap: int, min_visible: float, min_side: float
) -> Dict[str, dict]:
    """Cut every source photo into tiles under ``out_dir/images`` and return one COCO dict per
    split."""
    coco = {
        split: {
            "info": {"description": f"deepforest tree crowns, {split} tiles"},
            "images": [],
            "annotations": [],
            "categories": [{"id": 1, "name": "tree"}],
        }
        for split in SPLITS
    }
    os.makedirs(os.path.join(out_dir, "images"))
    stride = tile_size - overlap
    for src in tqdm(TREE_SOURCES, desc="[trees] tiling photos", unit="photo"):
        img = cv2.imread(os.path.join(data_dir, src.image), cv2.IMREAD_COLOR)
        if img is None:
            raise RuntimeError(f"Cannot read {src.image} in {data_dir}: {INSTALL_HINT}.")
        height, width = img.shape[:2]
        boxes = _read_voc_boxes(os.path.join(data_dir, src.annotation))
        for split, f0, f1 in src.split_rows:
            rows = (round(f0 * height), round(f1 * height))
            _tile_region(
                img, boxes, os.path.splitext(src.image)[0], split, rows, coco[split], out_dir,
                tile_size, stride, min_visible, min_side,
            )
    return coco


def _tile_region(
    img: np.ndarray,
    boxes: np.ndarray,
    stem: str,
    split: str,
    rows: Tuple[int, int],
    coco_split: dict,
    out_dir: str,
    tile_size: int,
    stride: int,
    min_visible: float,
    min_side: float,
) -> None:
    """Tile rows ``[rows[0], rows[1])`` of ``img`` (H, W, 3) into ``out_dir/images/<split>/`` and
    append the tiles and their boxes to ``coco_split``."""
    r0, r1 = rows
    width = img.shape[1]
    os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
    for ty in _tile_starts(r1 - r0, tile_size, stride):
        for x0 in _tile_starts(width, tile_size, stride):
            y0 = r0 + ty
            y1, x1 = min(y0 + tile_size, r1), min(x0 + tile_size, width)
            name = f"{split}/{stem}_x{x0}_y{y0}.png"
            cv2.imwrite(os.path.join(out_dir, "images", name), img[y0:y1, x0:x1])
            image_id = len(coco_split["images"]) + 1
            coco_split["images"].append(
                {"id": image_id, "file_name": name, "height": y1 - y0, "width": x1 - x0}
            )
            # Tiles lie inside their split's rows, so a crown cut by the split line is treated
            # like one cut by a tile border.
            for b in _crop_boxes(boxes, x0, y0, x1, y1, min_visible, min_side):
                w, h = float(b[2] - b[0]), float(b[3] - b[1])
                coco_split["annotations"].append(
                    {
                        "id": len(coco_split["annotations"]) + 1,
                        "image_id": image_id,
                        "category_id": 1,
                        "bbox": [float(b[0]), float(b[1]), w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )


def prepare_trees(
    root: str = None,
    tile_size: int = 400,
    overlap: int = 100,
    min_visible: float = 0.5,
    min_side: float = 4.0,
    data_dir: str = None,
) -> str:
    """Write the tiles and COCO JSONs once and return the cache folder ``<root>/trees``.

    A cache whose manifest fingerprint (cache version, tiling parameters, source files) or file
    sizes do not match is rebuilt. The new cache is written into a temporary sibling folder and
    renamed into place, so an interrupted run never leaves a half-written cache behind.

    Args:
        root: datasets folder; default ``$DETECTRON2_DATASETS`` or ``datasets``.
        tile_size: tile side in pixels. overlap: pixels shared by neighbouring tiles.
        min_visible: smallest fraction of a box's area that must stay inside a tile to keep it.
        min_side: smallest side in pixels of a kept, clipped box.
        data_dir: folder with the source photos; default the ``deepforest`` package's ``data/``.
    """
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size={tile_size}), got {overlap}")
    root = root or os.getenv("DETECTRON2_DATASETS", "datasets")
    data_dir = data_dir or deepforest_data_dir()
    for src in TREE_SOURCES:
        for name in (src.image, src.annotation):
            if not os.path.isfile(os.path.join(data_dir, name)):
                raise RuntimeError(f"Missing tree data file {name} in {data_dir}: {INSTALL_HINT}.")
    cache_dir = os.path.join(root, "trees")
    fingerprint = _fingerprint(data_dir, tile_size, overlap, min_visible, min_side)
    if _cache_is_valid(cache_dir, fingerprint):
        return cache_dir

    logger.info(f"Preparing the tree-crown tiles in {cache_dir} ...")
    os.makedirs(root, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".trees-tmp-", dir=root)
    try:
        coco = _write_split_tiles(data_dir, tmp_dir, tile_size, overlap, min_visible, min_side)
        for split in SPLITS:
            with open(os.path.join(tmp_dir, f"{split}.json"), "w") as f:
                json.dump(coco[split], f)
        files = {}
        for dirpath, _, filenames in os.walk(tmp_dir):
            for fn in filenames:
                path = os.path.join(dirpath, fn)
                files[os.path.relpath(path, tmp_dir)] = os.path.getsize(path)
        with open(os.path.join(tmp_dir, "manifest.json"), "w") as f:
            json.dump({"fingerprint": fingerprint, "files": files}, f)
        if os.path.lexists(cache_dir):
            shutil.rmtree(cache_dir)
        os.rename(tmp_dir, cache_dir)
    finally:
        if os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir)
    return cache_dir


def _load_split(split: str, root: str) -> List[dict]:
    cache_dir = prepare_trees(root)
    return load_coco_json(
        os.path.join(cache_dir, f"{split}.json"),
        os.path.join(cache_dir, "images"),
        f"trees_{split}",
    )


def register_trees(root: str = None) -> None:
    """Register ``trees_train`` and ``trees_val``; the tiles are prepared on first use."""
    root = root or os.getenv("DETECTRON2_DATASETS", "datasets")
    cache_dir = os.path.join(root, "trees")
    for split in SPLITS:
        name = f"trees_{split}"
        DatasetCatalog.register(name, lambda split=split: _load_split(split, root))
        MetadataCatalog.get(name).set(
            json_file=os.path.join(cache_dir, f"{split}.json"),
            image_root=os.path.join(cache_dir, "images"),
            thing_classes=["tree"],
            evaluator_type="coco",
        )


register_trees()
