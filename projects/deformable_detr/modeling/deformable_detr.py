"""The Deformable DETR meta-architecture (Zhu et al., ICLR 2021) for Detectron2."""

from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, detector_postprocess
from detectron2.structures import ImageList, Instances
from torch import nn
from torchvision.ops import box_convert

from ..config import check_deformable_detr_config
from .criterion import SetCriterion
from .deformable_transformer import DeformableTransformer
from .denoising import DenoisingQueries, DenoisingQueryGenerator
from .heads import PredictionHeads
from .matcher import HungarianMatcher
from .neck import build_neck
from .postprocessing import select_detections


@META_ARCH_REGISTRY.register()
class DeformableDETR(nn.Module):
    """
    Backbone -> neck (multi-level features, masks, position encodings) -> deformable transformer
    -> per-decoder-layer class logits and boxes. Variants: iterative box refinement (one head per
    decoder layer, each refining the previous boxes) and two-stage (queries from encoder proposals).

    Inputs and outputs follow Detectron2's contract: a list of dicts with "image" (C, H, W) in
    ``INPUT.FORMAT`` and, in training, "instances" with ``gt_boxes``/``gt_classes``; returns a loss
    dict in training and ``[{"instances": Instances}]`` in original image coordinates otherwise.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        neck: nn.Module,
        transformer: DeformableTransformer,
        criterion: SetCriterion,
        num_classes: int,
        num_queries: int,
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
        aux_loss: bool = True,
        with_box_refine: bool = False,
        two_stage: bool = False,
        detections_per_image: int = 100,
        nms_thresh_test: float = 1.0,
        denoising: Optional[DenoisingQueryGenerator] = None,
    ):
        """
        Args:
            backbone: a Detectron2 backbone whose features the neck consumes.
            neck: see ``neck.py``; returns per-level features, masks and position encodings.
            transformer: the deformable transformer; ``two_stage`` must match its own flag.
            criterion: computes the weighted training losses.
            num_classes: number of foreground classes.
            num_queries: number of learned queries (ignored by two-stage, whose queries are the
                transformer's ``two_stage_num_proposals`` encoder proposals).
            pixel_mean, pixel_std: per-channel normalization of the input image.
            aux_loss: also supervise every decoder layer but the last.
            with_box_refine: iterative bounding box refinement.
            two_stage: two-stage variant.
            detections_per_image: top-k (query, class) pairs kept at inference.
            nms_thresh_test: IoU above which a lower-scoring detection of the same class is
                suppressed at inference; 1.0 (the paper) keeps every set prediction.
            denoising: with a generator, training adds its denoising queries to the decoder
                (DN-DETR / DINO's CDN) and their losses; inference never builds them.
        """
        super().__init__()
        if two_stage and not with_box_refine:
            # Official: the encoder proposals need a head of their own, which only refine has.
            raise ValueError("two_stage=True requires with_box_refine=True (as the official code)")
        if two_stage != transformer.two_stage:
            raise ValueError(
                f"two_stage ({two_stage}) must match transformer.two_stage "
                f"({transformer.two_stage})"
            )
        self.backbone = backbone
        self.neck = neck
        self.transformer = transformer
        self.criterion = criterion
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.detections_per_image = detections_per_image
        self.nms_thresh_test = nms_thresh_test
        self.denoising = denoising
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

        self.heads = PredictionHeads(
            transformer.d_model, num_classes, transformer.decoder.num_layers, with_box_refine,
            two_stage,
        )
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, transformer.d_model * 2)

    @classmethod
    def from_config(cls, cfg):
        check_deformable_detr_config(cfg)
        dd = cfg.MODEL.DEFORMABLE_DETR
        backbone = build_backbone(cfg)
        neck = build_neck(cfg, backbone.output_shape())
        transformer = DeformableTransformer(
            d_model=dd.HIDDEN_DIM,
            nhead=dd.NHEADS,
            num_encoder_layers=dd.ENC_LAYERS,
            num_decoder_layers=dd.DEC_LAYERS,
            dim_feedforward=dd.DIM_FEEDFORWARD,
            dropout=dd.DROPOUT,
            num_feature_levels=dd.NUM_FEATURE_LEVELS,
            dec_n_points=dd.DEC_N_POINTS,
            enc_n_points=dd.ENC_N_POINTS,
            two_stage=dd.TWO_STAGE.ENABLED,
            two_stage_num_proposals=dd.TWO_STAGE.NUM_PROPOSALS,
            two_stage_proposal_nms_thresh=dd.TWO_STAGE.PROPOSAL_NMS_THRESH,
            look_forward_twice=dd.LOOK_FORWARD_TWICE,
            mixed_query_selection=dd.TWO_STAGE.MIXED_QUERY_SELECTION,
        )
        matcher = HungarianMatcher(
            cost_class=dd.MATCHER.COST_CLASS,
            cost_bbox=dd.MATCHER.COST_BBOX,
            cost_giou=dd.MATCHER.COST_GIOU,
            focal_alpha=dd.LOSS.FOCAL_ALPHA,
            focal_gamma=dd.LOSS.FOCAL_GAMMA,
        )
        weight_dict = {
            "loss_ce": dd.LOSS.CLASS_WEIGHT,
            "loss_bbox": dd.LOSS.BBOX_WEIGHT,
            "loss_giou": dd.LOSS.GIOU_WEIGHT,
        }
        criterion = SetCriterion(
            dd.NUM_CLASSES, matcher, weight_dict, focal_alpha=dd.LOSS.FOCAL_ALPHA,
            focal_gamma=dd.LOSS.FOCAL_GAMMA,
            decoder_match_repeats=dd.MATCHER.DECODER_REPEATS,
            encoder_match_repeats=dd.MATCHER.ENCODER_REPEATS,
        )
        denoising = None
        if dd.DENOISING.ENABLED:
            denoising = DenoisingQueryGenerator(
                dd.NUM_CLASSES, dd.HIDDEN_DIM, dd.DENOISING.NUM_QUERIES,
                dd.DENOISING.LABEL_NOISE_RATIO, dd.DENOISING.BOX_NOISE_SCALE,
            )
        return {
            "backbone": backbone,
            "neck": neck,
            "transformer": transformer,
            "criterion": criterion,
            "num_classes": dd.NUM_CLASSES,
            "num_queries": dd.NUM_QUERIES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "aux_loss": dd.LOSS.AUX_LOSS,
            "with_box_refine": dd.WITH_BOX_REFINE,
            "two_stage": dd.TWO_STAGE.ENABLED,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "nms_thresh_test": dd.NMS_THRESH_TEST,
            "denoising": denoising,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> Tuple[ImageList, torch.Tensor]:
        """Normalize and pad the images; returns the ImageList and its (N, H, W) padding mask."""
        images = [
            (x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
            for x in batched_inputs
        ]
        images = ImageList.from_tensors(
            images,
            self.backbone.size_divisibility,
            padding_constraints=self.backbone.padding_constraints,
        )
        n, _, h, w = images.tensor.shape
        padding_mask = torch.ones((n, h, w), dtype=torch.bool, device=self.device)
        for mask, (img_h, img_w) in zip(padding_mask, images.image_sizes):
            mask[:img_h, :img_w] = False
        return images, padding_mask

    def raw_outputs(self, batched_inputs: List[Dict]) -> Dict[str, object]:
        """
        Run the network without losses or post-processing.

        Returns:
            the dict of :meth:`raw_outputs_from_tensors`, plus "image_sizes": list of N (h, w) of
            the resized images, by which the boxes are normalized.
        """
        images, padding_mask = self.preprocess_image(batched_inputs)
        raw = self.raw_outputs_from_tensors(images.tensor, padding_mask)
        raw["image_sizes"] = images.image_sizes
        return raw

    def raw_outputs_from_tensors(
        self,
        images: torch.Tensor,
        padding_mask: torch.Tensor,
        denoising: Optional[DenoisingQueries] = None,
    ) -> Dict:
        """
        The network on tensors (traceable: no ``ImageList``, no data-dependent Python).

        Args:
            images: (N, 3, H, W) normalized and padded, as :meth:`preprocess_image` makes them.
            padding_mask: (N, H, W) bool, True on padding.
            denoising: training only; adds "denoising" to the outputs (see the transformer).

        Returns:
            dict with
            "pred_logits": (num_decoder_layers, N, Q, num_classes) class logits of every layer;
            "pred_boxes": (num_decoder_layers, N, Q, 4) boxes of every layer, (cx, cy, w, h)
                normalized by the size of each (resized, unpadded) image;
            "enc_outputs" (two-stage only): dict with "pred_logits" (N, S, num_classes) and
                "pred_boxes" (N, S, 4) of the encoder proposals, S = number of encoder tokens.
        """
        srcs, masks, pos = self.neck(self.backbone(images), padding_mask)
        query_embed = None if self.two_stage else self.query_embed.weight
        return self.transformer(srcs, masks, pos, self.heads, query_embed, denoising)

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: list of dicts with "image" (C, H, W) and, in training, "instances";
                optional "height"/"width" give the output resolution at inference.

        Returns:
            training: dict of weighted losses; inference: list of {"instances": Instances}.
        """
        if self.training and any("instances" not in x for x in batched_inputs):
            raise ValueError("training inputs must all contain 'instances'")
        if self.training:
            images, padding_mask = self.preprocess_image(batched_inputs)
            targets = self.prepare_targets(
                [x["instances"].to(self.device) for x in batched_inputs], images.image_sizes
            )
            denoising = None if self.denoising is None else self.denoising(targets)
            raw = self.raw_outputs_from_tensors(images.tensor, padding_mask, denoising)
            outputs = {"pred_logits": raw["pred_logits"][-1], "pred_boxes": raw["pred_boxes"][-1]}
            if self.aux_loss:
                outputs["aux_outputs"] = [
                    {"pred_logits": c, "pred_boxes": b}
                    for c, b in zip(raw["pred_logits"][:-1], raw["pred_boxes"][:-1])
                ]
            if self.two_stage:
                outputs["enc_outputs"] = raw["enc_outputs"]
            if denoising is not None:
                outputs["denoising"] = dict(
                    raw["denoising"], positive_indices=denoising.positive_indices,
                    num_groups=denoising.num_groups,
                )
            return self.criterion(outputs, targets)

        raw = self.raw_outputs(batched_inputs)
        results = self.inference(raw["pred_logits"][-1], raw["pred_boxes"][-1], raw["image_sizes"])
        processed = []
        for result, input_per_image, image_size in zip(
            results, batched_inputs, raw["image_sizes"]
        ):
            height = input_per_image.get("height", image_size[0])
            width = input_per_image.get("width", image_size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed

    def prepare_targets(
        self, gt_instances: List[Instances], image_sizes: List[Tuple[int, int]]
    ) -> List[Dict[str, torch.Tensor]]:
        """Instances with XYXY absolute ``gt_boxes`` -> dicts of labels and normalized cxcywh.
        Class ids are checked where the data enters (the dataset mapper and validation)."""
        targets = []
        for instances, (h, w) in zip(gt_instances, image_sizes):
            labels = instances.gt_classes
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_convert(instances.gt_boxes.tensor / scale, "xyxy", "cxcywh")
            targets.append({"labels": labels, "boxes": boxes})
        return targets

    def inference(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, image_sizes
    ) -> List[Instances]:
        """:func:`select_detections` with this model's ``detections_per_image`` and
        ``nms_thresh_test``."""
        return select_detections(
            pred_logits, pred_boxes, image_sizes, self.detections_per_image, self.nms_thresh_test
        )
