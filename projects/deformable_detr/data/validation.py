"""Finds what is wrong in a dataset before training spends hours on it.

The problems looked for are the ones real datasets have: image files that are missing,
unreadable or truncated, images listed twice, boxes with negative or zero size, boxes
outside the image, class ids outside the model's classes, and images without annotations.

What training does about each (the ``action`` of a :class:`DatasetProblem`):

- image listed twice: :func:`training_dataset_dicts` keeps the first record, one warning;
- image missing, unreadable or truncated: the mapper warns once for the file and returns None
  (:func:`read_image_or_none`), so Detectron2's ``MapDataset`` draws another image;
- box with negative or zero width/height: dropped with one warning per file
  (:func:`drop_degenerate_boxes`), before augmentation could turn it into a valid box;
- box crossing the border: clipped; box outside the image: clipped to nothing, then dropped
  (Detectron2's ``transform_instance_annotations`` and ``filter_empty_instances``);
- image without annotations: trained on as a negative when ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``
  is False (the default of ``Base-DeformableDETR.yaml``, as the official), removed when True;
- class id outside ``[0, NUM_CLASSES)``: an error, since the model cannot learn it.
"""

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.data import get_detection_dataset_dicts
from detectron2.structures import BoxMode
from detectron2.utils.logger import log_first_n
from PIL import Image

logger = logging.getLogger(__name__)

# What PIL and Detectron2's read_image raise for missing, broken or truncated image files.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class DatasetProblem:
    """One problem of one image. ``action`` says what training does about it."""

    file_name: str
    reason: str
    action: str  # "skip image", "drop box", "clip box", "train as negative", "error"

    def __str__(self):
        return f"{self.file_name}: {self.reason} -> {self.action}"


def _read_problem(file_name):
    """Why the image cannot be decoded completely, or None."""
    try:
        with Image.open(file_name) as image:
            image.load()  # decodes all pixels, so a truncated file fails here
    except FileNotFoundError:
        return "image file does not exist"
    except Exception as error:  # PIL raises many types for broken files
        return f"image cannot be read ({type(error).__name__}: {error})"
    return None


def _xyxy_if_has_area(annotation):
    """The annotation's box as XYXY_ABS, or None when it is not finite or has no area."""
    x0, y0, x1, y1 = BoxMode.convert(
        list(annotation["bbox"]), annotation["bbox_mode"], BoxMode.XYXY_ABS
    )
    if np.isfinite([x0, y0, x1, y1]).all() and x1 > x0 and y1 > y0:
        return x0, y0, x1, y1
    return None


def _box_problems(record, num_classes):
    problems = []
    height, width = record.get("height"), record.get("width")
    for index, annotation in enumerate(record.get("annotations", [])):
        box = _xyxy_if_has_area(annotation)
        where = f"annotation {index} (box {[round(float(v), 1) for v in annotation['bbox']]})"
        category = annotation.get("category_id")
        if num_classes is not None and not 0 <= category < num_classes:
            problems.append(
                (f"{where} has class id {category}, outside [0, {num_classes})", "error")
            )
        if box is None:
            problems.append((f"{where} has no area (negative or zero width/height)", "drop box"))
        elif width and height:
            x0, y0, x1, y1 = box
            inside_w, inside_h = min(x1, width) - max(x0, 0), min(y1, height) - max(y0, 0)
            if inside_w <= 0 or inside_h <= 0:
                problems.append((f"{where} lies outside the {width}x{height} image", "drop box"))
            elif x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                problems.append((f"{where} crosses the {width}x{height} image border", "clip box"))
    return problems


def find_dataset_problems(dataset_dicts, num_classes=None, read_images=True):
    """Lists every problem of ``dataset_dicts`` (Detectron2's standard dataset format).

    Args:
        dataset_dicts: list of records with "file_name" and optionally "annotations".
        num_classes: if given, class ids must lie in ``[0, num_classes)``.
        read_images: decode every image (slow on large datasets, but finds truncated files).

    Returns:
        list[DatasetProblem]
    """
    problems = []
    counts = Counter(record["file_name"] for record in dataset_dicts)
    for file_name, count in sorted(counts.items()):
        if count > 1:
            problems.append(
                DatasetProblem(file_name, f"image listed {count} times", "train on first only")
            )
    for record in dataset_dicts:
        file_name = record["file_name"]
        reason = _read_problem(file_name) if read_images else None
        if reason is not None:
            problems.append(DatasetProblem(file_name, reason, "skip image"))
            continue
        if "annotations" in record and not record["annotations"]:
            problems.append(
                DatasetProblem(file_name, "image has no annotations", "train as negative")
            )
        problems.extend(
            DatasetProblem(file_name, reason, action)
            for reason, action in _box_problems(record, num_classes)
        )
    return problems


def drop_duplicate_images(dataset_dicts):
    """Keeps the first record of each image file; one warning names the duplicated files."""
    seen, kept, duplicated = set(), [], Counter()
    for record in dataset_dicts:
        if record["file_name"] in seen:
            duplicated[record["file_name"]] += 1
            continue
        seen.add(record["file_name"])
        kept.append(record)
    if duplicated:
        names = ", ".join(sorted(duplicated)[:5]) + (", ..." if len(duplicated) > 5 else "")
        logger.warning(
            f"Dropped {sum(duplicated.values())} records of {len(duplicated)} images listed more "
            f"than once ({names}); training uses the first record of each"
        )
    return kept


def training_dataset_dicts(cfg):
    """``DATASETS.TRAIN`` as Detectron2's train loader loads it (images without annotations
    removed if ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``), with duplicated images dropped."""
    return drop_duplicate_images(
        get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
    )


def read_image_or_none(file_name, image_format):
    """Detectron2's ``read_image``, or None with one warning per file when the file is missing,
    unreadable or truncated (a dataset mapper returning None makes ``MapDataset`` retry)."""
    try:
        image = utils.read_image(file_name, format=image_format)
    except UNREADABLE_IMAGE_ERRORS as error:
        reason = f"{type(error).__name__}: {error}"
        log_first_n(
            logging.WARNING, f"{file_name}: skipped, image cannot be read ({reason})", key="message"
        )
        return None
    # PIL's buffer is read-only; fvcore's vertical flip would warn on torch.from_numpy of it
    return np.require(image, requirements="W")


def drop_degenerate_boxes(annotations, file_name):
    """The annotations whose box has positive, finite width and height; one warning per file
    names the dropped boxes (a box with negative width would otherwise come out of Detectron2's
    box transforms with the corners swapped, as a valid box)."""
    kept, dropped = [], []
    for annotation in annotations:
        (kept if _xyxy_if_has_area(annotation) else dropped).append(annotation)
    if dropped:
        boxes = [list(annotation["bbox"]) for annotation in dropped]
        log_first_n(
            logging.WARNING,
            f"{file_name}: dropped {len(dropped)} boxes without area (negative or zero width or "
            f"height): {boxes}",
            key="message",
        )
    return kept
