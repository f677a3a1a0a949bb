"""The multi-scale deformable attention op: compiled kernels against the grid_sample reference,
gradients, tracing, input validation and the choice of implementation."""

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
DEVICES = [
    pytest.param("cpu", marks=requires_cpu_kernel),
    pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda]),
]

# (N, M, D, spatial shapes, Lq, P, spread): spread > 1 puts points outside the maps
CASES = {
    "one_level_one_point_1x1": (2, 1, 4, [(1, 1)], 5, 1, 1.5),
    "row_map_1xW": (1, 2, 8, [(1, 7)], 6, 2, 1.2),
    "non_square_levels_D5": (2, 3, 5, [(5, 3), (2, 9), (1, 1)], 11, 3, 1.2),
    "D12_four_levels": (1, 4, 12, [(9, 13), (5, 7), (3, 4), (2, 2)], 17, 4, 1.0),
    "far_outside": (2, 2, 16, [(6, 8), (3, 4)], 9, 4, 8.0),
    "empty_queries": (2, 2, 8, [(4, 4), (2, 2)], 0, 2, 1.0),
    "D33_large_W": (1, 2, 33, [(3, 40)], 8, 2, 1.0),
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


def forward_backward(fn, inputs, grad_output=None):
    value, shapes, starts, locations, weights = (
        t.detach().requires_grad_(t.is_floating_point()) for t in inputs
    )
    output = fn(value, shapes, starts, locations, weights)
    if grad_output is None:
        generator = torch.Generator().manual_seed(1)
        grad_output = torch.randn(output.shape, generator=generator, dtype=output.dtype)
        grad_output = grad_output.to(output.device)
    grads = torch.autograd.grad(output, (value, locations, weights), grad_output.to(output.dtype))
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ALL_CASES.values(), ids=list(ALL_CASES))
def test_compiled_matches_reference(device, case):
    inputs = make_inputs(*case, device=device)
    # a float64 reference isolates the kernel's own float32 rounding
    reference_inputs = [t.double() if t.is_floating_point() else t for t in inputs]
    expected, expected_grads, grad_output = forward_backward(
        ms_deform_attn_pytorch, reference_inputs
    )
    output, grads, _ = forward_backward(compiled_op, inputs, grad_output.float())
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


@pytest.mark.parametrize("device", DEVICES)
def test_points_at_infinity_and_nan_sample_nothing(device):
    value, shapes, starts, locations, weights = make_inputs(1, 2, 4, [(3, 5)], 4, 2, 1.0)
    locations[0, 0] = 1e30
    locations[0, 1] = -1e30
    locations[0, 2] = float("nan")
    inputs = [t.to(device) for t in (value, shapes, starts, locations, weights)]
    output, grads, _ = forward_backward(compiled_op, inputs)
    assert torch.all(output[0, :3] == 0)
    assert torch.all(grads[1][0, :3] == 0) and torch.all(grads[2][0, :3] == 0)
    torch.testing.assert_close(output[0, 3], ms_deform_attn_pytorch(*inputs)[0, 3])


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    inputs = make_inputs(1, 2, 3, [(3, 4), (2, 1)], 3, 2, 1.3, dtype=torch.float64, device=device)
    value, shapes, starts, locations, weights = (
        t.requires_grad_(t.is_floating_point()) for t in inputs
    )
    assert torch.autograd.gradcheck(
        lambda v, loc, w: compiled_op(v, shapes, starts, loc, w), (value, locations, weights)
    )


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
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_reduced_precision_close_to_float32(dtype):
    inputs = make_inputs(2, 4, 32, [(12, 17), (6, 9), (3, 5)], 40, 4, 1.1, device="cuda")
    value, shapes, starts, locations, weights = inputs
    low = (value.to(dtype), shapes, starts, locations, weights)
    # the reference sees the same rounded value, so only accumulation differs
    expected, expected_grads, grad_output = forward_backward(
        ms_deform_attn_pytorch, (value.to(dtype).float(), shapes, starts, locations, weights)
    )
    output, grads, _ = forward_backward(ms_deform_attn, low, grad_output.to(dtype))
    assert output.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == torch.float32
    tolerance = {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(output.float(), expected, **tolerance)
    grad_scale = [g.abs().max().item() for g in expected_grads]
    for grad, expected_grad, scale in zip(grads, expected_grads, grad_scale):
        torch.testing.assert_close(grad.float() / scale, expected_grad / scale, **tolerance)


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


@requires_cpu_kernel
def test_non_contiguous_inputs():
    value, shapes, starts, locations, weights = make_inputs(2, 2, 6, [(3, 4), (2, 2)], 5, 2, 1.0)
    # same values, transposed storage
    value_t = value.transpose(0, 1).contiguous().transpose(0, 1)
    locations_t = locations.transpose(1, 2).contiguous().transpose(1, 2)
    weights_t = weights.transpose(1, 3).contiguous().transpose(1, 3)
    assert not (value_t.is_contiguous() or locations_t.is_contiguous() or weights_t.is_contiguous())
    torch.testing.assert_close(
        ms_deform_attn(value_t, shapes, starts, locations_t, weights_t),
        ms_deform_attn_pytorch(value, shapes, starts, locations, weights),
    )


@requires_cpu_kernel
def test_opcheck_registration():
    """Schema, autograd registration and fake kernels agree with the real kernels."""
    inputs = [
        t.requires_grad_(t.is_floating_point())
        for t in make_inputs(1, 2, 4, [(3, 4), (2, 2)], 3, 2, 1.0)
    ]
    torch.library.opcheck(torch.ops.deformable_detr.ms_deform_attn_forward.default, tuple(inputs))
    backward_inputs = tuple(t.detach() for t in inputs) + (torch.randn(1, 3, 8),)
    torch.library.opcheck(
        torch.ops.deformable_detr.ms_deform_attn_backward.default, backward_inputs
    )


class _AttentionBlock(torch.nn.Module):
    def forward(self, value, shapes, starts, locations, weights):
        return ms_deform_attn(value, shapes, starts, locations, weights.softmax(-1)) * 2


@requires_cpu_kernel
def test_torch_compile_fullgraph(monkeypatch):
    monkeypatch.setenv(op.IMPL_ENV_VAR, "compiled")
    inputs = make_inputs(1, 2, 4, [(3, 4), (2, 2)], 3, 2, 1.0)
    compiled = torch.compile(_AttentionBlock(), fullgraph=True, backend="aot_eager")
    output, grads, grad_output = forward_backward(compiled, inputs)
    expected, expected_grads, _ = forward_backward(_AttentionBlock(), inputs, grad_output)
    torch.testing.assert_close(output, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


@requires_cpu_kernel
def test_torch_export(monkeypatch):
    monkeypatch.setenv(op.IMPL_ENV_VAR, "compiled")
    inputs = make_inputs(1, 2, 4, [(3, 4), (2, 2)], 3, 2, 1.0)
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
def test_bad_inputs_raise_value_error(monkeypatch, impl, make, message):
    monkeypatch.setenv(op.IMPL_ENV_VAR, impl)
    with pytest.raises(ValueError, match=message):
        ms_deform_attn(*make())


@requires_cpu_kernel
def test_kernel_checks_inputs_itself():
    value, shapes, starts, locations, weights = _valid()
    with pytest.raises(RuntimeError, match=r"attention_weights must be \(N, Lq, M, L, P\)"):
        compiled_op(value, shapes, starts, locations, weights[..., :1])
    with pytest.raises(RuntimeError, match="does not fit in value's S = 16"):
        compiled_op(value, shapes, torch.tensor([0, 15]), locations, weights)
    with pytest.raises(RuntimeError, match="grad_output must be"):
        torch.ops.deformable_detr.ms_deform_attn_backward(
            value, shapes, starts, locations, weights, torch.zeros(2, 5, 7)
        )


def test_dispatch_env_var(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args)
        return ms_deform_attn_pytorch(*args)

    monkeypatch.setattr(op, "ms_deform_attn_pytorch", spy)
    inputs = _valid()
    monkeypatch.setenv(op.IMPL_ENV_VAR, "pytorch")
    assert op.active_implementation("cpu") == "pytorch"
    ms_deform_attn(*inputs)
    assert len(calls) == 1

    monkeypatch.setenv(op.IMPL_ENV_VAR, "auto")
    expected = "compiled" if CPU_KERNEL else "pytorch"
    assert op.active_implementation("cpu") == expected
    ms_deform_attn(*inputs)
    assert len(calls) == (1 if CPU_KERNEL else 2)

    monkeypatch.setenv(op.IMPL_ENV_VAR, "fastest")
    with pytest.raises(RuntimeError, match="DEFORMABLE_DETR_MSDA_IMPL='fastest' is invalid"):
        ms_deform_attn(*inputs)


def test_forcing_missing_compiled_kernel_is_an_error(monkeypatch):
    monkeypatch.setattr(op, "_COMPILED_KERNELS", {"cpu": False, "cuda": False})
    monkeypatch.setenv(op.IMPL_ENV_VAR, "compiled")
    with pytest.raises(RuntimeError, match="no compiled ms_deform_attn kernel for 'cpu'"):
        ms_deform_attn(*_valid())
    monkeypatch.setenv(op.IMPL_ENV_VAR, "auto")
    assert op.active_implementation("cpu") == "pytorch"


def test_build_report():
    kernels = op.compiled_kernels()
    assert set(kernels) == {"cpu", "cuda"}
    assert (op.extension_error() is None) == (kernels["cpu"] or kernels["cuda"])


def test_use_implementation_sets_then_restores_the_choice(monkeypatch):
    monkeypatch.setenv(op.IMPL_ENV_VAR, "auto")
    with op.use_implementation("pytorch"):
        assert op.active_implementation("cpu") == "pytorch"
    assert op.os.environ[op.IMPL_ENV_VAR] == "auto"
    monkeypatch.delenv(op.IMPL_ENV_VAR)
    with pytest.raises(KeyError), op.use_implementation("pytorch"):
        raise KeyError("the variable is restored even when the block fails")
    assert op.IMPL_ENV_VAR not in op.os.environ
    with pytest.raises(ValueError, match="implementation must be one of"):
        with op.use_implementation("fast"):
            pass
