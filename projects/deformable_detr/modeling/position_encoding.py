"""Sine position encoding of feature maps (official ``PositionEmbeddingSine``, normalized)."""

import math

import torch
from torch import nn


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

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
