"""Builds ``deformable_detr._C``, the multi-scale deformable attention op.

CPU kernels are always built. CUDA kernels are built whenever ``nvcc`` is found (even with
no GPU present, so CI compiles them), unless ``FORCE_CUDA=0``; ``FORCE_CUDA=1`` makes a
failed CUDA build an error. A failed CUDA build falls back to the CPU build, and a failed
CPU build leaves the package on its pure-PyTorch path: the install never breaks.
"""

import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;9.0+PTX"
MIN_CUDA_ARCH = 6.0  # atomicAdd(double*) in the backward kernel


def _cuda_requested():
    force = os.environ.get("FORCE_CUDA")
    if force is not None:
        return force == "1"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    return nvcc is not None and shutil.which(nvcc) is not None


def _check_cuda_archs(arch_list):
    """Refuses ``TORCH_CUDA_ARCH_LIST`` entries below ``MIN_CUDA_ARCH`` (numeric ones only)."""
    for arch in arch_list.replace(";", " ").split():
        number = arch.split("+")[0]
        if number.replace(".", "", 1).isdigit() and float(number) < MIN_CUDA_ARCH:
            raise SystemExit(
                f"TORCH_CUDA_ARCH_LIST={arch_list!r} has {arch}: the CUDA kernels need compute "
                f"capability {MIN_CUDA_ARCH} or newer (atomicAdd on double). Drop it, or build "
                "without CUDA with FORCE_CUDA=0."
            )


def _sources(pattern):
    # csrc/testing/ is the tests' CPU emulation of CUDA (tests/cuda_emulation.py builds it)
    testing = os.path.join(CSRC, "testing", "")
    found = glob.glob(os.path.join(CSRC, "**", pattern), recursive=True)
    return sorted(path for path in found if not path.startswith(testing))


def _extension(with_cuda):
    cxx_flags = ["-O3", "-std=c++20"]  # torch 2.14's headers need C++20
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        _check_cuda_archs(os.environ["TORCH_CUDA_ARCH_LIST"])
        return CUDAExtension(
            "deformable_detr._C",
            sources=_sources("*.cpp") + _sources("*.cu"),
            include_dirs=[os.path.join(ROOT, CSRC)],
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            # optional: a failed build leaves nothing to copy instead of failing an editable
            # install; with FORCE_CUDA=1 a failure must stop the install
            optional=os.environ.get("FORCE_CUDA") != "1",
        )
    return CppExtension(
        "deformable_detr._C",
        sources=_sources("*.cpp"),
        include_dirs=[os.path.join(ROOT, CSRC)],
        extra_compile_args={"cxx": cxx_flags},
        optional=True,
    )


_BUILD_ATTRIBUTES = (
    "sources", "define_macros", "extra_compile_args", "libraries", "library_dirs", "include_dirs"
)


class BuildExtensionWithFallback(BuildExtension):
    """Falls back CUDA -> CPU -> no extension instead of failing the install."""

    def build_extensions(self):
        try:
            return super().build_extensions()
        except Exception as error:  # compiler, nvcc and torch's checks fail with several types
            if os.environ.get("FORCE_CUDA") == "1":
                raise
            failure = error
        if any(source.endswith(".cu") for ext in self.extensions for source in ext.sources):
            print(f"WARNING: CUDA build failed ({failure}); building CPU kernels.")
            cpu_ext = _extension(with_cuda=False)
            for ext in self.extensions:
                for attribute in _BUILD_ATTRIBUTES:
                    setattr(ext, attribute, getattr(cpu_ext, attribute))
            try:
                return super().build_extensions()
            except Exception as error:
                failure = error
        print(
            f"WARNING: no extension built ({failure}); "
            "deformable_detr will use its pure-PyTorch attention."
        )
        self.extensions = []  # nothing to copy into the source tree


os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
print(f"deformable_detr: torch {torch.__version__}, CUDA kernels requested: {_cuda_requested()}")

setup(
    ext_modules=[_extension(with_cuda=_cuda_requested())],
    cmdclass={"build_ext": BuildExtensionWithFallback.with_options(use_ninja=True)},
)
