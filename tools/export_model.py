#!/usr/bin/env python
"""Exports the Deformable DETR network and checks the exported file against the eager model.

    tools/export_model.py --config-file configs/demo/deformable_detr_mnv2_trees.yaml \\
        --format onnx --output demo.onnx MODEL.WEIGHTS output/demo/model_final.pth
    tools/export_model.py --config-file ... --format torch_export --output model.pt2 \\
        MODEL.WEIGHTS ...

The exported program takes ``images`` (N, 3, H, W) in INPUT.FORMAT, normalized with
MODEL.PIXEL_MEAN/STD and padded, and ``padding_mask`` (N, H, W) bool (True on padding); it returns
``pred_logits`` (N, Q, K) and ``pred_boxes`` (N, Q, 4), (cx, cy, w, h) normalized by each image's
unpadded size. A torch_export program takes any H, W >= 128; an ONNX file takes the one size
--height x --width (in its metadata: input_height, input_width), smaller images padded to it.

After writing, the file is run on images other than the traced example (--check-image files,
else the first images of DATASETS.TEST when that data set is prepared, else random images of
several sizes) and compared with the eager model: raw logits and boxes, and the detections after
post-processing (top-k, test-time NMS). Above --atol the file is deleted and the tool exits 1.

Running an exported file on an image, end to end (README.md, "Export", has a numpy-only one):

    from deformable_detr.export import load_image, prepare_inputs
    from deformable_detr.modeling import select_detections
    image = load_image(cfg, "tile.png")        # read in INPUT.FORMAT, resized as DefaultPredictor
    images, mask, sizes = prepare_inputs(model, [image], (H, W))   # (H, W): None for a .pt2
    # onnxruntime
    session = onnxruntime.InferenceSession("demo.onnx", providers=["CPUExecutionProvider"])
    logits, boxes = session.run(None, {"images": images.numpy(), "padding_mask": mask.numpy()})
    # or torch.export
    logits, boxes = torch.export.load("demo.pt2").module()(images, mask)
    # the model's top-k and NMS: TEST.DETECTIONS_PER_IMAGE, MODEL.DEFORMABLE_DETR.NMS_THRESH_TEST
    (found,) = select_detections(torch.as_tensor(logits), torch.as_tensor(boxes), sizes, 100, 0.6)
"""

import argparse
import os
import sys

try:
    # First: the package silences the torch.jit.script warnings detectron2 causes at import.
    import deformable_detr  # noqa: F401
except ImportError as e:
    sys.exit(f"export_model.py: {e}. Run `make setup` (or use .venv/bin/python).")
try:
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    from deformable_detr.checkpoint import AtomicDetectionCheckpointer
    from deformable_detr.engine import inference_config
    from deformable_detr.errors import UserInputError
    from deformable_detr.export import (
        EXPORTERS,
        ExportMismatchError,
        example_inputs,
        load_exported,
        load_image,
        prepare_inputs,
        random_image_batches,
        verify_export,
    )
except ImportError as error:
    sys.exit(f"export_model.py: {error}. Run `make setup` (or use .venv/bin/python).")

NUM_DATASET_CHECK_IMAGES = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", choices=sorted(EXPORTERS), default="torch_export")
    parser.add_argument("--output", required=True, metavar="FILE")
    parser.add_argument(
        "--height", type=int,
        help="example input height; the fixed height of an ONNX file (default INPUT.MIN_SIZE_TEST)",
    )
    parser.add_argument(
        "--width", type=int,
        help="example input width; the fixed width of an ONNX file (default INPUT.MAX_SIZE_TEST)",
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--atol", type=float, default=1e-3,
        help="largest accepted |exported - eager| on logits, boxes and detections",
    )
    parser.add_argument(
        "--check-image", action="append", default=[], metavar="FILE",
        help="an image to compare exported and eager outputs on (repeatable)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser.parse_args(argv)


def dataset_images(cfg):
    """Paths of the first images of DATASETS.TEST, or [] when it is not at hand."""
    if not cfg.DATASETS.TEST:
        return []
    try:
        records = DatasetCatalog.get(cfg.DATASETS.TEST[0])
    except Exception:  # not registered, not prepared, or its files are missing: use random images
        return []
    paths = [record["file_name"] for record in records[:NUM_DATASET_CHECK_IMAGES]]
    return [path for path in paths if os.path.isfile(path)]


def check_batches(cfg, model, args, size, fixed_size):
    """The inputs the exported file is compared on (batches of --batch-size, the size it was
    exported with), and a description of them."""
    paths = args.check_image or dataset_images(cfg)
    if not paths:
        batches = random_image_batches(model, size, fixed_size, args.batch_size)
        return batches, (
            f"{len(batches)} batches of random images of sizes up to {size[0]}x{size[1]}"
        )
    images = [load_image(cfg, path) for path in paths]
    # Repeat images to fill the last batch.
    count = -(-len(images) // args.batch_size) * args.batch_size
    images = [images[i % len(images)] for i in range(count)]
    batches = [
        prepare_inputs(model, images[i : i + args.batch_size], size if fixed_size else None)
        for i in range(0, len(images), args.batch_size)
    ]
    return batches, ", ".join(paths)


def main(argv=None):
    args = parse_args(argv)
    if args.format == "torch_export" and not args.output.endswith(".pt2"):
        sys.exit(f"export_model.py: a torch_export file is named *.pt2, got {args.output!r}")
    for path in args.check_image:
        if not os.path.isfile(path):
            sys.exit(f"export_model.py: --check-image {path!r} does not exist")
    try:
        # Exported on CPU; torch.export programs can be moved afterwards.
        cfg = inference_config(args.config_file, args.opts, device="cpu")
    except UserInputError as error:
        sys.exit(f"export_model.py: {error}")

    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        AtomicDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    size = (args.height or cfg.INPUT.MIN_SIZE_TEST, args.width or cfg.INPUT.MAX_SIZE_TEST)
    inputs = example_inputs(model, *size, args.batch_size)
    EXPORTERS[args.format](model, inputs, args.output)

    fixed_size = args.format == "onnx"
    batches, described = check_batches(cfg, model, args, size, fixed_size)
    try:
        differences = verify_export(
            model, load_exported(args.format, args.output), batches, args.atol
        )
    except ExportMismatchError as error:
        os.remove(args.output)
        print(f"export_model.py: {error}, on {described}. {args.output} was not kept.",
              file=sys.stderr)
        return 1
    print(
        f"Exported {args.format} to {args.output} (input {'fixed at' if fixed_size else 'example'}"
        f" {size[0]}x{size[1]}); checked on {described}: max |exported - eager| = "
        + ", ".join(f"{name} {value:.2e}" for name, value in differences.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
