"""Training, evaluation, prediction and the CLI, on tiny shapes images and a tiny model. CPU only."""

from __future__ import annotations

import json
import shutil
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

# The COCO data loader, the evaluator and so training itself need faster-coco-eval (a dependency of the package):
# where it is missing, as on the GPU machines' image, this file is skipped, not a collection error.
pytest.importorskip("faster_coco_eval", reason="faster-coco-eval is not installed (pip install faster-coco-eval)")

from faster_coco_eval import COCO  # noqa: E402
from faster_coco_eval.core import mask as mask_api  # noqa: E402
from PIL import Image  # noqa: E402

from pointins.cli import main  # noqa: E402
from pointins.config import Config, PointINSError, resolve_config  # noqa: E402
from pointins.data import CocoInstances, check_coco_dict, generate_shapes, read_image  # noqa: E402
from pointins.demo import run_demo  # noqa: E402
from pointins.evaluate import detections_to_coco, evaluate_results  # noqa: E402
from pointins.train import load_checkpoint, lr_factor, train  # noqa: E402

# A model that runs a step in well under a second on one core: 64 px images, ResNet-18, 64-channel heads.
TINY = ["min_size=64", "max_size=64", "fpn_channels=64", "head_convs=1", "tower_convs=1", "positives_per_image=8",
        "batch_size=2", "warmup_steps=1", "steps=2", "log_every=1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    """Six 64 px training images and three held-out ones."""
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root / "train", 6, 64, seed=0, max_objects=3)
    generate_shapes(root / "val", 3, 64, seed=1, max_objects=3)
    return {"train_json": root / "train" / "annotations.json", "train_images": root / "train" / "images",
            "val_json": root / "val" / "annotations.json", "val_images": root / "val" / "images"}


def data_overrides(shapes) -> list[str]:
    return [f"train_annotations={shapes['train_json']}", f"train_images={shapes['train_images']}",
            f"val_annotations={shapes['val_json']}", f"val_images={shapes['val_images']}"]


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory) -> Path:
    """A checkpoint of 2 steps through the CLI (also its smoke test: train writes everything it promises)."""
    output = tmp_path_factory.mktemp("run")
    assert main(["train", "--no-progress", *data_overrides(shapes), *TINY, f"output_dir={output}"]) == 0
    return output / "checkpoint.pt"


# ------------------------------------------------------------------------------------------------------ shapes

def read_dataset(root: Path) -> tuple[dict, dict[str, bytes]]:
    data = json.loads((root / "annotations.json").read_text())
    return data, {p.name: p.read_bytes() for p in sorted((root / "images").iterdir())}


def decoded_masks(data: dict) -> dict[int, np.ndarray]:
    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    return {ann["id"]: coco.annToMask(ann).astype(bool) for ann in data["annotations"]}


def test_shapes_generator_is_deterministic_and_valid_coco(tmp_path):
    generate_shapes(tmp_path / "a", 5, 48, seed=3)
    generate_shapes(tmp_path / "b", 5, 48, seed=3)
    generate_shapes(tmp_path / "c", 5, 48, seed=4)
    assert read_dataset(tmp_path / "a") == read_dataset(tmp_path / "b")
    assert read_dataset(tmp_path / "a")[1] != read_dataset(tmp_path / "c")[1]

    data, images = read_dataset(tmp_path / "a")
    check_coco_dict(data, "shapes")
    assert {c["name"] for c in data["categories"]} == {"circle", "square", "triangle"}
    assert len(images) == 5 and all(Image.open(tmp_path / "a" / "images" / name).size == (48, 48) for name in images)
    masks = decoded_masks(data)
    for image in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        assert anns, "every image holds at least one shape"
        union = np.zeros((48, 48), dtype=int)
        for ann in anns:
            mask = masks[ann["id"]]
            rle = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
            assert ann["area"] == mask.sum() > 0
            assert ann["bbox"] == [float(v) for v in mask_api.toBbox(rle)]
            union += mask
        assert union.max() == 1, "visible parts of shapes must not overlap"


def test_shapes_polygon_and_rle_formats_give_the_same_masks(tmp_path):
    """Polygons where a shape is whole, RLE where it is occluded: the decoded masks equal the all-RLE ones."""
    generate_shapes(tmp_path / "rle", 12, 48, seed=7, max_objects=4)
    generate_shapes(tmp_path / "poly", 12, 48, seed=7, max_objects=4, mask_format="polygon")
    rle_data, rle_images = read_dataset(tmp_path / "rle")
    poly_data, poly_images = read_dataset(tmp_path / "poly")
    assert rle_images == poly_images
    kinds = {type(a["segmentation"]) for a in poly_data["annotations"]}
    assert kinds == {list, dict}, "this seed has both whole and occluded shapes"
    rle_masks, poly_masks = decoded_masks(rle_data), decoded_masks(poly_data)
    assert all(np.array_equal(rle_masks[i], poly_masks[i]) for i in rle_masks)


# ------------------------------------------------------------------------------------------------------ loader

def write_coco(root: Path, annotations: list[dict], images=None, categories=None) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    images = images if images is not None else [{"id": 7, "file_name": "a.png", "height": 20, "width": 30},
                                                {"id": 8, "file_name": "b.png", "height": 20, "width": 30}]
    for image in images:
        pixels = np.zeros((image["height"], image["width"], 3), dtype=np.uint8)
        pixels[:, : image["width"] // 2] = 200
        Image.fromarray(pixels).save(root / "images" / image["file_name"])
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories or [
        {"id": 5, "name": "five"}, {"id": 9, "name": "nine"}]}))
    return path


def test_loader_round_trip_polygon_and_rle(tmp_path):
    rectangle = np.zeros((20, 30), dtype=np.uint8)
    rectangle[3:9, 4:14] = 1  # rows 3..8, columns 4..13
    blob = np.zeros((20, 30), dtype=np.uint8)
    blob[10:18, 20:27] = 1
    blob[12, 19] = 1
    compressed = mask_api.encode(np.asfortranarray(blob))
    compressed = {"size": [20, 30], "counts": compressed["counts"].decode("ascii")}
    # Uncompressed RLE: run lengths of zeros and ones in column-major order.
    column_major = rectangle.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], column_major, [2]])) != 0)
    uncompressed = {"size": [20, 30], "counts": np.diff(np.concatenate([[0], changes])).tolist()}
    polygon = [[4, 3, 14, 3, 14, 9, 4, 9]]  # pixel edges of the same rectangle
    path = write_coco(tmp_path, [
        {"id": 1, "image_id": 7, "category_id": 9, "segmentation": polygon, "bbox": [4, 3, 10, 6], "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 5, "segmentation": compressed, "bbox": [19, 10, 8, 8], "iscrowd": 0},
        {"id": 3, "image_id": 7, "category_id": 5, "segmentation": uncompressed, "bbox": [4, 3, 10, 6],
         "iscrowd": 0},
        {"id": 4, "image_id": 7, "category_id": 5, "segmentation": compressed, "bbox": [19, 10, 8, 8],
         "iscrowd": 1},  # crowds stay out of the training targets
    ])
    dataset = CocoInstances(path, tmp_path / "images")
    assert len(dataset) == 2 and dataset.num_classes == 3
    image, target = dataset[0]
    assert image.shape == (3, 20, 30) and image.dtype == torch.float32 and float(image.max()) == pytest.approx(200 / 255)
    assert target["labels"].tolist() == [2, 1, 1]  # category 9 -> label 2, category 5 -> label 1
    assert torch.equal(target["masks"][0], torch.from_numpy(rectangle))
    assert torch.equal(target["masks"][1], torch.from_numpy(blob))
    assert torch.equal(target["masks"][2], torch.from_numpy(rectangle))
    assert target["boxes"].tolist() == [[4, 3, 14, 9], [19, 10, 27, 18], [4, 3, 14, 9]]
    empty_image, empty = dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 20, 30) and int(empty["image_id"]) == 8

    flipped = CocoInstances(path, tmp_path / "images", hflip=1.0)
    flipped_image, flipped_target = flipped[0]
    assert torch.equal(flipped_image, image.flip(-1))
    assert torch.equal(flipped_target["masks"], target["masks"].flip(-1))
    assert flipped_target["boxes"][0].tolist() == [30 - 14, 3, 30 - 4, 9]


# --------------------------------------------------------------------------------------------------- evaluator

def square(top: int, left: int, side: int = 20, size: int = 48) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[top:top + side, left:left + side] = 1
    return mask


@pytest.fixture
def two_squares() -> COCO:
    """Two 48 x 48 images with one 20 x 20 square each (category 1)."""
    annotations = []
    for image_id, (top, left) in ((1, (10, 10)), (2, (5, 20))):
        rle = mask_api.encode(np.asfortranarray(square(top, left)))
        annotations.append({"id": image_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "area": 400.0,
                            "bbox": [left, top, 20, 20],
                            "segmentation": {"size": [48, 48], "counts": rle["counts"].decode("ascii")}})
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "file_name": f"{i}.png", "height": 48, "width": 48} for i in (1, 2)],
                    "annotations": annotations, "categories": [{"id": 1, "name": "square"}]}
    coco.createIndex()
    return coco


def prediction(image_id: int, top: int, left: int) -> list[dict]:
    output = {"boxes": torch.tensor([[left, top, left + 20, top + 20]], dtype=torch.float32),
              "labels": torch.tensor([1]), "scores": torch.tensor([0.9]),
              "masks": torch.from_numpy(square(top, left)).float()[None, None]}
    return detections_to_coco(output, image_id, {1: 1})


def test_evaluator_perfect_predictions_give_ap_one(two_squares):
    metrics = evaluate_results(two_squares, prediction(1, 10, 10) + prediction(2, 5, 20))
    for kind in ("box", "mask"):
        assert metrics[kind]["AP"] == pytest.approx(1.0) and metrics[kind]["AP50"] == pytest.approx(1.0)
    assert "Average Precision" in metrics["summary"]


def test_evaluator_matches_hand_computed_ap_for_shifted_predictions(two_squares):
    """Shifting both squares 2 px right gives IoU 360 / 440 = 0.818 for boxes and masks: a match at the IoU
    thresholds 0.50, ..., 0.80 (7 of 10), none at 0.85 to 0.95, so AP = 0.7, AP50 = AP75 = 1."""
    metrics = evaluate_results(two_squares, prediction(1, 10, 12) + prediction(2, 5, 22))
    for kind in ("box", "mask"):
        assert metrics[kind]["AP"] == pytest.approx(0.7)
        assert metrics[kind]["AP75"] == pytest.approx(1.0)


def test_evaluator_counts_images_without_detections(two_squares):
    """Image 2 has no detection: recall stops at 1/2, so the 101-point AP is 51/101 (recall 0, 0.01, ..., 0.5
    at precision 1). No detection at all gives zeros instead of an error."""
    metrics = evaluate_results(two_squares, prediction(1, 10, 10))
    assert metrics["mask"]["AP"] == pytest.approx(51 / 101) and metrics["box"]["AP"] == pytest.approx(51 / 101)
    empty = evaluate_results(two_squares, [])
    assert empty["box"]["AP"] == 0.0 and empty["mask"]["AR100"] == 0.0


# ------------------------------------------------------------------------------------------------------ config

def test_config_file_then_overrides_and_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 0.01\nsteps: 50\ndetector: retinanet\n")
    config = resolve_config(str(path), ["steps=7", "weights_backbone=null"])
    assert (config.lr, config.steps, config.detector, config.weights_backbone) == (0.01, 7, "retinanet", None)
    with pytest.raises(PointINSError, match="unknown config key.*'step'"):
        resolve_config(None, ["step=3"])
    with pytest.raises(PointINSError, match="lr must be float; got 'fast'"):
        resolve_config(None, ["lr=fast"])
    with pytest.raises(PointINSError, match="detector must be one of"):
        resolve_config(None, ["detector=yolo"])
    path.write_text("lr: [0.1\n")
    with pytest.raises(PointINSError, match=f"config file {path} is not valid YAML"):
        resolve_config(str(path))


def test_mask_branch_fields_reach_the_model_and_checkpoints_without_a_field_read_as_its_default():
    from pointins.config import config_to_dict, model_mismatches
    from pointins.models import build_model
    config = resolve_config(None, [*TINY, "num_classes=3", "kernel_size=1", "template_size=7", "mask_channels=8"])
    branch = build_model(config).head.mask_branch
    assert (branch.kernel_size, branch.template_size, branch.mask_channels) == (1, 7, 8)
    with pytest.raises(PointINSError, match="kernel_size must be odd"):
        build_model(resolve_config(None, [*TINY, "num_classes=3", "kernel_size=2"]))
    saved = config_to_dict(Config())
    del saved["kernel_size"]  # a checkpoint written before the field existed: built with the default, 3
    assert model_mismatches(saved, Config()) == []
    assert model_mismatches(saved, Config(kernel_size=1)) == ["kernel_size: checkpoint 3 != config 1"]


def test_lr_schedule_warms_up_then_decays():
    config = Config(steps=110, warmup_steps=10, warmup_factor=0.1, schedule="cosine")
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(5, config) == pytest.approx(0.55)
    assert lr_factor(10, config) == pytest.approx(1.0)
    assert lr_factor(60, config) == pytest.approx(0.5)
    assert lr_factor(110, config) == pytest.approx(0.0)
    step = Config(steps=90, warmup_steps=0, schedule="step")
    assert [lr_factor(s, step) for s in (0, 59, 60, 80)] == pytest.approx([1, 1, 0.1, 0.01])


# ------------------------------------------------------------------------------------------------------ training

def test_train_writes_checkpoint_log_plot_and_config(trained):
    run = trained.parent
    checkpoint = torch.load(trained, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"model", "optimizer", "scheduler", "step", "config", "categories"}
    assert checkpoint["step"] == 2 and checkpoint["config"]["num_classes"] == 4
    assert checkpoint["scheduler"]["last_epoch"] == 2 and checkpoint["optimizer"]["state"]
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved == checkpoint["config"] and resolved["fpn_channels"] == 64
    rows = (run / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,lr,images_per_s,loss,loss_classification")
    assert len(rows) == 1 + 2 + 1  # header, steps 1 and 2, the evaluation at step 2
    assert read_image(run / "curves.png").shape == (3, 400, 1100)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 2 and set(metrics["mask"]) >= {"AP", "AP50", "AR100"}


def states_equal(a: dict, b: dict) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_resume_gives_the_state_of_an_uninterrupted_run(shapes, tmp_path):
    """3 steps per epoch (6 images, batch 2), flips on: interrupted after step 2 (mid-epoch) and resumed to step
    4, the model, optimizer and scheduler equal those of 4 uninterrupted steps, bit for bit."""
    options = [*data_overrides(shapes), *TINY, "steps=4", "hflip=0.5", "val_annotations=", "val_images="]
    whole = resolve_config(None, [*options, f"output_dir={tmp_path / 'whole'}"])
    parts = resolve_config(None, [*options, f"output_dir={tmp_path / 'parts'}"])
    train(whole, progress=False)
    train(parts, progress=False, stop_after=2)
    assert load_checkpoint(tmp_path / "parts" / "checkpoint.pt")["step"] == 2
    train(parts, resume=tmp_path / "parts" / "checkpoint.pt", progress=False)
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    for key in ("model", "optimizer", "scheduler", "step"):
        assert states_equal(a[key], b[key]), key
    steps = [line.split(",")[0] for line in (tmp_path / "parts" / "log.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4"]


DDP_SCRIPT = """
import os, sys, torch
from pointins.config import resolve_config
from pointins.train import train
torch.set_num_threads(1)
config = resolve_config(None, sys.argv[2:])
model, _ = train(config, progress=False)
torch.save({name: p.detach() for name, p in model.named_parameters()},
           os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_under_torchrun_end_with_identical_weights(shapes, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    output = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), str(tmp_path),
               *data_overrides(shapes), *TINY, "batch_size=1", "steps=3", "val_annotations=", "val_images=",
               "device=cpu", f"output_dir={output}"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    checkpoint = load_checkpoint(output / "checkpoint.pt")  # written by rank 0 only, once per process group
    assert checkpoint["step"] == 3
    start = resolve_config(None, [*TINY, "num_classes=4"])
    torch.manual_seed(start.seed)
    from pointins.models import build_model
    initial = dict(build_model(start).named_parameters())
    assert any(not torch.equal(initial[k], rank0[k]) for k in rank0), "training changed the weights"


# ------------------------------------------------------------------------------------------------ eval, predict

def test_eval_command_prints_and_writes_metrics(trained, shapes, tmp_path, capsys):
    assert main(["eval", str(trained), "--output", str(tmp_path), "score_thresh=0.01"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("Average Precision") == 12 and "mask (segm)" in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["annotations"] == str(shapes["val_json"]) and len(metrics["mask"]) == 12
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["score_thresh"] == 0.01


def test_predict_writes_pngs_and_coco_json(trained, shapes, tmp_path):
    images = sorted(shapes["val_images"].iterdir())
    assert main(["predict", str(trained), *map(str, images[:2]), "--output", str(tmp_path), "--min-score", "0",
                 "--scale", "2", "--set", "score_thresh=0.01"]) == 0
    for image in images[:2]:
        picture = read_image(str(tmp_path / image.name))
        assert picture.shape == (3, 128, 128)
    data = json.loads((tmp_path / "predictions.json").read_text())
    coco = COCO()
    coco.dataset = data
    coco.createIndex()  # the COCO API reads it
    assert [i["file_name"] for i in data["images"]] == [str(p) for p in images[:2]]
    assert data["annotations"], "a 2-step model still scores some detections above 0.01"
    assert all(coco.annToMask(a).shape == (64, 64) and 0 <= a["score"] <= 1 for a in data["annotations"])


def test_demo_runs_end_to_end_at_toy_size(tmp_path):
    result = run_demo(tmp_path, minutes=5, overrides=[*TINY, "batch_size=2", "steps=2"], train_images=4,
                      val_images=2, image_size=64, progress=False, show=2)
    assert result["steps"] == 2 and set(result["mask"]) >= {"AP", "AP50"}
    # 2 pairs (ground truth | prediction) of 3x enlarged 64 px images in one row, 4 px apart.
    assert read_image(result["picture"]).shape == (3, 192, 4 * 192 + 3 * 4)


# ----------------------------------------------------------------------------------------------------- bad input

def bad_input_cases(shapes, trained, tmp_path):
    good = json.loads(shapes["train_json"].read_text())
    no_mask = json.loads(json.dumps(good))
    del no_mask["annotations"][1]["segmentation"]
    (tmp_path / "no_mask.json").write_text(json.dumps(no_mask))
    (tmp_path / "no_images.json").write_text(json.dumps({**good, "images": [], "annotations": []}))
    (tmp_path / "broken.json").write_text('{"images": [1, 2')
    missing_file = json.loads(json.dumps(good))
    missing_file["images"][0]["file_name"] = "nowhere.png"
    (tmp_path / "missing_image.json").write_text(json.dumps(missing_file))
    images = str(shapes["train_images"])
    train = ["train", "--no-progress", *TINY, f"output_dir={tmp_path / 'out'}", f"train_images={images}"]
    return {
        "missing annotation file": ([*train, f"train_annotations={tmp_path / 'none.json'}"],
                                    f"annotation file {tmp_path / 'none.json'} does not exist"),
        "malformed json": ([*train, f"train_annotations={tmp_path / 'broken.json'}"],
                           f"annotation file {tmp_path / 'broken.json'} is not valid JSON"),
        "annotation without mask": ([*train, f"train_annotations={tmp_path / 'no_mask.json'}"],
                                    "annotations[1] (id 2) has no mask: field 'segmentation'"),
        "empty image list": ([*train, f"train_annotations={tmp_path / 'no_images.json'}"],
                             "the image list ('images') is empty"),
        "missing image file": ([*train, f"train_annotations={tmp_path / 'missing_image.json'}"],
                               "1 image file(s) missing from .*nowhere.png"),
        "missing image folder": (["train", *TINY, f"train_annotations={shapes['train_json']}",
                                  f"train_images={tmp_path / 'nofolder'}"], "image folder .*nofolder does not exist"),
        "checkpoint of another config": (["eval", str(trained), "fpn_channels=128"],
                                         "was trained with another model config: fpn_channels: checkpoint 64 != "
                                         "config 128"),
        "resume from another config": ([*train, f"train_annotations={shapes['train_json']}", "tower_convs=2",
                                        "--resume", str(trained)], "tower_convs: checkpoint 1 != config 2"),
        "not a checkpoint": (["eval", str(tmp_path / "broken.json")], "could not be loaded as a PointINS checkpoint"),
        "predict on no images": (["predict", str(trained), str(tmp_path / "out_empty"), "--output", str(tmp_path)],
                                 "input .*out_empty does not exist"),
        "unknown key": (["train", "colour=red"], "unknown config key"),
    }


CASES = ["missing annotation file", "malformed json", "annotation without mask", "empty image list",
         "missing image file", "missing image folder", "checkpoint of another config", "resume from another config",
         "not a checkpoint", "predict on no images", "unknown key"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_a_clear_error_naming_the_file_or_field(case, shapes, trained, tmp_path, capsys):
    argv, message = bad_input_cases(shapes, trained, tmp_path)[case]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"pointins {argv[0]}: error: ") and "Traceback" not in error
    pattern = ".*".join(re.escape(part) for part in message.split(".*"))  # ".*" is the only wildcard
    assert re.search(pattern, error), error


def test_predict_on_a_folder_without_images_names_it(trained, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(trained), str(tmp_path / "empty"), "--output", str(tmp_path / "out")]) == 2
    assert "the image list is empty" in capsys.readouterr().err


def test_python_dash_m_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pointins", "eval", str(tmp_path / "missing.pt")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"pointins eval: error: checkpoint {tmp_path / 'missing.pt'} does not exist"


def test_train_resume_flag_continues_from_the_output_dirs_checkpoint(trained, shapes, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained.parent, run)
    assert main(["train", "--no-progress", *data_overrides(shapes), *TINY, f"output_dir={run}", "--resume",
                 "steps=3"]) == 0
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 3
    steps = [line.split(",")[0] for line in (run / "log.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "2", "3", "3"]  # training rows, with the evaluation rows after steps 2 and 3
