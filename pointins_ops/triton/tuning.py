"""Choosing among a launch's autotuning candidates, without ever benchmarking where that is unsafe.

Triton's own ``triton.autotune`` benchmarks the first time it sees a key, wherever that happens. A key first seen
while a CUDA graph is being captured would then run and synchronise inside the capture. Here a launch runs:

* the candidate tuned earlier for its key, if any (tuned in eager mode, e.g. during a warm-up before capture);
* otherwise, while a CUDA graph is being captured, under torch.compile / fake-tensor tracing, in the Triton
  interpreter or with ``AUTOTUNE`` off: the launch's default candidate (the first), and nothing is benchmarked
  or remembered;
* otherwise every candidate is timed once (``triton.testing.do_bench``) and the fastest is remembered for the key.

Any candidate gives the same bits (plan.py says why; tests/test_triton.py runs each one and compares), so the
choice only ever changes speed.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tests that sweep hundreds of shapes switch autotuning off; the interpreter never autotunes.
AUTOTUNE = not INTERPRET

_tuned: dict = {}
benchmarks_run = 0  # how many candidates have been timed in this process (tests read it)


def may_benchmark(tensor: torch.Tensor) -> bool:
    """Whether timing launches on ``tensor``'s device is safe now: a real CUDA tensor, outside CUDA-graph capture
    and outside torch.compile / fake-tensor tracing."""
    from torch._subclasses.fake_tensor import is_fake

    if INTERPRET or not tensor.is_cuda or is_fake(tensor) or torch.compiler.is_compiling():
        return False
    return not torch.cuda.is_current_stream_capturing()


def choose(key, candidates: list, run, tensor: torch.Tensor):
    """The candidate to launch for ``key``; ``run(config)`` launches one (used to time it)."""
    if len(candidates) == 1:
        return candidates[0]
    chosen = _tuned.get(key)
    if chosen is not None:
        return chosen
    if not AUTOTUNE or not may_benchmark(tensor):
        return candidates[0]
    return _benchmark(key, candidates, run)


def _benchmark(key, candidates, run):
    global benchmarks_run
    import triton.testing

    times = []
    for config in candidates:
        benchmarks_run += 1
        times.append(triton.testing.do_bench(lambda: run(config), warmup=5, rep=20))
    chosen = candidates[min(range(len(candidates)), key=times.__getitem__)]
    _tuned[key] = chosen
    return chosen


def clear() -> None:
    """Forget every tuned choice."""
    _tuned.clear()
