"""AP of the demo model at fixed iteration budgets, each faster-convergence option off and on.

    python benchmarks/convergence.py [--variants baseline denoising ...] [--seeds 1 2 3]
        [--iters 300] [--eval-period 150] [--jobs 2] [--output output/convergence] [KEY VALUE ...]
    python benchmarks/convergence.py --time-only [--steps 8] [--threads 2]

Trains the ``make demo`` config once per variant and seed (``baseline``: the four options off;
each other variant turns one on, ``all`` all four) with ``train_net.py`` (``--jobs`` runs
in parallel, each on ``2 // jobs`` threads), reads Detectron2's ``metrics.json`` and prints, per
variant and evaluation, the median (min-max) over the seeds of COCO AP50 and AP on
``trees_val``. A run whose ``metrics.json`` already holds its last evaluation is read, not
retrained, so an interrupted study resumes. ``KEY VALUE`` pairs change every variant.

``--time-only`` measures seconds per training step of each variant side by side: every model
takes the same real ``trees_train`` batches, round robin over the variants, so a change in the
machine's load falls on all of them alike; it prints the median and, per round, the ratio to the
baseline's step on the same batch (their median and range).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from benchmark_utils import DEMO_CONFIG, ROOT, end_note, machine, setup_threads
from train_step import make_step

from deformable_detr.data import prepare_trees
from deformable_detr.ema import ModelEMA
from deformable_detr.engine import Trainer, load_config

DD = "MODEL.DEFORMABLE_DETR."
# Every variant sets all four options, so "baseline" means options off whatever the demo config
# turns on (it trains with denoising).
OPTIONS_OFF = [
    DD + "DENOISING.ENABLED", "False", DD + "TWO_STAGE.MIXED_QUERY_SELECTION", "False",
    DD + "LOOK_FORWARD_TWICE", "False", "SOLVER.EMA.ENABLED", "False",
]
# EMA decay 0.99 (a window of ~100 steps): detrex's 0.999 would still hold 74% of the initial
# weights after a 300-step schedule.
OPTIONS_ON = {
    "denoising": [DD + "DENOISING.ENABLED", "True"],
    "mixed_query_selection": [DD + "TWO_STAGE.MIXED_QUERY_SELECTION", "True"],
    "look_forward_twice": [DD + "LOOK_FORWARD_TWICE", "True"],
    "ema": ["SOLVER.EMA.ENABLED", "True", "SOLVER.EMA.DECAY", "0.99"],
}
VARIANTS = {
    "baseline": OPTIONS_OFF,
    **{name: OPTIONS_OFF + opts for name, opts in OPTIONS_ON.items()},
    "all": OPTIONS_OFF + [opt for opts in OPTIONS_ON.values() for opt in opts],
}


def lr_drop(iters):
    """The demo's learning-rate drop, at 5/6 of the schedule."""
    return iters * 5 // 6


def schedule_opts(iters, eval_period):
    """The demo's schedule shortened to ``iters``."""
    return [
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", f"({lr_drop(iters)},)",
        "TEST.EVAL_PERIOD", str(eval_period),
    ]


def read_run(run_dir, iters):
    """{iteration: (AP50, AP)} and the median seconds per iteration, or None if unfinished."""
    metrics = Path(run_dir) / "metrics.json"
    if not metrics.exists():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    # A periodic evaluation is logged at the step it follows (149 for 150), the last one after
    # training at ``iters`` itself.
    evaluations = {min(r["iteration"] + 1, iters): (r["bbox/AP50"], r["bbox/AP"])
                   for r in records if "bbox/AP" in r}
    if iters not in evaluations:
        return None
    seconds = statistics.median(r["time"] for r in records if "time" in r)
    return evaluations, seconds


def train_command(variant_opts, seed, run_dir, args):
    return [
        sys.executable, str(ROOT / "train_net.py"), "--config-file", str(args.config_file),
        "OUTPUT_DIR", str(run_dir), "SEED", str(seed),
        *schedule_opts(args.iters, args.eval_period), *variant_opts, *args.opts,
    ]


def run_study(args):
    runs = [(variant, seed) for seed in args.seeds for variant in args.variants]
    pending = []
    for variant, seed in runs:
        run_dir = Path(args.output) / f"{variant}_seed{seed}"
        if read_run(run_dir, args.iters) is None:
            if (run_dir / "metrics.json").exists():
                (run_dir / "metrics.json").unlink()  # Detectron2 appends to it
            pending.append((train_command(VARIANTS[variant], seed, run_dir, args), run_dir))
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print(f"# {len(runs)} runs, {len(pending)} to train, {args.jobs} at a time on {threads} "
          f"thread(s) each; {machine('cpu', threads)}", flush=True)
    running = []
    while pending or running:
        while pending and len(running) < args.jobs:
            command, run_dir = pending.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / "stdout.txt", "w")
            running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             env=env), run_dir, log, time.perf_counter()))
        time.sleep(5)
        for job in [job for job in running if job[0].poll() is not None]:
            process, run_dir, log, start = job
            log.close()
            running.remove(job)
            if process.returncode:
                sys.exit(f"{run_dir}: train_net.py exited {process.returncode}; see "
                         f"{run_dir / 'stdout.txt'}")
            print(f"# {run_dir.name}: {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    report(args)


def spread(values):
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def report(args):
    print(f"\n# {args.config_file.name}, {args.iters} iterations (LR drop at "
          f"{lr_drop(args.iters)}), seeds {' '.join(map(str, args.seeds))}, "
          f"extra options: {' '.join(args.opts) or 'none'}")
    print("| variant | iteration | AP50 median (min-max) | AP median (min-max) | AP50 per seed | "
          "s/step, each run's median |")
    print("|---|---|---|---|---|---|")
    for variant in args.variants:
        results = [read_run(Path(args.output) / f"{variant}_seed{seed}", args.iters)
                   for seed in args.seeds]
        for iteration in sorted(results[0][0]):
            ap50 = [evaluations[iteration][0] for evaluations, _ in results]
            ap = [evaluations[iteration][1] for evaluations, _ in results]
            print(f"| {variant} | {iteration} | {spread(ap50)} | {spread(ap)} | "
                  f"{', '.join(f'{v:.1f}' for v in ap50)} | "
                  f"{', '.join(f'{seconds:.2f}' for _, seconds in results)} |")
    print(end_note())


def time_steps(args):
    """Seconds per training step of each variant, round robin on the same real batches."""
    setup_threads(args.threads)
    print(f"# training step of {args.config_file.name} per variant, {args.steps} rounds; "
          f"{machine('cpu', args.threads)}")
    prepare_trees()
    base = load_config(str(args.config_file), [*args.opts])
    batches = [batch for batch, _ in zip(Trainer.build_train_loader(base), range(args.steps + 1))]
    steps = {}
    for variant in args.variants:
        cfg = load_config(str(args.config_file), [*VARIANTS[variant], *args.opts])
        torch.manual_seed(0)
        model = Trainer.build_model(cfg).train()
        model_ema = ModelEMA(cfg.SOLVER.EMA.DECAY) if cfg.SOLVER.EMA.ENABLED else None
        steps[variant] = make_step(cfg, model, model_ema=model_ema)
    seconds = {variant: [] for variant in args.variants}
    for round_index, batch in enumerate(batches):
        for variant, step in steps.items():
            start = time.perf_counter()
            step(batch)
            if round_index:  # the first round warms up (allocator, optimizer state)
                seconds[variant].append(time.perf_counter() - start)
    reference = seconds[args.variants[0]]
    print(f"| variant | s/step median (min-max) | ratio to {args.variants[0]}, median of the "
          f"rounds (min-max) |")
    print("|---|---|---|")
    for variant, values in seconds.items():
        # paired by round: the same batch, taken moments apart
        ratios = [value / base for value, base in zip(values, reference)]
        print(f"| {variant} | {statistics.median(values):.3f} ({min(values):.3f}-"
              f"{max(values):.3f}) | {statistics.median(ratios):.2f} ({min(ratios):.2f}-"
              f"{max(ratios):.2f}) |")
    print(end_note())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", type=Path, default=DEMO_CONFIG)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--eval-period", type=int, default=150)
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time")
    parser.add_argument("--output", default="output/convergence")
    parser.add_argument("--time-only", action="store_true", help="only time a step per variant")
    parser.add_argument("--steps", type=int, default=8, help="timed rounds for --time-only")
    parser.add_argument("--threads", type=int, default=2, help="threads for --time-only")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs for every run")
    args = parser.parse_args(argv)
    if args.time_only:
        time_steps(args)
    else:
        run_study(args)


if __name__ == "__main__":
    main()
