"""How the op, the encoder and the whole model scale with the number of pixels.

    python benchmarks/scaling.py [--device cpu|cuda] [--threads 2] [--iters 2] [--quick]

Inputs of short side 512, 800, 1024 and 1333 with aspect 1.67 (the 800x1333 of COCO testing),
batch 1. For each: the compiled op alone on the encoder's shapes (one query per position,
sampling around itself; inputs from ``benchmarks/ms_deform_attn.py``), then the multi-scale R50
model (``configs/deformable_detr_R50_50ep.yaml``, random weights, eval mode, ``torch.no_grad``)
with its backbone, encoder and decoder timed by forward hooks. Times are the best of ``--iters``
calls, made in rounds over all sizes after a warm-up round. The last row fits
``time ~ pixels ** k`` by least squares on a log-log scale: k ~ 1 is linear (deformable
attention: a fixed number of samples per query), k ~ 2 would be the quadratic cost of dense
self-attention over all positions.
"""

import argparse
import math
import sys
import time
from collections import defaultdict

import torch
from benchmark_utils import R50_CONFIG, build, end_note, load_cfg, machine, setup_threads
from ms_deform_attn import make_inputs
from timing import timed

from deformable_detr.layers import ms_deform_attn
from deformable_detr.utils.testing import randomize_

ASPECT = 1333 / 800
SHORT_SIDES = (512, 800, 1024, 1333)
QUICK_SHORT_SIDES = (64, 96, 128)
QUICK_OPTS = [
    "MODEL.DEFORMABLE_DETR.ENC_LAYERS", "2",
    "MODEL.DEFORMABLE_DETR.DEC_LAYERS", "2",
    "MODEL.DEFORMABLE_DETR.NUM_QUERIES", "50",
]
TIMED_PARTS = {"backbone": "backbone", "encoder": "transformer.encoder",
               "decoder": "transformer.decoder"}


def feature_levels(height, width, num_levels=4):
    """(H_l, W_l) at strides 8, 16, 32, 64 of a ResNet input (each stride-2 step rounds up)."""
    sizes, h, w = [], height, width
    for stride in (2, 4, 8, 16, 32, 64):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        if stride >= 8:
            sizes.append((h, w))
    return sizes[:num_levels]


def add_timing_hooks(model, seconds, device):
    """Accumulate the wall time of each ``TIMED_PARTS`` module's forward into ``seconds``."""
    for name, path in TIMED_PARTS.items():
        module = model.get_submodule(path)
        starts = []

        def enter(_module, _inputs, starts=starts):
            if device == "cuda":
                torch.cuda.synchronize()
            starts.append(time.perf_counter())

        def leave(_module, _inputs, _outputs, name=name, starts=starts):
            if device == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - starts.pop())

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def fitted_exponent(pixels, seconds):
    xs = [math.log(p) for p in pixels]
    ys = [math.log(s) for s in seconds]
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    covariance = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys))
    return covariance / sum((x - x_mean) ** 2 for x in xs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch)")
    parser.add_argument("--iters", type=int, default=2, help="timed calls per size (best kept)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, shallow transformer")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    setup_threads(args.threads)

    cfg = load_cfg(R50_CONFIG, QUICK_OPTS if args.quick else [])
    torch.manual_seed(0)
    model = randomize_(build(cfg, "cpu"), seed=1).eval().to(args.device)
    hook_seconds = defaultdict(list)
    add_timing_hooks(model, hook_seconds, args.device)
    num_levels = cfg.MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS

    print(f"# scaling, batch 1, fp32, best of {args.iters}, {machine(args.device, args.threads)}")
    print("| input | pixels | tokens S | op (ms) | backbone (ms) | encoder (ms) | decoder (ms) "
          "| model (ms) | op (ns/token) | encoder (us/token) | model (ns/pixel) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    sizes = []
    for short in QUICK_SHORT_SIDES if args.quick else SHORT_SIDES:
        height, width = short, round(short * ASPECT)
        levels = feature_levels(height, width, num_levels)
        image = torch.rand(3, height, width).mul(255).to(args.device)
        sizes.append((height, width, image, make_inputs(levels, None, args.device,
                                                        torch.float32, N=1)))
    # Rounds over all sizes, the first one a warm-up, so that a change of machine load
    # during the run does not fall on one size only.
    seconds = defaultdict(list)
    with torch.no_grad():
        for _ in range(args.iters + 1):
            for height, _, image, inputs in sizes:
                op = timed(lambda inputs=inputs: ms_deform_attn(*inputs), args.device)
                seconds[(height, "op")].append(op)
                hook_seconds.clear()
                whole = timed(lambda image=image: model([{"image": image}]), args.device)
                seconds[(height, "model")].append(whole)
                for name, values in hook_seconds.items():
                    seconds[(height, name)] += values
    rows = defaultdict(list)
    for height, width, _, inputs in sizes:
        tokens = inputs[0].shape[1]
        best = {name: min(seconds[(height, name)][1:]) for name in ("op", "model", *TIMED_PARTS)}
        for name, value in {"pixels": height * width, **best}.items():
            rows[name].append(value)
        print(
            f"| {height}x{width} | {height * width} | {tokens} | {best['op'] * 1e3:.1f} "
            f"| {best['backbone'] * 1e3:.0f} | {best['encoder'] * 1e3:.0f} "
            f"| {best['decoder'] * 1e3:.0f} | {best['model'] * 1e3:.0f} "
            f"| {best['op'] / tokens * 1e9:.0f} | {best['encoder'] / tokens * 1e6:.1f} "
            f"| {best['model'] / (height * width) * 1e9:.0f} |"
        )
    exponents = {
        name: fitted_exponent(rows["pixels"], rows[name])
        for name in ("op", "backbone", "encoder", "decoder", "model")
    }
    print(
        f"| fitted k in time ~ pixels^k | | | {exponents['op']:.2f} | {exponents['backbone']:.2f} "
        f"| {exponents['encoder']:.2f} | {exponents['decoder']:.2f} | {exponents['model']:.2f} "
        "| | | |"
    )
    print(end_note())
    return exponents


if __name__ == "__main__":
    main()
    sys.exit(0)
