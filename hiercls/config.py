"""The training configuration: one validated object for ``hiercls fit``.

A run is described by a YAML file, command-line options, or both; options given on the
command line win over the file. Paths in a YAML file are relative to that file's folder,
so a config can sit next to its data. The resolved config is saved in every run directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hiercls.errors import ConfigError
from hiercls.io import YamlTooLarge, load_yaml, read_user_text, yaml_error_message

__all__ = ["AugmentConfig", "FitConfig", "load_config", "read_config_file", "PATH_OPTIONS"]

PATH_OPTIONS = ("taxonomy", "data", "out", "pretrained", "cache_dir")


def check_regex(value: str | None) -> str | None:
    """A pydantic validator body: ``value`` must compile as a regular expression."""
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression '{value}' ({exc})") from None
    return value


def check_strategy(value: str) -> str:
    """A pydantic validator body: ``value`` must be a registered strategy (built-in or plugin)."""
    from hiercls.plugins import find_strategy

    try:
        find_strategy(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return value


class AugmentConfig(BaseModel):
    """Training-time augmentation, applied on the device to whole batches.

    Defaults suit blood-smear images, which have no canonical orientation: flips and 90°
    rotations on, mild colour jitter (stain variation), gentle random-resized crops.
    """

    model_config = ConfigDict(extra="forbid")

    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    color_jitter: float = Field(0.1, ge=0.0, le=1.0, description="brightness/contrast/saturation strength")
    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.9, 1.1)

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _ordered_positive(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high:
            raise ValueError(f"needs 0 < low <= high, got [{low}, {high}]")
        return value

    @field_validator("crop_scale")
    @classmethod
    def _scale_at_most_one(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[1] > 1.0:
            raise ValueError(f"crop scale is a fraction of the image area, at most 1.0; got {value[1]}")
        return value


class FitConfig(BaseModel):
    """Everything ``hiercls fit`` needs; see docs/training.md for each option."""

    model_config = ConfigDict(extra="forbid")

    taxonomy: Path
    data: Path
    out: Path
    strategy: str = "joint"  # a registered strategy (built-ins: flat, per_node, per_level, joint)
    backbone: str = "resnet18"
    pretrained: Path | None = None
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)
    loss: str = "ce"
    loss_options: dict[str, Any] = Field(default_factory=dict)
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    img_size: int = Field(224, ge=8, le=4096)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    # AdamW at 3e-4 is a robust fine-tuning default for both CNNs and ViTs at batch size 32.
    lr: float = Field(3e-4, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.05, ge=0, allow_inf_nan=False)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    scheduler: Literal["cosine", "none"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, allow_inf_nan=False)
    # None means 0.2, unless fold/folds choose a cross-validation fold instead.
    val_fraction: float | None = Field(None, ge=0, lt=1)
    fold: int | None = Field(None, ge=0)
    folds: int | None = Field(None, ge=2)
    # Validate after every N-th epoch and always after the last one (best checkpoint: among those).
    val_every: int = Field(1, ge=1)
    # The resumable `last` checkpoint is written after an epoch when this many minutes have passed
    # since the previous one, after the last epoch, with every new best, and on Ctrl-C; 0: every
    # epoch. Short GPU epochs (seconds) would otherwise spend much of their time writing weights.
    checkpoint_minutes: float = Field(5.0, ge=0, allow_inf_nan=False)
    # numpy and torch take seeds in [0, 2**32): a negative one is refused here, not deep in a split
    seed: int = Field(0, ge=0, lt=2**32)
    # Seed of the train/val or fold split (default: seed), so several training seeds can share one split.
    split_seed: int | None = Field(None, ge=0, lt=2**32)
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool = False
    # CUDA only: turn off cuDNN autotuning and TF32 matmuls for bit-stable reruns (slower).
    deterministic: bool = False
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    group_regex: str | None = None
    exclude: list[str] = Field(default_factory=list)
    decode: Literal["greedy", "best_leaf", "threshold"] = "greedy"
    threshold: float = Field(0.5, ge=0, le=1)
    num_workers: int = Field(0, ge=0)
    cache_dir: Path | None = None
    best_metric: Literal["val_hF", "val_accuracy", "val_loss"] = "val_hF"
    # Train although a decision of the tree has fewer than two children with training images.
    allow_incomplete_tree: bool = False
    # At the end of training, fit per-node temperatures on the validation images (hiercls calibrate).
    calibrate: bool = False

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"'{value}' is not a device; use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        return check_strategy(value)

    @field_validator("group_regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        return check_regex(value)

    @model_validator(mode="after")
    def _split(self) -> FitConfig:
        if (self.fold is None) != (self.folds is None):
            raise ValueError("fold and folds go together: give both (e.g. fold: 0, folds: 5) or neither")
        if self.folds is not None:
            if self.val_fraction is not None:
                raise ValueError("give either val_fraction or fold/folds, not both")
            if self.fold >= self.folds:  # type: ignore[operator]
                raise ValueError(f"fold must be in [0, {self.folds}), got {self.fold}")
        if self.calibrate and self.val_fraction == 0:
            raise ValueError("calibrate fits temperatures on the validation images, but val_fraction is 0: "
                             "give a validation split or leave calibrate out")
        return self

    # -- derived values ----------------------------------------------------------------

    @property
    def effective_val_fraction(self) -> float:
        return 0.2 if self.val_fraction is None else self.val_fraction

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML (absolute paths; options left at ``None`` are omitted)."""
        data = self.model_dump(mode="json", exclude_none=True)
        text = yaml.safe_dump(data, sort_keys=False)
        if path is not None:
            from hiercls.io import atomic_write_text

            atomic_write_text(path, text)
        return text


def read_config_file(path: Path) -> dict[str, Any]:
    """The options of a YAML config file as a dict, with its relative paths made absolute."""
    text = read_user_text(path, "config file", ConfigError)
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_error_message(path, exc)) from None
    except YamlTooLarge as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of option: value, got {type(data).__name__}")
    for key in PATH_OPTIONS:  # paths in a file are relative to the file
        value = data.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            data[key] = str((path.parent / value).resolve())
    return data


def _option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _format_error(error: ValidationError, yaml_path: Path | None, overrides: dict[str, Any]) -> str:
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"]]
    option = ".".join(loc) if loc else ""
    top = loc[0] if loc else ""
    if top and top in overrides:
        where = f"command-line option {_option_flag(top)}"
    elif yaml_path is not None and top:
        where = f"{yaml_path}: option '{option}'"
    elif top:
        where = f"option '{option}'"
    else:
        where = str(yaml_path) if yaml_path else "config"
    kind = first["type"]
    if kind == "extra_forbidden":
        parent = FitConfig if len(loc) == 1 else AugmentConfig
        valid = ", ".join(parent.model_fields)
        message = f"unknown option; valid options are: {valid}"
    elif kind == "missing":
        message = f"is required; give {_option_flag(top)} on the command line or '{top}:' in the config file"
    else:
        message = first["msg"].removeprefix("Value error, ")
        if "input" in first and kind not in ("model_type",) and not isinstance(first["input"], dict):
            message += f" (got {first['input']!r})"
    more = f" (and {len(error.errors()) - 1} more problems)" if len(error.errors()) > 1 else ""
    return f"{where}: {message}{more}"


def load_config(yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FitConfig:
    """Build a ``FitConfig`` from a YAML file (optional) and explicit overrides.

    ``overrides`` holds only options the user actually gave (``None`` values are ignored),
    so a command-line default never hides a value from the file. ``augment`` overrides are
    merged into the file's ``augment`` section. Any invalid value raises ``ConfigError``
    naming the file or command-line option and the accepted values.
    """
    path = Path(yaml_path) if yaml_path is not None else None
    data = read_config_file(path) if path is not None else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key, value in given.items():
        if key == "augment" and isinstance(value, dict) and isinstance(data.get("augment"), dict):
            data["augment"] = {**data["augment"], **value}
        else:
            data[key] = value
    if data.get("fold") is not None or data.get("folds") is not None:
        # An explicit fold on the command line replaces a file's val_fraction (and vice versa).
        if ("fold" in given or "folds" in given) and "val_fraction" not in given:
            data.pop("val_fraction", None)
        elif "val_fraction" in given and "fold" not in given and "folds" not in given:
            data.pop("fold", None)
            data.pop("folds", None)
    try:
        return FitConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, path, given)) from None
