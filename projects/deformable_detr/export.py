"""Export of the inference network to ``torch.export`` programs and ONNX files.

What is exported is :meth:`DeformableDETR.forward_network` for one fixed input size:
backbone, neck, transformer and the heads (the last decoder layer's outputs), on images already
normalized and padded, without Detectron2's post-processing (top-k and rescaling stay in Python:
:meth:`DeformableDETR.inference`). ``torch.export`` keeps the compiled attention op (traced
through its fake kernel); ONNX has no such op, so the ONNX export uses the pure-PyTorch
attention (``grid_sample``, ONNX GridSample).
"""

import warnings
from typing import Tuple

import torch
from torch import nn

from .layers.ms_deform_attn_op import use_implementation

__all__ = [
    "EXPORTERS",
    "ExportableDeformableDETR",
    "example_inputs",
    "export_onnx",
    "export_torch",
]


class ExportableDeformableDETR(nn.Module):
    """
    The network of a :class:`DeformableDETR` on tensors, for export.

    ``images`` (N, 3, H, W) normalized and padded, ``padding_mask`` (N, H, W) bool, True on
    padding (both as :meth:`DeformableDETR.preprocess_image` makes them) -> ``pred_logits``
    (N, Q, K) and ``pred_boxes`` (N, Q, 4) of the last decoder layer, boxes normalized
    (cx, cy, w, h) relative to each image's unpadded size, as ``forward_raw`` returns them.
    ``forward_raw`` itself does not export: ``ImageList`` computes the padded size as a tensor.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    def forward(
        self, images: torch.Tensor, padding_mask: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        raw = self.model.forward_network(images, padding_mask)
        return raw["pred_logits"][-1], raw["pred_boxes"][-1]


def example_inputs(model: nn.Module, height: int, width: int, batch_size: int = 1):
    """Random images of ``height`` x ``width`` pixels through ``model.preprocess_image``:
    the (images, padding_mask) that the exported program takes."""
    pixels = torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8)
    images, padding_mask = model.preprocess_image([{"image": image} for image in pixels])
    return images.tensor, padding_mask


def export_torch(model: nn.Module, inputs: Tuple[torch.Tensor, torch.Tensor], output: str):
    """Saves ``torch.export.export`` of ``ExportableDeformableDETR(model)`` on ``inputs``
    (images, padding_mask) to ``output`` (a ``.pt2`` file for ``torch.export.load``); returns
    the ExportedProgram. Needs the compiled op: the pure-PyTorch attention reads the levels'
    sizes from a tensor, which ``torch.export`` cannot trace."""
    with torch.no_grad(), use_implementation("compiled"):
        program = torch.export.export(ExportableDeformableDETR(model), tuple(inputs))
    torch.export.save(program, output)
    return program


def export_onnx(model: nn.Module, inputs: Tuple[torch.Tensor, torch.Tensor], output: str):
    """Writes ``ExportableDeformableDETR(model)`` on ``inputs`` (images, padding_mask) as ONNX
    (inputs "images", "padding_mask"; outputs "pred_logits", "pred_boxes") with the pure-PyTorch
    attention; returns the path.

    Uses the TorchScript-based exporter: the pure-PyTorch attention splits the value by the
    levels' sizes read from ``spatial_shapes``, which tracing with real tensors records as
    constants of the fixed input size, and which the dynamo exporter cannot read.
    """
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
    return output


EXPORTERS = {"torch_export": export_torch, "onnx": export_onnx}
