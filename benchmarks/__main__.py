"""``python -m benchmarks``: time instance_aware_conv's backends against the pure-PyTorch formulations.

Run from the repository root. See benchmarks/README.md for the columns and how each is computed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import fixed_cost, measure, model, report
from .providers import make_providers, pointins_backends
from .run import Config, run
from .scenarios import MODES, SCENARIOS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESULTS = Path(__file__).resolve().parent / "results"


def _names(values: list[str] | None) -> list[str] | None:
    """Accept both ``--x a,b`` and ``--x a --x b``."""
    if values is None:
        return None
    return [name for value in values for name in value.split(",") if name]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--device", action="append", choices=["cpu", "cuda"],
                        help="device(s) to run on (repeatable); default: cuda when available, else cpu")
    parser.add_argument("--dtype", action="append", help=f"comma-separated, of {list(DTYPES)}; "
                        "default: float32,bfloat16")
    parser.add_argument("--scenario", action="append", help=f"comma-separated, of {list(SCENARIOS)}; default: all")
    parser.add_argument("--backend", action="append",
                        help="pointins backends to time, comma-separated (cpu, cuda, triton); default: all available "
                             "on the device")
    parser.add_argument("--reference", action="append",
                        help="reference formulations to time, comma-separated; default: all of "
                             "pointins_ops.reference.FORMULATIONS")
    parser.add_argument("--mode", action="append", help=f"comma-separated, of {list(MODES)}; default: all")
    parser.add_argument("--scale", choices=["auto", "gpu", "cpu"], default="auto",
                        help="shapes: gpu (as in the issue) or cpu (N and P / 16); auto: by device")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, one thread, one timed repetition: checks the harness, not the speed")
    parser.add_argument("--threads", type=int,
                        help="CPU threads (torch.set_num_threads); default: torch's (1 with --quick)")
    parser.add_argument("--output", "--out", dest="output", type=Path,
                        help="result folder, e.g. benchmarks/results/cpu to replace the committed CPU tables; default "
                             "a new run folder benchmarks/results/local/<device>-<UTC time>[-quick] (git-ignored), "
                             "so a run never overwrites committed results unless asked to")
    parser.add_argument("--op-only", action="store_true",
                        help="only the op scenarios' rows: no model-level (PointINS mask branch) or fixed-cost rows, "
                             "which are the same whatever --scenario says")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _choose(parser, given, known, what) -> list[str]:
    unknown = [name for name in given if name not in known]
    if unknown:
        parser.error(f"unknown {what} {unknown}; choose from {list(known)}")
    return given


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    devices = _names(args.device) or ["cuda" if torch.cuda.is_available() else "cpu"]
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    dtypes = [DTYPES[name] for name in _choose(parser, _names(args.dtype) or ["float32", "bfloat16"], DTYPES,
                                               "dtype")]
    scenarios = [SCENARIOS[name] for name in _choose(parser, _names(args.scenario) or list(SCENARIOS), SCENARIOS,
                                                     "scenario")]
    modes = _choose(parser, _names(args.mode) or list(MODES), MODES, "mode")
    modes = [mode for mode in MODES if mode in modes]
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    # float32 means float32: no TF32 in the references (our kernels are held to the same tolerance).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    timing = measure.TimingSettings(quick=args.quick)
    for device_name in devices:
        device = torch.device(device_name)
        try:
            providers = make_providers(device, _names(args.backend), _names(args.reference))
        except ValueError as error:
            parser.error(str(error))
        scale = "quick" if args.quick else (args.scale if args.scale != "auto" else
                                            ("gpu" if device.type == "cuda" else "cpu"))
        if args.output is not None:
            out = args.output if len(devices) == 1 else args.output / device_name
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            out = RESULTS / "local" / f"{device_name}-{stamp}{'-quick' if args.quick else ''}"
        out.mkdir(parents=True, exist_ok=True)

        started = time.perf_counter()
        config = Config(device, scale, scenarios, dtypes, modes, providers, timing, progress=not args.no_progress)
        extras = {} if args.op_only else dict(model=model, fixed_cost=fixed_cost)
        rows, ceilings = run(config, **extras)
        info = report.environment(device)
        info["wall_time_s"] = time.perf_counter() - started
        settings = {
            "scale": scale,
            "quick": args.quick,
            "backends": [p.name for p in providers if p.kind == "pointins"],
            "available_backends": pointins_backends(device),
            "references": [p.name for p in providers if p.kind == "reference"],
            "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
            "modes": modes,
            "timing": measure.describe_timing(device, timing),
            "memory": measure.describe_memory(device),
            "verify_tolerance": {str(d).removeprefix("torch."): t for d, t in measure.VERIFY_TOL.items()},
            "cache_bytes": measure.cache_bytes(device),
            "model": "not run: --op-only" if args.op_only else model.status(),
        }
        scaled = [s.scaled(scale) for s in scenarios]
        text = report.markdown(rows, info, ceilings, settings)
        print(text)
        (out / "results.md").write_text(text + "\n")
        report.write_csv(rows, out / "results.csv")
        report.write_json(rows, info, ceilings, settings, scaled, out / "results.json")
        written = [] if args.no_plot else report.write_plot(rows, info, out)
        files = [out / "results.md", out / "results.csv", out / "results.json"] + written
        print(f"\nwrote {', '.join(map(str, files))} in {info['wall_time_s']:.0f} s", file=sys.stderr)
        print(f"results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
