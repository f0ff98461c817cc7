"""Every difference between the torch versions pointins supports, in one place.

The supported range is the one CI proves (README, "Quickstart"): torch 2.9 to 2.14.1. The rest of the package calls
these helpers and never checks a version itself; when a version leaves the range, delete what served only it.
"""

from __future__ import annotations

from typing import Callable

import torch


def register_op(name: str, fn: Callable, *, traceable: bool) -> None:
    """Register ``fn`` as the operator ``name``: a ``torch.library.triton_op`` when ``traceable`` (torch.compile
    then traces the Triton kernels it launches), else an opaque ``torch.library.custom_op``.

    The schema is inferred from ``fn``'s type annotations, on every torch: before 2.14, triton_op ignores
    ``schema=`` and always infers it (read in 2.9, 2.11 and 2.13; it raises when an argument has no annotation),
    and 2.14 honours it, so a given schema would make the op differ between versions. ``int`` becomes ``SymInt``.
    """
    define = torch.library.triton_op if traceable else torch.library.custom_op
    define(name, mutates_args=())(fn)


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``, except that a kernel defined under Triton's interpreter
    (``TRITON_INTERPRET=1``), or an autotuner around one, is returned as it is, to be launched directly.

    torch 2.13 and 2.14 do that themselves; 2.9 and 2.11 raise "wrap_triton only works on functions annotated
    with triton.jit or triton.autotune" (2.12 not checked). Interpreted kernels run only inside opaque custom ops,
    which torch.compile never traces (see ``register_op``), so they need no wrapper.
    """
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction) or isinstance(getattr(kernel, "fn", None), InterpretedFunction):
        return kernel
    return torch.library.wrap_triton(kernel)
