"""The op's CPU kernels once per CPU capability this machine runs (baseline, AVX2, AVX-512),
chosen with DEFORMABLE_DETR_CPU_CAPABILITY, against the float64 reference; and the choice."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import test_ms_deform_attn_op as op_tests
import torch
from test_ms_deform_attn_op import ALL_CASES, forward_backward, make_inputs

from deformable_detr.collect_env import collect_env_info
from deformable_detr.layers import ms_deform_attn_op as op
from deformable_detr.layers import ms_deform_attn_pytorch

pytestmark = pytest.mark.skipif(
    not op.compiled_kernels()["cpu"],
    reason=f"compiled CPU kernel not built: {op.extension_error()}",
)

ENV_VAR = "DEFORMABLE_DETR_CPU_CAPABILITY"
CAPABILITIES = ["default", "avx2", "avx512"]


def widest_capability():
    previous = os.environ.pop(ENV_VAR, None)
    try:
        return torch.ops.deformable_detr.cpu_capability()
    finally:
        if previous is not None:
            os.environ[ENV_VAR] = previous


SUPPORTED = (
    CAPABILITIES[: CAPABILITIES.index(widest_capability()) + 1]
    if op.compiled_kernels()["cpu"]
    else []
)

# Channel counts that exercise every path of the vectorized channel loop: blocks of four
# vectors, one to three leftover vectors and a scalar tail, for 8- and 16-lane vectors.
CHANNEL_CASES = {
    "D32_two_avx512_vectors": (2, 3, 32, [(7, 9), (4, 5)], 13, 4, 1.1),
    "D48_three_avx512_vectors": (1, 2, 48, [(6, 5), (3, 3), (2, 2)], 9, 3, 1.1),
    "D100_blocks_and_tail": (1, 2, 100, [(5, 6), (3, 3)], 7, 3, 1.2),
}


@pytest.fixture(params=SUPPORTED)
def capability(request, monkeypatch):
    monkeypatch.setenv(ENV_VAR, request.param)
    assert torch.ops.deformable_detr.cpu_capability() == request.param
    return request.param


@pytest.mark.parametrize(
    "case", [*ALL_CASES.values(), *CHANNEL_CASES.values()], ids=[*ALL_CASES, *CHANNEL_CASES]
)
def test_matches_float64_reference(capability, case):
    op_tests.test_compiled_matches_reference("cpu", case)


def test_gradcheck_float64(capability):
    op_tests.test_gradcheck_float64("cpu")


def test_points_at_infinity_and_nan_sample_nothing(capability):
    op_tests.test_points_at_infinity_and_nan_sample_nothing("cpu")


def test_infinite_value_outside_the_sampled_corners_stays_out(capability):
    # corners outside the map read zeros, never a value row scaled by a zero weight
    value, shapes, starts, locations, weights = make_inputs(1, 1, 16, [(4, 4)], 3, 2, 1.0)
    value[0, 0] = float("inf")  # position (0, 0)
    locations[0, :, 0, 0] = torch.tensor([[0.99, 0.99], [0.9, 0.95]], dtype=torch.float32)
    output = torch.ops.deformable_detr.ms_deform_attn_forward(
        value, shapes, starts, locations, weights
    )
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output, ms_deform_attn_pytorch(value, shapes, starts, locations,
                                                              weights))


@pytest.mark.parametrize("threads", [1, 3])
def test_backward_independent_of_thread_count(capability, threads):
    op_tests.test_cpu_backward_independent_of_thread_count(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_accumulates_in_float32(capability, dtype):
    inputs = make_inputs(2, 4, 32, [(12, 17), (6, 9), (3, 5)], 40, 4, 1.1)
    value, shapes, starts, locations, weights = inputs
    grad_output = torch.randn(2, 40, 4 * 32, generator=torch.Generator().manual_seed(1))
    grad_output = grad_output.to(dtype)
    # the reference sees the same rounded value and grad_output, so only accumulation and
    # output rounding differ
    reference_inputs = (value.to(dtype).double(), shapes, starts, locations.double(),
                        weights.double())
    expected, expected_grads, _ = forward_backward(
        ms_deform_attn_pytorch, reference_inputs, grad_output.double()
    )
    output, grads, _ = forward_backward(
        op_tests.compiled_op, (value.to(dtype), shapes, starts, locations, weights), grad_output
    )
    assert (output.dtype, grads[0].dtype, grads[1].dtype, grads[2].dtype) == (
        dtype, dtype, torch.float32, torch.float32
    )
    rounding = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    torch.testing.assert_close(output.double(), expected, rtol=2 * rounding, atol=2 * rounding)
    torch.testing.assert_close(grads[0].double(), expected_grads[0], rtol=2 * rounding,
                               atol=2 * rounding)
    # locations and weights: float32 gradients, so float32 accuracy, relative to their scale
    for grad, expected_grad in zip(grads[1:], expected_grads[1:]):
        scale = expected_grad.abs().max()
        torch.testing.assert_close(grad.double() / scale, expected_grad / scale, rtol=1e-5,
                                   atol=1e-5)


def test_unknown_capability_is_an_error(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "sse9")
    inputs = make_inputs(1, 1, 4, [(2, 2)], 1, 1, 1.0)
    with pytest.raises(RuntimeError, match="=sse9 is invalid; expected one of default, avx2"):
        torch.ops.deformable_detr.ms_deform_attn_forward(*inputs)
    with pytest.raises(RuntimeError, match="=sse9 is invalid"):
        torch.ops.deformable_detr.cpu_capability()


def test_capability_names_ignore_case(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "DEFAULT")
    assert torch.ops.deformable_detr.cpu_capability() == "default"


@pytest.mark.skipif(
    sys.platform != "linux" or os.uname().machine != "x86_64"
    or "ATEN_CPU_CAPABILITY" in os.environ,
    reason="reads /proc/cpuinfo of an x86-64 Linux machine, ATen choosing freely",
)
def test_widest_capability_follows_the_cpu_flags():
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= set(flags):
        expected = "avx512"
    elif {"avx2", "fma"} <= set(flags):
        expected = "avx2"
    else:
        expected = "default"
    assert widest_capability() == expected


@pytest.mark.skipif("avx2" not in SUPPORTED, reason="needs a CPU with AVX2")
def test_capability_above_what_aten_runs_is_an_error():
    # ATEN_CPU_CAPABILITY lowers what ATen (and so this op) considers the CPU's widest
    code = (
        "import torch, deformable_detr.layers.ms_deform_attn_op;"
        "print(torch.ops.deformable_detr.cpu_capability(), flush=True);"
        "import os; os.environ['DEFORMABLE_DETR_CPU_CAPABILITY'] = 'avx2';"
        "torch.ops.deformable_detr.cpu_capability()"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    env.pop(ENV_VAR, None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert result.stdout.strip() == "default"
    assert "=avx2: this CPU runs at most default" in result.stderr
    assert "can only lower the capability" in result.stderr


def test_environment_report_names_the_kernels_in_use(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "default")
    line = dict(collect_env_info())["op CPU kernels for"]
    assert line == f"default (torch's CPU capability: {torch.backends.cpu.get_cpu_capability()})"
    monkeypatch.setenv(ENV_VAR, "bogus")
    assert "bogus is invalid" in dict(collect_env_info())["op CPU kernels for"]


@pytest.mark.skipif(
    shutil.which("objdump") is None or os.uname().machine != "x86_64",
    reason="disassembles an x86-64 build with binutils' objdump",
)
def test_only_the_avx2_and_avx512_kernels_use_avx_instructions():
    # A baseline function holding AVX code (say, an inline function the linker kept from an
    # AVX-512 object) would crash CPUs without it: the build must run on every x86-64 CPU.
    from deformable_detr import _C

    listing = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", _C.__file__],
        capture_output=True, text=True, check=True,
    ).stdout
    using_avx, function = set(), None
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line
        elif re.match(r"\s+[0-9a-f]+:\s+v[a-z0-9]+\s", line):  # VEX/EVEX mnemonics start with v
            using_avx.add(function)
    outside = {f for f in using_avx if "::AVX2::" not in f and "::AVX512::" not in f}
    assert not outside
    assert any("::AVX512::" in f for f in using_avx)  # built on x86-64 whatever the CPU
