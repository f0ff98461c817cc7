"""The Triton op: launchers for the kernels and their registration with torch.library.

forward:  bucketing (skipped without an index), then one forward kernel (tensor-core GEMM, or direct for
          depthwise and small groups).
backward: bucketing, then one fused kernel where output and template pixels coincide (grad_templates,
          grad_weight and grad_bias together, over splits of the pixels), else grad_templates and a split
          grad_weight; a fixed-order sum of the float32 partials when grad_weight splits. The direct path has one
          kernel (plus the sum when it splits).

Everything but the tensors is planned once per call signature (sizes, strides, dtypes, flags) and cached: the
launchers' Python is what small calls wait for. On a GPU the two ops are ``torch.library.triton_op``s, so
torch.compile traces the kernels themselves; under the Triton interpreter they are opaque custom ops (register).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
import triton

from .. import _registration
from .._compat import register_op, wrap_triton
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


@dataclasses.dataclass
class _Step:
    """One kernel launch of a call, everything but its tensors decided: the plan.Launch, the fixed arguments,
    and the autotuning key."""
    name: str
    kernel: object
    launch: plan.Launch
    fixed: dict
    tuning_key: tuple


@dataclasses.dataclass
class _CallPlan:
    """Everything a call does that depends only on sizes, strides, dtypes and flags (see _signature)."""
    geom: plan.Geometry
    bucketing: object                  # None (no index), "torch" (torch's sort), or BLOCK_T of bucket_kernel
    steps: list
    splits: object = 1                 # grad_weight splits (float32 partial buffers when > 1)
    partial_sum: Optional[dict] = None  # fixed arguments of sum_partials_kernel


# Call plans by signature: building one costs more host time than the kernels of a small call take on a GPU.
_PLANS: dict = {}


def _signature(kind: str, tensors, extra: tuple):
    """A call's cache key, or None when a size is symbolic or a tensor fake (torch.compile: plans are then built
    for each trace, which is when they are needed)."""
    from torch._subclasses.fake_tensor import is_fake

    key = [kind, extra, _dot_options(tensors[0])["TF32"], plan.FORCE_PATH, plan.FORCE_64BIT_OFFSETS,
           FORCE_TORCH_BUCKETING]
    for tensor in tensors:
        if tensor is None:
            key.append(None)
            continue
        if is_fake(tensor) or any(isinstance(v, torch.SymInt) for v in (*tensor.shape, *tensor.stride())):
            return None
        key.append((tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset() % 8, tensor.dtype,
                    tensor.device))
    return tuple(key)


def _cached(signature, build):
    if signature is None:
        return build()
    call_plan = _PLANS.get(signature)
    if call_plan is None:
        call_plan = _PLANS[signature] = build()
    return call_plan


def _bucketing_of(index, geom: plan.Geometry):
    if index is None:
        return None
    if FORCE_TORCH_BUCKETING or geom.hint("N") * (geom.hint("P") + 1) > MAX_KERNEL_PAIRS:
        return "torch"
    return templates_per_program(geom.hint("P"))


def _buckets(index: Optional[torch.Tensor], call_plan: _CallPlan, device: torch.device):
    """(order, start, count) of bucketing.py; placeholders when there is no index (the kernels never read them)."""
    if call_plan.bucketing is None:
        placeholder = torch.empty(1, dtype=torch.int32, device=device)
        return placeholder, placeholder, placeholder
    N, P = call_plan.geom.N, call_plan.geom.P
    if call_plan.bucketing == "torch":
        return sort_by_template_with_torch(index, P)
    order = torch.empty(N, dtype=torch.int32, device=device)
    start = torch.empty(P + 1, dtype=torch.int32, device=device)
    count = torch.empty(P + 1, dtype=torch.int32, device=device)
    block_t = call_plan.bucketing
    wrap_triton(bucket_kernel)[(plan.cdiv(P + 1, block_t),)](index, order, start, count, N, P, BLOCK_T=block_t,
                                                         CHUNK=chunk(block_t), num_warps=4)
    return order, start, count


def _tuning_key(name: str, geom: plan.Geometry, dtype: torch.dtype, fixed: dict) -> tuple:
    """Autotuning key: the launch's fixed arguments, the geometry with N and P rounded up to powers of 2 (a
    training loop's instance count changes every batch: it tunes a handful of times, not once per batch)."""
    sizes = tuple(plan.next_pow2(max(geom.hint(name), 1)) if name in ("N", "P") else
                  (geom.hint(name) if isinstance(getattr(geom, name), (int, torch.SymInt)) else getattr(geom, name))
                  for name in ("P", "C_in", "H", "W", "N", "C_out", "G", "kH", "kW", "stride", "padding",
                               "dilation", "identity"))
    rest = tuple(sorted((key, plan.size_hint(value) if isinstance(value, (int, torch.SymInt)) else value)
                        for key, value in fixed.items() if key not in ("N", "P")))
    return name, str(dtype), sizes, rest


def _step(name: str, kernel, launch: plan.Launch, fixed: dict, geom: plan.Geometry, dtype: torch.dtype) -> _Step:
    fixed = {**fixed, **launch.constants}
    return _Step(name, kernel, launch, fixed, _tuning_key(name, geom, dtype, fixed))


def _launch(step: _Step, tensors: dict, reference: torch.Tensor):
    """Launch a step with one of its candidates (tuning.choose decides which)."""
    def run(config):
        meta = {**step.fixed, **config.kwargs}
        wrap_triton(step.kernel)[step.launch.grid(meta)](**tensors, **meta, **step.launch.arguments(meta),
                                                         num_warps=config.num_warps, num_stages=config.num_stages)

    run(tuning.choose(step.tuning_key, step.launch.candidates, run, reference))


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


def _forward_plan(templates, weight, bias, index, stride, padding, dilation, groups) -> _CallPlan:
    geom = plan.geometry(templates, weight, index, stride, padding, dilation, groups)
    has_bias = bias is not None
    out_elements = geom.N * geom.C_out * geom.out_pixels
    fixed = dict(**_conv_arguments(geom), **_strides("st", templates, "pchw"), **_strides("sw", weight, "nochw"),
                 sb_n=bias.stride(0) if has_bias else 0, sb_o=bias.stride(1) if has_bias else 0, HAS_BIAS=has_bias,
                 WIDE=plan.needs_64bit_offsets(templates, weight, bias, extra_elements=out_elements),
                 CONTIGUOUS=plan.contiguous_taps(geom, templates.stride()[2:]), NO_BOUNDS=plan.no_bounds(geom))
    fixed.update(_pixel_counts(templates, geom))
    del fixed["pixels_div"]  # (the forward kernels count output pixels only)
    if plan.uses_direct_path(geom):
        step = _step("forward_direct", forward_direct_kernel, plan.forward_direct_launch(geom, fixed["WIDE"]), fixed,
                     geom, templates.dtype)
    else:
        fixed.update(_dot_options(templates))
        operands = plan.Operands.of(templates.dtype, fixed["TF32"], fixed["WIDE"])
        step = _step("forward_gemm", forward_gemm_kernel, plan.forward_gemm_launch(geom, operands), fixed, geom,
                     templates.dtype)
    return _CallPlan(geom, _bucketing_of(index, geom), [step])


def _forward(templates, weight, bias, index, stride, padding, dilation, groups):
    call_plan = _cached(_signature("forward", (templates, weight, bias, index), (stride, padding, dilation, groups)),
                        lambda: _forward_plan(templates, weight, bias, index, stride, padding, dilation, groups))
    geom = call_plan.geom
    out = torch.empty((geom.N, geom.C_out, geom.H_out, geom.W_out), dtype=templates.dtype, device=templates.device)
    if out.numel() == 0:
        return out
    order, start, count = _buckets(index, call_plan, templates.device)
    tensors = dict(templates=templates, weight=weight, bias=bias if bias is not None else weight, out=out,
                   order=order, start=start, count=count)
    for step in call_plan.steps:
        _launch(step, tensors, out)
    return out


def _backward_plan(grad_output, templates, weight, index, stride, padding, dilation, groups,
                   compute_grad_bias) -> _CallPlan:
    geom = plan.geometry(templates, weight, index, stride, padding, dilation, groups)
    direct = plan.uses_direct_path(geom)
    dot_options = _dot_options(templates)
    align = _pixel_counts(templates, geom)["ALIGN"]

    def backward_plan_for(wide):
        if direct:
            return plan.backward_direct_plan(geom, wide)
        return plan.backward_gemm_plan(geom, plan.Operands.of(templates.dtype, dot_options["TF32"], wide), align)

    # Without grad_bias (GRAD_BIAS=False) the kernels compile without its sums and stores, and M_b = 0.
    weight_elements, bias_elements = weight.numel(), geom.N * geom.C_out if compute_grad_bias else 0
    wide = plan.needs_64bit_offsets(grad_output, templates, weight, extra_elements=templates.numel())
    backward_plan = backward_plan_for(wide)
    splits = backward_plan.splits
    # (a guard under torch.compile: a graph is specialised on whether grad_weight splits)
    if splits > 1 and not wide and plan.needs_64bit_offsets(extra_elements=splits * weight_elements):
        wide = True  # (the splits do not depend on the offsets' width)
        backward_plan = backward_plan_for(wide)
    fixed = dict(C_in=geom.C_in, M_w=weight_elements, M_b=bias_elements, **_conv_arguments(geom),
                 **_strides("sg", grad_output, "nchw"), **_strides("st", templates, "pchw"),
                 **_strides("sw", weight, "nochw"), WIDE=wide, UNIT_STRIDE=geom.stride == (1, 1),
                 CONTIGUOUS=plan.contiguous_taps(geom, templates.stride()[2:]), NO_BOUNDS=plan.no_bounds(geom),
                 GRAD_BIAS=compute_grad_bias)
    fixed.update(_pixel_counts(templates, geom))
    if direct:
        steps = [_step("backward_direct", backward_direct_kernel, launch, fixed, geom, templates.dtype)
                 for _, launch in backward_plan.launches]
    else:
        fixed.update(dot_options, GRAD_CONTIGUOUS=plan.contiguous_taps(geom, grad_output.stride()[2:]))
        steps = [_step(f"backward_{name}", backward_gemm_kernel, launch, fixed, geom, templates.dtype)
                 for name, launch in backward_plan.launches]
    partial_sum = None
    if splits > 1:
        block = plan.PARTIAL_SUM_BLOCK
        weight_blocks = plan.cdiv(weight_elements, block)
        partial_sum = dict(grid=(weight_blocks + plan.cdiv(bias_elements, block),), M_w=weight_elements,
                           M_b=bias_elements, S=splits, num_w_blocks=weight_blocks, BLOCK=block,
                           WIDE=plan.needs_64bit_offsets(extra_elements=splits * weight_elements))
    return _CallPlan(geom, _bucketing_of(index, geom), steps, splits, partial_sum)


def _backward(grad_output, templates, weight, index, stride, padding, dilation, groups, compute_grad_bias=True):
    call_plan = _cached(
        _signature("backward", (grad_output, templates, weight, index),
                   (stride, padding, dilation, groups, compute_grad_bias)),
        lambda: _backward_plan(grad_output, templates, weight, index, stride, padding, dilation, groups,
                               compute_grad_bias))
    geom = call_plan.geom
    device = templates.device
    grad_templates = torch.empty_like(templates, memory_format=torch.contiguous_format)
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=device)
    grad_bias = torch.empty((geom.N, geom.C_out) if compute_grad_bias else (0,), dtype=weight.dtype, device=device)
    if geom.N * geom.C_out == 0 or grad_output.numel() == 0:
        return grad_templates.zero_(), grad_weight.zero_(), grad_bias.zero_()
    order, start, count = _buckets(index, call_plan, device)
    if call_plan.partial_sum is not None:
        gw_dest = torch.empty((call_plan.splits, grad_weight.numel()), dtype=torch.float32, device=device)
        gb_dest = torch.empty((call_plan.splits, grad_bias.numel()), dtype=torch.float32, device=device)
        # (with no grad_bias, gb_dest is empty and never written)
    else:
        gw_dest, gb_dest = grad_weight, grad_bias
    tensors = dict(grad_out=grad_output, templates=templates, weight=weight, grad_templates=grad_templates,
                   gw_dest=gw_dest, gb_dest=gb_dest, order=order, start=start, count=count)
    for step in call_plan.steps:
        _launch(step, tensors, grad_output)
    if call_plan.partial_sum is not None:
        fixed = dict(call_plan.partial_sum)
        wrap_triton(sum_partials_kernel)[fixed.pop("grid")](
            partial_w=gw_dest, out_w=grad_weight, partial_b=gb_dest, out_b=grad_bias, **fixed, num_warps=4)
    return grad_templates, grad_weight, grad_bias


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


def instance_aware_conv_triton(templates: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               index: Optional[torch.Tensor], stride: list[int], padding: list[int],
                               dilation: list[int], groups: int) -> torch.Tensor:
    """The forward op's implementation (arguments already checked and normalized by ops.py)."""
    with _device_guard(templates):
        return _forward(templates, weight, bias, index, tuple(stride), tuple(padding), tuple(dilation), groups)


def instance_aware_conv_triton_backward(
        grad_output: torch.Tensor, templates: torch.Tensor, weight: torch.Tensor, index: Optional[torch.Tensor],
        stride: list[int], padding: list[int], dilation: list[int], groups: int,
        compute_grad_bias: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_templates, grad_weight, grad_bias), as the C++ backward op returns them: grad_bias an empty (0,)
    tensor when compute_grad_bias is False."""
    with _device_guard(templates):
        return _backward(grad_output, templates, weight, index, tuple(stride), tuple(padding), tuple(dilation),
                         groups, compute_grad_bias)


def register() -> None:
    """Register the two ops and the forward's autograd (pointins_ops.triton does it once, at import). Importing
    this module alone registers nothing, so tools can compile its kernels on any torch. The ops' schemas are
    inferred from the launchers' annotations (see _compat.register_op)."""
    # Interpreted kernels are Python functions that torch.compile cannot trace into a graph, so triton_op's
    # decomposition (which runs the launchers on fake tensors) would fail. The interpreter registers the same
    # launchers as opaque custom ops with shape-only fakes instead; torch.compile then calls them as a black box.
    register_op(FORWARD_OP, instance_aware_conv_triton, traceable=not INTERPRET)
    register_op(BACKWARD_OP, instance_aware_conv_triton_backward, traceable=not INTERPRET)
    if INTERPRET:
        _registration.register_fakes(FORWARD_OP, BACKWARD_OP)
    _registration.register_conv_autograd(FORWARD_OP,
                                         torch.ops.pointins_ops.instance_aware_conv_triton_backward.default)
