"""The training configuration: one TOML file validated once into a frozen pydantic object.

``training/default_train.toml`` holds the paper's recipe; a user's file only needs the keys it
changes. An unknown key or a bad value stops the run with a ConfigError naming the key.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from radnet_node.errors import ConfigError
from radnet_node.preprocess import PreprocessSpec

DEFAULT_CONFIG_NAME = "default_train.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    """Network: variant and the RadnetConfig hyper-parameters (see radnet_node.model)."""

    variant: Literal["densenet", "densenet_a", "radnet"] = "radnet"
    growth_rate: int = Field(default=12, ge=1)
    layers_per_block: int = Field(default=12, ge=1)
    stem_channels: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    lstm_hidden: int = Field(default=128, ge=1)


class PreprocessSection(_Section):
    """Model input geometry and window (radnet_node.preprocess.PreprocessSpec)."""

    window_level_hu: float = 40.0
    window_width_hu: float = Field(default=80.0, gt=0.0)
    pixel_spacing_mm: float = Field(default=1.0, gt=0.0)
    field_of_view_mm: float = Field(default=250.0, gt=0.0)
    min_slices: int = Field(default=5, ge=1)
    # optional shoulder: above the knee the window rises more slowly, reaching 1 at the ceiling
    window_knee_hu: float | None = None
    window_ceiling_hu: float | None = None

    @model_validator(mode="after")
    def _shoulder(self) -> PreprocessSection:
        # the same checks as the spec the run will build, reported as this section's error
        PreprocessSpec(**self.model_dump())
        return self


class DataSection(_Section):
    """Where the cases come from and how they are split."""

    specs: tuple[str, ...] = ()
    cache_dir: str | None = None
    max_cases: int | None = Field(default=None, ge=2)
    train_fraction: float = Field(default=0.7, gt=0.0, lt=1.0)
    # split.json of an earlier run: its cases stay on their side, only new cases are split
    keep_split: str | None = None

    @model_validator(mode="after")
    def _keep_split_alone(self) -> DataSection:
        if self.keep_split is not None and self.max_cases is not None:
            raise ValueError("keep_split and max_cases cannot be combined")
        return self


class OptimSection(_Section):
    """SGD with momentum and the paper's step schedule (lr / 10 after 1/3 and 2/3 of the epochs).

    ``optimizer = "adamw"`` (AdamW with ``lr`` and ``weight_decay``; ``momentum`` and ``nesterov``
    unused) is a departure from the paper for short CPU budgets, where SGD from scratch had not
    started to learn the slice task after ~1,300 steps; the step schedule is kept.
    """

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.01, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    nesterov: bool = False
    milestones: tuple[float, ...] = (1 / 3, 2 / 3)
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)
    grad_clip_norm: float | None = Field(default=None, gt=0.0)

    @model_validator(mode="after")
    def _milestones_are_fractions(self) -> OptimSection:
        if any(not 0.0 < m < 1.0 for m in self.milestones) or list(self.milestones) != sorted(
            self.milestones
        ):
            raise ValueError("milestones must be ascending fractions of the epochs, each in (0, 1)")
        return self


class LossSection(_Section):
    """Main slice BCE plus the weighted auxiliary segmentation losses."""

    main_weight: float = Field(default=1.0, gt=0.0)
    aux_weights: tuple[float, float, float] = (0.5, 0.3, 0.2)
    aux_dice: bool = True
    # A slice whose mask covers 1 to min_blood_pixels - 1 model pixels (mm^2 at 1 mm) is left out
    # of the slice loss (label unknown): a speck of partial-volume blood the image cannot show.
    # 0 = off.
    min_blood_pixels: int = Field(default=0, ge=0)
    # A positive slice whose known mask covers fewer than small_blood_pixels model pixels (mm^2 at
    # 1 mm) counts small_blood_weight times in the slice loss: small bleeds are most of the misses
    # of the shipped weights. 0 (or a weight of 1) = off.
    small_blood_pixels: int = Field(default=0, ge=0)
    small_blood_weight: float = Field(default=1.0, gt=0.0)

    @model_validator(mode="after")
    def _weights_non_negative(self) -> LossSection:
        if any(w < 0.0 for w in self.aux_weights):
            raise ValueError("aux_weights must be >= 0")
        return self


class AugmentSection(_Section):
    """Augmentation applied to every sampled sequence, and the class balancing of the sampler."""

    rotation_deg: float = Field(default=15.0, ge=0.0, le=180.0)
    hflip_probability: float = Field(default=0.5, ge=0.0, le=1.0)
    positive_sequence_fraction: float | None = Field(default=0.5, gt=0.0, lt=1.0)


class TrainSection(_Section):
    """Loop, sampling, evaluation and the compute settings."""

    epochs: int = Field(default=60, ge=1)
    sequence_length: int = Field(default=8, ge=1)
    batch_size: int = Field(default=1, ge=1)
    epoch_size: int | None = Field(default=None, ge=1)
    seed: int = 0
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    min_consecutive: int = Field(default=3, ge=1)
    # the positive run must also span this many mm (postprocess.slices_needed); None: slices only
    min_extent_mm: float | None = Field(default=None, gt=0.0)
    eval_chunk: int = Field(default=4, ge=1)
    val_every: int = Field(default=1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    threads: int | None = Field(default=None, ge=1)
    # processes that decode and preprocess the cases before training (cache misses cost a DICOM
    # decode and a resampling each); 1 = in the training process
    load_workers: int = Field(default=1, ge=1)
    image_dtype: Literal["float32", "float16"] = "float16"
    # Train the first crop_fraction of the epochs on crop_size x crop_size px crops (0 = never):
    # cheaper steps and a larger share of blood in the pooled features; see train.crop_batch.
    crop_size: int = Field(default=0, ge=0)
    crop_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    # Start from these weights instead of He initialisation (a fine-tuning stage): a radnet-train
    # checkpoint (.pt with its saved state) or exported weights with their model card. The
    # architecture must match exactly; optimizer and schedule start fresh.
    init_from: str | None = None
    # "head": train only the sequence head (LSTM and classifier, or the classifier of the LSTM-free
    # variants) on features of the frozen encoder (its batch-norm statistics frozen too; the
    # auxiliary heads are not trained): a cheap full-slice stage after crop training.
    trainable: Literal["all", "head"] = "all"


class TrainConfig(_Section):
    """The whole training configuration."""

    model: ModelSection = ModelSection()
    preprocess: PreprocessSection = PreprocessSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    loss: LossSection = LossSection()
    augment: AugmentSection = AugmentSection()
    train: TrainSection = TrainSection()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-compatible dict (tuples become lists)."""
        return self.model_dump(mode="json")


def _format_validation_error(error: ValidationError, source: str) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(x) for x in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        else:
            value = item.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            parts.append(f"'{key}': {item['msg']}{shown}")
    return f"{source}: " + "; ".join(parts)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate_config(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate a nested dict into a TrainConfig.

    Parameters
    ----------
    data : dict
        Sections as in the TOML file; missing keys take their defaults.
    source : str
        Name used in error messages (the file).

    Returns
    -------
    TrainConfig

    Raises
    ------
    ConfigError
        Naming every unknown key and every bad value.
    """
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None


def default_config_text() -> str:
    """The text of the packaged default_train.toml."""
    return resources.files("training").joinpath(DEFAULT_CONFIG_NAME).read_text(encoding="utf-8")


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read the default recipe, apply a user's TOML file and then command-line overrides.

    Parameters
    ----------
    path : Path or None
        A TOML file with the keys to change; ``None`` keeps the defaults.
    overrides : dict or None
        Nested dict (same sections) applied last, e.g. ``{"train": {"epochs": 2}}``.

    Returns
    -------
    TrainConfig

    Raises
    ------
    ConfigError
        If the file cannot be read or parsed, or a key or value is invalid.
    """
    data = tomllib.loads(default_config_text())
    source = DEFAULT_CONFIG_NAME
    if path is not None:
        source = str(path)
        try:
            user = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(
                f"{path}: cannot read the training config ({error.strerror})"
            ) from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML ({error})") from None
        data = _merge(data, user)
    if overrides:
        data = _merge(data, overrides)
    return validate_config(data, source)
