"""Bucketing: the instances sorted by template, in one small kernel.

Every kernel of the op is template-major: a program works on one template's instances. It finds them through
three int32 tensors that this module builds on the device (no host sync, so CUDA graphs capture it):

* ``order[i]``: the instances sorted stably by template (ties keep their instance order, so every sum over a
  template's instances has one fixed order);
* ``start[p]``, ``count[p]``: template p's instances are ``order[start[p] : start[p] + count[p]]``, for p in
  [0, P]. Template P is a sentinel that holds the instances whose index is out of range, so no kernel ever
  dereferences such an index; their outputs become NaN. ``start[p]`` is 0 where ``count[p]`` is 0.

The grids are sized from shapes alone (templates x groups x pixel tiles x splits), so no tile table is needed:
a program reads its template's count and loops over that template's row tiles. Without an index nothing is
built: instance p uses template p, and the kernels know it from a constexpr.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# One program sorts everything in registers: up to 8192 instances compile for sm_90 without spills (16 warps).
# Larger batches use torch's sort (see sort_by_template_with_torch). On a GPU, sorting fewer than 1024 costs
# about as much, and one size for small batches keeps torch.compile from recompiling as the instance count
# changes; the interpreter runs the sort one bitonic stage at a time in Python, so it sorts no more than needed.
MAX_KERNEL_INSTANCES = 8192
MIN_SORT_BLOCK = 16 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 1024


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def bucket_kernel(index, order, start, count, N, P, NB: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program: order, start and count (see the module docstring) for N <= NB instances."""
    i = tl.arange(0, NB)
    valid = i < N
    key = tl.load(index + i, mask=valid, other=0).to(tl.int64)
    key = tl.where((key >= 0) & (key < P), key, P)  # out of range: the sentinel template P
    key = tl.where(valid, key, P + 1)  # the padding sorts after everything
    # Sorting (template, instance) pairs packed into one integer makes the sort stable.
    packed = tl.sort(key * NB + i)
    sorted_key = packed // NB
    tl.store(order + i, (packed % NB).to(tl.int32), mask=valid)
    previous_key = tl.gather(sorted_key, tl.maximum(i - 1, 0), 0)
    next_key = tl.gather(sorted_key, tl.minimum(i + 1, NB - 1), 0)
    first_of_template = (i == 0) | (previous_key != sorted_key)
    last_of_template = (i == NB - 1) | (next_key != sorted_key)
    first_position = tl.associative_scan(tl.where(first_of_template, i, 0), 0, _maximum)

    for p_start in range(0, P + 1, BLOCK_P):
        p = p_start + tl.arange(0, BLOCK_P)
        tl.store(start + p, tl.zeros((BLOCK_P,), tl.int32), mask=p <= P)
        tl.store(count + p, tl.zeros((BLOCK_P,), tl.int32), mask=p <= P)
    tl.debug_barrier()  # the zeros above land before the stores below (one program: a block-wide barrier)
    used = sorted_key <= P
    tl.store(start + sorted_key, i.to(tl.int32), mask=first_of_template & used)
    tl.store(count + sorted_key, (i - first_position + 1).to(tl.int32), mask=last_of_template & used)


def sort_block(N: int) -> int:
    """NB, the sort size for N instances (a power of 2, at least MIN_SORT_BLOCK)."""
    return max(MIN_SORT_BLOCK, triton.next_power_of_2(max(N, 1)))


def bucket_warps(NB: int) -> int:
    return 4 if NB <= 1024 else 8 if NB <= 4096 else 16


def sort_by_template_with_torch(index: torch.Tensor, P: int):
    """The same three tensors from torch ops (stable sort, bincount-free counting): for batches too large for
    one program, and the reference the kernel is tested against."""
    keys = index.long()
    keys = torch.where((keys >= 0) & (keys < P), keys, P)
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.searchsorted(sorted_keys, torch.arange(P + 2, device=index.device))
    count = (bounds[1:] - bounds[:-1]).to(torch.int32)
    start = torch.where(count > 0, bounds[:-1], 0).to(torch.int32)
    return order.to(torch.int32), start, count
