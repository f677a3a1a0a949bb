"""Deformable DETR (Zhu et al., ICLR 2021) for Detectron2.

Importing the package registers its meta-architecture, neck and backbones in Detectron2's
registries and its builtin datasets in ``DatasetCatalog``.
"""

import warnings

# detectron2 applies torch.jit.script at import time; recent torch warns about it every time.
warnings.filterwarnings("ignore", r"`torch\.jit\.script` is deprecated", FutureWarning)

# The imports below run the registrations.
from . import (
    data,  # noqa: F401  (datasets trees_train / trees_val)
    modeling,  # noqa: F401  (DeformableDETR, the necks, the backbones)
)
from .config import add_deformable_detr_config  # noqa: F401
