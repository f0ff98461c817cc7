"""Model-level rows: the PointINS mask branch with each backend, when the ``pointins`` package provides it.

What is timed is ``PointINSMaskBranch.forward(point_features, index, kinds)``: the template and weight
branches, ``instance_aware_conv`` and the light mask head, i.e. everything of the mask branch that runs per
point or per instance (the dense mask tower is an ordinary convolution that no backend changes). Shapes follow
the op scenarios: "mask-branch-train" is pointins-train's batch (P points, N = 4 P instances, RetinaNet's 9
anchors per point, forward+backward w.r.t. the branch's parameters and the point features),
"mask-branch-infer" is pointins-infer's image (one instance per kept detection, forward only, no autograd).
The baseline is the same branch with ``backend="torch"``, timed interleaved with the others (see measure.py).
Before it is timed, each backend's logits (and gradients) are compared with the branch run in float64 (see
``_measure`` for the rule).

The hook: ``status()`` says whether these rows can run; ``work(config)`` counts them for the progress bar;
``rows(config, progress)`` returns them. Without ``pointins`` (or without its ``PointINSMaskBranch``) the
run goes on without model rows and the JSON's ``settings.model`` says why; if the branch's constructor or
call changed, the model rows carry the error in their status.
"""

from __future__ import annotations

import copy

import torch

from . import measure
from .providers import POINTINS
from .run import COLUMNS, add_speedups, guarded
from .scenarios import SCENARIOS, input_seed

MODEL = "model"
IN_CHANNELS = 256           # FPN channels of the ResNet-FPN detectors (32 in quick mode)
ANCHORS_PER_POINT = 9       # RetinaNet
NUM_CLASSES = 80
ROWS = (("mask-branch-train", "pointins-train", "forward+backward"),
        ("mask-branch-infer", "pointins-infer", "forward"))


def _branch_class():
    """The mask branch class, or the reason it cannot be used."""
    try:
        import pointins
    except Exception as error:  # noqa: BLE001 - a half-written model package must not stop the op benchmarks
        return None, f"skipped: `import pointins` failed ({type(error).__name__}: {error})"
    branch = getattr(pointins, "PointINSMaskBranch", None)
    if branch is None:
        return None, "skipped: pointins has no PointINSMaskBranch"
    return branch, "measured"


def status() -> str:
    return _branch_class()[1]


def _backends(config) -> list[str]:
    return [p.name for p in config.providers if p.kind == POINTINS] + ["torch"]


def work(config) -> int:
    return len(ROWS) * len(config.dtypes) * len(_backends(config)) if _branch_class()[0] is not None else 0


def _in_channels(config) -> int:
    """Quick mode also shrinks the templates to the op scenario's quick size (3 x 3 instead of 14 x 14)."""
    return 32 if config.scale == "quick" else IN_CHANNELS


def _inputs(scenario, in_channels, dtype, device, seed):
    generator = torch.Generator(device=device).manual_seed(seed)
    features = torch.randn(scenario.P, in_channels, generator=generator, device=device).to(dtype)
    index = scenario.make_index(device, generator)
    if index is None:
        index = torch.arange(scenario.N, device=device)
    kinds = torch.randint(0, ANCHORS_PER_POINT, (scenario.N,), generator=generator, device=device)
    return features, index, kinds


def _step(branch, mode, features, index, kinds, grad_output):
    if mode == "forward":
        def forward():
            with torch.no_grad():
                return branch(features, index, kinds)
        return forward
    leaf = features.detach().requires_grad_()
    wrt = [leaf] + list(branch.parameters())

    def forward_backward():
        logits = branch(leaf, index, kinds)
        return (logits, *torch.autograd.grad(logits, wrt, grad_output))
    return forward_backward


def rows(config, progress) -> list[dict]:
    branch_class, _ = _branch_class()
    if branch_class is None:
        return []
    out = []
    for name, scenario_name, mode in ROWS:
        scenario = SCENARIOS[scenario_name].scaled(config.scale)
        for dtype in config.dtypes:
            group = [_row(config, name, scenario, mode, dtype, backend) for backend in _backends(config)]
            # A model package that changed its interface gives rows that say so, not a failed run.
            _, failure = guarded(config.device, lambda: _measure(config, branch_class, scenario, mode, dtype, group))
            for row in group:
                progress.step(f"{name} {row['dtype']} {row['provider']}")
                if failure is not None and row["status"] is None:
                    row.update(status=failure, verified=False)
            out += group
    return out


def _measure(config, branch_class, scenario, mode, dtype, group) -> None:
    """Fills ``group`` (one row per backend, "torch" last) for one model row and dtype."""
    device = config.device
    torch.manual_seed(input_seed(scenario, dtype, 0))
    in_channels = _in_channels(config)
    branch = branch_class(in_channels, ANCHORS_PER_POINT, NUM_CLASSES, template_size=scenario.H,
                          tower_convs=0).to(device)
    branch.train(mode != "forward")
    features, index, kinds = _inputs(scenario, in_channels, dtype, device, input_seed(scenario, dtype, 0))
    grad_output = torch.randn(scenario.N, 2 * branch.template_size, 2 * branch.template_size, device=device)
    reference_branch = copy.deepcopy(branch).double()
    reference_branch.backend = "torch"
    reference = _step(reference_branch, mode, features.double(), index, kinds, grad_output.double())()
    reference = (reference,) if isinstance(reference, torch.Tensor) else reference
    float64_branch = branch.double()
    branch = copy.deepcopy(branch).to(dtype)

    # The check, before anything is timed. The logits are smooth functions of the inputs: in this dtype each
    # backend's may be off float64 by at most the pure-PyTorch branch's own error plus VERIFY_TOL. The gradients
    # are not (the mask head's ReLUs flip where a value is a rounding away from zero, differently in any two
    # computations, which moves some parameter gradients by percents in float32 and float16 alike), so they are
    # checked with the backend's branch in float64 against the float64 reference, where nothing flips; a backend
    # without float64 (Triton) has its logits checked only. The op itself is checked strictly in the op rows.
    steps = {}
    for row in group:
        backend_branch = copy.deepcopy(branch)
        backend_branch.backend = row["provider"]
        steps[row["provider"]] = _step(backend_branch, mode, features, index, kinds, grad_output)

        def check(step=steps[row["provider"]], provider=row["provider"]):
            got = step()
            logits_error = measure.relative_error(((got,) if isinstance(got, torch.Tensor) else got)[:1],
                                                  reference[:1])
            gradient_error = None
            if mode != "forward" and provider != "triton":
                exact_branch = copy.deepcopy(float64_branch)
                exact_branch.backend = provider
                exact = _step(exact_branch, mode, features.double(), index, kinds, grad_output.double())()
                gradient_error = measure.relative_error(exact, reference)
            return logits_error, gradient_error

        errors, failure = guarded(device, check)
        if failure is not None:
            row.update(status=failure, verified=False)
            continue
        row["max_rel_error"], row["float64_rel_error"] = errors
    limit = (group[-1]["max_rel_error"] or 0.0) + measure.VERIFY_TOL[dtype]
    for row in group:
        if row["status"] is not None:
            continue
        exact_error = row.pop("float64_rel_error")
        row["verified"] = row["max_rel_error"] <= limit and (
            exact_error is None or exact_error <= measure.VERIFY_TOL[torch.float64])
        if not row["verified"]:
            row["status"] = (f"mismatch: logits error {row['max_rel_error']:.3g} (limit {limit:.3g}), float64 "
                             f"forward+backward error {exact_error}")
    timed, estimates = {}, {}
    for row in group:
        if row["status"] is not None:
            continue
        step = steps[row["provider"]]
        _, row["peak_extra_bytes"], _ = measure.first_call(step, device)
        estimates[row["provider"]] = measure.estimate_seconds(step, device)
        timed[row["provider"]] = step
    timings = measure.time_interleaved(timed, estimates, device, config.timing)
    for row in group:
        if row["provider"] in timings:
            row.update(status="ok", **timings[row["provider"]].columns())
    if "torch" in timings:
        add_speedups(group, timings, "torch", "backend='torch'")


def _row(config, name, scenario, mode, dtype, backend) -> dict:
    in_channels = _in_channels(config)
    row = dict.fromkeys(COLUMNS)
    row.update(device=config.device.type, scale=config.scale, scenario=name, dtype=str(dtype).removeprefix("torch."),
               mode=mode, provider=backend, kind=MODEL, input_sets=1,
               templates_shape=f"{scenario.P}x{in_channels} point features",
               weight_shape=f"{scenario.N} instances, {ANCHORS_PER_POINT} anchors per point",
               index=scenario.index)
    return row


__all__ = ["MODEL", "rows", "status", "work"]
