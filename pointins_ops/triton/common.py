"""Small pieces shared by the Triton kernels: the float32-accumulating dot, and how a program finds the instances
of its template.

Every reduction in the kernels is a chain of these dots (or a per-element loop), never a ``tl.sum`` across a
tile whose layout the autotuned ``num_warps`` decides: the order in which each output element sums its terms is
fixed by the shape alone (see plan.py).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, TF32: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in float32; float32 operands in TF32 only when TF32 is set. UPCAST widens the operands first:
    the interpreter multiplies bfloat16 as raw integers, and a bfloat16 product is exact in float32 anyway, so
    the result is what a GPU computes."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def sum_columns(g, acc, UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    """acc[:, 0] + the row sums of g ([M, BLOCK]), as a dot with a matrix whose column 0 is ones and whose other
    15 columns are zeros: the row sum is then a tensor-core (or FMA) chain over the columns in order, like every
    other reduction here, and never a warp-layout-dependent tree. Always IEEE: a TF32 grad_bias would round
    each term to 10 bits."""
    column = tl.arange(0, 16)
    ones = tl.where((column == 0)[None, :] & (tl.arange(0, BLOCK) >= 0)[:, None], 1.0, 0.0).to(g.dtype)
    return dot(g, ones, acc, False, UPCAST)


@triton.jit
def program_index(value, WIDE: tl.constexpr):
    """A program-level index in 64 bits when offsets may pass 2^31 (everything computed from it follows)."""
    if WIDE:
        value = value.to(tl.int64)
    return value


@triton.jit
def arange_from(start, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """start + arange(BLOCK), in 64 bits when WIDE."""
    offsets = tl.arange(0, BLOCK)
    if WIDE:
        offsets = offsets.to(tl.int64)
    return start + offsets


@triton.jit
def template_instances(p, start, count, IDENTITY: tl.constexpr, WIDE: tl.constexpr):
    """(first sorted position, instance count) of template p. Without an index (IDENTITY) instance p alone uses
    template p and no bucketing ran."""
    if IDENTITY:
        first = p
        n = p * 0 + 1
    else:
        first = tl.load(start + p)
        n = tl.load(count + p)
        if WIDE:
            first = first.to(tl.int64)
            n = n.to(tl.int64)
    return first, n


@triton.jit
def instances_of_rows(rows, row_mask, first, order, R, IDENTITY: tl.constexpr, WIDE: tl.constexpr):
    """The instance of each row of a template's row block (row = position among its instances * R + channel)."""
    if IDENTITY:
        instance = first + rows * 0
    else:
        instance = tl.load(order + first + rows // R, mask=row_mask, other=0)
        if WIDE:
            instance = instance.to(tl.int64)
    return instance


@triton.jit
def template_of_program(rest, G, start, count, P, R, BLOCK_M: tl.constexpr, IDENTITY: tl.constexpr,
                        WIDE: tl.constexpr):
    """(group, template p, first sorted position, instance count, p < P, rows, row blocks) of a program whose
    remaining program index is ``rest`` = p * G + group."""
    group = program_index(rest % G, WIDE)
    p = program_index(rest // G, WIDE)
    first, n_instances = template_instances(p, start, count, IDENTITY, WIDE)
    num_rows = n_instances * R
    return group, p, first, n_instances, p < P, num_rows, tl.cdiv(num_rows, BLOCK_M)


@triton.jit
def instance_block(first, slot_start, n_instances, order, BLOCK_I: tl.constexpr, IDENTITY: tl.constexpr,
                   WIDE: tl.constexpr):
    """The instances in slots [slot_start, slot_start + BLOCK_I) of a template's sorted instances, and which exist."""
    slot = slot_start + tl.arange(0, BLOCK_I)
    slot_ok = slot < n_instances
    if IDENTITY:
        instance = first + slot * 0
    else:
        instance = tl.load(order + first + slot, mask=slot_ok, other=0)
        if WIDE:
            instance = instance.to(tl.int64)
    return instance, slot_ok
