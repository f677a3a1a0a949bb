"""The CUDA op built by the host compiler on the CPU emulation of CUDA (csrc/testing/).

``load()`` compiles ``csrc/ms_deform_attn/cuda`` unchanged against ``cuda_emulator.h`` into
``build/`` (once; later runs reuse it) and registers it for CPU tensors as
``torch.ops.deformable_detr_cuda_emulated``, with the package's autograd formula. With
``DEFORMABLE_DETR_CUDA_EMULATOR_SANITIZE=1`` it is built with AddressSanitizer and UBSan, which
must then be preloaded (``make test-cuda-asan`` does this).
"""

import functools
import os
import subprocess
from pathlib import Path

import torch
from torch.utils import cpp_extension

from deformable_detr.layers import ms_deform_attn_op

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
LIBRARY = "deformable_detr_cuda_emulated"
SANITIZE_ENV_VAR = "DEFORMABLE_DETR_CUDA_EMULATOR_SANITIZE"
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]


def sanitized():
    return os.environ.get(SANITIZE_ENV_VAR) == "1"


def build_flags(defines=()):
    """Compiler flags of the emulated build; ``defines`` are extra ``-D`` macros."""
    flags = [
        "-std=c++20",
        "-include",
        str(CSRC / "testing" / "cuda_emulator.h"),
        # renames the C++ namespace and the op library, so both builds can load side by side
        f"-Ddeformable_detr={LIBRARY}",
        "-DMS_DEFORM_ATTN_CUDA_DISPATCH_KEY=CPU",
        *(f"-D{define}" for define in defines),
    ]
    if sanitized():
        return flags + SANITIZERS + ["-O1", "-g", "-fno-omit-frame-pointer"]
    return flags + ["-O2"]


def compile_library(name, defines=()):
    """Builds the emulated op as ``build/<name>/<name>.so`` and returns its path."""
    build_directory = REPO / "build" / name
    build_directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(CSRC / "testing" / "ms_deform_attn_cuda_emulated.cpp")],
        extra_cflags=build_flags(defines),
        extra_ldflags=SANITIZERS if sanitized() else [],
        extra_include_paths=[str(CSRC / "testing" / "cuda_stand_ins"), str(CSRC)],
        build_directory=str(build_directory),
        is_python_module=False,
        is_standalone=False,
        verbose=False,
    )


@functools.cache
def load():
    """Builds (first call only) and loads the emulated op; returns ``torch.ops.<LIBRARY>``."""
    compile_library("ms_deform_attn_cuda_emulated" + ("_asan" if sanitized() else ""))
    ms_deform_attn_op.register_autograd(LIBRARY)
    return getattr(torch.ops, LIBRARY)


def asan_runtime():
    """The path of the compiler's AddressSanitizer runtime, to preload into Python."""
    return subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], check=True, capture_output=True, text=True
    ).stdout.strip()


def compile_selftest(executable, kernels_root=CSRC):
    """Builds csrc/testing/cuda_emulator_selftest.cpp (no torch library, seconds to build).

    ``kernels_root`` is the folder whose ``ms_deform_attn/`` kernels it includes, so a test can
    build it against a changed copy of them.
    """
    include_paths = [str(kernels_root), str(CSRC)] + cpp_extension.include_paths()
    command = ["g++", *build_flags(), "-O1", "-o", str(executable),
               str(CSRC / "testing" / "cuda_emulator_selftest.cpp")]
    command += [f"-I{path}" for path in include_paths]
    if sanitized():
        command += SANITIZERS
    subprocess.run(command, check=True, capture_output=True, text=True)
    return executable
