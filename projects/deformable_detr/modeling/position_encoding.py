"""Sine position encoding of feature maps (official ``PositionEmbeddingSine``, normalized)."""

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine", "sine_embedding"]


def sine_embedding(positions: torch.Tensor, num_feats: int, temperature: float = 10000.0):
    """(...) positions -> (..., num_feats): sin and cos of ``positions / temperature**(2i / F)``,
    interleaved (the official layout of both the feature-map and the proposal embeddings)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=positions.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos = positions[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """
    2D sine/cosine encoding of pixel positions, computed over the valid (non-padded) region so
    that every image of a padded batch spans [0, scale] in both axes.
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
    ):
        """
        Args:
            num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` channels.
            temperature: base of the geometric frequency progression.
            normalize: divide cumulative positions by the valid extent of each image.
            scale: range of the normalized positions.
        """
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            mask: (N, H, W) bool, True on padded pixels.

        Returns:
            (N, 2 * num_pos_feats, H, W) float32 encoding, y channels first then x channels.
        """
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(
                "mask must be a bool tensor of shape (N, H, W), "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale

        pos_x = sine_embedding(x_embed, self.num_pos_feats, self.temperature)
        pos_y = sine_embedding(y_embed, self.num_pos_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
