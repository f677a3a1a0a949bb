"""
Where Deformable DETR looks: the reference point of each detection's query and the points its
last decoder layer sampled, for every head and level, weighted by their attention, in pixels of
the original image; optionally the last encoder layer's points for one pixel. Drawn with
Detectron2's ``Visualizer``.

    predictor = SamplingPredictor(cfg)
    result = predictor(image_rgb)
    for detection in result["detections"]:
        picture = draw_sampling(image_rgb, detection.sampling, detection.box)
    print(mean_inside_box_share(result["detections"]))
"""

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.data.detection_utils import convert_PIL_to_numpy, read_image
from detectron2.modeling import build_model
from detectron2.utils.visualizer import Visualizer
from matplotlib import patches
from PIL import Image
from torchvision.ops import box_convert

from .checkpoint import AtomicDetectionCheckpointer
from .data.dataset_mapper import build_detr_augmentation
from .layers import SamplingRecord, capture_sampling
from .modeling.deformable_transformer import valid_ratio

__all__ = [
    "DetectionSampling",
    "SampledQuery",
    "SamplingPredictor",
    "draw_sampling",
    "encoder_query_index",
    "explain_dataset",
    "explain_detections",
    "inside_box_share",
    "level_valid_ratios",
    "mean_inside_box_share",
    "sampled_query",
    "to_image_pixels",
    "write_detection_pictures",
]

# One colour per feature level (matplotlib's tab10), fine to coarse.
LEVEL_COLORS = [
    (0.12, 0.47, 0.71), (1.0, 0.50, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16),
    (0.58, 0.40, 0.74), (0.55, 0.34, 0.29),
]


@dataclass
class SampledQuery:
    """Where one query of one ``MSDeformAttn`` sampled, in pixels (x, y) of the original image."""

    reference_point: torch.Tensor  # (2,)
    reference_box: Optional[torch.Tensor]  # (4,) XYXY when the reference is a box, else None
    sampling_points: torch.Tensor  # (M, L, P, 2)
    attention_weights: torch.Tensor  # (M, L, P), summing to 1 over (L, P) for each head
    level_shapes: List[Tuple[int, int]]  # (H, W) of each level's feature map


@dataclass
class DetectionSampling:
    """One detection and where its query looked in the last decoder layer."""

    box: torch.Tensor  # (4,) XYXY in pixels of the original image
    score: float
    category: int
    query_index: int
    sampling: SampledQuery


def level_valid_ratios(
    padding_mask: Optional[torch.Tensor], spatial_shapes: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """
    (N, L, 2) (w, h) fraction of each level's feature map covered by the image, from the
    flattened (N, S) padding mask as ``MSDeformAttn`` received it (the model's own valid ratios).
    """
    if padding_mask is None:
        return torch.ones(batch_size, len(spatial_shapes), 2)
    ratios, start = [], 0
    for h, w in spatial_shapes.tolist():
        mask = padding_mask[:, start : start + h * w].view(-1, h, w)
        ratios.append(valid_ratio(mask))
        start += h * w
    return torch.stack(ratios, 1)


def to_image_pixels(
    locations: torch.Tensor, valid_ratios: torch.Tensor, output_size: Tuple[int, int]
) -> torch.Tensor:
    """
    Normalized (x, y) of a padded feature map -> pixels of the original image.

    The model normalizes boxes and reference points by the valid (unpadded) part of the resized
    image and feeds the attention ``location * valid_ratio`` of each level; undoing that gives the
    fraction of the image, and ``detector_postprocess`` scales that fraction to the original size.

    Args:
        locations: (..., 2) normalized (x, y) in the padded frame of a level.
        valid_ratios: (..., 2) (w, h) valid fractions of that level, broadcastable to locations.
        output_size: (height, width) of the original image.
    """
    height, width = output_size
    return locations / valid_ratios * locations.new_tensor([width, height])


def sampled_query(
    record: SamplingRecord, image_index: int, query_index: int, output_size: Tuple[int, int]
) -> SampledQuery:
    """The sampling of query ``query_index`` of image ``image_index`` in ``record``, in pixels."""
    valid = level_valid_ratios(
        record.padding_mask, record.spatial_shapes, record.sampling_locations.shape[0]
    )[image_index]
    locations = record.sampling_locations[image_index, query_index]  # (M, L, P, 2)
    reference = record.reference_points[image_index, query_index, 0]  # level 0: (2,) or (4,)
    center = to_image_pixels(reference[:2], valid[0], output_size)
    reference_box = None
    if reference.shape[-1] == 4:
        size = to_image_pixels(reference[2:], valid[0], output_size)
        reference_box = box_convert(torch.cat([center, size]), "cxcywh", "xyxy")
    return SampledQuery(
        reference_point=center,
        reference_box=reference_box,
        sampling_points=to_image_pixels(locations, valid[None, :, None, :], output_size),
        attention_weights=record.attention_weights[image_index, query_index],
        level_shapes=[(h, w) for h, w in record.spatial_shapes.tolist()],
    )


def encoder_query_index(
    record: SamplingRecord, image_index: int, pixel: Tuple[float, float],
    output_size: Tuple[int, int], level: int = 0,
) -> int:
    """Index of the encoder query (feature-map position) of ``level`` that covers ``pixel``
    (x, y) of the original image."""
    height, width = output_size
    x, y = pixel
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"pixel {pixel} is outside the image of width {width}, height {height}")
    num_levels = len(record.spatial_shapes)
    if not 0 <= level < num_levels:
        raise ValueError(f"level {level} does not exist; the model has {num_levels} levels")
    h, w = record.spatial_shapes[level].tolist()
    valid_w, valid_h = level_valid_ratios(
        record.padding_mask, record.spatial_shapes, record.sampling_locations.shape[0]
    )[image_index, level].tolist()
    valid_columns, valid_rows = round(valid_w * w), round(valid_h * h)
    column = min(int(x / width * valid_columns), valid_columns - 1)
    row = min(int(y / height * valid_rows), valid_rows - 1)
    return int(record.level_start_index[level]) + row * w + column


def inside_box_share(
    sampling: SampledQuery, box: torch.Tensor, weighted: bool = True
) -> torch.Tensor:
    """
    (L + 1,): the attention weight of the sampling points inside ``box`` (XYXY, edges
    included) as a share of all the weight of each level, then of all levels together.
    ``weighted=False`` counts every point the same (the share of the points inside).
    """
    x, y = sampling.sampling_points.unbind(-1)
    x0, y0, x1, y1 = box.tolist()
    inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)  # (M, L, P)
    weights = sampling.attention_weights
    if not weighted:
        weights = torch.ones_like(weights)
    inside_weight = (weights * inside).sum((0, 2))
    per_level = inside_weight / weights.sum((0, 2))
    return torch.cat([per_level, (inside_weight.sum() / weights.sum()).view(1)])


def mean_inside_box_share(
    detections: Sequence[DetectionSampling], weighted: bool = True
) -> Optional[torch.Tensor]:
    """:func:`inside_box_share` of every detection's own box, averaged; None without any."""
    if not detections:
        return None
    shares = [inside_box_share(d.sampling, d.box, weighted) for d in detections]
    return torch.stack(shares).mean(0)


def _attention_module_names(model) -> Tuple[str, str]:
    encoder, decoder = model.transformer.encoder, model.transformer.decoder
    return (
        f"transformer.encoder.layers.{encoder.num_layers - 1}.self_attn",
        f"transformer.decoder.layers.{decoder.num_layers - 1}.cross_attn",
    )


@torch.no_grad()
def explain_detections(
    model,
    batched_inputs: List[Dict],
    score_thresh: float = 0.3,
    max_detections: Optional[int] = None,
    encoder_pixel: Optional[Tuple[float, float]] = None,
    encoder_level: int = 0,
) -> List[Dict]:
    """
    Runs a ``DeformableDETR`` in eval mode and returns, for each image, its detections with
    the sampling of their queries in the last decoder layer.

    Args:
        model: a ``DeformableDETR`` in eval mode, any variant.
        batched_inputs: Detectron2 inputs; "height"/"width" give the original image size.
        score_thresh: keep detections scoring at least this.
        max_detections: keep at most this many (the highest scoring) per image.
        encoder_pixel: (x, y) in the original image: also return the last encoder layer's
            sampling for the query at that pixel of ``encoder_level``.

    Returns:
        per image, dict with "instances" (the kept detections), "detections" (list of
        :class:`DetectionSampling`, by decreasing score) and "encoder" (:class:`SampledQuery`
        or None).
    """
    if model.training:
        raise ValueError("explain_detections needs the model in eval mode (model.eval())")
    encoder_name, decoder_name = _attention_module_names(model)
    names = [decoder_name] if encoder_pixel is None else [decoder_name, encoder_name]
    with capture_sampling(model, names) as records:
        outputs = model(batched_inputs)
    decoder_record = _to_cpu(records[decoder_name][0])

    results = []
    for i, output in enumerate(outputs):
        instances = output["instances"].to("cpu")
        instances = instances[instances.scores >= score_thresh][:max_detections]
        output_size = instances.image_size
        detections = [
            DetectionSampling(
                box=instances.pred_boxes.tensor[k],
                score=float(instances.scores[k]),
                category=int(instances.pred_classes[k]),
                query_index=int(instances.query_indices[k]),
                sampling=sampled_query(
                    decoder_record, i, int(instances.query_indices[k]), output_size
                ),
            )
            for k in range(len(instances))
        ]
        encoder = None
        if encoder_pixel is not None:
            encoder_record = _to_cpu(records[encoder_name][0])
            query = encoder_query_index(encoder_record, i, encoder_pixel, output_size,
                                        encoder_level)
            encoder = sampled_query(encoder_record, i, query, output_size)
        results.append({"instances": instances, "detections": detections, "encoder": encoder})
    return results


def _to_cpu(record: SamplingRecord) -> SamplingRecord:
    return SamplingRecord(*(None if t is None else t.cpu() for t in record))


class SamplingPredictor:
    """
    Like Detectron2's ``DefaultPredictor`` (the model of ``cfg`` with ``MODEL.WEIGHTS``, the
    test-time resize of the evaluation), but returns :func:`explain_detections`'s result.
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg).eval()
        if cfg.MODEL.WEIGHTS:
            AtomicDetectionCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.augmentations = T.AugmentationList(build_detr_augmentation(cfg, is_train=False))
        self.input_format = cfg.INPUT.FORMAT

    def __call__(self, image_rgb: np.ndarray, **kwargs) -> Dict:
        """
        Args:
            image_rgb: (H, W, 3) uint8 RGB.
            kwargs: the options of :func:`explain_detections`.
        """
        image = convert_PIL_to_numpy(Image.fromarray(image_rgb), self.input_format)
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        inputs = {"image": tensor, "height": image_rgb.shape[0], "width": image_rgb.shape[1]}
        return explain_detections(self.model, [inputs], **kwargs)[0]


def draw_sampling(
    image_rgb: np.ndarray,
    sampling: SampledQuery,
    box: Optional[torch.Tensor] = None,
    label: Optional[str] = None,
    zoom: bool = False,
) -> np.ndarray:
    """
    Draws one query's sampling on the image: a dot per sampling point, coloured by level, its
    area proportional to its attention weight; the reference point as a white cross (and the
    reference box dashed when the reference is a box); ``box`` in white with ``label``; a legend
    giving each level's share of attention inside ``box``. ``zoom``: only the region around the
    boxes and the points of visible weight, its longer side enlarged to 400 pixels.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if zoom:
        image_rgb, sampling, box = _zoom(image_rgb, sampling, box)
    visualizer = Visualizer(image_rgb)
    output = visualizer.output
    max_radius = max(2.0, math.sqrt(image_rgb.shape[0] * image_rgb.shape[1]) / 60)
    line_width = max(1.0, max_radius / 6)
    if box is not None:
        visualizer.draw_box(box.tolist(), edge_color="white")
    if sampling.reference_box is not None:
        visualizer.draw_box(sampling.reference_box.tolist(), edge_color="lightgray",
                            line_style="--")

    weights = sampling.attention_weights
    points = sampling.sampling_points
    # Largest first, so that small dots stay visible on top.
    order = torch.argsort(weights.flatten(), descending=True)
    num_levels, num_points = weights.shape[1], weights.shape[2]
    max_weight = float(weights.max())
    for flat_index in order.tolist():
        level = flat_index // num_points % num_levels
        weight = float(weights.flatten()[flat_index])
        x, y = points.view(-1, 2)[flat_index].tolist()
        output.ax.add_patch(patches.Circle(
            (x, y), radius=max(1.0, max_radius * math.sqrt(weight / max_weight)),
            facecolor=LEVEL_COLORS[level % len(LEVEL_COLORS)], edgecolor="black",
            linewidth=line_width / 3, alpha=0.85,
        ))
    x, y = sampling.reference_point.tolist()
    output.ax.plot([x], [y], marker="X", markersize=max_radius * 1.5, color="white",
                   markeredgecolor="black", markeredgewidth=line_width / 2)

    shares = None if box is None else inside_box_share(sampling, box)
    legend = [(label, "white")] if label else []
    for level, (h, w) in enumerate(sampling.level_shapes):
        text = f"level {level} ({h}x{w})"
        if shares is not None:
            text += f": {float(shares[level]):.0%} in box"
        legend.append((text, LEVEL_COLORS[level % len(LEVEL_COLORS)]))
    font_size = visualizer._default_font_size
    for row, (text, color) in enumerate(legend):
        visualizer.draw_text(text, (4, 4 + row * font_size * 1.5), color=color,
                             horizontal_alignment="left")
    return output.get_image()


def _zoom(
    image_rgb: np.ndarray, sampling: SampledQuery, box: Optional[torch.Tensor], min_side=400
) -> Tuple[np.ndarray, SampledQuery, Optional[torch.Tensor]]:
    """The image cropped around the boxes and the points of visible weight, enlarged, with
    coordinates to match."""
    weights = sampling.attention_weights.flatten()
    visible = sampling.sampling_points.reshape(-1, 2)[weights >= 0.05 * weights.max()]
    corners = [visible, sampling.reference_point.view(1, 2)]
    corners += [b.view(2, 2) for b in (box, sampling.reference_box) if b is not None]
    corners = torch.cat(corners)
    low, high = corners.min(0).values, corners.max(0).values
    margin = max(16.0, 0.15 * float((high - low).max()))
    height, width = image_rgb.shape[:2]
    x0 = min(max(int(low[0] - margin), 0), width - 1)
    y0 = min(max(int(low[1] - margin), 0), height - 1)
    x1 = max(min(math.ceil(high[0] + margin), width), x0 + 1)
    y1 = max(min(math.ceil(high[1] + margin), height), y0 + 1)
    crop = image_rgb[y0:y1, x0:x1]
    scale = max(1.0, min_side / max(crop.shape[:2]))
    crop = cv2.resize(crop, (round(crop.shape[1] * scale), round(crop.shape[0] * scale)),
                      interpolation=cv2.INTER_CUBIC)
    offset = torch.tensor([float(x0), float(y0)])

    def move(points):
        return None if points is None else (points.view(-1, 2) - offset).mul(scale).view_as(points)

    zoomed = dataclasses.replace(
        sampling, reference_point=move(sampling.reference_point),
        reference_box=move(sampling.reference_box), sampling_points=move(sampling.sampling_points),
    )
    return crop, zoomed, move(box)


def write_detection_pictures(
    image_rgb: np.ndarray, result: Dict, out_dir: str, name: str,
    class_names: Optional[Sequence[str]] = None, max_pictures: Optional[int] = None,
    zoom: bool = False,
) -> List[str]:
    """
    Writes ``<name>_det<k>.png`` for each detection of ``result`` (a
    :func:`explain_detections` entry, at most ``max_pictures``) and ``<name>_encoder.png`` when
    it has the encoder's sampling; returns the paths. ``zoom``: see :func:`draw_sampling`.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k, detection in enumerate(result["detections"][:max_pictures]):
        category = (class_names[detection.category] if class_names
                    else f"class {detection.category}")
        label = f"{category} {detection.score:.0%}, query {detection.query_index}"
        picture = draw_sampling(image_rgb, detection.sampling, detection.box, label, zoom)
        paths.append(os.path.join(out_dir, f"{name}_det{k}.png"))
        cv2.imwrite(paths[-1], picture[:, :, ::-1])
    if result["encoder"] is not None:
        picture = draw_sampling(image_rgb, result["encoder"], label="encoder, last layer",
                                zoom=zoom)
        paths.append(os.path.join(out_dir, f"{name}_encoder.png"))
        cv2.imwrite(paths[-1], picture[:, :, ::-1])
    return paths


def explain_dataset(
    predictor: SamplingPredictor,
    dataset_dicts: Sequence[Dict],
    score_thresh: float,
    max_detections: Optional[int] = None,
    picture_dir: Optional[str] = None,
    num_picture_images: int = 0,
    pictures_per_image: int = 2,
    class_names: Optional[Sequence[str]] = None,
    zoom: bool = True,
) -> List[DetectionSampling]:
    """
    The detections of every image of a Detectron2 dataset with their sampling (for
    :func:`mean_inside_box_share`); writes the pictures (see :func:`draw_sampling` for
    ``zoom``) of the first ``num_picture_images`` images into ``picture_dir``.
    """
    detections = []
    for index, dataset_dict in enumerate(dataset_dicts):
        image = read_image(dataset_dict["file_name"], format="RGB")
        result = predictor(image, score_thresh=score_thresh, max_detections=max_detections)
        detections += result["detections"]
        if picture_dir is not None and index < num_picture_images:
            name = os.path.splitext(os.path.basename(dataset_dict["file_name"]))[0]
            write_detection_pictures(image, result, picture_dir, name, class_names,
                                     pictures_per_image, zoom)
    return detections
