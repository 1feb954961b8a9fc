"""Builds psp_kernels/_C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA.

The library has no Python bindings: ``import psp_kernels`` loads it with ``torch.ops.load_library`` and its
kernels register themselves with the dispatcher (``TORCH_LIBRARY_IMPL(psp_native, CPU | CUDA, m)``).

Use ``pip install --no-build-isolation -e .`` (no build isolation: reuse the installed torch instead of
letting pip fetch another one). ninja compiles the sources in parallel and incrementally.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# nvcc flags of the CUDA kernels (csrc/cuda/*.cu): cubins for A100 (sm_80) and H100/H200 (sm_90), plus
# sm_90 PTX so that newer GPUs can JIT it. Passing -gencode stops torch from adding its own arch flags.
NVCC_FLAGS = ["-O3", "-lineinfo",
              "-gencode=arch=compute_80,code=sm_80",
              "-gencode=arch=compute_90,code=sm_90",
              "-gencode=arch=compute_90,code=compute_90"]


def cutlass_include() -> str:
    """CUTLASS's headers (csrc/cuda/conv.cu), from the pinned ``nvidia-cutlass`` package (header-only use)."""
    try:
        import cutlass_library
    except ImportError:
        raise SystemExit("building the CUDA kernels needs CUTLASS's headers: "
                         "pip install --no-deps -r requirements-cuda.txt") from None
    return os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")


def extension():
    sources = _sources("csrc/cpu/*.cpp")
    # -ffp-contract=off: no FMA contraction in the target("avx2" / "avx512f") code of csrc/cpu/gemm.h, so
    # every vector width computes the same bits (a rounded product, then a rounded add).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    cuda_sources = _sources("csrc/cuda/*.cu") if torch.version.cuda else []
    if cuda_sources:
        return CUDAExtension("psp_kernels._C", sources + cuda_sources, include_dirs=[cutlass_include()],
                             extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS}, extra_link_args=["-fopenmp"],
                             py_limited_api=True)
    return CppExtension("psp_kernels._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"],
                        py_limited_api=True)


setup(
    packages=find_packages(include=["psp_kernels*", "pspnet*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
