"""Multi-scale deformable attention: the functional op and the ``MSDeformAttn`` module."""

from .ms_deform_attn import MSDeformAttn, SamplingRecord, capture_sampling
from .ms_deform_attn_op import (
    active_implementation,
    compiled_kernels,
    extension_error,
    ms_deform_attn,
    ms_deform_attn_pytorch,
    use_implementation,
)

__all__ = [
    "MSDeformAttn",
    "SamplingRecord",
    "capture_sampling",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "compiled_kernels",
    "extension_error",
    "active_implementation",
    "use_implementation",
]
