"""
The deformable transformer: a multi-scale deformable-attention encoder and a decoder whose queries
cross-attend to the encoder memory around reference points. The prediction heads are the
detector's (``heads.py``), called once per decoder layer; the two-stage query selection is in
``two_stage.py``. Module and parameter names follow the official implementation so that its
checkpoints map by name.
"""

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import MSDeformAttn
from .denoising import DenoisingQueries, denoising_attention_mask
from .heads import PredictionHeads, refine_boxes
from .two_stage import encoder_proposals, proposal_position_embedding, select_proposals, valid_sizes


@dataclass
class FlattenedLevels:
    """The per-level inputs of the transformer concatenated along the positions S = sum H_l W_l."""

    src: torch.Tensor  # (N, S, C) features
    padding_mask: torch.Tensor  # (N, S) bool
    pos: torch.Tensor  # (N, S, C) position + level embeddings
    level_shapes: List[Tuple[int, int]]  # L (H, W); Python ints, symbolic under torch.export
    spatial_shapes: torch.Tensor  # (L, 2) int64
    level_start_index: torch.Tensor  # (L,) int64
    valid_ratios: torch.Tensor  # (N, L, 2) valid (w, h) fraction of each level


def flatten_levels(srcs, masks, pos_embeds, level_embed: torch.Tensor) -> FlattenedLevels:
    """
    Args:
        srcs, pos_embeds: per level (N, C, H_l, W_l); masks: per level (N, H_l, W_l) bool.
        level_embed: (L, C) learned embedding added to each level's position encoding.
    """
    level_shapes = [tuple(src.shape[-2:]) for src in srcs]
    # torch.tensor, unlike torch.as_tensor, keeps symbolic sizes symbolic under torch.export.
    spatial_shapes = torch.tensor(level_shapes, dtype=torch.long, device=srcs[0].device)
    return FlattenedLevels(
        src=torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1),
        padding_mask=torch.cat([mask.flatten(1) for mask in masks], 1),
        pos=torch.cat([
            pos.flatten(2).transpose(1, 2) + level_embed[lvl].view(1, 1, -1)
            for lvl, pos in enumerate(pos_embeds)
        ], 1),
        level_shapes=level_shapes,
        spatial_shapes=spatial_shapes,
        level_start_index=torch.cat(
            (spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])
        ),
        valid_ratios=torch.stack([valid_ratio(mask) for mask in masks], 1),
    )


def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) padding mask -> (N, 2) valid (w, h) fractions."""
    _, h, w = mask.shape
    valid_h, valid_w = valid_sizes(mask)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


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
    def get_reference_points(level_shapes, valid_ratios, device) -> torch.Tensor:
        """
        Pixel centres of every level, normalized by the valid extent of each image and then
        expressed in the padded frame of every level.

        Args:
            level_shapes: L (H, W) ints.
            valid_ratios: (N, L, 2) (w, h) valid fractions.

        Returns:
            (N, S, L, 2) normalized (x, y).
        """
        reference_points_list = []
        for lvl, (h, w) in enumerate(level_shapes):
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

    def forward(self, levels: FlattenedLevels) -> torch.Tensor:
        """The flattened levels' (N, S, C) features -> (N, S, C) memory."""
        output = levels.src
        reference_points = self.get_reference_points(
            levels.level_shapes, levels.valid_ratios, output.device
        )
        for layer in self.layers:
            output = layer(
                output, levels.pos, reference_points, levels.spatial_shapes,
                levels.level_start_index, levels.padding_mask,
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
        src_padding_mask, self_attn_mask=None,
    ):
        """
        Args:
            tgt, query_pos: (N, Q, C) query contents and query position embeddings.
            reference_points: (N, Q, L, 2) or (N, Q, L, 4) normalized, per level.
            src: (N, S, C) encoder memory; src_padding_mask: (N, S) bool.
            self_attn_mask: (Q, Q) bool, True where query i may not attend to query j.

        Returns:
            (N, Q, C)
        """
        q = k = tgt + query_pos
        tgt2 = self.self_attn(
            q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1), attn_mask=self_attn_mask
        )[0]
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
    Stack of decoder layers, each followed by its prediction head. With box refinement each
    layer's boxes become the next layer's reference, detached as in the official code (the next
    layer's loss does not train this layer's box head). With ``look_forward_twice`` (DINO) the
    detach moves: the next layer's reference stays detached, but the boxes a layer outputs for its
    loss are refined from the previous layer's undetached boxes, so that loss also trains the
    previous layer's box head. The values are the same either way.
    """

    def __init__(self, decoder_layer: nn.Module, num_layers: int, look_forward_twice: bool = False):
        super().__init__()
        self.layers = _get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.look_forward_twice = look_forward_twice

    def forward(
        self, tgt, query_pos, reference_points, memory, levels: FlattenedLevels,
        heads: PredictionHeads, self_attn_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            tgt, query_pos: (N, Q, C) query contents and position embeddings.
            reference_points: (N, Q, 2) or (N, Q, 4) normalized to the valid image region.
            memory: (N, S, C) encoder output over ``levels``.
            heads: the detector's heads, called once per layer.
            self_attn_mask: (Q, Q) bool, True where query i may not attend to query j.

        Returns:
            logits (num_layers, N, Q, K) and boxes (num_layers, N, Q, 4) of every layer.
        """
        output = tgt
        previous_boxes = reference_points  # undetached, for look forward twice
        all_logits, all_boxes = [], []
        for lid, layer in enumerate(self.layers):
            ratios = levels.valid_ratios
            if reference_points.shape[-1] == 4:
                ratios = torch.cat([ratios, ratios], -1)
            output = layer(
                output, query_pos, reference_points[:, :, None] * ratios[:, None], memory,
                levels.spatial_shapes, levels.level_start_index, levels.padding_mask,
                self_attn_mask,
            )
            logits, delta = heads(lid, output)
            boxes = refine_boxes(delta, reference_points)
            if heads.with_box_refine:
                next_reference = boxes
                if self.look_forward_twice:
                    # Same values; the gradient also reaches the previous layer's box head.
                    boxes = refine_boxes(delta, previous_boxes)
                    previous_boxes = next_reference
                reference_points = next_reference.detach()
            all_logits.append(logits)
            all_boxes.append(boxes)
        return torch.stack(all_logits), torch.stack(all_boxes)


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
        look_forward_twice: bool = False,
        mixed_query_selection: bool = False,
    ):
        super().__init__()
        if not 0.0 < two_stage_proposal_nms_thresh <= 1.0:
            raise ValueError(
                "MODEL.DEFORMABLE_DETR.TWO_STAGE.PROPOSAL_NMS_THRESH must be in (0, 1], got "
                f"{two_stage_proposal_nms_thresh}"
            )
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.two_stage_proposal_nms_thresh = two_stage_proposal_nms_thresh
        if mixed_query_selection and not two_stage:
            raise ValueError("mixed_query_selection=True requires two_stage=True")
        self.mixed_query_selection = mixed_query_selection

        encoder_layer = DeformableTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points
        )
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points
        )
        self.decoder = DeformableTransformerDecoder(
            decoder_layer, num_decoder_layers, look_forward_twice
        )

        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            # Mixed query selection (DINO): the proposals give only the positional queries, the
            # content queries are learned.
            query_parts = 1 if mixed_query_selection else 2
            self.pos_trans = nn.Linear(d_model * 2, d_model * query_parts)
            self.pos_trans_norm = nn.LayerNorm(d_model * query_parts)
            if mixed_query_selection:
                self.tgt_embed = nn.Embedding(two_stage_num_proposals, d_model)
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

    def two_stage_queries(
        self, memory: torch.Tensor, levels: FlattenedLevels, heads: PredictionHeads
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """
        Scores every encoder position's proposal with the heads' encoder head and turns the
        top ``two_stage_num_proposals`` into queries: reference boxes, positional queries and
        (unless ``mixed_query_selection``, where they are learned) content queries.

        Returns:
            query_pos, tgt: (N, K, C) each; reference_points: (N, K, 4) normalized boxes;
            the encoder outputs, a dict of "pred_logits" (N, S, K) and "pred_boxes" (N, S, 4).
        """
        proposals, valid = encoder_proposals(levels.padding_mask, levels.level_shapes)
        output_memory = self.enc_output_norm(self.enc_output(memory.masked_fill(~valid, 0.0)))
        index = heads.encoder_head_index
        enc_logits = heads.class_embed[index](output_memory)
        enc_coords_unact = heads.bbox_embed[index](output_memory) + proposals
        topk = min(self.two_stage_num_proposals, enc_logits.shape[1])
        topk_proposals = select_proposals(
            enc_logits[..., 0], enc_coords_unact, topk, self.two_stage_proposal_nms_thresh
        )
        # The decoder starts from the proposals; no gradient flows back into them (official).
        topk_coords_unact = torch.gather(
            enc_coords_unact, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, 4)
        ).detach()
        pos_trans_out = self.pos_trans_norm(
            self.pos_trans(proposal_position_embedding(topk_coords_unact, self.d_model))
        )
        if self.mixed_query_selection:
            query_pos = pos_trans_out
            tgt = self.tgt_embed.weight[:topk].unsqueeze(0).expand(memory.shape[0], -1, -1)
        else:
            query_pos, tgt = torch.split(pos_trans_out, self.d_model, dim=2)
        encoder_outputs = {"pred_logits": enc_logits, "pred_boxes": enc_coords_unact.sigmoid()}
        return query_pos, tgt, topk_coords_unact.sigmoid(), encoder_outputs

    def forward(
        self,
        srcs: List[torch.Tensor],
        masks: List[torch.Tensor],
        pos_embeds: List[torch.Tensor],
        heads: PredictionHeads,
        query_embed: Optional[torch.Tensor] = None,
        denoising: Optional[DenoisingQueries] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            srcs, pos_embeds: per level (N, C, H_l, W_l); masks: per level (N, H_l, W_l) bool.
            heads: the detector's prediction heads.
            query_embed: (Q, 2C) learned query position + content; None for two-stage.
            denoising: training only, D denoising queries decoded before the Q matching ones,
                behind :func:`denoising_attention_mask`.

        Returns:
            dict with "pred_logits" (num_decoder_layers, N, Q, K) and "pred_boxes"
            (num_decoder_layers, N, Q, 4) normalized cxcywh of every decoder layer, for
            two-stage "enc_outputs" (see :meth:`two_stage_queries`), and with ``denoising``
            "denoising", a dict of the same "pred_logits" and "pred_boxes" for the D queries.
        """
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed (Q, 2C) is required unless two_stage=True")
        levels = flatten_levels(srcs, masks, pos_embeds, self.level_embed)
        memory = self.encoder(levels)

        outputs = {}
        if self.two_stage:
            query_pos, tgt, reference_points, outputs["enc_outputs"] = self.two_stage_queries(
                memory, levels, heads
            )
        else:
            bs = memory.shape[0]
            query_pos, tgt = torch.split(query_embed, self.d_model, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)
            tgt = tgt.unsqueeze(0).expand(bs, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        if denoising is None:
            outputs["pred_logits"], outputs["pred_boxes"] = self.decoder(
                tgt, query_pos, reference_points, memory, levels, heads
            )
            return outputs
        num_denoising = denoising.content.shape[1]
        mask = denoising_attention_mask(
            num_denoising, denoising.group_size, tgt.shape[1], device=tgt.device
        )
        # One-stage references are points: the denoising queries then start at the box centres.
        dn_reference = denoising.reference[..., : reference_points.shape[-1]]
        logits, boxes = self.decoder(
            torch.cat([denoising.content, tgt], 1),
            torch.cat([denoising.query_pos, query_pos], 1),
            torch.cat([dn_reference, reference_points], 1),
            memory, levels, heads, mask,
        )
        outputs["denoising"] = {
            "pred_logits": logits[:, :, :num_denoising],
            "pred_boxes": boxes[:, :, :num_denoising],
        }
        outputs["pred_logits"] = logits[:, :, num_denoising:]
        outputs["pred_boxes"] = boxes[:, :, num_denoising:]
        return outputs
