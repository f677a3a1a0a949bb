"""Training and evaluation on a user's own COCO-format data without writing code.

``train_net.py --train-coco ann.json:images/ --val-coco ann.json:images/
MODEL.DEFORMABLE_DETR.NUM_CLASSES N`` (or the config keys ``DATASETS.COCO_TRAIN`` /
``DATASETS.COCO_TEST``, lists of ``"ann.json:image_dir"``) registers every file with Detectron2's
``register_coco_instances`` as ``coco_user_train_<i>`` / ``coco_user_val_<i>`` and puts those names
into ``DATASETS.TRAIN`` / ``DATASETS.TEST``.
"""
import json
import logging
import os
from typing import Dict, List, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from ..errors import UserInputError

logger = logging.getLogger(__name__)

__all__ = [
    "parse_coco_spec",
    "read_coco_json",
    "coco_category_names",
    "check_images_present",
    "register_user_coco",
    "apply_user_coco",
    "add_user_coco_arguments",
    "setup_user_coco",
]


def parse_coco_spec(spec: str) -> Tuple[str, str]:
    """Split ``"ann.json:image_dir"`` into (json_file, image_root) and check both exist."""
    json_file, sep, image_root = spec.rpartition(":")
    if not sep or not json_file or not image_root:
        raise UserInputError(
            f"A COCO dataset is given as 'annotations.json:image_dir', got {spec!r}"
        )
    if not os.path.isfile(json_file):
        raise UserInputError(f"COCO annotation file {json_file!r} (from {spec!r}) not found")
    if not os.path.isdir(image_root):
        raise UserInputError(f"COCO image folder {image_root!r} (from {spec!r}) not found")
    return json_file, image_root


def read_coco_json(json_file: str) -> Dict:
    """The parsed annotation file; a file that is not JSON (e.g. truncated) is a
    :class:`UserInputError` naming the file, line and column."""
    try:
        with open(json_file) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise UserInputError(
            f"COCO annotation file {json_file!r} is not valid JSON: {error.msg} at line "
            f"{error.lineno}, column {error.colno} (is it truncated?)"
        ) from None


def coco_category_names(coco: Dict, json_file: str) -> List[str]:
    """Category names of a parsed COCO annotation file in the order of their ids (Detectron2's
    contiguous class ids)."""
    categories = coco.get("categories")
    if not categories:
        raise UserInputError(f"COCO annotation file {json_file!r} has no 'categories'")
    return [c["name"] for c in sorted(categories, key=lambda c: c["id"])]


def check_images_present(coco: Dict, json_file: str, image_root: str) -> None:
    """Before training: none of the listed images in ``image_root`` (most often the wrong folder)
    is an error naming the folder, the file and the first missing image; some missing is one
    warning with their count (they are skipped)."""
    listed = [image["file_name"] for image in coco.get("images", [])]
    missing = [name for name in listed if not os.path.isfile(os.path.join(image_root, name))]
    if listed and len(missing) == len(listed):
        raise UserInputError(
            f"None of the {len(listed)} images listed in {json_file!r} is in the image folder "
            f"{image_root!r} (the first one: {os.path.join(image_root, missing[0])!r}); "
            "is it the right folder?"
        )
    if missing:
        logger.warning(
            f"{len(missing)} of the {len(listed)} images listed in {json_file!r} are not in "
            f"{image_root!r} (the first one: {missing[0]!r}); they are skipped"
        )


def register_user_coco(
    name: str, spec: str, num_classes: int, num_classes_key: str = "NUM_CLASSES"
) -> List[str]:
    """Register ``spec`` (``"ann.json:image_dir"``) as dataset ``name`` after checking that the file
    has ``num_classes`` categories; returns the category names. A name registered before is
    replaced, so calling this twice with the same name is safe."""
    json_file, image_root = parse_coco_spec(spec)
    coco = read_coco_json(json_file)
    names = coco_category_names(coco, json_file)
    check_images_present(coco, json_file, image_root)
    if len(names) != num_classes:
        raise UserInputError(
            f"{json_file} has {len(names)} categories {names}, but {num_classes_key} is "
            f"{num_classes}: add `{num_classes_key} {len(names)}` to the command line"
        )
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {"thing_classes": names}, json_file, image_root)
    return names


def apply_user_coco(
    cfg,
    train_specs: Sequence[str],
    test_specs: Sequence[str],
    num_classes: int,
    num_classes_key: str = "NUM_CLASSES",
) -> None:
    """Register the given COCO files and point ``cfg.DATASETS.TRAIN`` / ``TEST`` at them (each
    only when specs are given). All files must list the same categories."""
    names_seen = {}
    for split, specs, key in (("train", train_specs, "TRAIN"), ("val", test_specs, "TEST")):
        if not specs:
            continue
        registered = []
        for i, spec in enumerate(specs):
            name = f"coco_user_{split}_{i}"
            names_seen[spec] = register_user_coco(name, spec, num_classes, num_classes_key)
            registered.append(name)
        setattr(cfg.DATASETS, key, tuple(registered))
    if len({tuple(names) for names in names_seen.values()}) > 1:
        raise UserInputError(f"The COCO files list different categories: {names_seen}")


def add_user_coco_arguments(parser):
    """Add ``--train-coco`` / ``--val-coco`` (repeatable) to an argparse parser; returns it."""
    for flag, key in (("--train-coco", "COCO_TRAIN"), ("--val-coco", "COCO_TEST")):
        parser.add_argument(
            flag, action="append", default=[], metavar="ANN.json:IMAGE_DIR",
            help=f"a COCO-format dataset (same as adding it to DATASETS.{key})",
        )
    return parser


def setup_user_coco(cfg, args=None) -> None:
    """Add ``args.train_coco`` / ``args.val_coco`` to ``cfg.DATASETS.COCO_TRAIN`` / ``COCO_TEST``
    and register them all (see ``apply_user_coco``); ``cfg`` must not be frozen."""
    cfg.DATASETS.COCO_TRAIN = list(cfg.DATASETS.COCO_TRAIN) + list(getattr(args, "train_coco", []))
    cfg.DATASETS.COCO_TEST = list(cfg.DATASETS.COCO_TEST) + list(getattr(args, "val_coco", []))
    apply_user_coco(
        cfg,
        cfg.DATASETS.COCO_TRAIN,
        cfg.DATASETS.COCO_TEST,
        cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES,
        "MODEL.DEFORMABLE_DETR.NUM_CLASSES",
    )
