"""ESTIMATE, not a measurement: GPU time per scenario, mode, dtype and backend on an NVIDIA H200, from the kernels'
structure, before any GPU has run them.

    python -m benchmarks.estimate                      # every scenario, bfloat16 and float32, all modes
    python -m benchmarks.estimate --markdown           # the README table (bfloat16 forward+backward)
    python -m benchmarks.estimate --kernels --scenario solov2 --dtype bfloat16 --mode backward

Each backend's plan is a list of kernel launches, one record each:
``{"kernel", "programs", "bytes" (DRAM, estimated), "flops" (issued, padding included), "seconds", "basis"}``.

* ``triton``: the launches the real launchers make (``pointins_ops.triton.compile.record`` runs them on meta
  tensors with the launch recorded instead of run: same kernels, grids, tiles and splits), each default
  candidate compiled for sm_90 (registers, shared memory, HGMMA or FMA, cp.async) unless ``--no-compile``.
* ``cuda``: ``benchmarks/estimate_cuda.py``'s ``plan(scenario, mode, dtype)``: the launches the CUDA host code
  makes, recorded by the CUDA emulation (``csrc/cuda/emulation/emulate.py --record``), each costed from its tiles.
* the pure-PyTorch formulations of ``pointins_ops/reference.py``, launch by launch as PyTorch runs them (gathers,
  im2col, cuDNN / cuBLAS calls, copies, index_add, per-template loops), and the best of them per row.

One cost model for every kernel of every backend, so that a speedup comes from bytes, flops and launches, not
from assuming the vendor libraries are worse than our kernels:

    seconds = LAUNCH_S + max(bytes / (COPY * MEMORY_EFFICIENCY), flops / (MATMUL[dtype] * MATH_EFFICIENCY[unit]))
              * quantization(programs)

and a call costs ``max(device time, host time)``: the benchmark times each call with CUDA events, so a call whose
CPU side (Python, dispatch, launches) is slower than its kernels is measured at the CPU's pace. Every constant is
below with its reason; the first GPU window must measure them first (see README).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import math
import os
import sys

import torch

from .scenarios import MODES, SCENARIOS, Scenario

# ---------------------------------------------------------------------------------------------------------------
# Ceilings (H200, measured on this workplace's machines: /work/.library/device/KINDS.md, 2026-10-28 and 11-04)
# ---------------------------------------------------------------------------------------------------------------
COPY = 4.3e12  # bytes/s, device-to-device copy counting bytes read and written
SMS = 132
CLOCK = 1.98e9
# flop/s of a large matmul in the dtype, as the benchmark harness measures its ceiling: bf16 measured (788); float16
# the same tensor-core rate. float32: the harness turns TF32 off, so its matmul is IEEE FFMA: 132 SMs x 128 lanes
# x 2 flop x 1.98 GHz = 66.9 TFLOP/s, the arithmetic peak (not measured: a cuBLAS SGEMM reaches ~80% of it, so
# this ceiling makes float32's % of roofline conservative). TF32 (not used by the benchmark) would be 395: half
# the bf16 rate.
MATMUL = {"bfloat16": 790e12, "float16": 790e12, "float32": 66.9e12}

# ---------------------------------------------------------------------------------------------------------------
# Planning assumptions (to be measured first on a GPU)
# ---------------------------------------------------------------------------------------------------------------
# Fraction of the copy rate a kernel streams at when its loads are coalesced and several tiles are in flight per
# SM (pipelined cp.async, or several resident programs). Applied to every kernel of every backend alike.
MEMORY_EFFICIENCY = 0.85
# Fraction of MATMUL reached by the math units of a kernel: Hopper tensor cores through wgmma (HGMMA in SASS) on
# tiles of 64-128 x 16-256 with K steps of 16-64 (Triton's matmul reaches ~70% of cuBLAS on large tiles; ours
# are smaller); FMA loops (IEEE float32 dots, direct kernels) against the FFMA peak.
MATH_EFFICIENCY = {"tensor": 0.55, "fma": 0.5}
# GPU time per launch beyond its streaming: launch latency, ramp-up of the first wave and drain of the last,
# between dependent kernels on one stream (1.5-3 us on Hopper for back-to-back small kernels).
LAUNCH_S = 2.0e-6
# L2 a kernel may count on for data it reads twice (60 MB on the H200, shared with everything in flight).
L2_USABLE = 40e6
# Host (CPU) time per call: the Python and C++ work before each launch reaches the GPU (leads, not measured on the
# GPU machine): PyTorch eager dispatch of a simple op ~6 us, a cuDNN / cuBLAS call ~15 us (heuristics cached), an
# autograd node ~4 us. pointins backends: the public function's Python input checks ~10 us; a device sync for its
# index check (.tolist()) drains the GPU, ~8 us, and what is queued after it starts from an idle GPU. Triton: our
# launcher code per op call, measured on this 2-core VM with launches stubbed out (meta tensors, cached plans):
# 26-42 us, taken as 35 us with the custom-op dispatch; Triton's own launcher per kernel (~45 arguments bound and
# specialised in Python) ~10 us. The C++ CUDA op: dispatch ~10 us, ~5 us per launch.
HOST_ATEN_S = 6e-6
HOST_LIBRARY_S = 15e-6
HOST_AUTOGRAD_S = 4e-6
HOST_CHECKS_S = 10e-6
HOST_TRITON_LAUNCH_S = 10e-6
HOST_TRITON_OP_S = 35e-6
HOST_CUDA_OP_S = 10e-6
HOST_CUDA_LAUNCH_S = 5e-6
SYNC_S = 8e-6

ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def record(kernel: str, programs: int, bytes_: float, flops: float, seconds: float, basis: str) -> dict:
    return dict(kernel=kernel, programs=int(programs), bytes=int(bytes_), flops=int(flops), seconds=float(seconds),
                basis=basis)


def quantization(programs: int, slots_per_sm: int = 1) -> float:
    """Time factor of a grid that does not fill whole waves: the busiest SM runs ceil(programs / SMs) programs
    while the average runs programs / SMs. Fewer programs than SMs use only that many SMs (an SM can draw at
    most ~2x its share of the bandwidth, hence the cap)."""
    per_sm = programs / SMS
    if per_sm <= 0:
        return 1.0
    return min(math.ceil(per_sm) / per_sm, 2.0 if per_sm < 1 else math.inf)


def kernel_time(bytes_: float, flops: float, dtype: str, unit: str, programs: int) -> tuple[float, str]:
    memory = bytes_ / (COPY * MEMORY_EFFICIENCY)
    peak = MATMUL[dtype] if unit == "tensor" else MATMUL["float32"]
    math_ = flops / (peak * MATH_EFFICIENCY[unit])
    factor = quantization(programs)
    bound = "memory" if memory >= math_ else f"math ({unit})"
    seconds = LAUNCH_S + max(memory, math_) * factor
    return seconds, (f"{bound}-bound: DRAM {bytes_ / 1e6:.1f} MB -> {memory * 1e6:.1f} us, {flops / 1e9:.2f} GFLOP on "
                     f"{unit} -> {math_ * 1e6:.1f} us, x{factor:.2f} wave quantization ({programs} programs), "
                     f"+{LAUNCH_S * 1e6:.0f} us launch")


class Shape:
    """The scenario's sizes and per-template instance counts (every index kind here spreads instances evenly)."""

    def __init__(self, scenario: Scenario, dtype: str):
        self.s = scenario
        self.dtype = dtype
        self.e = ELEMENT_BYTES[dtype]
        self.N, self.C_out, self.H_out, self.W_out = scenario.output_shape
        self.P, self.C_in, self.H, self.W = scenario.templates_shape
        self.G = scenario.groups
        self.Cg, self.R, self.k = self.C_in // self.G, self.C_out // self.G, scenario.kernel
        self.K = self.Cg * self.k * self.k
        self.HW, self.HWo = self.H * self.W, self.H_out * self.W_out
        self.identity = scenario.index == "identity"
        self.per_template = 1 if self.identity else self.N // self.P
        self.templates = self.P * self.C_in * self.HW * self.e
        self.weight = self.N * self.C_out * self.K * self.e
        self.bias = self.N * self.C_out * self.e if scenario.bias else 0
        self.out = self.N * self.C_out * self.HWo * self.e
        self.gathered = self.N * self.C_in * self.HW * self.e  # templates copied per instance (references)
        self.columns = self.N * self.G * self.K * self.HWo * self.e  # im2col of every instance (unfold)
        self.useful_flops = 2 * self.N * self.C_out * self.HWo * self.K

    def index_bytes(self) -> int:
        return 0 if self.identity else self.N * 8


# ---------------------------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------------------------


def _compiled(launch, enabled: bool, cache: dict) -> dict | None:
    if not enabled:
        return None
    from pointins_ops.triton import compile as triton_compile

    key = (launch.kernel.fn.__name__ if hasattr(launch.kernel, "fn") else launch.name, launch.describe(),
           tuple(sorted((k, str(v)) for k, v in launch.arguments.items() if not isinstance(v, torch.Tensor))),
           tuple(str(v.dtype) for v in launch.arguments.values() if isinstance(v, torch.Tensor)))
    if key not in cache:
        cache[key] = triton_compile.compile_launch(launch)
    return cache[key]


def _unit(report: dict | None, dtype: str) -> str:
    if report is not None:
        return "tensor" if report["hgmma"] or report["hmma"] else "fma"
    return "fma" if dtype == "float32" else "tensor"


def _padded(value: int, block: int) -> int:
    return -(-value // block) * block


def _triton_launch_record(launch, shape: Shape, report: dict | None) -> dict:
    a, sh, name = launch.arguments, shape, launch.name
    programs = launch.programs
    facts = ""
    if report is not None:
        facts = (f"; sm_90: {report['registers']} regs, {report['shared'] // 1024} KB smem, "
                 f"{'HGMMA' if report['hgmma'] else 'HMMA' if report['hmma'] else 'FMA'}, "
                 f"{report['cp_async']} cp.async, spills {report['spill_store_bytes']} B")
    rows_per_template = sh.per_template * sh.R
    if name == "bucket_kernel":
        # Two passes over the N index values per program, one template (or BLOCK_T) per program: N x (P + 1) pairs
        # x ~10 instructions per pair per pass (compare, convert, scan, position), issue-bound, at best
        # 4 schedulers x 32 lanes per SM and cycle; each pass is ceil(N / CHUNK) dependent L2 round trips (~0.6 us).
        pairs = sh.N * (sh.P + 1) * 2
        issue = pairs * 10 / (SMS * 128 * CLOCK)
        steps = 2 * -(-sh.N // a["CHUNK"]) * 0.6e-6
        bytes_ = sh.N * 8 + sh.N * 4 + 2 * (sh.P + 1) * 4
        seconds = LAUNCH_S + max(issue, steps, bytes_ / (COPY * MEMORY_EFFICIENCY))
        return record(name, programs, bytes_, 0, seconds,
                      f"bucketing: {pairs / 1e6:.1f} M (instance, template) comparisons -> {issue * 1e6:.1f} us of "
                      f"issue, {steps * 1e6:.1f} us of dependent L2 steps, +{LAUNCH_S * 1e6:.0f} us launch{facts}")
    if name == "sum_partials_kernel":
        splits = a["S"]
        bytes_ = splits * (a["M_w"] + a["M_b"]) * 4 + (a["M_w"] + a["M_b"]) * sh.e
        seconds, basis = kernel_time(bytes_, 0, sh.dtype, "fma", programs)
        return record(name, programs, bytes_, 0, seconds, f"fixed-order sum of {splits} float32 partials: {basis}")
    unit = _unit(report, sh.dtype)
    buckets = 0 if sh.identity else sh.N * 4 + 2 * (sh.P + 1) * 4
    if name == "forward_gemm":
        row_blocks = _padded(rows_per_template, a["BLOCK_M"]) * sh.P * sh.G
        flops = 2 * row_blocks * _padded(sh.HWo, a["BLOCK_N"]) * sh.k * sh.k * _padded(sh.Cg, a["BLOCK_C"])
        bytes_ = sh.templates + sh.weight + sh.bias + sh.out + buckets
        seconds, basis = kernel_time(bytes_, flops, sh.dtype, unit, programs)
        return record(name, programs, bytes_, flops, seconds,
                      f"templates, weight, bias read once, output written once (a template tile is shared by its "
                      f"row blocks through L1); {basis}{facts}")
    if name == "forward_direct":
        flops = 2 * sh.N * sh.C_out * _padded(sh.HWo, a["BLOCK_N"]) * sh.K
        bytes_ = sh.templates + sh.weight + sh.bias + sh.out + buckets
        seconds, basis = kernel_time(bytes_, flops, sh.dtype, "fma", programs)
        return record(name, programs, bytes_, flops, seconds,
                      f"direct depthwise FMA, [instances x groups x pixels] tiles; {basis}{facts}")
    if name.startswith("backward"):
        splits = a["num_px_tiles"] if a.get("DO_GW") else 1
        partial = splits > 1 if name != "backward_direct" else a.get("num_out_tiles", 1) > 1
        weight_out = sh.weight + sh.bias  # grad_weight, and grad_bias when the forward had a bias
        if partial:
            count = splits if name != "backward_direct" else a["num_out_tiles"]
            weight_out = count * (sh.N * sh.C_out * (sh.K + (1 if sh.bias else 0))) * 4
        reads_twice = ""
        if name == "backward_direct":
            flops = 2 * 2 * sh.N * sh.C_out * _padded(sh.HWo, a["BLOCK_PO"]) * sh.K
            bytes_ = sh.out + sh.templates + sh.weight + sh.templates + weight_out + buckets
            unit = "fma"
        else:
            block_m, block_c = a["BLOCK_M"], a["BLOCK_C"]
            rows = _padded(rows_per_template, block_m) * sh.P * sh.G
            channels = _padded(sh.Cg, block_c)
            gw_flops = 2 * rows * _padded(sh.HWo, a["BLOCK_PO"]) * sh.k * sh.k * channels
            bias_flops = 2 * rows * _padded(sh.HWo, a["BLOCK_PO"]) * 16 if a["M_b"] else 0  # M_b = 0: no bias
            gt_flops = 2 * rows * _padded(sh.HW, a["BLOCK_PI"]) * sh.k * sh.k * channels
            flops = (gw_flops + bias_flops if a["DO_GW"] else 0) + (gt_flops if a["DO_GT"] else 0)
            bytes_ = buckets
            if a["DO_GW"]:
                bytes_ += sh.out + sh.templates + weight_out
            if a["DO_GT"]:
                bytes_ += sh.weight + sh.templates + (0 if a["DO_GW"] else sh.out)
            if a["DO_GT"] and a["DO_GW"]:
                # grad_output is read twice per program (grad_weight, then grad_templates); the second read hits
                # L2 while the slices all resident programs hold fit L2_USABLE, DRAM for the excess.
                resident = min(programs, 2 * SMS)
                slice_ = rows_per_template * min(sh.HWo, a["split_len_div"] * a["ALIGN"]) * sh.e
                working = resident * slice_
                miss = max(0.0, 1 - L2_USABLE / working) if working else 0.0
                bytes_ += miss * sh.out
                reads_twice = (f"; grad_output's second read: {resident} resident programs x "
                               f"{slice_ / 1e3:.0f} KB = {working / 1e6:.0f} MB against {L2_USABLE / 1e6:.0f} MB "
                               f"of L2 -> {miss:.0%} from DRAM")
        seconds, basis = kernel_time(bytes_, flops, sh.dtype, unit, programs)
        what = {"backward_fused": "grad_templates + grad_weight + grad_bias in one pass",
                "backward_grad_templates": "grad_templates", "backward_grad_weight": "split grad_weight + grad_bias",
                "backward_direct": "direct depthwise backward"}.get(name, name)
        split_note = f", {splits} pixel splits (float32 partials)" if partial else ""
        return record(name, programs, bytes_, flops, seconds, f"{what}{split_note}; {basis}{reads_twice}{facts}")
    raise ValueError(f"no cost model for Triton kernel {name}")


_LAUNCH_CACHE: dict = {}


def triton_plan(scenario: Scenario, mode: str, dtype: str, compile_kernels: bool = True,
                compile_cache: dict | None = None) -> list[dict]:
    """The Triton backend's kernel launches for one call (forward, backward, or both), as records."""
    from pointins_ops.triton import compile as triton_compile

    key = (scenario.name, dtype)
    if key not in _LAUNCH_CACHE:
        _LAUNCH_CACHE[key] = triton_compile.record(
            scenario.templates_shape, scenario.weight_shape, bias=scenario.bias,
            index=scenario.index != "identity", dtype=getattr(torch, dtype), padding=(scenario.padding,) * 2,
            groups=scenario.groups, all_candidates=False)
    launches = _LAUNCH_CACHE[key]
    shape = Shape(scenario, dtype)
    modes = ["forward", "backward"] if mode == "forward+backward" else [mode]
    cache = compile_cache if compile_cache is not None else {}
    return [_triton_launch_record(launch, shape, _compiled(launch, compile_kernels, cache))
            for part in modes for launch in launches[part]]


def host_seconds(plan: list[dict], mode: str, scenario: Scenario, per_op: float, per_launch: float) -> float:
    """A pointins backend's CPU time per call: the public function's checks (and index sync) for a forward, the
    op dispatch per op, a launch per kernel, the autograd nodes."""
    ops = 2 if mode == "forward+backward" else 1
    checks = HOST_CHECKS_S + (SYNC_S if scenario.index != "identity" else 0.0) if mode != "backward" else 0.0
    autograd = HOST_AUTOGRAD_S * (2 if mode != "forward" else 1)
    return checks + ops * per_op + len(plan) * per_launch + autograd


# ---------------------------------------------------------------------------------------------------------------
# Pure-PyTorch references (pointins_ops/reference.py), launch by launch
# ---------------------------------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, shape: Shape):
        self.shape, self.kernels, self.host = shape, [], 0.0

    def add(self, name, bytes_, flops=0, unit="fma", library=False, programs=None, count=1, note=""):
        sh = self.shape
        programs = programs or max(SMS * 4, 1)
        seconds, basis = kernel_time(bytes_, flops, sh.dtype, unit, programs)
        for _ in range(count):
            self.kernels.append(record(name, programs, bytes_, flops, seconds, (note + "; " if note else "") + basis))
        self.host += count * (HOST_LIBRARY_S if library else HOST_ATEN_S)

    def sync(self):
        self.host += SYNC_S
        self.kernels.append(record("host sync (.tolist())", 0, 0, 0, SYNC_S, "the GPU drains; later launches start "
                                   "from an idle GPU"))


def _gather(b: _Builder, backward: bool):
    sh = b.shape
    if sh.identity:
        return
    if not backward:
        b.add("index_select(templates)", 2 * sh.gathered, note="one copy of its template per instance")
    else:
        b.add("zeros(grad_templates)", sh.templates)
        b.add("index_add_(grad_templates)", 2 * sh.gathered + sh.templates, note="index_select's backward, atomics")


def reference_plans(scenario: Scenario, mode: str, dtype: str) -> dict:
    """{formulation: (records, host seconds)} for the formulations that apply to the scenario."""
    sh = Shape(scenario, dtype)
    tensor = "tensor" if dtype != "float32" else "fma"
    parts = ["forward", "backward"] if mode == "forward+backward" else [mode]
    plans = {}

    # grouped_conv2d: gather, one conv2d with N * groups groups (cuDNN), its backward (data, weight, bias)
    b = _Builder(sh)
    for part in parts:
        if part == "forward":
            _gather(b, False)
            b.add("cudnn grouped conv2d", sh.gathered + sh.weight + sh.bias + sh.out, sh.useful_flops, tensor,
                  library=True, note=f"{sh.N * sh.G} groups")
        else:
            b.add("cudnn conv backward data", sh.out + sh.weight + sh.gathered, sh.useful_flops, tensor, library=True)
            b.add("cudnn conv backward weight", sh.out + sh.gathered + sh.weight, sh.useful_flops, tensor,
                  library=True)
            if scenario.bias:
                b.add("bias grad (sum)", sh.out + sh.bias)
            _gather(b, True)
            b.host += HOST_AUTOGRAD_S * 3
    plans["grouped_conv2d"] = (b.kernels, b.host)

    # unfold_bmm: gather, im2col of every instance, batched matmul, bias add
    b = _Builder(sh)
    for part in parts:
        if part == "forward":
            _gather(b, False)
            b.add("unfold (im2col)", sh.gathered + sh.columns)
            b.add("cublas bmm", sh.columns + sh.weight + sh.out, sh.useful_flops, tensor, library=True)
            if scenario.bias:
                b.add("bias add", 2 * sh.out + sh.bias)
        else:
            b.add("cublas bmm (grad columns)", sh.out + sh.weight + sh.columns, sh.useful_flops, tensor, library=True)
            b.add("cublas bmm (grad weight)", sh.out + sh.columns + sh.weight, sh.useful_flops, tensor, library=True)
            b.add("fold (col2im)", sh.columns + sh.gathered)
            if scenario.bias:
                b.add("bias grad (sum)", sh.out + sh.bias)
            _gather(b, True)
            b.host += HOST_AUTOGRAD_S * 5
    plans["unfold_bmm"] = (b.kernels, b.host)

    if scenario.kernel == 1:  # einsum_1x1: gather, one bmm contracting the channels
        b = _Builder(sh)
        for part in parts:
            if part == "forward":
                _gather(b, False)
                b.add("cublas bmm (einsum)", sh.gathered + sh.weight + sh.out, sh.useful_flops, tensor, library=True)
                if scenario.bias:
                    b.add("bias add", 2 * sh.out + sh.bias)
            else:
                b.add("cublas bmm (grad input)", sh.out + sh.weight + sh.gathered, sh.useful_flops, tensor,
                      library=True)
                b.add("cublas bmm (grad weight)", sh.out + sh.gathered + sh.weight, sh.useful_flops, tensor,
                      library=True)
                if scenario.bias:
                    b.add("bias grad (sum)", sh.out + sh.bias)
                _gather(b, True)
                b.host += HOST_AUTOGRAD_S * 4
        plans["einsum_1x1"] = (b.kernels, b.host)

    # per_template_conv2d: sort, one host sync, then per template: weight gather and interleave, conv2d, output
    # interleave copy; then cat and the inverse permutation. Backward mirrors it template by template.
    b = _Builder(sh)
    used = sh.P
    per = sh.per_template
    out_p = per * sh.C_out * sh.HWo * sh.e
    w_p = per * sh.C_out * sh.K * sh.e
    t_p = sh.C_in * sh.HW * sh.e
    flops_p = sh.useful_flops // used
    for part in parts:
        if part == "forward":
            b.add("argsort + bincount", sh.index_bytes() * 3, count=2)
            b.sync()
            b.add("index_select(weight) + interleave copy", 3 * w_p, count=2 * used)
            b.add("cudnn conv2d (one template)", t_p + w_p + out_p, flops_p, tensor, library=True,
                  programs=max(1, -(-out_p // (128 * 128 * sh.e))), count=used)
            b.add("output interleave copy", 2 * out_p, count=used)
            b.add("cat + argsort + index_select", 4 * sh.out, count=3)
        else:
            b.add("index_select/cat backward", 4 * sh.out, count=3)
            b.add("output interleave backward copy", 2 * out_p, count=used)
            b.add("cudnn conv backward data + weight (one template)", 2 * out_p + 2 * t_p + 2 * w_p, 2 * flops_p,
                  tensor, library=True, programs=max(1, -(-out_p // (128 * 128 * sh.e))), count=used)
            b.add("weight / template slice backward (index_add, copies)", 3 * w_p + 2 * t_p, count=2 * used)
            b.host += HOST_AUTOGRAD_S * 6 * used
    plans["per_template_conv2d"] = (b.kernels, b.host)
    return plans


# ---------------------------------------------------------------------------------------------------------------
# CUDA (another file's plan) and the table
# ---------------------------------------------------------------------------------------------------------------


def cuda_plan_function():
    """benchmarks/estimate_cuda.py's plan(scenario, mode, dtype), or None with the reason."""
    path = os.path.join(os.path.dirname(__file__), "estimate_cuda.py")
    if not os.path.exists(path):
        return None, "benchmarks/estimate_cuda.py does not exist yet: no CUDA rows"
    module = importlib.import_module("benchmarks.estimate_cuda")
    return module.plan, ""


def device_seconds(plan: list[dict]) -> float:
    return sum(k["seconds"] for k in plan)


def floor_seconds(scenario: Scenario, mode: str, dtype: str) -> float:
    """The benchmark's roofline floor: max(min_bytes / copy rate, flops / matmul rate)."""
    return max(scenario.min_bytes(mode, getattr(torch, dtype)) / COPY, scenario.flops(mode) / MATMUL[dtype])


def estimate_rows(scenarios, modes, dtypes, compile_kernels=True, with_cuda=True):
    cuda_plan, cuda_note = cuda_plan_function() if with_cuda else (None, "CUDA rows not asked for")
    compile_cache: dict = {}
    rows = []
    for scenario in scenarios:
        for dtype in dtypes:
            for mode in modes:
                floor = floor_seconds(scenario, mode, dtype)
                references = reference_plans(scenario, mode, dtype)
                ref_times = {name: max(device_seconds(k), host) for name, (k, host) in references.items()}
                best_name = min(ref_times, key=ref_times.get)
                backends = {}
                plan = triton_plan(scenario, mode, dtype, compile_kernels, compile_cache)
                backends["triton"] = (plan, host_seconds(plan, mode, scenario, HOST_TRITON_OP_S,
                                                         HOST_TRITON_LAUNCH_S))
                if cuda_plan is not None:
                    cplan = cuda_plan(scenario, mode, dtype)
                    backends["cuda"] = (cplan, host_seconds(cplan, mode, scenario, HOST_CUDA_OP_S,
                                                            HOST_CUDA_LAUNCH_S))
                for name, (kernels, host) in backends.items():
                    device = device_seconds(kernels)
                    total = max(device, host)
                    rows.append(dict(
                        scenario=scenario.name, dtype=dtype, mode=mode, backend=name, kernels=len(kernels),
                        programs=sum(k["programs"] for k in kernels), bytes=sum(k["bytes"] for k in kernels),
                        flops=sum(k["flops"] for k in kernels), device_s=device, host_s=host, seconds=total,
                        floor_s=floor, roofline_pct=100 * floor / total, device_roofline_pct=100 * floor / device,
                        best_reference=best_name, reference_s=ref_times[best_name],
                        speedup=ref_times[best_name] / total, plan=kernels))
    return rows, cuda_note


def _print_kernels(row):
    for k in row["plan"]:
        print(f"    {k['kernel']:<28s} {k['programs']:>7d} programs {k['bytes'] / 1e6:9.1f} MB "
              f"{k['flops'] / 1e9:8.2f} GFLOP {k['seconds'] * 1e6:8.1f} us  {k['basis']}")


def markdown(rows, note: str) -> str:
    lines = [f"ESTIMATE (no GPU run): `python -m benchmarks.estimate --markdown`, {datetime.date.today()}; "
             f"H200 ceilings 4.3 TB/s copy, 790 TFLOP/s bf16.{' ' + note if note else ''}",
             "",
             "| scenario | backend | kernels | DRAM MB | est. device us | est. host us | % of roofline | "
             "best reference (est. us) | est. speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['scenario']} | {row['backend']} | {row['kernels']} | {row['bytes'] / 1e6:.0f} | "
                     f"{row['device_s'] * 1e6:.1f} | {row['host_s'] * 1e6:.0f} | {row['roofline_pct']:.0f}% "
                     f"({row['device_roofline_pct']:.0f}% device) | {row['best_reference']} "
                     f"({row['reference_s'] * 1e6:.0f}) | {row['speedup']:.1f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default=",".join(SCENARIOS))
    parser.add_argument("--dtype", default="bfloat16,float32")
    parser.add_argument("--mode", default=",".join(MODES))
    parser.add_argument("--kernels", action="store_true", help="every kernel launch with its reasoning")
    parser.add_argument("--markdown", action="store_true", help="the README table: bfloat16 forward+backward")
    parser.add_argument("--no-compile", action="store_true", help="skip compiling the Triton kernels for sm_90")
    parser.add_argument("--no-cuda", action="store_true", help="leave out benchmarks/estimate_cuda.py")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the estimate compiles the kernels for sm_90")
    scenarios = [SCENARIOS[name] for name in args.scenario.split(",")]
    if args.markdown:
        rows, note = estimate_rows(scenarios, ["forward+backward"], ["bfloat16"], not args.no_compile,
                                   not args.no_cuda)
        print(markdown(rows, note))
        return 0
    rows, note = estimate_rows(scenarios, args.mode.split(","), args.dtype.split(","), not args.no_compile,
                               not args.no_cuda)
    print(f"ESTIMATE (no GPU run), {datetime.date.today()}: H200 copy {COPY / 1e12:.1f} TB/s, matmul "
          + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in MATMUL.items())
          + f"; memory efficiency {MEMORY_EFFICIENCY}, math efficiency {MATH_EFFICIENCY}, launch {LAUNCH_S * 1e6} us")
    if note:
        print(note)
    print(f"{'scenario':16s} {'dtype':9s} {'mode':17s} {'backend':7s} {'kernels':>7s} {'DRAM MB':>8s} "
          f"{'device us':>9s} {'host us':>8s} {'floor us':>8s} {'% roof':>7s} {'best reference':>20s} {'ref us':>8s} "
          f"{'speedup':>7s}")
    for row in rows:
        print(f"{row['scenario']:16s} {row['dtype']:9s} {row['mode']:17s} {row['backend']:7s} {row['kernels']:7d} "
              f"{row['bytes'] / 1e6:8.1f} {row['device_s'] * 1e6:9.1f} {row['host_s'] * 1e6:8.1f} "
              f"{row['floor_s'] * 1e6:8.1f} {row['roofline_pct']:6.0f}% {row['best_reference']:>20s} "
              f"{row['reference_s'] * 1e6:8.1f} {row['speedup']:6.1f}x")
        if args.kernels:
            _print_kernels(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
