"""Triton backend of ``instance_aware_conv``.

Contract for ops.py: ``AVAILABLE`` (bool), ``serves(device) -> bool`` and
``instance_aware_conv(templates, weight, bias, index, stride, padding, dilation, groups)`` taking checked,
normalized arguments and returning a differentiable tensor.

Modules: ``op`` (launchers and torch.library registration), ``plan`` (paths, tiles, splits, grids and autotuning
candidates, decided on the host from the shape), ``tuning`` (which candidate runs: never benchmarked under
CUDA-graph capture or tracing), ``bucketing`` (instances sorted by template in one small kernel), ``forward`` and
``backward`` (the kernels), ``common`` (pieces they share).

The kernels run on CUDA tensors, and on CPU tensors under the Triton interpreter: set ``TRITON_INTERPRET=1``
before this package is first imported (Triton decides at import time whether kernels are compiled or
interpreted).
"""

from __future__ import annotations

import torch

try:
    from . import op as _op
except ImportError:  # Triton is not installed
    _op = None
else:
    _op.register()

AVAILABLE = _op is not None
INTERPRET = AVAILABLE and _op.INTERPRET


def serves(device) -> bool:
    """Whether the Triton kernels can run tensors on ``device``."""
    device = torch.device(device)
    return AVAILABLE and (device.type == "cuda" or (INTERPRET and device.type == "cpu"))


def instance_aware_conv(templates, weight, bias, index, stride, padding, dilation, groups):
    """Run the Triton op; arguments are already checked, with stride, padding and dilation as int pairs."""
    return torch.ops.pointins_ops.instance_aware_conv_triton(templates, weight, bias, index, list(stride),
                                                             list(padding), list(dilation), groups)
