"""The Triton op: launchers for the kernels and their registration with torch.library.

forward:  bucketing (skipped without an index), then one forward kernel (tensor-core GEMM, or direct for
          depthwise and small groups).
backward: bucketing, then one fused kernel where a template's pixels fit a tile (grad_templates, grad_weight and
          grad_bias together), else grad_templates and a split grad_weight with a fixed-order sum of its
          float32 partials; the direct path has one kernel (plus the sum when it splits).

On a GPU the two ops are ``torch.library.triton_op``s, so torch.compile traces the kernels themselves; under
the Triton interpreter they are opaque custom ops (see the end of this file).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import triton
from torch.library import triton_op, wrap_triton

from .. import _registration
from . import plan, tuning
from .backward import backward_direct_kernel, backward_gemm_kernel, sum_partials_kernel
from .bucketing import MAX_KERNEL_PAIRS, bucket_kernel, chunk, sort_by_template_with_torch, templates_per_program
from .forward import forward_direct_kernel, forward_gemm_kernel

INTERPRET = tuning.INTERPRET
FORWARD_OP = "pointins_ops::instance_aware_conv_triton"
BACKWARD_OP = "pointins_ops::instance_aware_conv_triton_backward"
# Tests set this to build the buckets with torch's sort, the path of batches beyond MAX_KERNEL_PAIRS.
FORCE_TORCH_BUCKETING = False


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


def _buckets(index: Optional[torch.Tensor], geom: plan.Geometry, device: torch.device):
    """(order, start, count) of bucketing.py; placeholders when there is no index (the kernels never read them)."""
    if index is None:
        placeholder = torch.empty(1, dtype=torch.int32, device=device)
        return placeholder, placeholder, placeholder
    N, P = geom.N, geom.P
    if FORCE_TORCH_BUCKETING or geom.hint("N") * (geom.hint("P") + 1) > MAX_KERNEL_PAIRS:
        return sort_by_template_with_torch(index, P)
    order = torch.empty(N, dtype=torch.int32, device=device)
    start = torch.empty(P + 1, dtype=torch.int32, device=device)
    count = torch.empty(P + 1, dtype=torch.int32, device=device)
    block_t = templates_per_program(geom.hint("P"))
    wrap_triton(bucket_kernel)[(triton.cdiv(P + 1, block_t),)](index, order, start, count, N, P, BLOCK_T=block_t,
                                                                 CHUNK=chunk(block_t), num_warps=4)
    return order, start, count


def _tuning_key(name: str, geom: plan.Geometry, dtype: torch.dtype, arguments: dict) -> tuple:
    """Autotuning key: the launch's fixed arguments, the geometry with N and P rounded up to powers of 2 (a
    training loop's instance count changes every batch: it tunes a handful of times, not once per batch)."""
    sizes = tuple(triton.next_power_of_2(max(geom.hint(name), 1)) if name in ("N", "P") else
                  (geom.hint(name) if isinstance(getattr(geom, name), (int, torch.SymInt)) else getattr(geom, name))
                  for name in ("P", "C_in", "H", "W", "N", "C_out", "G", "kH", "kW", "stride", "padding",
                               "dilation", "identity"))
    fixed = tuple(sorted((key, plan.size_hint(value) if isinstance(value, (int, torch.SymInt)) else value)
                         for key, value in arguments.items() if not isinstance(value, torch.Tensor)))
    return name, str(dtype), sizes, fixed


def _launch(name: str, kernel, launch: plan.Launch, arguments: dict, geom: plan.Geometry, reference: torch.Tensor):
    """Launch ``kernel`` with one of ``launch``'s candidates (tuning.choose decides which)."""
    fixed = {**arguments, **launch.constants}

    def run(config):
        meta = {**fixed, **config.kwargs}
        wrap_triton(kernel)[launch.grid(meta)](**meta, **launch.arguments(meta), num_warps=config.num_warps,
                                               num_stages=config.num_stages)

    config = tuning.choose(_tuning_key(name, geom, reference.dtype, fixed), launch.candidates, run, reference)
    run(config)


def _conv_arguments(geom: plan.Geometry) -> dict:
    return dict(P=geom.P, G=geom.G, C_out=geom.C_out, R=geom.R, Cg=geom.Cg, H=geom.H, W=geom.W, H_out=geom.H_out,
                W_out=geom.W_out, stride_h=geom.stride[0], stride_w=geom.stride[1], pad_h=geom.padding[0],
                pad_w=geom.padding[1], dil_h=geom.dilation[0], dil_w=geom.dilation[1], kH=geom.kH, kW=geom.kW,
                IDENTITY=geom.identity)


def _pixel_counts(templates: torch.Tensor, geom: plan.Geometry) -> dict:
    """ALIGN (what the kernels may promise about the alignment of channel and pixel-row offsets) and the pixel
    counts divided by it (the kernels multiply back, so the compiler sees the alignment)."""
    align = plan.alignment(plan.tensor_alignment(templates), geom.pixels, geom.out_pixels)
    return dict(ALIGN=align, pixels_div=geom.pixels // align, out_pixels_div=geom.out_pixels // align)


def _strides(prefix: str, tensor: torch.Tensor, names: str) -> dict:
    return {f"{prefix}_{name}": stride for name, stride in zip(names, tensor.stride())}


def _forward(templates, weight, bias, index, stride, padding, dilation, groups):
    geom = plan.geometry(templates, weight, index, stride, padding, dilation, groups)
    out = torch.empty((geom.N, geom.C_out, geom.H_out, geom.W_out), dtype=templates.dtype, device=templates.device)
    if out.numel() == 0:
        return out
    order, start, count = _buckets(index, geom, templates.device)
    has_bias = bias is not None
    arguments = dict(
        templates=templates, weight=weight, bias=bias if has_bias else weight, out=out, order=order, start=start,
        count=count, **_conv_arguments(geom), **_strides("st", templates, "pchw"), **_strides("sw", weight, "nochw"),
        sb_n=bias.stride(0) if has_bias else 0, sb_o=bias.stride(1) if has_bias else 0, HAS_BIAS=has_bias,
        WIDE=plan.needs_64bit_offsets(templates, weight, bias, out),
        CONTIGUOUS=plan.contiguous_taps(geom, templates.stride()[2:]), NO_BOUNDS=plan.no_bounds(geom))
    arguments.update(_pixel_counts(templates, geom))
    del arguments["pixels_div"]  # (the forward kernels count output pixels only)
    if plan.uses_direct_path(geom):
        _launch("forward_direct", forward_direct_kernel, plan.forward_direct_launch(geom, arguments["WIDE"]),
                arguments, geom, out)
    else:
        arguments.update(_dot_options(templates))
        operands = plan.Operands.of(templates.dtype, arguments["TF32"], arguments["WIDE"])
        _launch("forward_gemm", forward_gemm_kernel, plan.forward_gemm_launch(geom, operands), arguments, geom, out)
    return out


def _backward(grad_output, templates, weight, index, stride, padding, dilation, groups):
    geom = plan.geometry(templates, weight, index, stride, padding, dilation, groups)
    device = templates.device
    grad_templates = torch.empty_like(templates, memory_format=torch.contiguous_format)
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=device)
    grad_bias = torch.empty((geom.N, geom.C_out), dtype=weight.dtype, device=device)
    if grad_bias.numel() == 0 or grad_output.numel() == 0:
        return grad_templates.zero_(), grad_weight.zero_(), grad_bias.zero_()
    order, start, count = _buckets(index, geom, device)
    direct = plan.uses_direct_path(geom)
    dot_options = _dot_options(templates)
    align = _pixel_counts(templates, geom)["ALIGN"]

    def backward_plan_for(wide):
        if direct:
            return plan.backward_direct_plan(geom, wide)
        return plan.backward_gemm_plan(geom, plan.Operands.of(templates.dtype, dot_options["TF32"], wide), align)

    wide = plan.needs_64bit_offsets(grad_output, templates, weight, grad_templates)
    backward_plan = backward_plan_for(wide)
    splits = backward_plan.splits
    weight_elements, bias_elements = grad_weight.numel(), grad_bias.numel()
    if splits > 1:  # (a guard under torch.compile: a graph is specialised on whether grad_weight splits)
        gw_dest = torch.empty((splits, weight_elements), dtype=torch.float32, device=device)
        gb_dest = torch.empty((splits, bias_elements), dtype=torch.float32, device=device)
        if not wide and plan.needs_64bit_offsets(gw_dest):  # (the splits do not depend on the offsets' width)
            wide = True
            backward_plan = backward_plan_for(wide)
    else:
        gw_dest, gb_dest = grad_weight, grad_bias
    arguments = dict(
        grad_out=grad_output, templates=templates, weight=weight, grad_templates=grad_templates, gw_dest=gw_dest,
        gb_dest=gb_dest, order=order, start=start, count=count, C_in=geom.C_in, M_w=weight_elements,
        M_b=bias_elements, **_conv_arguments(geom), **_strides("sg", grad_output, "nchw"),
        **_strides("st", templates, "pchw"), **_strides("sw", weight, "nochw"),
        WIDE=wide,
        UNIT_STRIDE=geom.stride == (1, 1), CONTIGUOUS=plan.contiguous_taps(geom, templates.stride()[2:]),
        NO_BOUNDS=plan.no_bounds(geom))
    arguments.update(_pixel_counts(templates, geom))
    if direct:
        for name, launch in backward_plan.launches:
            _launch("backward_direct", backward_direct_kernel, launch, arguments, geom, grad_output)
    else:
        arguments.update(dot_options,
                         GRAD_CONTIGUOUS=plan.contiguous_taps(geom, grad_output.stride()[2:]))
        for name, launch in backward_plan.launches:
            _launch(f"backward_{name}", backward_gemm_kernel, launch, arguments, geom, grad_output)
    if gw_dest is not grad_weight:
        block = plan.PARTIAL_SUM_BLOCK
        weight_blocks = triton.cdiv(weight_elements, block)
        wrap_triton(sum_partials_kernel)[(weight_blocks + triton.cdiv(bias_elements, block),)](
            gw_dest, grad_weight, weight_elements, gb_dest, grad_bias, bias_elements, splits, weight_blocks,
            BLOCK=block, WIDE=plan.needs_64bit_offsets(gw_dest), num_warps=4)
    return grad_templates, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------

_FORWARD_SCHEMA = ("(Tensor templates, Tensor weight, Tensor? bias, Tensor? index, int[2] stride, int[2] padding, "
                   "int[2] dilation, int groups) -> Tensor")
_BACKWARD_SCHEMA = ("(Tensor grad_output, Tensor templates, Tensor weight, Tensor? index, int[2] stride, "
                    "int[2] padding, int[2] dilation, int groups) -> (Tensor grad_templates, Tensor grad_weight, "
                    "Tensor grad_bias)")


def _device_guard(tensor: torch.Tensor):
    """Triton launches on the current CUDA device, which need not be the tensors' device. Fake tensors (tracing,
    torch.compile) need no guard: the compiled code guards the device itself."""
    from torch._subclasses.fake_tensor import is_fake

    if tensor.is_cuda and torch.cuda.device_count() > 1 and not is_fake(tensor):
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def instance_aware_conv_triton(templates: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               index: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                               dilation: Sequence[int], groups: int) -> torch.Tensor:
    """The forward op's implementation (arguments already checked and normalized by ops.py)."""
    with _device_guard(templates):
        return _forward(templates, weight, bias, index, tuple(stride), tuple(padding), tuple(dilation), groups)


def instance_aware_conv_triton_backward(
        grad_output: torch.Tensor, templates: torch.Tensor, weight: torch.Tensor, index: Optional[torch.Tensor],
        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
        groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_templates, grad_weight, grad_bias), as the C++ backward op returns them."""
    with _device_guard(templates):
        return _backward(grad_output, templates, weight, index, tuple(stride), tuple(padding), tuple(dilation),
                         groups)


def register() -> None:
    """Register the two ops and the forward's autograd (pointins_ops.triton does it once, at import). Importing
    this module alone registers nothing, so tools can compile its kernels on any torch."""
    if INTERPRET:
        # Interpreted kernels are Python functions that torch.compile cannot trace into a graph, so triton_op's
        # decomposition (which runs the launchers on fake tensors) would fail. The interpreter registers the same
        # launchers as opaque custom ops with shape-only fakes instead; torch.compile then calls them as a black
        # box.
        torch.library.custom_op(FORWARD_OP, mutates_args=(), schema=_FORWARD_SCHEMA)(instance_aware_conv_triton)
        torch.library.custom_op(BACKWARD_OP, mutates_args=(), schema=_BACKWARD_SCHEMA)(
            instance_aware_conv_triton_backward)
        _registration.register_fakes(FORWARD_OP, BACKWARD_OP)
    else:
        triton_op(FORWARD_OP, mutates_args=(), schema=_FORWARD_SCHEMA)(instance_aware_conv_triton)
        triton_op(BACKWARD_OP, mutates_args=(), schema=_BACKWARD_SCHEMA)(instance_aware_conv_triton_backward)
    _registration.register_conv_autograd(FORWARD_OP,
                                         torch.ops.pointins_ops.instance_aware_conv_triton_backward.default)
