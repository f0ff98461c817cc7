"""Compile the launches of one call of the op for a GPU target, without a GPU, and read what the compiler made.

The launchers run on meta tensors with ``wrap_triton`` replaced by a recorder, so the kernels, grids, arguments
and every autotuning candidate are exactly what a real call would launch. Each recorded launch is compiled with
``triton.compile`` for ``GPUTarget("cuda", capability, 32)`` (sm_90a for 90); the cubin's resource usage and
SASS (read with the cuobjdump Triton ships) give registers, stack frame and spill instructions (STL/LDL), and the
PTX and SASS say whether the structure paid off: HGMMA (Hopper tensor cores), HMMA, ``cp.async``, vector
loads and stores.

Run as a script (``python pointins_ops/triton/compile.py --help``) it imports the kernel modules without
``pointins_ops/__init__.py``, so it also works on a torch that cannot register the ops.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path


def load_without_registration() -> None:
    """Make ``pointins_ops`` and ``pointins_ops.triton`` importable as bare namespaces (their ``__init__`` not
    run): their submodules then import without registering any op."""
    if "pointins_ops" in sys.modules:
        return
    package = Path(__file__).resolve().parents[1]
    for name, path in (("pointins_ops", package), ("pointins_ops.triton", package / "triton")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    load_without_registration()

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pointins_ops.triton import op, tuning  # noqa: E402

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
          torch.int64: "i64"}


@dataclasses.dataclass
class Launch:
    """One recorded launch of one candidate config."""
    name: str
    kernel: object
    grid: tuple
    arguments: dict
    num_warps: int
    num_stages: int

    @property
    def programs(self) -> int:
        total = 1
        for size in self.grid:
            total *= int(size)
        return total

    def describe(self) -> str:
        tiles = {k: v for k, v in self.arguments.items() if k.startswith("BLOCK") or k in ("NB",)}
        return f"{self.name} {tiles} warps={self.num_warps} stages={self.num_stages}"


class _Recorder:
    def __init__(self):
        self.launches: list[Launch] = []
        self.name = None
        self.skip_next = False  # the launch op._launch makes after tuning.choose: already recorded

    def wrap_triton(self, kernel):
        recorder = self

        class Grid:
            def __getitem__(self, grid):
                def launch(*args, num_warps=4, num_stages=3, **kwargs):
                    if recorder.skip_next:
                        recorder.skip_next = False
                        return
                    arguments = dict(zip(kernel.arg_names, args), **kwargs)
                    recorder.launches.append(Launch(recorder.name or kernel.__name__, kernel, tuple(grid),
                                                    arguments, num_warps, num_stages))
                return launch

        return Grid()


@contextlib.contextmanager
def recording(all_candidates: bool = True):
    """Within it, op's launchers record their launches (every autotuning candidate's, when all_candidates)."""
    recorder = _Recorder()
    saved = op.wrap_triton, tuning.choose, op._launch

    def choose(key, candidates, run, tensor):
        for config in (candidates if all_candidates else candidates[:1]):
            run(config)
        recorder.skip_next = True
        return candidates[0]

    def launch(step, tensors, reference):
        recorder.name = step.name
        try:
            saved[2](step, tensors, reference)
        finally:
            recorder.name = None

    op.wrap_triton, tuning.choose, op._launch = recorder.wrap_triton, choose, launch
    try:
        yield recorder
    finally:
        op.wrap_triton, tuning.choose, op._launch = saved


def record(templates_shape, weight_shape, *, bias: bool, index: bool, dtype: torch.dtype, stride=(1, 1),
           padding=(0, 0), dilation=(1, 1), groups: int = 1, modes=("forward", "backward"),
           all_candidates: bool = True, tf32: bool = False) -> dict:
    """{mode: [Launch]} of one call of the op on meta tensors of these shapes."""
    templates = torch.empty(templates_shape, dtype=dtype, device="meta")
    weight = torch.empty(weight_shape, dtype=dtype, device="meta")
    bias_ = torch.empty(weight_shape[:2], dtype=dtype, device="meta") if bias else None
    index_ = torch.empty(weight_shape[0], dtype=torch.int64, device="meta") if index else None
    conv = (tuple(stride), tuple(padding), tuple(dilation), groups)
    launches = {}
    saved_tf32 = op._conv_allows_tf32
    op._conv_allows_tf32 = lambda device: tf32
    try:
        for mode in modes:
            with recording(all_candidates) as recorder:
                if mode == "forward":
                    op._forward(templates, weight, bias_, index_, *conv)
                else:
                    out_shape = op.plan.geometry(templates, weight, index_, *conv[:3], groups)
                    grad_output = torch.empty((out_shape.N, out_shape.C_out, out_shape.H_out, out_shape.W_out),
                                              dtype=dtype, device="meta")
                    op._backward(grad_output, templates, weight, index_, *conv, bias)
            launches[mode] = recorder.launches
    finally:
        op._conv_allows_tf32 = saved_tf32
    return launches


def _signature(launch: Launch):
    kernel = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    for position, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = launch.arguments[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(position,)] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(position,)] = [["tt.divisibility", 16]]  # allocations are 16-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        else:
            value = int(value)
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(position,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _tool(name: str) -> str:
    """A CUDA binary tool that Triton ships (cuobjdump), so no CUDA toolkit is needed."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_launch(launch: Launch, capability: int = 90) -> dict:
    """Registers, spills, shared memory and instruction counts of one launch compiled for ``capability``: read from
    the cubin Triton built (cuobjdump's resource usage and SASS) and from its PTX."""
    signature, constexprs, attrs = _signature(launch)
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(compiled.asm["cubin"])
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as ptx_file:
        ptx_file.write(ptx)
    try:
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", handle.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", handle.name], capture_output=True, text=True,
                              check=True).stdout
        # ptxas's own report (the options Triton assembles with), for the bytes of spill stores and loads
        arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
        log = subprocess.run([_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                              ptx_file.name, "-o", os.devnull], capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(handle.name)
        os.unlink(ptx_file.name)

    def logged(pattern):
        match = re.search(pattern, log)
        return int(match.group(1)) if match else 0

    def usage_of(name):
        match = re.search(rf"\b{name}:(\d+)", usage)
        return int(match.group(1)) if match else 0

    instructions = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    return dict(
        kernel=launch.name, config=launch.describe(), programs=launch.programs, capability=capability,
        registers=usage_of("REG"), stack=usage_of("STACK"), local=usage_of("LOCAL"),
        spill_store_bytes=logged(r"(\d+) bytes spill stores"), spill_load_bytes=logged(r"(\d+) bytes spill loads"),
        ptxas_registers=logged(r"Used (\d+) registers"),
        spill_stores=instructions.count("STL"), spill_loads=instructions.count("LDL"),
        shared=int(compiled.metadata.shared), num_warps=launch.num_warps, num_stages=launch.num_stages,
        sass_instructions=len(instructions), hgmma=instructions.count("HGMMA"), hmma=instructions.count("HMMA"),
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
        cp_async=len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx)),
        vector_loads=len(re.findall(r"\bld\.global(?:\.\w+)*\.v[248]\b", ptx)),
        vector_stores=len(re.findall(r"\bst\.global(?:\.\w+)*\.v[248]\b", ptx)),
        scalar_16bit_loads=len(re.findall(r"\bld\.global(?:\.\w+)*\.b16\b", ptx)),
        # tt.reduce: a tl.sum / tl.max over a tile, whose order follows the tile's layout across warps
        reductions=compiled.asm["ttgir"].count("tt.reduce"))


# Shapes whose every launch and candidate the spill check compiles: the benchmark scenarios (GPU scale) and
# one case per remaining code path (strided, dilated, 64-bit offsets are compiled by the tests separately).
def scenario_shapes():
    from benchmarks.scenarios import SCENARIOS

    for scenario in SCENARIOS.values():
        yield scenario.name, dict(templates_shape=scenario.templates_shape, weight_shape=scenario.weight_shape,
                                  bias=scenario.bias, index=scenario.index != "identity",
                                  padding=(scenario.padding,) * 2, groups=scenario.groups)


def compile_key(launch: Launch) -> tuple:
    """What decides the compiled code: the kernel, its signature and constexprs, warps and stages."""
    signature, constexprs, attrs = _signature(launch)
    return (launch.kernel.fn.__qualname__ if hasattr(launch.kernel, "fn") else launch.name,
            tuple(sorted(signature.items())), tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
            tuple(sorted(attrs)), launch.num_warps, launch.num_stages)


_WORK: list = []  # (launch, capability) to compile; forked workers read it by position (launches do not pickle)


def _compile_one(position: int) -> dict:
    launch, capability = _WORK[position]
    return compile_launch(launch, capability)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capability", type=int, default=90)
    parser.add_argument("--dtype", default="bfloat16,float16,float32,float32+tf32",
                        help="comma-separated; float32+tf32: float32 as run when torch allows TF32 for conv")
    parser.add_argument("--scenario", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--default-only", action="store_true", help="only each launch's default candidate")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--json", action="store_true", help="one JSON object per compiled launch")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    names = set(args.scenario.split(",")) if args.scenario else None
    # Record every launch (fast), then compile each distinct one once (launches repeat across scenarios and
    # dtypes: the bucketing kernel, for one).
    jobs, tagged = {}, []
    for scenario, shape in scenario_shapes():
        if names and scenario not in names:
            continue
        for dtype_name in args.dtype.split(","):
            dtype = getattr(torch, dtype_name.split("+")[0])
            recorded = record(**shape, dtype=dtype, all_candidates=not args.default_only,
                              tf32=dtype_name.endswith("+tf32"))
            for mode, launches in recorded.items():
                for launch in launches:
                    key = compile_key(launch)
                    jobs.setdefault(key, launch)
                    tagged.append((scenario, dtype_name, mode, key))
    keys = list(jobs)
    _WORK[:] = [(jobs[key], args.capability) for key in keys]
    if args.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            compiled = dict(zip(keys, pool.map(_compile_one, range(len(keys)), chunksize=1)))
    else:
        compiled = dict(zip(keys, map(_compile_one, range(len(keys)))))
    results = [[dict(compiled[key], scenario=scenario, dtype=dtype_name, mode=mode, triton=triton.__version__)]
               for scenario, dtype_name, mode, key in tagged]
    seen = set()
    for reports in results:
        for report in reports:
            key = (report["config"], report["dtype"], report["registers"], report["spill_store_bytes"])
            if args.json:
                print(json.dumps(report), flush=True)
            elif key not in seen:
                print(f"{report['scenario']:15s} {report['dtype']:13s} {report['mode']:9s} {report['config']:90s} "
                      f"regs {report['registers']:3d} spilled {report['spill_store_bytes']:4d} B STL "
                      f"{report['spill_stores']:3d} smem {report['shared']:6d} HGMMA {report['hgmma']} HMMA "
                      f"{report['hmma']} cp.async {report['cp_async']} vec ld/st "
                      f"{report['vector_loads']}/{report['vector_stores']}", flush=True)
            seen.add(key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
