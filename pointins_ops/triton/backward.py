"""Backward kernels: grad_templates, grad_weight and grad_bias.

``backward_gemm_kernel`` computes, for one (template p, group, chunk of input channels):

* grad_templates (DO_GT), per tile of template pixels: acc[pixels, channels] = sum over p's row blocks and the
  kernel taps of grad_out[rows, the output pixel each template pixel feeds through the tap]^T @ weight[rows,
  channels, tap]. One program sums all of p's instances (instances sorted by template): no atomics, one order.
* grad_weight and grad_bias (DO_GW), per row block: acc[rows, channels] = grad_out[rows, pixels] @
  im2col(template)[pixels, channels] for each tap, summed over the pixels of the program's split; grad_bias
  is the same sum against a column of ones (common.sum_columns). With several splits each split writes
  float32 partials and ``sum_partials_kernel`` adds them in split order; with one split the program writes
  the result.

Where output pixel i and template pixel i are the same place (unit stride, 'same' padding: every benchmark
scenario) one launch does both on each split of the pixels (DO_GT and DO_GW): grad_out comes from DRAM once and
its second read (for grad_templates) from L1/L2; otherwise grad_templates and grad_weight are two launches with
their own tiling.
``backward_direct_kernel`` is the depthwise / small-group counterpart of ``forward_direct_kernel``.

Summation orders are fixed by the shape: the reduction chunks (BLOCK_M rows for grad_templates, BLOCK_PO pixels
and the split length for grad_weight) are chosen in plan.py from the shape, never autotuned.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (arange_from, dot, instance_block, instances_of_rows, program_index, sum_columns,
                     template_instances, template_of_program)


@triton.jit
def _row_block(row_tile, num_rows, first, order, R, group, BLOCK_M: tl.constexpr, IDENTITY: tl.constexpr,
               WIDE: tl.constexpr):
    rows = arange_from(row_tile * BLOCK_M, BLOCK_M, WIDE)
    row_ok = rows < num_rows
    instance = instances_of_rows(rows, row_ok, first, order, R, IDENTITY, WIDE)
    return row_ok, instance, group * R + rows % R


@triton.jit
def _output_pixels_of(h, w, hw_ok, kh, kw, H_out, W_out, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                      UNIT_STRIDE: tl.constexpr, NO_BOUNDS: tl.constexpr):
    """The output pixel (oh, ow) that reads template pixel (h, w) through tap (kh, kw), and whether it exists:
    h = oh * stride_h - pad_h + kh * dil_h, and likewise for w."""
    oh = h + pad_h - kh * dil_h
    ow = w + pad_w - kw * dil_w
    if NO_BOUNDS and UNIT_STRIDE:  # a 1x1 kernel, no padding, unit stride: pixel (h, w) is output pixel (h, w)
        return oh, ow, hw_ok
    ok = hw_ok & (oh >= 0) & (ow >= 0)
    if not UNIT_STRIDE:
        ok = ok & (oh % stride_h == 0) & (ow % stride_w == 0)
        oh = oh // stride_h
        ow = ow // stride_w
    return oh, ow, ok & (oh < H_out) & (ow < W_out)


@triton.jit
def _template_pixels_of(po, po_ok, kh, kw, H, W, W_out, st_h, st_w, stride_h, stride_w, pad_h, pad_w, dil_h,
                        dil_w, CONTIGUOUS: tl.constexpr, NO_BOUNDS: tl.constexpr):
    """Offsets (within a channel) of the template pixels that output pixels po read through tap (kh, kw)."""
    oh = po // W_out
    ow = po % W_out
    ih = oh * stride_h - pad_h + kh * dil_h
    iw = ow * stride_w - pad_w + kw * dil_w
    if NO_BOUNDS:
        ok = po_ok
    else:
        ok = po_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    if CONTIGUOUS and NO_BOUNDS:
        return po, ok, oh, ow
    if CONTIGUOUS:
        return po + (kh - pad_h) * W + (kw - pad_w), ok, oh, ow
    return ih * st_h + iw * st_w, ok, oh, ow


@triton.jit
def _grad_weight_sum(grad_rows, row_ok, template_base, template_ok, ci_offsets, ci_ok, px_start, px_end,
                     out_pixels, kh, kw,
                     H, W, W_out, sg_h, sg_w, st_h, st_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                     TF32: tl.constexpr, UPCAST: tl.constexpr, WITH_BIAS: tl.constexpr, CONTIGUOUS: tl.constexpr,
                     GRAD_CONTIGUOUS: tl.constexpr, NO_BOUNDS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_PO: tl.constexpr, WIDE: tl.constexpr):
    """sum over output pixels [px_start, px_end) of grad_out[rows, px] * template[channels, px through the tap],
    in chunks of BLOCK_PO pixels, in order; and (WITH_BIAS) the row sums of grad_out over the same pixels."""
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc_bias = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
    for chunk_start in range(px_start, tl.minimum(px_end, out_pixels), BLOCK_PO):
        po = arange_from(chunk_start, BLOCK_PO, WIDE)
        po = tl.max_contiguous(tl.multiple_of(po, BLOCK_PO), BLOCK_PO)
        po_ok = (po < out_pixels) & (po < px_end)  # (two tests whose alignment the compiler can see)
        pixel_offsets, pixel_ok, oh, ow = _template_pixels_of(po, po_ok, kh, kw, H, W, W_out, st_h, st_w, stride_h,
                                                              stride_w, pad_h, pad_w, dil_h, dil_w, CONTIGUOUS,
                                                              NO_BOUNDS)
        if GRAD_CONTIGUOUS:
            g_pixels = po
        else:
            g_pixels = oh * sg_h + ow * sg_w
        g = tl.load(grad_rows[:, None] + g_pixels[None, :], mask=row_ok[:, None] & po_ok[None, :], other=0.0)
        t = tl.load(template_base + ci_offsets[None, :] + pixel_offsets[:, None],
                    mask=(pixel_ok & template_ok)[:, None] & ci_ok[None, :], other=0.0)
        acc = dot(g, t, acc, TF32, UPCAST)
        if WITH_BIAS:
            acc_bias = sum_columns(g, acc_bias, UPCAST, BLOCK_PO)
    return acc, acc_bias


@triton.jit
def _store_grad_weight(gw_dest, gb_dest, acc, acc_bias, instance, channel, row_ok, ci, ci_ok, tap, template_ok,
                       C_out, Cg, split, M_w, M_b, STORE_BIAS: tl.constexpr, kH: tl.constexpr, kW: tl.constexpr):
    """grad_weight[instance, channel, ci, tap] (and grad_bias[instance, channel]) of one split, at split * M in the
    destination (a float32 partial buffer, or the result itself when there is one split)."""
    acc = tl.where(template_ok, acc, float("nan"))  # an out-of-range index has no template to differentiate by
    row_offsets = (instance * C_out + channel) * (Cg * kH * kW)
    tl.store(gw_dest + split * M_w + row_offsets[:, None] + (ci * (kH * kW) + tap)[None, :],
             acc.to(gw_dest.dtype.element_ty), mask=row_ok[:, None] & ci_ok[None, :])
    if STORE_BIAS:
        column = tl.arange(0, 16)
        tl.store(gb_dest + split * M_b + (instance * C_out + channel)[:, None] + column[None, :],
                 acc_bias.to(gb_dest.dtype.element_ty), mask=row_ok[:, None] & (column == 0)[None, :])


@triton.jit
def backward_gemm_kernel(
        grad_out, templates, weight, grad_templates, gw_dest, gb_dest, order, start, count,
        P, G, C_in, C_out, R, Cg, H, W, H_out, W_out, pixels_div, out_pixels_div, num_c_chunks, num_px_tiles,
        row_splits, split_len_div, gt_len_div, M_w, M_b, sg_n, sg_c, sg_h, sg_w, st_p, st_c, st_h, st_w, sw_n, sw_o, sw_c, sw_h, sw_w,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        kH: tl.constexpr, kW: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr, WIDE: tl.constexpr,
        IDENTITY: tl.constexpr, DO_GT: tl.constexpr, DO_GW: tl.constexpr, UNIT_STRIDE: tl.constexpr,
        CONTIGUOUS: tl.constexpr, GRAD_CONTIGUOUS: tl.constexpr, NO_BOUNDS: tl.constexpr, ALIGN: tl.constexpr,
        GRAD_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_PI: tl.constexpr,
        BLOCK_PO: tl.constexpr):
    pid = tl.program_id(0)
    tile = pid % num_px_tiles  # a tile of template pixels (DO_GT) or a split of output pixels (DO_GW)
    rest = pid // num_px_tiles
    split = rest % row_splits
    rest = rest // row_splits
    c_chunk = rest % num_c_chunks
    group, p, first, _, template_ok, num_rows, num_row_tiles = template_of_program(
        rest // num_c_chunks, G, start, count, P, R, BLOCK_M, IDENTITY, WIDE)
    ci = arange_from(c_chunk * BLOCK_C, BLOCK_C, WIDE)
    ci_ok = ci < Cg
    template_base = templates + tl.where(template_ok, p, 0) * st_p + group * Cg * st_c
    t_channel_offsets = tl.multiple_of(ci * st_c, ALIGN)
    # Pixel counts with the alignment the host proved (H * W, H_out * W_out, the split and tile lengths).
    HW = pixels_div * ALIGN
    out_pixels = out_pixels_div * ALIGN
    split_len = split_len_div * ALIGN
    gt_len = gt_len_div * ALIGN

    if DO_GW:
        px_start = tile * split_len
        px_end = px_start + split_len
        for row_tile in range(split, num_row_tiles, row_splits):
            row_ok, instance, channel = _row_block(row_tile, num_rows, first, order, R, group, BLOCK_M, IDENTITY,
                                                   WIDE)
            grad_rows = grad_out + instance * sg_n + channel * sg_c
            for tap in range(0, kH * kW):
                kh = tap // kW
                kw = tap % kW
                # grad_bias along the first tap's sum (GRAD_BIAS False: the branch folds away at compile time)
                if (c_chunk == 0) & (tap == 0) & GRAD_BIAS:
                    acc, acc_bias = _grad_weight_sum(
                        grad_rows, row_ok, template_base, template_ok, t_channel_offsets, ci_ok, px_start, px_end,
                        out_pixels, kh, kw, H, W, W_out, sg_h, sg_w, st_h, st_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                        TF32, UPCAST, True, CONTIGUOUS, GRAD_CONTIGUOUS, NO_BOUNDS, BLOCK_M, BLOCK_C, BLOCK_PO, WIDE)
                    _store_grad_weight(gw_dest, gb_dest, acc, acc_bias, instance, channel, row_ok, ci, ci_ok, tap,
                                       template_ok, C_out, Cg, tile, M_w, M_b, True, kH, kW)
                else:
                    acc, acc_bias = _grad_weight_sum(
                        grad_rows, row_ok, template_base, template_ok, t_channel_offsets, ci_ok, px_start, px_end,
                        out_pixels, kh, kw, H, W, W_out, sg_h, sg_w, st_h, st_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                        TF32, UPCAST, False, CONTIGUOUS, GRAD_CONTIGUOUS, NO_BOUNDS, BLOCK_M, BLOCK_C, BLOCK_PO, WIDE)
                    _store_grad_weight(gw_dest, gb_dest, acc, acc_bias, instance, channel, row_ok, ci, ci_ok, tap,
                                       template_ok, C_out, Cg, tile, M_w, M_b, False, kH, kW)

    if DO_GT:
        if not IDENTITY:
            num_row_tiles = tl.where(template_ok, num_row_tiles, 0)  # the sentinel template has no gradient
        hw_end = (tile + 1) * gt_len
        for hw_start in range(tile * gt_len, tl.minimum(hw_end, HW), BLOCK_PI):
            hw = arange_from(hw_start, BLOCK_PI, WIDE)
            hw = tl.max_contiguous(tl.multiple_of(hw, BLOCK_PI), BLOCK_PI)
            hw_ok = (hw < HW) & (hw < hw_end)
            h = hw // W
            w = hw % W
            acc_t = tl.zeros((BLOCK_PI, BLOCK_C), dtype=tl.float32)
            # One loop over (row block, tap) so that Triton pipelines its loads.
            for step in range(0, num_row_tiles * (kH * kW)):
                row_tile = step // (kH * kW)
                tap = step % (kH * kW)
                kh = tap // kW
                kw = tap % kW
                row_ok, instance, channel = _row_block(row_tile, num_rows, first, order, R, group, BLOCK_M,
                                                       IDENTITY, WIDE)
                oh, ow, pixel_ok = _output_pixels_of(h, w, hw_ok, kh, kw, H_out, W_out, stride_h, stride_w, pad_h,
                                                     pad_w, dil_h, dil_w, UNIT_STRIDE, NO_BOUNDS)
                if GRAD_CONTIGUOUS and CONTIGUOUS and NO_BOUNDS:
                    g_pixels = hw
                elif GRAD_CONTIGUOUS and CONTIGUOUS:  # the tap shifts the flat pixel index of grad_out too
                    g_pixels = hw + (pad_h - kh) * W_out + (pad_w - kw)
                else:
                    g_pixels = oh * sg_h + ow * sg_w
                g = tl.load(grad_out + (instance * sg_n + channel * sg_c)[None, :] + g_pixels[:, None],
                            mask=pixel_ok[:, None] & row_ok[None, :], other=0.0)
                wt = tl.load(weight + (instance * sw_n + channel * sw_o)[:, None] + (ci * sw_c)[None, :]
                             + (kh * sw_h + kw * sw_w), mask=row_ok[:, None] & ci_ok[None, :], other=0.0)
                acc_t = dot(g, wt, acc_t, TF32, UPCAST)
            offsets = tl.multiple_of((p * C_in + group * Cg + ci) * HW, ALIGN)[None, :] + hw[:, None]
            tl.store(grad_templates + offsets, acc_t.to(grad_templates.dtype.element_ty),
                     mask=(hw_ok[:, None] & ci_ok[None, :]) & template_ok)


@triton.jit
def _sum_partials(partials, out, M, S, block, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    m = arange_from(block * BLOCK, BLOCK, WIDE)
    ok = m < M
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(partials + s * M + m, mask=ok, other=0.0)
    tl.store(out + m, acc.to(out.dtype.element_ty), mask=ok)


@triton.jit
def sum_partials_kernel(partial_w, out_w, M_w, partial_b, out_b, M_b, S, num_w_blocks,
                        BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """out[m] = partial[0, m] + partial[1, m] + ... + partial[S - 1, m], in that order, for grad_weight (the
    first num_w_blocks programs) and grad_bias (the others)."""
    pid = program_index(tl.program_id(0), WIDE)
    if pid < num_w_blocks:
        _sum_partials(partial_w, out_w, M_w, S, pid, BLOCK, WIDE)
    else:
        _sum_partials(partial_b, out_b, M_b, S, pid - num_w_blocks, BLOCK, WIDE)


@triton.jit
def backward_direct_kernel(
        grad_out, templates, weight, grad_templates, gw_dest, gb_dest, order, start, count,
        P, G, C_in, C_out, R, Cg, H, W, H_out, W_out, pixels_div, out_pixels_div, num_group_tiles, num_px_tiles,
        num_out_tiles, num_in_tiles, M_w, M_b,
        sg_n, sg_c, sg_h, sg_w, st_p, st_c, st_h, st_w, sw_n, sw_o, sw_c, sw_h, sw_w,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        kH: tl.constexpr, kW: tl.constexpr, WIDE: tl.constexpr, IDENTITY: tl.constexpr,
        UNIT_STRIDE: tl.constexpr, CONTIGUOUS: tl.constexpr, NO_BOUNDS: tl.constexpr, ALIGN: tl.constexpr,
        GRAD_BIAS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_PI: tl.constexpr,
        BLOCK_PO: tl.constexpr):
    """Depthwise / small groups, for one (template, tile of BLOCK_G groups, pixel tile): grad_weight and grad_bias
    over the tile's output pixels (a split: float32 partials when there are several), grad_templates over its
    template pixels. The sums over pixels (grad_weight, grad_bias) and over a block of instances (grad_templates)
    are tl.sum over tiles whose layout this kernel's fixed config decides: it is never autotuned."""
    pid = tl.program_id(0)
    tile = pid % num_px_tiles
    rest = pid // num_px_tiles
    group_tile = rest % num_group_tiles
    p = program_index(rest // num_group_tiles, WIDE)
    first, n_instances = template_instances(p, start, count, IDENTITY, WIDE)
    template_ok = p < P
    groups = arange_from(group_tile * BLOCK_G, BLOCK_G, WIDE)
    group_ok = groups < G
    template_base = templates + tl.where(template_ok, p, 0) * st_p

    if tile < num_out_tiles:
        po = arange_from(tile * BLOCK_PO, BLOCK_PO, WIDE)
        po = tl.max_contiguous(tl.multiple_of(po, BLOCK_PO), BLOCK_PO)
        po_ok = po < out_pixels_div * ALIGN
        oh = po // W_out
        ow = po % W_out
        for instance_start in range(0, n_instances, BLOCK_I):
            instance, slot_ok = instance_block(first, instance_start, n_instances, order, BLOCK_I, IDENTITY, WIDE)
            row_ok = slot_ok[:, None] & group_ok[None, :]
            for r in range(0, R):
                channel = groups * R + r
                rows = instance[:, None] * C_out + channel[None, :]
                g = tl.load(grad_out + (instance[:, None] * sg_n + channel[None, :] * sg_c)[:, :, None]
                            + (oh * sg_h + ow * sg_w)[None, None, :],
                            mask=row_ok[:, :, None] & po_ok[None, None, :], other=0.0).to(tl.float32)
                if GRAD_BIAS:
                    tl.store(gb_dest + tile * M_b + rows, tl.sum(g, axis=2).to(gb_dest.dtype.element_ty),
                             mask=row_ok)
                for step in range(0, Cg * kH * kW):
                    ci = step // (kH * kW)
                    tap = step % (kH * kW)
                    kh = tap // kW
                    kw = tap % kW
                    pixel_offsets, pixel_ok, _, _ = _template_pixels_of(
                        po, po_ok, kh, kw, H, W, W_out, st_h, st_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                        CONTIGUOUS, NO_BOUNDS)
                    t = tl.load(template_base + tl.multiple_of((groups * Cg + ci) * st_c, ALIGN)[:, None]
                                + pixel_offsets[None, :], mask=group_ok[:, None] & (pixel_ok & template_ok)[None, :],
                                other=0.0).to(tl.float32)
                    gw = tl.sum(g * t[None, :, :], axis=2)
                    gw = tl.where(template_ok, gw, float("nan"))
                    tl.store(gw_dest + tile * M_w + rows * (Cg * kH * kW) + step, gw.to(gw_dest.dtype.element_ty),
                             mask=row_ok)

    if (tile < num_in_tiles) & template_ok:
        hw = arange_from(tile * BLOCK_PI, BLOCK_PI, WIDE)
        hw = tl.max_contiguous(tl.multiple_of(hw, BLOCK_PI), BLOCK_PI)
        hw_ok = hw < pixels_div * ALIGN
        h = hw // W
        w = hw % W
        for ci in range(0, Cg):
            acc = tl.zeros((BLOCK_G, BLOCK_PI), dtype=tl.float32)
            for instance_start in range(0, n_instances, BLOCK_I):
                instance, slot_ok = instance_block(first, instance_start, n_instances, order, BLOCK_I, IDENTITY,
                                                   WIDE)
                row_ok = slot_ok[:, None] & group_ok[None, :]
                for step in range(0, R * kH * kW):
                    r = step // (kH * kW)
                    tap = step % (kH * kW)
                    kh = tap // kW
                    kw = tap % kW
                    channel = groups * R + r
                    rows = instance[:, None] * sw_n + (channel * sw_o)[None, :]
                    oh, ow, pixel_ok = _output_pixels_of(h, w, hw_ok, kh, kw, H_out, W_out, stride_h, stride_w,
                                                         pad_h, pad_w, dil_h, dil_w, UNIT_STRIDE, NO_BOUNDS)
                    wv = tl.load(weight + rows + (ci * sw_c + kh * sw_h + kw * sw_w), mask=row_ok,
                                 other=0.0).to(tl.float32)
                    g = tl.load(grad_out + (instance[:, None] * sg_n + (channel * sg_c)[None, :])[:, :, None]
                                + (oh * sg_h + ow * sg_w)[None, None, :],
                                mask=row_ok[:, :, None] & pixel_ok[None, None, :], other=0.0).to(tl.float32)
                    acc += tl.sum(wv[:, :, None] * g, axis=0)
            offsets = tl.multiple_of((p * C_in + groups * Cg + ci) * (pixels_div * ALIGN), ALIGN)[:, None] + hw[None, :]
            tl.store(grad_templates + offsets, acc.to(grad_templates.dtype.element_ty),
                     mask=group_ok[:, None] & hw_ok[None, :])
