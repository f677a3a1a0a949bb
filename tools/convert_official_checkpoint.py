#!/usr/bin/env python
"""
Convert an official Deformable DETR checkpoint (fundamentalvision/Deformable-DETR ``.pth``) or a
HuggingFace ``DeformableDetrForObjectDetection`` state dict (``pytorch_model.bin`` /
``model.safetensors``) into a checkpoint of this plugin, checked against the model of a config:

    python tools/convert_official_checkpoint.py --input r50_deformable_detr-checkpoint.pth \\
        --output output/official/r50_deformable_detr.pth

The config defaults to the ``configs/official/`` file of the variant read from the weights. DC5
cannot be told from the weights; evaluate the DC5 checkpoint with
``configs/official/r50_deformable_detr_single_scale_dc5.yaml``.
"""

import argparse
import os
import sys

try:
    from detectron2.config import get_cfg

    import deformable_detr.modeling  # noqa: F401  (registers the DeformableDETR meta-architecture)
    from deformable_detr.checkpoint import (
        CheckpointConversionError,
        convert_state_dict,
        load_source_state_dict,
        write_converted_checkpoint,
    )
    from deformable_detr.config import add_deformable_detr_config
except ImportError as e:
    sys.exit(f"convert_official_checkpoint.py: {e}. Run `make setup` (or use .venv/bin/python).")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL_CONFIGS = os.path.join(REPO_ROOT, "configs", "official")


def default_config_file(variant) -> str:
    if variant.two_stage:
        name = "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.yaml"
    elif variant.with_box_refine:
        name = "r50_deformable_detr_plus_iterative_bbox_refinement.yaml"
    elif variant.num_feature_levels == 1:
        name = "r50_deformable_detr_single_scale.yaml"
    else:
        name = "r50_deformable_detr.yaml"
    return os.path.normpath(os.path.join(OFFICIAL_CONFIGS, name))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="official .pth, or HF .bin/.safetensors")
    parser.add_argument("--output", required=True, help="converted checkpoint to write")
    parser.add_argument("--source", choices=["official", "hf"], default="official")
    parser.add_argument(
        "--config-file", default="", help="config to check against (default: by variant)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)

    try:
        if os.path.abspath(args.input) == os.path.abspath(args.output):
            raise CheckpointConversionError("--output must differ from --input")
        converted, variant = convert_state_dict(load_source_state_dict(args.input), args.source)
        print(f"Detected: {variant.describe()}")
        config_file = args.config_file or default_config_file(variant)
        cfg = get_cfg()
        add_deformable_detr_config(cfg)
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(args.opts)
        write_converted_checkpoint(converted, variant, cfg, args.output)
    except CheckpointConversionError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {args.output}: {len(converted)} tensors, matching {config_file}")
    if variant.num_feature_levels == 1 and not cfg.MODEL.RESNETS.RES5_DILATION > 1:
        dc5 = os.path.join(OFFICIAL_CONFIGS, "r50_deformable_detr_single_scale_dc5.yaml")
        print(f"If this is the DC5 checkpoint, evaluate it with {os.path.normpath(dc5)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
