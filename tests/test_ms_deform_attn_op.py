"""The multi-scale deformable attention op: compiled kernels against the grid_sample reference,
gradients, tracing, input validation and the choice of implementation.

The kernel tests run on three backends: the CPU kernel, the CUDA kernel on a GPU, and the same
CUDA kernel built by the host compiler on the CPU emulation of CUDA (``cuda_emulated``, see
tests/cuda_emulation.py), so the CUDA code is tested on every run, GPU or not."""

import contextlib
import os
import subprocess
import sys

import cuda_emulation
import pytest
import torch

from deformable_detr.layers import ms_deform_attn, ms_deform_attn_pytorch
from deformable_detr.layers import ms_deform_attn_op as op

CPU_KERNEL = op.compiled_kernels()["cpu"]
requires_cpu_kernel = pytest.mark.skipif(
    not CPU_KERNEL, reason=f"compiled CPU kernel not built: {op.extension_error()}"
)
requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and op.compiled_kernels()["cuda"]),
    reason="needs a CUDA device and the compiled CUDA kernel",
)
CUDA_BACKENDS = [pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda]), "cuda_emulated"]
BACKENDS = [pytest.param("cpu", marks=requires_cpu_kernel), *CUDA_BACKENDS]


def device_of(backend):
    """Where a backend's tensors live: the emulated CUDA op takes CPU tensors."""
    return "cuda" if backend == "cuda" else "cpu"


def library_of(backend):
    """The op library of a backend: ``torch.ops.deformable_detr`` or the emulated CUDA build."""
    return cuda_emulation.load() if backend == "cuda_emulated" else torch.ops.deformable_detr


def op_of(backend):
    """The compiled forward op (with autograd) of a backend."""
    return library_of(backend).ms_deform_attn_forward

# (N, M, D, spatial shapes, Lq, P, spread): spread > 1 puts points outside the maps
CASES = {
    "one_level_one_point_1x1": (2, 1, 4, [(1, 1)], 5, 1, 1.5),
    "row_map_1xW": (1, 2, 8, [(1, 7)], 6, 2, 1.2),
    "non_square_levels_D5": (2, 3, 5, [(5, 3), (2, 9), (1, 1)], 11, 3, 1.2),
    "D12_four_levels": (1, 4, 12, [(9, 13), (5, 7), (3, 4), (2, 2)], 17, 4, 1.0),
    "far_outside": (2, 2, 16, [(6, 8), (3, 4)], 9, 4, 8.0),
    "empty_queries": (2, 2, 8, [(4, 4), (2, 2)], 0, 2, 1.0),
    "D33_large_W": (1, 2, 33, [(3, 40)], 8, 2, 1.0),
    "D140_chunks": (1, 1, 140, [(4, 5), (2, 3)], 3, 2, 1.2),
    "empty_batch": (0, 2, 8, [(4, 4), (2, 2)], 3, 2, 1.0),
}


def make_inputs(N, M, D, shapes, Lq, P, spread, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cumsum(sizes, 0) - sizes
    L, S = len(shapes), int(sizes.sum())
    value = torch.randn(N, S, M, D, generator=generator, dtype=torch.float64)
    locations = (torch.rand(N, Lq, M, L, P, 2, generator=generator, dtype=torch.float64) - 0.5)
    locations = locations * spread + 0.5
    weights = torch.rand(N, Lq, M, L, P, generator=generator, dtype=torch.float64)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return (
        value.to(device, dtype),
        spatial_shapes.to(device),
        level_start_index.to(device),
        locations.to(device, dtype),
        weights.to(device, dtype),
    )


@contextlib.contextmanager
def host_sync_forbidden(fn, device):
    """On CUDA, a host sync inside the block raises, except in the reference (it reads H, W)."""
    if device.type != "cuda" or fn is ms_deform_attn_pytorch:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def forward_backward(fn, inputs, grad_output=None):
    value, shapes, starts, locations, weights = (
        t.detach().requires_grad_(t.is_floating_point()) for t in inputs
    )
    with host_sync_forbidden(fn, value.device):
        output = fn(value, shapes, starts, locations, weights)
    if grad_output is None:
        generator = torch.Generator().manual_seed(1)
        grad_output = torch.randn(output.shape, generator=generator, dtype=output.dtype)
        grad_output = grad_output.to(output.device)
    grad_output = grad_output.to(output.dtype)
    with host_sync_forbidden(fn, value.device):
        grads = torch.autograd.grad(output, (value, locations, weights), grad_output)
    return output, grads, grad_output


def compiled_op(*inputs):
    return torch.ops.deformable_detr.ms_deform_attn_forward(*inputs)


def random_cases(count, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    cases = []
    for _ in range(count):
        shapes = [(draw(1, 9), draw(1, 9)) for _ in range(draw(1, 4))]
        cases.append((draw(1, 2), draw(1, 4), draw(1, 20), shapes, draw(0, 12), draw(1, 4), 1.3))
    return cases


ALL_CASES = {**CASES, **{f"random{i}": case for i, case in enumerate(random_cases(12))}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ALL_CASES.values(), ids=list(ALL_CASES))
def test_compiled_matches_reference(backend, case):
    inputs = make_inputs(*case, device=device_of(backend))
    # a float64 reference isolates the kernel's own float32 rounding
    reference_inputs = [t.double() if t.is_floating_point() else t for t in inputs]
    expected, expected_grads, grad_output = forward_backward(
        ms_deform_attn_pytorch, reference_inputs
    )
    output, grads, _ = forward_backward(op_of(backend), inputs, grad_output.float())
    assert output.dtype == torch.float32 and output.shape == expected.shape
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)
    # A normalized location's gradient is W (or H) times that of a pixel coordinate; compare the
    # latter, so the float32 tolerance does not shrink with the map size.
    pixels = inputs[1].flip(-1).view(1, 1, 1, -1, 1, 2).double()
    grads = (grads[0], grads[1] / pixels, grads[2])
    expected_grads = (expected_grads[0], expected_grads[1] / pixels, expected_grads[2])
    for name, grad, expected_grad in zip(("value", "locations", "weights"), grads, expected_grads):
        torch.testing.assert_close(
            grad.double(), expected_grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )


def pixel_grid_locations(shapes, xs, ys):
    """(L, len(xs) * len(ys), 2) normalized locations of pixel coordinates (x, y) per level.

    ``x(W)`` and ``y(H)`` map a level's size to its coordinates; pixel centers are integers.
    """
    per_level = []
    for H, W in shapes:
        x = torch.tensor([x_of(W) for x_of in xs], dtype=torch.float64)
        y = torch.tensor([y_of(H) for y_of in ys], dtype=torch.float64)
        grid = torch.stack(torch.meshgrid((x + 0.5) / W, (y + 0.5) / H, indexing="ij"), -1)
        per_level.append(grid.reshape(-1, 2))
    return torch.stack(per_level)


@pytest.mark.parametrize("backend", BACKENDS)
def test_points_on_the_borders_match_reference(backend):
    # pixel coordinates -1 and K (the last ones with a corner on the map), 0 and K - 1 (the
    # border pixels), and just off each of them, on non-square levels so that W and H differ
    exact = [lambda K: -1.0, lambda K: 0.0, lambda K: K - 1.0, lambda K: float(K)]
    off = [lambda K, c=c, e=e: c(K) + e for c in exact for e in (-1e-3, 1e-3)]
    coordinates = exact + off
    shapes = [(3, 5), (4, 2), (1, 1)]
    grid = pixel_grid_locations(shapes, coordinates, coordinates)  # (L, P, 2)
    value, shapes_t, starts, _, weights = make_inputs(
        1, 2, 3, shapes, 1, grid.shape[1], 1.0, dtype=torch.float64
    )
    locations = grid.expand(1, 1, 2, *grid.shape).contiguous()
    inputs = [t.to(device_of(backend)) for t in (value, shapes_t, starts, locations, weights)]
    expected, expected_grads, grad_output = forward_backward(ms_deform_attn_pytorch, inputs)
    output, grads, _ = forward_backward(op_of(backend), inputs, grad_output)
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)
    for name, grad, expected_grad in zip(("value", "weights"), grads[::2], expected_grads[::2]):
        torch.testing.assert_close(
            grad, expected_grad, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}"
        )
    # The sample is piecewise bilinear: at an integer coordinate its derivative jumps, and
    # grid_sample's rounding picks a side. Compare location gradients off the integers, and at
    # -1 and K, where every corner is padding, expect none.
    sizes = shapes_t.flip(-1).view(1, 1, 1, -1, 1, 2).to(locations.device)
    pixels = locations * sizes - 0.5
    on_integer = (pixels == pixels.round()).any(-1, keepdim=True).expand_as(pixels)
    outside = ((pixels == -1) | (pixels == sizes)).any(-1, keepdim=True).expand_as(pixels)
    assert torch.all(grads[1][outside] == 0)
    torch.testing.assert_close(
        grads[1][~on_integer], expected_grads[1][~on_integer], rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_points_at_infinity_and_nan_sample_nothing(backend):
    value, shapes, starts, locations, weights = make_inputs(1, 2, 4, [(3, 5)], 6, 2, 1.0)
    locations[0, 0] = float("inf")
    locations[0, 1] = -float("inf")
    locations[0, 2] = float("nan")
    locations[0, 3] = 1e30
    locations[0, 4] = -1e30
    inputs = [t.to(device_of(backend)) for t in (value, shapes, starts, locations, weights)]
    output, grads, _ = forward_backward(op_of(backend), inputs)
    assert torch.all(output[0, :5] == 0)
    assert torch.all(grads[1][0, :5] == 0) and torch.all(grads[2][0, :5] == 0)
    torch.testing.assert_close(output[0, 5], ms_deform_attn_pytorch(*inputs)[0, 5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    inputs = make_inputs(
        1, 2, 3, [(3, 4), (2, 1)], 3, 2, 1.3, dtype=torch.float64, device=device_of(backend)
    )
    value, shapes, starts, locations, weights = (
        t.requires_grad_(t.is_floating_point()) for t in inputs
    )
    forward = op_of(backend)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: forward(v, shapes, starts, loc, w), (value, locations, weights)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    value, shapes, starts, locations, weights = make_inputs(
        2, 2, 6, [(3, 4), (2, 2)], 5, 2, 1.0, device=device_of(backend)
    )
    # same values, transposed storage
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    locations_t = locations.transpose(1, 2).contiguous().transpose(1, 2)
    weights_t = weights.transpose(1, 3).contiguous().transpose(1, 3)
    assert not (value_t.is_contiguous() or locations_t.is_contiguous() or weights_t.is_contiguous())
    expected, expected_grads, grad_output = forward_backward(
        op_of(backend), (value, shapes, starts, locations, weights)
    )
    output, grads, _ = forward_backward(
        op_of(backend), (value_t, shapes, starts, locations_t, weights_t), grad_output
    )
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6)


# the float64 reference sees the same rounded value, so only the kernel's accumulation differs
DTYPE_TOLERANCES = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPE_TOLERANCES, ids=str)
def test_cuda_kernels_all_dtypes_match_reference(backend, dtype):
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    value, shapes, starts, locations, weights = make_inputs(
        2, 4, 40, [(12, 17), (6, 9), (3, 5)], 10, 4, 1.1, dtype=torch.float64,
        device=device_of(backend),
    )
    rounded = value.to(dtype)
    expected, expected_grads, grad_output = forward_backward(
        ms_deform_attn_pytorch, (rounded.double(), shapes, starts, locations, weights)
    )
    output, grads, _ = forward_backward(
        op_of(backend),
        (rounded, shapes, starts, locations.to(opmath), weights.to(opmath)),
        grad_output.to(dtype),
    )
    assert output.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == opmath
    tolerance = DTYPE_TOLERANCES[dtype]
    # grad_output is rounded to dtype too: compare the gradients relative to their scale
    scale = grad_output.abs().max()
    torch.testing.assert_close(output.double(), expected, rtol=tolerance, atol=tolerance * scale)
    for name, grad, expected_grad in zip(("value", "locations", "weights"), grads, expected_grads):
        grad_scale = expected_grad.abs().max()
        torch.testing.assert_close(
            grad.double() / grad_scale, expected_grad / grad_scale, rtol=tolerance,
            atol=tolerance, msg=lambda m, n=name: f"{n}: {m}",
        )


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_kernels_skip_levels_that_do_not_fit_in_value(backend):
    # The CUDA op does not read the levels on the host (a sync), so it must not read past value
    # when they are inconsistent: value is a view whose storage goes on with huge numbers.
    device = device_of(backend)
    value, shapes, _, locations, weights = make_inputs(
        1, 2, 4, [(3, 4), (2, 2)], 6, 3, 1.0, dtype=torch.float64, device=device
    )
    padded = torch.cat([value, torch.full_like(value, 1e6)], dim=1)[:, : value.shape[1]]
    assert padded.is_contiguous() and padded.untyped_storage().nbytes() > value.nbytes
    starts = torch.tensor([0, 14], device=device)  # level 1 would end at 18 > S = 16
    output, grads, grad_output = forward_backward(
        op_of(backend), (padded, shapes, starts, locations, weights)
    )
    only_level_0 = weights.clone()
    only_level_0[:, :, :, 1] = 0
    expected, expected_grads, _ = forward_backward(
        ms_deform_attn_pytorch, (value, shapes, starts, locations, only_level_0), grad_output
    )
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(grads[0], expected_grads[0])
    assert torch.all(grads[1][:, :, :, 1] == 0) and torch.all(grads[2][:, :, :, 1] == 0)


@pytest.fixture
def deterministic_algorithms():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_cuda_backward_is_flagged_nondeterministic(backend, deterministic_algorithms):
    # the CUDA backward adds grad_value with atomicAdd; the CPU backward needs no atomics
    inputs = make_inputs(1, 2, 4, [(3, 4)], 2, 2, 1.0, device=device_of(backend))
    if backend == "cpu":
        forward_backward(op_of(backend), inputs)
    else:
        message = "ms_deform_attn_backward_cuda does not have a deterministic implementation"
        with pytest.raises(RuntimeError, match=message):
            forward_backward(op_of(backend), inputs)


def test_emulated_schedule_does_not_change_the_result():
    # Only grad_value is summed with atomics, in schedule order; everything else must be
    # bit-identical whatever order the blocks and threads run in.
    library = cuda_emulation.load()
    inputs = make_inputs(2, 3, 37, [(6, 7), (3, 4)], 12, 3, 1.3)
    runs = []
    try:
        for seed in (0, 1, 2):
            library.set_schedule_seed(seed)
            runs.append(forward_backward(library.ms_deform_attn_forward, inputs))
    finally:
        library.set_schedule_seed(0)
    (output, grads, _), permuted = runs[0], runs[1:]
    for other_output, other_grads, _ in permuted:
        assert torch.equal(other_output, output)
        assert torch.equal(other_grads[1], grads[1]) and torch.equal(other_grads[2], grads[2])
        torch.testing.assert_close(other_grads[0], grads[0], rtol=1e-6, atol=1e-6)


@requires_cpu_kernel
@pytest.mark.parametrize("threads", [1, 2, 3, 5, 16])
def test_cpu_backward_independent_of_thread_count(threads):
    # the CPU backward splits the heads into as many tasks as there are threads
    inputs = make_inputs(2, 6, 8, [(6, 7), (3, 4)], 10, 3, 1.3)
    reference_inputs = [t.double() if t.is_floating_point() else t for t in inputs]
    _, expected_grads, grad_output = forward_backward(ms_deform_attn_pytorch, reference_inputs)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _, grads, _ = forward_backward(compiled_op, inputs, grad_output.float())
    finally:
        torch.set_num_threads(previous)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@requires_cuda
def test_cuda_autocast_runs_in_value_dtype():
    value, shapes, starts, locations, weights = make_inputs(
        1, 2, 8, [(4, 6)], 5, 2, 1.0, device="cuda"
    )
    with torch.autocast("cuda", dtype=torch.float16):
        output = ms_deform_attn(value.half(), shapes, starts, locations, weights)
    assert output.dtype == torch.float16


@requires_cpu_kernel
def test_cpu_autocast_runs_in_value_dtype():
    value, shapes, starts, locations, weights = make_inputs(1, 2, 8, [(4, 6)], 5, 2, 1.0)
    low = value.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = ms_deform_attn(low, shapes, starts, locations.bfloat16(), weights)
    assert output.dtype == torch.bfloat16
    expected = ms_deform_attn_pytorch(low.float(), shapes, starts, locations.bfloat16().float(),
                                      weights)
    # float accumulation: only the final rounding to bfloat16 differs
    torch.testing.assert_close(output.float(), expected, rtol=8e-3, atol=8e-3)


@requires_cpu_kernel
def test_cpu_half_value_accumulates_in_float32():
    value, shapes, starts, locations, weights = make_inputs(1, 2, 8, [(4, 6)], 5, 2, 1.0)
    output = ms_deform_attn(value.half(), shapes, starts, locations, weights)
    assert output.dtype == torch.float16
    expected = ms_deform_attn_pytorch(value.half().float(), shapes, starts, locations, weights)
    torch.testing.assert_close(output.float(), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_registration(backend):
    """Schema, autograd registration and fake kernels agree with the real kernels."""
    device = device_of(backend)
    inputs = [
        t.requires_grad_(t.is_floating_point())
        for t in make_inputs(1, 2, 4, [(3, 4), (2, 2)], 3, 2, 1.0, device=device)
    ]
    library = library_of(backend)
    torch.library.opcheck(library.ms_deform_attn_forward.default, tuple(inputs))
    backward_inputs = tuple(t.detach() for t in inputs) + (torch.randn(1, 3, 8, device=device),)
    torch.library.opcheck(library.ms_deform_attn_backward.default, backward_inputs)


class _AttentionBlock(torch.nn.Module):
    def forward(self, value, shapes, starts, locations, weights):
        return ms_deform_attn(value, shapes, starts, locations, weights.softmax(-1)) * 2


@requires_cpu_kernel
def test_torch_compile_fullgraph():
    inputs = make_inputs(1, 2, 4, [(3, 4), (2, 2)], 3, 2, 1.0)
    compiled = torch.compile(_AttentionBlock(), fullgraph=True, backend="aot_eager")
    with op.use_implementation("compiled"):
        output, grads, grad_output = forward_backward(compiled, inputs)
    expected, expected_grads, _ = forward_backward(_AttentionBlock(), inputs, grad_output)
    torch.testing.assert_close(output, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


@requires_cpu_kernel
def test_torch_export():
    inputs = make_inputs(1, 2, 4, [(3, 4), (2, 2)], 3, 2, 1.0)
    with op.use_implementation("compiled"):
        exported = torch.export.export(_AttentionBlock(), tuple(inputs))
    targets = {str(node.target) for node in exported.graph.nodes}
    assert "deformable_detr.ms_deform_attn_forward.default" in targets
    torch.testing.assert_close(exported.module()(*inputs), _AttentionBlock()(*inputs))


def _valid():
    return list(make_inputs(2, 2, 4, [(3, 4), (2, 2)], 5, 2, 1.0))


def _replace(index, tensor):
    inputs = _valid()
    inputs[index] = tensor
    return inputs


BAD_INPUTS = {
    "value_rank": (lambda: _replace(0, torch.zeros(2, 16, 8)), r"value must be \(N, S, M, D\)"),
    "shapes_rank": (lambda: _replace(1, torch.tensor([3, 4])), r"spatial_shapes must be \(L, 2\)"),
    "starts_length": (
        lambda: _replace(2, torch.tensor([0])), r"level_start_index must be \(L,\) = \(2,\)"
    ),
    "starts_inconsistent": (
        lambda: _replace(2, torch.tensor([0, 11])), "exclusive cumsum of H\\*W = \\[0, 12\\]"
    ),
    "S_mismatch": (
        lambda: _replace(0, torch.zeros(2, 17, 2, 4)), r"S=17 .* sum\(H\*W\)=16"
    ),
    "non_positive_shape": (
        lambda: _replace(1, torch.tensor([[4, 4], [0, 2]])), "positive"
    ),
    "locations_shape": (
        lambda: _replace(3, torch.zeros(2, 5, 2, 3, 2, 2)), r"sampling_locations must be \(N, Lq"
    ),
    "weights_shape": (
        lambda: _replace(4, torch.zeros(2, 5, 2, 2, 3)), r"attention_weights must be \(N, Lq"
    ),
    "shapes_dtype": (
        lambda: _replace(1, torch.tensor([[3, 4], [2, 2]], dtype=torch.int32)),
        "spatial_shapes must be int64",
    ),
    "dtype_mismatch": (
        lambda: _replace(3, _valid()[3].double()), "sampling_locations has dtype torch.float64"
    ),
    "integer_value": (
        lambda: _replace(0, torch.zeros(2, 16, 2, 4, dtype=torch.int64)), "floating point"
    ),
    "device_mismatch": (
        lambda: _replace(1, _valid()[1].to("meta")), "spatial_shapes is on meta"
    ),
}


@pytest.mark.parametrize("make, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
@pytest.mark.parametrize("impl", ["pytorch", pytest.param("compiled", marks=requires_cpu_kernel)])
def test_bad_inputs_raise_value_error(impl, make, message):
    with op.use_implementation(impl), pytest.raises(ValueError, match=message):
        ms_deform_attn(*make())


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_checks_inputs_itself(backend):
    value, shapes, starts, locations, weights = _valid()
    forward, backward = op_of(backend), library_of(backend).ms_deform_attn_backward
    with pytest.raises(ValueError, match=r"attention_weights must be \(N, Lq, M, L, P\)"):
        forward(value, shapes, starts, locations, weights[..., :1])
    with pytest.raises(ValueError, match="grad_output must be"):
        backward(value, shapes, starts, locations, weights, torch.zeros(2, 5, 7))


@requires_cpu_kernel
def test_cpu_kernel_checks_the_levels():
    value, shapes, starts, locations, weights = _valid()
    with pytest.raises(ValueError, match=r"exclusive cumsum of H\*W = \[0, 12\], got \[0, 15\]"):
        compiled_op(value, shapes, torch.tensor([0, 15]), locations, weights)
    with pytest.raises(ValueError, match=r"positive \(H, W\), got \(0, 2\) at level 1"):
        compiled_op(value, torch.tensor([[4, 4], [0, 2]]), starts, locations, weights)


class _NoHostReads(torch.Tensor):
    """A tensor that fails the test when Python reads its values."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("tolist", "item", "numpy", "__bool__", "__int__", "__index__", "__float__"):
            raise AssertionError(f"{name}() read a tensor on the host")
        return super().__torch_function__(func, types, args, kwargs)


@requires_cpu_kernel
def test_compiled_path_does_not_read_levels_in_python():
    # on CUDA such a read is a host sync in each of the model's attention calls
    value, shapes, starts, locations, weights = _valid()
    expected = compiled_op(value, shapes, starts, locations, weights)
    with op.use_implementation("compiled"):
        output = ms_deform_attn(
            value, shapes.as_subclass(_NoHostReads), starts.as_subclass(_NoHostReads), locations,
            weights,
        )
        with pytest.raises(AssertionError, match="read a tensor on the host"):
            shapes.as_subclass(_NoHostReads).tolist()
    torch.testing.assert_close(output.as_subclass(torch.Tensor), expected)


@pytest.mark.cuda
@requires_cuda
def test_cuda_op_call_does_not_sync():
    inputs = make_inputs(2, 2, 8, [(6, 8), (3, 4)], 10, 2, 1.0, device="cuda")
    value, shapes, starts, locations, weights = (
        t.requires_grad_(t.is_floating_point()) for t in inputs
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        output = ms_deform_attn(value, shapes, starts, locations, weights)
        output.backward(torch.ones_like(output))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(value.grad).all()


def test_dispatch_choice(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args)
        return ms_deform_attn_pytorch(*args)

    monkeypatch.setattr(op, "ms_deform_attn_pytorch", spy)
    inputs = _valid()
    with op.use_implementation("pytorch"):
        assert op.active_implementation("cpu") == "pytorch"
        ms_deform_attn(*inputs)
    assert len(calls) == 1

    with op.use_implementation("auto"):
        expected = "compiled" if CPU_KERNEL else "pytorch"
        assert op.active_implementation("cpu") == expected
        ms_deform_attn(*inputs)
    assert len(calls) == (1 if CPU_KERNEL else 2)


def _choice_in_a_new_process(env_value):
    code = (
        "from deformable_detr.layers import ms_deform_attn_op as op\n"
        "try:\n    print(op.active_implementation('cpu'))\n"
        "except RuntimeError as error:\n    print(error)\n"
    )
    env = {**os.environ, op.IMPL_ENV_VAR: env_value}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_env_var_sets_the_default_at_import():
    assert _choice_in_a_new_process("pytorch") == "pytorch"
    message = _choice_in_a_new_process("fastest")
    assert "DEFORMABLE_DETR_MSDA_IMPL='fastest' is invalid" in message


def test_forcing_missing_compiled_kernel_is_an_error(monkeypatch):
    monkeypatch.setattr(op, "_COMPILED_KERNELS", {"cpu": False, "cuda": False})
    with op.use_implementation("compiled"):
        with pytest.raises(RuntimeError, match="no compiled ms_deform_attn kernel for 'cpu'"):
            ms_deform_attn(*_valid())
    with op.use_implementation("auto"):
        assert op.active_implementation("cpu") == "pytorch"


def test_build_report():
    kernels = op.compiled_kernels()
    assert set(kernels) == {"cpu", "cuda"}
    assert (op.extension_error() is None) == (kernels["cpu"] or kernels["cuda"])


def test_use_implementation_sets_then_restores_the_choice():
    environment, default = dict(os.environ), op._IMPLEMENTATION.get()
    with op.use_implementation("compiled"):
        with op.use_implementation("pytorch"):
            assert op.active_implementation("cpu") == "pytorch"
        if CPU_KERNEL:
            assert op.active_implementation("cpu") == "compiled"
    with pytest.raises(KeyError), op.use_implementation("compiled"):
        raise KeyError("the choice is restored even when the block fails")
    with op.use_implementation("pytorch"):
        assert dict(os.environ) == environment  # the process environment is left alone
    assert op._IMPLEMENTATION.get() == default
    with pytest.raises(ValueError, match="implementation must be one of"):
        with op.use_implementation("fast"):
            pass
