"""The benchmark loop: for each scenario, dtype and provider, check the output, then time each mode.

Every provider's forward (and, when a backward mode is asked for, its gradients) is compared with a float64
reference on the first input set before it is timed; a provider that does not match gets a row saying so
and is not timed. Each timed row then gets its derived columns (TFLOP/s, GB/s, % of roofline) and, once all
providers of a (scenario, dtype, mode) are in, the "best reference" row and every row's speedup over it.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

import torch

from . import measure
from .providers import BEST_REFERENCE, POINTINS, REFERENCE, Provider
from .scenarios import Scenario, input_seed

# Columns of a row, in the order of the CSV.
COLUMNS = [
    "device", "scale", "scenario", "dtype", "mode", "provider", "kind", "status", "verified", "max_rel_error",
    "median_s", "p20_s", "p80_s", "samples", "calls_per_sample", "input_sets", "flops", "min_bytes", "tflops",
    "gbps", "roofline_floor_s", "roofline_pct", "peak_extra_bytes", "speedup", "best_reference",
    "templates_shape", "weight_shape", "output_shape", "bias", "padding", "groups", "index",
]
# What an "ok" row must have filled in (peak_extra_bytes too, unless memory cannot be measured here).
TIMED_COLUMNS = ["median_s", "p20_s", "p80_s", "samples", "tflops", "gbps", "roofline_floor_s", "roofline_pct",
                 "speedup", "best_reference"]


@dataclasses.dataclass
class Config:
    device: torch.device
    scale: str                                  # "gpu", "cpu" or "quick"
    scenarios: list[Scenario]                   # at GPU scale; scaled here
    dtypes: list[torch.dtype]
    modes: list[str]
    providers: list[Provider]
    timing: measure.TimingSettings
    progress: bool = True


class Progress:
    """tqdm when it is installed, else one plain line per step on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.count, self.enabled = total, 0, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, file=sys.stderr, unit="row", dynamic_ncols=True)

    def step(self, text: str) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.set_description(text, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.count:>4}/{self.total}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _call(provider: Provider, scenario: Scenario, templates, weight, bias, index):
    return provider.fn(templates, weight, bias, index, **scenario.conv_args)


class InputSets:
    """Independently drawn random inputs of one scenario and dtype, made when first asked for."""

    def __init__(self, scenario: Scenario, dtype: torch.dtype, device: torch.device):
        self.scenario, self.dtype, self.device = scenario, dtype, device
        self.sets = []

    def get(self, count: int) -> list:
        while len(self.sets) < count:
            self.sets.append(self.scenario.make_inputs(self.dtype, self.device,
                                                       input_seed(self.scenario, self.dtype, len(self.sets))))
        return self.sets[:count]

    @property
    def set_bytes(self) -> int:
        """What one call reads and writes: the inputs and an output the size of grad_output."""
        first = self.get(1)[0]
        return first.nbytes + measure.result_bytes(first.grad_output)


def make_step(mode: str, provider: Provider, scenario: Scenario, inputs) -> Callable:
    """A callable that runs ``mode`` once on ``inputs`` and returns what the mode produces.

    forward: the output, without autograd (what inference pays). backward: the gradients of a forward done
    here, once (its graph is kept for every call). forward+backward: the output and the gradients.
    """
    index, grad_output = inputs.index, inputs.grad_output
    if mode == "forward":
        def forward():
            with torch.no_grad():
                return _call(provider, scenario, inputs.templates, inputs.weight, inputs.bias, index)
        return forward
    leaves = [None if t is None else t.detach().requires_grad_() for t in (inputs.templates, inputs.weight,
                                                                            inputs.bias)]
    wrt = [t for t in leaves if t is not None]
    if mode == "backward":
        out = _call(provider, scenario, *leaves, index)

        def backward():
            return torch.autograd.grad(out, wrt, grad_output, retain_graph=True)
        return backward

    def forward_backward():
        out = _call(provider, scenario, *leaves, index)
        return (out, *torch.autograd.grad(out, wrt, grad_output))
    return forward_backward


def _shape_columns(config: Config, scenario: Scenario, dtype: torch.dtype, mode: str) -> dict:
    return {
        "device": config.device.type, "scale": config.scale, "scenario": scenario.name,
        "dtype": str(dtype).removeprefix("torch."), "mode": mode,
        "templates_shape": "x".join(map(str, scenario.templates_shape)),
        "weight_shape": "x".join(map(str, scenario.weight_shape)),
        "output_shape": "x".join(map(str, scenario.output_shape)),
        "bias": scenario.bias, "padding": scenario.padding, "groups": scenario.groups, "index": scenario.index,
    }


def _derived(row: dict, ceilings: measure.Ceilings) -> None:
    median = row["median_s"]
    row["tflops"] = row["flops"] / median / 1e12
    row["gbps"] = row["min_bytes"] / median / 1e9
    floor = max(row["min_bytes"] / ceilings.copy_bytes_per_s,
                row["flops"] / ceilings.matmul_flops_per_s[row["dtype"]])
    row["roofline_floor_s"] = floor
    row["roofline_pct"] = 100 * floor / median


class Mismatch(Exception):
    """A provider's result is not the reference's: it is reported, and not timed."""


def _failure_status(error: BaseException) -> str:
    if isinstance(error, Mismatch):
        return str(error)
    if isinstance(error, torch.OutOfMemoryError):
        return "out of memory"
    text = " ".join(str(error).split())
    return f"error: {type(error).__name__}: {text[:160]}"


def guarded(device: torch.device, work: Callable):
    """``(work(), None)``, or ``(None, status)`` if it raised: a failing provider is a row, not the end of the
    run. The cache is emptied after the exception (and the tensors its traceback held) is gone."""
    try:
        return work(), None
    except Exception as error:  # noqa: BLE001
        status = _failure_status(error)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return None, status


def benchmark_provider(config: Config, scenario: Scenario, dtype: torch.dtype, provider: Provider,
                       input_sets: InputSets, reference, ceilings: measure.Ceilings,
                       progress: Progress) -> list[dict]:
    """The rows of one provider on one scenario and dtype, one per mode.

    The provider's forward+backward (forward alone if no backward mode is asked for) on the first input set
    is compared with the float64 reference before anything is timed. When that mode is to be timed, the
    check rides on its first, untimed call (the warm-up both timers make); otherwise it is a call of its own.
    """
    rows = {}
    for mode in config.modes:
        rows[mode] = dict.fromkeys(COLUMNS)
        rows[mode].update(_shape_columns(config, scenario, dtype, mode), provider=provider.name, kind=provider.kind,
                          flops=scenario.flops(mode), min_bytes=scenario.min_bytes(mode, dtype))
    check_mode = "forward+backward" if any(mode != "forward" for mode in config.modes) else "forward"
    checked = {}

    def check(results, seconds):
        results = (results,) if isinstance(results, torch.Tensor) else results
        checked.update(error=measure.relative_error(results, reference), seconds=seconds)
        if not checked["error"] <= measure.VERIFY_TOL[dtype]:
            raise Mismatch(f"mismatch: relative error {checked['error']:.3g} > {measure.VERIFY_TOL[dtype]:g}")

    def passed() -> bool:
        return "error" in checked and checked["error"] <= measure.VERIFY_TOL[dtype]

    def check_alone():
        step = make_step(check_mode, provider, scenario, input_sets.get(1)[0])
        started = time.perf_counter()
        results = step()
        if config.device.type == "cuda":
            torch.cuda.synchronize()
        check(results, time.perf_counter() - started)

    failure = None
    if check_mode not in rows:
        _, failure = guarded(config.device, check_alone)
    order = [check_mode] * (check_mode in rows) + [mode for mode in config.modes if mode != check_mode]
    for mode in order:
        row = rows[mode]
        progress.step(f"{scenario.name} {row['dtype']} {provider.name} {mode}")
        if failure is not None:
            row["status"] = failure
            continue
        # Each set of the backward mode holds a forward graph built up front: only fast providers rotate there.
        rotate = mode != "backward" or checked["seconds"] < config.timing.rotate_below_s
        sets = input_sets.get(measure.input_set_count(input_sets.set_bytes, config.device, config.timing)
                              if rotate else 1)
        row["input_sets"] = len(sets)

        def time_mode(mode=mode, sets=sets):
            steps = [make_step(mode, provider, scenario, inputs) for inputs in sets]
            return measure.time_call(measure.rotate(steps), config.device, config.timing,
                                     on_first_call=check if mode == check_mode else None)

        measured, status = guarded(config.device, time_mode)
        if status is not None:
            row["status"] = status
            if not passed():  # the check failed or did not finish: nothing else is timed
                failure = status
            continue
        timing, row["peak_extra_bytes"] = measured
        row.update(status="ok", **timing.columns())
        _derived(row, ceilings)
    for row in rows.values():
        row.update(verified=passed(), max_rel_error=checked.get("error"))
    return list(rows.values())


def add_best_reference(rows: list[dict]) -> list[dict]:
    """Per (scenario, dtype, mode): a "best reference" row (the fastest reference that matched) and every
    row's speedup over it. Returns the new rows."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["device"], row["scenario"], row["dtype"], row["mode"]), []).append(row)
    best_rows = []
    for group in groups.values():
        timed = [row for row in group if row["kind"] == REFERENCE and row["status"] == "ok"]
        if not timed:
            continue
        best = min(timed, key=lambda row: row["median_s"])
        best_row = dict(best, provider=BEST_REFERENCE, kind=BEST_REFERENCE)
        for row in group + [best_row]:
            if row["status"] == "ok":
                row["speedup"] = best["median_s"] / row["median_s"]
                row["best_reference"] = best["provider"]
        best_rows.append(best_row)
    return best_rows


def run(config: Config, model=None) -> tuple[list[dict], measure.Ceilings]:
    """All rows of the run and the ceilings: per scenario and dtype, the providers' rows and the best-reference
    row, mode by mode; then the model-level rows of ``model`` (see benchmarks/model.py), if given."""
    scenarios = [scenario.scaled(config.scale) for scenario in config.scenarios]
    work = sum(len(config.modes) for scenario in scenarios for _ in config.dtypes
               for provider in config.providers if provider.applies_to(scenario))
    work += model.work(config) if model is not None else 0
    progress = Progress(work, config.progress)
    ceilings = measure.measure_ceilings(config.device, config.dtypes, config.scale == "quick", config.timing)
    rows: list[dict] = []
    try:
        for scenario in scenarios:
            for dtype in config.dtypes:
                input_sets = InputSets(scenario, dtype, config.device)
                with_grads = any(mode != "forward" for mode in config.modes)
                reference = measure.float64_reference(scenario, input_sets.get(1)[0], with_grads)
                group = []
                for provider in config.providers:
                    if provider.applies_to(scenario):
                        group += benchmark_provider(config, scenario, dtype, provider, input_sets, reference,
                                                    ceilings, progress)
                del input_sets, reference
                if config.device.type == "cuda":
                    torch.cuda.empty_cache()
                rows += _ordered(group + add_best_reference(group), config.modes)
        if model is not None:
            rows += model.rows(config, progress)
    finally:
        progress.close()
    return rows, ceilings


def _ordered(rows: list[dict], modes: list[str]) -> list[dict]:
    """Mode by mode; within a mode, pointins backends, the best reference, then the references."""
    rank = {POINTINS: 0, BEST_REFERENCE: 1, REFERENCE: 2}
    return sorted(rows, key=lambda row: (modes.index(row["mode"]), rank[row["kind"]]))

