"""The oracle every backend is tested against, and the randomized cases it is tested on.

The oracle is the op's definition: one ``F.conv2d`` per instance, in float64, on the inputs already rounded
to the dtype under test (so a low-precision result is only judged on the rounding and accumulation that
the kernel itself adds). Backend test files import from here; each runs the same cases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random

import torch
import torch.nn.functional as F

# One (atol, rtol) per dtype. Inputs are scaled so outputs and gradients are O(1): float32 sums of at most a
# few hundred products carry errors ~1e-6; float16 / bfloat16 results are rounded once from a float32
# accumulator (relative 2^-11 / 2^-8), and the pure-PyTorch backend may round intermediate products too:
# a few units in the last place.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


@dataclasses.dataclass(frozen=True)
class Case:
    P: int
    C_in: int
    H: int
    W: int
    N: int
    C_out: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    index: str = "random"          # none | random | sorted | single | unused
    index_dtype: torch.dtype = torch.int64
    layout: str = "contiguous"     # contiguous | channels_last | strided
    seed: int = 0

    def __str__(self) -> str:
        return (f"P{self.P}-C{self.C_in}-{self.H}x{self.W}-N{self.N}-O{self.C_out}-k{self.kernel[0]}x{self.kernel[1]}"
                f"-s{self.stride[0]}{self.stride[1]}-p{self.padding[0]}{self.padding[1]}"
                f"-d{self.dilation[0]}{self.dilation[1]}-g{self.groups}-{'b' if self.bias else 'nb'}-{self.index}"
                f"-{str(self.index_dtype)[6:]}-{self.layout}-{self.seed}")

    @property
    def conv_args(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    @property
    def op_args(self) -> tuple:
        """The conv arguments positionally, as the registered ops (``torch.ops.pointins_ops.*``) take them."""
        return (list(self.stride), list(self.padding), list(self.dilation), self.groups)


def make_index(case: Case, generator: torch.Generator) -> torch.Tensor | None:
    if case.index == "none":
        return None
    if case.N == 0:
        return torch.zeros(0, dtype=case.index_dtype)
    if case.index == "single":
        values = torch.full((case.N,), case.P - 1)
    elif case.index == "sorted":
        values = torch.sort(torch.randint(0, case.P, (case.N,), generator=generator)).values
    elif case.index == "unused":  # only the even templates are used
        values = 2 * torch.randint(0, (case.P + 1) // 2, (case.N,), generator=generator)
    else:
        values = torch.randint(0, case.P, (case.N,), generator=generator)
    return values.to(case.index_dtype)


def _layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and tensor.dim() == 4:
        return tensor.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a view with a non-unit last stride and an offset
        wide = torch.zeros(*tensor.shape[:-1], 2 * tensor.shape[-1] + 1, dtype=tensor.dtype)
        wide[..., 1::2] = tensor
        return wide[..., 1::2]
    return tensor


def make_inputs(case: Case, dtype: torch.dtype, device="cpu"):
    """Returns (templates, weight, bias, index) in ``dtype`` on ``device``, with the case's layout."""
    generator = torch.Generator().manual_seed(case.seed)
    fan_in = (case.C_in // case.groups) * case.kernel[0] * case.kernel[1]
    templates = torch.randn(case.P, case.C_in, case.H, case.W, generator=generator, dtype=torch.float64)
    weight = torch.randn(case.N, case.C_out, case.C_in // case.groups, *case.kernel, generator=generator,
                         dtype=torch.float64) / math.sqrt(max(fan_in, 1))
    bias = torch.randn(case.N, case.C_out, generator=generator, dtype=torch.float64) if case.bias else None
    index = make_index(case, generator)
    templates = _layout(templates.to(dtype), case.layout).to(device)
    weight = _layout(weight.to(dtype), case.layout).to(device)
    bias = None if bias is None else bias.to(dtype).to(device)
    index = None if index is None else index.to(device)
    return templates, weight, bias, index


@contextlib.contextmanager
def conv_tf32(enabled: bool):
    """Within the block, float32 convolutions may (``True``) or may not run on TF32 tensor cores: torch's own
    switch (on by default), which F.conv2d and the GPU kernels follow. The float32 tolerance needs it off."""
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):  # torch >= 2.9
        previous = conv.fp32_precision
        conv.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = previous
    else:
        previous = cudnn.allow_tf32
        cudnn.allow_tf32 = enabled
        try:
            yield
        finally:
            cudnn.allow_tf32 = previous


def oracle_forward(templates, weight, bias, index, *, stride, padding, dilation, groups):
    """Per-instance F.conv2d in float64 (the op's definition)."""
    t, w = templates.double().cpu(), weight.double().cpu()
    b = None if bias is None else bias.double().cpu()
    idx = range(w.shape[0]) if index is None else index.cpu().tolist()
    outs = [F.conv2d(t[p][None], w[n], None if b is None else b[n], stride, padding, dilation, groups)[0]
            for n, p in enumerate(idx)]
    if not outs:
        H_out = (t.shape[2] + 2 * padding[0] - dilation[0] * (w.shape[3] - 1) - 1) // stride[0] + 1
        W_out = (t.shape[3] + 2 * padding[1] - dilation[1] * (w.shape[4] - 1) - 1) // stride[1] + 1
        return torch.zeros(0, w.shape[1], H_out, W_out, dtype=torch.float64)
    return torch.stack(outs)


def oracle_grads(templates, weight, bias, index, grad_output, **conv):
    """(output, grad_templates, grad_weight, grad_bias) of the oracle in float64."""
    t = templates.detach().double().cpu().requires_grad_()
    w = weight.detach().double().cpu().requires_grad_()
    b = None if bias is None else bias.detach().double().cpu().requires_grad_()
    out = oracle_forward(t, w, b, index, **conv)
    inputs = (t, w) if b is None else (t, w, b)
    if out.numel() == 0:  # nothing flows back: every gradient is zero
        grads = [torch.zeros_like(x) for x in inputs]
        return (out.detach(), grads[0], grads[1], grads[2] if b is not None else None)
    grads = torch.autograd.grad(out, inputs, grad_output.double().cpu(), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    return (out.detach(), grads[0], grads[1], grads[2] if b is not None else None)


def check_case(op, case: Case, dtype: torch.dtype, device="cpu"):
    """Runs ``op`` (the op's signature) forward and backward and compares with the oracle at TOL[dtype]."""
    templates, weight, bias, index = make_inputs(case, dtype, device)
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (templates, weight, bias)]
    # Keep the case's layout on the leaves (clone() preserves strides of dense tensors only).
    leaves[0] = _layout(templates.detach().cpu(), case.layout).to(device).requires_grad_()
    out = op(leaves[0], leaves[1], leaves[2], index, **case.conv_args)
    generator = torch.Generator().manual_seed(case.seed + 1)
    grad_output = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(dtype)
    ref_out, *ref_grads = oracle_grads(templates, weight, bias, index, grad_output, **case.conv_args)
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and out.device == templates.device
    assert out.shape == ref_out.shape
    torch.testing.assert_close(out.double().cpu(), ref_out, atol=atol, rtol=rtol, msg=lambda m: f"output: {m}")
    inputs = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(out, inputs, grad_output.to(device))
    for name, got, want in zip(("grad_templates", "grad_weight", "grad_bias"), grads, ref_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double().cpu(), want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# What forward_and_grads returns, in order; bias is always present in the cases it is used on.
RESULT_NAMES = ("output", "grad_templates", "grad_weight", "grad_bias")

# The (forward, backward) ops in torch.ops.pointins_ops that each compiled backend registers. "cpu" and "cuda"
# are two dispatch keys of the same C++ op; Triton registers its own.
REGISTERED_OPS = {
    "cpu": ("instance_aware_conv", "instance_aware_conv_backward"),
    "cuda": ("instance_aware_conv", "instance_aware_conv_backward"),
    "triton": ("instance_aware_conv_triton", "instance_aware_conv_triton_backward"),
}


def registered_ops(backend: str):
    """The backend's (forward, backward) op packets, reached directly (without the public function's checks)."""
    import pointins_ops  # noqa: F401  (importing it registers the ops; imported here as in forward_and_grads)

    forward, backward = REGISTERED_OPS[backend]
    return getattr(torch.ops.pointins_ops, forward), getattr(torch.ops.pointins_ops, backward)


def forward_and_grads(backend: str, case: Case, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """(output, grad_templates, grad_weight, grad_bias) of the public function on ``backend``, on the CPU.
    grad_output is seeded by the case, so two calls on the same case are comparable bit for bit."""
    # Imported here, not at the top: csrc/cuda/emulation/emulate.py uses this module and must never load
    # pointins_ops (its emulated library defines the same op namespace).
    from pointins_ops import instance_aware_conv

    templates, weight, bias, index = make_inputs(case, dtype, device)
    leaves = [x.detach().clone().requires_grad_() for x in (templates, weight, bias)]
    out = instance_aware_conv(*leaves, index, backend=backend, **case.conv_args)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, grad_output.to(dtype).to(device))
    return [t.detach().cpu() for t in (out, *grads)]


def check_agrees_with_cpu_kernel(backend: str, case: Case, dtype: torch.dtype, device):
    """``backend`` on ``device`` and the C++ CPU kernel agree on the output and every gradient at TOL[dtype]."""
    results = forward_and_grads(backend, case, dtype, device)
    cpu_results = forward_and_grads("cpu", case, dtype, "cpu")
    atol, rtol = TOL[dtype]
    for what, got, want in zip(RESULT_NAMES, results, cpu_results):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def check_bitwise_reproducible(backend: str, case: Case, dtype: torch.dtype, device):
    """Two identical runs of ``backend`` give the same bits in the output and every gradient."""
    first = forward_and_grads(backend, case, dtype, device)
    second = forward_and_grads(backend, case, dtype, device)
    for what, a, b in zip(RESULT_NAMES, first, second):
        assert torch.equal(a, b), f"{what} differs between two identical runs"


def check_backward_without_grad_bias(backend: str, case: Case, dtype: torch.dtype, device):
    """The backend's backward op with compute_grad_bias=False (what autograd passes when the forward had no bias):
    grad_bias is an empty (0,) tensor, and grad_templates and grad_weight are bit for bit those of the call that
    also sums grad_bias."""
    forward_op, backward_op = registered_ops(backend)
    templates, weight, _, index = make_inputs(case, dtype, device)
    conv = (list(case.stride), list(case.padding), list(case.dilation), case.groups)
    out = forward_op(templates, weight, None, index, *conv)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed + 1)).to(dtype).to(device)
    full = backward_op(grad_output, templates, weight, index, *conv)
    without = backward_op(grad_output, templates, weight, index, *conv, False)
    assert full[2].shape == (case.N, case.C_out) and without[2].shape == (0,), (full[2].shape, without[2].shape)
    assert without[2].dtype == dtype and without[2].device == templates.device
    assert torch.equal(full[0], without[0]) and torch.equal(full[1], without[1])


def check_out_of_range_index_is_masked(backend: str, device):
    """The backend's registered forward and backward ops, given an index with one entry past P and one negative,
    produce NaN for exactly those instances (output and grad_weight) and the pure-PyTorch result elsewhere.

    The public function rejects such an index on the host; the ops themselves (reached directly, or under
    torch.compile / CUDA graph capture where the host check is skipped) must mask it, not read memory with it.
    """
    from pointins_ops import instance_aware_conv  # see forward_and_grads

    forward_op, backward_op = registered_ops(backend)
    case = EDGE_CASES["stride-dilation"]
    templates, weight, bias, index = make_inputs(case, torch.float32, device)
    bad = index.clone()
    bad[1], bad[4] = case.P, -1
    out = forward_op(templates, weight, bias, bad, *case.op_args)
    expected = instance_aware_conv(templates, weight, bias, index, backend="torch", **case.conv_args)
    good = [n for n in range(case.N) if n not in (1, 4)]
    assert out[[1, 4]].isnan().all()
    torch.testing.assert_close(out[good], expected[good], atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])

    grad_templates, grad_weight, grad_bias = backward_op(torch.ones_like(out), templates, weight, bad,
                                                         *case.op_args)
    assert grad_templates.isfinite().all() and grad_weight[good].isfinite().all() and grad_bias.isfinite().all()
    assert grad_weight[[1, 4]].isnan().all()


def capture_forward_and_backward(backend: str, device):
    """Captures one call of the backend's registered forward and backward ops in a CUDA graph.

    Returns (case, static, graph, captured, step): ``static`` holds the graph's inputs (templates, weight, bias,
    index, grad_output) to refill before ``graph.replay()``, ``captured`` the tensors a replay writes
    (output, grad_templates, grad_weight, grad_bias), and ``step`` runs the same ops eagerly to compare with.
    """
    forward_op, backward_op = registered_ops(backend)
    case = Case(P=5, C_in=8, H=12, W=11, N=30, C_out=6, kernel=(3, 3), padding=(1, 1), groups=2, seed=9)
    templates, weight, bias, index = make_inputs(case, torch.float32, device)
    grad_output = torch.randn(case.N, case.C_out, case.H, case.W, device=device)
    static = [t.clone() for t in (templates, weight, bias, index, grad_output)]

    def step(templates, weight, bias, index, grad_output):
        out = forward_op(templates, weight, bias, index, *case.op_args)
        return (out, *backward_op(grad_output, templates, weight, index, *case.op_args))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    # Warm up (and compile any Triton kernels) outside the capture, as torch.cuda.graphs recommends.
    with torch.cuda.stream(side):
        step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(*static)
    return case, static, graph, captured, step


def check_ops_pass_opcheck(backend: str, case: Case, device):
    """torch.library.opcheck (schema, fake, autograd, AOT dispatch) on the backend's registered forward and
    backward ops, on the case's inputs in float32."""
    forward_op, backward_op = registered_ops(backend)
    templates, weight, bias, index = make_inputs(case, torch.float32, device)
    torch.library.opcheck(forward_op.default,
                          (templates.requires_grad_(), weight.requires_grad_(), bias, index, *case.op_args))
    out = forward_op(templates, weight, bias, index, *case.op_args)
    grad_output = torch.randn_like(out)
    torch.library.opcheck(backward_op.default, (grad_output, templates.detach(), weight.detach(), index, *case.op_args))


def check_compiled_fullgraph(op, case: Case, device):
    """``op`` (the op's signature) inside a ``torch.compile(fullgraph=True)`` function matches the oracle."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def head(templates, weight, bias, index, **conv):
        return op(templates, weight, bias, index, **conv) * 2

    # Scaling by 2 is exact, so the compiled graph is held to the oracle's tolerance.
    check_case(lambda *args, **conv: head(*args, **conv) / 2, case, torch.float32, device)


def random_cases(count: int, seed: int) -> list[Case]:
    """A seeded sample of small cases covering kernel sizes 1/3/5 and rectangular, strides 1-2, padding,
    dilation 1-2, groups 1/2/depthwise, bias on/off, every index mode and both index dtypes, and layouts."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        kernel = rng.choice([(1, 1), (3, 3), (5, 5), (1, 3), (3, 2), (2, 5)])
        groups_kind = rng.choice(["1", "2", "depthwise"])
        c_per_group = rng.choice([1, 2, 3, 4])
        if groups_kind == "1":
            groups, C_in, C_out = 1, rng.choice([1, 3, 4, 8]), rng.choice([1, 2, 4, 5])
        elif groups_kind == "2":
            groups, C_in, C_out = 2, 2 * c_per_group, 2 * rng.choice([1, 2, 3])
        else:
            groups = rng.choice([2, 4, 6])
            C_in, C_out = groups, groups * rng.choice([1, 2])
        stride = (rng.choice([1, 2]), rng.choice([1, 2]))
        dilation = (rng.choice([1, 2]), rng.choice([1, 2]))
        padding = (rng.choice([0, 1, 2]), rng.choice([0, 1, 2]))
        min_h = dilation[0] * (kernel[0] - 1) + 1 - 2 * padding[0]
        min_w = dilation[1] * (kernel[1] - 1) + 1 - 2 * padding[1]
        H = max(min_h, 1) + rng.randint(0, 9)
        W = max(min_w, 1) + rng.randint(0, 9)
        index = rng.choice(["none", "random", "sorted", "single", "unused"])
        P = rng.randint(1, 6)
        N = P if index == "none" else rng.randint(1, 9)
        cases.append(Case(P=P, C_in=C_in, H=H, W=W, N=N, C_out=C_out, kernel=kernel, stride=stride,
                          padding=padding, dilation=dilation, groups=groups, bias=rng.random() < 0.7, index=index,
                          index_dtype=rng.choice([torch.int32, torch.int64]),
                          layout=rng.choice(["contiguous", "contiguous", "channels_last", "strided"]), seed=i))
    return cases


# Edge cases every backend must pass, by name.
EDGE_CASES = {
    "empty-N": Case(P=3, C_in=4, H=5, W=5, N=0, C_out=2, kernel=(3, 3), padding=(1, 1)),
    "empty-P-and-N": Case(P=0, C_in=4, H=5, W=5, N=0, C_out=2, kernel=(3, 3), index="random"),
    "single-template": Case(P=1, C_in=4, H=7, W=6, N=9, C_out=3, kernel=(3, 3), padding=(1, 1), index="single"),
    "unused-templates": Case(P=6, C_in=4, H=7, W=6, N=5, C_out=3, kernel=(3, 3), padding=(1, 1), index="unused"),
    "depthwise": Case(P=3, C_in=6, H=9, W=8, N=5, C_out=6, kernel=(3, 3), padding=(1, 1), groups=6),
    "depthwise-multiplier": Case(P=3, C_in=4, H=9, W=8, N=5, C_out=8, kernel=(3, 3), padding=(2, 2),
                                 dilation=(2, 2), groups=4),
    "stride-dilation": Case(P=4, C_in=4, H=11, W=13, N=6, C_out=4, kernel=(3, 3), stride=(2, 2), padding=(2, 1),
                            dilation=(2, 2), groups=2),
    "rectangular": Case(P=3, C_in=3, H=8, W=12, N=4, C_out=2, kernel=(1, 5), stride=(2, 1), padding=(0, 2)),
    "kernel-equals-input": Case(P=2, C_in=2, H=3, W=3, N=3, C_out=2, kernel=(3, 3)),
    "padding-only-output": Case(P=2, C_in=2, H=1, W=1, N=2, C_out=2, kernel=(1, 1), padding=(2, 2), index="none"),
    "channels-last": Case(P=3, C_in=8, H=6, W=7, N=5, C_out=4, kernel=(3, 3), padding=(1, 1),
                          layout="channels_last"),
    "non-contiguous": Case(P=3, C_in=4, H=6, W=7, N=5, C_out=4, kernel=(3, 3), padding=(1, 1), layout="strided"),
    "int32-index": Case(P=3, C_in=4, H=6, W=7, N=5, C_out=4, kernel=(1, 1), index_dtype=torch.int32),
    "large-tile": Case(P=2, C_in=3, H=23, W=29, N=3, C_out=2, kernel=(3, 3), padding=(1, 1)),
    "1x1-wide": Case(P=2, C_in=32, H=6, W=5, N=6, C_out=1, kernel=(1, 1), bias=False),
}

# Backward cases whose grad_weight sums (with grad_bias's) are split: for the CPU kernel into chunks of pixels added
# in order (a 1x1 map larger than one chunk, the one-pass backward; more rows per template than one row block,
# grad_weight on its own), for the GPU kernels into pixel ranges with float32 partials (the large maps).
GRAD_BIAS_CASES = [EDGE_CASES[name] for name in ("stride-dilation", "depthwise", "1x1-wide", "single-template",
                                                 "empty-N")] + [
    Case(P=2, C_in=4, H=40, W=40, N=3, C_out=3, kernel=(1, 1)),
    Case(P=1, C_in=4, H=40, W=36, N=40, C_out=8, kernel=(3, 3), padding=(1, 1), index="single"),
]
