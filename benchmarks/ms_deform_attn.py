"""Times the compiled multi-scale deformable attention op against the pure-PyTorch reference.

    python benchmarks/ms_deform_attn.py [--device cpu|cuda] [--threads 2] [--quick]

Shapes are those of Deformable DETR on an 800x1333 image (levels at strides 8/16/32/64:
100x167, 50x84, 25x42, 13x21; N=2, M=8, D=32, L=4, P=4): the encoder (Lq = S = 22223 queries,
one per position) and the decoder (Lq = 300). Sampling locations are realistic rather than
uniform: encoder queries sample around their own position, decoder queries around random
reference points, with offsets of a few pixels, so memory access has the locality of the real
model. Both implementations run through ``ms_deform_attn`` (validation included), chosen with
``use_implementation``.

``--quick`` uses a 4x smaller image and exits with status 1 if the compiled op is slower than
the reference anywhere. The table also gives the compiled op's achieved bandwidth, counting the
bytes each pass must move at least: every tensor read once and every output written once (plus
one read-modify-write of grad_value in the backward pass). On CUDA it is compared with the
device's peak. On the CPU it is compared with a copy of a tensor larger than the caches
(memory bandwidth), and the bytes of the bilinear corner rows the kernels gather (each sample
reads four rows of D values; the backward also reads and writes four rows of grad_value) with
a copy that fits in the threads' L2 caches, measured in the same run; the CPU kernel in use
(``torch.ops.deformable_detr.cpu_capability()``) is printed in the header.
"""

import argparse
import sys
import time

import torch
from timing import warm_then_time

from deformable_detr.layers import ms_deform_attn
from deformable_detr.layers.ms_deform_attn_op import active_implementation, use_implementation

FULL_LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
QUICK_LEVELS = [(25, 42), (13, 21), (7, 11), (4, 6)]


def make_inputs(levels, Lq, device, dtype, N=2, M=8, D=32, P=4, seed=0):
    """Returns (value, spatial_shapes, level_start_index, sampling_locations, attention_weights).

    Lq=None makes one query per position (the encoder), each sampling around itself.
    """
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cumsum(sizes, 0) - sizes
    S, L = int(sizes.sum()), len(levels)
    if Lq is None:
        centers = []
        for h, w in levels:
            y, x = torch.meshgrid(
                (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij"
            )
            centers.append(torch.stack([x.flatten(), y.flatten()], -1))
        reference = torch.cat(centers)
        Lq = S
    else:
        reference = torch.rand(Lq, 2, generator=generator)
    offsets = torch.randn(N, Lq, M, L, P, 2, generator=generator) * 2.0
    locations = reference[None, :, None, None, None, :] + offsets / spatial_shapes.flip(-1)[
        None, None, None, :, None, :
    ]
    weights = torch.rand(N, Lq, M, L, P, generator=generator)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    value = torch.randn(N, S, M, D, generator=generator)
    opmath = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return (
        value.to(device, dtype),
        spatial_shapes.to(device),
        level_start_index.to(device),
        locations.to(device, opmath),
        weights.to(device, opmath),
    )


def minimal_bytes(inputs, backward):
    value, shapes, starts, locations, weights = inputs
    N, _, M, D = value.shape
    output = N * locations.shape[1] * M * D * value.element_size()
    read = sum(t.numel() * t.element_size() for t in inputs) + (output if backward else 0)
    written = output
    if backward:
        # grad_value is zeroed, then read and written; grad locations and weights written once
        opmath_size = locations.element_size()
        written = (3 * value.numel() + locations.numel() + weights.numel()) * opmath_size
    return read + written


def gathered_bytes(inputs, backward):
    """Bytes of the corner rows the kernels read (and, backward, of grad_value rows updated)."""
    value, _, _, locations, _ = inputs
    N, Lq, M, L, P, _ = locations.shape
    row = value.shape[3] * value.element_size()
    corners = N * Lq * M * L * P * 4
    if not backward:
        return corners * row
    grad_row = value.shape[3] * locations.element_size()
    # forward, then backward: value row read, grad_value row read and written
    return corners * (2 * row + 2 * grad_row)


def l2_cache_bytes():
    """Per-core L2 size from sysfs (Linux), or 1 MiB when it cannot be read."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            text = f.read().strip()
    except OSError:
        return 1 << 20
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
    return int(text.rstrip("KM")) * scale


def copy_bandwidth(total_bytes, repeat):
    """Bytes/s (read + written) of the best of `repeat` rounds of copying a float32 tensor of
    total_bytes / 2 into another on the CPU (torch's copy uses all threads)."""
    source = torch.randn(total_bytes // 8)
    target = torch.empty_like(source)
    # enough copies per round to time a cache-sized copy reliably
    copies = max(1, (1 << 30) // total_bytes)
    best = float("inf")
    for _ in range(repeat + 1):
        start = time.perf_counter()
        for _ in range(copies):
            target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return copies * 2 * source.numel() * source.element_size() / best


def time_pass(inputs, backward, repeat, device):
    """Best-of-`repeat` seconds of one forward (and backward) pass (robust on shared machines)."""
    if backward:
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    else:
        leaves = list(inputs)
    grad_output = None

    def run():
        nonlocal grad_output
        with torch.set_grad_enabled(backward):
            output = ms_deform_attn(*leaves)
            if backward:
                if grad_output is None:
                    grad_output = torch.randn_like(output)
                output.backward(grad_output)

    return min(warm_then_time(run, repeat, device))


def peak_bandwidth():
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch)")
    parser.add_argument("--quick", action="store_true", help="small shapes; fail if slower")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per pass")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    repeat = args.repeat or (5 if args.device == "cpu" else 20)
    levels = QUICK_LEVELS if args.quick else FULL_LEVELS

    with use_implementation("compiled"):
        active_implementation(args.device)  # fails clearly when the kernel is missing
    if args.device == "cuda":
        device_name = torch.cuda.get_device_name(0)
    else:
        device_name = (
            f"{args.threads} CPU threads, kernels for "
            f"{torch.ops.deformable_detr.cpu_capability()}"
        )
    print(f"# ms_deform_attn on {device_name}, {args.dtype}, torch {torch.__version__}, "
          f"best of {repeat} runs")
    header = "| shape | pass | compiled (ms) | pytorch (ms) | speedup |"
    if args.device == "cuda":
        peak = peak_bandwidth()
        header += " compiled GB/s | % of peak |"
    else:
        # two copies per thread (source and target) fill half of each thread's L2
        cache_copy = copy_bandwidth(l2_cache_bytes() // 2 * args.threads, repeat)
        memory_copy = copy_bandwidth(1 << 30, repeat)
        print(f"# copy bandwidth (read + write): {cache_copy / 1e9:.0f} GB/s within L2 "
              f"({l2_cache_bytes() >> 10} KiB per core), {memory_copy / 1e9:.1f} GB/s for 1 GiB")
        header += " gathered GB/s | % of L2 copy | minimal GB/s | % of memory copy |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))

    slowest = float("inf")
    for name, Lq in (("encoder", None), ("decoder", 300)):
        inputs = make_inputs(levels, Lq, args.device, dtype)
        shape = f"{name} Lq={inputs[3].shape[1]} S={inputs[0].shape[1]}"
        for backward in (False, True):
            seconds = {}
            for impl in ("compiled", "pytorch"):
                with use_implementation(impl):
                    seconds[impl] = time_pass(inputs, backward, repeat, args.device)
            ratio = seconds["pytorch"] / seconds["compiled"]
            slowest = min(slowest, ratio)
            row = (
                f"| {shape} | {'forward+backward' if backward else 'forward'} "
                f"| {seconds['compiled'] * 1e3:.2f} | {seconds['pytorch'] * 1e3:.2f} "
                f"| {ratio:.2f}x |"
            )
            bandwidth = minimal_bytes(inputs, backward) / seconds["compiled"]
            if args.device == "cuda":
                share = f"{100 * bandwidth / peak:.0f}%" if peak else "n/a"
                row += f" {bandwidth / 1e9:.0f} | {share} |"
            else:
                gathered = gathered_bytes(inputs, backward) / seconds["compiled"]
                row += (
                    f" {gathered / 1e9:.0f} | {100 * gathered / cache_copy:.0f}% "
                    f"| {bandwidth / 1e9:.1f} | {100 * bandwidth / memory_copy:.0f}% |"
                )
            print(row, flush=True)
    if args.device == "cuda" and peak:
        print(f"# peak memory bandwidth {peak / 1e9:.0f} GB/s (from device properties)")
    if args.quick and slowest < 1:
        print(f"FAIL: compiled op slower than the reference (speedup {slowest:.2f}x)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
