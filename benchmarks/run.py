"""The benchmark loop: for each scenario and dtype, check every provider's output, then time each mode.

Every provider's forward (and, when a backward mode is asked for, its gradients) is compared with a float64
reference on the first input set before it is timed; a provider that does not match gets a row saying so
and is not timed. The providers of a (scenario, dtype, mode) are then timed together, interleaved (see
measure.py); each timed row gets its derived columns (TFLOP/s, GB/s, % of roofline), the "best reference"
row is the fastest reference, and every row gets its speedup over it with the spread of the round-by-round
ratios.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Callable

import torch

from . import measure
from .providers import BEST_REFERENCE, POINTINS, REFERENCE, Provider
from .scenarios import Scenario, input_seed

# Columns of a row, in the order of the CSV.
COLUMNS = [
    "device", "scale", "scenario", "dtype", "mode", "provider", "kind", "status", "verified", "max_rel_error",
    "median_s", "p20_s", "p80_s", "samples", "calls_per_sample", "input_sets", "flops", "min_bytes", "tflops",
    "gbps", "roofline_floor_s", "roofline_pct", "peak_extra_bytes", "speedup", "speedup_p20", "speedup_p80",
    "uncertain", "best_reference", "timing",
    "templates_shape", "weight_shape", "output_shape", "bias", "padding", "groups", "index",
]
# What an "ok" row must have filled in (peak_extra_bytes too, unless memory cannot be measured here).
TIMED_COLUMNS = ["median_s", "p20_s", "p80_s", "samples", "tflops", "gbps", "roofline_floor_s", "roofline_pct",
                 "speedup", "speedup_p20", "speedup_p80", "uncertain", "best_reference", "timing"]


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


def add_speedups(rows: list[dict], timings: dict[str, measure.Timing], baseline_name: str,
                 baseline_label: str) -> None:
    """Every timed row's speedup over the baseline provider (median over median), and, when both were
    interleaved, its spread (20th / 80th percentile of round-by-round ratios) and whether that crosses 1.0x."""
    baseline = timings[baseline_name]
    for row in rows:
        if row["status"] != "ok":
            continue
        timing = timings[row["provider"]]
        row["speedup"] = baseline.median_s / timing.median_s
        row["best_reference"] = baseline_label
        if timing.interleaved and baseline.interleaved:
            ratios = measure.paired_speedups(baseline, timing)
            row["speedup_p20"] = measure.quantile(ratios, 0.2)
            row["speedup_p80"] = measure.quantile(ratios, 0.8)
        else:
            row["speedup_p20"] = row["speedup_p80"] = row["speedup"]
        row["uncertain"] = row["speedup_p20"] < 1.0 < row["speedup_p80"] if row["provider"] != baseline_name else False


def benchmark_group(config: Config, scenario: Scenario, dtype: torch.dtype, providers: list[Provider],
                    input_sets: InputSets, reference, ceilings: measure.Ceilings, progress: Progress) -> list[dict]:
    """Every provider's rows (one per mode) of one scenario and dtype, and one "best reference" row per mode.

    Each provider's forward+backward (forward alone if no backward mode is asked for) on the first input set is
    compared with the float64 reference before anything is timed; a provider that does not match is reported and
    not timed. Then, mode by mode, the providers that passed are timed together (measure.time_interleaved).
    """
    rows = {}
    for provider in providers:
        for mode in config.modes:
            row = dict.fromkeys(COLUMNS)
            row.update(_shape_columns(config, scenario, dtype, mode), provider=provider.name, kind=provider.kind,
                       flops=scenario.flops(mode), min_bytes=scenario.min_bytes(mode, dtype))
            rows[provider.name, mode] = row
    check_mode = "forward+backward" if any(mode != "forward" for mode in config.modes) else "forward"
    tolerance = measure.VERIFY_TOL[dtype]
    checked, failures = {}, {}

    def check(provider: Provider) -> None:
        step = make_step(check_mode, provider, scenario, input_sets.get(1)[0])
        results, _, seconds = measure.first_call(step, config.device)
        results = (results,) if isinstance(results, torch.Tensor) else results
        error = measure.relative_error(results, reference)
        checked[provider.name] = dict(error=error, seconds=seconds)
        if not error <= tolerance:
            raise Mismatch(f"mismatch: relative error {error:.3g} > {tolerance:g}")

    for provider in providers:
        _, failures[provider.name] = guarded(config.device, lambda: check(provider))
    for (name, _), row in rows.items():
        row.update(verified=name in checked and checked[name]["error"] <= tolerance,
                   max_rel_error=checked.get(name, {}).get("error"))

    best_rows = []
    for mode in config.modes:
        steps, estimates, alone = {}, {}, []
        for provider in providers:
            row = rows[provider.name, mode]
            progress.step(f"{scenario.name} {row['dtype']} {provider.name} {mode}")
            if failures[provider.name] is not None:
                row["status"] = failures[provider.name]
                continue
            # Each set of the backward mode holds a forward graph built up front: only fast providers rotate there.
            rotate = mode != "backward" or checked[provider.name]["seconds"] < config.timing.rotate_below_s
            sets = input_sets.get(measure.input_set_count(input_sets.set_bytes, config.device, config.timing)
                                  if rotate else 1)
            row["input_sets"] = len(sets)

            def prepare(provider=provider, sets=sets):
                step = measure.rotate([make_step(mode, provider, scenario, inputs) for inputs in sets])
                _, peak, _ = measure.first_call(step, config.device)
                return step, peak, measure.estimate_seconds(step, config.device)

            prepared, status = guarded(config.device, prepare)
            if status is not None:
                row["status"] = status
                continue
            steps[provider.name], row["peak_extra_bytes"], estimates[provider.name] = prepared
        references = [p.name for p in providers if p.kind == REFERENCE and p.name in steps]
        fastest = min((estimates[name] for name in references), default=math.inf)
        contenders = {name: step for name, step in steps.items()
                      if estimates[name] <= config.timing.screen_factor * fastest or name not in references}
        timings, status = guarded(config.device, lambda: measure.time_interleaved(
            contenders, estimates, config.device, config.timing))
        timings = timings or {}
        for name, step in steps.items():
            if name in contenders:
                continue
            timing, alone_status = guarded(config.device, lambda: measure.time_alone(step, config.device,
                                                                                     config.timing))
            if timing is not None:
                timings[name] = timing
            else:
                rows[name, mode]["status"] = alone_status
        for name in steps:
            row = rows[name, mode]
            if name in timings:
                row.update(status="ok", **timings[name].columns())
                _derived(row, ceilings)
            elif row["status"] is None:
                row["status"] = status or "not timed"
        mode_rows = [rows[p.name, mode] for p in providers]
        timed_references = [name for name in references if name in timings]
        if timed_references:
            best = min(timed_references, key=lambda name: timings[name].median_s)
            best_row = dict(rows[best, mode], provider=BEST_REFERENCE, kind=BEST_REFERENCE)
            add_speedups(mode_rows, timings, best, best)
            best_row.update(speedup=1.0, speedup_p20=1.0, speedup_p80=1.0, uncertain=False, best_reference=best)
            best_rows.append(best_row)
    return [row for row in rows.values()] + best_rows


def run(config: Config, model=None, fixed_cost=None) -> tuple[list[dict], measure.Ceilings]:
    """All rows of the run and the ceilings: per scenario and dtype, the providers' rows and the best-reference
    row, mode by mode; then the model-level rows of ``model`` (benchmarks/model.py) and the fixed-cost rows of
    ``fixed_cost`` (benchmarks/fixed_cost.py), if given."""
    scenarios = [scenario.scaled(config.scale) for scenario in config.scenarios]
    work = sum(len(config.modes) for scenario in scenarios for _ in config.dtypes
               for provider in config.providers if provider.applies_to(scenario))
    work += model.work(config) if model is not None else 0
    work += fixed_cost.work(config) if fixed_cost is not None else 0
    progress = Progress(work, config.progress)
    ceilings = measure.measure_ceilings(config.device, config.dtypes, config.scale == "quick", config.timing)
    rows: list[dict] = []
    try:
        for scenario in scenarios:
            for dtype in config.dtypes:
                input_sets = InputSets(scenario, dtype, config.device)
                with_grads = any(mode != "forward" for mode in config.modes)
                reference = measure.float64_reference(scenario, input_sets.get(1)[0], with_grads)
                providers = [p for p in config.providers if p.applies_to(scenario)]
                group = benchmark_group(config, scenario, dtype, providers, input_sets, reference, ceilings, progress)
                del input_sets, reference
                if config.device.type == "cuda":
                    torch.cuda.empty_cache()
                rows += _ordered(group, config.modes)
        if model is not None:
            rows += model.rows(config, progress)
        if fixed_cost is not None:
            rows += fixed_cost.rows(config, progress)
    finally:
        progress.close()
    return rows, ceilings


def _ordered(rows: list[dict], modes: list[str]) -> list[dict]:
    """Mode by mode; within a mode, pointins backends, the best reference, then the references."""
    rank = {POINTINS: 0, BEST_REFERENCE: 1, REFERENCE: 2}
    return sorted(rows, key=lambda row: (modes.index(row["mode"]), rank[row["kind"]]))

