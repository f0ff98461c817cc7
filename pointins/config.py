"""Run configuration: one dataclass, read from a YAML file and ``key=value`` overrides, written next to every run."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class PointINSError(Exception):
    """A problem with the user's input (a file, a field, a value): the CLI prints the message without a traceback."""


@dataclass
class Config:
    """Everything a ``train``, ``eval``, ``predict`` or ``demo`` run needs. Paths are strings (plain YAML)."""

    # --- model ---
    detector: str = "fcos"                   # "fcos" or "retinanet"
    backbone: str = "resnet18"               # a torchvision ResNet
    weights_backbone: str | None = None      # e.g. "ResNet18_Weights.IMAGENET1K_V1" (downloads); None: from scratch
    num_classes: int = 0                     # torchvision's convention (background + categories); 0: from the data
    fpn_channels: int = 256                  # FPN and head width; below 256 builds the light model (see models.py)
    head_convs: int = 4                      # convolutions in each of the detector's class and box towers
    tower_convs: int = 4                     # the mask branch's dense tower (PointINSMaskBranch)
    template_channels: int = 16
    template_size: int = 14
    mask_channels: int = 16
    kernel_size: int = 3                     # the instance-aware kernels' size (odd)
    positives_per_image: int = 64
    min_size: int = 800                      # the model's resize: shorter side
    max_size: int = 1333                     # the model's resize: longer side at most
    score_thresh: float = 0.05
    detections_per_img: int = 100

    # --- data (COCO format: an instances JSON and an image folder) ---
    train_annotations: str = ""
    train_images: str = ""
    val_annotations: str = ""
    val_images: str = ""
    hflip: float = 0.5                       # probability of a horizontal flip in training

    # --- training ---
    optimizer: str = "adamw"                 # "adamw" or "sgd"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9                    # SGD only
    batch_size: int = 4                      # images per step per process
    steps: int = 1000                        # optimizer steps
    warmup_steps: int = 100                  # linear warm-up from warmup_factor * lr
    warmup_factor: float = 0.001
    schedule: str = "cosine"                 # after warm-up: "cosine" (to 0), "step" (x0.1 at 2/3 and 8/9), "constant"
    grad_clip: float = 10.0                  # max gradient norm; 0 disables clipping
    eval_every: int = 0                      # steps between evaluations on the val set; 0: at the end only
    checkpoint_every: int = 500              # steps between checkpoints (one is always written at the end)
    log_every: int = 10                      # steps between CSV rows
    time_limit_minutes: float = 0.0          # stop (and checkpoint) after this much training time; 0: no limit
    seed: int = 0
    workers: int = 0                         # DataLoader worker processes
    device: str = "auto"                     # "auto" (CUDA if available), "cpu", "cuda"
    amp: bool = True                         # bfloat16 autocast, on CUDA only
    threads: int = 0                         # torch threads on CPU; 0: torch's default
    output_dir: str = "runs/pointins"


# The fields that define the model's parameters: a checkpoint is usable only with the same values.
MODEL_FIELDS = ("detector", "backbone", "num_classes", "fpn_channels", "head_convs", "tower_convs",
                "template_channels", "template_size", "mask_channels", "kernel_size")

_CHOICES = {"detector": ("fcos", "retinanet"), "optimizer": ("adamw", "sgd"),
            "schedule": ("cosine", "step", "constant"), "device": ("auto", "cpu", "cuda")}


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _coerce(key: str, value: Any, annotation: Any, source: str) -> Any:
    """``value`` as the field's type, or a PointINSError naming the field and where the value came from."""
    optional = isinstance(annotation, types.UnionType) and type(None) in annotation.__args__
    if optional and value == "":
        value = None
    if value is None:
        if optional:
            return None
        raise PointINSError(f"{source}: {key} must not be empty (null)")
    base = next(a for a in annotation.__args__ if a is not type(None)) if optional else annotation
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise PointINSError(f"{source}: {key} must be {base.__name__}; got {value!r} ({type(value).__name__})")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise PointINSError(f"{source}: {key} must be one of {list(_CHOICES[key])}; got {value!r}")
    return value


def update_config(config: Config, values: dict[str, Any], source: str) -> Config:
    """A copy of ``config`` with ``values`` applied; unknown keys and wrong types name the key and the source."""
    if not isinstance(values, dict):
        raise PointINSError(f"{source}: expected a mapping of config keys to values; got {type(values).__name__}")
    types_ = _field_types()
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise PointINSError(f"{source}: unknown config key(s) {unknown}; known keys: {sorted(types_)}")
    checked = {key: _coerce(key, value, types_[key], source) for key, value in values.items()}
    return dataclasses.replace(config, **checked)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=0.01", "detector=fcos"]`` -> ``{"lr": 0.01, "detector": "fcos"}``; values are read as YAML scalars,
    and ``key=`` gives the empty string (None for the optional fields)."""
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise PointINSError(f"override {item!r}: expected key=value")
        try:
            values[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            raise PointINSError(f"override {item!r}: the value is not valid YAML: {error}") from None
    return values


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML file, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PointINSError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise PointINSError(f"config file {path} is not valid YAML: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise PointINSError(f"config file {path}: expected a mapping of config keys; got {type(values).__name__}")
    return values


def resolve_config(config_file: str | None = None, overrides: list[str] | None = None,
                   base: Config | None = None) -> Config:
    """``base`` (default: the defaults), then the YAML file, then the overrides, each checked."""
    config = base if base is not None else Config()
    if config_file:
        config = update_config(config, load_yaml(config_file), f"config file {config_file}")
    if overrides:
        config = update_config(config, parse_overrides(overrides), "command-line override")
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(values: dict[str, Any], source: str) -> Config:
    return update_config(Config(), values, source)


def write_config(config: Config, directory: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config as YAML into ``directory``; returns the file's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path


def model_mismatches(saved: dict[str, Any], config: Config) -> list[str]:
    """Model-defining fields whose value in a checkpoint's config differs from ``config``'s. A field the checkpoint
    does not record (it predates the field) counts as its default, the value the model was built with."""
    current, defaults = config_to_dict(config), config_to_dict(Config())
    saved = {key: saved.get(key, defaults[key]) for key in MODEL_FIELDS}
    return [f"{key}: checkpoint {saved[key]!r} != config {current[key]!r}" for key in MODEL_FIELDS
            if saved[key] != current[key]]


__all__ = ["Config", "MODEL_FIELDS", "PointINSError", "config_from_dict", "config_to_dict", "load_yaml",
           "model_mismatches", "parse_overrides", "resolve_config", "update_config", "write_config"]
