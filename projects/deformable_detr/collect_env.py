"""Environment report for bug reports: ``python -m deformable_detr.collect_env``."""

import argparse
import platform
import sys

import torch


def _detectron2_line():
    try:
        import detectron2
    except ImportError as error:
        return f"not importable ({error})"
    return f"{detectron2.__version__} @ {detectron2.__file__}"


def collect_env_info():
    """Returns ``[(name, value), ...]`` describing the Python, torch, detectron2 and op build."""
    from deformable_detr.layers.ms_deform_attn_op import (
        active_implementation,
        compiled_kernels,
        extension_error,
    )

    kernels = compiled_kernels()
    rows = [
        ("Python", sys.version.split()[0] + f" ({platform.platform()})"),
        ("torch", f"{torch.__version__} @ {torch.__file__}"),
        ("torch CUDA build", torch.version.cuda or "none"),
        ("CUDA available", f"{torch.cuda.is_available()}"
         + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")),
        ("detectron2", _detectron2_line()),
        ("op extension", "loaded" if extension_error() is None else f"NOT loaded: {extension_error()}"),
        ("op kernels built", ", ".join(k.upper() for k, built in kernels.items() if built) or "none"),
        ("op on CPU", active_implementation("cpu")),
    ]
    if torch.cuda.is_available():
        rows.append(("op on CUDA", active_implementation("cuda")))
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
