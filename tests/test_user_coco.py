import json

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser

from deformable_detr.config import add_deformable_detr_config
from deformable_detr.data.user_coco import (
    add_user_coco_arguments,
    apply_user_coco,
    register_user_coco,
    setup_user_coco,
)


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
    with pytest.raises(FileNotFoundError, match="annotation file"):
        register_user_coco("x", f"{tmp_path}/nope.json:{tmp_path}", 1)
    with pytest.raises(FileNotFoundError, match="image folder"):
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
