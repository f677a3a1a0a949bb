"""DETR-style data augmentation and mapping of Detectron2 dataset dicts to model inputs."""

import copy
import logging
from typing import List

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .validation import drop_degenerate_boxes, read_image_or_none

__all__ = ["DetrDatasetMapper", "DetrResizeShortestEdge", "build_detr_augmentation"]


# INPUT.RANDOM_FLIP -> independent random flips; "both" suits aerial photos
FLIP_DIRECTIONS = {
    "horizontal": ("horizontal",),
    "vertical": ("vertical",),
    "both": ("horizontal", "vertical"),
    "none": (),
}


class DetrResizeShortestEdge(T.ResizeShortestEdge):
    """``ResizeShortestEdge`` with the official DETR output size: the long side is truncated,
    not rounded (official ``get_size_with_aspect_ratio``), so a 640x480 image becomes 1066x800
    as in the official evaluation, not 1067x800."""

    def get_transform(self, image):
        h, w = image.shape[:2]
        if self.is_range:
            size = np.random.randint(self.short_edge_length[0], self.short_edge_length[1] + 1)
        else:
            size = np.random.choice(self.short_edge_length)
        if max(h, w) / min(h, w) * size > self.max_size:
            size = int(round(self.max_size * min(h, w) / max(h, w)))
        if min(h, w) == size:
            return T.NoOpTransform()
        if w < h:
            new_h, new_w = int(size * h / w), size
        else:
            new_h, new_w = size, int(size * w / h)
        return T.ResizeTransform(h, w, new_h, new_w, self.interp)


def build_detr_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    """
    Training (official ``make_coco_transforms``): random flips as ``INPUT.RANDOM_FLIP`` says
    (official: "horizontal"; also "vertical", "both", "none"); with probability
    ``INPUT.DETR_CROP.PROB`` a resize to one of ``DETR_CROP.RESIZE_SIZES`` followed by a random crop
    of side in ``DETR_CROP.SIZE``; then a multi-scale resize (``INPUT.MIN_SIZE_TRAIN``,
    ``MAX_SIZE_TRAIN``). Test: a single resize (``MIN_SIZE_TEST``, ``MAX_SIZE_TEST``).
    """
    if not is_train:
        return [DetrResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
    if cfg.INPUT.RANDOM_FLIP not in FLIP_DIRECTIONS:
        raise ValueError(
            f"INPUT.RANDOM_FLIP must be one of {sorted(FLIP_DIRECTIONS)}, "
            f"got {cfg.INPUT.RANDOM_FLIP!r}"
        )
    augmentations = [
        T.RandomFlip(horizontal=direction == "horizontal", vertical=direction == "vertical")
        for direction in FLIP_DIRECTIONS[cfg.INPUT.RANDOM_FLIP]
    ]
    crop = cfg.INPUT.DETR_CROP
    if crop.ENABLED:
        resize_and_crop = T.AugmentationList(
            [
                DetrResizeShortestEdge(crop.RESIZE_SIZES, sample_style="choice"),
                T.RandomCrop("absolute_range", crop.SIZE),
            ]
        )
        augmentations.append(T.RandomApply(resize_and_crop, prob=crop.PROB))
    augmentations.append(
        DetrResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    )
    return augmentations


class DetrDatasetMapper:
    """
    Map one dataset dict (Detectron2 format) to a model input: read the image in
    ``INPUT.FORMAT`` (grayscale and RGBA files are converted), apply the DETR augmentation, and in
    training turn non-crowd annotations into ``Instances``, dropping boxes left empty by clipping or
    cropping. Images left without boxes are kept: they train as pure background. In training,
    an unreadable image gives None (one warning per file) so that ``MapDataset`` draws another,
    and boxes without area are dropped (see ``validation.py``).
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: List[T.Augmentation],
        image_format: str,
        num_classes: int,
    ):
        """
        Args:
            is_train: whether annotations are kept and turned into ``instances``.
            augmentations: applied in order to image and boxes.
            image_format: ``INPUT.FORMAT``, e.g. "RGB" or "BGR".
            num_classes: class ids must be in [0, num_classes).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.num_classes = num_classes
        mode = "training" if is_train else "inference"
        logger = logging.getLogger(__name__)
        logger.info(f"[DetrDatasetMapper] augmentations in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "is_train": is_train,
            "augmentations": build_detr_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "num_classes": cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES,
        }

    def __call__(self, dataset_dict: dict) -> dict:
        """
        Args:
            dataset_dict: one image in Detectron2 dataset format.

        Returns:
            the dict with "image" (C, H, W) uint8 tensor and, in training, "instances";
            None in training when the image file cannot be read.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict["file_name"]
        if self.is_train:
            image = read_image_or_none(file_name, self.image_format)
            if image is None:
                return None  # MapDataset draws another image
        else:
            image = utils.read_image(file_name, format=self.image_format)
        utils.check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict

        annotations = [
            obj for obj in dataset_dict.pop("annotations", []) if obj.get("iscrowd", 0) == 0
        ]
        annotations = drop_degenerate_boxes(annotations, file_name)
        for obj in annotations:
            category_id = obj["category_id"]
            if not 0 <= category_id < self.num_classes:
                raise ValueError(
                    f"{file_name}: category_id {category_id} is outside [0, {self.num_classes}) "
                    "(MODEL.DEFORMABLE_DETR.NUM_CLASSES); set NUM_CLASSES to the number of "
                    "classes of the dataset"
                )
            obj.pop("segmentation", None)
            obj.pop("keypoints", None)
        annotations = [
            utils.transform_instance_annotations(obj, transforms, image_shape)
            for obj in annotations
        ]
        instances = utils.annotations_to_instances(annotations, image_shape)
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
        return dataset_dict
