#!/usr/bin/env python
"""Exports the Deformable DETR network for one fixed input size (see deformable_detr/export.py).

    tools/export_model.py --config-file configs/deformable_detr_R50_50ep.yaml \\
        --format torch_export --output model.pt2 --height 800 --width 1216 MODEL.WEIGHTS model.pth
    tools/export_model.py --config-file ... --format onnx --output model.onnx MODEL.WEIGHTS ...

The exported program takes ``images`` (N, 3, H, W) normalized with MODEL.PIXEL_MEAN/STD and
``padding_mask`` (N, H, W) bool, and returns ``pred_logits`` (N, Q, K) and ``pred_boxes``
(N, Q, 4) normalized (cx, cy, w, h). After exporting, the tool runs it on random images and
prints its largest difference to the eager model.
"""

import argparse
import sys

try:
    import numpy as np
    import torch
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from deformable_detr import add_deformable_detr_config
    from deformable_detr.checkpoint import AtomicDetectionCheckpointer
    from deformable_detr.export import EXPORTERS, ExportableDeformableDETR, example_inputs
except ImportError as error:
    sys.exit(f"export_model.py: {error}. Run `make setup` (or use .venv/bin/python).")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", choices=sorted(EXPORTERS), default="torch_export")
    parser.add_argument("--output", required=True, metavar="FILE")
    parser.add_argument("--height", type=int, help="input height (default: INPUT.MIN_SIZE_TEST)")
    parser.add_argument("--width", type=int, help="input width (default: INPUT.MIN_SIZE_TEST)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser.parse_args(argv)


def run_exported(output_format, path, inputs):
    """Runs the exported file on ``inputs``; returns its two outputs as numpy arrays."""
    if output_format == "torch_export":
        outputs = torch.export.load(path).module()(*inputs)
        return [output.detach().numpy() for output in outputs]
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_inputs()]
    return session.run(None, {name: value.numpy() for name, value in zip(names, inputs)})


def main(argv=None):
    args = parse_args(argv)
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "cpu"  # exported on CPU; torch.export programs can be moved afterwards
    cfg.freeze()

    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        AtomicDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    height = args.height or cfg.INPUT.MIN_SIZE_TEST
    width = args.width or cfg.INPUT.MIN_SIZE_TEST
    inputs = example_inputs(model, height, width, args.batch_size)
    EXPORTERS[args.format](model, inputs, args.output)

    with torch.no_grad():
        expected = ExportableDeformableDETR(model)(*inputs)
    outputs = run_exported(args.format, args.output, inputs)
    difference = max(
        float(np.abs(output - reference.numpy()).max())
        for output, reference in zip(outputs, expected)
    )
    print(f"Exported {args.format} to {args.output}: inputs images {tuple(inputs[0].shape)}, "
          f"padding_mask {tuple(inputs[1].shape)}; max |exported - eager| = {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
