"""Checkpoints: atomic writes and resume (``atomic``), files of other code bases (``sources``),
HuggingFace (``hf``) and official (``official``) checkpoints converted to this plugin, with the
architecture read from the weights (``variant``)."""

from .atomic import AtomicDetectionCheckpointer, CorruptCheckpointError, atomic_write
from .hf import hf_to_official
from .official import (
    check_state_dict_matches,
    convert_state_dict,
    official_to_plugin,
    torchvision_resnet_to_detectron2,
    write_converted_checkpoint,
)
from .sources import CheckpointConversionError, load_source_state_dict
from .variant import DetectedVariant, check_config, coco_class_rows, detect_variant

__all__ = [
    "AtomicDetectionCheckpointer",
    "CheckpointConversionError",
    "CorruptCheckpointError",
    "DetectedVariant",
    "atomic_write",
    "check_config",
    "check_state_dict_matches",
    "coco_class_rows",
    "convert_state_dict",
    "detect_variant",
    "hf_to_official",
    "load_source_state_dict",
    "official_to_plugin",
    "torchvision_resnet_to_detectron2",
    "write_converted_checkpoint",
]
