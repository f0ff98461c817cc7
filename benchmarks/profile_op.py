"""``python -m benchmarks.profile_op``: one scenario's calls, for a profiler to look at.

The benchmark tables say how fast a call is; this says where its time goes. It builds a scenario's inputs as
the benchmarks do, warms the call up, then runs it ``--calls`` times inside ``torch.cuda.profiler`` start/stop
(so ``ncu --profile-from-start off`` sees only those calls), and with ``--torch-profiler`` prints
``torch.profiler``'s table of host (CPU) and device time per operator and kernel: host time far above device
time is launch and Python overhead, not kernel time.

    python -m benchmarks.profile_op --scenario pointins-infer --backend triton --mode forward --torch-profiler
    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        python -m benchmarks.profile_op --scenario pointins-train --backend cuda --dtype bfloat16

Runs on the CPU too (the cpu backend, CPU scale), so the command can be tried without a GPU. ``--time SECONDS``
repeats the call instead and prints its mean time: a quick A/B between two builds (run it from each tree in
turn), on warm inputs, which the benchmark tables are not. Do not compare a reference timed alone this way with
our op: on the 2-core CPU VM, grouped_conv2d alone took 2-2.5 ms per call where, interleaved with our op in one
process (as the benchmark times it), it took 0.8 ms.

    python -m benchmarks.profile_op --scenario pointins-dw --backend cpu --dtype float32 --time 1.5
"""

from __future__ import annotations

import argparse
import time

import torch
from pointins_ops.reference import FORMULATIONS

from .providers import make_providers
from .run import InputSets, make_step
from .scenarios import MODES, SCENARIOS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_op", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", required=True, choices=list(SCENARIOS))
    parser.add_argument("--backend", required=True, help="a pointins backend (cpu, cuda, triton) or a reference")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--mode", default="forward", choices=list(MODES))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=3, help="profiled calls (after 3 warm-up calls)")
    parser.add_argument("--torch-profiler", action="store_true", help="print torch.profiler's table")
    parser.add_argument("--time", type=float, metavar="SECONDS",
                        help="instead of profiling, repeat the call on the same (warm) inputs for SECONDS and print "
                             "the mean time per call: a quick A/B between two builds, not a benchmark row")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    if args.time is not None and not args.time > 0:
        parser.error(f"--time must be a positive number of seconds, got {args.time}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    # As in the benchmarks: float32 means float32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    reference = args.backend in FORMULATIONS
    try:
        providers = make_providers(device, [] if reference else [args.backend], [args.backend] if reference else [])
    except ValueError as error:
        parser.error(str(error))
    scenario = SCENARIOS[args.scenario].scaled("gpu" if device.type == "cuda" else "cpu")
    inputs = InputSets(scenario, DTYPES[args.dtype], device).get(1)[0]
    step = make_step(args.mode, providers[0], scenario, inputs)
    for _ in range(3):
        step()
    _synchronize(device)
    if args.time is not None:
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < args.time:
            step()
            calls += 1
        _synchronize(device)
        print(f"profile_op: {scenario.name} {args.dtype} {args.mode}, backend {args.backend}: "
              f"{(time.perf_counter() - started) / calls * 1e3:.3f} ms per call ({calls} calls, "
              f"{torch.get_num_threads()} threads)")
        return 0
    print(f"profile_op: {scenario.name} {args.dtype} {args.mode}, backend {args.backend}, {args.calls} calls on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'the CPU'}", flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities) if args.torch_profiler else None
    if device.type == "cuda":
        torch.cuda.profiler.start()
    if profiler is not None:
        profiler.start()
    for _ in range(args.calls):
        step()
    _synchronize(device)
    if profiler is not None:
        profiler.stop()
    if device.type == "cuda":
        torch.cuda.profiler.stop()
    if profiler is not None:
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))
    return 0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    raise SystemExit(main())
