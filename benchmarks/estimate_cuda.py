"""ESTIMATE, not a measurement: the CUDA backend's kernel launches per scenario, with the cost model of
``benchmarks/estimate.py`` (which imports this file's ``plan`` for its CUDA rows).

    python -m benchmarks.estimate --kernels --scenario solov2 --dtype bfloat16 --mode backward

Where the launches come from: the CUDA emulation (``csrc/cuda/emulation/emulate.py --record``) runs the real host
code of ``csrc/cuda/*.cu`` -- checks, bucketing, the choice of path, the tile plans, grids and shared memory --
on empty CPU tensors of each scenario's sizes and records every launch instead of running it, with persistent
grids as large as their work. So the kernels, plans and work units below are the ones an H200 would get; only
what each kernel costs is modelled here. The recording runs once per process in a child process (the emulation
defines the op's namespace itself, so it cannot share a process with ``pointins_ops``); building the emulation
the first time takes a few minutes.

The model per kernel, from the plan's tiles (``describe`` in the emulation) and the scenario's sizes:

* flops: the multiply-adds the kernel issues, padding included -- warp items of 32 x 32 (conv path), 64-row warp
  tiles (pointwise), reduction depths rounded up to the plan's chunk or k-step; on tensor cores (bfloat16,
  float16, TF32) or FMA (IEEE float32, depthwise);
* bytes: each operand from DRAM once (re-reads of a template by its row tiles hit L2 while the templates the
  resident blocks work on fit ``L2_USABLE``; the excess is counted from DRAM), outputs written once, float32
  partials and the bucket tables written and read back;
* programs: the work units that do work (a persistent grid's idle capacity units exit at once and are not
  counted); wave quantization over 132 SMs as in ``estimate.kernel_time``.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import torch

from .estimate import CLOCK, L2_USABLE, LAUNCH_S, SMS, Shape, kernel_time, record
from .scenarios import SCENARIOS, Scenario, input_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATE = os.path.join(ROOT, "csrc", "cuda", "emulation", "emulate.py")
RECORD_TIMEOUT_S = 1800
DTYPES = ("bfloat16", "float16", "float32")

# Dependent round trip to L2 / DRAM of one warp's load that the next step waits for (the bucketing kernel's
# loop steps); the same figure as the Triton bucketing model.
DEPENDENT_STEP_S = 0.6e-6
# A block-wide barrier plus the shared-memory scan it separates (1024 threads), on one SM.
BLOCK_PHASE_S = 0.3e-6
# buckets.cu's kHeldSteps: segments of up to this many 32-instance steps stay in registers between the passes.
HELD_STEPS = 8


def _call(scenario: Scenario, dtype: str) -> dict:
    generator = torch.Generator().manual_seed(input_seed(scenario, getattr(torch, dtype), 0))
    index = scenario.make_index(torch.device("cpu"), generator)
    return dict(templates=list(scenario.templates_shape), weight=list(scenario.weight_shape), bias=scenario.bias,
                index=None if index is None else index.tolist(), stride=[1, 1], padding=[scenario.padding] * 2,
                dilation=[1, 1], groups=scenario.groups, dtype=dtype, tf32=False)


_RECORDED: dict = {}


def recorded(scenario: Scenario, dtype: str) -> dict:
    """The emulation's record of one scenario's forward and backward launches (every scenario and dtype is
    recorded by the first call, in one child process). float32 is recorded with TF32 off, as the benchmark
    harness runs it."""
    if (scenario.name, dtype) not in _RECORDED:
        keys = [(s, d) for s in SCENARIOS.values() for d in DTYPES]
        calls = [_call(s, d) for s, d in keys]
        for (s, d), result in zip(keys, _record(calls)):
            _RECORDED[(s.name, d)] = result
        if (scenario.name, dtype) not in _RECORDED:  # a scenario made after the first call
            _RECORDED[(scenario.name, dtype)] = _record([_call(scenario, dtype)])[0]
    return _RECORDED[(scenario.name, dtype)]


def _record(calls: list) -> list:
    """emulate.py --record in a child process; a build or record that outlasts RECORD_TIMEOUT_S is an error, not a
    wait (the first build compiles the emulation library, a few minutes on 2 cores)."""
    try:
        done = subprocess.run([sys.executable, EMULATE, "--record"], input=json.dumps(calls), capture_output=True,
                              text=True, cwd=ROOT, timeout=RECORD_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"the CUDA emulation did not record the launches within {RECORD_TIMEOUT_S} s "
                           f"(building or recording hung):\n{(error.stderr or b'')[-4000:]!r}") from None
    if done.returncode != 0:
        raise RuntimeError(f"the CUDA emulation could not record the launches:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def parse_plans(text: str) -> dict:
    """describe()'s words as {section: {key: value}}: sections 'forward conv', 'backward conv', 'forward
    pointwise', 'grad_weight', 'grad_templates', 'forward depthwise', 'backward depthwise'; values int, or
    tuples of ints for AxB, or flags ('fused' / 'split')."""
    sections = {}
    for part in text.split(";"):
        words = part.split()
        if not words:
            continue
        head = [w for w in words if "=" not in w]
        name = " ".join(w for w in head if w not in ("fused", "split"))
        values = {w: True for w in head if w in ("fused", "split")}
        for word in words:
            if "=" in word:
                key, value = word.split("=")
                numbers = tuple(int(v) for v in value.split("x"))
                values[key] = numbers[0] if len(numbers) == 1 else numbers
        sections[name] = values
    return sections


def _up(value: int, block: int) -> int:
    return -(-value // block) * block


def _unit(kernel: str) -> str:
    return "tensor" if "TensorCoreMath" in kernel else "fma"


def _l2_miss(working_bytes: float) -> float:
    """Fraction of a second read that misses L2 when `working_bytes` were streamed between the two reads."""
    return max(0.0, 1.0 - L2_USABLE / working_bytes) if working_bytes > 0 else 0.0


class _Rows:
    """Bucket rows of the scenario: per used template, its instances' output channels of one group."""

    def __init__(self, sh: Shape):
        self.sh = sh
        self.per_template = sh.R * (1 if sh.identity else sh.per_template)

    def tiles(self, tile_rows: int) -> list[int]:
        """The rows of each row tile of one template (every template alike in these scenarios)."""
        rows, out = self.per_template, []
        while rows > 0:
            out.append(min(tile_rows, rows))
            rows -= tile_rows
        return out

    def tile_count(self, tile_rows: int) -> int:
        return self.sh.P * len(self.tiles(tile_rows))


def _bucket_record(launch: dict, sh: Shape, tile_rows: int) -> dict:
    keys = sh.P + 1
    fixed = (keys + 1 + 33) * 4
    segments = max(1, (launch["smem"] - fixed) // (keys * 4))
    segment_steps = -(-(-(-sh.N // segments)) // 32)  # 32-instance steps of a warp's segment
    # a segment of up to HELD_STEPS steps is loaded once, all loads in flight together, and kept in registers for
    # both passes; a longer one waits on a load per step in the histogram pass and again in the scatter pass. Then
    # the tile table's stores.
    steps = (1 if segment_steps <= HELD_STEPS else 2 * segment_steps) + 1
    tiles = _Rows(sh).tile_count(tile_rows)
    shared = segments * keys * 4 + tiles * (math.log2(keys) + 2) * 2  # zero, sum, rebase; binary searches
    issue = shared / (128 * CLOCK)  # one SM: 4 schedulers x 32 lanes per cycle
    seconds = LAUNCH_S + steps * DEPENDENT_STEP_S + 6 * BLOCK_PHASE_S + issue
    bytes_ = 2 * sh.index_bytes() + sh.N * 4 + tiles * 8 + keys * 4
    return record("bucket_kernel", 1, bytes_, 0, seconds,
                  f"one block of 1024 threads, {segments} segment histograms over {keys} keys: {steps} dependent "
                  f"load steps x {DEPENDENT_STEP_S * 1e6:.1f} us, 6 barrier phases, {issue * 1e6:.1f} us of "
                  f"shared-memory issue, {tiles} row tiles; +{LAUNCH_S * 1e6:.0f} us launch")


def _buckets_bytes(sh: Shape, tiles: int) -> int:
    """What a kernel reads of the bucketing: the instance order and its tile table entries."""
    return 0 if sh.identity else sh.N * 4 + tiles * 8


def _conv_forward_record(launch: dict, sh: Shape, p: dict) -> dict:
    rows = _Rows(sh)
    tile_h, tile_w = p["tile"]
    spatial = p["tiles"][0] * p["tiles"][1]
    k_depth = p["chunk"] * p["chunks"] * sh.k * sh.k
    row_tiles = rows.tiles(p["rows"])
    units = sh.P * sh.G * spatial * len(row_tiles)
    flops = 2 * sh.P * sh.G * spatial * sum(_up(r, 32) for r in row_tiles) * _up(tile_h * tile_w, 32) * k_depth
    band = min(sh.H, tile_h + sh.k - 1) / min(sh.H, tile_h) if spatial > 1 else 1.0
    bytes_ = sh.templates * band + sh.weight + sh.bias + sh.out + _buckets_bytes(sh, rows.tile_count(p["rows"]))
    seconds, basis = kernel_time(bytes_, flops, sh.dtype, _unit(launch["kernel"]), units)
    return record("conv_forward", units, bytes_, flops, seconds,
                  f"{len(row_tiles)} row tile(s) of <= {p['rows']} rows per template x {spatial} spatial tile(s) of "
                  f"{tile_h}x{tile_w}, K = {k_depth}; a template's band read once (L1/L2 serve its row tiles), "
                  f"weight, bias read and output written once; {basis}")


def _conv_backward_records(launches: list[dict], sh: Shape, p: dict) -> list[dict]:
    rows = _Rows(sh)
    tile_h, tile_w = p["tile"]
    spatial = p["tiles"][0] * p["tiles"][1]
    c_pad = _up(p["c_tile"], 16)
    taps = sh.k * sh.k
    rows_p = rows.per_template
    template_units = sh.P * sh.G * p["c_tiles"] * spatial
    in_pixels = tile_h * tile_w
    gt_flops = 2 * template_units * _up(p["c_tile"], 16) * _up(in_pixels, 64) * _up(rows_p, 16) * taps
    row_tiles = rows.tiles(p["rows"])
    gw_units = sh.P * len(row_tiles) * sh.G * p["c_tiles"]
    gw_flops = 2 * sh.P * sh.G * p["c_tiles"] * sum(_up(r, 32) for r in row_tiles) * _up(sh.HWo, 32) * c_pad * taps
    grads_out = sh.weight + sh.bias  # grad_weight, and grad_bias when the forward had a bias
    buckets = _buckets_bytes(sh, rows.tile_count(p["rows"]))
    unit = _unit(launches[0]["kernel"])
    if p.get("fused"):
        # each unit reads its template's grad_output rows for every channel tile: once from DRAM, the other
        # c_tiles - 1 times from L2 while the rows of the resident units fit
        resident = min(template_units, 2 * SMS)
        slice_ = rows_p * sh.HWo * sh.e
        rereads = (p["c_tiles"] - 1) * _l2_miss(resident * slice_) * sh.out
        bytes_ = sh.out + rereads + sh.templates + sh.weight + sh.templates + grads_out + buckets
        flops = gt_flops + gw_flops
        seconds, basis = kernel_time(bytes_, flops, sh.dtype, unit, template_units)
        return [record("conv_backward (fused)", template_units, bytes_, flops, seconds,
                       f"grad_templates, grad_weight and grad_bias in one pass; {p['c_tiles']} channel tile(s) of "
                       f"{p['c_tile']} x {spatial} spatial tile(s) per template, {rows_p} rows; {basis}")]
    records = []
    bytes_t = sh.out * p["c_tiles"] + sh.weight + sh.templates + buckets
    seconds, basis = kernel_time(bytes_t, gt_flops, sh.dtype, unit, template_units)
    records.append(record("conv_backward (grad_templates)", template_units, bytes_t, gt_flops, seconds,
                          f"{spatial} spatial tile(s) of {tile_h}x{tile_w} x {p['c_tiles']} channel tile(s) per "
                          f"template, reduction {rows_p} rows x {taps} taps; {basis}"))
    bytes_w = sh.out + sh.templates + grads_out + buckets
    seconds, basis = kernel_time(bytes_w, gw_flops, sh.dtype, unit, gw_units)
    records.append(record("conv_backward (grad_weight)", gw_units, bytes_w, gw_flops, seconds,
                          f"{len(row_tiles)} row tile(s) per template x {p['c_tiles']} channel tile(s), every "
                          f"output pixel; {basis}"))
    if len(launches) != 2:
        raise ValueError(f"expected the split backward's two launches, got {len(launches)}")
    return records


def _pointwise_record(launch: dict, sh: Shape, p: dict, pass_: int, splits_bytes: list) -> dict:
    rows = _Rows(sh)
    block_m, block_n, block_k = p["block"]
    m_tiles, n_tiles = p["tiles"]
    unit = _unit(launch["kernel"])
    row_tiles = rows.tiles(block_m)
    buckets = _buckets_bytes(sh, rows.tile_count(block_m))
    template = sh.templates // sh.P
    # a template is read by each of its row tiles; the later reads come from L2 while what the resident blocks
    # stream in between (one template per row tile) fits L2_USABLE
    rereads = (len(row_tiles) - 1) * _l2_miss(template * 2) * sh.templates
    if pass_ == 0:
        units = sh.P * len(row_tiles) * sh.G * n_tiles
        flops = 2 * sh.P * sh.G * sum(_up(r, 64) for r in row_tiles) * n_tiles * block_n * _up(sh.Cg, block_k)
        bytes_ = sh.templates + rereads + sh.weight + sh.bias + sh.out + buckets
        what = f"forward: {len(row_tiles)} row tile(s) per template x {n_tiles} pixel tiles of {block_n}"
    elif pass_ == 1:
        splits = p["splits"]
        units = sh.P * len(row_tiles) * sh.G * n_tiles * splits
        pixels = _up(-(-sh.HW // splits), block_k) * splits
        flops = 2 * sh.P * sh.G * sum(_up(r, 64) for r in row_tiles) * n_tiles * block_n * pixels
        partial = sh.N * sh.C_out * (sh.Cg + (1 if sh.bias else 0)) * (4 if splits > 1 else sh.e)
        splits_bytes.append(partial * splits if splits > 1 else 0)
        bytes_ = sh.out + sh.templates + rereads + partial * (splits if splits > 1 else 1) + buckets
        what = (f"grad_weight + grad_bias: {len(row_tiles)} row tile(s) per template x {splits} pixel ranges"
                + (" (float32 partials)" if splits > 1 else ""))
    else:
        units = sh.P * sh.G * m_tiles * n_tiles
        flops = 2 * units * block_m * block_n * _up(rows.per_template, block_k)
        bytes_ = sh.out * m_tiles + sh.weight + sh.templates + buckets
        what = f"grad_templates: {m_tiles} x {n_tiles} tiles of {block_m}x{block_n} per template"
    seconds, basis = kernel_time(bytes_, flops, sh.dtype, unit, units)
    name = {0: "pointwise forward", 1: "pointwise grad_weight", 2: "pointwise grad_templates"}[pass_]
    return record(name, units, bytes_, flops, seconds, f"{what}, block {block_m}x{block_n}x{block_k}; {basis}")


def _depthwise_record(launch: dict, sh: Shape, backward: bool) -> dict:
    chunks = -(-launch["grid"][0] // (sh.P + 1))
    units = sh.P * chunks
    macs = sh.N * sh.C_out * sh.HWo * sh.k * sh.k
    if backward:
        flops = 2 * 2 * macs
        bytes_ = sh.out + sh.templates + sh.weight + sh.templates + sh.weight + sh.bias
    else:
        flops = 2 * macs
        bytes_ = sh.templates + sh.weight + sh.bias + sh.out
    bytes_ += _buckets_bytes(sh, 0)
    seconds, basis = kernel_time(bytes_, flops, sh.dtype, "fma", units)
    what = "grad_templates, grad_weight, grad_bias" if backward else "output"
    return record(f"depthwise {'backward' if backward else 'forward'}", units, bytes_, flops, seconds,
                  f"direct FMA on whole planes in shared memory, {chunks} channel chunk(s) per template: {what}; "
                  f"{basis}")


def _sum_splits_record(launch: dict, sh: Shape, partial_bytes: int) -> dict:
    bytes_ = partial_bytes + sh.N * sh.C_out * (sh.Cg + (1 if sh.bias else 0)) * sh.e
    seconds, basis = kernel_time(bytes_, 0, sh.dtype, "fma", launch["grid"][0])
    return record("sum_splits", launch["grid"][0], bytes_, 0, seconds,
                  f"fixed-order sum of the float32 partials; {basis}")


def _part_records(launches: list[dict], sh: Shape, plans: dict, backward: bool) -> list[dict]:
    records, splits_bytes = [], []
    tile_rows = 16
    if "forward pointwise" in plans:
        tile_rows = plans["forward pointwise" if not backward else "grad_weight"]["block"][0]
    elif "forward conv" in plans:
        tile_rows = plans["backward conv" if backward else "forward conv"]["rows"]
    conv_backward = [launch for launch in launches if launch["kernel"].startswith("conv_backward_kernel")]
    for launch in launches:
        kernel = launch["kernel"]
        if kernel.startswith("bucket_kernel"):
            records.append(_bucket_record(launch, sh, tile_rows))
        elif kernel.startswith("conv_forward_kernel"):
            records.append(_conv_forward_record(launch, sh, plans["forward conv"]))
        elif kernel.startswith("conv_backward_kernel"):  # one launch (fused) or two (split): modelled together
            if launch is conv_backward[0]:
                records += _conv_backward_records(conv_backward, sh, plans["backward conv"])
        elif kernel.startswith("pointwise_kernel"):
            pass_ = int(re.search(r", (\d)>$", kernel).group(1))
            section = {0: "forward pointwise", 1: "grad_weight", 2: "grad_templates"}[pass_]
            records.append(_pointwise_record(launch, sh, plans[section], pass_, splits_bytes))
        elif kernel.startswith("sum_splits_kernel"):
            records.append(_sum_splits_record(launch, sh, splits_bytes[-1]))
        elif kernel.startswith("depthwise_"):
            records.append(_depthwise_record(launch, sh, backward))
        else:
            raise ValueError(f"no cost model for CUDA kernel {kernel}")
    return records


def plan(scenario: Scenario, mode: str, dtype: str) -> list[dict]:
    """The CUDA backend's kernel launches for one call (forward, backward, or both) as estimate records."""
    sh = Shape(scenario, dtype)
    result = recorded(scenario, dtype)
    plans = parse_plans(result["plans"])
    parts = ["forward", "backward"] if mode == "forward+backward" else [mode]
    return [r for part in parts for r in _part_records(result[part], sh, plans, part == "backward")]


def launches(scenario: Scenario, dtype: str) -> dict:
    """The recorded launches themselves (kernel, grid, threads, shared memory), for tests and --kernels."""
    return recorded(scenario, dtype)

