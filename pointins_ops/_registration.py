"""Fake (meta) registrations shared by the op's registered implementations, and the Triton op's autograd.

The compiled op ``pointins_ops::instance_aware_conv`` (CPU and CUDA kernels) has its autograd in C++
(``csrc/autograd/``); the Triton op registers the same formula here: a separate backward op that returns
grad_templates, grad_weight and grad_bias.
"""

from __future__ import annotations

import torch

from .checks import conv_output_size


def output_shape(templates, weight, stride, padding, dilation):
    """(N, C_out, H_out, W_out), from sizes only (works on fake and symbolic shapes)."""
    return (weight.shape[0], weight.shape[1],
            conv_output_size(templates.shape[2], weight.shape[3], stride[0], padding[0], dilation[0]),
            conv_output_size(templates.shape[3], weight.shape[4], stride[1], padding[1], dilation[1]))


def register_fakes(forward_name: str, backward_name: str) -> None:
    """Shape functions for torch.compile and FakeTensor tracing; outputs are always contiguous."""

    @torch.library.register_fake(forward_name)
    def _forward_fake(templates, weight, bias, index, stride, padding, dilation, groups):
        return templates.new_empty(output_shape(templates, weight, stride, padding, dilation))

    @torch.library.register_fake(backward_name)
    def _backward_fake(grad_output, templates, weight, index, stride, padding, dilation, groups,
                       compute_grad_bias=True):
        # without compute_grad_bias, grad_bias is an empty (0,) tensor
        return (templates.new_empty(templates.shape), weight.new_empty(weight.shape),
                weight.new_empty(weight.shape[:2] if compute_grad_bias else (0,)))


def register_conv_autograd(forward_name: str, backward_op) -> None:
    """Differentiate ``forward_name`` with ``backward_op`` (same arguments as the backward schema).

    The backward op is not itself differentiable: double backward raises.
    """

    def setup_context(ctx, inputs, output):
        templates, weight, bias, index, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(templates, weight, index)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_output):
        templates, weight, index = ctx.saved_tensors
        grad_templates, grad_weight, grad_bias = backward_op(grad_output.contiguous(), templates, weight, index,
                                                             *ctx.conv_args, ctx.has_bias)
        return (grad_templates, grad_weight, grad_bias if ctx.has_bias else None, None, None, None, None, None)

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)
