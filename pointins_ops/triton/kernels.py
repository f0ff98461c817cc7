"""Triton kernels for ``instance_aware_conv``: forward, grad_templates, grad_weight and grad_bias.

The op is a grouped GEMM once the instances are sorted by template. For template p and group g the rows are
the C_out / groups output channels of every instance that uses p (M_p = count_p * C_out / groups), the
reduction runs over K = (C_in / groups) * kH * kW, and the columns are the H_out * W_out output pixels. The
im2col matrix of the template is formed tile by tile from the template itself and never written to memory,
so each template is read once per tile of rows instead of once per instance.

* forward:        out[rows, pixels]         = weight[rows, K] @ im2col(template)[K, pixels] (+ bias)
* grad_weight:    grad_weight[rows, K]      = grad_out[rows, pixels] @ im2col(template)[K, pixels]^T
  (grad_bias is the row sum of the same grad_out tiles, computed by the programs of the first K tile)
* grad_templates: grad_templates[p, ci, h, w] = sum over the rows of p and the kernel taps that reach (h, w)
  of weight[row, ci, tap] * grad_out[row, pixel(h, w, tap)]; one program owns each tile of grad_templates.

The sort and the tile schedule are computed on the device with torch ops (no host sync: CUDA graphs capture
them). Instances whose index is out of range go to a sentinel template P that no kernel dereferences; their
outputs are NaN. Every output element is written by exactly one program with a fixed summation order: no
atomics, and the results are bitwise reproducible. The reduction tile sizes are chosen from the shape, never
autotuned, so that autotuning cannot change the summation order either.

On a GPU the two ops are ``torch.library.triton_op``s, so torch.compile traces the kernels themselves; under
the Triton interpreter they are opaque custom ops (see the end of this file).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .._compat import register_op, wrap_triton
from .._registration import output_shape, register_conv_autograd, register_fakes

# Triton reads TRITON_INTERPRET when @triton.jit runs, i.e. when this module is imported: the kernels below are
# then interpreted Python functions that run on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

FORWARD_OP = "pointins_ops::instance_aware_conv_triton"
BACKWARD_OP = "pointins_ops::instance_aware_conv_triton_backward"

_INT32_MAX = 2**31 - 1
# Tests set this to run the 64-bit offset code path on small tensors.
_FORCE_64BIT_OFFSETS = False
# Autotuning benchmarks every config once per new shape; tests that sweep hundreds of shapes switch it off and
# run one fixed config. The interpreter never autotunes.
AUTOTUNE = not INTERPRET


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, TF32: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in float32; float32 operands in TF32 only when TF32 is set. UPCAST widens the operands first:
    the interpreter multiplies bfloat16 as raw integers, and a bfloat16 product is exact in float32 anyway, so
    the result is what a GPU computes."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _index_range(start, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """start + arange(BLOCK), in 64 bits when offsets may pass 2^31 (everything computed from it follows)."""
    offsets = tl.arange(0, BLOCK)
    if WIDE:
        offsets = offsets.to(tl.int64)
    return start + offsets


@triton.jit
def _weight_offsets(ks, sw_c, sw_h, sw_w, kH: tl.constexpr, kW: tl.constexpr):
    """Offsets of the reduction indices k = (ci, kh, kw) within one (instance, output channel) kernel."""
    return (ks // (kH * kW)) * sw_c + ((ks // kW) % kH) * sw_h + (ks % kW) * sw_w


@triton.jit
def _load_im2col(template_base, template_ok, ks, pixels, K, H, W, H_out, W_out, st_c, st_h, st_w,
                 stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, kH: tl.constexpr, kW: tl.constexpr):
    """Elements (k, pixel) of the template's im2col matrix, for index tensors ``ks`` and ``pixels`` that
    broadcast (a column and a row, either way round); zero in the padding and past K or the last pixel."""
    kh = (ks // kW) % kH
    kw = ks % kW
    ih = (pixels // W_out) * stride_h - pad_h + kh * dil_h
    iw = (pixels % W_out) * stride_w - pad_w + kw * dil_w
    mask = (ks < K) & (pixels < H_out * W_out) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & template_ok
    return tl.load(template_base + (ks // (kH * kW)) * st_c + ih * st_h + iw * st_w, mask=mask, other=0.0)


@triton.jit
def _row_tile(pid_m, tile_template, tile_start, bounds, order, P, C_out_per_group, group,
              BLOCK_M: tl.constexpr, WIDE: tl.constexpr):
    """The rows of one tile of the grouped GEMM: (template, instance n, output channel co, mask).

    Tiles never straddle two templates. The sentinel template P holds the instances whose index is out of
    range; tiles past the last one are idle (all rows masked).
    """
    template = tl.load(tile_template + pid_m)
    active = template <= P
    template = tl.minimum(template, P)
    first_tile = tl.load(tile_start + template)
    start = tl.load(bounds + template)
    count = tl.load(bounds + template + 1) - start
    if not WIDE:
        template = template.to(tl.int32)
        first_tile = first_tile.to(tl.int32)
        start = start.to(tl.int32)
        count = count.to(tl.int32)
    rows = _index_range((pid_m - first_tile) * BLOCK_M, BLOCK_M, WIDE)
    row_mask = (rows < count * C_out_per_group) & active
    instance = tl.load(order + start + rows // C_out_per_group, mask=row_mask, other=0)
    if not WIDE:
        instance = instance.to(tl.int32)
    channel = group * C_out_per_group + rows % C_out_per_group
    return template, active, instance, channel, row_mask


@triton.jit
def _forward_kernel(
        templates, weight, bias, out, order, tile_template, tile_start, bounds,
        P, C_out, C_out_per_group, H, W, H_out, W_out, K, rows_bucket,
        st_p, st_c, st_h, st_w, sw_n, sw_o, sw_c, sw_h, sw_w, sb_n, sb_o,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        kH: tl.constexpr, kW: tl.constexpr, HAS_BIAS: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr,
        WIDE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2)
    template, active, instance, channel, row_mask = _row_tile(
        pid_m, tile_template, tile_start, bounds, order, P, C_out_per_group, group, BLOCK_M, WIDE)
    template_ok = template < P

    pixels = _index_range(pid_n * BLOCK_N, BLOCK_N, WIDE)
    k_range = _index_range(0, BLOCK_K, WIDE)
    C_in_per_group = K // (kH * kW)
    template_base = templates + template * st_p + group * C_in_per_group * st_c
    weight_rows = weight + instance * sw_n + channel * sw_o

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.where(active, K, 0)  # idle tiles skip the reduction
    for k_start in range(0, k_end, BLOCK_K):
        ks = k_start + k_range
        a = tl.load(weight_rows[:, None] + _weight_offsets(ks, sw_c, sw_h, sw_w, kH, kW)[None, :],
                    mask=row_mask[:, None] & (ks < K)[None, :], other=0.0)
        b = _load_im2col(template_base, template_ok, ks[:, None], pixels[None, :], K, H, W, H_out, W_out,
                         st_c, st_h, st_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, kH, kW)
        acc = _dot(a, b, acc, TF32, UPCAST)

    if HAS_BIAS:
        acc += tl.load(bias + instance * sb_n + channel * sb_o, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    # Instances whose index is out of range get NaN instead of another template's data.
    acc = tl.where(template_ok, acc, float("nan"))
    out_offsets = (instance * C_out + channel)[:, None] * (H_out * W_out) + pixels[None, :]
    tl.store(out + out_offsets, acc.to(out.dtype.element_ty),
             mask=row_mask[:, None] & (pixels < H_out * W_out)[None, :])


@triton.jit
def _grad_weight_kernel(
        grad_out, templates, grad_weight, grad_bias, order, tile_template, tile_start, bounds,
        P, C_out, C_out_per_group, H, W, H_out, W_out, K, rows_bucket,
        sg_n, sg_c, sg_h, sg_w, st_p, st_c, st_h, st_w,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        kH: tl.constexpr, kW: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr,
        WIDE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_weight tile [BLOCK_M rows, BLOCK_K] = sum over pixel tiles of grad_out @ im2col^T; grad_bias."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    group = tl.program_id(2)
    template, active, instance, channel, row_mask = _row_tile(
        pid_m, tile_template, tile_start, bounds, order, P, C_out_per_group, group, BLOCK_M, WIDE)
    template_ok = template < P

    ks = _index_range(pid_k * BLOCK_K, BLOCK_K, WIDE)
    pixel_range = _index_range(0, BLOCK_N, WIDE)
    C_in_per_group = K // (kH * kW)
    template_base = templates + template * st_p + group * C_in_per_group * st_c
    grad_rows = grad_out + instance * sg_n + channel * sg_c

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    num_pixels = H_out * W_out
    pixel_end = tl.where(active, num_pixels, 0)  # idle tiles skip the reduction
    for pixel_start in range(0, pixel_end, BLOCK_N):
        pixels = pixel_start + pixel_range
        g = tl.load(grad_rows[:, None] + ((pixels // W_out) * sg_h + (pixels % W_out) * sg_w)[None, :],
                    mask=row_mask[:, None] & (pixels < num_pixels)[None, :], other=0.0)
        b = _load_im2col(template_base, template_ok, ks[None, :], pixels[:, None], K, H, W, H_out, W_out,
                         st_c, st_h, st_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, kH, kW)
        acc = _dot(g, b, acc, TF32, UPCAST)
        bias_acc += tl.sum(g.to(tl.float32), axis=1)

    acc = tl.where(template_ok, acc, float("nan"))
    row_offsets = instance * C_out + channel
    tl.store(grad_weight + row_offsets[:, None] * K + ks[None, :], acc.to(grad_weight.dtype.element_ty),
             mask=row_mask[:, None] & (ks < K)[None, :])
    tl.store(grad_bias + row_offsets, bias_acc.to(grad_bias.dtype.element_ty), mask=row_mask & (pid_k == 0))


@triton.jit
def _grad_templates_kernel(
        grad_out, weight, grad_templates, order, bounds,
        C_in, C_out_per_group, C_in_per_group, H, W, H_out, W_out, num_channel_tiles,
        sg_n, sg_c, sg_h, sg_w, sw_n, sw_o, sw_c, sw_h, sw_w,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        kH: tl.constexpr, kW: tl.constexpr, TF32: tl.constexpr, UPCAST: tl.constexpr,
        WIDE: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr):
    """grad_templates[p, channel tile, pixel tile]: a reduction over the rows (instances x output channels)
    of template p and over the kernel taps; unused templates get zeros."""
    template = tl.program_id(0)
    group = tl.program_id(1) // num_channel_tiles
    channel_tile = tl.program_id(1) % num_channel_tiles
    pid_hw = tl.program_id(2)
    start = tl.load(bounds + template)
    num_rows = (tl.load(bounds + template + 1) - start) * C_out_per_group

    if WIDE:
        template = template.to(tl.int64)
    else:
        start = start.to(tl.int32)
        num_rows = num_rows.to(tl.int32)
    ci = _index_range(channel_tile * BLOCK_C, BLOCK_C, WIDE)
    hw = _index_range(pid_hw * BLOCK_HW, BLOCK_HW, WIDE)
    row_range = _index_range(0, BLOCK_R, WIDE)
    channel_mask = ci < C_in_per_group
    hw_mask = hw < H * W
    h = hw // W
    w = hw % W

    acc = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for row_start in range(0, num_rows, BLOCK_R):
        rows = row_start + row_range
        row_mask = rows < num_rows
        instance = tl.load(order + start + rows // C_out_per_group, mask=row_mask, other=0)
        if not WIDE:
            instance = instance.to(tl.int32)
        channel = group * C_out_per_group + rows % C_out_per_group
        weight_base = weight + (instance * sw_n + channel * sw_o)[None, :] + (ci * sw_c)[:, None]
        grad_base = grad_out + (instance * sg_n + channel * sg_c)[:, None]
        for tap in range(0, kH * kW):
            kh = tap // kW
            kw = tap % kW
            # Output pixel (oh, ow) reads template pixel (h, w) through this tap when
            # h = oh * stride_h - pad_h + kh * dil_h, and likewise for w.
            oh_scaled = h + pad_h - kh * dil_h
            ow_scaled = w + pad_w - kw * dil_w
            oh = oh_scaled // stride_h
            ow = ow_scaled // stride_w
            pixel_mask = (hw_mask & (oh_scaled >= 0) & (ow_scaled >= 0) & (oh_scaled % stride_h == 0)
                          & (ow_scaled % stride_w == 0) & (oh < H_out) & (ow < W_out))
            a = tl.load(weight_base + kh * sw_h + kw * sw_w, mask=channel_mask[:, None] & row_mask[None, :],
                        other=0.0)
            g = tl.load(grad_base + (oh * sg_h + ow * sg_w)[None, :], mask=row_mask[:, None] & pixel_mask[None, :],
                        other=0.0)
            acc = _dot(a, g, acc, TF32, UPCAST)

    offsets = ((template * C_in + group * C_in_per_group + ci) * (H * W))[:, None] + hw[None, :]
    tl.store(grad_templates + offsets, acc.to(grad_templates.dtype.element_ty),
             mask=channel_mask[:, None] & hw_mask[None, :])


def _gpu_configs(names):
    """A small autotuning space over output tile sizes, warps and pipeline stages."""
    sizes = {"BLOCK_N": (64, 128), "BLOCK_K": (32, 64), "BLOCK_HW": (64, 128)}
    return [triton.Config({name: size}, num_warps=warps, num_stages=stages)
            for name in names for size in sizes[name] for warps in (4, 8) for stages in (2, 3)]


# The autotuned variants tune only tile sizes along output dimensions (and warps / stages): the reduction tiles
# are passed by the launchers, so the summation order does not depend on which config wins. The instance count
# changes from batch to batch, so the key holds the row count rounded up to a power of 2 (``rows_bucket``, an
# argument the kernels do not read): a training loop tunes a handful of times, not once per batch.
_forward_tuned = triton.autotune(_gpu_configs(["BLOCK_N"]), key=["rows_bucket", "BLOCK_M", "K", "H_out", "W_out"])(
    _forward_kernel)
_grad_weight_tuned = triton.autotune(_gpu_configs(["BLOCK_K"]),
                                     key=["rows_bucket", "BLOCK_M", "K", "H_out", "W_out"])(_grad_weight_kernel)
_grad_templates_tuned = triton.autotune(
    _gpu_configs(["BLOCK_HW"]), key=["C_in", "C_out_per_group", "H", "W", "H_out", "W_out", "BLOCK_C", "BLOCK_R"])(
        _grad_templates_kernel)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _size_hint(size) -> int:
    """A size's value, read without a guard where torch.compile made it symbolic: tile sizes only change speed,
    so one compiled graph keeps serving every instance count instead of recompiling for each."""
    if not isinstance(size, torch.SymInt):
        return size
    from torch.fx.experimental import symbolic_shapes

    optimization_hint = getattr(symbolic_shapes, "optimization_hint", None)  # torch >= 2.10
    if optimization_hint is not None:
        return optimization_hint(size, fallback=64)
    return symbolic_shapes.hint_int(size, fallback=64)


def _power_of_2_between(value, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(_size_hint(value), 1))))


def _conv_allows_tf32(device: torch.device) -> bool:
    """Whether conv2d would run float32 in TF32 on ``device``: torch.backends.cudnn.conv.fp32_precision, falling
    back to its parents when it is "none" (the legacy torch.backends.cudnn.allow_tf32 sets the same value)."""
    if device.type != "cuda":
        return False
    backends = torch.backends
    try:
        for setting in (backends.cudnn.conv.fp32_precision, backends.cudnn.fp32_precision, backends.fp32_precision):
            if setting != "none":
                return setting == "tf32"
        return False
    except AttributeError:  # a torch without the fp32_precision API
        return backends.cudnn.allow_tf32


def _dot_options(tensor: torch.Tensor) -> dict:
    return dict(TF32=tensor.dtype == torch.float32 and _conv_allows_tf32(tensor.device),
                UPCAST=INTERPRET and tensor.dtype == torch.bfloat16)


def _largest_offset(tensor: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()) if size > 0)


def _needs_64bit_offsets(*tensors: torch.Tensor) -> bool:
    return _FORCE_64BIT_OFFSETS or any(
        tensor.numel() > _INT32_MAX or _largest_offset(tensor) > _INT32_MAX for tensor in tensors)


def _sort_by_template(index: torch.Tensor | None, P: int, N: int, device: torch.device):
    """(order, bounds): instances sorted stably by template, and bounds[p]:bounds[p + 1] the sorted positions of
    template p's instances, for p in [0, P]. Template P is a sentinel holding out-of-range index values, so that
    no kernel ever dereferences them. Sync-free: no data leaves the device."""
    if index is None:
        order = torch.arange(N, device=device)
        sorted_keys = order
    else:
        keys = index.long()
        keys = torch.where((keys >= 0) & (keys < P), keys, P)
        sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.searchsorted(sorted_keys, torch.arange(P + 2, device=device))
    return order, bounds


def _row_tiles(bounds: torch.Tensor, rows_per_instance: int, N: int, P: int, block_m: int):
    """The grouped GEMM's row tiles: tile_template[t] is the template of tile t (P + 1 for idle tiles) and
    tile_start[p] the first tile of template p. The tile count is an upper bound known from shapes alone."""
    counts = bounds[1:] - bounds[:-1]
    tiles = (counts * rows_per_instance + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    num_tiles = triton.cdiv(N * rows_per_instance, block_m) + torch.sym_min(P + 1, N)
    tile_template = torch.searchsorted(tile_end, torch.arange(num_tiles, device=bounds.device), right=True)
    return tile_template, tile_end - tiles, num_tiles


def _block_m(N, P, C_out_per_group) -> int:
    # About the rows one template holds, in one tile where possible.
    N, P, C_out_per_group = _size_hint(N), _size_hint(P), _size_hint(C_out_per_group)
    return _power_of_2_between(triton.cdiv(N * C_out_per_group, max(min(N, P), 1)), 16, 64)


def _rows_bucket(N, C_out_per_group) -> int:
    """The autotuning key's row count (see _forward_tuned)."""
    return triton.next_power_of_2(max(_size_hint(N * C_out_per_group), 1))


def _geometry(templates, weight, stride, padding, dilation, groups):
    P, C_in, H, W = templates.shape
    N, C_out, C_in_per_group, kH, kW = weight.shape
    _, _, H_out, W_out = output_shape(templates, weight, stride, padding, dilation)
    return P, C_in, H, W, N, C_out, C_in_per_group, kH, kW, H_out, W_out


def _forward(templates, weight, bias, index, stride, padding, dilation, groups):
    P, C_in, H, W, N, C_out, C_in_per_group, kH, kW, H_out, W_out = _geometry(
        templates, weight, stride, padding, dilation, groups)
    out = torch.empty((N, C_out, H_out, W_out), dtype=templates.dtype, device=templates.device)
    if out.numel() == 0:
        return out
    C_out_per_group = C_out // groups
    K = C_in_per_group * kH * kW
    block_m = _block_m(N, P, C_out_per_group)
    order, bounds = _sort_by_template(index, P, N, templates.device)
    tile_template, tile_start, num_tiles = _row_tiles(bounds, C_out_per_group, N, P, block_m)
    has_bias = bias is not None
    bias_arg = bias if has_bias else weight  # never read; an input, so it aliases no output
    bias_strides = bias.stride() if has_bias else (0, 0)
    wide = _needs_64bit_offsets(templates, weight, out)
    args = (templates, weight, bias_arg, out, order, tile_template, tile_start, bounds,
            P, C_out, C_out_per_group, H, W, H_out, W_out, K, _rows_bucket(N, C_out_per_group),
            *templates.stride(), *weight.stride(), *bias_strides,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    # The reduction tile is fixed by the shape (see the module docstring).
    block_k = _power_of_2_between(K, 16, 128 if INTERPRET else 32)
    constants = dict(kH=kH, kW=kW, HAS_BIAS=has_bias, **_dot_options(templates), WIDE=wide, BLOCK_M=block_m,
                     BLOCK_K=block_k)
    if AUTOTUNE and not INTERPRET:
        def grid(meta):
            return (num_tiles, triton.cdiv(H_out * W_out, meta["BLOCK_N"]), groups)

        wrap_triton(_forward_tuned)[grid](*args, **constants)
    else:
        block_n = _power_of_2_between(H_out * W_out, 16, 512 if INTERPRET else 64)
        grid = (num_tiles, triton.cdiv(H_out * W_out, block_n), groups)
        wrap_triton(_forward_kernel)[grid](*args, **constants, BLOCK_N=block_n)
    return out


def _grad_weight_and_bias(grad_output, templates, weight, order, bounds, stride, padding, dilation, groups):
    P, C_in, H, W, N, C_out, C_in_per_group, kH, kW, H_out, W_out = _geometry(
        templates, weight, stride, padding, dilation, groups)
    grad_weight = torch.empty((N, C_out, C_in_per_group, kH, kW), dtype=weight.dtype, device=weight.device)
    grad_bias = torch.empty((N, C_out), dtype=weight.dtype, device=weight.device)
    if grad_bias.numel() == 0:
        return grad_weight, grad_bias
    C_out_per_group = C_out // groups
    K = C_in_per_group * kH * kW
    block_m = _block_m(N, P, C_out_per_group)
    tile_template, tile_start, num_tiles = _row_tiles(bounds, C_out_per_group, N, P, block_m)
    wide = _needs_64bit_offsets(grad_output, templates, grad_weight)
    args = (grad_output, templates, grad_weight, grad_bias, order, tile_template, tile_start, bounds,
            P, C_out, C_out_per_group, H, W, H_out, W_out, K, _rows_bucket(N, C_out_per_group),
            *grad_output.stride(), *templates.stride(),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    block_n = _power_of_2_between(H_out * W_out, 16, 512 if INTERPRET else 64)
    constants = dict(kH=kH, kW=kW, **_dot_options(templates), WIDE=wide, BLOCK_M=block_m, BLOCK_N=block_n)
    # K = 0 (no input channels) still needs one tile of programs for grad_bias.
    if AUTOTUNE and not INTERPRET:
        def grid(meta):
            return (num_tiles, max(triton.cdiv(K, meta["BLOCK_K"]), 1), groups)

        wrap_triton(_grad_weight_tuned)[grid](*args, **constants)
    else:
        block_k = _power_of_2_between(K, 16, 128 if INTERPRET else 32)
        grid = (num_tiles, max(triton.cdiv(K, block_k), 1), groups)
        wrap_triton(_grad_weight_kernel)[grid](*args, **constants, BLOCK_K=block_k)
    return grad_weight, grad_bias


def _grad_templates(grad_output, templates, weight, order, bounds, stride, padding, dilation, groups):
    P, C_in, H, W, N, C_out, C_in_per_group, kH, kW, H_out, W_out = _geometry(
        templates, weight, stride, padding, dilation, groups)
    grad_templates = torch.empty((P, C_in, H, W), dtype=templates.dtype, device=templates.device)
    if grad_templates.numel() == 0:
        return grad_templates
    C_out_per_group = C_out // groups
    block_c = _power_of_2_between(C_in_per_group, 16, 64)
    num_channel_tiles = triton.cdiv(C_in_per_group, block_c)
    # The reduction runs over the rows of one template.
    block_r = _block_m(N, P, C_out_per_group)
    wide = _needs_64bit_offsets(grad_output, weight, grad_templates)
    args = (grad_output, weight, grad_templates, order, bounds,
            C_in, C_out_per_group, C_in_per_group, H, W, H_out, W_out, num_channel_tiles,
            *grad_output.stride(), *weight.stride(),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    constants = dict(kH=kH, kW=kW, **_dot_options(templates), WIDE=wide, BLOCK_C=block_c, BLOCK_R=block_r)
    if AUTOTUNE and not INTERPRET:
        def grid(meta):
            return (P, groups * num_channel_tiles, triton.cdiv(H * W, meta["BLOCK_HW"]))

        wrap_triton(_grad_templates_tuned)[grid](*args, **constants)
    else:
        block_hw = _power_of_2_between(H * W, 16, 512 if INTERPRET else 64)
        grid = (P, groups * num_channel_tiles, triton.cdiv(H * W, block_hw))
        wrap_triton(_grad_templates_kernel)[grid](*args, **constants, BLOCK_HW=block_hw)
    return grad_templates


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------


def _device_guard(tensor: torch.Tensor):
    """Triton launches on the current CUDA device, which need not be the tensors' device. Fake tensors (tracing,
    torch.compile) need no guard: the compiled code guards the device itself."""
    from torch._subclasses.fake_tensor import is_fake

    if tensor.is_cuda and torch.cuda.device_count() > 1 and not is_fake(tensor):
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def instance_aware_conv_triton(templates: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               index: torch.Tensor | None, stride: list[int], padding: list[int],
                               dilation: list[int], groups: int) -> torch.Tensor:
    """The forward op's implementation (arguments already checked and normalized by ops.py)."""
    with _device_guard(templates):
        return _forward(templates, weight, bias, index, stride, padding, dilation, groups)


def instance_aware_conv_triton_backward(grad_output: torch.Tensor, templates: torch.Tensor, weight: torch.Tensor,
                                        index: torch.Tensor | None, stride: list[int], padding: list[int],
                                        dilation: list[int], groups: int
                                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_templates, grad_weight, grad_bias), as the C++ backward op returns them."""
    with _device_guard(templates):
        order, bounds = _sort_by_template(index, templates.shape[0], weight.shape[0], templates.device)
        grad_templates = _grad_templates(grad_output, templates, weight, order, bounds, stride, padding, dilation,
                                         groups)
        grad_weight, grad_bias = _grad_weight_and_bias(grad_output, templates, weight, order, bounds, stride,
                                                       padding, dilation, groups)
    return grad_templates, grad_weight, grad_bias


# The ops' schemas are inferred from the launchers' annotations (see _compat.register_op).
if INTERPRET:
    # Interpreted kernels are Python functions that torch.compile cannot trace into a graph, so triton_op's
    # decomposition (which runs the launchers on fake tensors) would fail. The interpreter registers the same
    # launchers as opaque custom ops with shape-only fakes instead; torch.compile then calls them as a black box.
    register_op(FORWARD_OP, instance_aware_conv_triton, traceable=False)
    register_op(BACKWARD_OP, instance_aware_conv_triton_backward, traceable=False)
    register_fakes(FORWARD_OP, BACKWARD_OP)
else:
    register_op(FORWARD_OP, instance_aware_conv_triton, traceable=True)
    register_op(BACKWARD_OP, instance_aware_conv_triton_backward, traceable=True)

register_conv_autograd(FORWARD_OP, torch.ops.pointins_ops.instance_aware_conv_triton_backward.default)
