"""The op against its oracle (per-instance F.conv2d in float64) on the C++ CPU kernel and the pure-PyTorch
backend, plus gradcheck, opcheck, torch.compile and determinism."""

import functools

import pytest
import torch
import torch.nn.functional as F

from oracle import (EDGE_CASES, GRAD_BIAS_CASES, TOL, Case, check_backward_without_grad_bias, check_case, make_inputs,
                    random_cases)
from pointins_ops import available_backends, instance_aware_conv
from pointins_ops import reference

CPU_BACKENDS = [b for b in ("cpu", "torch") if b in available_backends("cpu")]
RANDOM_CASES = random_cases(240, seed=2026)


def _op(backend):
    return functools.partial(instance_aware_conv, backend=backend)


def test_cpu_kernel_is_built():
    # The rest of this file would silently test only the reference without it.
    assert "cpu" in CPU_BACKENDS, "pointins_ops._C is not built: install with pip install --no-build-isolation -e ."


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", RANDOM_CASES, ids=str)
def test_random_cases_match_conv2d(case, backend):
    # Each case runs in one dtype (cycled by its seed) so 240 cases cover all four dtypes in one CI minute.
    dtype = list(TOL)[case.seed % len(TOL)]
    check_case(_op(backend), case, dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", TOL, ids=str)
@pytest.mark.parametrize("name", EDGE_CASES)
def test_edge_cases_match_conv2d(name, dtype, backend):
    check_case(_op(backend), EDGE_CASES[name], dtype)


# einsum_1x1 only serves 1x1 kernels: it is paired with the 1x1 cases only.
FORMULATION_CASES = [(formulation, name) for formulation in reference.FORMULATIONS
                     for name in ("depthwise", "stride-dilation", "unused-templates", "1x1-wide", "int32-index",
                                  "padding-only-output", "empty-N")
                     if formulation != "einsum_1x1" or EDGE_CASES[name].kernel == (1, 1)]


@pytest.mark.parametrize("formulation,name", FORMULATION_CASES)
def test_every_reference_formulation_matches_conv2d(formulation, name):
    check_case(reference.FORMULATIONS[formulation], EDGE_CASES[name], torch.float64)


# Small shapes: gradcheck perturbs every input element, and the reference's grouped conv2d in float64 is slow.
GRADCHECK_CASES = {
    "stride-dilation": Case(P=3, C_in=4, H=7, W=6, N=4, C_out=2, kernel=(3, 3), stride=(2, 1), padding=(2, 1),
                            dilation=(2, 1), groups=2),
    "unused-templates": Case(P=4, C_in=2, H=5, W=4, N=3, C_out=2, kernel=(3, 3), padding=(1, 1), index="unused"),
    "depthwise-multiplier": Case(P=2, C_in=3, H=5, W=5, N=3, C_out=6, kernel=(3, 3), padding=(2, 2),
                                 dilation=(2, 2), groups=3),
    "rectangular": Case(P=2, C_in=2, H=4, W=7, N=3, C_out=2, kernel=(1, 3), stride=(1, 2), padding=(0, 1)),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", GRADCHECK_CASES)
def test_gradcheck(name, backend):
    case = GRADCHECK_CASES[name]
    templates, weight, bias, index = make_inputs(case, torch.float64)
    inputs = [x.detach().requires_grad_() for x in (templates, weight, bias) if x is not None]

    def op(templates, weight, *bias):
        return instance_aware_conv(templates, weight, bias[0] if bias else None, index, backend=backend,
                                   **case.conv_args)

    assert torch.autograd.gradcheck(op, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_unused_templates_get_exactly_zero_gradient():
    case = EDGE_CASES["unused-templates"]
    templates, weight, bias, index = make_inputs(case, torch.float32)
    templates.requires_grad_()
    instance_aware_conv(templates, weight, bias, index, backend="cpu", **case.conv_args).square().sum().backward()
    unused = sorted(set(range(case.P)) - set(index.tolist()))
    assert unused, "the case must leave templates unused"
    assert torch.count_nonzero(templates.grad[unused]) == 0
    assert torch.count_nonzero(templates.grad[index.unique()]) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_kernel_is_bitwise_deterministic_across_runs_and_thread_counts(dtype):
    case = Case(P=5, C_in=8, H=17, W=19, N=23, C_out=6, kernel=(3, 3), padding=(1, 1), index="random", seed=7)
    templates, weight, bias, index = make_inputs(case, dtype)
    grad_output = torch.randn(case.N, case.C_out, 17, 19).to(dtype)

    def run():
        leaves = [x.detach().clone().requires_grad_() for x in (templates, weight, bias)]
        out = instance_aware_conv(*leaves, index, backend="cpu", **case.conv_args)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, grad_output))

    threads = torch.get_num_threads()
    try:
        first = run()
        second = run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_opcheck():
    op = torch.ops.pointins_ops.instance_aware_conv.default
    samples = [EDGE_CASES[name] for name in ("stride-dilation", "channels-last", "int32-index", "empty-N")]
    samples.append(Case(P=3, C_in=4, H=6, W=5, N=3, C_out=2, kernel=(3, 3), padding=(1, 1), index="none",
                        bias=False))
    for case in samples:
        templates, weight, bias, index = make_inputs(case, torch.float32)
        templates.requires_grad_()
        weight.requires_grad_()
        args = (templates, weight, bias, index, list(case.stride), list(case.padding), list(case.dilation),
                case.groups)
        torch.library.opcheck(op, args)


def test_opcheck_backward_op():
    case = EDGE_CASES["stride-dilation"]
    templates, weight, _, index = make_inputs(case, torch.float32)
    out = instance_aware_conv(templates, weight, None, index, **case.conv_args)
    args = (torch.randn_like(out), templates, weight, index, list(case.stride), list(case.padding),
            list(case.dilation), case.groups)
    torch.library.opcheck(torch.ops.pointins_ops.instance_aware_conv_backward.default, args)
    torch.library.opcheck(torch.ops.pointins_ops.instance_aware_conv_backward.default, args + (False,))


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="the C++ CPU kernel is not built")
@pytest.mark.parametrize("case", GRAD_BIAS_CASES, ids=str)
def test_backward_without_grad_bias_skips_only_grad_bias(case):
    check_backward_without_grad_bias("cpu", case, torch.float32, "cpu")


def test_torch_compile_fullgraph_traces_the_op():
    torch._dynamo.reset()
    case = EDGE_CASES["stride-dilation"]
    templates, weight, bias, index = make_inputs(case, torch.float32)
    leaves = [x.requires_grad_() for x in (templates, weight, bias)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def head(templates, weight, bias, index):
        return torch.relu(instance_aware_conv(templates, weight, bias, index, **case.conv_args)).sum()

    loss = head(*leaves, index)
    loss.backward()
    eager = [x.detach().clone().requires_grad_() for x in leaves]
    expected = torch.relu(instance_aware_conv(*eager, index, **case.conv_args)).sum()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for got, want in zip(leaves, eager):
        torch.testing.assert_close(got.grad, want.grad)


def test_torch_compile_with_inductor():
    torch._dynamo.reset()
    case = EDGE_CASES["depthwise"]
    templates, weight, bias, index = make_inputs(case, torch.float32)
    compiled = torch.compile(lambda *a: instance_aware_conv(*a, **case.conv_args) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(templates, weight, bias, index),
                               instance_aware_conv(templates, weight, bias, index, **case.conv_args) * 2)


def test_output_is_contiguous_for_channels_last_input():
    case = EDGE_CASES["channels-last"]
    templates, weight, bias, index = make_inputs(case, torch.float32)
    assert not templates.is_contiguous()
    out = instance_aware_conv(templates, weight, bias, index, backend="cpu", **case.conv_args)
    assert out.is_contiguous()


def test_large_instance_count_matches_reference():
    # Many instances per template exercise chunking of instances and several pixel tiles per template.
    case = Case(P=3, C_in=4, H=20, W=30, N=40, C_out=3, kernel=(3, 3), padding=(1, 1), index="random", seed=3)
    check_case(_op("cpu"), case, torch.float32)


def test_sharing_a_template_equals_repeating_it():
    case = EDGE_CASES["single-template"]
    templates, weight, bias, index = make_inputs(case, torch.float32)
    shared = instance_aware_conv(templates, weight, bias, index, backend="cpu", **case.conv_args)
    repeated = instance_aware_conv(templates[index.long()], weight, bias, None, backend="cpu", **case.conv_args)
    assert torch.equal(shared, repeated)
    expected = F.conv2d(templates[case.P - 1:case.P], weight[0], bias[0], **case.conv_args)
    torch.testing.assert_close(shared[:1], expected)
