"""tools/gpu_check.py (`make gpu-check`) runs on a machine without a GPU, skipping every GPU step,
and stops with status 1 and no report at the first failed check."""

import importlib.util
import math
import subprocess
import sys

import pytest
import torch
from tiny_deformable_detr import REPO

GPU_CHECK = REPO / "tools" / "gpu_check.py"


@pytest.fixture
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_every_step_is_skipped_and_the_report_written(gpu_check, tmp_path):
    report = tmp_path / "report.md"
    result = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--output", str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "no CUDA device; every GPU step is skipped" in result.stdout
    text = report.read_text()
    assert text.startswith("# gpu-check on cpu\n")
    for title, _ in gpu_check.STEPS:
        assert f"## {title}\n\nskipped: no CUDA device\n" in text


def test_a_failed_step_exits_1_and_leaves_no_report(gpu_check, tmp_path, monkeypatch, capsys):
    def broken_step(args):
        raise gpu_check.StepFailed("loss is nan")

    def passing_step(args):
        return "fine"

    monkeypatch.setattr(gpu_check, "STEPS", [("Good", passing_step), ("Broken", broken_step)])
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "device_name", lambda: "Fake GPU")
    report = tmp_path / "report.md"
    report.write_text("an older report")
    assert gpu_check.main(["--output", str(report)]) == 1
    assert not report.exists()
    assert "Broken FAILED: loss is nan" in capsys.readouterr().err


@pytest.mark.parametrize(
    "losses, problem",
    [
        ([(19, 3.0), (39, 2.5), (49, 2.0)], None),
        ([(19, 3.0), (39, math.nan), (49, 2.0)], "non-finite loss"),
        ([(19, 3.0), (39, 2.5), (49, 3.1)], "loss did not go down"),
        ([(49, 2.0)], "need at least 2"),
    ],
)
def test_training_losses_must_be_finite_and_go_down(gpu_check, losses, problem):
    if problem is None:
        gpu_check.check_losses(losses, "AMP float16")
    else:
        with pytest.raises(gpu_check.StepFailed, match=problem):
            gpu_check.check_losses(losses, "AMP float16")


R50_HF = (
    "# R50 multi-scale: plugin (compiled op) vs HF: max abs diff of the last decoder layer's "
    "logits {}, boxes 5.96e-08\n"
)


@pytest.mark.parametrize(
    "output, problem",
    [
        (R50_HF.format("8.94e-07"), None),
        (R50_HF.format("3.00e-02"), "R50 multi-scale differs from HF: logits 3.00e-02"),
        (R50_HF.format("nan"), "logits nan"),
        ("# demo MobileNetV2: no HF peer\n", "no comparison with the HF peer"),
    ],
)
def test_inference_outputs_must_agree_with_the_peers(gpu_check, output, problem):
    if problem is None:
        gpu_check.check_inference_diffs(output, "fp32")
    else:
        with pytest.raises(gpu_check.StepFailed, match=problem):
            gpu_check.check_inference_diffs(output, "fp32")
