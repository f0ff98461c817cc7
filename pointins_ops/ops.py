"""The public op, its registration with torch.library, and the choice of backend."""

from __future__ import annotations

import os
import warnings

import torch

from . import export, reference
from ._registration import register_fakes
from .autocast import autocast_inputs
from .checks import check_index_values_in_range, check_instance_aware_conv_inputs

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
BACKEND_ENV = "POINTINS_OPS_BACKEND"

try:
    from . import _C  # noqa: F401  (loading the library registers the op and its kernels)
except ImportError as error:  # the package was installed without building its extension
    _C = None
    _C_IMPORT_ERROR = error
else:
    _C_IMPORT_ERROR = None
    # Autograd of the compiled op is registered in C++ (csrc/autograd/); the fakes are shape functions.
    register_fakes("pointins_ops::instance_aware_conv", "pointins_ops::instance_aware_conv_backward")


# Fixed once the library is loaded; kept as plain data so torch.compile traces the backend choice freely.
_COMPILED_KEYS = frozenset(
    key for key in ("CPU", "CUDA")
    if _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key("pointins_ops::instance_aware_conv", key))

try:
    from . import triton as _triton_backend
except ImportError:  # Triton is not installed
    _triton_backend = None


def _has_compiled_kernel(dispatch_key: str) -> bool:
    return dispatch_key in _COMPILED_KEYS


def _triton_serves(device: torch.device) -> bool:
    return _triton_backend is not None and _triton_backend.AVAILABLE and _triton_backend.serves(device)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run tensors on ``device`` in this installation."""
    device = torch.device(device)
    names = []
    if device.type == "cpu" and _has_compiled_kernel("CPU"):
        names.append("cpu")
    if device.type == "cuda" and _has_compiled_kernel("CUDA"):
        names.append("cuda")
    if _triton_serves(device):
        names.append("triton")
    names.append("torch")
    return names


_warned_fallback = False


def _warn_fallback(device: torch.device) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        reason = f" ({_C_IMPORT_ERROR})" if _C_IMPORT_ERROR is not None else ""
        warnings.warn(f"pointins_ops: no compiled kernel for {device.type} tensors{reason}; falling back to the "
                      "pure-PyTorch reference (backend='torch'). Build the extension (see README) for speed.",
                      RuntimeWarning, stacklevel=4)


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"instance_aware_conv: environment variable {BACKEND_ENV} must be one of {BACKENDS}; "
                             f"got {backend!r}")
    elif backend not in BACKENDS:
        raise ValueError(f"instance_aware_conv: backend must be one of {BACKENDS}; got {backend!r}")

    if backend == "auto":
        if device.type == "cpu" and _has_compiled_kernel("CPU"):
            return "cpu"
        if device.type == "cuda":
            if _has_compiled_kernel("CUDA"):
                return "cuda"
            if _triton_serves(device) and dtype != torch.float64:
                return "triton"
        _warn_fallback(device)
        return "torch"

    if backend in ("cpu", "cuda"):
        if device.type != backend:
            raise ValueError(f"instance_aware_conv: backend={backend!r} needs {backend} tensors; got tensors on "
                             f"{device}")
        if not _has_compiled_kernel(backend.upper()):
            why = (f"the compiled extension failed to import: {_C_IMPORT_ERROR}" if _C is None else
                   "the extension was built without CUDA (rebuild with FORCE_CUDA=1, see README)")
            raise RuntimeError(f"instance_aware_conv: backend={backend!r} is not available: {why}")
    elif backend == "triton":
        if dtype == torch.float64:
            raise TypeError("instance_aware_conv: backend='triton' supports float16, bfloat16 and float32; got "
                            "torch.float64 (use backend='cuda', 'cpu' or 'torch')")
        if not _triton_serves(device):
            why = _triton_backend.unavailable_reason() if _triton_backend is not None else "no Triton backend"
            raise RuntimeError(f"instance_aware_conv: backend='triton' cannot run tensors on {device}: {why}")
    return backend


def instance_aware_conv(templates: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        index: torch.Tensor | None = None, *, stride=1, padding=0, dilation=1, groups: int = 1,
                        backend: str = "auto") -> torch.Tensor:
    """Convolve each instance's template with that instance's own kernel.

    ``out[n] = F.conv2d(templates[index[n]][None], weight[n], bias[n], stride, padding, dilation, groups)[0]``

    Args:
        templates: (P, C_in, H, W), one instance-agnostic template per point of interest.
        weight: (N, C_out, C_in // groups, kH, kW), one kernel per instance.
        bias: (N, C_out) or None.
        index: (N,) int32 or int64 with values in [0, P): the template of each instance. Instances may share
            a template, templates may be unused, and the order is free. None means N == P and instance n
            uses template n.
        stride, padding, dilation: int or pair, as in ``torch.nn.functional.conv2d``.
        groups: as in ``torch.nn.functional.conv2d``; C_in and C_out must be divisible by it.
        backend: "auto" (the compiled kernel for the tensors' device: "cpu" or "cuda", else "triton" on CUDA,
            else "torch" with a one-time warning), "cpu", "cuda", "triton" or "torch" (pure PyTorch). When it
            is "auto", the environment variable ``POINTINS_OPS_BACKEND`` may name another.

    Returns:
        (N, C_out, H_out, W_out) in templates' dtype and device, contiguous; H_out and W_out as conv2d's.

    Differentiable w.r.t. templates, weight and bias (not twice). grad_templates[p] sums over the instances
    that use template p; unused templates get zeros. float16, bfloat16 and float32 accumulate in float32;
    float64 runs on the cpu, cuda and torch backends ("auto" never picks Triton for it).
    """
    # Reading index values needs the data, so under torch.compile and while a CUDA graph is being captured
    # the host check is skipped: the C++ CPU kernel then raises, the CUDA and Triton kernels never read an
    # out-of-range template and fill that instance's output rows with NaN. The C++ CPU kernel checks the values
    # itself as it buckets the instances (the same IndexError), so it never needs the host check.
    check_values = not torch.compiler.is_compiling() and not (
        isinstance(templates, torch.Tensor) and templates.is_cuda and torch.cuda.is_current_stream_capturing())
    templates, weight, bias = autocast_inputs(templates, weight, bias)  # as F.conv2d's; a no-op outside autocast
    stride, padding, dilation, groups = check_instance_aware_conv_inputs(
        templates, weight, bias, index, stride, padding, dilation, groups, check_index_values=False)
    chosen = _resolve_backend(backend, templates.device, templates.dtype)
    if check_values and index is not None and chosen != "cpu":
        check_index_values_in_range(index, templates.shape[0])
    if not check_values and export.is_onnx_exporting():  # standard ONNX ops, dynamic sizes (see export.py)
        return export.instance_aware_conv_exportable(templates, weight, bias, index, stride=stride, padding=padding,
                                                     dilation=dilation, groups=groups)
    if chosen in ("cpu", "cuda"):
        return torch.ops.pointins_ops.instance_aware_conv(templates, weight, bias, index, stride, padding, dilation,
                                                          groups)
    if chosen == "triton":
        return _triton_backend.instance_aware_conv(templates, weight, bias, index, stride, padding, dilation, groups)
    return reference.instance_aware_conv_reference(templates, weight, bias, index, stride=stride, padding=padding,
                                                   dilation=dilation, groups=groups)
