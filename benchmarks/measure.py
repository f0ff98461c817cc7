"""Timing, peak memory, the two roofline ceilings, and the check of each provider against a float64 reference.

Timing: the providers of one (scenario, dtype, mode) are timed together, interleaved: in each round every
provider runs one block of calls (at least ``min_block_s`` long), in alternating order, and each block gives one
sample (its mean time per call) — on CPU from ``time.perf_counter``, on CUDA from a pair of CUDA events around
the block. Rounds go on until ``min_rounds`` are done and the row's time budget is spent. So the load of a
shared machine, which comes and goes, hits every provider of a row alike, and a speedup can be taken round by
round: its 20th-80th percentile spread says how sure it is. Providers whose warm call is more than
``screen_factor`` times slower than the fastest reference's cannot be the baseline; they are timed alone, with a
few calls. Consecutive calls of a provider cycle through several independently drawn input sets whose total
size is at least twice the last-level cache (GPU L2, CPU L3), so a call does not find its inputs in the cache the
previous call warmed up.

Peak extra memory: on CUDA, ``torch.cuda.max_memory_allocated`` during one call minus what was allocated
before it, minus the bytes of what the call returns. On CPU, the same quantity from the allocation events
that ``torch.profiler`` (``profile_memory=True``) records for PyTorch's CPU allocator: the peak of its running
total during the call. Memory that a kernel takes outside PyTorch's allocator (oneDNN's own scratchpads,
C++ containers) is not seen on CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import sys
import time
from typing import Callable

import torch

from pointins_ops.reference import per_template_conv2d

# The verification tolerance: max |got - reference| / max |reference| over the output and each gradient,
# against a float64 reference computed from the same (already rounded) inputs. float32 results accumulate up
# to ~5e4 products (SOLOv2's grad_weight sums over 200 x 272 positions): relative error ~sqrt(K) * 2^-24,
# about 1e-5, so 1e-4 has margin but catches TF32 (2^-11 per product). Half-precision results are rounded
# once from a float32 accumulator (2^-9 / 2^-12 relative); the pure-PyTorch formulations also round
# intermediate results (gathered gradients summed in bfloat16): a few units in the last place.
VERIFY_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclasses.dataclass(frozen=True)
class TimingSettings:
    """How each (scenario, dtype, mode) is timed. ``quick``: one round of one call after the first call."""
    quick: bool = False
    min_block_s: float = 0.01      # a block repeats one provider's call for at least this long
    min_rounds: int = 7            # rounds of interleaved blocks: at least ...
    max_rounds: int = 60           # ... and at most
    row_budget_s: float = 1.0      # CPU: no new round after this long (once min_rounds are done)
    gpu_row_budget_s: float = 0.3  # CUDA: likewise
    screen_factor: float = 4.0     # providers whose warm call is this much slower than the fastest reference's ...
    screened_samples: int = 2      # ... are timed alone, with this many calls, and not interleaved
    rotate_below_s: float = 0.05   # backward mode: providers slower than this use one input set


@dataclasses.dataclass(frozen=True)
class Timing:
    times_s: list[float]           # seconds per call, one sample per round (a block's mean)
    calls_per_sample: int
    interleaved: bool = True

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def columns(self) -> dict:
        """The row columns this timing fills."""
        return dict(median_s=self.median_s, p20_s=quantile(self.times_s, 0.2), p80_s=quantile(self.times_s, 0.8),
                    samples=len(self.times_s), calls_per_sample=self.calls_per_sample,
                    timing="interleaved" if self.interleaved else "alone")


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def rotate(steps: list[Callable]) -> Callable:
    """One callable that runs ``steps`` in turn, one per call."""
    if len(steps) == 1:
        return steps[0]
    position = [0]

    def step():
        result = steps[position[0]]()
        position[0] = (position[0] + 1) % len(steps)
        return result

    return step


def first_call(step: Callable, device: torch.device) -> tuple[object, int | None, float]:
    """Runs ``step`` once: what it returned, the peak extra memory of the call (see ``peak_extra_bytes``) and its
    wall time in seconds. It is every timing's warm-up (first-call costs such as oneDNN primitive creation are
    never timed) and the call whose result is checked."""
    started = time.perf_counter()
    bytes_, result = peak_extra_bytes(step, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, bytes_, time.perf_counter() - started


def estimate_seconds(step: Callable, device: torch.device) -> float:
    """Seconds of one warm call: what decides block sizes and which providers are interleaved."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def time_interleaved(steps: dict[str, Callable], estimates: dict[str, float], device: torch.device,
                     settings: TimingSettings) -> dict[str, Timing]:
    """Seconds per call of each step, timed in rounds: every round runs one block of calls of each step, in
    alternating order, so load that comes and goes on a shared machine hits every provider alike. Sample r of
    every step comes from round r, so ratios can be taken round by round (paired)."""
    names = list(steps)
    calls = {name: 1 if settings.quick else max(1, math.ceil(settings.min_block_s / max(estimates[name], 1e-9)))
             for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    budget = settings.gpu_row_budget_s if device.type == "cuda" else settings.row_budget_s
    started = time.perf_counter()
    rounds = 0
    while True:
        order = names if rounds % 2 == 0 else names[::-1]
        if device.type == "cuda":
            events = {}
            for name in order:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(calls[name]):
                    steps[name]()
                end.record()
                events[name] = (begin, end)
            torch.cuda.synchronize()
            for name, (begin, end) in events.items():
                samples[name].append(begin.elapsed_time(end) / 1e3 / calls[name])
        else:
            for name in order:
                begin = time.perf_counter()
                for _ in range(calls[name]):
                    steps[name]()
                samples[name].append((time.perf_counter() - begin) / calls[name])
        rounds += 1
        if settings.quick or rounds >= settings.max_rounds:
            break
        if rounds >= settings.min_rounds and time.perf_counter() - started >= budget:
            break
    return {name: Timing(samples[name], calls[name]) for name in names}


def time_alone(step: Callable, device: torch.device, settings: TimingSettings) -> Timing:
    """A provider too slow to be a contender: a few calls, each its own sample."""
    samples = 1 if settings.quick else settings.screened_samples
    alone = dataclasses.replace(settings, min_rounds=samples, max_rounds=samples)
    timing = time_interleaved({"alone": step}, {"alone": math.inf}, device, alone)["alone"]
    return dataclasses.replace(timing, interleaved=False)


def paired_speedups(baseline: Timing, timing: Timing) -> list[float]:
    """Round-by-round ratios baseline / timing of two interleaved timings: the samples of a speedup."""
    return [b / t for b, t in zip(baseline.times_s, timing.times_s)]


def result_bytes(result) -> int:
    """Bytes of the distinct storages of the tensors in ``result`` (a tensor or a tuple of them)."""
    tensors = [result] if isinstance(result, torch.Tensor) else [t for t in result if t is not None]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@contextlib.contextmanager
def _quiet_native_stderr():
    """The profiler's native library prints two lines per session on fd 2; keep them off the terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(step: Callable, device: torch.device) -> tuple[int | None, object]:
    """Peak memory one call of ``step`` allocates beyond what it returns (None where it cannot be measured),
    and what it returned."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = step()
        torch.cuda.synchronize()
        return max(torch.cuda.max_memory_allocated() - before - result_bytes(result), 0), result
    with _quiet_native_stderr():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            result = step()
    try:
        tree = prof.profiler.kineto_results.experimental_event_tree()
    except (AttributeError, RuntimeError):  # the profiler's internals moved: say so rather than guess
        return None, result
    allocations = []
    stack = list(tree)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.extra_fields
        if hasattr(fields, "total_allocated") and str(fields.device) == "cpu":
            allocations.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
    if not allocations:
        return 0, result
    allocations.sort()
    _, first_size, first_total = allocations[0]
    baseline = first_total - first_size
    peak = max(total for _, _, total in allocations) - baseline
    return max(peak - result_bytes(result), 0), result


def cache_bytes(device: torch.device) -> int:
    """The last-level cache that rotating input sets must overflow: the GPU's L2, the CPU's L3 (or L2)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for level in ("index3", "index2"):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/{level}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes) if sizes else 32 << 20


def input_set_count(set_bytes: int, device: torch.device, settings: TimingSettings, limit: int = 256) -> int:
    """How many input sets to rotate through so that together they are at least twice the cache."""
    if settings.quick:
        return 1
    return int(min(max(math.ceil(2 * cache_bytes(device) / max(set_bytes, 1)), 1), limit))


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """The two roofline ceilings, measured in this run on this device."""
    copy_bytes_per_s: float          # a large device-to-device copy: bytes read + bytes written per second
    copy_size_bytes: int
    matmul_flops_per_s: dict         # dtype name -> flop/s of a large square matmul in that dtype
    matmul_size: int


def measure_ceilings(device: torch.device, dtypes: list[torch.dtype], quick: bool,
                     settings: TimingSettings) -> Ceilings:
    if device.type == "cuda":
        copy_size, matmul_size = 1 << 30, 8192
    else:
        copy_size, matmul_size = (64 << 20, 512) if quick else (256 << 20, 2048)
    source = torch.rand(copy_size // 4, device=device)
    destination = torch.empty_like(source)
    destination.copy_(source)
    copy_time = _median_seconds(lambda: destination.copy_(source), device, settings)
    del source, destination
    rates = {}
    for dtype in dtypes:
        a = torch.randn(matmul_size, matmul_size, device=device).to(dtype)
        b = torch.randn(matmul_size, matmul_size, device=device).to(dtype)
        c = torch.mm(a, b)
        rates[str(dtype).removeprefix("torch.")] = (2 * matmul_size ** 3 /
                                                    _median_seconds(lambda: torch.mm(a, b, out=c), device, settings))
        del a, b, c
    return Ceilings(2 * copy_size / copy_time, copy_size, rates, matmul_size)


def _median_seconds(step: Callable, device: torch.device, settings: TimingSettings) -> float:
    step()
    return time_interleaved({"step": step}, {"step": estimate_seconds(step, device)}, device, settings)["step"].median_s


def float64_reference(scenario, inputs, with_grads: bool):
    """(output, grad_templates, grad_weight, grad_bias) in float64 from the op's definition, one conv2d per
    template with all of its instances' kernels: it never copies a template per instance, so it fits in
    memory at every scale. The test suite checks this formulation against the per-instance oracle."""
    leaves = [None if t is None else t.detach().double().requires_grad_(with_grads)
              for t in (inputs.templates, inputs.weight, inputs.bias)]
    with torch.set_grad_enabled(with_grads):
        out = per_template_conv2d(leaves[0], leaves[1], leaves[2], inputs.index, **scenario.conv_args)
    if not with_grads:
        return (out,)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], inputs.grad_output.double())
    return (out.detach(), *grads)


def relative_error(results, reference) -> float:
    """max over tensors of max |got - reference| / max |reference|."""
    worst = 0.0
    for got, want in zip(results, reference):
        scale = want.abs().max().item() if want.numel() else 0.0
        error = (got.double() - want).abs().max().item() if want.numel() else 0.0
        if not math.isfinite(error):
            return math.inf
        worst = max(worst, error / scale if scale > 0 else error)
    return worst


def describe_timing(device: torch.device, settings: TimingSettings) -> str:
    if settings.quick:
        return "one call of each provider after its first call (quick mode)"
    clock = "CUDA events around each block" if device.type == "cuda" else (
        f"time.perf_counter around each block, {torch.get_num_threads()} thread(s)")
    budget = settings.gpu_row_budget_s if device.type == "cuda" else settings.row_budget_s
    return (f"providers of a row interleaved: rounds of one block (>= {settings.min_block_s * 1e3:g} ms) per provider "
            f"in alternating order, {settings.min_rounds} to {settings.max_rounds} rounds (until {budget:g} s), one "
            f"sample per block; {clock}; providers > {settings.screen_factor:g}x slower than the fastest reference "
            f"timed alone ({settings.screened_samples} calls); speedup spread = 20th-80th percentile of round-by-round "
            "ratios; consecutive calls rotate through random input sets totalling at least twice the "
            f"{cache_bytes(device) >> 20} MiB last-level cache (backward: only providers faster than "
            f"{settings.rotate_below_s * 1e3:g} ms)")


def describe_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during one call, minus memory allocated before it and the results"
    return ("peak of PyTorch's CPU allocator during one call (torch.profiler allocation events), minus the "
            "results; allocations outside PyTorch's allocator (e.g. oneDNN scratchpads) are not seen")
