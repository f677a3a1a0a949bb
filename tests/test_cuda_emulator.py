"""The CPU emulation of CUDA (csrc/testing/cuda_emulator.h) keeps the hardware's semantics and
reports kernels that would hang or be undefined on a GPU; a kernel bug is caught by it."""

import re
import shutil
import subprocess

import cuda_emulation
import pytest


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    return cuda_emulation.compile_selftest(tmp_path_factory.mktemp("emulator") / "selftest")


def run(executable, case, seed=None):
    command = [str(executable), case] + ([] if seed is None else [str(seed)])
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def values(executable, case, seed=None):
    result = run(executable, case, seed)
    assert result.returncode == 0, result.stderr
    return [int(v) for v in result.stdout.split()]


def test_shuffles_follow_the_hardware_within_each_width_segment(selftest):
    out = values(selftest, "shuffles")
    for t in range(64):
        lane = t % 32
        down, up, xor, index = out[4 * t : 4 * t + 4]
        # down/up: a source outside the lane's segment leaves the lane with its own value
        assert down == (lane + 3 if lane % 8 + 3 < 8 else lane)
        assert up == (lane - 2 if lane % 16 >= 2 else lane)
        assert xor == lane ^ 5
        assert index == lane - lane % 4 + 3  # lane 7 of each 4-wide segment is its lane 3
    assert out[4 * 5 : 4 * 6] == [5, 3, 0, 7]


def test_votes(selftest):
    ballot = sum(1 << lane for lane in range(0, 32, 3))
    # warp 0: threads 0..31 all < 40; warp 1: threads 32..63 are not
    assert values(selftest, "votes") == [ballot, 1, 1, ballot, 1, 0]


def test_syncthreads_is_a_block_barrier(selftest):
    out = values(selftest, "barrier")
    assert out == [100 * block + 63 - t for block in range(2) for t in range(64)]


def test_schedule_seed_permutes_blocks_reproducibly(selftest):
    assert values(selftest, "block_order") == list(range(16))
    permuted = values(selftest, "block_order", seed=7)
    assert sorted(permuted) == list(range(16)) and permuted != list(range(16))
    assert values(selftest, "block_order", seed=7) == permuted


ERRORS = {
    "lane_exits_before_shuffle": "waits for lane 16, which has exited",
    "lanes_at_different_shuffles": "which is at another call: __shfl_xor_sync",
    "mismatched_masks": r"\(mask 0xffff\) .* but lane 1 passes __shfl_xor_sync\(mask 0xffffffff\)",
    "read_outside_mask": "reads lane 16, which is outside the mask",
    "syncthreads_after_exit": r"__syncthreads\(\) reached by 32 threads while 32 have exited",
    "too_many_threads": "invalid launch configuration: .* more than 1024 threads per block",
    "empty_grid": "invalid launch configuration: grid \\(0,1,1\\)",
}


@pytest.mark.parametrize("case, message", ERRORS.items(), ids=ERRORS)
def test_kernels_undefined_on_a_gpu_are_errors(selftest, case, message):
    result = run(selftest, case)
    assert result.returncode == 3, result.stdout + result.stderr
    assert re.search(message, result.stderr), result.stderr


def values_of_floats(executable):
    result = run(executable, "ms_deform_attn_backward")
    assert result.returncode == 0, result.stderr
    return [float(v) for v in result.stdout.split()]


def test_a_lane_leaving_the_backward_kernel_early_is_caught(selftest, tmp_path):
    # mutation: lanes without a channel leave before the warp reductions (D = 4 here)
    assert len(values_of_floats(selftest)) == 6
    shutil.copytree(cuda_emulation.CSRC / "ms_deform_attn", tmp_path / "ms_deform_attn")
    kernels = tmp_path / "ms_deform_attn" / "cuda" / "ms_deform_attn_kernels.cuh"
    anchor = "      opmath_t sum_attn = 0, sum_x = 0, sum_y = 0;\n"
    source = kernels.read_text()
    assert source.count(anchor) == 1, "the backward kernel changed: update this mutation"
    kernels.write_text(source.replace(anchor, anchor + "      if (threadIdx.x >= s.D) return;\n"))
    mutant = cuda_emulation.compile_selftest(tmp_path / "mutant", kernels_root=tmp_path)
    result = run(mutant, "ms_deform_attn_backward")
    assert result.returncode == 3
    assert "waits for lane 4, which has exited" in result.stderr
