"""Run the CUDA kernels' code on the CPU, against the op's oracle, on a machine without a GPU.

    python csrc/cuda/emulation/emulate.py              # every suite (~N minutes on 2 cores; see README)
    python csrc/cuda/emulation/emulate.py --quick      # a sample of each suite (a few minutes)
    python csrc/cuda/emulation/emulate.py edge tf32    # chosen suites
    python csrc/cuda/emulation/emulate.py --record < calls.json   # the launches of calls, not run (JSON out)

The sources in csrc/cuda/*.cu are compiled unchanged as C++ with -DPOINTINS_EMULATION: platform.cuh and
primitives.cuh then map launches, barriers, warp collectives, mma.sync, ldmatrix and cp.async onto the CPU
runtime in this folder (prelude.h, runtime.cpp), which runs each block's threads as fibers in a seeded random
order between barriers, poisons shared memory and not-yet-waited cp.async destinations with NaN, and checks
alignment, shared-memory bounds and launch limits (see prelude.h). So the kernels run here are the ones
nvcc compiles for sm_80/sm_90, every dtype and every path (tensor cores, TF32, FFMA), including the host code
that plans tiles and buckets instances. What it cannot see: timing, the real CUDA stream / graph behaviour,
register allocation, and the hardware's own summation order inside one mma (the emulation sums exactly).

The library is built as its own op namespace (torch.ops.emu_ops) for CPU tensors: never import pointins_ops in
this process (both would define the op schema's namespace).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_DIR = os.path.dirname(HERE)
ROOT = os.path.abspath(os.path.join(CUDA_DIR, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from oracle import EDGE_CASES, TOL, Case, check_case, make_inputs, oracle_grads, random_cases  # noqa: E402

SUITES = ("nan", "edge", "random", "tiled", "paths", "pointwise", "depthwise", "buckets", "tf32", "determinism")

# The bucketing kernel's regimes (buckets.cu), with the steps of 32 instances a warp's segment takes (0: the
# torch-sort fallback): a segment held in registers (up to 8 steps: N <= 8192 with 32 segments), longer segments
# loaded step by step (N > 8192, or few segments because many templates leave shared memory for few histograms),
# and the fallback when not one histogram fits.
BUCKET_CASES = [
    (Case(P=5, C_in=2, H=3, W=3, N=8192, C_out=2, kernel=(1, 1), seed=61), 8),
    (Case(P=5, C_in=2, H=3, W=3, N=9000, C_out=2, kernel=(3, 3), padding=(1, 1), seed=62), 9),
    (Case(P=20000, C_in=1, H=2, W=2, N=700, C_out=1, kernel=(1, 1), seed=63), 22),
    (Case(P=60000, C_in=1, H=2, W=2, N=300, C_out=2, kernel=(1, 1), index="unused", seed=64), 0),
]


def bucket_steps(case: Case) -> int:
    """Steps of 32 instances per warp segment of the case's bucketing launch (0: no bucket_kernel launched), from
    the launch's shared memory as recorded by the record mode: [segments][P + 1] counts, P + 2 + 33 ints."""
    templates, weight, bias, index = make_inputs(case, torch.float32)
    conv = (list(case.stride), list(case.padding), list(case.dilation), case.groups)
    _, launches = _recorded(lambda: torch.ops.emu_ops.forward(templates, weight, bias, index, *conv), kernel_names())
    for launch in launches:
        if launch["kernel"].startswith("bucket_kernel"):
            keys = case.P + 1
            segments = (launch["smem"] - (keys + 1 + 33) * 4) // (keys * 4)
            per_segment = -(-case.N // segments)
            return -(-per_segment // 32)
    return 0


def build_folder() -> str:
    """The emulation's build folder, one per Python and torch version. Stacks must not share it: torch 2.14 locks
    the folder with an OS lock on a file named 'lock' that it leaves behind, and torch 2.11 and older take that
    file's mere existence as a build in progress and wait for it forever."""
    version = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.replace('+', '-')}"
    return os.path.join(tempfile.gettempdir(), f"pointins-cuda-emulation-{version}")


def build() -> None:
    from torch.utils.cpp_extension import load

    folder = build_folder()
    os.makedirs(folder, exist_ok=True)
    # The schema file's module function names the CPU kernels' micro-kernel family (csrc/cpu/gemm.cpp).
    sources = [os.path.join(HERE, "runtime.cpp"), os.path.join(ROOT, "csrc", "instance_aware_conv.cpp"),
               os.path.join(ROOT, "csrc", "cpu", "gemm.cpp")]
    for path in sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu"))):
        wrapper = os.path.join(folder, os.path.basename(path)[:-3] + "_emulated.cpp")
        text = f'#include "{path}"\n'
        if not os.path.exists(wrapper) or open(wrapper).read() != text:
            with open(wrapper, "w") as file:
                file.write(text)
        sources.append(wrapper)
    load(name="pointins_cuda_emulation", sources=sources,
         extra_cflags=["-std=c++20", "-O2", "-pthread", "-DPOINTINS_EMULATION", "-Wno-unknown-pragmas",
                       "-Wno-unused-function"],
         extra_ldflags=["-pthread"], is_python_module=False, build_directory=folder)


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, templates, weight, bias, index, stride, padding, dilation, groups):
        ctx.save_for_backward(templates, weight, index)
        ctx.conv_args, ctx.has_bias = (stride, padding, dilation, groups), bias is not None
        return torch.ops.emu_ops.forward(templates, weight, bias, index, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        templates, weight, index = ctx.saved_tensors
        grads = torch.ops.emu_ops.backward(grad_output.contiguous(), templates, weight, index, *ctx.conv_args,
                                           ctx.has_bias)
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


def set_tf32(enabled: bool) -> None:
    torch.backends.cudnn.allow_tf32 = enabled


def run_emulated(case: Case, dtype: torch.dtype, seed: int):
    """Forward and the three gradients of one case, with the scheduler's seed set to `seed`."""
    os.environ["POINTINS_EMU_SEED"] = str(seed)
    templates, weight, bias, index = make_inputs(case, dtype)
    conv = (list(case.stride), list(case.padding), list(case.dilation), case.groups)
    out = torch.ops.emu_ops.forward(templates, weight, bias, index, *conv)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed), dtype=torch.float64)
    grads = torch.ops.emu_ops.backward(grad_output.to(dtype), templates, weight, index, *conv)
    return (out, *grads)


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest TF32 value (ties away from zero), as cvt.rna.tf32.f32 (finite values)."""
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    return ((bits + 0x1000) & ~0x1FFF).to(torch.int32).view(torch.float32).view(x.shape)


def check_tf32_case(case: Case) -> None:
    """float32 with torch's conv TF32 flag on: the tensor-core paths must round every multiplied operand to TF32
    and sum exactly in float32. So the oracle is run on the inputs rounded to TF32 and held to the float32
    tolerance; grad_bias, a plain sum, is compared with the sum of the unrounded grad_output. The depthwise path
    has no tensor cores: it stays exact float32 (the flag allows TF32, it does not demand it)."""
    if plans(case, torch.float32).startswith("forward depthwise"):
        check(case, torch.float32)
        return
    templates, weight, bias, index = make_inputs(case, torch.float32)
    conv = (list(case.stride), list(case.padding), list(case.dilation), case.groups)
    out = torch.ops.emu_ops.forward(templates, weight, bias, index, *conv)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed + 1)).float()
    grads = torch.ops.emu_ops.backward(grad_output, templates, weight, index, *conv)
    ref_out, ref_templates, ref_weight, _ = oracle_grads(round_to_tf32(templates), round_to_tf32(weight), bias, index,
                                                         round_to_tf32(grad_output), **case.conv_args)
    ref_bias = grad_output.double().sum((2, 3))
    atol, rtol = TOL[torch.float32]
    for name, got, want in zip(("output", "grad_templates", "grad_weight", "grad_bias"), (out, *grads),
                               (ref_out, ref_templates, ref_weight, ref_bias)):
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=lambda m: f"{case} {name}: {m}")


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
    grads = torch.ops.emu_ops.backward(torch.ones_like(out), templates, weight, bad, *conv)
    expected_grads = torch.ops.emu_ops.backward(torch.ones_like(out), templates, weight, index, *conv)
    grad_templates, grad_weight, grad_bias = grads
    assert grad_templates.isfinite().all() and grad_weight[good].isfinite().all() and grad_bias.isfinite().all()
    assert grad_weight[[1, 4]].isnan().all()
    assert torch.equal(grad_weight[good], expected_grads[1][good]) and torch.equal(grad_bias, expected_grads[2])
    # No template at all: every instance is out of range.
    empty = torch.ops.emu_ops.forward(templates[:0], weight, bias, bad.clamp(0, 0), *conv)
    assert empty.isnan().all()
    return 2


# Shapes that take each kernel through the tilings a small case does not reach by itself: templates larger than
# the shared-memory budget (tiles of output rows, of columns; the backward in two launches over spatial tiles),
# input channels staged in chunks, channel tiles. POINTINS_CUDA_SMEM_BUDGET shrinks the budget the planners use,
# so these stay small enough to emulate: (bytes for 2-, 4- and 8-byte elements), or None for the default.
PATH_CASES = [  # (budgets, case, what the plans must show: each budget is the smallest that fits)
    ((26_000, 24_000, 44_000), Case(P=2, C_in=8, H=20, W=18, N=5, C_out=3, kernel=(3, 3), padding=(1, 1), seed=21),
     "backward conv split"),
    ((24_000, 22_000, 38_000), Case(P=3, C_in=40, H=9, W=7, N=6, C_out=4, kernel=(3, 3), padding=(1, 1), groups=2,
                                    seed=22), "chunks=[2-9]"),
    ((20_000, 22_000, 36_000), Case(P=2, C_in=4, H=25, W=23, N=4, C_out=5, kernel=(3, 2), stride=(2, 1),
                                    padding=(1, 1), dilation=(1, 2), seed=23), "tiles=[1-9][0-9]*x"),
    ((66_000, 50_000, 86_000), Case(P=2, C_in=6, H=13, W=40, N=3, C_out=2, kernel=(5, 5), stride=(2, 2),
                                    padding=(2, 2), seed=24), "backward conv split"),
    (None, Case(P=3, C_in=70, H=6, W=5, N=7, C_out=40, kernel=(1, 1), index="sorted", seed=25), "c_tiles=3"),
]


# The pointwise path (1x1, stride 1, no padding) on maps large enough to take it by default, and on the small 1x1
# cases of the random sample with POINTINS_CUDA_PATH=pointwise: gathered rows, several row and channel tiles,
# pixel splits of grad_weight, warps splitting the reduction of narrow tiles, tails of every dimension.
POINTWISE_CASES = [
    Case(P=3, C_in=16, H=32, W=34, N=40, C_out=8, kernel=(1, 1), index="random", seed=31),
    Case(P=2, C_in=40, H=33, W=35, N=9, C_out=3, kernel=(1, 1), bias=False, index="sorted", seed=32),
    Case(P=2, C_in=70, H=32, W=40, N=5, C_out=2, kernel=(1, 1), groups=2, index="unused", seed=33),
    Case(P=4, C_in=8, H=40, W=41, N=4, C_out=140, kernel=(1, 1), index="none", seed=34),
]


# The depthwise path (one input channel per group): the 3x3 stride-1 fast path and the generic one, channel
# multipliers, several channel chunks per template, unused templates, both paddings.
DEPTHWISE_CASES = [
    Case(P=3, C_in=40, H=14, W=13, N=9, C_out=40, kernel=(3, 3), padding=(1, 1), groups=40, index="random", seed=41),
    Case(P=2, C_in=6, H=9, W=11, N=5, C_out=12, kernel=(3, 3), padding=(2, 0), groups=6, index="unused", seed=42),
    Case(P=2, C_in=5, H=12, W=10, N=4, C_out=10, kernel=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
         groups=5, bias=False, seed=43),
    Case(P=3, C_in=4, H=7, W=8, N=3, C_out=4, kernel=(1, 1), groups=4, layout="channels_last", seed=44),
]


def set_budget(budgets: tuple[int, int, int] | None, dtype: torch.dtype | None) -> None:
    if budgets is None:
        os.environ.pop("POINTINS_CUDA_SMEM_BUDGET", None)
    else:
        size = torch.empty((), dtype=dtype).element_size()
        os.environ["POINTINS_CUDA_SMEM_BUDGET"] = str(budgets[{2: 0, 4: 1, 8: 2}[size]])


def plans(case: Case, dtype: torch.dtype) -> str:
    """The tilings the emulated library plans for the case (see describe_plans in instance_aware_conv.cu)."""
    templates, weight, _, index = make_inputs(case, dtype)
    return torch.ops.emu_ops.describe(templates, weight, index, list(case.stride), list(case.padding),
                                      list(case.dilation), case.groups)


def check(case: Case, dtype: torch.dtype) -> None:
    """oracle.check_case on the emulated op, naming the case, dtype and scheduler seed when it fails."""
    try:
        check_case(op, case, dtype)
    except Exception as error:
        seed = os.environ.get("POINTINS_EMU_SEED", "1")
        raise AssertionError(f"{case} {dtype} (POINTINS_EMU_SEED={seed}, path {os.environ.get('POINTINS_CUDA_PATH')},"
                             f" budget {os.environ.get('POINTINS_CUDA_SMEM_BUDGET')}): {error}") from error


def run_suite(suite: str, quick: bool) -> int:
    set_tf32(False)
    count = 0
    if suite == "nan":
        return check_out_of_range_index()
    if suite == "edge":
        for case in EDGE_CASES.values():
            for dtype in TOL:
                check(case, dtype)
                count += 1
    elif suite == "random":  # as tests/test_cuda.py samples them: one dtype per case, cycled by seed
        cases = random_cases(240, seed=2026)
        for case in cases[:48] if quick else cases:
            check(case, list(TOL)[case.seed % len(TOL)])
            count += 1
    elif suite == "tiled":
        cases = tiled_cases()
        for case in cases[:2] if quick else cases:
            for dtype in (torch.float64, torch.float16, torch.bfloat16):
                check(case, dtype)
                count += 1
    elif suite == "paths":
        for budget, case, shows in PATH_CASES[:2] if quick else PATH_CASES:
            try:
                for dtype in TOL:
                    set_budget(budget, dtype)
                    plan = plans(case, dtype)
                    assert re.search(shows, plan), f"{case} {dtype}: the plans no longer show {shows!r}: {plan}"
                    check(case, dtype)
                    count += 1
            finally:
                set_budget(None, None)
    elif suite == "pointwise":
        for case in POINTWISE_CASES[:2] if quick else POINTWISE_CASES:
            assert plans(case, torch.bfloat16).startswith("forward pointwise"), plans(case, torch.bfloat16)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                check(case, dtype)
                count += 1
        os.environ["POINTINS_CUDA_PATH"] = "pointwise"
        try:
            small = [dataclasses.replace(case, kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                                         layout="contiguous") for case in random_cases(240, seed=2026)[:60]]
            for case in small[:8] if quick else small:
                check(case, (torch.float32, torch.float16, torch.bfloat16)[case.seed % 3])
                count += 1
        finally:
            os.environ.pop("POINTINS_CUDA_PATH", None)
    elif suite == "depthwise":
        for case in DEPTHWISE_CASES[:2] if quick else DEPTHWISE_CASES:
            assert plans(case, torch.float32).startswith("forward depthwise"), plans(case, torch.float32)
            for dtype in TOL:
                check(case, dtype)
                count += 1
    elif suite == "buckets":
        for case, steps in BUCKET_CASES[:2] if quick else BUCKET_CASES:
            assert bucket_steps(case) == steps, f"{case}: {bucket_steps(case)} bucketing steps, expected {steps}"
            # float64, not float32: grad_templates sums thousands of instances per template, past TOL[float32]
            for dtype in (torch.float64, torch.bfloat16):
                check(case, dtype)
                count += 1
    elif suite == "tf32":
        set_tf32(True)
        try:
            # Short reductions only: TOL[float32] is set for them (the tiled cases' sums of thousands of terms
            # exceed it in plain float32 too; tests/test_cuda.py leaves float32 out of them for that reason).
            cases = [case for case in EDGE_CASES.values() if case.N > 0] + random_cases(240, seed=2026)[::10]
            for case in cases[:6] if quick else cases:
                check_tf32_case(case)
                count += 1
        finally:
            set_tf32(False)
    elif suite == "determinism":
        # The scheduler's seed changes the order in which threads and warps run between barriers; the results
        # must not change by a single bit (no atomics, fixed summation orders).
        case = Case(P=4, C_in=20, H=11, W=9, N=13, C_out=6, kernel=(3, 3), padding=(1, 1), groups=2, seed=5)
        for dtype in (torch.float32, torch.bfloat16):
            first = run_emulated(case, dtype, seed=1)
            second = run_emulated(case, dtype, seed=977)
            for what, a, b in zip(("output", "grad_templates", "grad_weight", "grad_bias"), first, second):
                assert torch.equal(a, b), f"{what} ({dtype}) differs between two schedules"
            count += 1
        os.environ["POINTINS_EMU_SEED"] = "1"
    else:
        raise SystemExit(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    return count


def kernel_names() -> dict[int, str]:
    """{offset in the emulation library: demangled kernel name} of the library's __global__ functions."""
    import subprocess

    library = os.path.join(build_folder(), "pointins_cuda_emulation.so")
    listing = subprocess.run(["nm", "-C", "--defined-only", library], capture_output=True, text=True, check=True)
    names = {}
    for line in listing.stdout.splitlines():
        address, kind, name = line.split(" ", 2)
        if kind in "tT" and "pointins_ops::cuda::" in name and "[clone" not in name:
            names[int(address, 16)] = name
    return names


def _short_name(name: str) -> str:
    """'void pointins_ops::cuda::(anonymous namespace)::conv_forward_kernel<pointins_ops::cuda::...>(...)' ->
    'conv_forward_kernel<...>' with namespaces dropped and the argument list cut."""
    name = name.removeprefix("void ")
    depth, end = 0, len(name)
    for i, char in enumerate(name):  # the argument list: the first '(' outside template brackets after the name
        depth += char == "<"
        depth -= char == ">"
        if char == "(" and depth == 0 and not name[:i].endswith("::"):
            end = i
            break
    return re.sub(r"(pointins_ops::cuda::|\(anonymous namespace\)::|c10::)", "", name[:end])


def _recorded(run, names: dict[int, str]) -> tuple:
    """run()'s result and the launches it makes, recorded instead of run: {"kernel", "grid": [x, y, z], "threads",
    "smem"} each."""
    torch.ops.emu_ops.record(True)
    try:
        torch.ops.emu_ops.records()  # (drops anything recorded before)
        value = run()
        lines = torch.ops.emu_ops.records().splitlines()
    finally:
        torch.ops.emu_ops.record(False)
    launches = []
    for line in lines:
        offset, gx, gy, gz, threads, smem = line.split()
        launches.append(dict(kernel=_short_name(names.get(int(offset, 16), f"unknown@{offset}")),
                             grid=[int(gx), int(gy), int(gz)], threads=int(threads), smem=int(smem)))
    return value, launches


def record_calls(calls: list[dict]) -> list[dict]:
    """The launches each call's forward and backward would make on an sm_90 device, recorded by the very host
    code the GPU build runs (kernel bodies not run; persistent grids as large as their work).

    A call: {"templates": shape, "weight": shape, "bias": bool, "index": list of ints or None, "stride",
    "padding", "dilation": pairs, "groups": int, "dtype": "bfloat16" | "float16" | "float32", "tf32": bool}.
    Returns per call {"forward": [launch], "backward": [launch], "plans": describe()'s text}, a launch being
    {"kernel", "grid": [x, y, z], "threads", "smem"}."""
    names = kernel_names()
    results = []
    for call in calls:
        dtype = getattr(torch, call["dtype"])
        set_tf32(bool(call.get("tf32", False)))
        templates = torch.empty(call["templates"], dtype=dtype)
        weight = torch.empty(call["weight"], dtype=dtype)
        N, C_out = call["weight"][0], call["weight"][1]
        bias = torch.empty(N, C_out, dtype=dtype) if call["bias"] else None
        index = torch.tensor(call["index"], dtype=torch.int64) if call["index"] is not None else None
        conv = (list(call["stride"]), list(call["padding"]), list(call["dilation"]), call["groups"])
        result = {"plans": torch.ops.emu_ops.describe(templates, weight, index, *conv)}
        output, result["forward"] = _recorded(
            lambda: torch.ops.emu_ops.forward(templates, weight, bias, index, *conv), names)
        _, result["backward"] = _recorded(
            lambda: torch.ops.emu_ops.backward(torch.empty_like(output), templates, weight, index, *conv, call["bias"]),
            names)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="*", help=f"any of {', '.join(SUITES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="a sample of each suite")
    parser.add_argument("--record", action="store_true",
                        help="read calls as JSON on stdin, write their recorded launches as JSON (record_calls)")
    args = parser.parse_args(argv)
    if args.record:
        import contextlib
        import json

        calls = json.load(sys.stdin)
        with contextlib.redirect_stdout(sys.stderr):  # the build's messages
            build()
        json.dump(record_calls(calls), sys.stdout)
        return
    started = time.time()
    build()
    print(f"built in {time.time() - started:.0f} s", flush=True)
    for suite in args.suites or SUITES:
        begun = time.time()
        count = run_suite(suite, args.quick)
        print(f"{suite}: {count} checks passed in {time.time() - begun:.0f} s", flush=True)
    print(f"all passed in {time.time() - started:.0f} s ({torch.ops.emu_ops.launches()} kernel launches)")


if __name__ == "__main__":
    main()
