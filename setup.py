"""Builds ``pointins_ops._C``: the C++ CPU kernels always, the CUDA kernels when CUDA is usable.

CUDA sources are compiled when torch sees a GPU, or when ``FORCE_CUDA=1`` (e.g. on a build machine without
one); ``FORCE_CUDA=0`` turns them off. ``TORCH_CUDA_ARCH_LIST`` picks the architectures, as usual for
torch extensions. Install with ``pip install --no-build-isolation .`` so the extension is compiled against
the torch you already have.
"""

import glob
import os
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    forced = os.environ.get("FORCE_CUDA")
    if forced is not None:
        return forced.strip() not in ("", "0")
    import torch

    return torch.cuda.is_available() and torch.version.cuda is not None


def _nvidia_wheel_dirs():
    """Include and library folders of the CUDA wheels torch depends on (site-packages/nvidia/cu*/).

    torch's CUDA headers include cuBLAS, cuSPARSE and cuSOLVER headers that a bare nvcc install may lack;
    torch's wheels ship them, so the build finds them there without any environment setup.
    """
    roots = [p for p in site.getsitepackages() + [site.getusersitepackages()] if p] + sys.path
    includes, libraries = [], []
    for root in dict.fromkeys(roots):
        for cuda_root in sorted(glob.glob(os.path.join(root, "nvidia", "cu[0-9]*"))):
            if os.path.isdir(os.path.join(cuda_root, "include")):
                includes.append(os.path.join(cuda_root, "include"))
            if os.path.isdir(os.path.join(cuda_root, "lib")):
                libraries.append(os.path.join(cuda_root, "lib"))
    return includes, libraries


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fdiagnostics-color=always"]
    if not _want_cuda():
        return [CppExtension("pointins_ops._C", sources, extra_compile_args={"cxx": cxx_flags})]

    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    includes, libraries = _nvidia_wheel_dirs()
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    if os.environ.get("POINTINS_PTXAS_VERBOSE"):
        nvcc_flags.append("-Xptxas=-v")
    return [
        CUDAExtension(
            "pointins_ops._C",
            sources + cuda_sources,
            include_dirs=includes,
            library_dirs=libraries,
            define_macros=[("POINTINS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
