"""What the benchmarks time: each pointins backend and each pure-PyTorch formulation users would write.

A provider is a function with the op's signature. The pointins providers go through the public
``instance_aware_conv`` (its input checks included, as users pay them); the references are the
formulations of ``pointins_ops.reference``, timed separately so the fastest of them per row is the
baseline ("best reference"). ``backend="torch"`` is not a provider of its own: it runs one of those
formulations.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch

from pointins_ops import available_backends, instance_aware_conv
from pointins_ops.reference import FORMULATIONS

from .scenarios import Scenario

POINTINS = "pointins"
REFERENCE = "reference"
BEST_REFERENCE = "best reference"


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    kind: str                   # POINTINS or REFERENCE
    fn: Callable
    only_1x1: bool = False      # einsum_1x1 contracts channels and needs a 1x1 kernel

    def applies_to(self, scenario: Scenario) -> bool:
        return not self.only_1x1 or scenario.kernel == 1


def pointins_backends(device: torch.device) -> list[str]:
    """The pointins backends worth timing on ``device``. On CPU tensors Triton runs only in its interpreter
    (TRITON_INTERPRET=1), a tool for testing kernels without a GPU, not something to time."""
    return [name for name in available_backends(device)
            if name != "torch" and not (name == "triton" and device.type == "cpu")]


def make_providers(device: torch.device, backends: list[str] | None = None,
                   references: list[str] | None = None) -> list[Provider]:
    """The pointins backends available on ``device`` (or those named), then the reference formulations."""
    available = pointins_backends(device)
    if backends is None:
        backends = available
    missing = [name for name in backends if name not in available]
    if missing:
        raise ValueError(f"backend(s) {missing} not available on {device}; available: {available}")
    if references is None:
        references = list(FORMULATIONS)
    unknown = [name for name in references if name not in FORMULATIONS]
    if unknown:
        raise ValueError(f"unknown reference formulation(s) {unknown}; known: {list(FORMULATIONS)}")
    providers = [Provider(name, POINTINS, functools.partial(instance_aware_conv, backend=name))
                 for name in backends]
    providers += [Provider(name, REFERENCE, FORMULATIONS[name], only_1x1=(name == "einsum_1x1"))
                  for name in references]
    return providers
