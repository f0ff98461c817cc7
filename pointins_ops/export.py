"""``instance_aware_conv`` for graph export: a pure-PyTorch formulation whose every op has a standard ONNX
translation that keeps N, P, H and W dynamic.

The usual pure-PyTorch tricks cannot be exported with a dynamic number of instances: the grouped ``conv2d``
(CondInst's and SOLOv2's heads) needs ``groups = N``, a static attribute of ONNX's Conv, and a loop over
templates unrolls to the number of templates seen at export. This formulation uses only ops whose ONNX
translation takes its sizes from the tensors at run time:

1. pad the templates once (``Pad``);
2. for each of the kH * kW kernel taps, one strided slice of every padded template (``Slice``), stacked into
   im2col columns of shape (P, groups, C_in / groups * kH * kW, H_out * W_out) (``Concat``, ``Reshape``);
3. gather each instance's columns by its template index (``Gather``): templates are unfolded once, however
   many instances share them;
4. one batched matrix product of each instance's kernel with its columns (``MatMul``), plus the bias (``Add``).

The kernel size, stride, padding, dilation and groups are Python ints and become constants of the graph.
:func:`pointins_ops.instance_aware_conv` runs this formulation whenever ``torch.onnx.export`` is tracing it,
so ``torch.onnx.export(model, args, dynamo=True)`` needs no custom op domain and no translation table.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .checks import _pair

__all__ = ["decompositions", "instance_aware_conv_exportable", "is_onnx_exporting"]


def is_onnx_exporting() -> bool:
    """Whether ``torch.onnx.export`` is running, also while Dynamo traces the model.

    ``torch.onnx.export(..., dynamo=True)`` first tries ``torch.export.export(strict=False)``, then
    ``strict=True``, where Dynamo constant-folds ``torch.onnx.is_in_onnx_export()`` to False. The exporter's flag
    that function reads is read here directly, which Dynamo evaluates (and guards on) like any module attribute.
    Looked up in ``sys.modules``: when torch.onnx was never imported, nothing is being exported (and importing it
    would cost tens of milliseconds).
    """
    flags = sys.modules.get("torch.onnx._internal.exporter._flags")
    if flags is not None and getattr(flags, "_is_onnx_exporting", False):
        return True
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()  # the TorchScript exporter's flag


def instance_aware_conv_exportable(templates, weight, bias=None, index=None, *, stride=1, padding=0, dilation=1,
                                   groups=1):
    """``instance_aware_conv`` from slices, a gather and one batched matmul; exports to ONNX with dynamic sizes.

    Takes the op's arguments (already checked: this function assumes valid input) and returns the same result
    up to floating-point rounding (each output element is one dot product of length C_in / groups * kH * kW,
    accumulated in the inputs' dtype by ``matmul``). Differentiable through PyTorch's own autograd.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    P, C_in, H, W = templates.shape
    N, C_out, C_in_per_group, kH, kW = weight.shape
    H_out = (H + 2 * padding[0] - dilation[0] * (kH - 1) - 1) // stride[0] + 1
    W_out = (W + 2 * padding[1] - dilation[1] * (kW - 1) - 1) // stride[1] + 1
    x = templates
    if padding[0] or padding[1]:
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    # One strided window per kernel tap: tap (i, j) of output pixel (r, c) reads padded pixel
    # (r * stride + i * dilation, c * stride + j * dilation).
    taps = [x[:, :, i * dilation[0]:i * dilation[0] + (H_out - 1) * stride[0] + 1:stride[0],
              j * dilation[1]:j * dilation[1] + (W_out - 1) * stride[1] + 1:stride[1]]
            for i in range(kH) for j in range(kW)]
    # (P, C_in, kH * kW, H_out, W_out): the reduction index of group g is (channel in g, tap), the order in which
    # weight[n, o] flattens (C_in / groups, kH, kW).
    columns = torch.stack(taps, dim=2).reshape(P, groups, C_in_per_group * kH * kW, H_out * W_out)
    if index is not None:
        columns = columns.index_select(0, index)
    kernels = weight.reshape(N, groups, C_out // groups, C_in_per_group * kH * kW)
    out = torch.matmul(kernels, columns).reshape(N, C_out, H_out, W_out)
    if bias is not None:
        out = out + bias[:, :, None, None]
    return out


def _registered_op_decomposition(templates, weight, bias, index, stride, padding, dilation, groups):
    return instance_aware_conv_exportable(templates, weight, bias, index, stride=stride, padding=padding,
                                          dilation=dilation, groups=groups)


def decompositions() -> dict:
    """A decomposition table that rewrites the registered ops (``torch.ops.pointins_ops.instance_aware_conv``
    and the Triton op) into :func:`instance_aware_conv_exportable`.

    Only needed for graphs that contain the registered op itself: programs from ``torch.export.export`` of a
    model that calls the op directly through ``torch.ops``. Decompose them before converting to ONNX:
    ``torch.onnx.export(ep.run_decompositions(pointins_ops.export.decompositions()), dynamo=True)``.
    Models that call :func:`pointins_ops.instance_aware_conv` need nothing: the public function exports as
    this formulation by itself.
    """
    table = {}
    for name in ("instance_aware_conv", "instance_aware_conv_triton"):  # whichever this installation registered
        packet = getattr(torch.ops.pointins_ops, name, None)
        if packet is not None:
            table[packet.default] = _registered_op_decomposition
    return table
