"""Triton backend of ``instance_aware_conv``.

Contract for ops.py: ``AVAILABLE`` (bool), ``serves(device) -> bool``, ``unavailable_reason() -> str`` and
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

# An optional backend: whatever goes wrong while defining the kernels or registering the ops (Triton missing, or
# a Triton that cannot start without a GPU driver, or an API it lacks) must not take the other backends down with
# it. The reason is kept for the error that backend="triton" raises.
try:
    from . import op as _op

    _op.register()
except Exception as error:  # noqa: BLE001 (recorded in IMPORT_ERROR and reported by unavailable_reason)
    _op = None
    IMPORT_ERROR: str | None = f"{type(error).__name__}: {error}"
else:
    IMPORT_ERROR = None

AVAILABLE = _op is not None
INTERPRET = AVAILABLE and _op.INTERPRET

if AVAILABLE:  # under torch.autocast, cast the inputs as F.conv2d's (see pointins_ops/autocast.py)
    from ..autocast import register_autocast

    register_autocast(_op.FORWARD_OP)


def serves(device) -> bool:
    """Whether the Triton kernels can run tensors on ``device``."""
    device = torch.device(device)
    return AVAILABLE and (device.type == "cuda" or (INTERPRET and device.type == "cpu"))


def unavailable_reason() -> str:
    """Why ``serves(device)`` is False, for error messages."""
    if not AVAILABLE:
        return f"the Triton backend failed to import ({IMPORT_ERROR})"
    return "Triton needs a CUDA device, or TRITON_INTERPRET=1 (set before import) for CPU tensors"


def instance_aware_conv(templates, weight, bias, index, stride, padding, dilation, groups):
    """Run the Triton op; arguments are already checked, with stride, padding and dilation as int pairs."""
    return torch.ops.pointins_ops.instance_aware_conv_triton(templates, weight, bias, index, list(stride),
                                                             list(padding), list(dilation), groups)
