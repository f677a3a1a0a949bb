"""Deformable DETR (Zhu et al., ICLR 2021) for Detectron2.

Importing the package registers its meta-architecture, neck and backbones in Detectron2's
registries and its builtin datasets in ``DatasetCatalog``.
"""

from . import (
    data,  # noqa: F401  (registers the builtin datasets trees_train / trees_val)
    modeling,  # noqa: F401  (registers DeformableDETR and the necks)
)
from .config import add_deformable_detr_config  # noqa: F401
from .modeling import backbone  # noqa: F401  (registers build_mobilenet_v2_backbone)
from .modeling.backbone import torchvision_resnet  # noqa: F401  (registers its ResNet builder)
