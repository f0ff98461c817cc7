"""Model-level rows: the PointINS mask branch with each backend, when the ``pointins`` package provides it.

What is timed is ``PointINSMaskBranch.forward(point_features, index, kinds)``: the template and weight
branches, ``instance_aware_conv`` and the light mask head, i.e. everything of the mask branch that runs per
point or per instance (the dense mask tower is an ordinary convolution that no backend changes). Shapes follow
the op scenarios: "mask-branch-train" is pointins-train's batch (P points, N = 4 P instances, RetinaNet's 9
anchors per point, forward+backward w.r.t. the branch's parameters and the point features),
"mask-branch-infer" is pointins-infer's image (one instance per kept detection, forward only, no autograd).
The baseline is the same branch with ``backend="torch"``. Before it is timed, each backend's logits (and
gradients) are compared with the branch run in float64 (see ``_measure`` for the rule).

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
from .run import COLUMNS, guarded
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
            baseline = next((row for row in group if row["provider"] == "torch" and row["status"] == "ok"), None)
            for row in group:
                if baseline is not None and row["status"] == "ok":
                    row["speedup"] = baseline["median_s"] / row["median_s"]
                    row["best_reference"] = "backend='torch'"
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
    del reference_branch
    branch = branch.to(dtype)
    grad_output = grad_output.to(dtype)

    # First every backend's error against the float64 branch, then the times of those that pass: a backend
    # passes if its error exceeds the pure-PyTorch branch's own error in this dtype by at most VERIFY_TOL.
    # (A bfloat16 branch is ~10% off float64 in its gradients whatever the backend: ReLU masks flip and
    # parameter gradients sum thousands of bfloat16 products.)
    steps = {}
    for row in group:
        branch.backend = row["provider"]
        steps[row["provider"]] = _step(branch, mode, features, index, kinds, grad_output)

        def check(step=steps[row["provider"]]):
            got = step()
            return measure.relative_error((got,) if isinstance(got, torch.Tensor) else got, reference)

        row["max_rel_error"], failure = guarded(device, check)
        if failure is not None:
            row.update(status=failure, verified=False)
    limit = (group[-1]["max_rel_error"] or 0.0) + measure.VERIFY_TOL[dtype]
    for row in group:
        if row["status"] is not None:
            continue
        row["verified"] = row["max_rel_error"] <= limit
        if not row["verified"]:
            row["status"] = f"mismatch: relative error {row['max_rel_error']:.3g} > {limit:.3g}"
            continue
        branch.backend = row["provider"]
        step = steps[row["provider"]]
        measured, failure = guarded(device, lambda: measure.time_call(step, device, config.timing))
        if failure is not None:
            row["status"] = failure
            continue
        timing, row["peak_extra_bytes"] = measured
        row.update(status="ok", **timing.columns())


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
