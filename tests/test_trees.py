import hashlib
import json
import os
import re

import cv2
import pytest
from detectron2.data import MetadataCatalog
from detectron2.data.datasets import load_coco_json

from deformable_detr.data import trees

TILE_NAME = re.compile(r"(?P<split>train|val)/(?P<stem>.+)_x(?P<x>\d+)_y(?P<y>\d+)\.png")


def _digest(cache_dir):
    """sha256 of every file of a cache, by relative path."""
    out = {}
    for dirpath, _, filenames in os.walk(cache_dir):
        for fn in filenames:
            path = os.path.join(dirpath, fn)
            with open(path, "rb") as f:
                out[os.path.relpath(path, cache_dir)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return trees.prepare_trees(str(tmp_path_factory.mktemp("datasets")))


def _coco(cache_dir, split):
    with open(os.path.join(cache_dir, f"{split}.json")) as f:
        return json.load(f)


def test_deterministic_and_reuses_cache(cache, tmp_path, monkeypatch):
    again = trees.prepare_trees(str(tmp_path))
    assert _digest(again) == _digest(cache)
    assert {len(_coco(cache, s)["images"]) for s in ("train", "val")} == {58, 20}

    def fail(*args, **kwargs):
        raise AssertionError("a valid cache must not be rebuilt")

    monkeypatch.setattr(trees, "_write_split_tiles", fail)
    assert trees.prepare_trees(str(tmp_path)) == again


@pytest.mark.parametrize("damage", ["truncate_tile", "garbage_json", "stale_version"])
def test_corrupt_or_stale_cache_is_rebuilt(cache, tmp_path, monkeypatch, damage):
    cache_dir = trees.prepare_trees(str(tmp_path))
    if damage == "truncate_tile":
        tile = os.path.join(cache_dir, "images", _coco(cache_dir, "val")["images"][0]["file_name"])
        with open(tile, "r+b") as f:
            f.truncate(100)
    elif damage == "garbage_json":
        with open(os.path.join(cache_dir, "manifest.json"), "w") as f:
            f.write("{not json")
    else:
        monkeypatch.setattr(trees, "CACHE_VERSION", trees.CACHE_VERSION + 1)
    assert trees.prepare_trees(str(tmp_path)) == cache_dir
    if damage == "stale_version":
        monkeypatch.undo()
        assert trees.prepare_trees(str(tmp_path)) == cache_dir
    assert _digest(cache_dir) == _digest(cache)
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".trees-tmp-")]


def test_boxes_inside_tiles(cache):
    for split in ("train", "val"):
        coco = _coco(cache, split)
        sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
        assert coco["annotations"], split
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            width, height = sizes[ann["image_id"]]
            assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
            assert w >= 4 and h >= 4
        for im in coco["images"]:
            tile = cv2.imread(os.path.join(cache, "images", im["file_name"]))
            assert tile.shape[:2] == (im["height"], im["width"])


def test_val_tiles_do_not_overlap_train_pixels(cache):
    rows = {}  # (photo, split) -> list of row intervals of its tiles
    for split in ("train", "val"):
        for im in _coco(cache, split)["images"]:
            m = TILE_NAME.fullmatch(im["file_name"])
            assert m and m["split"] == split
            y = int(m["y"])
            rows.setdefault((m["stem"], split), []).append((y, y + im["height"]))
    for src in trees.TREE_SOURCES:
        stem = os.path.splitext(src.image)[0]
        train_end = max(end for _, end in rows[(stem, "train")])
        for start, _ in rows.get((stem, "val"), []):
            assert start >= train_end, (stem, start, train_end)
    assert {stem for stem, split in rows if split == "val"} == {
        "2019_YELL_2_528000_4978000_image_crop2",
        "2019_YELL_2_541000_4977000_image_crop",
    }
    # Tile pixels are the named crop of the source photo.
    im = _coco(cache, "val")["images"][3]
    m = TILE_NAME.fullmatch(im["file_name"])
    photo = cv2.imread(os.path.join(trees.deepforest_data_dir(), m["stem"] + ".png"))
    x, y = int(m["x"]), int(m["y"])
    tile = cv2.imread(os.path.join(cache, "images", im["file_name"]))
    assert (tile == photo[y : y + im["height"], x : x + im["width"]]).all()


def test_loads_through_detectron2(cache):
    dicts = load_coco_json(
        os.path.join(cache, "val.json"), os.path.join(cache, "images"), "trees_val"
    )
    assert len(dicts) == 20 and all(os.path.isfile(d["file_name"]) for d in dicts)
    assert sum(len(d["annotations"]) for d in dicts) == len(_coco(cache, "val")["annotations"])
    meta = MetadataCatalog.get("trees_val")
    assert meta.thing_classes == ["tree"] and meta.evaluator_type == "coco"


def test_missing_data_gives_one_line_hint(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError) as e:
        trees.prepare_trees(str(tmp_path / "out"), data_dir=str(tmp_path))
    assert "make setup" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(trees.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"deepforest.*make setup"):
        trees.prepare_trees(str(tmp_path / "out"))
