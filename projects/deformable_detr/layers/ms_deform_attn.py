"""The multi-scale deformable attention module of Deformable DETR (Zhu et al., 2021)."""

import math
from contextlib import contextmanager
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ms_deform_attn_op import ms_deform_attn

__all__ = ["MSDeformAttn", "SamplingRecord", "capture_sampling"]


class SamplingRecord(NamedTuple):
    """What one ``MSDeformAttn`` call handed to the op, and the inputs needed to place it."""

    sampling_locations: torch.Tensor  # (N, Lq, M, L, P, 2) (x, y) in [0, 1] of each padded level
    attention_weights: torch.Tensor  # (N, Lq, M, L, P), summing to 1 over (L, P)
    reference_points: torch.Tensor  # (N, Lq, L, 2) or (N, Lq, L, 4), as the module received them
    spatial_shapes: torch.Tensor  # (L, 2) int64 (H, W)
    level_start_index: torch.Tensor  # (L,) int64
    padding_mask: Optional[torch.Tensor]  # (N, S) bool, True on padding, or None


class MSDeformAttn(nn.Module):
    """Each query attends to ``n_points`` sampled locations per head and level around its
    reference point; the offsets and attention weights are predicted from the query.

    Parameter names and initialization follow the official implementation so its checkpoints
    load unchanged.
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        """
        Args:
            d_model (int): channels C of queries and values; divisible by ``n_heads``.
            n_levels (int): feature levels L.
            n_heads (int): attention heads M.
            n_points (int): sampling points P per head and level.
        """
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        # Set only inside ``capture_sampling``; one attribute test per call otherwise.
        self._sampling_recorder = None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # head h initially looks along direction 2*pi*h/M, point i at distance i + 1
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query,
        reference_points,
        input_flatten,
        input_spatial_shapes,
        input_level_start_index,
        input_padding_mask=None,
    ):
        """
        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) normalized (x, y) in [0, 1], or (N, Lq, L, 4)
                boxes (cx, cy, w, h) whose size scales the offsets.
            input_flatten: (N, S, C), the L levels flattened and concatenated.
            input_spatial_shapes: (L, 2) int64, (H, W) of each level.
            input_level_start_index: (L,) int64, offset of each level in S.
            input_padding_mask: (N, S) bool, True at padding, or None.

        Returns:
            (N, Lq, C).
        """
        N, Lq, S = self._check_shapes(query, reference_points, input_flatten, input_padding_mask)
        M, L, P = self.n_heads, self.n_levels, self.n_points

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)
        sampling_offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        attention_weights = self.attention_weights(query).view(N, Lq, M, L * P)
        attention_weights = F.softmax(attention_weights, -1).view(N, Lq, M, L, P)

        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalize by its (W, H)
            offset_normalizer = input_spatial_shapes.flip(-1).to(sampling_offsets.dtype)
            sampling_locations = (
                reference_points[:, :, None, :, None, :]
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
            )
        else:
            # offsets are relative to the box: at most half its size away for the last point
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        if self._sampling_recorder is not None:
            self._sampling_recorder(SamplingRecord(
                sampling_locations.detach(), attention_weights.detach(),
                reference_points.detach(), input_spatial_shapes, input_level_start_index,
                input_padding_mask,
            ))
        output = ms_deform_attn(
            value, input_spatial_shapes, input_level_start_index, sampling_locations,
            attention_weights,
        )
        return self.output_proj(output)

    def _check_shapes(self, query, reference_points, input_flatten, input_padding_mask):
        C, L = self.d_model, self.n_levels
        if query.dim() != 3 or query.shape[-1] != C:
            raise ValueError(f"query must be (N, Lq, C={C}), got shape {tuple(query.shape)}")
        N, Lq, _ = query.shape
        if input_flatten.dim() != 3 or input_flatten.shape[0] != N or input_flatten.shape[-1] != C:
            raise ValueError(
                f"input_flatten must be (N={N}, S, C={C}), got shape {tuple(input_flatten.shape)}"
            )
        S = input_flatten.shape[1]
        if reference_points.dim() != 4 or tuple(reference_points.shape[:3]) != (N, Lq, L) or (
            reference_points.shape[-1] not in (2, 4)
        ):
            raise ValueError(
                f"reference_points must be (N, Lq, L, 2) or (N, Lq, L, 4) with (N, Lq, L) = "
                f"{(N, Lq, L)}, got shape {tuple(reference_points.shape)}"
            )
        if input_padding_mask is not None and tuple(input_padding_mask.shape) != (N, S):
            raise ValueError(
                f"input_padding_mask must be (N, S) = {(N, S)}, "
                f"got shape {tuple(input_padding_mask.shape)}"
            )
        return N, Lq, S


@contextmanager
def capture_sampling(
    model: nn.Module, module_names: Optional[Sequence[str]] = None
) -> Iterator[Dict[str, List[SamplingRecord]]]:
    """
    Records where the ``MSDeformAttn`` modules of ``model`` sample, for analysis and drawing::

        with capture_sampling(model, ["transformer.decoder.layers.5.cross_attn"]) as records:
            model(inputs)
        record = records["transformer.decoder.layers.5.cross_attn"][0]

    Args:
        model: a module containing ``MSDeformAttn`` modules (or one itself).
        module_names: names (as in ``model.named_modules()``) of the modules to record; default
            every ``MSDeformAttn``.

    Yields:
        dict from module name to the list of its :class:`SamplingRecord`, one per call inside
        the block. The tensors are the op's own inputs, detached; outputs are unchanged.
    """
    attention_modules = {
        name: module for name, module in model.named_modules() if isinstance(module, MSDeformAttn)
    }
    names = list(attention_modules) if module_names is None else list(module_names)
    unknown = [name for name in names if name not in attention_modules]
    if unknown:
        raise ValueError(
            f"{unknown} are not MSDeformAttn modules of the model; it has {list(attention_modules)}"
        )
    busy = [name for name in names if attention_modules[name]._sampling_recorder is not None]
    if busy:
        raise RuntimeError(f"{busy} are already being captured by another capture_sampling")
    records = {name: [] for name in names}
    try:
        for name in names:
            attention_modules[name]._sampling_recorder = records[name].append
        yield records
    finally:
        for name in names:
            attention_modules[name]._sampling_recorder = None
