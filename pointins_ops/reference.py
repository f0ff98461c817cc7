"""Pure-PyTorch formulations of ``instance_aware_conv``: what users write today without a kernel.

Each function has the op's signature (``stride``, ``padding``, ``dilation`` as ints or pairs) and is
differentiable through PyTorch's own autograd. They are the baselines the benchmarks time, and
``backend="torch"`` runs :func:`instance_aware_conv_reference`, which picks one by shape. They assume
valid input: the public function checks it first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import _pair, conv_output_size


def _gather(templates: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    return templates if index is None else templates.index_select(0, index.long())


def _output_hw(templates, weight, stride, padding, dilation):
    return (conv_output_size(templates.shape[2], weight.shape[3], stride[0], padding[0], dilation[0]),
            conv_output_size(templates.shape[3], weight.shape[4], stride[1], padding[1], dilation[1]))


def grouped_conv2d(templates, weight, bias=None, index=None, *, stride=1, padding=0, dilation=1, groups=1):
    """Gather each instance's template, then one ``F.conv2d`` with ``N * groups`` groups.

    This is how AdelaiDet's CondInst head runs its dynamic convolutions: the N instances become the
    channels of a single image.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    N, C_out = weight.shape[:2]
    if N == 0:
        return unfold_bmm(templates, weight, bias, index, stride=stride, padding=padding, dilation=dilation,
                          groups=groups)
    x = _gather(templates, index)
    x = x.reshape(1, N * x.shape[1], x.shape[2], x.shape[3])
    out = F.conv2d(x, weight.flatten(0, 1), None if bias is None else bias.flatten(), stride, padding, dilation,
                   N * groups)
    return out.view(N, C_out, out.shape[2], out.shape[3])


def unfold_bmm(templates, weight, bias=None, index=None, *, stride=1, padding=0, dilation=1, groups=1):
    """Gather, ``F.unfold`` (im2col) every instance's template, then one batched matmul per group."""
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    N, C_out, C_in_per_group, kH, kW = weight.shape
    H_out, W_out = _output_hw(templates, weight, stride, padding, dilation)
    x = _gather(templates, index)
    columns = F.unfold(x, (kH, kW), dilation=dilation, padding=padding, stride=stride)
    columns = columns.view(N, groups, C_in_per_group * kH * kW, H_out * W_out)
    kernels = weight.reshape(N, groups, C_out // groups, C_in_per_group * kH * kW)
    out = torch.matmul(kernels, columns).view(N, C_out, H_out, W_out)
    if bias is not None:
        out = out + bias[:, :, None, None]
    return out


def einsum_1x1(templates, weight, bias=None, index=None, *, stride=1, padding=0, dilation=1, groups=1):
    """For 1x1 kernels: gather, then one ``torch.einsum`` contracting the channels (dilation is moot)."""
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    N, C_out, C_in_per_group, kH, kW = weight.shape
    if (kH, kW) != (1, 1):
        raise ValueError(f"einsum_1x1: weight must be a 1x1 kernel; got {kH} x {kW}")
    x = _gather(templates, index)
    if padding != (0, 0):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    x = x[:, :, ::stride[0], ::stride[1]]
    x = x.reshape(N, groups, C_in_per_group, x.shape[2], x.shape[3])
    kernels = weight.reshape(N, groups, C_out // groups, C_in_per_group)
    out = torch.einsum("ngchw,ngoc->ngohw", x, kernels).reshape(N, C_out, x.shape[3], x.shape[4])
    if bias is not None:
        out = out + bias[:, :, None, None]
    return out


def per_template_conv2d(templates, weight, bias=None, index=None, *, stride=1, padding=0, dilation=1, groups=1):
    """One ``F.conv2d`` per used template with all of its instances' kernels stacked as output channels.

    This is what SOLOv2 and YOLACT do when the template is an image's feature map and the instances are
    that image's objects: it reuses each template for all of its instances, at the price of a Python loop.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    N, C_out, _, kH, kW = weight.shape
    H_out, W_out = _output_hw(templates, weight, stride, padding, dilation)
    if index is None:
        index = torch.arange(N, device=templates.device)
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index.long(), minlength=templates.shape[0]).tolist()
    outs = []
    start = 0
    for p, count in enumerate(counts):
        if count == 0:
            continue
        members = order[start:start + count]
        start += count
        # Interleave as (instance, group, channel) -> (group, instance, channel) so that conv2d's groups
        # see every instance's kernels of one group together.
        w = weight.index_select(0, members)
        w = w.view(count, groups, C_out // groups, *w.shape[2:]).transpose(0, 1).reshape(count * C_out, *w.shape[2:])
        b = None
        if bias is not None:
            b = bias.index_select(0, members).view(count, groups, C_out // groups).transpose(0, 1).reshape(-1)
        y = F.conv2d(templates[p:p + 1], w, b, stride, padding, dilation, groups)
        outs.append(y.view(groups, count, C_out // groups, H_out, W_out).transpose(0, 1).reshape(count, C_out, H_out, W_out))
    if not outs:
        return unfold_bmm(templates, weight, bias, index, stride=stride, padding=padding, dilation=dilation,
                          groups=groups)
    stacked = torch.cat(outs)
    # Undo the sort: row i of `stacked` belongs to instance order[i].
    return stacked.index_select(0, torch.argsort(order))


FORMULATIONS = {
    "grouped_conv2d": grouped_conv2d,
    "unfold_bmm": unfold_bmm,
    "einsum_1x1": einsum_1x1,
    "per_template_conv2d": per_template_conv2d,
}


def instance_aware_conv_reference(templates, weight, bias=None, index=None, *, stride=1, padding=0, dilation=1,
                                  groups=1):
    """``backend="torch"``: the formulation that suits the shape best.

    1x1 kernels contract channels with einsum (no im2col); everything else uses one grouped conv2d,
    which both cuDNN and oneDNN run without materializing an im2col of all instances.
    """
    if weight.shape[3:] == (1, 1):
        return einsum_1x1(templates, weight, bias, index, stride=stride, padding=padding, dilation=dilation,
                          groups=groups)
    return grouped_conv2d(templates, weight, bias, index, stride=stride, padding=padding, dilation=dilation,
                          groups=groups)
