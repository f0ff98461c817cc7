"""Input checks for ``instance_aware_conv``, shared by every backend.

The C++ kernels repeat the same checks (``csrc/instance_aware_conv.cpp``) so that a direct call of
``torch.ops.pointins_ops.instance_aware_conv`` is safe too; this module is what the public function and the
Python backends (Triton, pure PyTorch) rely on, and it raises the friendlier Python exception types.
"""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _pair(value, name: str) -> tuple[int, int]:
    if type(value) is int:  # the common cases first, without the generic checks below (a bool is not an int here)
        return value, value
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value
    if isinstance(value, (list, tuple)):
        items = tuple(value) * 2 if len(value) == 1 else tuple(value)  # conv2d expands a single value too
    else:
        items = (value, value)
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"instance_aware_conv: {name} must be an int or a pair of ints; got {value!r}")
    return items


def _mixed_dtypes_hint(templates: torch.Tensor) -> str:
    """How mixed dtypes come about and go away, for the dtype errors (the public function has already applied
    autocast's casts when it checks)."""
    if torch.is_autocast_enabled(templates.device.type):
        return (f" (torch.autocast casts the inputs to {torch.get_autocast_dtype(templates.device.type)} as it "
                "casts F.conv2d's, but leaves float64 tensors as they are)")
    return (" (outside torch.autocast the inputs must share one dtype; inside it they are cast as F.conv2d's "
            "are)")


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """The output length of a convolution along one axis, as ``torch.nn.functional.conv2d`` computes it."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_instance_aware_conv_inputs(templates, weight, bias, index, stride, padding, dilation, groups,
                                     *, check_index_values: bool = True):
    """Validate the op's arguments and return ``(stride, padding, dilation, groups)`` normalized to pairs.

    Raises TypeError for wrong types and dtypes, ValueError for inconsistent shapes and hyper-parameters,
    IndexError for index values outside [0, P). ``check_index_values=False`` skips the one check that
    reads tensor data (the kernels then check it themselves, on the device).
    """
    for name, tensor in (("templates", templates), ("weight", weight)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"instance_aware_conv: {name} must be a torch.Tensor; got {type(tensor).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"instance_aware_conv: bias must be a torch.Tensor or None; got {type(bias).__name__}")
    if index is not None and not isinstance(index, torch.Tensor):
        raise TypeError(f"instance_aware_conv: index must be a torch.Tensor or None; got {type(index).__name__}")

    if templates.dim() != 4:
        raise ValueError("instance_aware_conv: templates must have 4 dimensions (P, C_in, H, W); "
                         f"got shape {tuple(templates.shape)}")
    if weight.dim() != 5:
        raise ValueError("instance_aware_conv: weight must have 5 dimensions (N, C_out, C_in // groups, kH, kW); "
                         f"got shape {tuple(weight.shape)}")

    if templates.dtype not in _FLOAT_DTYPES:
        raise TypeError("instance_aware_conv: templates must be float16, bfloat16, float32 or float64; "
                        f"got {templates.dtype}")
    if weight.dtype != templates.dtype:
        raise TypeError(f"instance_aware_conv: weight.dtype must equal templates.dtype ({templates.dtype}); "
                        f"got {weight.dtype}{_mixed_dtypes_hint(templates)}")
    if bias is not None and bias.dtype != templates.dtype:
        raise TypeError(f"instance_aware_conv: bias.dtype must equal templates.dtype ({templates.dtype}); "
                        f"got {bias.dtype}{_mixed_dtypes_hint(templates)}")
    device = templates.device
    for name, tensor in (("weight", weight), ("bias", bias), ("index", index)):
        if tensor is not None and tensor.device != device:
            raise ValueError(f"instance_aware_conv: {name} must be on templates' device ({device}); "
                             f"got {tensor.device}")

    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise TypeError(f"instance_aware_conv: groups must be an int; got {groups!r}")
    if min(stride) < 1:
        raise ValueError(f"instance_aware_conv: stride must be >= 1; got {stride}")
    if min(dilation) < 1:
        raise ValueError(f"instance_aware_conv: dilation must be >= 1; got {dilation}")
    if min(padding) < 0:
        raise ValueError(f"instance_aware_conv: padding must be >= 0; got {padding}")
    if groups < 1:
        raise ValueError(f"instance_aware_conv: groups must be >= 1; got {groups}")

    P, C_in, H, W = templates.shape
    N, C_out, C_in_per_group, kH, kW = weight.shape
    if C_in % groups != 0:
        raise ValueError(f"instance_aware_conv: templates.shape[1] (C_in = {C_in}) must be divisible by "
                         f"groups ({groups})")
    if C_out % groups != 0:
        raise ValueError(f"instance_aware_conv: weight.shape[1] (C_out = {C_out}) must be divisible by "
                         f"groups ({groups})")
    if C_in_per_group * groups != C_in:
        raise ValueError("instance_aware_conv: weight.shape[2] * groups must equal templates.shape[1] (C_in); "
                         f"got {C_in_per_group} * {groups} != {C_in}")
    if kH < 1 or kW < 1:
        raise ValueError(f"instance_aware_conv: the kernel size weight.shape[3:] must be >= 1; got ({kH}, {kW})")
    if bias is not None and tuple(bias.shape) != (N, C_out):
        raise ValueError(f"instance_aware_conv: bias must have shape (N, C_out) = ({N}, {C_out}); "
                         f"got {tuple(bias.shape)}")

    H_out = conv_output_size(H, kH, stride[0], padding[0], dilation[0])
    W_out = conv_output_size(W, kW, stride[1], padding[1], dilation[1])
    if H_out < 1 or W_out < 1:
        raise ValueError(f"instance_aware_conv: the output would be {H_out} x {W_out} (H_out x W_out); the padded "
                         f"template ({H} x {W}, padding {padding}) is smaller than the dilated kernel "
                         f"({kH} x {kW}, dilation {dilation})")

    if index is None:
        if N != P:
            raise ValueError("instance_aware_conv: without index, weight.shape[0] (N) must equal templates.shape[0] "
                             f"(P); got N = {N}, P = {P}")
    else:
        if index.dtype not in _INDEX_DTYPES:
            raise TypeError(f"instance_aware_conv: index must be int32 or int64; got {index.dtype}")
        if index.dim() != 1 or index.shape[0] != N:
            raise ValueError(f"instance_aware_conv: index must have shape (N,) = ({N},); got {tuple(index.shape)}")
        if check_index_values:
            check_index_values_in_range(index, P)
    return stride, padding, dilation, groups


def check_index_values_in_range(index: torch.Tensor, P: int) -> None:
    """IndexError unless every value of ``index`` lies in [0, P). Reads the data: one device sync on CUDA."""
    if index.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(index)).tolist()
    if low < 0 or high >= P:
        bad = low if low < 0 else high
        raise IndexError(f"instance_aware_conv: index values must lie in [0, P) = [0, {P}); got {bad}")
