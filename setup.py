"""Builds ``pointins_ops._C``: the C++ CPU kernels always, the CUDA kernels when CUDA is usable.

CUDA sources are compiled when torch sees a GPU, or when ``FORCE_CUDA=1`` (e.g. on a build machine without
one); ``FORCE_CUDA=0`` turns them off. ``TORCH_CUDA_ARCH_LIST`` picks the architectures, as usual for
torch extensions. Install with ``pip install --no-build-isolation .`` so the extension is compiled against
the torch you already have.
"""

import glob
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    forced = os.environ.get("FORCE_CUDA")
    if forced is not None:
        return forced.strip() not in ("", "0")
    import torch

    return torch.cuda.is_available() and torch.version.cuda is not None


def _locate_cuda_home() -> None:
    """Sets CUDA_HOME from nvcc itself when it is unset, before torch's build helpers guess it.

    torch takes the folder above nvcc's folder, which is wrong when the nvcc on PATH is a wrapper script
    (/usr/local/bin/nvcc gives /usr/local, which lacks the toolkit's lib64/libcudart.so). ``nvcc -dryrun``
    prints the toolkit's real root.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or shutil.which("nvcc") is None:
        return
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "empty.cu")
        open(source, "w").close()
        try:
            listing = subprocess.run(["nvcc", "-dryrun", "-c", source, "-o", os.path.join(folder, "empty.o")],
                                     capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return
    match = re.search(r"^#\$ TOP=(.+)$", listing.stdout + listing.stderr, re.MULTILINE)
    if match and os.path.isdir(os.path.join(match.group(1).strip(), "include")):
        os.environ["CUDA_HOME"] = os.path.normpath(match.group(1).strip())


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
    want_cuda = _want_cuda()
    if want_cuda:
        _locate_cuda_home()  # before torch.utils.cpp_extension reads it
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = [path for folder in ("csrc", "csrc/autograd", "csrc/autocast", "csrc/cpu")
               for path in sorted(glob.glob(f"{folder}/*.cpp"))]
    # -ffp-contract=fast lets the GEMM micro-kernels' a * b + c become one FMA (ISO C++ mode turns it off).
    cxx_flags = ["-O3", "-ffp-contract=fast", "-fdiagnostics-color=always"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP region: without -fopenmp the CPU kernels run on one thread.
        # The extension then links libgomp.so.1, which resolves to the copy torch has already loaded.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if not want_cuda:
        return [CppExtension("pointins_ops._C", sources, extra_compile_args={"cxx": cxx_flags},
                             extra_link_args=link_flags)]

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
            extra_link_args=link_flags,
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
