"""``pointins compare``: PointINS vs torchvision's Mask R-CNN at equal capacity and budget. CPU only, tiny runs."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("faster_coco_eval", reason="faster-coco-eval is not installed (pip install faster-coco-eval)")

from PIL import Image  # noqa: E402

from pointins.cli import main  # noqa: E402
from pointins.compare import (MODELS, Trainer, build, build_maskrcnn, compare_config, new_run_folder,  # noqa: E402
                              time_inference, train_side_by_side)
from pointins.config import Config  # noqa: E402
from pointins.train import lr_factor  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def light_config(**changes) -> Config:
    values = dict(fpn_channels=64, head_convs=1, tower_convs=1, min_size=64, max_size=64, num_classes=4)
    values.update(changes)
    return dataclasses.replace(Config(), **values)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("compare")
    assert main(["compare", "--quick", "--no-progress", "--output", str(output)]) == 0
    return output


def test_quick_compare_writes_table_csv_json_and_picture(quick_run):
    result = json.loads((quick_run / "results.json").read_text())
    info = result["environment"]
    for key in ("date_utc", "command", "cpu", "threads", "torch", "torchvision", "faster_coco_eval", "git_commit",
                "load_average_start", "load_average_end"):
        assert key in info, key
    assert info["command"].startswith("pointins compare --quick")
    rows = result["rows"]
    assert [row["model"] for row in rows] == list(MODELS)
    for row in rows:
        assert row["steps"] == 3  # --quick: the same 3 steps each
        assert 0 <= row["mask_AP"] <= 1 and 0 <= row["box_AP"] <= 1
        assert row["infer_ms"] > 0 and row["infer_ms_p20"] <= row["infer_ms"] <= row["infer_ms_p80"]
        assert 0 < row["detections"] <= 100
        assert row["fpn_channels"] == 64
    table = (quick_run / "results.md").read_text()
    assert "PointINS (FCOS)" in table and "Mask R-CNN (torchvision)" in table and info["command"] in table
    with open(quick_run / "results.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [row["model"] for row in csv_rows] == list(MODELS)
    assert all(row["date_utc"] == info["date_utc"] and row["cpu"] == info["cpu"] for row in csv_rows)
    with Image.open(quick_run / "compare.png") as picture:
        width, height = picture.size
    # 3 columns (ground truth and the two models) of 64 px images drawn 3x with 4 px gaps; 2 rows and a title.
    assert width == 3 * 192 + 2 * 4 and height == 16 + 2 * 192 + 4


def test_default_output_is_a_new_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = new_run_folder(quick=True)
    first.mkdir(parents=True)
    second = new_run_folder(quick=True)
    assert first.parent == second.parent == Path("runs") / "compare"
    assert first != second and not second.exists()


def test_mask_rcnn_has_pointins_backbone_and_head_widths():
    config = light_config(tower_convs=2, head_convs=2, fpn_channels=96)
    pointins_model, maskrcnn = build("pointins", config), build_maskrcnn(config)
    ours = {k: v.shape for k, v in pointins_model.backbone.state_dict().items()}
    theirs = {k: v.shape for k, v in maskrcnn.backbone.state_dict().items()}
    assert ours == theirs  # the very same backbone architecture
    mask_convs = [m for m in maskrcnn.roi_heads.mask_head.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in mask_convs] == [(96, 96)] * 3  # tower_convs + 1
    rpn_convs = [m for m in maskrcnn.rpn.head.conv.modules() if isinstance(m, nn.Conv2d)]
    assert len(rpn_convs) == 2 and all(m.out_channels == 96 for m in rpn_convs)  # head_convs
    assert maskrcnn.roi_heads.box_head.fc7.out_features == 4 * 96
    assert maskrcnn.roi_heads.detections_per_img == pointins_model.detections_per_img == 100
    assert maskrcnn.transform.min_size == pointins_model.transform.min_size


class _ClockedTrainer(Trainer):
    """A trainer whose steps take a fixed, fake number of seconds and are logged by name."""

    def __init__(self, name, seconds_per_step, budget_s, log):
        self.name, self.seconds_per_step, self.budget_s, self.log = name, seconds_per_step, budget_s, log
        self.config = light_config(steps=5)
        self.step, self.seconds = 0, 0.0

    def train_step(self):
        self.log.append(self.name)
        self.step += 1
        self.seconds += self.seconds_per_step
        return self.seconds_per_step


def test_side_by_side_training_gives_each_model_the_same_time():
    log = []
    fast, slow = _ClockedTrainer("pointins", 1.0, 10.0, log), _ClockedTrainer("maskrcnn", 2.5, 10.0, log)
    train_side_by_side([fast, slow], progress=False)
    assert (fast.step, fast.seconds) == (10, 10.0)
    assert (slow.step, slow.seconds) == (4, 10.0)
    # Always the one behind on its clock steps next, so the slow model's steps are spread over the whole run.
    assert log == ["pointins", "maskrcnn", "pointins", "pointins", "maskrcnn", "pointins", "pointins", "pointins",
                   "maskrcnn", "pointins", "pointins", "maskrcnn", "pointins", "pointins"]


def test_step_budget_gives_each_model_the_same_steps():
    log = []
    first, second = _ClockedTrainer("pointins", 1.0, None, log), _ClockedTrainer("maskrcnn", 3.0, None, log)
    train_side_by_side([first, second], progress=False)
    assert first.step == second.step == 5 and log[:4] == ["pointins", "maskrcnn", "pointins", "maskrcnn"]


def test_schedule_follows_the_fraction_of_a_time_budget():
    config = light_config(warmup_steps=10, steps=100, warmup_factor=0.1, schedule="cosine")
    assert lr_factor(5, config, progress=0.9) == pytest.approx(0.55)  # warm-up is counted in steps
    assert lr_factor(50, config, progress=0.5) == pytest.approx(0.5)
    assert lr_factor(500, config, progress=1.0) == pytest.approx(0.0)
    assert lr_factor(50, dataclasses.replace(config, schedule="step"), progress=0.7) == pytest.approx(0.1)


def test_inference_timing_restores_thresholds_and_counts_detections():
    config = light_config(num_classes=3)
    models = {name: build(name, config).eval() for name in MODELS}
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    timings = time_inference(models, images, rounds=1)
    for name, model in models.items():
        assert timings[name]["timed_images"] == 2 and timings[name]["infer_ms"] > 0
        assert timings[name]["detections"] == 100  # untrained, threshold 0: the cap
    assert models["pointins"].score_thresh == 0.05 and models["maskrcnn"].roi_heads.score_thresh == 0.05


@pytest.mark.parametrize("arguments, message", [
    (["--data", "nope"], "--data must be one of ['crowded', 'shapes']"),
    (["--models", "pointins,yolo"], "models must be among ['pointins', 'maskrcnn']"),
    (["--train-annotations", "a.json"], "missing ['--train-images', '--val-annotations', '--val-images']"),
    (["--minutes", "0"], "give a positive time budget"),
    (["no_such_key=1"], "unknown config key(s) ['no_such_key']"),
])
def test_bad_arguments_are_clear_errors(arguments, message, tmp_path, capsys):
    assert main(["compare", "--no-progress", "--output", str(tmp_path), *arguments]) == 2
    assert message in capsys.readouterr().err


def test_compare_config_takes_the_demo_model_and_the_data_size():
    config = compare_config({"train_annotations": "t.json"}, {"min_size": 96, "max_size": 96}, ["lr=0.01"])
    assert (config.fpn_channels, config.min_size, config.max_size, config.lr) == (64, 96, 96, 0.01)
