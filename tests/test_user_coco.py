import json
import logging

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from PIL import Image

from deformable_detr.config import add_deformable_detr_config
from deformable_detr.data.user_coco import (
    add_user_coco_arguments,
    apply_user_coco,
    register_user_coco,
    setup_user_coco,
)
from deformable_detr.errors import UserInputError


@pytest.fixture
def coco_spec(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    ann = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 30}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 5, 6], "area": 30,
             "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "car"}, {"id": 3, "name": "bike"},
                       {"id": 9, "name": "bus"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))
    Image.new("RGB", (30, 20)).save(images / "a.jpg")
    return f"{path}:{images}"


def test_class_count_mismatch_is_a_clear_error(coco_spec):
    with pytest.raises(ValueError, match=r"3 categories.*NUM_CLASSES is 2.*NUM_CLASSES 3"):
        register_user_coco("coco_user_test_mismatch", coco_spec, 2, "NUM_CLASSES")
    assert "coco_user_test_mismatch" not in DatasetCatalog.list()


def test_registers_and_sets_config(coco_spec):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    apply_user_coco(cfg, [coco_spec], [coco_spec], 3)
    apply_user_coco(cfg, [coco_spec], [coco_spec], 3)  # registering again replaces
    assert cfg.DATASETS.TRAIN == ("coco_user_train_0",)
    assert cfg.DATASETS.TEST == ("coco_user_val_0",)
    dicts = DatasetCatalog.get("coco_user_train_0")
    assert dicts[0]["annotations"][0]["category_id"] == 1  # "car" (id 7) after "bike" (id 3)
    assert MetadataCatalog.get("coco_user_val_0").thing_classes == ["bike", "car", "bus"]


def test_bad_specs(tmp_path, coco_spec):
    with pytest.raises(ValueError, match="annotations.json:image_dir"):
        register_user_coco("x", "ann.json", 1)
    with pytest.raises(UserInputError, match="annotation file"):
        register_user_coco("x", f"{tmp_path}/nope.json:{tmp_path}", 1)
    with pytest.raises(UserInputError, match="image folder"):
        register_user_coco("x", coco_spec.split(":")[0] + f":{tmp_path}/nope", 3)


def test_command_line_flags(coco_spec):
    parser = add_user_coco_arguments(default_argument_parser())
    argv = ["--config-file", "x.yaml", "--train-coco", coco_spec, "--val-coco", coco_spec]
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    args = parser.parse_args(argv + ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3"])
    assert args.train_coco == [coco_spec] and args.opts[-1] == "3"
    with pytest.raises(ValueError, match=r"DEFORMABLE_DETR.NUM_CLASSES is 80.*NUM_CLASSES 3`"):
        setup_user_coco(cfg, args)
    cfg.merge_from_list(args.opts)
    cfg.DATASETS.COCO_TRAIN = []
    cfg.DATASETS.COCO_TEST = []
    setup_user_coco(cfg, args)
    assert cfg.DATASETS.COCO_TRAIN == [coco_spec]
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == (("coco_user_train_0",), ("coco_user_val_0",))


def test_truncated_annotation_file_names_the_file_line_and_column(coco_spec):
    json_file = coco_spec.rpartition(":")[0]
    text = open(json_file).read()
    with open(json_file, "w") as f:
        f.write(text[: len(text) // 2])
    message = rf"{json_file}.* not valid JSON: .* line 1, column \d+"
    with pytest.raises(UserInputError, match=message):
        register_user_coco("coco_user_truncated", coco_spec, 3)


def test_image_folder_without_the_listed_images_is_an_error_naming_both(coco_spec, tmp_path):
    json_file = coco_spec.rpartition(":")[0]
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    with pytest.raises(UserInputError, match=rf"None of the 1 images listed in '{json_file}' .*"
                                             rf"'{wrong}'.*a\.jpg"):
        register_user_coco("coco_user_wrong", f"{json_file}:{wrong}", 3)


def test_some_missing_images_are_one_warning_with_their_count(coco_spec, caplog):
    json_file, _, image_root = coco_spec.rpartition(":")
    coco = json.load(open(json_file))
    coco["images"] += [{"id": i, "file_name": f"gone{i}.jpg", "height": 20, "width": 30}
                       for i in (2, 3)]
    json.dump(coco, open(json_file, "w"))
    with caplog.at_level(logging.WARNING):
        register_user_coco("coco_user_partial", coco_spec, 3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of the 3 images" in warnings[0]
