"""The benchmark scenarios: shapes taken from the models that use instance-aware convolution.

Each scenario is stated at GPU scale, as in the benchmark issue; ``scaled("cpu")`` divides N and P by 16
(at least 1) and keeps channels, sizes and kernels, and ``scaled("quick")`` shrinks further to the tiny
shapes CI runs. The operation count and the fewest bytes each mode must move live here too, so the
TFLOP/s, GB/s and roofline columns all derive from one place.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import torch

from pointins_ops.checks import conv_output_size

MODES = ("forward", "backward", "forward+backward")
INDEX_BYTES = 8  # the benchmarks pass int64 index, as torch.randperm / repeat_interleave produce it


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    P: int
    C_in: int
    H: int
    W: int
    N: int
    C_out: int
    kernel: int
    padding: int
    groups: int
    bias: bool
    # "shuffled": N / P instances per template in random order (PointINS: several anchors per point);
    # "identity": no index, instance n uses template n; "image": templates are images and the instances
    # are listed image by image, N / P per image (CondInst, SOLOv2, YOLACT).
    index: str
    models: str

    def scaled(self, scale: str) -> "Scenario":
        """``gpu``: as stated; ``cpu``: N and P divided by 16; ``quick``: N and P by 64, H and W by 4."""
        if scale == "gpu":
            return self
        if scale == "cpu":
            divisor, spatial = 16, 1
        elif scale == "quick":
            divisor, spatial = 64, 4
        else:
            raise ValueError(f"scale must be 'gpu', 'cpu' or 'quick'; got {scale!r}")
        P, N = max(self.P // divisor, 1), max(self.N // divisor, 1)
        if self.index == "identity":
            N = P
        H, W = max(self.H // spatial, self.kernel), max(self.W // spatial, self.kernel)
        return dataclasses.replace(self, P=P, N=N, H=H, W=W)

    @property
    def templates_shape(self) -> tuple[int, ...]:
        return (self.P, self.C_in, self.H, self.W)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.N, self.C_out, self.C_in // self.groups, self.kernel, self.kernel)

    @property
    def output_shape(self) -> tuple[int, ...]:
        size = lambda n: conv_output_size(n, self.kernel, 1, self.padding, 1)  # noqa: E731
        return (self.N, self.C_out, size(self.H), size(self.W))

    @property
    def conv_args(self) -> dict:
        return dict(stride=1, padding=self.padding, dilation=1, groups=self.groups)

    def describe(self) -> str:
        return (f"templates {self.templates_shape}, weight {self.weight_shape}{' + bias' if self.bias else ''}, "
                f"padding {self.padding}, groups {self.groups}, index {self.index}")

    def flops(self, mode: str) -> int:
        """2 flops per multiply-add of the convolution. The backward computes grad_templates and grad_weight,
        each as many multiply-adds as the forward. Bias additions and grad_bias sums are not counted."""
        N, C_out, H_out, W_out = self.output_shape
        multiply_adds = N * C_out * H_out * W_out * (self.C_in // self.groups) * self.kernel * self.kernel
        return 2 * multiply_adds * {"forward": 1, "backward": 2, "forward+backward": 3}[mode]

    def min_bytes(self, mode: str, dtype: torch.dtype) -> int:
        """The fewest bytes the mode must move: each input read once, each output written once.

        forward reads templates, weight, bias, index and writes the output; backward reads grad_output,
        templates, weight, index and writes grad_templates, grad_weight, grad_bias; forward+backward does
        both but reads the inputs once.
        """
        item = torch.empty((), dtype=dtype).element_size()
        templates, weight = math.prod(self.templates_shape), math.prod(self.weight_shape)
        bias = self.N * self.C_out if self.bias else 0
        output = math.prod(self.output_shape)
        index = 0 if self.index == "identity" else self.N * INDEX_BYTES
        elements = {"forward": templates + weight + bias + output,
                    "backward": output + 2 * templates + 2 * weight + bias,
                    "forward+backward": 2 * (templates + weight + bias + output)}[mode]
        return elements * item + index

    def make_index(self, device, generator: torch.Generator) -> torch.Tensor | None:
        if self.index == "identity":
            return None
        if self.index == "shuffled":
            order = torch.randperm(self.N, generator=generator, device=generator.device)
            return (order % self.P).to(device)
        if self.index == "image":
            return (torch.arange(self.N) * self.P // self.N).to(device)
        raise ValueError(f"unknown index kind {self.index!r}")

    def make_inputs(self, dtype: torch.dtype, device: torch.device, seed: int) -> "Inputs":
        """Fresh random inputs scaled so outputs and gradients are O(1); never zeros."""
        generator = torch.Generator(device=device).manual_seed(seed)
        fan_in = (self.C_in // self.groups) * self.kernel * self.kernel

        def randn(*shape, scale=1.0):
            return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)

        templates = randn(*self.templates_shape)
        weight = randn(*self.weight_shape, scale=1 / math.sqrt(fan_in))
        bias = randn(self.N, self.C_out) if self.bias else None
        index = self.make_index(device, generator)
        grad_output = randn(*self.output_shape)
        return Inputs(templates, weight, bias, index, grad_output)


@dataclasses.dataclass
class Inputs:
    templates: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    index: torch.Tensor | None
    grad_output: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.templates, self.weight, self.bias, self.index, self.grad_output) if t is not None)


def input_seed(scenario: Scenario, dtype: torch.dtype, set_number: int) -> int:
    """A seed per (scenario, dtype, input set), stable across runs and processes."""
    return zlib.crc32(f"{scenario.name}/{dtype}/{set_number}".encode())


SCENARIOS = {s.name: s for s in [
    Scenario("pointins-train", P=1024, C_in=16, H=14, W=14, N=4096, C_out=16, kernel=3, padding=1, groups=1,
             bias=True, index="shuffled", models="PointINS training, 16 images"),
    Scenario("pointins-1x1", P=1024, C_in=64, H=14, W=14, N=4096, C_out=64, kernel=1, padding=0, groups=1,
             bias=True, index="shuffled", models="PointINS, 1x1 weights"),
    Scenario("pointins-dw", P=1024, C_in=64, H=14, W=14, N=4096, C_out=64, kernel=3, padding=1, groups=64,
             bias=False, index="shuffled", models="depthwise variant"),
    Scenario("pointins-infer", P=100, C_in=16, H=14, W=14, N=100, C_out=16, kernel=3, padding=1, groups=1,
             bias=True, index="identity", models="inference, 100 detections"),
    Scenario("condinst", P=8, C_in=16, H=100, W=136, N=512, C_out=8, kernel=1, padding=0, groups=1,
             bias=True, index="image", models="CondInst first layer"),
    Scenario("solov2", P=2, C_in=256, H=200, W=272, N=400, C_out=1, kernel=1, padding=0, groups=1,
             bias=False, index="image", models="SOLOv2 mask kernels"),
    Scenario("yolact", P=8, C_in=32, H=138, W=138, N=800, C_out=1, kernel=1, padding=0, groups=1,
             bias=False, index="image", models="YOLACT coefficients"),
]}
