"""Speed, peak memory and time breakdown of one training step of the multi-scale R50 model.

    python benchmarks/train_step.py [--device cpu|cuda] [--threads 2] [--dtype fp32|fp16|bf16]
                                    [--iters 3] [--quick]

One step, as Detectron2's ``SimpleTrainer.run_step`` with the official recipe: forward with
losses (Hungarian matching, focal / L1 / GIoU losses on every decoder layer), backward, gradient
clipping (full-model L2 norm 0.1) and AdamW. Batch 2 of 800x1333 synthetic images with 10
random boxes each; random weights (``configs/deformable_detr_R50_50ep.yaml``, dropout on).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the steps (and what was allocated
before them: model and inputs); on the CPU the process's maximum resident set size
(``getrusage``) and its growth from before the first step, i.e. what the steps needed beyond the
model and inputs: activations, gradients, AdamW state and the allocator's cache.

The breakdown profiles one more step with ``torch.profiler``: ``record_function`` ranges are
opened by forward hooks on the backbone, neck, encoder, decoder, matcher and criterion (the
"loss" row is the criterion less the matcher) and around the forward, backward and optimizer
parts of the step; each backward autograd node is charged to the range of the forward op that
created it (same ``sequence_nr``).
"""

import functools
import resource
import sys
from collections import defaultdict

import torch
from benchmark_utils import (
    R50_CONFIG,
    autocast,
    build,
    end_note,
    load_cfg,
    machine,
    model_benchmark_parser,
    parse_model_benchmark_args,
    setup_threads,
)
from detectron2.structures import Boxes, Instances
from timing import timed, warm_then_time
from torch.profiler import record_function

from deformable_detr.solver import build_optimizer

QUICK_OPTS = [
    "MODEL.DEFORMABLE_DETR.ENC_LAYERS", "2",
    "MODEL.DEFORMABLE_DETR.DEC_LAYERS", "2",
    "MODEL.DEFORMABLE_DETR.NUM_QUERIES", "50",
]
RANGE_PREFIX = "train_step::"
BACKWARD_NODE = "autograd::engine::evaluate_function"
# component -> attribute path of the module whose forward opens its range
COMPONENTS = {
    "backbone": "backbone",
    "neck": "neck",
    "encoder": "transformer.encoder",
    "decoder": "transformer.decoder",
    "matcher": "criterion.matcher",
    "loss": "criterion",
}


def synthetic_batch(batch_size, height, width, num_boxes, num_classes, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(batch_size):
        corners = torch.rand(num_boxes, 2, 2, generator=generator) * torch.tensor([width, height])
        boxes = torch.cat([corners.min(1).values, corners.max(1).values + 8], 1)
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(boxes.clamp(max=torch.tensor([width, height] * 2)))
        instances.gt_classes = torch.randint(num_classes, (num_boxes,), generator=generator)
        image = torch.rand(3, height, width, generator=generator) * 255
        batch.append({"image": image.to(device), "instances": instances})
    return batch


def make_step(cfg, model, device="cpu", dtype="fp32", model_ema=None):
    """``step(batch)``: one training step as the trainer runs it, with the optimizer of
    ``deformable_detr.solver`` (three learning rates, full-model gradient clipping) and, given
    ``model_ema``, the EMA hook's update of the averaged weights."""
    optimizer = build_optimizer(cfg, model)

    def step(batch):
        with record_function(RANGE_PREFIX + "forward"), autocast(device, dtype):
            losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        with record_function(RANGE_PREFIX + "backward"):
            total.backward()
        with record_function(RANGE_PREFIX + "optimizer"):
            optimizer.step()
            if model_ema is not None:
                model_ema.update(model)

    return step


def add_range_hooks(model):
    """Forward hooks opening a ``record_function`` range per component; returns the handles."""
    handles = []
    for name, path in COMPONENTS.items():
        module = model.get_submodule(path)
        open_ranges = []

        def enter(_module, _inputs, name=name, open_ranges=open_ranges):
            context = record_function(RANGE_PREFIX + name)
            context.__enter__()
            open_ranges.append(context)

        def leave(_module, _inputs, _outputs, open_ranges=open_ranges):
            open_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def breakdown(events):
    """
    Seconds per (range, "forward" | "backward") of one profiled step: each range's own time
    (its nested ranges excluded), and the backward autograd nodes charged to the range of the
    forward op that created them; ("backward", "backward") is what no range was charged with.
    """
    range_of_sequence = {}
    seconds = defaultdict(float)
    for event in events:
        if event.name.startswith(RANGE_PREFIX):
            nested = sum(
                child.cpu_time_total
                for child in event.cpu_children
                if child.name.startswith(RANGE_PREFIX)
            )
            name = event.name[len(RANGE_PREFIX) :]
            seconds[(name, "forward")] += (event.cpu_time_total - nested) / 1e6
        elif event.sequence_nr >= 0 and not event.name.startswith(BACKWARD_NODE):
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith(RANGE_PREFIX):
                parent = parent.cpu_parent
            name = parent.name[len(RANGE_PREFIX) :] if parent is not None else None
            # autograd nodes inside the backward range carry their forward op's number too
            if name not in (None, "backward", "optimizer"):
                range_of_sequence[event.sequence_nr] = name
    for event in events:
        if event.name.startswith(BACKWARD_NODE) and event.sequence_nr in range_of_sequence:
            name = range_of_sequence[event.sequence_nr]
            seconds[(name, "backward")] += event.cpu_time_total / 1e6
            seconds[("backward", "forward")] -= event.cpu_time_total / 1e6
    seconds[("backward", "backward")] = seconds.pop(("backward", "forward"))
    return seconds


def main(argv=None):
    parser = model_benchmark_parser(__doc__.split("\n")[0], "timed steps")
    parser.add_argument("--quick", action="store_true", help="small inputs, shallow transformer")
    args = parse_model_benchmark_args(parser, argv)
    setup_threads(args.threads)
    iters = args.iters or (1 if args.quick else 3)
    height, width = (128, 213) if args.quick else (800, 1333)
    batch_size = 2

    cfg = load_cfg(R50_CONFIG, QUICK_OPTS if args.quick else [])
    torch.manual_seed(0)
    model = build(cfg, args.device).train()
    batch = synthetic_batch(
        batch_size, height, width, 10, cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES, args.device
    )
    step = functools.partial(make_step(cfg, model, args.device, args.dtype), batch)

    print(f"# training step, batch {batch_size} of {height}x{width}, {args.dtype}, "
          f"{machine(args.device, args.threads)}")
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_memory = torch.cuda.memory_allocated()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = warm_then_time(step, iters, args.device)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        memory = f"{peak / 2**20:.0f} MiB allocated at peak, {base_memory / 2**20:.0f} before"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        growth = (peak - base_rss) / 2**20
        memory = f"max RSS {peak / 2**20:.0f} MiB, +{growth:.0f} MiB by the steps"
    mean = sum(seconds) / len(seconds)
    print("| model | batch | iterations/s | s/iteration (mean, min) | peak memory |")
    print("|---|---|---|---|---|")
    print(f"| R50 multi-scale | {batch_size}x{height}x{width} | {1 / mean:.3f} "
          f"| {mean:.2f}, {min(seconds):.2f} | {memory} |", flush=True)

    handles = add_range_hooks(model)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        profiled = timed(step, args.device)
    for handle in handles:
        handle.remove()
    shares = breakdown(profiler.events())
    print(f"\n# one profiled step: {profiled:.2f} s (profiler overhead included)")
    print("| component | forward (s) | backward (s) | share of the step |")
    print("|---|---|---|---|")
    rows = {name: (name,) for name in COMPONENTS}
    rows["rest of the model (pre-processing, heads, transformer glue)"] = ("forward", "backward")
    rows["gradient clipping + AdamW"] = ("optimizer",)
    for row, names in rows.items():
        forward = sum(shares.get((name, "forward"), 0.0) for name in names)
        backward = sum(shares.get((name, "backward"), 0.0) for name in names)
        share = 100 * (forward + backward) / profiled
        print(f"| {row} | {forward:.2f} | {backward:.2f} | {share:.1f}% |")
    print(end_note())
    return {"seconds": seconds, "shares": dict(shares), "profiled": profiled}


if __name__ == "__main__":
    main()
    sys.exit(0)
