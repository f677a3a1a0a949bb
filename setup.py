"""Builds ``deformable_detr._C``, the multi-scale deformable attention op.

CPU kernels are always built. CUDA kernels are built whenever ``nvcc`` is found (even with
no GPU present, so CI compiles them), unless ``FORCE_CUDA=0``; ``FORCE_CUDA=1`` makes a
failed CUDA build an error. A failed CUDA build falls back to the CPU build, and a failed
CPU build leaves the package on its pure-PyTorch path: the install never breaks.

On x86-64 the CPU kernels are compiled once per CPU capability (baseline, AVX2, AVX-512, as
ATen does) and the op runs the widest this CPU supports, so one build runs on every x86-64 CPU.
"""

import glob
import os
import platform
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;9.0+PTX"
MIN_CUDA_ARCH = 6.0  # atomicAdd(double*) in the backward kernel

# Compiled once more per capability with these flags (ATen's own, cmake/Codegen.cmake); its plain
# compilation in the source list is the baseline. ms_deform_attn_cpu.cpp picks one at run time.
CPU_KERNEL_SOURCE = os.path.join(CSRC, "ms_deform_attn", "cpu", "ms_deform_attn_kernel.cpp")
CPU_CAPABILITY_FLAGS = (
    {
        "AVX2": ["-mavx2", "-mfma", "-mf16c"],
        "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    }
    if platform.machine().lower() in ("x86_64", "amd64")
    else {}
)
CPU_CAPABILITY_MACROS = [(f"DEFORMABLE_DETR_HAVE_{name}", None) for name in CPU_CAPABILITY_FLAGS]


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
            define_macros=[("WITH_CUDA", None)] + CPU_CAPABILITY_MACROS,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            # optional: a failed build leaves nothing to copy instead of failing an editable
            # install; with FORCE_CUDA=1 a failure must stop the install
            optional=os.environ.get("FORCE_CUDA") != "1",
        )
    return CppExtension(
        "deformable_detr._C",
        sources=_sources("*.cpp"),
        include_dirs=[os.path.join(ROOT, CSRC)],
        define_macros=CPU_CAPABILITY_MACROS,
        extra_compile_args={"cxx": cxx_flags},
        optional=True,
    )


_BUILD_ATTRIBUTES = (
    "sources", "define_macros", "extra_compile_args", "libraries", "library_dirs", "include_dirs"
)


class BuildExtensionWithFallback(BuildExtension):
    """Falls back CUDA -> CPU -> no extension instead of failing the install."""

    def build_extension(self, ext):
        if CPU_KERNEL_SOURCE in ext.sources:
            objects = []
            for capability, flags in CPU_CAPABILITY_FLAGS.items():
                objects += self.compiler.compile(
                    [CPU_KERNEL_SOURCE],
                    output_dir=os.path.join(self.build_temp, capability.lower()),
                    macros=ext.define_macros
                    + [("CPU_CAPABILITY", capability), (f"CPU_CAPABILITY_{capability}", None)],
                    include_dirs=ext.include_dirs,
                    extra_postargs=ext.extra_compile_args["cxx"] + flags,
                )
            # Linked after the baseline objects: of an inline function compiled into several
            # objects the linker keeps the first copy, so code shared with the baseline stays
            # runnable on every CPU. A retry after a failed CUDA build must not add them twice.
            ext.extra_objects = [obj for obj in ext.extra_objects if obj not in objects] + objects
        super().build_extension(ext)

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
