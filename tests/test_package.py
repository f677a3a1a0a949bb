"""The package installs, registers itself and reports its build."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

import deformable_detr  # noqa: F401  (registers everything)
from deformable_detr.collect_env import collect_env_info
from deformable_detr.layers.ms_deform_attn_op import compiled_kernels, extension_error

REPO = Path(__file__).resolve().parents[1]


def test_meta_arch_and_backbones_are_registered():
    assert "DeformableDETR" in META_ARCH_REGISTRY
    assert "build_mobilenet_v2_backbone" in BACKBONE_REGISTRY


def test_extension_loads_with_cpu_kernels():
    assert extension_error() is None
    kernels = compiled_kernels()
    assert kernels["cpu"] is True
    assert set(kernels) == {"cpu", "cuda"}


def test_collect_env_reports_versions_and_kernels():
    report = dict(collect_env_info())
    assert report["torch"].startswith(torch.__version__)
    assert "CPU" in report["op kernels built"]
    command = [sys.executable, "-m", "deformable_detr.collect_env"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "detectron2" in out and "op kernels built" in out


SCRIPTS = [
    "train_net.py",
    "predict.py",
    "tools/trees_demo.py",
    "tools/check_dataset.py",
    "tools/export_model.py",
    "tools/convert_official_checkpoint.py",
    "tools/visualize_sampling.py",
]


BENCHMARKS = [
    "benchmarks/convergence.py",
    "benchmarks/inference.py",
    "benchmarks/ms_deform_attn.py",
    "benchmarks/scaling.py",
    "benchmarks/train_step.py",
]


@pytest.mark.parametrize("script", SCRIPTS + BENCHMARKS)
def test_scripts_start_without_warnings(script):
    """detectron2's import-time torch.jit.script warnings are silenced before it is imported."""
    result = subprocess.run(
        [sys.executable, str(REPO / script), "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_before_setup_print_a_one_line_hint(script):
    # -S hides site-packages: the situation of a user who has not run the set-up yet.
    command = [sys.executable, "-S", str(REPO / script), "--help"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0
    message = result.stderr.strip()
    assert "Traceback" not in message
    assert len(message.splitlines()) == 1 and "make setup" in message
