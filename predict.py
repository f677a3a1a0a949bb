#!/usr/bin/env python
"""Run a trained Deformable DETR on images or a video and draw its detections.

    python predict.py --config-file configs/demo/deformable_detr_mnv2_trees.yaml \
        --input photos/*.png --output out/ --opts MODEL.WEIGHTS output/demo/model_final.pth

``--input`` takes image files, globs, folders (every image inside) or one video file; without
``--output`` the results are shown in a window.
"""
import argparse
import glob
import os
import sys
import time

try:
    # First: the package silences the torch.jit.script warnings detectron2 causes at import.
    import deformable_detr  # noqa: F401
except ImportError as e:
    sys.exit(f"predict.py: {e}. Run `make setup` (or use .venv/bin/python).")
try:
    import cv2
    import numpy as np
    from detectron2.data import MetadataCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor
    from detectron2.utils.logger import setup_logger
    from detectron2.utils.visualizer import ColorMode, Visualizer

    from deformable_detr.engine import inference_config
    from deformable_detr.errors import UserInputError
except ImportError as e:
    sys.exit(f"predict.py: {e}. Run `make setup` (or use .venv/bin/python).")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")


def get_parser():
    parser = argparse.ArgumentParser(description="Deformable DETR demo (Detectron2)")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument(
        "--input", nargs="+", required=True,
        help="image files, globs or folders, or one video file",
    )
    parser.add_argument(
        "--output",
        help="folder for the drawn images (a file name is fine for one image or a video); "
        "without it, results are shown in a window",
    )
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5,
        help="minimum score of the detections drawn",
    )
    parser.add_argument("--device", help="e.g. cpu or cuda; default MODEL.DEVICE of the config")
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pth",
    )
    return parser


def expand_inputs(inputs):
    """Image paths from files, globs and folders, sorted within each argument."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = [os.path.join(item, f) for f in sorted(os.listdir(item))]
            paths += [p for p in found if p.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(item):
            paths.append(item)
        else:
            paths += sorted(glob.glob(os.path.expanduser(item)))
    if not paths:
        raise FileNotFoundError(f"--input {inputs} matches no file")
    return paths


def draw(predictor, metadata, image_rgb, threshold):
    """Detections above ``threshold`` drawn on an (H, W, 3) RGB image; returns it as RGB."""
    start = time.perf_counter()
    # DefaultPredictor takes BGR and converts to INPUT.FORMAT itself.
    instances = predictor(image_rgb[:, :, ::-1])["instances"].to("cpu")
    instances = instances[instances.scores >= threshold]
    elapsed = time.perf_counter() - start
    visualizer = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(instances).get_image(), len(instances), elapsed


def output_path(output, source, several):
    if os.path.isdir(output) or several or output.endswith(os.sep):
        os.makedirs(output, exist_ok=True)
        return os.path.join(output, os.path.basename(source))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    return output


def run_video(predictor, metadata, path, output, threshold):
    video = cv2.VideoCapture(path)
    if not video.isOpened():
        raise RuntimeError(f"Cannot open video {path}")
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    writer = None
    while True:
        ok, frame = video.read()
        if not ok:
            break
        drawn, _, _ = draw(predictor, metadata, frame[:, :, ::-1], threshold)
        drawn = np.ascontiguousarray(drawn[:, :, ::-1])
        if output is None:
            cv2.imshow(os.path.basename(path), drawn)
            if cv2.waitKey(1) == 27:  # Esc
                break
            continue
        if writer is None:
            target = output_path(output, os.path.splitext(path)[0] + ".mp4", False)
            writer = cv2.VideoWriter(
                target, cv2.VideoWriter_fourcc(*"mp4v"), fps, (drawn.shape[1], drawn.shape[0])
            )
        writer.write(drawn)
    video.release()
    if writer is not None:
        writer.release()


def main(args):
    logger = setup_logger(name="demo")
    try:
        cfg = inference_config(args.config_file, args.opts, args.device)
    except UserInputError as error:
        sys.exit(f"predict.py: error: {error}")
    predictor = DefaultPredictor(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    if len(args.input) == 1 and args.input[0].lower().endswith(VIDEO_EXTENSIONS):
        run_video(predictor, metadata, args.input[0], args.output, args.confidence_threshold)
        return
    paths = expand_inputs(args.input)
    for path in paths:
        image = read_image(path, format="RGB")
        drawn, count, elapsed = draw(predictor, metadata, image, args.confidence_threshold)
        logger.info(f"{path}: {count} detections in {elapsed:.2f}s")
        if args.output:
            cv2.imwrite(output_path(args.output, path, len(paths) > 1), drawn[:, :, ::-1])
        else:
            cv2.imshow("Deformable DETR", drawn[:, :, ::-1])
            if cv2.waitKey(0) == 27:  # Esc
                break


if __name__ == "__main__":
    main(get_parser().parse_args())
