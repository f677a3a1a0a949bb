"""Environment report for bug reports: ``python -m deformable_detr.collect_env``."""

import argparse
import platform
import sys

import torch

from deformable_detr.layers.ms_deform_attn_op import (
    active_implementation,
    compiled_kernels,
    extension_error,
)


def _detectron2_line():
    try:
        import detectron2
    except ImportError as error:
        return f"not importable ({error})"
    return f"{detectron2.__version__} @ {detectron2.__file__}"


def _cuda_line():
    if not torch.cuda.is_available():
        return "False"
    return f"True ({torch.cuda.get_device_name(0)})"


def _extension_line():
    error = extension_error()
    return "loaded" if error is None else f"NOT loaded: {error}; the pure-PyTorch path runs"


def _implementation_line(device):
    try:
        return active_implementation(device)
    except RuntimeError as error:  # e.g. DEFORMABLE_DETR_MSDA_IMPL=compiled without a kernel
        return f"ERROR: {error}"


def _cpu_kernels_line():
    if not compiled_kernels()["cpu"]:
        return "none"
    try:
        chosen = torch.ops.deformable_detr.cpu_capability()
    except RuntimeError as error:  # an invalid DEFORMABLE_DETR_CPU_CAPABILITY
        return f"ERROR: {error}"
    return f"{chosen} (torch's CPU capability: {torch.backends.cpu.get_cpu_capability()})"


def collect_env_info():
    """Returns ``[(name, value), ...]`` describing the Python, torch, detectron2 and op build."""
    kernels = compiled_kernels()
    rows = [
        ("Python", sys.version.split()[0] + f" ({platform.platform()})"),
        ("torch", f"{torch.__version__} @ {torch.__file__}"),
        ("torch CUDA build", torch.version.cuda or "none"),
        ("CUDA available", _cuda_line()),
        ("detectron2", _detectron2_line()),
        ("op extension", _extension_line()),
        ("op kernels built", ", ".join(k.upper() for k, on in kernels.items() if on) or "none"),
        ("op on CPU", _implementation_line("cpu")),
        ("op CPU kernels for", _cpu_kernels_line()),
    ]
    if torch.cuda.is_available():
        rows.append(("op on CUDA", _implementation_line("cuda")))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--short", action="store_true", help="only the op build lines")
    args = parser.parse_args(argv)
    rows = collect_env_info()
    if args.short:
        rows = [row for row in rows if row[0].startswith("op")]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
