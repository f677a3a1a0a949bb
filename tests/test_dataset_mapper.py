import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image
from tiny_deformable_detr import tiny_cfg

from deformable_detr.data.dataset_mapper import (
    DetrDatasetMapper,
    DetrResizeShortestEdge,
    build_detr_augmentation,
)


def _image_file(tmp_path, mode="RGB", size=(80, 64), name="img.png"):
    w, h = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = np.random.default_rng(0).integers(0, 255, (h, w, channels), dtype=np.uint8)
    path = tmp_path / name
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(path)
    return str(path)


def _record(file_name, annotations, size=(80, 64)):
    return {"file_name": file_name, "width": size[0], "height": size[1], "image_id": 1,
            "annotations": annotations}


def _box(x0, y0, x1, y1, category_id=0, **extra):
    return {"bbox": [x0, y0, x1, y1], "bbox_mode": BoxMode.XYXY_ABS, "category_id": category_id,
            **extra}


def _identity_mapper(cfg, augmentations=()):
    return DetrDatasetMapper(True, augmentations=list(augmentations), image_format="RGB",
                             num_classes=cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES)


def test_train_augmentation_matches_official_recipe():
    cfg = tiny_cfg()
    augs = build_detr_augmentation(cfg, True)
    assert [type(a) for a in augs] == [T.RandomFlip, T.RandomApply, DetrResizeShortestEdge]
    resize_and_crop = augs[1].aug
    assert augs[1].prob == 0.5
    assert [type(a) for a in resize_and_crop.augs] == [DetrResizeShortestEdge, T.RandomCrop]
    assert resize_and_crop.augs[1].crop_type == "absolute_range"
    test_augs = build_detr_augmentation(cfg, False)
    assert len(test_augs) == 1 and test_augs[0].short_edge_length == (96, 96)


def test_train_output_sizes_and_boxes(tmp_path):
    cfg = tiny_cfg()
    mapper = DetrDatasetMapper(cfg, True)
    file_name = _image_file(tmp_path, size=(120, 90))
    record = _record(file_name, [_box(10, 10, 100, 80, 1)], size=(120, 90))
    np.random.seed(0)
    for _ in range(20):
        out = mapper(record)
        image, inst = out["image"], out["instances"]
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        h, w = image.shape[1:]
        assert min(h, w) in (64, 80) and max(h, w) <= 128
        assert inst.image_size == (h, w) and len(inst) <= 1
        if len(inst):
            box = inst.gt_boxes.tensor[0]
            assert (box[2:] > box[:2]).all() and box[2] <= w and box[3] <= h
            assert inst.gt_classes.tolist() == [1]
    assert "annotations" not in out


def test_test_mode_drops_annotations(tmp_path):
    mapper = DetrDatasetMapper(tiny_cfg(), False)
    out = mapper(_record(_image_file(tmp_path), [_box(1, 1, 20, 20)]))
    assert "annotations" not in out and "instances" not in out
    assert out["image"].shape == (3, 96, 120)


def test_zero_area_and_crowd_boxes_dropped(tmp_path):
    mapper = _identity_mapper(tiny_cfg())
    record = _record(_image_file(tmp_path), [
        _box(10, 10, 30, 30, 0), _box(40, 20, 40, 50, 1), _box(5, 5, 20, 20, 2, iscrowd=1),
        _box(50, 10, 70, 10, 2),
    ])
    inst = mapper(record)["instances"]
    assert inst.gt_classes.tolist() == [0]
    assert inst.gt_boxes.tensor.tolist() == [[10, 10, 30, 30]]


def test_boxes_cropped_away_leave_an_image_without_instances(tmp_path):
    mapper = _identity_mapper(tiny_cfg(), [T.CropTransform(0, 0, 32, 32)])
    inst = mapper(_record(_image_file(tmp_path), [_box(50, 40, 75, 60, 0)]))["instances"]
    assert len(inst) == 0 and inst.image_size == (32, 32)
    no_annotations = _record(_image_file(tmp_path), [])
    assert len(_identity_mapper(tiny_cfg())(no_annotations)["instances"]) == 0


def test_class_id_out_of_range_names_the_file(tmp_path):
    file_name = _image_file(tmp_path, name="bad_labels.png")
    mapper = _identity_mapper(tiny_cfg())
    with pytest.raises(ValueError, match=r"bad_labels\.png.*category_id 3.*NUM_CLASSES\); set "
                       "NUM_CLASSES to the number of classes of the dataset$"):
        mapper(_record(file_name, [_box(1, 1, 20, 20, 3)]))


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_images_become_three_channels(tmp_path, mode):
    mapper = DetrDatasetMapper(tiny_cfg(), True)
    out = mapper(_record(_image_file(tmp_path, mode=mode), [_box(10, 10, 60, 50, 0)]))
    assert out["image"].shape[0] == 3 and out["image"].dtype == torch.uint8
    if mode == "L":
        assert torch.equal(out["image"][0], out["image"][1])


@pytest.mark.parametrize(
    "height, width, expected",
    [(480, 640, (800, 1066)), (640, 480, (1066, 800)), (500, 2000, (333, 1332)), (800, 900, None)],
)
def test_resize_matches_the_official_output_size(height, width, expected):
    transform = DetrResizeShortestEdge(800, 1333, "choice").get_transform(
        np.zeros((height, width, 3), np.uint8)
    )
    if expected is None:
        assert isinstance(transform, T.NoOpTransform)
    else:
        assert (transform.new_h, transform.new_w) == expected


@pytest.mark.parametrize(
    "flip, expected",
    [("horizontal", [(True, False)]), ("both", [(True, False), (False, True)]), ("none", [])],
)
def test_random_flip_follows_the_config(flip, expected):
    cfg = tiny_cfg()
    cfg.INPUT.RANDOM_FLIP = flip
    flips = [a for a in build_detr_augmentation(cfg, True) if isinstance(a, T.RandomFlip)]
    assert [(a.horizontal, a.vertical) for a in flips] == expected


def test_unknown_flip_is_a_clear_error():
    cfg = tiny_cfg()
    cfg.INPUT.RANDOM_FLIP = "diagonal"
    with pytest.raises(ValueError, match="INPUT.RANDOM_FLIP must be one of"):
        build_detr_augmentation(cfg, True)


def test_range_resize_draws_every_size_of_the_range():
    resize = DetrResizeShortestEdge((64, 66), 1000, "range")
    np.random.seed(0)
    sizes = {resize.get_transform(np.zeros((90, 120, 3), np.uint8)).new_h for _ in range(60)}
    assert sizes == {64, 65, 66}


def test_crop_branch_follows_the_config():
    cfg = tiny_cfg()
    cfg.INPUT.DETR_CROP.PROB = 0.3
    random_apply = build_detr_augmentation(cfg, True)[1]
    assert random_apply.prob == 0.3
    resize = random_apply.aug.augs[0]
    # One of RESIZE_SIZES, never a size between them.
    assert not resize.is_range and list(resize.short_edge_length) == [64, 72]


def test_mapper_trains_unless_told_otherwise(tmp_path):
    out = DetrDatasetMapper(tiny_cfg())(_record(_image_file(tmp_path), [_box(10, 10, 30, 30)]))
    assert "instances" in out


def test_test_mode_reads_in_the_input_format(tmp_path):
    cfg = tiny_cfg()
    cfg.INPUT.FORMAT = "BGR"
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 1000  # the file's size: no resize
    file_name = _image_file(tmp_path)
    out = DetrDatasetMapper(cfg, False)(_record(file_name, [_box(1, 1, 20, 20)]))
    rgb = np.asarray(Image.open(file_name))
    assert np.array_equal(out["image"].numpy(), rgb[:, :, ::-1].transpose(2, 0, 1))


def test_records_without_annotations(tmp_path):
    record = _record(_image_file(tmp_path), [])
    del record["annotations"]
    assert "instances" not in DetrDatasetMapper(tiny_cfg(), False)(record)
    assert len(_identity_mapper(tiny_cfg())(record)["instances"]) == 0


def test_segmentation_and_keypoints_are_ignored(tmp_path):
    box = _box(10, 10, 30, 30, segmentation=[[10, 10, 30, 10, 30, 30]], keypoints=[15, 15, 2])
    mapper = _identity_mapper(tiny_cfg(), [T.HFlipTransform(80)])
    inst = mapper(_record(_image_file(tmp_path), [box]))["instances"]
    assert set(inst.get_fields()) == {"gt_boxes", "gt_classes"}
    assert inst.gt_boxes.tensor.tolist() == [[50, 10, 70, 30]]


def test_degenerate_box_warning_names_the_file(tmp_path, caplog):
    file_name = _image_file(tmp_path, name="thin_box.png")
    _identity_mapper(tiny_cfg())(_record(file_name, [_box(10, 10, 10, 30), _box(1, 1, 9, 9)]))
    assert "thin_box.png" in caplog.text
