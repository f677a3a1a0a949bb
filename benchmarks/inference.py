"""End-to-end inference speed of the plugin against HuggingFace's Deformable DETR.

    python benchmarks/inference.py [--device cpu|cuda] [--threads 2] [--dtype fp32|fp16|bf16]
                                   [--iters 10] [--quick] [--with-bf16 [--demo-weights PATH]]

What one timed call does, as ``DefaultPredictor.__call__`` after its resize (the input is an
already resized RGB uint8-range float image, batch 1, in eval mode under ``torch.no_grad``):

- plugin: ``model([{"image", "height", "width"}])``: normalization and padding, backbone, neck,
  encoder, decoder, heads, top-100 (query, class) selection and ``detector_postprocess``.
- HF: the same normalization and an all-valid ``pixel_mask``, ``DeformableDetrForObjectDetection``
  (timm ResNet-50, its pure-PyTorch ``grid_sample`` attention), then its image processor's
  ``post_process_object_detection`` (top-100, boxes scaled to the image).

Models: the multi-scale R50 model (``configs/deformable_detr_R50_50ep.yaml``) at 800x1333, with
random weights shared with the HF peer through ``deformable_detr.checkpoint`` (the
logits and boxes of both are compared), and the demo model
(``configs/demo/deformable_detr_mnv2_trees.yaml``) on a 400x400 tile, which has no HF peer
(see ``NO_HF_PEER``). Each model also runs with the pure-PyTorch op
(``DEFORMABLE_DETR_MSDA_IMPL=pytorch``) to isolate the compiled op's share. The candidates take
turns every iteration; images/s is 1 / mean latency.

``--with-bf16`` adds a row of the plugin (compiled op) under bfloat16 autocast beside the float32
rows, with the largest differences of its logits and boxes from float32; on a CPU without
bfloat16 instructions (AVX512-BF16 or AMX) it says so and adds no row. With ``--demo-weights``
(a trained demo model, e.g. ``output/demo/model_final.pth``) it also evaluates that model on
``trees_val`` with ``COCOEvaluator`` in float32 and under bfloat16 autocast and prints the change
in AP and AP50.
"""

import importlib.util
import os
import sys

import torch
from benchmark_utils import (
    DEMO_CONFIG,
    R50_CONFIG,
    autocast,
    build,
    end_note,
    hf_peer_and_plugin,
    load_cfg,
    machine,
    model_benchmark_parser,
    parse_model_benchmark_args,
    percentile,
    setup_threads,
    time_round_robin,
)

from deformable_detr.checkpoint import AtomicDetectionCheckpointer
from deformable_detr.engine import Trainer, cpu_bfloat16_unsupported_reason
from deformable_detr.layers.ms_deform_attn_op import use_implementation
from deformable_detr.utils.testing import randomize_

# A shallower transformer with fewer queries for --quick (same backbone and op).
QUICK_OPTS = [
    "MODEL.DEFORMABLE_DETR.ENC_LAYERS", "2",
    "MODEL.DEFORMABLE_DETR.DEC_LAYERS", "2",
    "MODEL.DEFORMABLE_DETR.NUM_QUERIES", "50",
    "MODEL.DEFORMABLE_DETR.TWO_STAGE.NUM_PROPOSALS", "50",
]
# Why the demo model has no HF peer.
NO_HF_PEER = (
    "the converter maps ResNet-50 COCO models only, and HF cannot build this one: freezing "
    "BatchNorm replaces timm MobileNetV2's BatchNormAct2d by a plain BN, dropping its ReLU6"
)
# name -> (config, input (H, W), --quick input (H, W))
MODELS = {
    "R50 multi-scale": (R50_CONFIG, (800, 1333), (128, 213)),
    "demo MobileNetV2": (DEMO_CONFIG, (400, 400), (128, 128)),
}


def random_image(height, width, device):
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(3, height, width, generator=generator) * 255).to(device)


def plugin_candidate(model, image, impl, args, dtype=None):
    inputs = [{"image": image, "height": image.shape[1], "width": image.shape[2]}]

    def run():
        with use_implementation(impl), torch.no_grad(), autocast(args.device, dtype or args.dtype):
            return model(inputs)

    return run


def hf_candidate(hf, image, pixel_mean, pixel_std, args):
    from transformers import DeformableDetrImageProcessor

    processor = DeformableDetrImageProcessor()
    target_sizes = [tuple(image.shape[1:])]

    def run():
        with torch.no_grad(), autocast(args.device, args.dtype):
            pixel_values = ((image - pixel_mean) / pixel_std)[None]
            pixel_mask = torch.ones_like(pixel_values[:, 0], dtype=torch.long)
            outputs = hf(pixel_values=pixel_values, pixel_mask=pixel_mask)
            return processor.post_process_object_detection(
                outputs, threshold=0.0, target_sizes=target_sizes, top_k=100
            )

    return run


def profile_candidates(name, candidates, row_limit=12):
    """Tables of the operators taking the most self CPU time in one call of each candidate."""
    tables = []
    for impl, run in candidates.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)
        tables.append(f"\n# profile of one call: {name}, {impl}\n{table}")
    return tables


def hf_diffs(model, image, hf, rows, args):
    """Max abs differences of the last decoder layer's logits and boxes: plugin vs HF."""
    with torch.no_grad(), autocast(args.device, args.dtype):
        raw = model.raw_outputs([{"image": image}])
        pixel_values = ((image - model.pixel_mean) / model.pixel_std)[None]
        outputs = hf(pixel_values=pixel_values, pixel_mask=torch.ones_like(pixel_values[:, 0]))
    logits = (raw["pred_logits"][-1].float() - outputs.logits[..., rows].float()).abs().max()
    boxes = (raw["pred_boxes"][-1].float() - outputs.pred_boxes.float()).abs().max()
    return logits.item(), boxes.item()


def bf16_diffs(model, image, args):
    """Max abs differences of logits and boxes: bfloat16 autocast vs float32, compiled op."""
    raws = []
    for dtype in ("bf16", "fp32"):
        with use_implementation("compiled"), torch.no_grad(), autocast(args.device, dtype):
            raws.append(model.raw_outputs([{"image": image}]))
    return tuple(
        (raws[0][key][-1].float() - raws[1][key][-1].float()).abs().max().item()
        for key in ("pred_logits", "pred_boxes")
    )


def demo_ap_by_dtype(weights, args):
    """{dtype: (AP, AP50)} of the trained demo model on its test set, float32 and bf16 autocast."""
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    cfg = load_cfg(DEMO_CONFIG)
    model = build(cfg, args.device).eval()
    AtomicDetectionCheckpointer(model).load(weights)  # a corrupt file raises a named error
    dataset = cfg.DATASETS.TEST[0]
    loader = Trainer.build_test_loader(cfg, dataset)
    results = {}
    for dtype in ("fp32", "bf16"):
        evaluator = COCOEvaluator(dataset, output_dir=None)
        with use_implementation("compiled"), autocast(args.device, dtype):
            bbox = inference_on_dataset(model, loader, evaluator)["bbox"]
        results[dtype] = (bbox["AP"], bbox["AP50"])
    return dataset, results


def op_diffs(model, image, args):
    """Max abs differences of logits and boxes: compiled op vs pure-PyTorch op, same model."""
    raws = []
    for impl in ("compiled", "pytorch"):
        with use_implementation(impl), torch.no_grad(), autocast(args.device, args.dtype):
            raws.append(model.raw_outputs([{"image": image}]))
    return tuple(
        (raws[0][key][-1].float() - raws[1][key][-1].float()).abs().max().item()
        for key in ("pred_logits", "pred_boxes")
    )


def main(argv=None):
    parser = model_benchmark_parser(__doc__.split("\n")[0], "timed calls per candidate")
    parser.add_argument("--quick", action="store_true", help="small inputs, 2 timed calls")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--no-hf", action="store_true", help="skip the HuggingFace peer")
    parser.add_argument("--profile", action="store_true",
                        help="also print each candidate's top operators (torch.profiler)")
    parser.add_argument("--with-bf16", action="store_true",
                        help="add the compiled plugin under bfloat16 autocast (with --dtype fp32)")
    parser.add_argument("--demo-weights", metavar="PATH",
                        help="with --with-bf16: a trained demo model, evaluated on trees_val in "
                             "float32 and in bfloat16")
    args = parse_model_benchmark_args(parser, argv)
    if args.with_bf16 and args.dtype != "fp32":
        parser.error("--with-bf16 compares with float32: use it with --dtype fp32")
    if args.demo_weights and not args.with_bf16:
        parser.error("--demo-weights measures bfloat16's change in AP: add --with-bf16")
    if args.demo_weights and not os.path.isfile(args.demo_weights):
        parser.error(f"--demo-weights: no such file: {args.demo_weights}")
    missing = [name for name in ("transformers", "timm") if importlib.util.find_spec(name) is None]
    if missing and not args.no_hf:
        parser.error(f"the HF peer needs {' and '.join(missing)} (pip install transformers timm); "
                     "or pass --no-hf")
    setup_threads(args.threads)
    iters = args.iters or (2 if args.quick else 10)
    warmup = 1 if args.quick else 2

    with_bf16 = args.with_bf16
    if with_bf16 and args.device == "cpu" and cpu_bfloat16_unsupported_reason() is not None:
        print(f"# no bf16 rows: {cpu_bfloat16_unsupported_reason()}")
        with_bf16 = False
    print(f"# inference, batch 1, {args.dtype}, {machine(args.device, args.threads)}")
    print(f"# {iters} timed calls per candidate after {warmup} warm-up, taking turns")
    print("| model | input | implementation | images/s | p50 (ms) | p90 (ms) | vs HF "
          "| vs pytorch op |")
    print("|---|---|---|---|---|---|---|---|")
    notes, profiles = [], []
    results = {"speedup_vs_hf": {}, "speedup_vs_pytorch_op": {}, "max_abs_diff": {}}
    for name in args.models:
        config, full_size, quick_size = MODELS[name]
        cfg = load_cfg(config, QUICK_OPTS if args.quick else [])
        height, width = quick_size if args.quick else full_size
        image = random_image(height, width, args.device)
        with_hf = not args.no_hf and cfg.MODEL.BACKBONE.NAME.endswith("resnet_backbone")
        if with_hf:
            hf, model, rows = hf_peer_and_plugin(cfg, args.device)
        else:
            torch.manual_seed(0)
            model = randomize_(build(cfg, "cpu"), seed=1).eval().to(args.device)
        candidates = {
            "plugin (compiled op)": plugin_candidate(model, image, "compiled", args),
            "plugin (pytorch op)": plugin_candidate(model, image, "pytorch", args),
        }
        if with_bf16:
            candidates["plugin (compiled op), bf16"] = plugin_candidate(
                model, image, "compiled", args, "bf16"
            )
        if with_hf:
            candidates["HF transformers"] = hf_candidate(
                hf, image, model.pixel_mean, model.pixel_std, args
            )
        seconds = time_round_robin(candidates, iters, warmup, args.device)
        means = {impl: sum(values) / len(values) for impl, values in seconds.items()}
        for impl, values in seconds.items():
            versus_hf = means.get("HF transformers", float("nan")) / means[impl]
            versus_op = means["plugin (pytorch op)"] / means[impl]
            results["speedup_vs_hf"][(name, impl)] = versus_hf
            results["speedup_vs_pytorch_op"][(name, impl)] = versus_op
            print(
                f"| {name} | {height}x{width} | {impl} | {1 / means[impl]:.2f} "
                f"| {percentile(values, 50) * 1e3:.0f} | {percentile(values, 90) * 1e3:.0f} "
                f"| {'n/a' if not with_hf else f'{versus_hf:.2f}x'} | {versus_op:.2f}x |",
                flush=True,
            )
        if args.profile:
            profiles.extend(profile_candidates(name, candidates))
        diffs = {"pytorch op": op_diffs(model, image, args)}
        if with_bf16:
            diffs["itself in bf16"] = bf16_diffs(model, image, args)
        if with_hf:
            diffs["HF"] = hf_diffs(model, image, hf, rows, args)
        else:
            notes.append(f"# {name}: no HF peer ({NO_HF_PEER})")
        for other, (logits, boxes) in diffs.items():
            results["max_abs_diff"][(name, other)] = (logits, boxes)
            notes.append(
                f"# {name}: plugin (compiled op) vs {other}: max abs diff of the last decoder "
                f"layer's logits {logits:.2e}, boxes {boxes:.2e}"
            )
    if with_bf16 and args.demo_weights:
        dataset, ap = demo_ap_by_dtype(args.demo_weights, args)
        results["demo_ap"] = ap
        (ap32, ap50_32), (ap16, ap50_16) = ap["fp32"], ap["bf16"]
        notes.append(
            f"# demo model {args.demo_weights} on {dataset} (COCO bbox): float32 AP {ap32:.1f} "
            f"AP50 {ap50_32:.1f}, bf16 AP {ap16:.1f} AP50 {ap50_16:.1f} (change AP "
            f"{ap16 - ap32:+.1f}, AP50 {ap50_16 - ap50_32:+.1f})"
        )
    print("\n".join(notes))
    print("\n".join(profiles))
    print(end_note())
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
