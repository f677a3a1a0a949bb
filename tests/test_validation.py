import logging

import numpy as np
import pytest
from detectron2.structures import BoxMode
from PIL import Image

from deformable_detr.data.validation import (
    drop_duplicate_images,
    find_dataset_problems,
    read_image_or_none,
)


def _record(file_name, boxes, width=64, height=48, category=0):
    annotations = [
        {"bbox": box, "bbox_mode": BoxMode.XYWH_ABS, "category_id": category} for box in boxes
    ]
    return {
        "file_name": str(file_name), "width": width, "height": height, "annotations": annotations
    }


def _messy_dataset(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(good)
    truncated = tmp_path / "truncated.jpg"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (48, 64, 3), np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    return [
        _record(good, [[4, 4, 10, 10]]),
        _record(good, [[4, 4, 10, 10]]),  # listed twice
        _record(tmp_path / "missing.png", [[4, 4, 10, 10]]),
        _record(truncated, [[4, 4, 10, 10]]),
        _record(good, [], width=64),
        _record(good, [[10, 10, -5, 8], [100, 100, 5, 5], [60, 40, 10, 10]]),
        _record(good, [[1, 1, 5, 5]], category=7),
    ]


def test_every_kind_of_problem_is_named_with_its_file(tmp_path):
    problems = find_dataset_problems(_messy_dataset(tmp_path), num_classes=3)
    found = {(p.file_name.rsplit("/", 1)[-1], p.action, p.reason.split(" (")[0]) for p in problems}
    assert ("good.png", "train on first only", "image listed 5 times") in found
    assert ("missing.png", "skip image", "image file does not exist") in found
    assert ("truncated.jpg", "skip image", "image cannot be read") in found
    assert ("good.png", "train as negative", "image has no annotations") in found
    reasons = " | ".join(p.reason for p in problems)
    assert "no area (negative or zero width/height)" in reasons
    assert "lies outside the 64x48 image" in reasons
    assert "crosses the 64x48 image border" in reasons
    assert "class id 7, outside [0, 3)" in reasons
    assert [p.action for p in problems if "class id" in p.reason] == ["error"]


def test_clean_dataset_has_no_problems(tmp_path):
    good = tmp_path / "a.png"
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(good)
    assert find_dataset_problems([_record(good, [[0, 0, 64, 48]])], num_classes=1) == []


def test_duplicates_keep_the_first_record(tmp_path):
    records = [_record("a.png", [[0, 0, 1, 1]]), _record("a.png", []), _record("b.png", [])]
    kept = drop_duplicate_images(records)
    assert [r["file_name"] for r in kept] == ["a.png", "b.png"]
    assert kept[0]["annotations"]


def _mapper_record(tmp_path, boxes_xywh, name="a.png"):
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(tmp_path / name)
    return _record(tmp_path / name, boxes_xywh)


@pytest.mark.parametrize("image_format", ["RGB", "BGR"])
def test_read_images_are_writable(tmp_path, image_format):
    # fvcore's vertical flip warns when handed PIL's read-only buffer
    path = tmp_path / "image.png"
    Image.fromarray(np.arange(48 * 64 * 3, dtype=np.uint8).reshape(48, 64, 3)).save(path)
    image = read_image_or_none(str(path), image_format)
    assert image.flags.writeable and image.shape == (48, 64, 3)


def test_mapper_skips_an_unreadable_image_with_one_warning(tmp_path, caplog):
    from tiny_deformable_detr import tiny_cfg

    from deformable_detr.data.dataset_mapper import DetrDatasetMapper

    truncated = tmp_path / "cut.jpg"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (48, 64, 3), np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    mapper = DetrDatasetMapper(tiny_cfg(), True)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert mapper(_record(tmp_path / "gone.png", [[1, 1, 5, 5]])) is None
            assert mapper(_record(truncated, [[1, 1, 5, 5]])) is None
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([m for m in messages if "gone.png" in m]) == 1
    assert len([m for m in messages if "cut.jpg" in m]) == 1
    assert any("gone.png: skipped, image cannot be read (FileNotFoundError" in m for m in messages)
    assert any("cut.jpg: skipped, image cannot be read (OSError" in m for m in messages)
    with pytest.raises(FileNotFoundError):
        DetrDatasetMapper(tiny_cfg(), False)(_record(tmp_path / "gone.png", []))


def test_mapper_drops_boxes_without_area_instead_of_flipping_them(tmp_path, caplog):
    from tiny_deformable_detr import tiny_cfg

    from deformable_detr.data.dataset_mapper import DetrDatasetMapper

    cfg = tiny_cfg()
    cfg.INPUT.DETR_CROP.ENABLED = False
    record = _mapper_record(tmp_path, [[40, 10, -20, 30], [4, 4, 0, 10], [4, 4, 20, 20]])
    with caplog.at_level(logging.WARNING):
        mapped = DetrDatasetMapper(cfg, True)(record)
    assert len(mapped["instances"]) == 1
    assert "a.png: dropped 2 boxes without area" in caplog.text


def test_duplicates_are_reported_in_one_warning(caplog):
    records = [_record(n, []) for n in ["a.png", "b.png", "a.png", "b.png", "a.png", "c.png"]]
    with caplog.at_level(logging.WARNING):
        kept = drop_duplicate_images(records)
    assert [r["file_name"] for r in kept] == ["a.png", "b.png", "c.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "Dropped 3 records of 2 images listed more than once (a.png, b.png); "
        "training uses the first record of each"
    ]


def test_check_dataset_tool_reports_every_problem_of_a_coco_file(tmp_path, capsys):
    import runpy

    from tiny_training import REPO, write_messy_coco

    spec = write_messy_coco(tmp_path)
    main = runpy.run_path(str(REPO / "tools" / "check_dataset.py"))["main"]
    assert main(["--coco", spec]) == 0
    report = capsys.readouterr().out
    assert "check_coco_0: 8 images, " in report
    for expected in [
        "0.png: image listed 2 times -> train on first only",
        "missing.png: image file does not exist -> skip image",
        "truncated.jpg: image cannot be read",
        "degenerate.png: annotation 0 (box [40.0, 10.0, -20.0, 30.0]) has no area",
        "outside.png: annotation 0 (box [200.0, 200.0, 10.0, 10.0]) lies outside the 80x64 image",
        "outside.png: annotation 1 (box [70.0, 30.0, 30.0, 20.0]) crosses the 80x64 image border",
        "negative.png: image has no annotations -> train as negative",
    ]:
        assert expected in report


@pytest.mark.slow
def test_training_on_a_messy_dataset_runs_to_the_end_with_warnings(tmp_path, caplog):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from tiny_training import tiny_train_cfg, write_messy_coco

    from deformable_detr.data.user_coco import register_user_coco
    from deformable_detr.engine import Trainer

    register_user_coco("robust_messy_train", write_messy_coco(tmp_path / "data"), 3)
    try:
        cfg = tiny_train_cfg(tmp_path / "out", ["robust_messy_train"], max_iter=8, batch=4)
        cfg.INPUT.DETR_CROP.ENABLED = False
        with caplog.at_level(logging.WARNING):
            trainer = Trainer(cfg)
            trainer.resume_or_load(resume=False)
            trainer.train()
    finally:
        DatasetCatalog.remove("robust_messy_train")
        MetadataCatalog.remove("robust_messy_train")
    assert trainer.iter == 8 and (tmp_path / "out" / "model_final.pth").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [w for w in warnings if "listed more than once" in w] == [
        f"Dropped 1 records of 1 images listed more than once ({tmp_path}/data/images/0.png); "
        "training uses the first record of each"
    ]
    for name in ["missing.png", "truncated.jpg"]:
        assert len([w for w in warnings if f"{name}: skipped, image cannot be read" in w]) == 1
    assert len([w for w in warnings if "degenerate.png: dropped 1 boxes without area" in w]) == 1
    assert not [w for w in warnings if "Loss became" in w or "Non-finite" in w]


@pytest.mark.parametrize("filter_empty", [False, True])
def test_training_records_drop_duplicates_and_follow_filter_empty_annotations(
    tmp_path, filter_empty
):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from tiny_training import tiny_train_cfg, write_messy_coco

    from deformable_detr.data.user_coco import register_user_coco
    from deformable_detr.data.validation import training_dataset_dicts

    register_user_coco("robust_messy_records", write_messy_coco(tmp_path), 3)
    try:
        cfg = tiny_train_cfg(tmp_path / "out", ["robust_messy_records"])
        cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = filter_empty
        names = [record["file_name"].rsplit("/", 1)[-1] for record in training_dataset_dicts(cfg)]
    finally:
        DatasetCatalog.remove("robust_messy_records")
        MetadataCatalog.remove("robust_messy_records")
    assert names.count("0.png") == 1
    assert ("negative.png" in names) == (not filter_empty)
