"""Multi-scale deformable attention: the functional op, its reference and its dispatch.

Shapes, used throughout::

    value               (N, S, M, D)        S = sum over levels of H_l * W_l
    spatial_shapes      (L, 2) int64        (H_l, W_l) per level
    level_start_index   (L,) int64          offset of each level in S: [0, H_0*W_0, ...]
    sampling_locations  (N, Lq, M, L, P, 2) normalized (x, y); (0, 0) is the top-left corner
    attention_weights   (N, Lq, M, L, P)
    output              (N, Lq, M * D)

The compiled kernels live in the ``deformable_detr._C`` extension, which registers the
``torch.ops.deformable_detr.ms_deform_attn_forward`` and ``..._backward`` operators with
``TORCH_LIBRARY``; importing it is enough to load them. This module adds their autograd
formula, a fake (meta) kernel for ``torch.compile``/``torch.export`` and autocast handling.

The implementation is ``auto`` (compiled kernel when built for the device, else the
pure-PyTorch reference), ``compiled`` (error if unavailable) or ``pytorch``. The environment
variable ``DEFORMABLE_DETR_MSDA_IMPL`` sets the default when this module is imported;
``with use_implementation(name):`` switches it for a block (a context variable, so it stays
with the thread or task that set it and never touches the process environment).
"""

import contextlib
import contextvars
import importlib.util
import os
from typing import Dict, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "compiled_kernels",
    "extension_error",
    "active_implementation",
    "use_implementation",
]

IMPL_ENV_VAR = "DEFORMABLE_DETR_MSDA_IMPL"
_IMPLEMENTATIONS = ("auto", "compiled", "pytorch")
_OPMATH_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
# an invalid environment value is kept so that the first call reports it
_IMPLEMENTATION = contextvars.ContextVar(
    "ms_deform_attn_implementation",
    default=os.environ.get(IMPL_ENV_VAR, "auto").strip().lower() or "auto",
)


def _load_extension():
    if importlib.util.find_spec("deformable_detr._C") is None:
        return "deformable_detr._C was not built (see the install log; `make setup` rebuilds it)"
    try:
        from deformable_detr import _C  # noqa: F401  (registers the TORCH_LIBRARY ops)
    except (ImportError, OSError) as error:  # e.g. built against another torch
        return str(error)
    return None


_EXTENSION_ERROR = _load_extension()


def _has_kernel(dispatch_key):
    if _EXTENSION_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "deformable_detr::ms_deform_attn_forward", dispatch_key
    )


_COMPILED_KERNELS = {"cpu": _has_kernel("CPU"), "cuda": _has_kernel("CUDA")}


def compiled_kernels() -> Dict[str, bool]:
    """Which compiled kernels were built and loaded: ``{"cpu": bool, "cuda": bool}``."""
    return dict(_COMPILED_KERNELS)


def extension_error() -> Optional[str]:
    """Why ``deformable_detr._C`` could not be imported, or None when it loaded."""
    return _EXTENSION_ERROR


def active_implementation(device) -> str:
    """``"compiled"`` or ``"pytorch"``: what :func:`ms_deform_attn` runs on ``device`` now.

    Raises:
        RuntimeError: ``DEFORMABLE_DETR_MSDA_IMPL`` was invalid at import, or the choice is
            ``compiled`` and no compiled kernel exists for the device.
    """
    device_type = torch.device(device).type
    choice = _IMPLEMENTATION.get()
    if choice not in _IMPLEMENTATIONS:
        raise RuntimeError(
            f"{IMPL_ENV_VAR}={choice!r} is invalid; expected one of {', '.join(_IMPLEMENTATIONS)}"
        )
    available = _COMPILED_KERNELS.get(device_type, False)
    if choice == "compiled" and not available:
        reason = extension_error() or f"it was built without {device_type.upper()} kernels"
        raise RuntimeError(
            f"the compiled implementation was requested but there is no compiled "
            f"ms_deform_attn kernel for {device_type!r}: {reason}. Rebuild with "
            "`pip install --no-build-isolation -e .`."
        )
    if choice == "pytorch" or not available:
        return "pytorch"
    return "compiled"


@contextlib.contextmanager
def use_implementation(name: str):
    """Runs the block with implementation ``name`` (``auto``, ``compiled`` or ``pytorch``)."""
    if name not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {name!r}")
    token = _IMPLEMENTATION.set(name)
    try:
        yield
    finally:
        _IMPLEMENTATION.reset(token)


def ms_deform_attn_pytorch(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """Reference implementation with ``F.grid_sample`` (official ``ms_deform_attn_core_pytorch``).

    Bilinear sampling with ``align_corners=False`` and zero padding: location (0, 0) is the
    top-left corner of the map and pixel centers sit at ``(i + 0.5) / W``. Computes in the
    promoted dtype of its inputs and returns ``(N, Lq, M * D)`` in ``value.dtype``.
    ``level_start_index`` is implied by ``spatial_shapes`` and unused here.
    """
    del level_start_index
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    out_dtype = value.dtype
    value = value.to(dtype)
    attention_weights = attention_weights.to(dtype)
    level_sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split(level_sizes, dim=1)
    # grid_sample wants coordinates in [-1, 1]
    sampling_grids = 2 * sampling_locations.to(dtype) - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_l = value_per_level[level].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(N, M * D, Lq)
    return output.transpose(1, 2).contiguous().to(out_dtype)


def _expect(condition, message):
    if not condition:
        raise ValueError(message)


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Raises ValueError naming the offending argument; shapes as in the module docstring.

    Metadata only: reading the levels would sync the host with a CUDA device on every call, so
    the compiled kernels check them (CPU, in C++) or guard each level (CUDA).
    """
    _expect(value.dim() == 4, f"value must be (N, S, M, D), got shape {tuple(value.shape)}")
    N, S, M, D = value.shape
    _expect(
        spatial_shapes.dim() == 2 and spatial_shapes.shape[1] == 2,
        f"spatial_shapes must be (L, 2), got shape {tuple(spatial_shapes.shape)}",
    )
    L = spatial_shapes.shape[0]
    _expect(L > 0, "spatial_shapes must hold at least one level, got (0, 2)")
    _expect(
        tuple(level_start_index.shape) == (L,),
        f"level_start_index must be (L,) = ({L},), got shape {tuple(level_start_index.shape)}",
    )
    _expect(
        sampling_locations.dim() == 6
        and sampling_locations.shape[0] == N
        and sampling_locations.shape[2] == M
        and sampling_locations.shape[3] == L
        and sampling_locations.shape[5] == 2,
        f"sampling_locations must be (N, Lq, M, L, P, 2) = ({N}, Lq, {M}, {L}, P, 2), "
        f"got shape {tuple(sampling_locations.shape)}",
    )
    Lq, P = sampling_locations.shape[1], sampling_locations.shape[4]
    _expect(
        tuple(attention_weights.shape) == (N, Lq, M, L, P),
        f"attention_weights must be (N, Lq, M, L, P) = {(N, Lq, M, L, P)}, "
        f"got shape {tuple(attention_weights.shape)}",
    )
    for name, tensor in (
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
    ):
        _expect(tensor.dtype == torch.int64, f"{name} must be int64, got {tensor.dtype}")
    _expect(value.is_floating_point(), f"value must be floating point, got {value.dtype}")
    for name, tensor in (
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        _expect(
            tensor.device == value.device,
            f"{name} is on {tensor.device} but value is on {value.device}; "
            "all inputs must be on one device",
        )


def _check_levels(value, spatial_shapes, level_start_index):
    """The pure-PyTorch path's check of what the compiled CPU kernel checks in C++.

    Reads ``spatial_shapes`` and ``level_start_index`` on the host, as that path does anyway.
    """
    if torch.compiler.is_compiling():
        return  # a traced graph cannot read tensor data
    shapes, starts = spatial_shapes.tolist(), level_start_index.tolist()
    _expect(
        all(h > 0 and w > 0 for h, w in shapes),
        f"spatial_shapes must hold positive (H, W), got {shapes}",
    )
    sizes = [h * w for h, w in shapes]
    expected_starts = [sum(sizes[:level]) for level in range(len(sizes))]
    _expect(
        starts == expected_starts,
        f"level_start_index must be the exclusive cumsum of H*W = {expected_starts}, "
        f"got {starts}",
    )
    S = value.shape[1]
    _expect(
        S == sum(sizes),
        f"value has S={S} positions but spatial_shapes sum to sum(H*W)={sum(sizes)}",
    )


def _cast_to_opmath(value, sampling_locations, attention_weights):
    """Casts locations and weights to the kernel's accumulation dtype for ``value.dtype``.

    Outside autocast their dtype must be ``value.dtype`` or that accumulation dtype; under
    autocast any floating dtype is accepted, since autocast mixes dtypes by design.
    """
    opmath = _OPMATH_DTYPE.get(value.dtype, value.dtype)
    autocasting = torch.is_autocast_enabled(value.device.type)
    for name, tensor in (
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        _expect(
            autocasting and tensor.is_floating_point() or tensor.dtype in (value.dtype, opmath),
            f"{name} has dtype {tensor.dtype} but value has {value.dtype}; expected "
            f"{value.dtype}" + (f" or {opmath}" if opmath != value.dtype else ""),
        )
    return tuple(
        t if t.dtype == opmath else t.to(opmath) for t in (sampling_locations, attention_weights)
    )


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention (Zhu et al., 2021, Eq. 3) without the projections.

    Args:
        value: (N, S, M, D) floating point.
        spatial_shapes: (L, 2) int64, (H, W) of each level.
        level_start_index: (L,) int64, exclusive cumsum of H*W.
        sampling_locations: (N, Lq, M, L, P, 2), normalized (x, y) in [0, 1].
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D) in ``value.dtype``.

    Inputs are validated (ValueError naming the argument) and made contiguous. On CUDA the
    compiled op does not read ``spatial_shapes`` / ``level_start_index`` on the host (no sync):
    a level that does not fit in ``value`` contributes nothing instead of raising. The op runs
    in ``value.dtype`` (float16 and bfloat16 accumulate in float32), with locations and weights
    cast to that accumulation dtype.
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    sampling_locations, attention_weights = _cast_to_opmath(
        value, sampling_locations, attention_weights
    )
    output_dtype = value.dtype
    if active_implementation(value.device) == "pytorch":
        _check_levels(value, spatial_shapes, level_start_index)
        output = ms_deform_attn_pytorch(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    else:
        # custom ops have no autocast kernel, so autocast leaves these inputs as they are
        output = torch.ops.deformable_detr.ms_deform_attn_forward(
            value.contiguous(),
            spatial_shapes.contiguous(),
            level_start_index.contiguous(),
            sampling_locations.contiguous(),
            attention_weights.contiguous(),
        )
    return output if output.dtype == output_dtype else output.to(output_dtype)


def register_autograd(library="deformable_detr"):
    """Autograd formula and fake kernel for the ms_deform_attn operators of ``library``.

    The tests register them as well for their build of the CUDA op on the CPU emulator.
    """
    forward_name = f"{library}::ms_deform_attn_forward"
    backward_name = f"{library}::ms_deform_attn_backward"

    @torch.library.register_fake(forward_name)
    def _forward_fake(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ):
        N, _, M, D = value.shape
        return value.new_empty((N, sampling_locations.shape[1], M * D))

    @torch.library.register_fake(backward_name)
    def _backward_fake(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
    ):
        return (
            torch.empty_like(value),
            torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights),
        )

    ms_deform_attn_backward = getattr(torch.ops, library).ms_deform_attn_backward

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
            ctx.saved_tensors
        )
        grad_value, grad_locations, grad_weights = ms_deform_attn_backward(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            grad_output.contiguous(),
        )
        return grad_value, None, None, grad_locations, grad_weights

    torch.library.register_autograd(forward_name, _backward, setup_context=_setup_context)


if _EXTENSION_ERROR is None:
    register_autograd()
