"""``instance_aware_conv`` under ``torch.autocast``: inputs are cast exactly as ``F.conv2d``'s are.

``conv2d`` is on autocast's lower-precision list on CPU and CUDA: inside ``torch.autocast(device_type,
dtype)``, every floating-point tensor argument on that device type that is not float64 is cast to ``dtype``
(``torch.get_autocast_dtype(device_type)``: float16 or bfloat16), and the op runs in that dtype. The casts are
ordinary differentiable ``Tensor.to`` calls, so gradients reach the inputs in their own dtypes.

The same rule is applied in three places:

* the public function :func:`pointins_ops.instance_aware_conv` casts before it checks its inputs (every
  backend, the pure-PyTorch one included, then sees a single dtype);
* the compiled op ``torch.ops.pointins_ops.instance_aware_conv`` has AutocastCPU and AutocastCUDA kernels in
  C++ (``csrc/autocast/instance_aware_conv.cpp``), so direct calls and ``torch.compile`` graphs get the casts;
* the Triton op gets the same kernels in Python (:func:`register_autocast`).

Outside autocast nothing is cast and the inputs must share a dtype, as before.
"""

from __future__ import annotations

import torch

# The op's devices. Autocast keys exist for more device types; the op has kernels for these two only.
_DEVICE_TYPES = ("cpu", "cuda")
_DISPATCH_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts ``conv2d``'s inputs to on ``device_type``, or None where autocast is off."""
    if device_type in _DEVICE_TYPES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(tensor, dtype: torch.dtype, device_type: str):
    # at::autocast::cached_cast's eligibility rule: a floating-point tensor on the autocast device type, not
    # float64. Anything else (None, index tensors, bad arguments the checks will reject) passes through.
    if (isinstance(tensor, torch.Tensor) and tensor.device.type == device_type and tensor.is_floating_point()
            and tensor.dtype != torch.float64 and tensor.dtype != dtype):
        return tensor.to(dtype)
    return tensor


def autocast_inputs(templates, weight, bias):
    """``(templates, weight, bias)`` cast as ``F.conv2d`` would cast them here, or unchanged outside autocast.

    The device type is templates' (``weight`` and ``bias`` must be on it anyway: the checks say so).
    """
    if not torch._C._is_any_autocast_enabled() or not isinstance(templates, torch.Tensor):
        return templates, weight, bias
    device_type = templates.device.type
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return templates, weight, bias
    return _cast(templates, dtype, device_type), _cast(weight, dtype, device_type), _cast(bias, dtype, device_type)


# Library objects own their registrations: they live as long as the module.
_LIBRARIES: list[torch.library.Library] = []


def register_autocast(qualname: str) -> None:
    """AutocastCPU and AutocastCUDA kernels for an op with the forward schema
    ``(templates, weight, bias, index, stride, padding, dilation, groups) -> Tensor`` defined in Python
    (the Triton op); the compiled op has the same kernels in C++."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    library = torch.library.Library(namespace, "IMPL")
    _LIBRARIES.append(library)
    for device_type, key in _DISPATCH_KEYS.items():
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(keyset, templates, weight, bias, index, stride, padding, dilation, groups, *,
                   _device_type=device_type, _excluded=excluded):
            dtype = torch.get_autocast_dtype(_device_type)
            with torch._C._ExcludeDispatchKeyGuard(_excluded):
                return op(_cast(templates, dtype, _device_type), _cast(weight, dtype, _device_type),
                          _cast(bias, dtype, _device_type), index, stride, padding, dilation, groups)

        library.impl(name, kernel, key, with_keyset=True)
