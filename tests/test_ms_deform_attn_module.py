"""The MSDeformAttn module: shapes, official initialization, reference points and padding."""

import math

import pytest
import torch

from deformable_detr.layers import MSDeformAttn, capture_sampling, ms_deform_attn_pytorch

SHAPES = torch.tensor([[6, 8], [3, 4], [2, 2]])
STARTS = torch.tensor([0, 48, 60])
S = 64


def make_module(d_model=32, n_levels=3, n_heads=4, n_points=2, seed=0):
    torch.manual_seed(seed)
    return MSDeformAttn(d_model, n_levels, n_heads, n_points)


def make_inputs(N=2, Lq=5, C=32, L=3, box=False, seed=1):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(N, Lq, C, generator=generator)
    reference_points = torch.rand(N, Lq, L, 4 if box else 2, generator=generator)
    input_flatten = torch.randn(N, S, C, generator=generator)
    return query, reference_points, input_flatten


def randomize(module):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.1)


def test_output_shape_and_gradients():
    module = make_module()
    query, reference_points, input_flatten = make_inputs()
    query.requires_grad_()
    output = module(query, reference_points, input_flatten, SHAPES, STARTS)
    assert output.shape == (2, 5, 32)
    output.sum().backward()
    assert query.grad is not None and module.sampling_offsets.weight.grad.abs().sum() > 0


def test_official_initialization():
    module = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)
    assert torch.all(module.sampling_offsets.weight == 0)
    bias = module.sampling_offsets.bias.view(8, 4, 4, 2)
    # head h points along angle 2*pi*h/8, scaled so the larger component is 1, times i + 1
    for h in range(8):
        angle = 2 * math.pi * h / 8
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()
        for i in range(4):
            for level in range(4):
                torch.testing.assert_close(bias[h, level, i], direction * (i + 1))
    torch.testing.assert_close(bias[2, 0, 3], torch.tensor([0.0, 4.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[1, 0, 0], torch.tensor([1.0, 1.0]))
    assert torch.all(module.attention_weights.weight == 0)
    assert torch.all(module.attention_weights.bias == 0)
    for linear in (module.value_proj, module.output_proj):
        assert torch.all(linear.bias == 0)
        bound = math.sqrt(6 / (256 + 256))  # xavier_uniform
        assert linear.weight.abs().max() <= bound and linear.weight.std() > bound / 3


def _expected_output(module, query, input_flatten, sampling_locations):
    N, Lq, _ = query.shape
    M, L, P = module.n_heads, module.n_levels, module.n_points
    value = module.value_proj(input_flatten).view(N, S, M, -1)
    weights = module.attention_weights(query).view(N, Lq, M, L * P).softmax(-1)
    sampled = ms_deform_attn_pytorch(
        value, SHAPES, STARTS, sampling_locations, weights.view(N, Lq, M, L, P)
    )
    return module.output_proj(sampled)


def test_two_d_reference_points_offsets_in_pixels_of_each_level():
    module = make_module()
    randomize(module)
    query, reference_points, input_flatten = make_inputs()
    offsets = module.sampling_offsets(query).view(2, 5, 4, 3, 2, 2)
    wh = SHAPES.flip(-1).float()  # (W, H) per level
    locations = reference_points[:, :, None, :, None, :] + offsets / wh[:, None, :]
    expected = _expected_output(module, query, input_flatten, locations)
    output = module(query, reference_points, input_flatten, SHAPES, STARTS)
    torch.testing.assert_close(output, expected)


def test_four_d_reference_points_offsets_scale_with_box():
    module = make_module()
    randomize(module)
    query, boxes, input_flatten = make_inputs(box=True)
    offsets = module.sampling_offsets(query).view(2, 5, 4, 3, 2, 2)
    centers, sizes = boxes[:, :, None, :, None, :2], boxes[:, :, None, :, None, 2:]
    locations = centers + offsets / module.n_points * sizes * 0.5
    expected = _expected_output(module, query, input_flatten, locations)
    output = module(query, boxes, input_flatten, SHAPES, STARTS)
    torch.testing.assert_close(output, expected)


def test_initial_module_samples_along_head_directions():
    module = make_module(n_heads=4, n_points=2)
    query, reference_points, input_flatten = make_inputs()
    # at init offsets equal the bias and weights are uniform over the L * P samples
    offsets = module.sampling_offsets.bias.view(1, 1, 4, 3, 2, 2)
    locations = reference_points[:, :, None, :, None, :] + offsets / SHAPES.flip(-1)[:, None, :]
    expected = _expected_output(module, query, input_flatten, locations)
    torch.testing.assert_close(
        module(query, reference_points, input_flatten, SHAPES, STARTS), expected
    )


def test_padding_mask_hides_padded_positions():
    module = make_module()
    randomize(module)
    query, reference_points, input_flatten = make_inputs()
    mask = torch.zeros(2, S, dtype=torch.bool)
    mask[0, 30:48] = True
    mask[1, STARTS[1]:] = True
    output = module(query, reference_points, input_flatten, SHAPES, STARTS, mask)
    changed = input_flatten.clone()
    changed[mask] = 100.0
    torch.testing.assert_close(
        module(query, reference_points, changed, SHAPES, STARTS, mask), output
    )
    # without the mask the same change reaches the output
    unmasked = module(query, reference_points, changed, SHAPES, STARTS)
    assert not torch.allclose(unmasked, output)
    all_padding = torch.ones(2, S, dtype=torch.bool)
    torch.testing.assert_close(
        module(query, reference_points, input_flatten, SHAPES, STARTS, all_padding),
        module.output_proj.bias.expand(2, 5, 32),
    )


BAD = {
    "query_channels": (lambda q, r, x: (q[..., :16], r, x, None), r"query must be \(N, Lq, C=32\)"),
    "input_batch": (lambda q, r, x: (q, r, x[:1], None), r"input_flatten must be \(N=2, S, C=32\)"),
    "reference_levels": (
        lambda q, r, x: (q, r[:, :, :2], x, None), r"reference_points must be \(N, Lq, L, 2\)"
    ),
    "reference_last_dim": (
        lambda q, r, x: (q, torch.zeros(2, 5, 3, 3), x, None), "reference_points must be"
    ),
    "mask_shape": (
        lambda q, r, x: (q, r, x, torch.zeros(2, S - 1, dtype=torch.bool)),
        r"input_padding_mask must be \(N, S\) = \(2, 64\)",
    ),
}


@pytest.mark.parametrize("make, message", BAD.values(), ids=BAD.keys())
def test_bad_shapes_raise(make, message):
    module = make_module()
    query, reference_points, input_flatten, mask = make(*make_inputs())
    with pytest.raises(ValueError, match=message):
        module(query, reference_points, input_flatten, SHAPES, STARTS, mask)


def test_spatial_shapes_must_cover_input():
    module = make_module()
    query, reference_points, input_flatten = make_inputs()
    with pytest.raises(ValueError, match=r"S=63 .* sum\(H\*W\)=64"):
        module(query, reference_points, input_flatten[:, :63], SHAPES, STARTS)


def test_d_model_divisible_by_heads():
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by n_heads \(4\)"):
        MSDeformAttn(d_model=30, n_heads=4)


def test_module_compiles_fullgraph():
    module = make_module()
    randomize(module)
    query, reference_points, input_flatten = make_inputs()
    mask = torch.zeros(2, S, dtype=torch.bool)
    mask[:, 60:] = True
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(
        compiled(query, reference_points, input_flatten, SHAPES, STARTS, mask),
        module(query, reference_points, input_flatten, SHAPES, STARTS, mask),
    )


def test_capture_records_exactly_what_the_op_received(op_calls):
    received = op_calls
    module = make_module()
    randomize(module)
    query, reference_points, input_flatten = make_inputs(box=True)
    padding_mask = torch.zeros(2, S, dtype=torch.bool)
    padding_mask[1, :10] = True
    with capture_sampling(module) as records:
        module(query, reference_points, input_flatten, SHAPES, STARTS, padding_mask)
    ((record,),) = records.values()
    (args,) = received
    assert torch.equal(record.sampling_locations, args[3])
    assert torch.equal(record.attention_weights, args[4])
    assert record.spatial_shapes is args[1] and record.level_start_index is args[2]
    assert torch.equal(record.reference_points, reference_points)
    assert record.padding_mask is padding_mask


def test_capture_leaves_outputs_unchanged_and_ends_with_the_block():
    module = make_module()
    randomize(module)
    inputs = (*make_inputs(), SHAPES, STARTS)
    expected = module(*inputs)
    with capture_sampling(module) as records:
        captured = module(*inputs)
        module(*inputs)
    assert torch.equal(captured, expected)
    assert len(records[""]) == 2  # one record per call
    module(*inputs)
    assert len(records[""]) == 2 and module._sampling_recorder is None


def test_capture_rejects_unknown_names_and_nesting():
    module = make_module()
    with pytest.raises(ValueError, match="not MSDeformAttn modules"):
        with capture_sampling(module, ["decoder"]):
            pass
    with capture_sampling(module):
        with pytest.raises(RuntimeError, match="already being captured"):
            with capture_sampling(module):
                pass
