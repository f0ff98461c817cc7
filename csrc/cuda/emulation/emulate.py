"""Run the CUDA kernels' code on the CPU, against the op's oracle, on a machine without a GPU.

    python csrc/cuda/emulation/emulate.py [edge|random|tiled|nan ...]   (default: all four)

It rewrites csrc/cuda/instance_aware_conv.cu into plain C++ (prelude.h emulates threads, blocks, barriers and
warp shuffles; kernel launches become emu::launch calls; the host code runs on CPU tensors), compiles it as a
separate op library ``emu_ops`` and runs tests/oracle.py's cases through it. What it checks: the index
arithmetic, bucketing, tiling, pixel splits, NaN masking and barrier placement of every kernel, through the
FFMA main loop in all four dtypes. What it cannot check: the WMMA (tensor-core) main loop, data races that a
barrier would not reveal, the CUDA launch limits and real stream / graph behaviour. Slow (one OS thread per
CUDA thread): about 8 minutes on 2 cores for everything. Never import pointins_ops in this process: both
libraries define the op schema's namespace.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from oracle import EDGE_CASES, TOL, Case, check_case, make_inputs, random_cases  # noqa: E402

REMOVED_INCLUDES = ["ATen/cuda/CUDAContext.h", "c10/cuda/CUDAException.h", "c10/cuda/CUDAGuard.h", "cuda_bf16.h",
                    "cuda_fp16.h", "mma.h"]


def emulated_source() -> str:
    source = open(os.path.join(ROOT, "csrc", "cuda", "instance_aware_conv.cu")).read()
    for include in REMOVED_INCLUDES:
        source = source.replace(f"#include <{include}>", "")
    source = source.replace('#include "../instance_aware_conv.h"',
                            f'#include "{HERE}/prelude.h"\n#include "{ROOT}/csrc/instance_aware_conv.h"')
    source = source.replace("at::cuda::getCurrentDeviceProperties()->multiProcessorCount", "132")  # an H100
    source = source.replace("at::cuda::getCurrentCUDAStream()", "0")
    source = source.replace("c10::cuda::CUDAGuard", "EmuGuard")
    source, launches = re.subn(r"(\w+<scalar_t>)\s*<<<(.*?), kThreads, 0, stream>>>\(",
                               r"emu::launch(\1, \2, kThreads, ", source, flags=re.DOTALL)
    assert launches >= 4, f"found {launches} kernel launches to rewrite"
    begin = source.index("TORCH_LIBRARY_IMPL(pointins_ops, CUDA, m)")
    end = source.index("}", source.index("instance_aware_conv_backward_cuda);", begin)) + 1
    registration = """TORCH_LIBRARY(emu_ops, m) {
  m.def("forward(Tensor templates, Tensor weight, Tensor? bias, Tensor? index, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> Tensor");
  m.def("backward(Tensor grad_output, Tensor templates, Tensor weight, Tensor? index, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> (Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(emu_ops, CPU, m) {
  m.impl("forward", &instance_aware_conv_cuda);
  m.impl("backward", &instance_aware_conv_backward_cuda);
}"""
    return source[:begin] + registration + source[end:]


def build() -> None:
    from torch.utils.cpp_extension import load

    folder = os.path.join(tempfile.gettempdir(), "pointins-cuda-emulation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "kernels_emulated.cpp")
    with open(path, "w") as file:
        file.write(emulated_source())
    load(name="pointins_cuda_emulation", sources=[path, os.path.join(ROOT, "csrc", "instance_aware_conv.cpp")],
         extra_cflags=["-std=c++20", "-O2", "-pthread", "-Wno-unknown-pragmas"], extra_ldflags=["-pthread"],
         is_python_module=False, build_directory=folder)


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, templates, weight, bias, index, stride, padding, dilation, groups):
        ctx.save_for_backward(templates, weight, index)
        ctx.conv_args, ctx.has_bias = (stride, padding, dilation, groups), bias is not None
        return torch.ops.emu_ops.forward(templates, weight, bias, index, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        templates, weight, index = ctx.saved_tensors
        grads = torch.ops.emu_ops.backward(grad_output.contiguous(), templates, weight, index, *ctx.conv_args)
        return grads[0], grads[1], grads[2] if ctx.has_bias else None, None, None, None, None, None


def op(templates, weight, bias, index, *, stride, padding, dilation, groups):
    return _Conv.apply(templates, weight, bias, index, list(stride), list(padding), list(dilation), groups)


def tiled_cases() -> list[Case]:
    """TILED_CASES from tests/test_cuda.py, read without importing it (that would import pointins_ops)."""
    text = open(os.path.join(ROOT, "tests", "test_cuda.py")).read()
    begin = text.index("TILED_CASES = [")
    namespace = {"Case": Case}
    exec(text[begin:text.index("\n]\n", begin) + 3], namespace)  # noqa: S102 (our own file)
    return namespace["TILED_CASES"]


def check_out_of_range_index() -> int:
    case = EDGE_CASES["stride-dilation"]
    templates, weight, bias, index = make_inputs(case, torch.float32)
    bad = index.clone()
    bad[1], bad[4] = case.P, -1
    conv = (list(case.stride), list(case.padding), list(case.dilation), case.groups)
    out = torch.ops.emu_ops.forward(templates, weight, bias, bad, *conv)
    expected = torch.ops.emu_ops.forward(templates, weight, bias, index, *conv)
    good = [n for n in range(case.N) if n not in (1, 4)]
    assert out[[1, 4]].isnan().all() and torch.equal(out[good], expected[good])
    grad_templates, grad_weight, grad_bias = torch.ops.emu_ops.backward(torch.ones_like(out), templates, weight, bad,
                                                                        *conv)
    assert grad_templates.isfinite().all() and grad_weight[good].isfinite().all() and grad_bias.isfinite().all()
    assert grad_weight[[1, 4]].isnan().all()
    return 1


def main(suites: list[str]) -> None:
    build()
    for suite in suites:
        started, count = time.time(), 0
        if suite == "edge":
            for case in EDGE_CASES.values():
                for dtype in TOL:
                    check_case(op, case, dtype)
                    count += 1
        elif suite == "random":  # as tests/test_ops.py: one dtype per case, cycled by seed
            for case in random_cases(240, seed=2026):
                check_case(op, case, list(TOL)[case.seed % len(TOL)])
                count += 1
        elif suite == "tiled":
            for case in tiled_cases():
                for dtype in (torch.float64, torch.float16, torch.bfloat16):
                    check_case(op, case, dtype)
                    count += 1
        elif suite == "nan":
            count = check_out_of_range_index()
        else:
            raise SystemExit(f"unknown suite {suite!r}; choose from edge, random, tiled, nan")
        print(f"{suite}: {count} checks passed in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["nan", "edge", "random", "tiled"])
