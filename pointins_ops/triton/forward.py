"""Forward kernels.

For template p and group g the op is a GEMM: rows are the R = C_out / groups output channels of each instance
of p (a row block of BLOCK_M rows), columns the output pixels (BLOCK_N at a time), and the reduction runs over
the kernel taps and the C_in / groups input channels of the group. A program owns one (template, group, pixel
tile, row split) and loops over the row blocks of its template: the template tile it reads is the same for every
row block, so it comes from L1 after the first.

Index maths is hoisted: the output pixel coordinates are computed once per program; each reduction step (one tap
and one chunk of channels) shifts them by two scalars; a row block's instances and channels are computed once
per block. With a contiguous template and unit stride and dilation (CONTIGUOUS) a tap is a constant shift of
the flat pixel index, so the template loads are runs of consecutive addresses (alignment hints let 16-bit loads
vectorise where the host proved it).

``forward_direct_kernel`` serves depthwise and other small-group convolutions, where a tensor-core tile would
hold mostly padding: multiply-adds in float32 on [instances, groups, pixels] tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (arange_from, dot, instance_block, instances_of_rows, program_index, template_instances,
                     template_of_program)


@triton.jit
def _pixel_coordinates(px_tile, out_pixels, W_out, stride_h, stride_w, pad_h, pad_w,
                       BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """Flat output pixels of a tile, whether they exist, and the template row/column that tap (0, 0) reads."""
    px = arange_from(px_tile * BLOCK, BLOCK, WIDE)
    px = tl.max_contiguous(tl.multiple_of(px, BLOCK), BLOCK)
    oh = px // W_out
    ow = px % W_out
    return px, px < out_pixels, oh * stride_h - pad_h, ow * stride_w - pad_w


@triton.jit
def forward_gemm_kernel(
        templates, weight, bias, out, order, start, count,
        P, G, C_out, R, Cg, H, W, H_out, W_out, out_pixels_div, num_px_tiles, row_splits,
        st_p, st_c, st_h, st_w, sw_n, sw_o, sw_c, sw_h, sw_w, sb_n, sb_o,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        kH: tl.constexpr, kW: tl.constexpr, HAS_BIAS: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr,
        WIDE: tl.constexpr, IDENTITY: tl.constexpr, CONTIGUOUS: tl.constexpr, NO_BOUNDS: tl.constexpr,
        ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    px_tile = pid % num_px_tiles
    rest = pid // num_px_tiles
    split = rest % row_splits
    group, p, first, _, template_ok, num_rows, num_row_tiles = template_of_program(
        rest // row_splits, G, start, count, P, R, BLOCK_M, IDENTITY, WIDE)

    out_pixels = out_pixels_div * ALIGN  # H_out * W_out, with the alignment the host proved
    px, px_ok, ih0, iw0 = _pixel_coordinates(px_tile, out_pixels, W_out, stride_h, stride_w, pad_h, pad_w, BLOCK_N,
                                             WIDE)
    template_base = templates + tl.where(template_ok, p, 0) * st_p + group * Cg * st_c
    c_range = tl.arange(0, BLOCK_C)
    num_c_chunks = tl.cdiv(Cg, BLOCK_C)
    num_steps = kH * kW * num_c_chunks

    for row_tile in range(split, num_row_tiles, row_splits):
        rows = arange_from(row_tile * BLOCK_M, BLOCK_M, WIDE)
        row_ok = rows < num_rows
        instance = instances_of_rows(rows, row_ok, first, order, R, IDENTITY, WIDE)
        channel = group * R + rows % R
        weight_rows = weight + instance * sw_n + channel * sw_o

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # One loop over (tap, channel chunk) so that Triton pipelines its loads.
        for step in range(0, num_steps):
            tap = step // num_c_chunks
            ci = (step % num_c_chunks) * BLOCK_C + c_range
            ci_ok = ci < Cg
            kh = tap // kW
            kw = tap % kW
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            if NO_BOUNDS:  # a 1x1 kernel without padding reads inside the template
                pixel_ok = px_ok & template_ok
            else:
                pixel_ok = px_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & template_ok
            if CONTIGUOUS and NO_BOUNDS:  # 1x1, unit stride, contiguous pixels: the flat index itself
                pixel_offsets = px
            elif CONTIGUOUS:  # unit stride and dilation, pixels contiguous: the tap shifts the flat index
                pixel_offsets = px + (kh - pad_h) * W + (kw - pad_w)
            else:
                pixel_offsets = ih * st_h + iw * st_w
            a = tl.load(weight_rows[:, None] + (ci * sw_c)[None, :] + (kh * sw_h + kw * sw_w),
                        mask=row_ok[:, None] & ci_ok[None, :], other=0.0)
            b = tl.load(template_base + tl.multiple_of(ci * st_c, ALIGN)[:, None] + pixel_offsets[None, :],
                        mask=ci_ok[:, None] & pixel_ok[None, :], other=0.0)
            acc = dot(a, b, acc, TF32, UPCAST)

        if HAS_BIAS:
            acc += tl.load(bias + instance * sb_n + channel * sb_o, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        # Instances whose index is out of range get NaN instead of another template's data.
        acc = tl.where(template_ok, acc, float("nan"))
        out_rows = tl.multiple_of((instance * C_out + channel) * out_pixels, ALIGN)
        tl.store(out + out_rows[:, None] + px[None, :], acc.to(out.dtype.element_ty),
                 mask=row_ok[:, None] & px_ok[None, :])


@triton.jit
def forward_direct_kernel(
        templates, weight, bias, out, order, start, count,
        P, G, C_out, R, Cg, H, W, H_out, W_out, out_pixels_div, num_px_tiles, num_group_tiles, instance_splits,
        st_p, st_c, st_h, st_w, sw_n, sw_o, sw_c, sw_h, sw_w, sb_n, sb_o,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        kH: tl.constexpr, kW: tl.constexpr, HAS_BIAS: tl.constexpr, WIDE: tl.constexpr, IDENTITY: tl.constexpr,
        CONTIGUOUS: tl.constexpr, NO_BOUNDS: tl.constexpr, ALIGN: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[n, g*R + r, px] = sum over ci < Cg and taps of weight[n, g*R + r, ci, tap] * template[g*Cg + ci, px + tap]
    for BLOCK_I instances x BLOCK_G groups x BLOCK_N pixels at a time; each template tile is loaded once per tap
    for all BLOCK_I instances. The sum runs over (ci, tap) in order, per element: no cross-lane reduction."""
    pid = tl.program_id(0)
    px_tile = pid % num_px_tiles
    rest = pid // num_px_tiles
    group_tile = rest % num_group_tiles
    rest = rest // num_group_tiles
    split = rest % instance_splits
    p = program_index(rest // instance_splits, WIDE)
    first, n_instances = template_instances(p, start, count, IDENTITY, WIDE)
    template_ok = p < P

    out_pixels = out_pixels_div * ALIGN  # H_out * W_out, with the alignment the host proved
    px, px_ok, ih0, iw0 = _pixel_coordinates(px_tile, out_pixels, W_out, stride_h, stride_w, pad_h, pad_w, BLOCK_N,
                                             WIDE)
    groups = arange_from(group_tile * BLOCK_G, BLOCK_G, WIDE)
    group_ok = groups < G
    template_base = templates + tl.where(template_ok, p, 0) * st_p
    num_instance_tiles = tl.cdiv(n_instances, BLOCK_I)

    for instance_tile in range(split, num_instance_tiles, instance_splits):
        instance, slot_ok = instance_block(first, instance_tile * BLOCK_I, n_instances, order, BLOCK_I, IDENTITY,
                                           WIDE)
        for r in range(0, R):
            channel = groups * R + r
            weight_base = weight + instance[:, None] * sw_n + (channel * sw_o)[None, :]
            wmask = slot_ok[:, None] & group_ok[None, :]
            acc = tl.zeros((BLOCK_I, BLOCK_G, BLOCK_N), dtype=tl.float32)
            for step in range(0, Cg * kH * kW):
                ci = step // (kH * kW)
                tap = step % (kH * kW)
                kh = tap // kW
                kw = tap % kW
                ih = ih0 + kh * dil_h
                iw = iw0 + kw * dil_w
                if NO_BOUNDS:
                    pixel_ok = px_ok & template_ok
                else:
                    pixel_ok = px_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & template_ok
                if CONTIGUOUS and NO_BOUNDS:
                    pixel_offsets = px
                elif CONTIGUOUS:
                    pixel_offsets = px + (kh - pad_h) * W + (kw - pad_w)
                else:
                    pixel_offsets = ih * st_h + iw * st_w
                t = tl.load(template_base + tl.multiple_of((groups * Cg + ci) * st_c, ALIGN)[:, None]
                            + pixel_offsets[None, :], mask=group_ok[:, None] & pixel_ok[None, :], other=0.0)
                w = tl.load(weight_base + ci * sw_c + kh * sw_h + kw * sw_w, mask=wmask, other=0.0)
                acc += w.to(tl.float32)[:, :, None] * t.to(tl.float32)[None, :, :]
            if HAS_BIAS:
                b = tl.load(bias + instance[:, None] * sb_n + (channel * sb_o)[None, :], mask=wmask, other=0.0)
                acc += b.to(tl.float32)[:, :, None]
            acc = tl.where(template_ok, acc, float("nan"))
            out_rows = (tl.multiple_of(instance * C_out * out_pixels, ALIGN)[:, None]
                        + tl.multiple_of(channel * out_pixels, ALIGN)[None, :])
            tl.store(out + out_rows[:, :, None] + px[None, None, :], acc.to(out.dtype.element_ty),
                     mask=wmask[:, :, None] & px_ok[None, None, :])
