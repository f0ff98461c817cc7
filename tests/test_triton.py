"""The Triton backend against the op's oracle, the C++ CPU kernel, and itself (determinism: run to run and across
every autotuning candidate), plus opcheck, torch.compile, CUDA-graph-safe config choice, and compiles for sm_80 /
sm_90 without a GPU (no register spills in any candidate).

Without a GPU the kernels run on CPU tensors in the Triton interpreter. Triton decides whether kernels are
compiled or interpreted when they are defined, i.e. when pointins_ops is first imported, so TRITON_INTERPRET=1
must be set before that: tests/conftest.py does it for the whole session, and the lines below do it when this
file runs alone. test_triton_backend_serves_this_device fails (rather than everything skipping) if it came too
late.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import pointins_ops.triton as triton_backend  # noqa: E402
from pointins_ops.triton import bucketing  # noqa: E402
from oracle import (  # noqa: E402
    EDGE_CASES, RESULT_NAMES, TOL, Case, capture_forward_and_backward, check_agrees_with_cpu_kernel,
    GRAD_BIAS_CASES, check_backward_without_grad_bias, check_bitwise_reproducible, check_case,
    check_compiled_fullgraph, check_ops_pass_opcheck, check_out_of_range_index_is_masked, make_inputs, oracle_grads,
    conv_tf32, random_cases)
from pointins_ops import available_backends, instance_aware_conv  # noqa: E402
from pointins_ops.triton import op as triton_op, plan, tuning  # noqa: E402
from benchmarks.scenarios import SCENARIOS  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETED = not ON_GPU
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
needs_cpu_kernel = pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="the C++ CPU kernel is not built")

if INTERPRETED:
    # The interpreter runs each program in Python, one kernel tap at a time: 40 cases in float32 and every fourth
    # one in each half precision keep this file within a few minutes on two cores.
    RANDOM_CASES = random_cases(40, seed=2026)
    RANDOM_RUNS = ([(case, torch.float32) for case in RANDOM_CASES]
                   + [(case, torch.float16) for case in RANDOM_CASES[0::4]]
                   + [(case, torch.bfloat16) for case in RANDOM_CASES[2::4]])
else:
    # On a GPU each new shape costs Triton compiles (the first H200 window, 2026-12-04: 455 of 3 x 240 runs in
    # 148 s on 8 workers, a third of its time): each of the 240 cases runs once, the dtypes taking turns
    # (tests/test_cuda.py runs every case in every dtype).
    RANDOM_CASES = random_cases(240, seed=2026)
    RANDOM_RUNS = [(case, DTYPES[i % len(DTYPES)]) for i, case in enumerate(RANDOM_CASES)]

op = functools.partial(instance_aware_conv, backend="triton")


@pytest.fixture(autouse=True)
def exact_float32_and_fixed_configs(monkeypatch):
    """Compare float32 against the oracle without TF32 (conv2d's TF32 flag is on by default), and run one fixed
    config instead of autotuning each of the hundreds of shapes swept here (test_autotuned_kernels_match_oracle
    covers autotuning)."""
    monkeypatch.setattr(tuning, "AUTOTUNE", False)
    with conv_tf32(False):
        yield


def test_triton_backend_serves_this_device():
    assert triton_backend.AVAILABLE
    assert triton_backend.serves(DEVICE), (
        "the Triton kernels were defined without TRITON_INTERPRET=1 on a machine without a GPU: pointins_ops was "
        "imported before this file set it; set it in tests/conftest.py before anything imports pointins_ops")
    assert triton_backend.serves("cuda")
    assert "triton" in available_backends(DEVICE)


@pytest.mark.parametrize("case, dtype", RANDOM_RUNS, ids=lambda x: str(x)[6:] if isinstance(x, torch.dtype) else str(x))
def test_random_cases_match_conv2d(case, dtype):
    check_case(op, case, dtype, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", EDGE_CASES)
def test_edge_cases_match_conv2d(name, dtype):
    check_case(op, EDGE_CASES[name], dtype, DEVICE)


@pytest.mark.parametrize("name", ["stride-dilation", "channels-last", "depthwise-multiplier", "large-tile"])
def test_64bit_offsets_match_conv2d(name, monkeypatch):
    # Tensors with 2^31 elements do not fit a test; the same code path is forced on small ones.
    monkeypatch.setattr(plan, "FORCE_64BIT_OFFSETS", True)
    check_case(op, EDGE_CASES[name], torch.float32, DEVICE)


def test_many_instances_per_template_match_conv2d():
    # Several row tiles per template, several pixel tiles and grad_weight splits (float32 partials), instances
    # spread over templates unevenly.
    case = Case(P=3, C_in=4, H=16, W=20, N=40, C_out=3, kernel=(3, 3), padding=(1, 1), index="random", seed=3)
    check_case(op, case, torch.float32, DEVICE)


# Shapes of each code path; every one has several reduction steps (taps x channel chunks, row blocks, pixel chunks).
PATH_CASES = {
    # a template fits a tile: forward with the whole template per tile, one fused backward launch
    "small-templates": Case(P=3, C_in=40, H=7, W=9, N=7, C_out=5, kernel=(3, 3), padding=(1, 1), seed=21),
    # larger templates: pixel tiles, fused backward over splits with float32 partials and their fixed-order sum
    "large-templates": Case(P=2, C_in=20, H=17, W=17, N=5, C_out=3, kernel=(3, 3), padding=(1, 1), seed=22),
    # output and template pixels differ (stride): grad_templates and split grad_weight are two launches
    "strided": Case(P=2, C_in=18, H=20, W=22, N=4, C_out=4, kernel=(3, 3), stride=(2, 2), padding=(1, 1),
                    groups=2, seed=23),
    # contiguous 1x1 path without bounds tests, no index (no bucketing)
    "1x1": Case(P=4, C_in=24, H=6, W=10, N=4, C_out=20, kernel=(1, 1), index="none", seed=24),
    # depthwise: the direct kernels
    "depthwise": Case(P=2, C_in=16, H=9, W=8, N=5, C_out=16, kernel=(3, 3), padding=(1, 1), groups=16, seed=25),
}


@pytest.mark.parametrize("path", ["gemm", "direct"])
@pytest.mark.parametrize("name", ["stride-dilation", "depthwise", "padding-only-output", "rectangular"])
def test_both_paths_serve_any_shape(name, path, monkeypatch):
    # The tensor-core and the direct kernels are each chosen for some shapes; each must be right on all of them.
    monkeypatch.setattr(plan, "FORCE_PATH", path)
    check_case(op, EDGE_CASES[name], torch.float32, DEVICE)


def test_large_batches_bucket_with_torch_sort(monkeypatch):
    monkeypatch.setattr(triton_op, "FORCE_TORCH_BUCKETING", True)
    check_case(op, EDGE_CASES["unused-templates"], torch.float32, DEVICE)
    check_case(op, PATH_CASES["large-templates"], torch.float32, DEVICE)


@pytest.mark.parametrize("N, P, block_t", [(1, 1, None), (37, 9, None), (2100, 5, None), (90, 41, 4)])
def test_bucket_kernel_matches_torch_sort(N, P, block_t):
    # A stable sort by template, out-of-range values (negative or >= P) in the sentinel bucket P, count and start
    # per template; N = 2100 takes several steps per pass, BLOCK_T = 4 several templates per program (what
    # P > 2048 gets).
    generator = torch.Generator().manual_seed(N * 1000 + P)
    index = torch.randint(-3, P + 3, (N,), generator=generator).to(DEVICE)
    order, start, count = (torch.empty(N, dtype=torch.int32, device=DEVICE),
                           torch.empty(P + 1, dtype=torch.int32, device=DEVICE),
                           torch.empty(P + 1, dtype=torch.int32, device=DEVICE))
    block_t = block_t or bucketing.templates_per_program(P)
    bucketing.bucket_kernel[(-(-(P + 1) // block_t),)](index, order, start, count, N, P, BLOCK_T=block_t,
                                                        CHUNK=bucketing.chunk(block_t))
    for what, got, want in zip(("order", "start", "count"), (order, start, count),
                               bucketing.sort_by_template_with_torch(index, P)):
        assert torch.equal(got.cpu(), want.cpu()), what


def _run_each_candidate(case: Case, dtype: torch.dtype, monkeypatch) -> dict:
    """{kernel: number of candidates}, after running the op's forward and backward ops once with each autotuning
    candidate of each kernel (the others at their default) and checking that every run gives the default run's
    bits. The default run is checked against the oracle."""
    forced, seen = {}, {}

    def choose(key, candidates, run, tensor):
        seen[key[0]] = len(candidates)
        return candidates[forced.get(key[0], 0)]

    monkeypatch.setattr(tuning, "choose", choose)
    forward_op, backward_op = torch.ops.pointins_ops.instance_aware_conv_triton, \
        torch.ops.pointins_ops.instance_aware_conv_triton_backward
    templates, weight, bias, index = make_inputs(case, dtype, DEVICE)
    out = forward_op(templates, weight, bias, index, *case.op_args)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed + 1),
                              dtype=torch.float64).to(dtype).to(DEVICE)
    grads = backward_op(grad_output, templates, weight, index, *case.op_args)
    want = oracle_grads(templates, weight, bias, index, grad_output, **case.conv_args)
    atol, rtol = TOL[dtype]
    for what, got, expected in zip(RESULT_NAMES, (out, *grads), want):
        torch.testing.assert_close(got.double().cpu(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
    default = [out, *grads]
    for kernel, count in dict(seen).items():
        for candidate in range(1, count):
            forced.clear()
            forced[kernel] = candidate
            if kernel.startswith("forward"):
                again = [forward_op(templates, weight, bias, index, *case.op_args)]
            else:
                again = [out, *backward_op(grad_output, templates, weight, index, *case.op_args)]
            for what, a, b in zip(RESULT_NAMES, default, again):
                assert torch.equal(a, b), f"{what} of {kernel} candidate {candidate} differs from the default's bits"
    return seen


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_autotune_candidate_matches_and_gives_the_same_bits(dtype, monkeypatch):
    # What the GPU may pick is what runs here: every candidate of every kernel, on cases with several reduction
    # steps, in each dtype. Equal bits across candidates is what makes autotuning unable to change a result
    # (grad_bias included: it is a dot against a ones column, not a warp-layout-dependent tl.sum). On a GPU this
    # also catches any dependence on num_warps and num_stages, which the interpreter does not model.
    seen = {}
    for name in ("small-templates", "large-templates", "strided", "1x1"):
        for kernel, count in _run_each_candidate(PATH_CASES[name], dtype, monkeypatch).items():
            seen[f"{name}/{kernel}"] = count
    # Each autotuned launch kind had more than one candidate here, so the loop above compared something. (IEEE
    # float32's backward has one grad_templates tile: plan.backward_gemm_plan, the only width that compiles without
    # spills on every tested Triton; nothing is chosen there, so nothing can depend on the choice.)
    autotuned = {"forward_gemm"} if dtype == torch.float32 else {"forward_gemm", "backward_fused",
                                                                   "backward_grad_templates"}
    assert {key.split("/")[1] for key, count in seen.items() if count > 1} >= autotuned, seen


def test_config_choice_never_benchmarks_under_capture_or_tracing(monkeypatch):
    # tuning.choose's policy, on the CPU: a key tuned before capture keeps its choice under capture; a key first
    # seen under capture runs the default candidate and is not remembered (so nothing synchronises inside the
    # capture); outside capture every candidate is timed once and the fastest remembered.
    class CudaTensor:
        is_cuda = True

    monkeypatch.setattr(tuning, "INTERPRET", False)
    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    monkeypatch.setattr(tuning, "_tuned", {})
    monkeypatch.setattr("torch._subclasses.fake_tensor.is_fake", lambda tensor: False)
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    timings = {"a": 3.0, "b": 1.0, "c": 2.0}
    timed = []

    def do_bench(fn, warmup, rep):
        return fn()

    monkeypatch.setattr("triton.testing.do_bench", do_bench)

    def run(config):
        timed.append(config)
        return timings[config]

    candidates = ["a", "b", "c"]
    capturing[0] = True
    assert tuning.choose("first seen under capture", candidates, run, CudaTensor()) == "a"
    assert timed == [] and "first seen under capture" not in tuning._tuned
    capturing[0] = False
    assert tuning.choose("tuned eagerly", candidates, run, CudaTensor()) == "b"
    assert timed == ["a", "b", "c"]
    capturing[0] = True
    assert tuning.choose("tuned eagerly", candidates, run, CudaTensor()) == "b"
    assert timed == ["a", "b", "c"]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    capturing[0] = False
    assert tuning.choose("traced", candidates, run, CudaTensor()) == "a" and len(timed) == 3


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["stride-dilation", "unused-templates", "depthwise-multiplier", "rectangular"])
def test_agrees_with_cpu_kernel(name, dtype):
    check_agrees_with_cpu_kernel("triton", EDGE_CASES[name], dtype, DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_are_bitwise_reproducible(dtype):
    # Shared templates: grad_templates sums many instances, where atomics would make the order vary.
    case = Case(P=2, C_in=4, H=9, W=11, N=12, C_out=6, kernel=(3, 3), padding=(1, 1), groups=2, index="random",
                seed=5)
    if ON_GPU:
        case = Case(P=8, C_in=64, H=48, W=48, N=200, C_out=32, kernel=(3, 3), padding=(1, 1), groups=2,
                    index="random", seed=5)
    check_bitwise_reproducible("triton", case, dtype, DEVICE)


def test_out_of_range_index_is_never_read():
    check_out_of_range_index_is_masked("triton", DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", GRAD_BIAS_CASES, ids=str)
def test_backward_without_grad_bias_skips_only_grad_bias(case, dtype):
    check_backward_without_grad_bias("triton", case, dtype, DEVICE)


@needs_gpu
def test_cuda_graph_capture_and_replay():
    # Sorting by template happens on the device without a host sync, so a captured graph re-sorts a changed
    # index on replay.
    case, static, graph, captured, step = capture_forward_and_backward("triton", DEVICE)
    static[0].copy_(torch.randn_like(static[0]))
    static[3].copy_(torch.randint(0, case.P, (case.N,), device=DEVICE))
    graph.replay()
    torch.cuda.synchronize()
    for what, got, want in zip(RESULT_NAMES, captured, step(*static)):
        assert torch.equal(got, want), f"{what} differs between replay and eager"


@pytest.mark.parametrize("name", ["padding-only-output", "channels-last", "empty-N", "int32-index"])
def test_opcheck(name):
    # Under the interpreter the op is an opaque custom op (see kernels.py); on a GPU it is a triton_op whose
    # kernels torch.compile traces. opcheck covers both registrations: schema, fake, autograd, AOT dispatch.
    check_ops_pass_opcheck("triton", EDGE_CASES[name], DEVICE)


def test_torch_compile_fullgraph():
    check_compiled_fullgraph(op, EDGE_CASES["stride-dilation"], DEVICE)


@needs_gpu  # the interpreter never autotunes
def test_autotuned_kernels_match_oracle(monkeypatch):
    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    for case in RANDOM_CASES[:6] + [EDGE_CASES["large-tile"]] + list(PATH_CASES.values()):
        check_case(op, case, torch.float32, DEVICE)
    torch._dynamo.reset()
    check_case(torch.compile(op, fullgraph=True), EDGE_CASES["stride-dilation"], torch.float32, DEVICE)


@needs_gpu
def test_capture_of_an_untuned_shape_runs_defaults_without_benchmarking(monkeypatch):
    # The warm-up before capture compiles the default candidates with autotuning off; then, autotuning on, the
    # capture meets keys nobody has tuned: it must run the defaults and time nothing inside the capture.
    case = PATH_CASES["large-templates"]
    templates, weight, bias, index = make_inputs(case, torch.float32, DEVICE)
    forward_op = torch.ops.pointins_ops.instance_aware_conv_triton
    backward_op = torch.ops.pointins_ops.instance_aware_conv_triton_backward

    def step():
        out = forward_op(templates, weight, bias, index, *case.op_args)
        return (out, *backward_op(torch.ones_like(out), templates, weight, index, *case.op_args))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    tuning.clear()
    before = tuning.benchmarks_run
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    assert tuning.benchmarks_run == before
    graph.replay()
    torch.cuda.synchronize()
    for what, got, want in zip(RESULT_NAMES, captured, step()):
        assert torch.equal(got, want), f"{what} differs between replay and eager"


def test_float32_follows_conv2d_tf32_flag():
    cudnn, cuda = torch.backends.cudnn, torch.device("cuda")
    saved = (cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision)
    try:
        cudnn.conv.fp32_precision = "tf32"
        assert triton_op._conv_allows_tf32(cuda)
        assert not triton_op._conv_allows_tf32(torch.device("cpu"))
        cudnn.conv.fp32_precision = "ieee"
        assert not triton_op._conv_allows_tf32(cuda)
        cudnn.allow_tf32 = False  # the legacy flag
        assert not triton_op._conv_allows_tf32(cuda)
        cudnn.allow_tf32 = True
        assert triton_op._conv_allows_tf32(cuda)
    finally:
        cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved


def test_gpu_registration_traces_kernels_into_the_graph():
    # The GPU registration (triton_op) cannot run without a GPU, but torch.compile can trace it on meta tensors:
    # the graph must hold the Triton kernels themselves (not an opaque op), and one graph with dynamic shapes
    # must serve every instance count (tile sizes are chosen without guarding on it).
    script = textwrap.dedent("""
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        import torch
        from torch._dynamo.backends.common import aot_autograd
        import pointins_ops

        graphs = []
        def capture(gm, example_inputs):
            graphs.append(gm.code)
            def never_run(*args):
                raise RuntimeError("captured")
            return never_run

        @torch.compile(backend=aot_autograd(fw_compiler=capture), dynamic=True, fullgraph=True)
        def forward_and_backward(templates, weight, bias, index, grad_output):
            conv = ([1, 1], [1, 1], [1, 1], 2)
            out = torch.ops.pointins_ops.instance_aware_conv_triton(templates, weight, bias, index, *conv)
            grads = torch.ops.pointins_ops.instance_aware_conv_triton_backward(grad_output, templates, weight, index,
                                                                               *conv)
            return out, grads

        for n in (5, 7, 30):
            try:
                forward_and_backward(torch.empty(3, 4, 9, 8, device="meta"), torch.empty(n, 6, 2, 3, 3, device="meta"),
                                     torch.empty(n, 6, device="meta"), torch.zeros(n, dtype=torch.long, device="meta"),
                                     torch.empty(n, 6, 9, 8, device="meta"))
            except RuntimeError as error:
                assert "captured" in str(error), error
        print("GRAPHS", len(graphs))
        print("KERNELS", graphs[0].count("triton_kernel_wrapper_functional("))
        print("OPAQUE", graphs[0].count("instance_aware_conv_triton"))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert result.returncode == 0, result.stderr[-3000:]
    # Forward: bucketing and the forward kernel; backward: bucketing and the fused backward kernel.
    assert "GRAPHS 1" in result.stdout and "KERNELS 4" in result.stdout and "OPAQUE 0" in result.stdout, (
        result.stdout)


def _without_interpreter() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


COMPILE_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "pointins_ops", "triton", "compile.py")


def _spills(report: dict) -> bool:
    return bool(report["spill_store_bytes"] or report["spill_load_bytes"] or report["spill_stores"]
                or report["spill_loads"])


def test_no_autotune_candidate_spills_on_sm90():
    # Every launch of every benchmark scenario (forward and backward), every autotuning candidate, in bfloat16,
    # float16, float32 and float32 with TF32, compiled for sm_90a: ptxas reports no spill bytes and the SASS has
    # no local-memory loads or stores. (Triton's cache makes a second run fast; a cold run takes a few minutes.)
    result = subprocess.run([sys.executable, COMPILE_SCRIPT, "--jobs", "2", "--json"], capture_output=True, text=True,
                            timeout=1500, env=_without_interpreter())
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["scenario"] for r in reports} == set(SCENARIOS) and len(reports) > 100, len(reports)
    assert not [r for r in reports if _spills(r)], [(r["scenario"], r["dtype"], r["config"]) for r in reports
                                                    if _spills(r)]
    # The reports are real: 16-bit GEMM kernels run on tensor cores, Hopper's wgmma (HGMMA) wherever a row block
    # has 64 rows or more (the scenarios but pointins-infer, whose 16-row blocks use HMMA).
    gemm = [r for r in reports if r["kernel"] in ("forward_gemm", "backward_fused") and r["dtype"] == "bfloat16"]
    assert gemm and all(r["hgmma"] + r["hmma"] > 0 and 0 < r["registers"] <= 255 for r in gemm)
    assert all(r["hgmma"] > 0 for r in gemm if r["scenario"] != "pointins-infer")
    # The autotuned kernels reduce only through dot chains: no tt.reduce, whose summation order would follow
    # the warp layout (how grad_bias once depended on num_warps).
    tuned = [r for r in reports if r["kernel"] in ("forward_gemm", "backward_fused")]
    assert tuned and not [r["config"] for r in tuned if r["reductions"]]


def test_kernels_compile_for_gpu_targets():
    # The code paths the scenarios do not take (two-launch backward for strided convolutions, direct kernels,
    # no index), with 64-bit offsets and TF32, compiled for Ampere and Hopper without a GPU: every candidate.
    script = textwrap.dedent("""
        import json, sys
        import torch
        from pointins_ops.triton import plan
        from pointins_ops.triton.compile import compile_launch, record
        cases, variants = json.loads(sys.argv[1]), json.loads(sys.argv[2])
        for capability, dtype, wide in variants:
            plan.FORCE_64BIT_OFFSETS = wide
            for name, case in cases.items():
                launches = record(**case, dtype=getattr(torch, dtype.split("+")[0]), tf32=dtype.endswith("+tf32"))
                for mode, recorded in launches.items():
                    for launch in recorded:
                        report = compile_launch(launch, capability)
                        report.update(case=name, dtype=dtype, wide=wide, mode=mode)
                        print(json.dumps(report), flush=True)
    """)
    cases = {name: dict(templates_shape=(c.P, c.C_in, c.H, c.W),
                        weight_shape=(c.N, c.C_out, c.C_in // c.groups, *c.kernel), bias=c.bias,
                        index=c.index != "none", stride=c.stride, padding=c.padding, dilation=c.dilation,
                        groups=c.groups)
             for name, c in [("strided", dataclasses.replace(PATH_CASES["strided"], H=64, W=66)),  # split grad_weight
                             ("depthwise", PATH_CASES["depthwise"]), ("1x1", PATH_CASES["1x1"])]}
    variants = [(90, "bfloat16", True), (90, "float32+tf32", False), (90, "float32", True), (80, "float16", False)]
    result = subprocess.run([sys.executable, "-c", script, json.dumps(cases), json.dumps(variants)],
                            capture_output=True, text=True, timeout=1500, env=_without_interpreter())
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    kernels = {r["kernel"] for r in reports}
    assert {"forward_gemm", "forward_direct", "backward_grad_templates", "backward_grad_weight", "backward_direct",
            "sum_partials_kernel", "bucket_kernel"} <= kernels, kernels
    assert {(r["capability"], r["dtype"], r["wide"]) for r in reports} == {tuple(v) for v in variants}
    # No spills on Hopper. (Ampere is compiled to show the kernels build for it; there, IEEE float32 with 64-bit
    # offsets spills: ptxas gives two of those kernels 32 registers.)
    hopper = [r for r in reports if r["capability"] == 90]
    assert not [r for r in hopper if _spills(r)], [(r["case"], r["dtype"], r["config"]) for r in hopper
                                                   if _spills(r)]
    assert not [r["config"] for r in reports if r["kernel"].startswith(("forward_gemm", "backward_grad"))
                and r["reductions"]]


def test_estimate_runs_and_gives_each_kernel_its_reasoning():
    # benchmarks/estimate.py (the README's GPU estimate) stays runnable: one scenario and mode, no compiles. Its
    # Triton plan comes from the real launchers, so a launcher change that breaks it shows here.
    result = subprocess.run([sys.executable, "-m", "benchmarks.estimate", "--no-compile", "--no-cuda", "--scenario",
                             "condinst", "--dtype", "bfloat16", "--mode", "forward+backward", "--kernels"],
                            capture_output=True, text=True, timeout=600, env=_without_interpreter(),
                            cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ESTIMATE" in result.stdout and "condinst" in result.stdout, result.stdout
    for kernel in ("bucket_kernel", "forward_gemm", "backward_fused", "sum_partials_kernel"):
        assert kernel in result.stdout, (kernel, result.stdout)
