"""Helpers shared by the model benchmarks: configs, models, the HuggingFace peer and timing."""

import argparse
import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

# First: the package silences the torch.jit.script warnings detectron2 causes at import.
import deformable_detr  # noqa: F401

# isort: split
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from timing import timed

from deformable_detr.config import add_deformable_detr_config
from deformable_detr.utils.testing import randomize_

# The peer must run HuggingFace's pure-PyTorch attention: no hub kernels, no downloads.
os.environ.setdefault("USE_HUB_KERNELS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
R50_CONFIG = ROOT / "configs" / "deformable_detr_R50_50ep.yaml"
DEMO_CONFIG = ROOT / "configs" / "demo" / "deformable_detr_mnv2_trees.yaml"


def setup_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set by an earlier benchmark in this process


def machine(device: str, threads: int) -> str:
    """One line naming the processor (lscpu model name), threads, torch and the date."""
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or "unknown CPU"
        try:
            lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
            name = next(
                line.split(":", 1)[1].strip()
                for line in lscpu.splitlines()
                if line.startswith("Model name")
            )
        except (OSError, subprocess.CalledProcessError, StopIteration):
            pass
        name = f"{name}, {threads} of {os.cpu_count()} CPU threads"
    load = os.getloadavg()[0]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{name}; torch {torch.__version__}; {now}; load average {load:.2f}"


def end_note() -> str:
    """The load average when a benchmark ends (the header gives it at the start)."""
    return f"# load average at the end: {os.getloadavg()[0]:.2f}"


def load_cfg(config_file, opts: Sequence[str] = ()):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.WEIGHTS = ""
    return cfg


def build(cfg, device: str) -> torch.nn.Module:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = device
    return build_model(cfg)


def hf_peer_and_plugin(cfg, device: str):
    """
    HuggingFace ``DeformableDetrForObjectDetection`` (timm ResNet-50, pure-PyTorch attention,
    random weights) and the plugin model built from ``cfg`` with the same weights, converted by
    ``deformable_detr.checkpoint``. ``cfg`` must describe a ResNet-50 model with the
    80 COCO classes (the converter reduces HF's 91 COCO-id classes to them).

    Returns:
        (hf model, plugin model, class rows: plugin class k = HF class ``rows[k]``)
    """
    import transformers
    from transformers.models.deformable_detr import modeling_deformable_detr

    from deformable_detr.checkpoint import coco_class_rows, convert_state_dict

    dd = cfg.MODEL.DEFORMABLE_DETR
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=True,
        backbone="resnet50",
        use_pretrained_backbone=False,
        num_feature_levels=dd.NUM_FEATURE_LEVELS,
        d_model=dd.HIDDEN_DIM,
        encoder_layers=dd.ENC_LAYERS,
        decoder_layers=dd.DEC_LAYERS,
        encoder_attention_heads=dd.NHEADS,
        decoder_attention_heads=dd.NHEADS,
        encoder_ffn_dim=dd.DIM_FEEDFORWARD,
        decoder_ffn_dim=dd.DIM_FEEDFORWARD,
        encoder_n_points=dd.ENC_N_POINTS,
        decoder_n_points=dd.DEC_N_POINTS,
        num_queries=dd.NUM_QUERIES,
        two_stage_num_proposals=dd.TWO_STAGE.NUM_PROPOSALS,
        with_box_refine=dd.WITH_BOX_REFINE,
        two_stage=dd.TWO_STAGE.ENABLED,
        num_labels=91,
        disable_custom_kernels=True,
    )
    torch.manual_seed(0)
    hf = randomize_(transformers.DeformableDetrForObjectDetection(config), seed=1).eval()
    attention = modeling_deformable_detr.MultiScaleDeformableAttention
    if attention.forward.__module__ != modeling_deformable_detr.__name__:
        raise RuntimeError("HF MultiScaleDeformableAttention is replaced by a hub kernel")
    converted, _ = convert_state_dict(hf.state_dict(), "hf")
    plugin = build(cfg, "cpu").eval()
    plugin.load_state_dict(converted, strict=True)
    return hf.to(device), plugin.to(device), torch.tensor(coco_class_rows(), device=device)


def time_round_robin(
    candidates: Dict[str, Callable[[], object]], iters: int, warmup: int, device: str
) -> Dict[str, List[float]]:
    """
    Seconds of each call of each candidate. Candidates take turns every iteration (the first
    one rotating), so a change of machine load affects them alike.
    """
    names = list(candidates)

    for _ in range(warmup):
        for name in names:
            timed(candidates[name], device)
    seconds = {name: [] for name in names}
    for i in range(iters):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            seconds[name].append(timed(candidates[name], device))
    return seconds


def percentile(values: Sequence[float], q: float) -> float:
    return torch.tensor(values, dtype=torch.float64).quantile(q / 100).item()


def model_benchmark_parser(description: str, iters_help: str) -> argparse.ArgumentParser:
    """The options every model benchmark takes: --device, --threads, --dtype, --iters."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                        help="autocast dtype (fp32: no autocast)")
    parser.add_argument("--iters", type=int, default=None, help=iters_help)
    return parser


def parse_model_benchmark_args(parser: argparse.ArgumentParser, argv):
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    return args


def autocast(device: str, dtype: str):
    """Autocast context for ``--dtype`` (disabled for fp32)."""
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    return torch.autocast(device, dtype=dtypes.get(dtype), enabled=dtype in dtypes)
