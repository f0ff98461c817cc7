"""The hand-written CUDA kernels (backend="cuda") against the op's oracle, the C++ CPU kernel, and themselves
(determinism), plus CUDA-graph capture, a non-default stream, 64-bit offsets, gradcheck, opcheck and
torch.compile.

Everything here needs a GPU and skips without one. With a GPU, test_cuda_kernel_is_built fails (rather than
the rest skipping) if the extension was built without its CUDA kernels.
"""

import functools

import pytest
import torch

from oracle import (EDGE_CASES, GRAD_BIAS_CASES, RESULT_NAMES, TOL, Case, capture_forward_and_backward,
                    check_agrees_with_cpu_kernel, check_backward_without_grad_bias, check_bitwise_reproducible,
                    check_case, check_compiled_fullgraph, check_ops_pass_opcheck, check_out_of_range_index_is_masked,
                    conv_tf32, forward_and_grads, make_inputs, oracle_forward, oracle_grads, random_cases)
from pointins_ops import available_backends, instance_aware_conv

ON_GPU = torch.cuda.is_available()
HAS_KERNEL = ON_GPU and "cuda" in available_backends("cuda")
DEVICE = "cuda"
DTYPES = tuple(TOL)  # float64, float32, float16, bfloat16: the kernels serve all four

pytestmark = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")

RANDOM_CASES = random_cases(240, seed=2026)
op = functools.partial(instance_aware_conv, backend="cuda")


@pytest.fixture(autouse=True)
def skip_without_cuda_kernel(request):
    if not HAS_KERNEL and request.node.originalname != "test_cuda_kernel_is_built":
        pytest.skip("the extension was built without its CUDA kernels (see test_cuda_kernel_is_built)")


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 is held to float32's tolerance, so TF32 is off (torch turns it on by default for convolutions, and
    the kernels follow it as F.conv2d does: test_float32_follows_conv2d_tf32_flag)."""
    with conv_tf32(False):
        yield


def test_cuda_kernel_is_built():
    # With a GPU, a missing CUDA kernel fails here instead of silently skipping the rest of this file.
    assert HAS_KERNEL, ("the extension has no CUDA kernels: rebuild it on this machine with "
                        "pip install --no-build-isolation -e . (or FORCE_CUDA=1 on a machine without a GPU)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", RANDOM_CASES, ids=str)
def test_random_cases_match_conv2d(case, dtype):
    check_case(op, case, dtype, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", EDGE_CASES)
def test_edge_cases_match_conv2d(name, dtype):
    check_case(op, EDGE_CASES[name], dtype, DEVICE)


# Shapes that take every kernel through several tiles and reduction slices: many instances per template (row
# tiles spanning instances), > 64 output pixels and input pixels (column tiles), C_in / groups > 64 (several
# channel tiles in grad_templates, several K tiles in grad_weight), uneven buckets, and few tiles over many
# pixels (grad_weight split over pixel ranges, then summed).
TILED_CASES = [
    Case(P=2, C_in=8, H=50, W=60, N=6, C_out=2, kernel=(3, 3), padding=(1, 1), index="random", seed=2),
    Case(P=3, C_in=4, H=20, W=30, N=40, C_out=3, kernel=(3, 3), padding=(1, 1), index="random", seed=3),
    Case(P=2, C_in=70, H=9, W=10, N=7, C_out=5, kernel=(3, 3), padding=(1, 1), index="random", seed=4),
    Case(P=5, C_in=16, H=17, W=13, N=50, C_out=24, kernel=(3, 3), stride=(2, 1), padding=(2, 1), dilation=(2, 1),
         groups=2, index="unused", seed=6),
    Case(P=1, C_in=8, H=40, W=40, N=30, C_out=8, kernel=(1, 1), index="single", layout="channels_last", seed=7),
    Case(P=4, C_in=130, H=6, W=6, N=9, C_out=130, kernel=(3, 3), padding=(1, 1), groups=130, index="random",
         seed=8),
]


# float32 runs the same FFMA code as float64, but these reductions (hundreds to thousands of terms) are longer
# than TOL[float32] is set for; float64 checks the tiling tightly, float16 / bfloat16 check the tensor cores.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TILED_CASES, ids=str)
def test_tiled_shapes_match_conv2d(case, dtype):
    check_case(op, case, dtype, DEVICE)


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="the C++ CPU kernel is not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["stride-dilation", "unused-templates", "depthwise-multiplier", "rectangular"])
def test_agrees_with_cpu_kernel(name, dtype):
    check_agrees_with_cpu_kernel("cuda", EDGE_CASES[name], dtype, DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_results_are_bitwise_reproducible(dtype):
    # Shared templates: grad_templates sums many instances, where atomics would make the order vary.
    case = Case(P=8, C_in=64, H=48, W=48, N=200, C_out=32, kernel=(3, 3), padding=(1, 1), groups=2, index="random",
                seed=5)
    check_bitwise_reproducible("cuda", case, dtype, DEVICE)


def test_out_of_range_index_is_never_read():
    check_out_of_range_index_is_masked("cuda", DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", GRAD_BIAS_CASES, ids=str)
def test_backward_without_grad_bias_skips_only_grad_bias(case, dtype):
    check_backward_without_grad_bias("cuda", case, dtype, DEVICE)


def test_cuda_graph_capture_and_replay():
    # Bucketing by template happens on the device, so a captured graph re-buckets a changed index on replay.
    case, static, graph, captured, step = capture_forward_and_backward("cuda", DEVICE)
    templates, weight, bias = static[:3]  # never refilled
    for seed in range(3):
        generator = torch.Generator(device=DEVICE).manual_seed(seed)
        new_index = torch.randint(0, case.P, (case.N,), device=DEVICE, generator=generator)
        new_grad = torch.randn(static[4].shape, device=DEVICE, generator=generator)
        static[3].copy_(new_index)
        static[4].copy_(new_grad)
        graph.replay()
        expected = step(templates, weight, bias, new_index, new_grad)
        for what, got, want in zip(RESULT_NAMES, captured, expected):
            assert torch.equal(got, want), f"{what}: replay differs from an eager run (seed {seed})"


def test_non_default_stream():
    case = EDGE_CASES["stride-dilation"]
    expected = forward_and_grads("cuda", case, torch.float32, DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # A busy stream: if a kernel ran on the default stream instead, it would race this work.
        torch.cuda._sleep(10_000_000)
        got = forward_and_grads("cuda", case, torch.float32, DEVICE)
    for what, a, b in zip(RESULT_NAMES, got, expected):
        assert torch.equal(a, b), f"{what} differs on a non-default stream"


def test_other_device_guard():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    case = EDGE_CASES["depthwise"]
    with torch.cuda.device(0):
        check_case(op, case, torch.float32, "cuda:1")


def test_offsets_past_2_31_elements():
    # output and grad_output have > 2^31 elements (float16: 4.6 GB each), so their flat offsets need 64 bits
    # in every kernel. Checked on the last instances (offsets past 2^31) and on the last template's gradient.
    N, C_out, P, C_in, H, W = 140_000, 16, 1000, 4, 32, 32
    needed = 2 * N * C_out * H * W * 2 + (6 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.0f} GiB of free GPU memory; {free / 2**30:.0f} GiB free")
    assert N * C_out * H * W > 2**31
    dtype = torch.float16
    generator = torch.Generator(device=DEVICE).manual_seed(11)
    templates = torch.randn(P, C_in, H, W, device=DEVICE, generator=generator).to(dtype)
    weight = (torch.randn(N, C_out, C_in, 3, 3, device=DEVICE, generator=generator) / 6).to(dtype)
    bias = torch.randn(N, C_out, device=DEVICE, generator=generator).to(dtype)
    index = torch.randint(0, P, (N,), device=DEVICE, generator=generator)
    conv = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    out = torch.ops.pointins_ops.instance_aware_conv(templates, weight, bias, index, *conv.values())
    grad_output = torch.randn(out.shape, device=DEVICE, generator=generator, dtype=dtype)
    grad_templates, grad_weight, grad_bias = torch.ops.pointins_ops.instance_aware_conv_backward(
        grad_output, templates, weight, index, *conv.values())
    atol, rtol = TOL[dtype]

    last = torch.arange(N - 40, N, device=DEVICE)
    ref_out, _, ref_weight, ref_bias = oracle_grads(templates, weight[last], bias[last], index[last],
                                                    grad_output[last], **conv)
    torch.testing.assert_close(out[last].double().cpu(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_weight[last].double().cpu(), ref_weight, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_bias[last].double().cpu(), ref_bias, atol=atol, rtol=rtol)

    p = int(index[-1])
    users = (index == p).nonzero().flatten()
    local_index = torch.zeros(len(users), dtype=torch.long, device=DEVICE)
    _, ref_templates, _, _ = oracle_grads(templates[p:p + 1], weight[users], bias[users], local_index,
                                          grad_output[users], **conv)
    torch.testing.assert_close(grad_templates[p:p + 1].double().cpu(), ref_templates, atol=atol, rtol=rtol)
    assert grad_templates.isfinite().all()


@pytest.mark.parametrize("name", ["stride-dilation", "unused-templates", "depthwise-multiplier", "rectangular",
                                  "channels-last"])
def test_gradcheck(name):
    case = EDGE_CASES[name]
    templates, weight, bias, index = make_inputs(case, torch.float64, DEVICE)
    inputs = [x.detach().requires_grad_() for x in (templates, weight, bias) if x is not None]

    def conv(templates, weight, *bias):
        return op(templates, weight, bias[0] if bias else None, index, **case.conv_args)

    assert torch.autograd.gradcheck(conv, inputs)


@pytest.mark.parametrize("name", ["stride-dilation", "channels-last", "empty-N", "int32-index"])
def test_opcheck(name):
    check_ops_pass_opcheck("cuda", EDGE_CASES[name], DEVICE)


def test_float32_follows_conv2d_tf32_flag():
    # With TF32 on, float32 runs on TF32 tensor cores: a different result, within float16's tolerance (TF32 keeps
    # float16's 10-bit mantissa); with it off, float32 is exact to float32's tolerance.
    case = Case(P=3, C_in=32, H=12, W=11, N=7, C_out=16, kernel=(3, 3), padding=(1, 1), index="random", seed=4)
    templates, weight, bias, index = make_inputs(case, torch.float32, DEVICE)
    ieee = op(templates, weight, bias, index, **case.conv_args)
    with conv_tf32(True):
        tf32 = op(templates, weight, bias, index, **case.conv_args)
    reference = oracle_forward(templates, weight, bias, index, **case.conv_args)
    torch.testing.assert_close(ieee.double().cpu(), reference, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])
    torch.testing.assert_close(tf32.double().cpu(), reference, atol=TOL[torch.float16][0], rtol=TOL[torch.float16][1])
    assert not torch.equal(tf32, ieee), "TF32 on, yet float32 ran as IEEE float32"


def test_torch_compile_fullgraph():
    check_compiled_fullgraph(op, EDGE_CASES["stride-dilation"], DEVICE)
