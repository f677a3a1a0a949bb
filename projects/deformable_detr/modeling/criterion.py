"""Set-prediction losses of Deformable DETR: sigmoid focal classification, L1 and GIoU boxes."""

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from detectron2.utils import comm
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss


class SetCriterion(nn.Module):
    """
    Matches the predictions of the last decoder layer, of every auxiliary decoder layer and of the
    two-stage encoder to the targets (each with its own Hungarian matching), and sums weighted
    losses. All losses are normalized by the number of target boxes averaged over workers.

    With ``decoder_match_repeats`` / ``encoder_match_repeats`` k > 1 every target is matched to up
    to k predictions of that stage (one-to-many, as H-DETR's one-to-many branch); such a model
    predicts each object several times and needs NMS at inference.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        decoder_match_repeats: int = 1,
        encoder_match_repeats: int = 1,
    ):
        """
        Args:
            num_classes: number of foreground classes (no "no-object" class).
            matcher: returns per-image (query_indices, target_indices) pairs.
            weight_dict: weights of "loss_ce", "loss_bbox", "loss_giou"; the same weights apply
                to the auxiliary ("_0", "_1", ...) and encoder ("_enc") copies.
            focal_alpha, focal_gamma: sigmoid focal loss parameters.
            decoder_match_repeats: predictions of every decoder layer matched to each target
                (1: the paper's one-to-one matching).
            encoder_match_repeats: the same for the two-stage encoder proposals.
        """
        super().__init__()
        repeats = {"decoder": decoder_match_repeats, "encoder": encoder_match_repeats}
        for stage, k in repeats.items():
            if k < 1:
                raise ValueError(f"{stage}_match_repeats must be >= 1, got {k}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.decoder_match_repeats = decoder_match_repeats
        self.encoder_match_repeats = encoder_match_repeats

    @staticmethod
    def _src_permutation_idx(indices) -> Tuple[torch.Tensor, torch.Tensor]:
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def loss_labels(self, outputs, targets, indices, num_boxes) -> Dict[str, torch.Tensor]:
        """Sigmoid focal loss over all queries and classes; matched queries get one-hot targets."""
        src_logits = outputs["pred_logits"]
        idx = self._src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(
            src_logits.shape[:2], self.num_classes, dtype=torch.int64, device=src_logits.device
        )
        target_classes[idx] = target_classes_o
        # The extra "no-object" column absorbs unmatched queries and is then dropped.
        onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].to(src_logits.dtype)
        loss = sigmoid_focal_loss(
            src_logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        )
        return {"loss_ce": loss / num_boxes}

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> Dict[str, torch.Tensor]:
        """L1 and GIoU losses of matched boxes (normalized cxcywh)."""
        idx = self._src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx]
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        loss_giou = generalized_box_iou_loss(
            box_convert(src_boxes, "cxcywh", "xyxy"),
            box_convert(target_boxes, "cxcywh", "xyxy"),
            reduction="none",
        )
        return {
            "loss_bbox": loss_bbox.sum() / num_boxes,
            "loss_giou": loss_giou.sum() / num_boxes,
        }

    @staticmethod
    def _repeat_targets(targets, repeats: int) -> List[Dict[str, torch.Tensor]]:
        if repeats == 1:
            return targets
        return [{k: v.repeat(repeats, *[1] * (v.dim() - 1)) for k, v in t.items()} for t in targets]

    def _weighted_losses(
        self, outputs, targets, num_boxes, suffix, indices=None
    ) -> Dict[str, torch.Tensor]:
        """Losses of ``outputs`` matched to ``targets``, or paired by the given ``indices``."""
        # Losses in float32 whatever the autocast dtype of the predictions (AMP).
        outputs = {key: outputs[key].float() for key in ("pred_logits", "pred_boxes")}
        if indices is None:
            indices = self.matcher(outputs, targets)
        losses = self.loss_labels(outputs, targets, indices, num_boxes)
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        return {k + suffix: v * self.weight_dict[k] for k, v in losses.items()}

    def forward(
        self, outputs: Dict[str, object], targets: List[Dict[str, torch.Tensor]]
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            outputs: "pred_logits" (N, Q, K), "pred_boxes" (N, Q, 4); optional "aux_outputs"
                (list of such dicts, one per earlier decoder layer), "enc_outputs" (one dict)
                and "denoising": "pred_logits" (num_layers, N, D, K), "pred_boxes"
                (num_layers, N, D, 4) of the denoising queries, their "positive_indices" (per
                image, query and target indices) and "num_groups".
            targets: N dicts with "labels" (T_i,) int64 and "boxes" (T_i, 4) normalized cxcywh.

        Returns:
            weighted losses: "loss_ce", "loss_bbox", "loss_giou", the same with suffix "_{i}" for
            auxiliary layer i, "_enc" for the encoder proposals, and "_dn" (last decoder layer),
            "_dn_{i}" (layer i) for the denoising queries.
        """
        device = outputs["pred_logits"].device
        num_boxes = torch.as_tensor(
            [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float, device=device
        )
        # Average over workers so that every worker uses the same normalizer.
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(num_boxes)
        num_boxes = torch.clamp(num_boxes / comm.get_world_size(), min=1).item()

        # One-to-many matching normalizes by the number of matched pairs it asks for.
        dec_targets = self._repeat_targets(targets, self.decoder_match_repeats)
        dec_num_boxes = num_boxes * self.decoder_match_repeats
        losses = self._weighted_losses(outputs, dec_targets, dec_num_boxes, "")
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._weighted_losses(aux_outputs, dec_targets, dec_num_boxes, f"_{i}"))
        if "enc_outputs" in outputs:
            # Encoder proposals are class-agnostic: every target is class 0 (official).
            bin_targets = [
                {"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets
            ]
            bin_targets = self._repeat_targets(bin_targets, self.encoder_match_repeats)
            enc_num_boxes = num_boxes * self.encoder_match_repeats
            losses.update(
                self._weighted_losses(outputs["enc_outputs"], bin_targets, enc_num_boxes, "_enc")
            )
        if "denoising" in outputs:
            losses.update(self.denoising_losses(outputs["denoising"], targets, num_boxes))
        return losses

    def denoising_losses(self, denoising, targets, num_boxes) -> Dict[str, torch.Tensor]:
        """Every decoder layer's denoising queries: positives paired with the box they were made
        from (no matching), every other query (negatives, padding) trained as no object."""
        indices = denoising["positive_indices"]
        num_boxes = num_boxes * denoising["num_groups"]
        num_layers = denoising["pred_logits"].shape[0]
        losses = {}
        for layer in range(num_layers):
            suffix = "_dn" if layer == num_layers - 1 else f"_dn_{layer}"
            layer_outputs = {
                "pred_logits": denoising["pred_logits"][layer],
                "pred_boxes": denoising["pred_boxes"][layer],
            }
            losses.update(self._weighted_losses(layer_outputs, targets, num_boxes, suffix, indices))
        return losses
