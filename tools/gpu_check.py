#!/usr/bin/env python
"""`make gpu-check`: everything to check on a lent GPU machine, in one command.

Steps, each a section of one Markdown report (``--output``, default
``output/gpu_check/<device>.md``):

1. build: the op with CUDA kernels for this device (``FORCE_CUDA=1``), in place, and check
   that ``compiled_kernels()["cuda"]`` holds in a fresh process;
2. cuda tests: every ``cuda``-marked test (``pytest -m cuda``), among them the op tests on the
   GPU and the check that one op call never syncs the host
   (``torch.cuda.set_sync_debug_mode("error")`` around forward and backward);
3. op benchmark: ``benchmarks/ms_deform_attn.py`` on CUDA in float32, float16 and bfloat16
   (time and achieved memory bandwidth against the device's peak);
4. inference: ``benchmarks/inference.py`` on CUDA in fp32, fp16 and bf16: R50 at 800x1333
   against the HuggingFace peer, and the demo model; their outputs must agree within
   ``INFERENCE_TOLERANCES``;
5. AMP training: 50 iterations of the demo config in float16 and in bfloat16: every logged loss
   finite and the last below the first;
6. NCCL: 20 iterations of the demo config in 2 processes when 2 GPUs exist.

Budget: under 8 minutes on one H100. Without a CUDA device every step is skipped with its
reason and the script exits 0, so CI keeps it working. Any failed step stops the run: exit
status 1 and no report.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo" / "deformable_detr_mnv2_trees.yaml"
PYTHON = sys.executable


class StepFailed(RuntimeError):
    """A check did not hold; the message says which and shows the evidence."""


class StepSkipped(RuntimeError):
    """The machine cannot run this step; the message says why."""


def run(command, timeout, env=None, cwd=REPO):
    """Runs ``command``; returns its stdout, raises StepFailed with its output tail otherwise."""
    environment = dict(os.environ, **(env or {}))
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO / "projects"), environment.get("PYTHONPATH")])
    )
    try:
        result = subprocess.run(
            [str(part) for part in command], cwd=cwd, env=environment, capture_output=True,
            text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as error:
        raise StepFailed(f"`{' '.join(map(str, command))}` ran past {timeout} s") from error
    if result.returncode != 0:
        raise StepFailed(
            f"`{' '.join(map(str, command))}` exited {result.returncode}:\n"
            + (result.stdout + result.stderr)[-4000:]
        )
    return result.stdout


def fenced(text):
    return "```\n" + text.strip() + "\n```"


def build(args):
    major, minor = torch.cuda.get_device_capability()
    env = {"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}"}
    run([PYTHON, "setup.py", "build_ext", "--inplace"], timeout=400, env=env)
    check = "from deformable_detr.layers import compiled_kernels; print(compiled_kernels())"
    kernels = run([PYTHON, "-c", check], timeout=120).strip()
    if "'cuda': True" not in kernels:
        raise StepFailed(f"the build has no CUDA kernels: compiled_kernels() = {kernels}")
    return f"Built for sm_{major}{minor}: `compiled_kernels()` = `{kernels}`"


def cuda_tests(args):
    output = run(
        [PYTHON, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rs"],
        timeout=300,
    )
    summary = output.strip().splitlines()[-1]
    if " passed" not in summary:
        raise StepFailed(f"no cuda test passed: {summary}")
    return fenced(summary)


def op_benchmark(args):
    sections = []
    for dtype in ("float32", "float16", "bfloat16"):
        output = run(
            [PYTHON, "benchmarks/ms_deform_attn.py", "--device", "cuda", "--dtype", dtype],
            timeout=180,
        )
        sections.append(f"{dtype}:\n\n" + fenced(output))
    return "\n\n".join(sections)


# Largest max-abs differences of the last decoder layer's (logits, boxes) that inference may
# show between the plugin and its peers (HF, the pure-PyTorch op), by autocast dtype.
INFERENCE_TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (1e-1, 2e-2), "bf16": (5e-1, 1e-1)}
DIFF_LINE = re.compile(
    r"# (?P<model>.+): plugin \(compiled op\) vs (?P<peer>.+): max abs diff of the last "
    r"decoder layer's logits (?P<logits>\S+), boxes (?P<boxes>\S+)"
)


def check_inference_diffs(output, dtype):
    """Raises StepFailed unless every compared pair agrees within INFERENCE_TOLERANCES."""
    max_logits, max_boxes = INFERENCE_TOLERANCES[dtype]
    matches = list(DIFF_LINE.finditer(output))
    if not any(match["peer"] == "HF" for match in matches):
        raise StepFailed(f"inference {dtype}: no comparison with the HF peer in its output")
    for match in matches:
        logits, boxes = float(match["logits"]), float(match["boxes"])
        if not (logits <= max_logits and boxes <= max_boxes):  # NaN fails too
            raise StepFailed(
                f"inference {dtype}: {match['model']} differs from {match['peer']}: logits "
                f"{logits:.2e} (at most {max_logits:.0e}), boxes {boxes:.2e} "
                f"(at most {max_boxes:.0e})"
            )


def inference(args):
    sections = []
    for dtype in ("fp32", "fp16", "bf16"):
        output = run(
            [PYTHON, "benchmarks/inference.py", "--device", "cuda", "--dtype", dtype,
             "--iters", "10"],
            timeout=300,
        )
        check_inference_diffs(output, dtype)
        sections.append(f"{dtype}:\n\n" + fenced(output))
    return "\n\n".join(sections)


def demo_overrides(output_dir, iterations):
    """The demo config on CUDA for ``iterations`` iterations, without evaluation."""
    return [
        "MODEL.DEVICE", "cuda", "SOLVER.MAX_ITER", str(iterations), "SOLVER.STEPS", "()",
        "SOLVER.CHECKPOINT_PERIOD", "100000", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
        "OUTPUT_DIR", str(output_dir),
    ]


def logged_losses(metrics_file):
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line]
    return [(r["iteration"], r["total_loss"]) for r in records if "total_loss" in r]


def check_losses(losses, what):
    """Every logged loss finite and the last below the first."""
    if len(losses) < 2:
        raise StepFailed(f"{what}: {len(losses)} loss records, need at least 2")
    if not all(math.isfinite(loss) for _, loss in losses):
        raise StepFailed(f"{what}: non-finite loss in {losses}")
    if not losses[-1][1] < losses[0][1]:
        raise StepFailed(f"{what}: loss did not go down: {losses}")


def amp_training(args):
    lines = [
        "| precision | iterations | losses (iteration: total_loss) | time |",
        "|---|---|---|---|",
    ]
    for precision in ("float16", "bfloat16"):
        with tempfile.TemporaryDirectory() as output_dir:
            start = time.perf_counter()
            run(
                [PYTHON, "train_net.py", "--config-file", DEMO_CONFIG, "--num-gpus", "1",
                 *demo_overrides(output_dir, 50), "SOLVER.AMP.ENABLED", "True",
                 "SOLVER.AMP.PRECISION", precision],
                timeout=300,
            )
            seconds = time.perf_counter() - start
            losses = logged_losses(Path(output_dir) / "metrics.json")
        check_losses(losses, f"AMP {precision}")
        shown = ", ".join(f"{it}: {loss:.3f}" for it, loss in losses)
        lines.append(f"| {precision} | 50 | {shown} | {seconds:.0f} s |")
    return "\n".join(lines)


def nccl(args):
    if torch.cuda.device_count() < 2:
        raise StepSkipped(f"{torch.cuda.device_count()} GPU, a 2-process run needs 2")
    with tempfile.TemporaryDirectory() as output_dir:
        run(
            [PYTHON, "train_net.py", "--config-file", DEMO_CONFIG, "--num-gpus", "2",
             *demo_overrides(output_dir, 20)],
            timeout=300,
        )
        losses = logged_losses(Path(output_dir) / "metrics.json")
    if not losses or not all(math.isfinite(loss) for _, loss in losses):
        raise StepFailed(f"NCCL: losses {losses}")
    return f"2 processes (NCCL), 20 iterations: losses {losses}"


STEPS = [
    ("Build", build),
    ("CUDA tests", cuda_tests),
    ("Op benchmark", op_benchmark),
    ("Inference", inference),
    ("AMP training", amp_training),
    ("NCCL", nccl),
]


def device_name():
    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None, help="the Markdown report")
    parser.add_argument("--skip-build", action="store_true", help="use the op as built")
    args = parser.parse_args(argv)
    device = device_name()
    output = args.output or REPO / "output" / "gpu_check" / (re.sub(r"\W+", "_", device) + ".md")
    output.unlink(missing_ok=True)  # a failed run must not leave an older report behind
    has_gpu = torch.cuda.is_available()
    report = [
        f"# gpu-check on {device}",
        "",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"{torch.cuda.device_count()} GPU(s), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    ]
    if not has_gpu:
        print("gpu-check: no CUDA device; every GPU step is skipped (run it on a GPU machine).")
    start = time.perf_counter()
    for title, step in STEPS:
        step_start = time.perf_counter()
        try:
            if not has_gpu:
                raise StepSkipped("no CUDA device")
            if step is build and args.skip_build:
                raise StepSkipped("--skip-build")
            print(f"gpu-check: {title} ...", flush=True)
            body = step(args) + f"\n\n({time.perf_counter() - step_start:.0f} s)"
        except StepSkipped as reason:
            body = f"skipped: {reason}"
        except StepFailed as error:
            print(f"gpu-check: {title} FAILED: {error}", file=sys.stderr)
            return 1
        print(f"gpu-check: {title}: {body.splitlines()[0]}")
        report += ["", f"## {title}", "", body]
    report += ["", f"Total: {time.perf_counter() - start:.0f} s"]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(report) + "\n")
    print(f"gpu-check: report in {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
