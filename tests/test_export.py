"""ONNX export: ``torch.onnx.export(..., dynamo=True)`` of modules calling instance_aware_conv gives a graph of
standard ONNX operators with dynamic N, P, H and W, which onnxruntime runs with other sizes than those exported
and matches PyTorch; the same for the PointINS mask branch's inference path and the whole PointINS-FCOS model.

Needs onnx, onnxscript and onnxruntime (the test extra: ``pip install -e ".[test]"``); skipped without them.
"""

import math

import pytest
import torch

pytest.importorskip("onnx", reason="onnx is not installed (it comes with pip install -e '.[test]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (it comes with pip install -e '.[test]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (it comes with pip install -e '.[test]')")

from torch import nn  # noqa: E402

import pointins_ops  # noqa: E402
from oracle import TOL, Case, make_inputs, oracle_forward  # noqa: E402
from pointins_ops import instance_aware_conv  # noqa: E402
from pointins_ops.export import decompositions  # noqa: E402

STANDARD_DOMAINS = ("", "ai.onnx")
ATOL, RTOL = TOL[torch.float32]


class Head(nn.Module):
    """A module whose forward is one instance_aware_conv with the case's hyper-parameters."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.conv_args = case.conv_args

    def forward(self, templates, weight, bias=None, index=None):
        return instance_aware_conv(templates, weight, bias, index, **self.conv_args)


def named_inputs(case: Case, device="cpu") -> dict:
    templates, weight, bias, index = make_inputs(case, torch.float32, device)
    inputs = {"templates": templates, "weight": weight, "bias": bias, "index": index}
    return {name: tensor.contiguous() for name, tensor in inputs.items() if tensor is not None}


def dynamic_shapes(inputs: dict) -> dict:
    """N, P, H and W dynamic; the channels and the kernel size static."""
    dynamic = torch.export.Dim.DYNAMIC
    dims = {"templates": {0: dynamic, 2: dynamic, 3: dynamic}, "weight": {0: dynamic}, "bias": {0: dynamic},
            "index": {0: dynamic}}
    return {name: dims[name] for name in inputs}


def export(module, inputs: dict):
    return torch.onnx.export(module.eval(), (), kwargs=inputs, dynamo=True, dynamic_shapes=dynamic_shapes(inputs),
                             verbose=False)


def check_standard_graph(program, dynamic_axes: dict):
    """Only standard-domain nodes (in the graph and in any local function), and the named input axes symbolic."""
    model = program.model_proto
    nodes = list(model.graph.node) + [node for function in model.functions for node in function.node]
    assert {node.domain for node in nodes} <= set(STANDARD_DOMAINS), sorted({node.domain for node in nodes})
    shapes = {value.name: value.type.tensor_type.shape.dim for value in model.graph.input}
    for name, axes in dynamic_axes.items():
        for axis in axes:
            assert shapes[name][axis].dim_param, f"{name} axis {axis} is static ({shapes[name][axis].dim_value})"


def run(program, inputs: dict) -> list:
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_inputs()]
    return [torch.from_numpy(out) for out in session.run(None, {name: inputs[name].numpy() for name in names})]


# name: (the case exported, the cases run in onnxruntime: other N, P, H and W, one of them empty).
EXPORT_CASES = {
    "shared-and-unused-templates": (
        Case(P=4, C_in=4, H=9, W=8, N=6, C_out=3, kernel=(3, 3), padding=(1, 1), index="unused"),
        [Case(P=7, C_in=4, H=12, W=5, N=11, C_out=3, kernel=(3, 3), padding=(1, 1), index="unused", seed=1),
         Case(P=3, C_in=4, H=4, W=6, N=0, C_out=3, kernel=(3, 3), padding=(1, 1), index="random", seed=2)]),
    "index-none": (
        Case(P=3, C_in=4, H=7, W=6, N=3, C_out=2, kernel=(3, 3), padding=(1, 1), index="none"),
        [Case(P=6, C_in=4, H=5, W=9, N=6, C_out=2, kernel=(3, 3), padding=(1, 1), index="none", seed=3)]),
    "groups-stride-dilation-no-bias": (
        Case(P=3, C_in=6, H=11, W=13, N=5, C_out=4, kernel=(3, 3), stride=(2, 1), padding=(2, 1), dilation=(2, 2),
             groups=2, bias=False),
        [Case(P=5, C_in=6, H=14, W=9, N=8, C_out=4, kernel=(3, 3), stride=(2, 1), padding=(2, 1), dilation=(2, 2),
              groups=2, bias=False, seed=4)]),
    "depthwise-rectangular-int32-index": (
        Case(P=2, C_in=4, H=6, W=10, N=4, C_out=8, kernel=(1, 5), stride=(1, 2), padding=(0, 2), groups=4,
             index_dtype=torch.int32),
        [Case(P=5, C_in=4, H=3, W=17, N=2, C_out=8, kernel=(1, 5), stride=(1, 2), padding=(0, 2), groups=4,
              index_dtype=torch.int32, seed=5)]),
}


@pytest.mark.parametrize("name", EXPORT_CASES)
def test_exported_op_runs_in_onnxruntime_with_other_sizes(name):
    exported_case, run_cases = EXPORT_CASES[name]
    inputs = named_inputs(exported_case)
    program = export(Head(exported_case), inputs)
    check_standard_graph(program, {name: axes for name, axes in dynamic_shapes(inputs).items()})
    for case in [exported_case, *run_cases]:
        inputs = named_inputs(case)
        (got,) = run(program, inputs)
        with torch.no_grad():
            want = Head(case)(**inputs)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"{case}: {m}")
        truth = oracle_forward(*make_inputs(case, torch.float32), **case.conv_args)
        torch.testing.assert_close(got.double(), truth, atol=ATOL, rtol=RTOL, msg=lambda m: f"{case}: {m}")


def test_export_falls_back_to_dynamo_and_still_exports_standard_ops():
    """torch.onnx.export retries with strict=True (Dynamo) when non-strict tracing fails, as it does here: len()
    must return an int, which specializes the dynamic N. Dynamo folds torch.onnx.is_in_onnx_export() to False,
    so this checks the op still finds out it is being exported."""

    class LenHead(Head):
        def forward(self, templates, weight, bias=None, index=None):
            return super().forward(templates, weight, bias, index)[:len(index)]

    case, (other, _) = EXPORT_CASES["shared-and-unused-templates"]
    inputs = named_inputs(case)
    program = export(LenHead(case), inputs)
    check_standard_graph(program, dynamic_shapes(inputs))
    inputs = named_inputs(other)
    (got,) = run(program, inputs)
    torch.testing.assert_close(got, Head(other)(**inputs), atol=ATOL, rtol=RTOL)


def test_a_program_with_the_registered_op_exports_after_decomposition():
    """A model calling torch.ops.pointins_ops.instance_aware_conv directly, exported with torch.export first:
    the op stays in the program, and pointins_ops.export.decompositions() turns it into standard ops."""

    class DirectHead(nn.Module):
        def __init__(self, case):
            super().__init__()
            self.op_args = case.op_args

        def forward(self, templates, weight, bias, index):
            return torch.ops.pointins_ops.instance_aware_conv(templates, weight, bias, index, *self.op_args)

    case, (other, _) = EXPORT_CASES["shared-and-unused-templates"]
    inputs = named_inputs(case)
    program = torch.export.export(DirectHead(case), (), kwargs=inputs, dynamic_shapes=dynamic_shapes(inputs))
    assert "pointins_ops.instance_aware_conv" in str(program.graph)
    onnx_program = torch.onnx.export(program.run_decompositions(decompositions()), dynamo=True, verbose=False)
    check_standard_graph(onnx_program, dynamic_shapes(inputs))
    inputs = named_inputs(other)
    (got,) = run(onnx_program, inputs)
    torch.testing.assert_close(got, Head(other)(**inputs), atol=ATOL, rtol=RTOL)


def test_export_path_is_the_pure_pytorch_formulation_and_matches_the_kernel():
    """What the exported graph computes, run in PyTorch on the random cases the kernels are tested on."""
    from oracle import random_cases

    from pointins_ops.export import instance_aware_conv_exportable

    for case in random_cases(60, seed=14):
        templates, weight, bias, index = make_inputs(case, torch.float64)
        got = instance_aware_conv_exportable(templates, weight, bias, index, **case.conv_args)
        torch.testing.assert_close(got, oracle_forward(templates, weight, bias, index, **case.conv_args),
                                   atol=TOL[torch.float64][0], rtol=TOL[torch.float64][1], msg=lambda m: f"{case}: {m}")


# ------------------------------------------------------------------------------------------------------ PointINS


class MaskBranchInference(nn.Module):
    """The mask branch's inference path for one image: the tower over two FPN levels, then ``predict`` for the
    detections' anchors and labels (shared points share a template)."""

    def __init__(self, branch):
        super().__init__()
        self.branch = branch

    def forward(self, p3, p4, anchors, labels):
        return self.branch.predict(self.branch.point_features([p3, p4]), [anchors], [labels])[0]


def test_mask_branch_inference_exports_with_dynamic_levels_and_detections():
    from pointins import PointINSMaskBranch

    torch.manual_seed(0)
    branch = PointINSMaskBranch(32, 1, 3, tower_convs=1, class_specific=True)  # FCOS: one instance per point
    module = MaskBranchInference(branch).eval()

    def inputs(h, w, anchors, seed):
        generator = torch.Generator().manual_seed(seed)
        return {"p3": torch.randn(1, 32, h, w, generator=generator),
                "p4": torch.randn(1, 32, math.ceil(h / 2), math.ceil(w / 2), generator=generator),
                "anchors": torch.tensor(anchors), "labels": torch.randint(0, 3, (len(anchors),), generator=generator)}

    exported = inputs(8, 8, [0, 3, 5, 17, 70, 5], seed=1)  # anchors 5 and 5: one point, two detections
    dynamic = torch.export.Dim.DYNAMIC
    program = torch.onnx.export(module, (), kwargs=exported, dynamo=True, verbose=False, dynamic_shapes={
        "p3": {2: dynamic, 3: dynamic}, "p4": {2: dynamic, 3: dynamic}, "anchors": {0: dynamic},
        "labels": {0: dynamic}})
    check_standard_graph(program, {"p3": (2, 3), "p4": (2, 3), "anchors": (0,)})
    for case in (exported, inputs(10, 12, [0, 1, 2, 3, 9, 9, 40, 100, 149], seed=2), inputs(6, 4, [7], seed=3)):
        (got,) = run(program, case)
        with torch.no_grad():
            want = module(**case)
        assert got.shape == want.shape == (len(case["anchors"]), 28, 28)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def batched_nms_without_data_dependent_branches(boxes, scores, idxs, iou_threshold):
    """torchvision's ``batched_nms`` (class-wise NMS by offsetting each class's boxes beyond all others, which is
    what torchvision itself does for up to 4000 boxes on the CPU) without its two Python branches on the number
    of boxes (``boxes.numel() > 4000`` and ``boxes.numel() == 0``), which torch.export cannot trace when that
    number depends on the scores. Same kept indices, in the same order."""
    import torchvision

    offset = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max() + 1
    return torchvision.ops.nms(boxes + (idxs.to(boxes) * offset)[:, None], scores, iou_threshold)


@pytest.mark.skipif(tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 14),
                    reason="verified with torch 2.14; with torch 2.11, torch.export also stops in PointINS's own "
                           "predict and paste (README, Export)")
def test_whole_pointins_fcos_model_exports_once_batched_nms_is_traceable(monkeypatch):
    """PointINS-FCOS (ResNet-18, 128 px), image to boxes, labels, scores and pasted masks, in onnxruntime.

    With torchvision 0.29.1 as installed, the export stops in ``torchvision.ops.batched_nms`` (see README,
    "Export"); with the equivalent above substituted, everything else exports (the number of detections, the
    points they share and their masks stay dynamic) and onnxruntime agrees with PyTorch on two images other than
    the one exported. The comparison is against the model in float64: onnxruntime's float32 result must be
    as close to it as PyTorch's own float32 result, within a factor 4 plus float32's atol (measured: masks
    1.4e-5 to 7.4e-5 from onnxruntime, 2.3e-5 to 4.6e-5 from PyTorch; both are ~40 float32 layers deep).
    """
    import copy

    import pointins
    import pointins.detectors
    from test_model import synthetic_batch

    monkeypatch.setattr(pointins.detectors.box_ops, "batched_nms", batched_nms_without_data_dependent_branches)
    torch.manual_seed(0)
    model = pointins.pointins_fcos_resnet18_fpn(num_classes=3, tower_convs=1, min_size=128, max_size=128,
                                               score_thresh=0.0, detections_per_img=20).eval()

    class ImageToDetections(nn.Module):
        def __init__(self, detector):
            super().__init__()
            self.detector = detector

        def forward(self, image):
            detections = self.detector([image])[0]
            return detections["boxes"], detections["labels"], detections["scores"], detections["masks"]

    module = ImageToDetections(model).eval()
    reference = ImageToDetections(copy.deepcopy(model).double())
    image = synthetic_batch(sizes=((128, 128),), seed=0)[0][0]
    program = torch.onnx.export(module, (image,), dynamo=True, verbose=False)
    check_standard_graph(program, {})
    for seed in (5, 7):
        image = synthetic_batch(sizes=((128, 128),), seed=seed)[0][0]
        got = run(program, {"image": image})
        with torch.no_grad():
            want, truth = module(image), reference(image.double())
        for name, ours, theirs, exact in zip(("boxes", "labels", "scores", "masks"), got, want, truth):
            assert ours.shape == theirs.shape == exact.shape, name
            if name == "labels":
                assert torch.equal(ours, theirs)
                continue
            bound = 4 * (theirs.double() - exact).abs().max().item() + ATOL
            assert (ours.double() - exact).abs().max().item() <= bound, name
