"""Helpers shared by the tests and the benchmarks (as ``detectron2/utils/testing.py``)."""

import torch

__all__ = ["randomize_"]


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Perturbs every weight by ``scale`` x N(0, 1), so zero-initialized parts (heads, sampling
    offsets) count too, and draws every frozen-BN statistic (timm zero-initializes the last BN of
    each block: this makes every branch count); in place, returns ``module``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
        for name, buffer in module.named_buffers():
            if name.endswith(("running_var", ".weight")):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
            elif name.endswith(("running_mean", ".bias")):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
    return module
