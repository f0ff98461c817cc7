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

One launch, many programs: program t owns a few templates and scans all index values (they stay in L2). A
single-program bitonic sort was the first design; compiled for sm_90 it is ~13,700 instructions per thread
for 4096 instances (8 warps on 4 schedulers: ~14 us), longer than the forward kernel it feeds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Bucketing reads every index value once per program, so its work grows as N x P: beyond this many (index value,
# template) pairs torch's sort does it instead (it costs several launches, but its work grows as N log N).
MAX_KERNEL_PAIRS = 1 << 26
# [templates, index values] compared per step: 32 int32 per thread at 4 warps.
TILE = 4096


@triton.jit
def _keys(index, i, N, P):
    """Template of instances i; P (the sentinel) where the index is out of range, -1 past the end."""
    ok = i < N
    key = tl.load(index + i, mask=ok, other=0)
    key = tl.where((key >= 0) & (key < P), key, P).to(tl.int32)
    return tl.where(ok, key, -1)


@triton.jit
def bucket_kernel(index, order, start, count, N, P, BLOCK_T: tl.constexpr, CHUNK: tl.constexpr):
    """Program t builds the buckets of templates [t * BLOCK_T, (t + 1) * BLOCK_T) (template P is the sentinel).

    Two passes over the index values, in instance order: the first counts the program's templates and the
    instances of every smaller template (where the program's buckets start); the second gives each instance of
    the program's templates its rank among its template's instances (a running count: the sort is stable) and
    writes it to order[start + rank]. Every sum is an integer sum, exact in any order."""
    first_template = tl.program_id(0) * BLOCK_T
    templates = first_template + tl.arange(0, BLOCK_T)
    i_range = tl.arange(0, CHUNK)
    counts = tl.zeros((BLOCK_T,), dtype=tl.int32)
    before = tl.zeros((CHUNK,), dtype=tl.int32)
    for chunk_start in range(0, N, CHUNK):
        key = _keys(index, chunk_start + i_range, N, P)
        counts += tl.sum((key[None, :] == templates[:, None]).to(tl.int32), axis=1)
        before += ((key >= 0) & (key < first_template)).to(tl.int32)
    starts = tl.sum(before, axis=0) + tl.cumsum(counts, 0) - counts
    ok = templates <= P
    tl.store(start + templates, tl.where(counts > 0, starts, 0), mask=ok)
    tl.store(count + templates, counts, mask=ok)

    seen = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for chunk_start in range(0, N, CHUNK):
        i = chunk_start + i_range
        hit = (_keys(index, i, N, P)[None, :] == templates[:, None]).to(tl.int32)  # [BLOCK_T, CHUNK]
        rank = tl.cumsum(hit, 1) - hit + seen[:, None]
        position = tl.sum(hit * (starts[:, None] + rank), axis=0)  # the one template an instance hits, if any
        tl.store(order + position, i, mask=tl.sum(hit, axis=0) > 0)
        seen += tl.sum(hit, axis=1)


def templates_per_program(P: int) -> int:
    """BLOCK_T: one template per program up to 2048 programs (they all fit on the GPU at once and hide each
    other's load latency; each compares a whole CHUNK of index values at once), more beyond, at most 16."""
    return max(1, min(16, 1 << max(-(-(P + 1) // 2048) - 1, 0).bit_length()))


def chunk(block_t: int) -> int:
    """CHUNK: index values per step, so that a step compares TILE (template, index value) pairs."""
    return TILE // block_t


def sort_by_template_with_torch(index: torch.Tensor, P: int):
    """The same three tensors from torch ops (a stable sort): for N x P beyond MAX_KERNEL_PAIRS, and the
    reference the kernel is tested against."""
    keys = index.long()
    keys = torch.where((keys >= 0) & (keys < P), keys, P)
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.searchsorted(sorted_keys, torch.arange(P + 2, device=index.device))
    count = (bounds[1:] - bounds[:-1]).to(torch.int32)
    start = torch.where(count > 0, bounds[:-1], 0).to(torch.int32)
    return order.to(torch.int32), start, count
