#!/usr/bin/env python
"""Draws where Deformable DETR looks: for each detection, its query's reference point and the
points its last decoder layer sampled (every head and level; dot area = attention weight, colour
= level), and prints the share of attention that falls inside the detected box.

    tools/visualize_sampling.py --config-file configs/demo/deformable_detr_mnv2_trees.yaml \\
        --input photo.png --output out/ MODEL.WEIGHTS output/demo/model_final.pth

writes ``out/<image>_det<k>.png`` per detection (highest score first) and, with
``--encoder-pixel X Y``, ``out/<image>_encoder.png``: the last encoder layer's sampling for the
query at that pixel. Library: ``deformable_detr.visualization``.
"""

import argparse
import os
import sys

try:
    # First: the package silences the torch.jit.script warnings detectron2 causes at import.
    import deformable_detr  # noqa: F401
except ImportError as e:
    sys.exit(f"visualize_sampling.py: {e}. Run `make setup` (or use .venv/bin/python).")
try:
    from detectron2.data import MetadataCatalog
    from detectron2.data.detection_utils import read_image

    from deformable_detr.engine import inference_config
    from deformable_detr.errors import UserInputError
    from deformable_detr.visualization import (
        SamplingPredictor,
        mean_inside_box_share,
        write_detection_pictures,
    )
except ImportError as error:
    sys.exit(f"visualize_sampling.py: {error}. Run `make setup` (or use .venv/bin/python).")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", required=True, nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the pictures")
    parser.add_argument("--score-thresh", type=float, default=0.3,
                        help="draw the detections scoring at least this (default 0.3)")
    parser.add_argument("--max-detections", type=int, default=10,
                        help="at most this many pictures per image (default 10)")
    parser.add_argument("--encoder-pixel", type=float, nargs=2, metavar=("X", "Y"),
                        help="also draw the last encoder layer's sampling for this pixel")
    parser.add_argument("--encoder-level", type=int, default=0,
                        help="feature level of the encoder query at --encoder-pixel (default 0)")
    parser.add_argument("--zoom", action="store_true",
                        help="draw only the region around each query's points, enlarged")
    parser.add_argument("--device", help="e.g. cpu or cuda; default MODEL.DEVICE of the config")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for path in [args.config_file, *args.input]:
        if not os.path.isfile(path):
            sys.exit(f"visualize_sampling.py: no such file: {path}")
    try:
        cfg = inference_config(args.config_file, args.opts, args.device)
    except UserInputError as error:
        sys.exit(f"visualize_sampling.py: {error}")
    predictor = SamplingPredictor(cfg)
    class_names = (
        MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes") if cfg.DATASETS.TEST
        else None
    )
    for path in args.input:
        image = read_image(path, format="RGB")
        result = predictor(
            image, score_thresh=args.score_thresh, max_detections=args.max_detections,
            encoder_pixel=args.encoder_pixel, encoder_level=args.encoder_level,
        )
        name = os.path.splitext(os.path.basename(path))[0]
        written = write_detection_pictures(
            image, result, args.output, name, class_names, zoom=args.zoom
        )
        share = mean_inside_box_share(result["detections"])
        summary = "no detection above the threshold" if share is None else (
            "attention inside the box: "
            + ", ".join(f"level {lvl} {float(s):.1%}" for lvl, s in enumerate(share[:-1]))
            + f", all levels {float(share[-1]):.1%}"
        )
        print(f"{path}: {len(result['detections'])} detections, {len(written)} pictures in "
              f"{args.output}; {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
