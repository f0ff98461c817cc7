"""Every malformed argument raises a Python exception that names it, with expected vs actual — on the
public function (all backends) and on the registered C++ op called directly."""

import pytest
import torch

from pointins_ops import instance_aware_conv

BACKENDS = ["cpu", "torch"]


def good():
    """Valid arguments: 3 templates (4 x 6 x 6), 5 instances with 2-channel 3x3 kernels, groups 2."""
    return dict(templates=torch.randn(3, 4, 6, 6), weight=torch.randn(5, 2, 2, 3, 3), bias=torch.randn(5, 2),
                index=torch.tensor([0, 2, 2, 1, 0]), stride=1, padding=1, dilation=1, groups=2)


def call(backend, **changes):
    args = good()
    args.update(changes)
    templates, weight, bias, index = (args.pop(k) for k in ("templates", "weight", "bias", "index"))
    return instance_aware_conv(templates, weight, bias, index, backend=backend, **args)


BAD = {
    # name: (changes, exception, message pattern)
    "templates-rank": (dict(templates=torch.randn(3, 4, 6)), ValueError, r"templates must have 4 dimensions"),
    "weight-rank": (dict(weight=torch.randn(5, 2, 2, 3)), ValueError, r"weight must have 5 dimensions"),
    "templates-not-tensor": (dict(templates=[[1.0]]), TypeError, r"templates must be a torch.Tensor"),
    "c-in-not-divisible": (dict(groups=3, weight=torch.randn(5, 3, 1, 3, 3)), ValueError,
                           r"C_in = 4\) must be divisible by groups \(3\)"),
    "c-out-not-divisible": (dict(weight=torch.randn(5, 3, 2, 3, 3), bias=torch.randn(5, 3)), ValueError,
                            r"C_out = 3\) must be divisible by groups \(2\)"),
    "weight-channels": (dict(weight=torch.randn(5, 2, 4, 3, 3)), ValueError,
                        r"weight.shape\[2\] \* groups must equal templates.shape\[1\] \(C_in\); got 4 \* 2 != 4"),
    "bias-shape": (dict(bias=torch.randn(5, 3)), ValueError, r"bias must have shape \(N, C_out\) = \(5, 2\); got \(5, 3\)"),
    "index-length": (dict(index=torch.tensor([0, 1])), ValueError, r"index must have shape \(N,\) = \(5,\); got \(2,\)"),
    "no-index-n-neq-p": (dict(index=None), ValueError, r"without index, weight.shape\[0\] \(N\) must equal "
                                                       r"templates.shape\[0\] \(P\); got N = 5, P = 3"),
    "index-negative": (dict(index=torch.tensor([0, -1, 2, 1, 0])), IndexError, r"index values must lie in "
                                                                               r"\[0, P\) = \[0, 3\); got -1"),
    "index-too-large": (dict(index=torch.tensor([0, 1, 3, 1, 0])), IndexError, r"\[0, 3\); got 3"),
    "index-float": (dict(index=torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0])), TypeError, r"index must be int32 or int64"),
    "weight-dtype": (dict(weight=torch.randn(5, 2, 2, 3, 3, dtype=torch.float64)), TypeError,
                     r"weight.dtype must equal templates.dtype \(torch.float32\); got torch.float64"),
    "bias-dtype": (dict(bias=torch.randn(5, 2, dtype=torch.float16)), TypeError, r"bias.dtype must equal"),
    "integer-tensors": (dict(templates=torch.ones(3, 4, 6, 6, dtype=torch.int32),
                             weight=torch.ones(5, 2, 2, 3, 3, dtype=torch.int32), bias=None), TypeError,
                        r"templates must be float16, bfloat16, float32 or float64; got torch.int32"),
    "bool-tensors": (dict(templates=torch.ones(3, 4, 6, 6, dtype=torch.bool),
                          weight=torch.ones(5, 2, 2, 3, 3, dtype=torch.bool), bias=None), TypeError,
                     r"got torch.bool"),
    "device": (dict(weight=torch.randn(5, 2, 2, 3, 3, device="meta")), ValueError,
               r"weight must be on templates' device \(cpu\); got meta"),
    "empty-output": (dict(padding=0, templates=torch.randn(3, 4, 2, 2)), ValueError,
                     r"the padded template \(2 x 2, padding \(0, 0\)\) is smaller than the dilated kernel"),
    "stride-zero": (dict(stride=0), ValueError, r"stride must be >= 1; got \(0, 0\)"),
    "dilation-zero": (dict(dilation=(1, 0)), ValueError, r"dilation must be >= 1; got \(1, 0\)"),
    "padding-negative": (dict(padding=-1), ValueError, r"padding must be >= 0; got \(-1, -1\)"),
    "groups-zero": (dict(groups=0), ValueError, r"groups must be >= 1; got 0"),
    "stride-not-int": (dict(stride=1.5), TypeError, r"stride must be an int or a pair of ints; got 1.5"),
    "padding-string": (dict(padding="same"), TypeError, r"padding must be an int or a pair of ints; got 'same'"),
    "stride-triple": (dict(stride=(1, 1, 1)), TypeError, r"stride must be an int or a pair of ints"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", BAD)
def test_bad_input_raises_a_clear_error(name, backend):
    changes, exception, pattern = BAD[name]
    with pytest.raises(exception, match=r"instance_aware_conv: " + ".*" + pattern):
        call(backend, **changes)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'gpu'"):
        call("gpu")


def test_backend_for_another_device():
    with pytest.raises(ValueError, match=r"backend='cuda' needs cuda tensors; got tensors on cpu"):
        call("cuda")


def test_bad_environment_backend(monkeypatch):
    monkeypatch.setenv("POINTINS_OPS_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"POINTINS_OPS_BACKEND must be one of .*got 'fast'"):
        call("auto")


def test_environment_variable_chooses_the_backend(monkeypatch):
    import pointins_ops.ops as ops

    calls = []
    real = ops.reference.instance_aware_conv_reference
    monkeypatch.setattr(ops.reference, "instance_aware_conv_reference",
                        lambda *a, **k: calls.append("torch") or real(*a, **k))
    call("auto")
    assert calls == []  # auto picks the C++ kernel for CPU tensors
    monkeypatch.setenv("POINTINS_OPS_BACKEND", "torch")
    call("auto")
    assert calls == ["torch"]
    call("cpu")  # an explicit backend wins over the variable
    assert calls == ["torch"]


# The C++ op checks its own input too, so a direct torch.ops call can never read out of bounds.
DIRECT = {
    "index-too-large": (dict(index=torch.tensor([0, 1, 3, 1, 0])), IndexError,
                        r"index values must lie in \[0, P\) = \[0, 3\); got 3 at position 2"),
    "index-negative-int32": (dict(index=torch.tensor([0, 1, 2, -5, 0], dtype=torch.int32)), IndexError,
                             r"got -5 at position 3"),
    "weight-channels": (dict(weight=torch.randn(5, 2, 4, 3, 3)), ValueError,
                        r"weight.shape\[2\] \* groups must equal templates.shape\[1\] \(C_in\); got 4 \* 2 != 4"),
    "bias-shape": (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(N, C_out\) = \(5, 2\)"),
    "index-dtype": (dict(index=torch.tensor([0, 1, 2, 1, 0], dtype=torch.int16)), TypeError,
                    r"index must be int32 or int64; got Short"),
    "empty-output": (dict(templates=torch.randn(3, 4, 1, 1), padding=0), ValueError, r"smaller than the dilated kernel"),
    "weight-dtype": (dict(weight=torch.randn(5, 2, 2, 3, 3).double()), TypeError, r"weight.dtype must equal"),
}


@pytest.mark.parametrize("name", DIRECT)
def test_registered_op_checks_its_input(name):
    args = good()
    changes, exception, pattern = DIRECT[name]
    args.update(changes)
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    with pytest.raises(exception, match=r"instance_aware_conv: .*" + pattern):
        torch.ops.pointins_ops.instance_aware_conv(args["templates"], args["weight"], args["bias"], args["index"],
                                                   pair(args["stride"]), pair(args["padding"]),
                                                   pair(args["dilation"]), args["groups"])


def test_backward_op_checks_grad_output():
    args = good()
    with pytest.raises(ValueError, match=r"grad_output must have the output's shape \(5, 2, 6, 6\); got \[5, 2, 6, 5\]"):
        torch.ops.pointins_ops.instance_aware_conv_backward(torch.randn(5, 2, 6, 5), args["templates"], args["weight"],
                                                            args["index"], [1, 1], [1, 1], [1, 1], 2)


def test_auto_falls_back_to_the_reference_with_one_warning(monkeypatch):
    import pointins_ops.ops as ops

    monkeypatch.setattr(ops, "_COMPILED_KEYS", frozenset())
    monkeypatch.setattr(ops, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="falling back to the pure-PyTorch reference"):
        first = call("auto")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = call("auto")  # warned once only
    assert first.shape == second.shape == (5, 2, 6, 6)
    with pytest.raises(RuntimeError, match=r"backend='cpu' is not available"):
        call("cpu")


def test_triton_backend_refuses_float64():
    args = good()
    with pytest.raises(TypeError, match=r"backend='triton' supports float16, bfloat16 and float32; got torch.float64"):
        instance_aware_conv(args["templates"].double(), args["weight"].double(), None, args["index"],
                            padding=1, groups=2, backend="triton")


def test_single_element_sequences_expand_like_conv2d():
    fixed = {k: good()[k] for k in ("templates", "weight", "bias", "index")}
    expected = call("cpu", stride=2, padding=1, **fixed)
    assert torch.equal(call("cpu", stride=[2], padding=(1,), **fixed), expected)
