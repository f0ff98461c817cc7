"""Triton backend of instance_aware_conv (kernels land with the Triton issue).

Contract for ops.py: ``AVAILABLE`` (bool), ``serves(device) -> bool`` and
``instance_aware_conv(templates, weight, bias, index, stride, padding, dilation, groups)`` taking checked,
normalized arguments and returning a differentiable tensor.
"""

AVAILABLE = False


def serves(device) -> bool:
    return False
