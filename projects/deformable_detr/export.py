"""Export of the inference network to ``torch.export`` programs and ONNX files, and their check.

What is exported is :meth:`DeformableDETR.raw_outputs_from_tensors`: backbone, neck, transformer
and the heads (the last decoder layer's outputs), on images already normalized and padded, without
Detectron2's post-processing (top-k and test-time NMS stay in Python:
:func:`deformable_detr.modeling.select_detections`, which needs no model).

- ``torch.export`` keeps the compiled attention op (traced through its fake kernel) and takes any
  image size of at least :data:`MIN_DYNAMIC_SIZE` pixels a side (``torch.export.Dim``).
- ONNX has no such op, so the ONNX export uses the pure-PyTorch attention (``grid_sample``, ONNX
  GridSample), which splits the value by level sizes recorded as constants: an ONNX file serves
  one input size, stored in its metadata (``input_height``, ``input_width``); smaller images are
  padded to it (:func:`prepare_inputs`). The two-stage proposal NMS becomes ONNX
  ``NonMaxSuppression`` (torchvision's symbolic: IoU strictly above the threshold suppresses).

:func:`verify_export` runs an exported file on inputs other than the traced ones and compares
it with the eager model; ``tools/export_model.py`` deletes a file that fails the comparison.
"""

import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers.ms_deform_attn_op import use_implementation

__all__ = [
    "EXPORTERS",
    "MIN_DYNAMIC_SIZE",
    "ExportMismatchError",
    "ExportableDeformableDETR",
    "example_inputs",
    "export_onnx",
    "export_torch",
    "load_image",
    "prepare_inputs",
    "random_image_batches",
    "load_exported",
    "verify_export",
]

# torch.export specializes a dimension of size 1: every level, down to stride 64, needs >= 2.
MIN_DYNAMIC_SIZE = 128
MAX_DYNAMIC_SIZE = 4096


class ExportMismatchError(RuntimeError):
    """An exported file's outputs differ from the eager model's beyond the tolerance."""


class ExportableDeformableDETR(nn.Module):
    """
    The network of a :class:`DeformableDETR` on tensors, for export.

    ``images`` (N, 3, H, W) normalized and padded, ``padding_mask`` (N, H, W) bool, True on
    padding (both as :meth:`DeformableDETR.preprocess_image` makes them) -> ``pred_logits``
    (N, Q, K) and ``pred_boxes`` (N, Q, 4) of the last decoder layer, boxes normalized
    (cx, cy, w, h) relative to each image's unpadded size, as ``raw_outputs`` returns them.
    ``raw_outputs`` itself does not export: ``ImageList`` computes the padded size as a tensor.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(
        self, images: torch.Tensor, padding_mask: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        raw = self.model.raw_outputs_from_tensors(images, padding_mask)
        return raw["pred_logits"][-1], raw["pred_boxes"][-1]


def prepare_inputs(
    model: nn.Module, images: Sequence[torch.Tensor], size: Optional[Tuple[int, int]] = None
) -> Tuple[torch.Tensor, torch.Tensor, List[Tuple[int, int]]]:
    """
    The exported program's inputs for ``images``: (C, h, w) tensors in ``INPUT.FORMAT``, already
    resized as for the eager model (e.g. by ``ResizeShortestEdge``, as ``DefaultPredictor``).

    With ``size`` = (H, W), the fixed input size of an ONNX file, an image larger than it is
    first scaled down to fit (aspect kept) and every image is padded to exactly H x W.

    Returns:
        images (N, 3, H, W) normalized and padded, padding_mask (N, H, W) bool, and the N
        (h, w) image sizes by which the predicted boxes are normalized.
    """
    if size is not None:
        fitted = []
        for image in images:
            h, w = image.shape[-2:]
            scale = min(size[0] / h, size[1] / w)
            if scale < 1:
                new_size = (max(1, int(h * scale)), max(1, int(w * scale)))
                image = F.interpolate(image[None].float(), size=new_size, mode="bilinear")[0]
            fitted.append(image)
        images = fitted
    image_list, padding_mask = model.preprocess_image([{"image": image} for image in images])
    tensor = image_list.tensor
    if size is not None:
        pad_h, pad_w = size[0] - tensor.shape[-2], size[1] - tensor.shape[-1]
        tensor = F.pad(tensor, (0, pad_w, 0, pad_h))
        padding_mask = F.pad(padding_mask, (0, pad_w, 0, pad_h), value=True)
    return tensor, padding_mask, list(image_list.image_sizes)


def load_image(cfg, path: str) -> torch.Tensor:
    """The image file at ``path`` as the eager model sees it under ``DefaultPredictor``: read in
    ``cfg.INPUT.FORMAT`` and resized to ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``; (C, h, w)."""
    from detectron2.data import transforms as T
    from detectron2.data.detection_utils import read_image

    image = read_image(path, format=cfg.INPUT.FORMAT)
    resize = T.ResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
    )
    image = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def example_inputs(model: nn.Module, height: int, width: int, batch_size: int = 1):
    """Random images of ``height`` x ``width`` pixels through ``model.preprocess_image``:
    the (images, padding_mask) that the exported program takes."""
    pixels = torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8)
    images, padding_mask, _ = prepare_inputs(model, list(pixels))
    return images, padding_mask


def export_torch(
    model: nn.Module, inputs: Tuple[torch.Tensor, torch.Tensor], output: str,
    dynamic_size: bool = True,
):
    """
    Saves ``torch.export.export`` of ``ExportableDeformableDETR(model)`` on ``inputs``
    (images, padding_mask) to ``output`` (a ``.pt2`` file for ``torch.export.load``); returns the
    ExportedProgram. With ``dynamic_size`` the program takes any height and width in
    [:data:`MIN_DYNAMIC_SIZE`, 4096], and the example must lie in that range. Needs the compiled
    op: the pure-PyTorch attention reads the levels' sizes from a tensor, which ``torch.export``
    cannot trace.
    """
    dynamic_shapes = None
    if dynamic_size:
        height, width = inputs[0].shape[-2:]
        if min(height, width) < MIN_DYNAMIC_SIZE:
            raise ValueError(
                f"a torch.export program of dynamic size needs an example of at least "
                f"{MIN_DYNAMIC_SIZE} x {MIN_DYNAMIC_SIZE} pixels, got {height} x {width}"
            )
        dims = [
            torch.export.Dim(name, min=MIN_DYNAMIC_SIZE, max=MAX_DYNAMIC_SIZE)
            for name in ("height", "width")
        ]
        dynamic_shapes = ({2: dims[0], 3: dims[1]}, {1: dims[0], 2: dims[1]})
    with torch.no_grad(), use_implementation("compiled"):
        program = torch.export.export(
            ExportableDeformableDETR(model), tuple(inputs), dynamic_shapes=dynamic_shapes
        )
    torch.export.save(program, output)
    return program


def export_onnx(model: nn.Module, inputs: Tuple[torch.Tensor, torch.Tensor], output: str):
    """Writes ``ExportableDeformableDETR(model)`` on ``inputs`` (images, padding_mask) as ONNX
    (inputs "images", "padding_mask"; outputs "pred_logits", "pred_boxes") with the pure-PyTorch
    attention, for the input size of ``inputs`` (stored in the file's metadata with the
    normalization the inputs need); returns the path.

    Uses the TorchScript-based exporter: the pure-PyTorch attention splits the value by the
    levels' sizes read from ``spatial_shapes``, which tracing with real tensors records as
    constants of the fixed input size, and which the dynamo exporter cannot read.
    """
    import onnx

    with torch.no_grad(), use_implementation("pytorch"), warnings.catch_warnings():
        # Shapes turned into constants are expected: the input size is fixed.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            ExportableDeformableDETR(model),
            tuple(inputs),
            output,
            input_names=["images", "padding_mask"],
            output_names=["pred_logits", "pred_boxes"],
            opset_version=17,
            dynamo=False,
        )
    proto = onnx.load(output)
    metadata = {
        "input_height": inputs[0].shape[-2],
        "input_width": inputs[0].shape[-1],
        "pixel_mean": model.pixel_mean.flatten().tolist(),
        "pixel_std": model.pixel_std.flatten().tolist(),
    }
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=str(value))
    onnx.save(proto, output)
    return output


EXPORTERS = {"torch_export": export_torch, "onnx": export_onnx}


def load_exported(
    output_format: str, path: str
) -> Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """The exported file at ``path`` as a function (images, padding_mask) -> (pred_logits,
    pred_boxes), run by ``torch.export.load`` or onnxruntime (CPU)."""
    if output_format == "torch_export":
        module = torch.export.load(path).module()

        def run(images, padding_mask):
            with torch.no_grad():
                return tuple(module(images, padding_mask))

        return run
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(images, padding_mask):
        outputs = session.run(
            ["pred_logits", "pred_boxes"],
            {"images": images.numpy(), "padding_mask": padding_mask.numpy()},
        )
        return tuple(torch.from_numpy(output) for output in outputs)

    return run


def _detections(model: nn.Module, pred_logits, pred_boxes, image_sizes) -> List[Dict]:
    """The model's post-processing (:func:`select_detections`) of raw outputs: per image a dict
    of "boxes" (K, 4) XYXY pixels, "scores" (K,) and "classes" (K,)."""
    instances = model.inference(pred_logits, pred_boxes, image_sizes)
    return [
        {"boxes": i.pred_boxes.tensor, "scores": i.scores, "classes": i.pred_classes}
        for i in instances
    ]


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def verify_export(
    model: nn.Module,
    run: Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
    batches: Sequence[Tuple[torch.Tensor, torch.Tensor, List[Tuple[int, int]]]],
    atol: float = 1e-3,
) -> Dict[str, float]:
    """
    Compares ``run`` (an exported file's outputs) with the eager model on ``batches`` of
    :func:`prepare_inputs` results: raw logits and boxes, then the detections after
    post-processing (scores, classes, boxes normalized by the image size).

    Returns:
        the largest absolute difference of each compared output.

    Raises:
        ExportMismatchError: naming each output that differs by more than ``atol``.
    """
    differences = {name: 0.0 for name in ("pred_logits", "pred_boxes", "scores", "classes",
                                          "boxes")}
    with torch.no_grad():
        for images, padding_mask, image_sizes in batches:
            expected = ExportableDeformableDETR(model)(images, padding_mask)
            exported = run(images, padding_mask)
            for name, a, b in zip(("pred_logits", "pred_boxes"), exported, expected):
                differences[name] = max(differences[name], _max_difference(a, b))
            for got, want, (h, w) in zip(
                _detections(model, *exported, image_sizes),
                _detections(model, *expected, image_sizes),
                image_sizes,
            ):
                scale = torch.tensor([w, h, w, h], dtype=torch.float64)
                differences["scores"] = max(
                    differences["scores"], _max_difference(got["scores"], want["scores"])
                )
                same_classes = got["classes"].shape == want["classes"].shape and bool(
                    (got["classes"] == want["classes"]).all()
                )
                differences["classes"] = max(differences["classes"], 0.0 if same_classes else 1.0)
                differences["boxes"] = max(
                    differences["boxes"],
                    _max_difference(got["boxes"].double() / scale, want["boxes"].double() / scale),
                )
    failed = {name: value for name, value in differences.items() if not value <= atol}
    if failed:
        details = ", ".join(
            f"{name} by {value:.3g}" if name != "classes" else "the detected classes"
            for name, value in failed.items()
        )
        raise ExportMismatchError(
            f"the exported model differs from the eager model (tolerance {atol:g}): {details}"
        )
    return differences


def random_image_batches(
    model: nn.Module, size: Tuple[int, int], fixed_size: bool, batch_size: int = 1,
    count: int = 3, seed: int = 0,
):
    """``count`` batches of random images of different sizes, so that the padding masks are
    real: for a fixed-size file from half of ``size`` to ``size``, for a dynamic one from
    :data:`MIN_DYNAMIC_SIZE` to 1.25 x ``size``; for :func:`verify_export` when no real image is
    at hand."""
    generator = np.random.default_rng(seed)
    if fixed_size:
        ranges = [(side // 2, side) for side in size]
    else:
        ranges = [(MIN_DYNAMIC_SIZE, max(MIN_DYNAMIC_SIZE, side * 5 // 4)) for side in size]
    batches = []
    for _ in range(count):
        images = []
        for _ in range(batch_size):
            h, w = (int(generator.integers(low, high + 1)) for low, high in ranges)
            images.append(torch.from_numpy(generator.integers(0, 256, (3, h, w), dtype=np.uint8)))
        batches.append(prepare_inputs(model, images, size if fixed_size else None))
    return batches
