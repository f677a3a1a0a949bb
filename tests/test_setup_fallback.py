"""A broken toolchain never breaks the install: CUDA -> CPU -> pure-PyTorch (setup.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _build_in_copy(tmp_path, **env):
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "csrc", tmp_path / "csrc")
    skip = shutil.ignore_patterns("*.so", "__pycache__")
    shutil.copytree(REPO / "projects", tmp_path / "projects", ignore=skip)
    environment = {key: value for key, value in os.environ.items() if key != "FORCE_CUDA"}
    environment.update(env)
    result = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=tmp_path, capture_output=True, text=True, env=environment,
    )
    built = list((tmp_path / "projects" / "deformable_detr").glob("_C*.so"))
    return result, built


def test_without_a_compiler_the_build_succeeds_with_no_extension(tmp_path):
    result, built = _build_in_copy(tmp_path, CC="/bin/false", CXX="/bin/false", FORCE_CUDA="0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "deformable_detr will use its pure-PyTorch attention" in result.stdout
    assert built == []


@pytest.mark.slow
def test_a_failing_nvcc_falls_back_to_the_cpu_kernels(tmp_path):
    fake_cuda = tmp_path / "fake_cuda"
    (fake_cuda / "bin").mkdir(parents=True)
    nvcc = fake_cuda / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 1\n")
    nvcc.chmod(0o755)
    result, built = _build_in_copy(tmp_path, CUDA_HOME=str(fake_cuda))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "CUDA build failed" in result.stdout and "building CPU kernels" in result.stdout
    assert len(built) == 1


def test_cuda_arch_below_sm60_is_refused(tmp_path):
    result, built = _build_in_copy(tmp_path, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST="5.2;7.5+PTX")
    assert result.returncode != 0
    assert "has 5.2: the CUDA kernels need compute capability 6.0 or newer" in result.stderr
    assert built == []
