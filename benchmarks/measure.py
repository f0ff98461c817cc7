"""Timing, peak memory, the two roofline ceilings, and the check of each provider against a float64 reference.

Timing: on CUDA, one pair of CUDA events around each call after a warm-up; on CPU,
``torch.utils.benchmark.Timer`` (``adaptive_autorange``; ``blocked_autorange`` with no minimum time in quick
mode) at the thread count the run reports. On both, consecutive calls cycle through several independently
drawn input sets whose total size is at least twice the last-level cache (GPU L2, CPU L3), so a call does
not find its inputs in the cache the previous call warmed up.

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
import torch.utils.benchmark as torch_benchmark

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
    """How long to time each (provider, mode). ``quick``: one timed repetition after one warm-up call."""
    quick: bool = False
    min_run_time_s: float = 0.1    # CPU: adaptive_autorange runs at least this long ...
    max_run_time_s: float = 0.5    # ... and stops after this long (at least 4 samples unless this is reached)
    iqr_threshold: float = 0.1     # ... and stops once IQR / median is below this
    gpu_run_time_s: float = 0.2    # CUDA: samples to fill this time, within the bounds below
    gpu_min_samples: int = 10
    gpu_max_samples: int = 500
    gpu_max_run_time_s: float = 2.0  # CUDA: slow calls get fewer samples (at least 3)
    rotate_below_s: float = 0.05   # backward mode: providers slower than this use one input set


@dataclasses.dataclass(frozen=True)
class Timing:
    times_s: list[float]           # seconds per call, one entry per sample
    calls_per_sample: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def columns(self) -> dict:
        """The row columns this timing fills."""
        return dict(median_s=self.median_s, p20_s=self.quantile_s(0.2), p80_s=self.quantile_s(0.8),
                    samples=len(self.times_s), calls_per_sample=self.calls_per_sample)

    def quantile_s(self, q: float) -> float:
        """Linear interpolation between order statistics (numpy's default)."""
        ordered = sorted(self.times_s)
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


def time_call(step: Callable, device: torch.device, settings: TimingSettings,
              on_first_call: Callable | None = None) -> tuple[Timing, int | None]:
    """Seconds per call of ``step``, and the peak extra memory of one call (see ``peak_extra_bytes``).

    Both timers call ``step`` before they time it (the Timer to choose its block size, the CUDA path as a
    warm-up), so first-call costs such as oneDNN primitive creation are not timed. That first call is the
    one whose memory is measured, and ``on_first_call(result, seconds)`` sees what it returned before any
    call is timed (it may raise to stop the timing): no call is spent on memory or on checking alone.
    """
    peak = []

    def step_measuring_the_first_call():
        if peak:
            step()
            return
        started = time.perf_counter()
        bytes_, result = peak_extra_bytes(step, device)
        seconds = time.perf_counter() - started
        peak.append(bytes_)
        if on_first_call is not None:
            on_first_call(result, seconds)

    if device.type == "cuda":
        return _time_cuda(step, step_measuring_the_first_call, settings), peak[0]
    timer = torch_benchmark.Timer(stmt="step()", globals={"step": step_measuring_the_first_call},
                                  num_threads=torch.get_num_threads())
    if settings.quick:
        measurement = timer.blocked_autorange(min_run_time=0.0)
    else:
        measurement = timer.adaptive_autorange(threshold=settings.iqr_threshold,
                                               min_run_time=settings.min_run_time_s,
                                               max_run_time=settings.max_run_time_s)
    return Timing(list(measurement.times), measurement.number_per_run), peak[0]


def _time_cuda(step: Callable, first_call: Callable, settings: TimingSettings) -> Timing:
    def timed(count: int) -> list[float]:
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
        for start, end in pairs:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in pairs]

    first_call()
    if settings.quick:
        return Timing(timed(1), 1)
    estimate = timed(1)[0]
    if estimate < 0.05:  # fast: a few more warm-up calls make a better estimate
        estimate = statistics.median(timed(5))
    count = min(max(settings.gpu_run_time_s / max(estimate, 1e-7), settings.gpu_min_samples),
                settings.gpu_max_samples, max(3, settings.gpu_max_run_time_s / estimate))
    return Timing(timed(int(count)), 1)


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
    copy_time = time_call(lambda: destination.copy_(source), device, settings)[0].median_s
    del source, destination
    rates = {}
    for dtype in dtypes:
        a = torch.randn(matmul_size, matmul_size, device=device).to(dtype)
        b = torch.randn(matmul_size, matmul_size, device=device).to(dtype)
        c = torch.mm(a, b)
        rates[str(dtype).removeprefix("torch.")] = (2 * matmul_size ** 3 /
                                                    time_call(lambda: torch.mm(a, b, out=c), device, settings)[0].median_s)
        del a, b, c
    return Ceilings(2 * copy_size / copy_time, copy_size, rates, matmul_size)


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
    if device.type == "cuda":
        how = ("CUDA events around each call, after warm-up calls; samples filling "
               f"{settings.gpu_run_time_s} s ({settings.gpu_min_samples} to {settings.gpu_max_samples}, at least 3 "
               f"within {settings.gpu_max_run_time_s} s)" if not settings.quick else
               "CUDA events, one call after one warm-up call")
    elif settings.quick:
        how = ("torch.utils.benchmark.Timer.blocked_autorange(min_run_time=0): one timed call after one warm-up "
               f"call, {torch.get_num_threads()} thread(s)")
    else:
        how = (f"torch.utils.benchmark.Timer.adaptive_autorange(threshold={settings.iqr_threshold}, "
               f"min_run_time={settings.min_run_time_s}, max_run_time={settings.max_run_time_s}) at "
               f"{torch.get_num_threads()} thread(s), its block-size estimate being the warm-up; quantiles over "
               "its blocks")
    if settings.quick:
        return how
    return how + ("; consecutive calls rotate through random input sets totalling at least twice the "
                  f"{cache_bytes(device) >> 20} MiB last-level cache (backward: only providers faster than "
                  f"{settings.rotate_below_s * 1e3:g} ms)")


def describe_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during one call, minus memory allocated before it and the results"
    return ("peak of PyTorch's CPU allocator during one call (torch.profiler allocation events), minus the "
            "results; allocations outside PyTorch's allocator (e.g. oneDNN scratchpads) are not seen")
