"""The fixed cost of one call: every provider on a problem so small that its arithmetic is negligible.

What a call costs before and after the arithmetic — Python argument checks, the choice of backend, the
dispatcher, autograd bookkeeping, allocations, bucketing, thread start-up — decides the speed at inference size
(tens of instances). These rows time each pointins backend and each reference formulation on
``TINY`` (2 templates of 4 x 5 x 5, 2 instances, 3 x 3 kernels with bias), forward (under ``torch.no_grad``) and
forward+backward, interleaved like the op rows; each provider's output is checked against float64 first.
"""

from __future__ import annotations

import torch

from . import measure
from .providers import REFERENCE
from .run import COLUMNS, add_speedups, guarded, make_step
from .scenarios import Scenario, input_seed

FIXED_COST = "fixed-cost"
TINY = Scenario("tiny", P=2, C_in=4, H=5, W=5, N=2, C_out=4, kernel=3, padding=1, groups=1, bias=True,
                index="shuffled", models="fixed cost of a call")
MODES = ("forward", "forward+backward")


def work(config) -> int:
    return len(MODES) * len([p for p in config.providers if p.applies_to(TINY)])


def rows(config, progress) -> list[dict]:
    """One row per provider and mode (float32), with the speedup over the fastest reference."""
    out = []
    dtype = torch.float32
    inputs = TINY.make_inputs(dtype, config.device, input_seed(TINY, dtype, 0))
    providers = [p for p in config.providers if p.applies_to(TINY)]
    reference = measure.float64_reference(TINY, inputs, with_grads=True)
    for mode in MODES:
        group, steps, estimates = [], {}, {}
        for provider in providers:
            progress.step(f"{FIXED_COST} {provider.name} {mode}")
            row = dict.fromkeys(COLUMNS)
            row.update(device=config.device.type, scale=config.scale, scenario=FIXED_COST, dtype="float32", mode=mode,
                       provider=provider.name, kind=f"{FIXED_COST} {provider.kind}", input_sets=1,
                       templates_shape="x".join(map(str, TINY.templates_shape)),
                       weight_shape="x".join(map(str, TINY.weight_shape)), bias=True, padding=1, groups=1,
                       index=TINY.index)
            group.append(row)
            step = make_step(mode, provider, TINY, inputs)

            def check(step=step):
                result, peak, _ = measure.first_call(step, config.device)
                results = (result,) if isinstance(result, torch.Tensor) else result
                return measure.relative_error(results, reference[:len(results)]), peak

            checked, failure = guarded(config.device, check)
            if failure is not None:
                row.update(status=failure, verified=False)
                continue
            row["max_rel_error"], row["peak_extra_bytes"] = checked
            row["verified"] = row["max_rel_error"] <= measure.VERIFY_TOL[dtype]
            if not row["verified"]:
                row["status"] = f"mismatch: relative error {row['max_rel_error']:.3g}"
                continue
            steps[provider.name] = step
            estimates[provider.name] = measure.estimate_seconds(step, config.device)
        timings, failure = guarded(config.device, lambda: measure.time_interleaved(steps, estimates, config.device,
                                                                                    config.timing))
        for row in group:
            if timings and row["provider"] in timings:
                row.update(status="ok", **timings[row["provider"]].columns())
            elif row["status"] is None:
                row["status"] = failure or "not timed"
        references = [p.name for p in providers if p.kind == REFERENCE and timings and p.name in timings]
        if references:
            best = min(references, key=lambda name: timings[name].median_s)
            add_speedups(group, timings, best, best)
        out += group
    return out


def is_fixed_cost(row: dict) -> bool:
    return row["kind"].startswith(FIXED_COST)


__all__ = ["FIXED_COST", "MODES", "TINY", "is_fixed_cost", "rows", "work"]
