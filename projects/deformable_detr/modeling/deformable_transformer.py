"""
The deformable transformer: a multi-scale deformable-attention encoder and a decoder whose queries
cross-attend to the encoder memory around reference points, plus the two-stage proposal generation.
Module and parameter names follow the official implementation so that its checkpoints map by name.
"""

import copy
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, nms

from ..layers import MSDeformAttn


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Logit of ``x`` clamped to [0, 1], with both sides kept above ``eps`` to stay finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _level_shapes(spatial_shapes) -> List[Tuple[int, int]]:
    """(H, W) of each level as ints, from the (L, 2) tensor or from a list of pairs; the list
    keeps them constants under ``torch.export``, where reading tensor values is data-dependent."""
    if torch.is_tensor(spatial_shapes):
        return [(h, w) for h, w in spatial_shapes.tolist()]
    return [(h, w) for h, w in spatial_shapes]


def _get_clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


class DeformableTransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: multi-scale deformable self-attention, then a ReLU FFN."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)

        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """
        Args:
            src, pos: (N, S, C) flattened multi-level features and their position encodings.
            reference_points: (N, S, L, 2) normalized (x, y) per level.
            spatial_shapes: (L, 2) int64; level_start_index: (L,) int64.
            padding_mask: (N, S) bool, True on padding.

        Returns:
            (N, S, C)
        """
        src2 = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, encoder_layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = _get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes, valid_ratios, device) -> torch.Tensor:
        """
        Pixel centres of every level, normalized by the valid extent of each image and then
        expressed in the padded frame of every level.

        Args:
            spatial_shapes: (L, 2) int64 (H, W), or a list of L (H, W) ints.
            valid_ratios: (N, L, 2) (w, h) valid fractions.

        Returns:
            (N, S, L, 2) normalized (x, y).
        """
        reference_points_list = []
        for lvl, (h, w) in enumerate(_level_shapes(spatial_shapes)):
            ref_y, ref_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                torch.arange(w, dtype=torch.float32, device=device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            reference_points_list.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(reference_points_list, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(
        self, src, spatial_shapes, level_start_index, valid_ratios, pos, padding_mask,
        level_shapes=None,
    ):
        """(N, S, C) features -> (N, S, C) memory; see the layer for the other shapes.
        ``level_shapes``: ``spatial_shapes`` as a list of (H, W) ints, if the caller has it."""
        output = src
        reference_points = self.get_reference_points(
            spatial_shapes if level_shapes is None else level_shapes, valid_ratios, src.device
        )
        for layer in self.layers:
            output = layer(
                output, pos, reference_points, spatial_shapes, level_start_index, padding_mask
            )
        return output


class DeformableTransformerDecoderLayer(nn.Module):
    """Post-norm decoder layer: query self-attention, deformable cross-attention, ReLU FFN."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)

        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self, tgt, query_pos, reference_points, src, src_spatial_shapes, level_start_index,
        src_padding_mask,
    ):
        """
        Args:
            tgt, query_pos: (N, Q, C) query contents and query position embeddings.
            reference_points: (N, Q, L, 2) or (N, Q, L, 4) normalized, per level.
            src: (N, S, C) encoder memory; src_padding_mask: (N, S) bool.

        Returns:
            (N, Q, C)
        """
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1))[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2.transpose(0, 1)))

        tgt2 = self.cross_attn(
            tgt + query_pos, reference_points, src, src_spatial_shapes, level_start_index,
            src_padding_mask,
        )
        tgt = self.norm1(tgt + self.dropout1(tgt2))

        tgt2 = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableTransformerDecoder(nn.Module):
    """
    Stack of decoder layers returning every layer's output. When ``bbox_embed`` is set (box
    refinement; assigned by the detector as in the official code), each layer's box head refines the
    reference points fed to the next layer; gradients do not flow through the references.
    ``class_embed`` is likewise assigned for the two-stage variant, whose encoder head is its
    last entry.
    """

    def __init__(self, decoder_layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = _get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.bbox_embed: Optional[nn.ModuleList] = None
        self.class_embed: Optional[nn.ModuleList] = None

    def forward(
        self, tgt, reference_points, src, src_spatial_shapes, src_level_start_index,
        src_valid_ratios, query_pos, src_padding_mask,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            tgt, query_pos: (N, Q, C).
            reference_points: (N, Q, 2) or (N, Q, 4) normalized to the valid image region.
            src: (N, S, C); src_valid_ratios: (N, L, 2); src_padding_mask: (N, S) bool.

        Returns:
            hs: (num_layers, N, Q, C) outputs of every layer.
            references: (num_layers, N, Q, 2 or 4) references after every layer.
        """
        output = tgt
        intermediate, intermediate_reference_points = [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ratios = torch.cat([src_valid_ratios, src_valid_ratios], -1)
            else:
                ratios = src_valid_ratios
            reference_points_input = reference_points[:, :, None] * ratios[:, None]
            output = layer(
                output, query_pos, reference_points_input, src, src_spatial_shapes,
                src_level_start_index, src_padding_mask,
            )

            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](output)
                if reference_points.shape[-1] == 4:
                    new_reference_points = delta + inverse_sigmoid(reference_points)
                else:
                    new_reference_points = torch.cat(
                        [delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1
                    )
                reference_points = new_reference_points.sigmoid().detach()

            intermediate.append(output)
            intermediate_reference_points.append(reference_points)
        return torch.stack(intermediate), torch.stack(intermediate_reference_points)


class DeformableTransformer(nn.Module):
    """
    Encoder over flattened multi-level features, then decoder over object queries. Queries come
    from learned embeddings (``query_embed`` of the detector) or, in the two-stage variant, from the
    top-scoring encoder proposals.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        dec_n_points: int = 4,
        enc_n_points: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
        two_stage_proposal_nms_thresh: float = 1.0,
    ):
        super().__init__()
        if not 0.0 < two_stage_proposal_nms_thresh <= 1.0:
            raise ValueError(
                "MODEL.DEFORMABLE_DETR.TWO_STAGE_PROPOSAL_NMS_THRESH must be in (0, 1], got "
                f"{two_stage_proposal_nms_thresh}"
            )
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.two_stage_proposal_nms_thresh = two_stage_proposal_nms_thresh

        encoder_layer = DeformableTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points
        )
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points
        )
        self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers)

        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # MSDeformAttn's own init (offset grid, zero attention logits) overrides the xavier above.
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def get_proposal_pos_embed(self, proposals: torch.Tensor) -> torch.Tensor:
        """(N, K, 4) unactivated boxes -> (N, K, 2 * d_model) sine embedding of their sigmoid."""
        # Official hard-codes 128, which is d_model // 2 for its d_model = 256.
        num_pos_feats = self.d_model // 2
        temperature = 10000
        scale = 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
        pos = proposals.sigmoid() * scale
        pos = pos[:, :, :, None] / dim_t
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)

    @torch.no_grad()
    def distinct_topk_proposals(
        self, scores: torch.Tensor, coords_unact: torch.Tensor, k: int
    ) -> torch.Tensor:
        """
        Indices (N, k) of the top-``k`` proposals after class-agnostic NMS at
        ``two_stage_proposal_nms_thresh`` (distinct queries, as DDQ-DETR), so that neighbouring
        encoder positions do not all become queries for the same object. When fewer than ``k``
        survive, the best suppressed ones fill the rest.
        """
        scores = scores.float()
        boxes = box_convert(coords_unact.float().sigmoid(), "cxcywh", "xyxy")
        # Out of place, image by image: an in-place write into a row view is lost by the ONNX
        # tracer, which then bakes the example input's survivors into the file as a constant.
        kept = []
        for scores_i, boxes_i in zip(scores, boxes):
            keep = nms(boxes_i, scores_i, self.two_stage_proposal_nms_thresh)
            kept.append(scores_i.new_zeros(scores_i.shape).scatter(0, keep, 1.0))
        kept = torch.stack(kept)
        # Survivors first, each group by score (fixed shapes: traceable and exportable).
        offset = scores.amax(1, keepdim=True) - scores.amin(1, keepdim=True) + 1
        return torch.topk(scores + kept * offset, k, dim=1)[1]

    def gen_encoder_output_proposals(
        self, memory: torch.Tensor, memory_padding_mask: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        One proposal per encoder position: centred on the pixel, of side 0.05 * 2**level.

        Args:
            memory: (N, S, C); memory_padding_mask: (N, S) bool.
            spatial_shapes: (L, 2) int64 (H, W), or a list of L (H, W) ints.

        Returns:
            output_memory: (N, S, C) memory zeroed on padded/invalid positions, through
                ``enc_output`` + ``enc_output_norm``.
            output_proposals: (N, S, 4) unactivated (logit) cxcywh, +inf where invalid.
        """
        n, _, _ = memory.shape
        proposals = []
        cur = 0
        for lvl, (h, w) in enumerate(_level_shapes(spatial_shapes)):
            mask = memory_padding_mask[:, cur : cur + h * w].view(n, h, w, 1)
            valid_h = torch.sum(~mask[:, :, 0, 0], 1)
            valid_w = torch.sum(~mask[:, 0, :, 0], 1)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(h, dtype=torch.float32, device=memory.device),
                torch.arange(w, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
            proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
            cur += h * w
        output_proposals = torch.cat(proposals, 1)
        valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        output_proposals = output_proposals.masked_fill(
            memory_padding_mask.unsqueeze(-1), float("inf")
        )
        output_proposals = output_proposals.masked_fill(~valid, float("inf"))

        output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), 0.0)
        output_memory = output_memory.masked_fill(~valid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, output_proposals

    @staticmethod
    def get_valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """(N, H, W) padding mask -> (N, 2) valid (w, h) fractions."""
        _, h, w = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def forward(
        self,
        srcs: List[torch.Tensor],
        masks: List[torch.Tensor],
        pos_embeds: List[torch.Tensor],
        query_embed: Optional[torch.Tensor] = None,
    ):
        """
        Args:
            srcs, pos_embeds: per level (N, C, H_l, W_l); masks: per level (N, H_l, W_l) bool.
            query_embed: (Q, 2C) learned query position + content; None for two-stage.

        Returns:
            hs: (num_decoder_layers, N, Q, C) decoder outputs.
            init_reference: (N, Q, 2), or (N, Q, 4) for two-stage, sigmoid space.
            inter_references: (num_decoder_layers, N, Q, 2 or 4).
            enc_outputs_class: (N, S, num_classes) encoder proposal logits, or None.
            enc_outputs_coord_unact: (N, S, 4) unactivated encoder proposals, or None.
        """
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed (Q, 2C) is required unless two_stage=True")
        src_flatten, mask_flatten, lvl_pos_embed_flatten, spatial_shapes = [], [], [], []
        for lvl, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
            spatial_shapes.append(src.shape[-2:])
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            pos_embed = pos_embed.flatten(2).transpose(1, 2)
            lvl_pos_embed_flatten.append(pos_embed + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1)
        level_shapes = _level_shapes(spatial_shapes)
        # torch.tensor, unlike torch.as_tensor, keeps symbolic sizes symbolic under torch.export.
        spatial_shapes = torch.tensor(level_shapes, dtype=torch.long, device=src_flatten.device)
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])
        )
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)

        memory = self.encoder(
            src_flatten, spatial_shapes, level_start_index, valid_ratios, lvl_pos_embed_flatten,
            mask_flatten, level_shapes=level_shapes,
        )

        bs, _, c = memory.shape
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            output_memory, output_proposals = self.gen_encoder_output_proposals(
                memory, mask_flatten, level_shapes
            )
            # The encoder heads are the extra last entries of the detector's heads (official).
            enc_outputs_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            enc_outputs_coord_unact = (
                self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
            )
            topk = min(self.two_stage_num_proposals, enc_outputs_class.shape[1])
            if self.two_stage_proposal_nms_thresh < 1.0:
                topk_proposals = self.distinct_topk_proposals(
                    enc_outputs_class[..., 0], enc_outputs_coord_unact, topk
                )
            else:
                topk_proposals = torch.topk(enc_outputs_class[..., 0], topk, dim=1)[1]
            topk_coords_unact = torch.gather(
                enc_outputs_coord_unact, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, 4)
            ).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self.pos_trans_norm(
                self.pos_trans(self.get_proposal_pos_embed(topk_coords_unact))
            )
            query_pos, tgt = torch.split(pos_trans_out, c, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)
            tgt = tgt.unsqueeze(0).expand(bs, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        init_reference_out = reference_points

        hs, inter_references = self.decoder(
            tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios,
            query_pos, mask_flatten,
        )
        return hs, init_reference_out, inter_references, enc_outputs_class, enc_outputs_coord_unact
