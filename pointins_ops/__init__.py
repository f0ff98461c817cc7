"""pointins_ops: instance-aware convolution, one op with C++, CUDA, Triton and pure-PyTorch backends."""

from .checks import check_instance_aware_conv_inputs
from .ops import BACKENDS, available_backends, instance_aware_conv

__all__ = ["BACKENDS", "available_backends", "check_instance_aware_conv_inputs", "instance_aware_conv"]
