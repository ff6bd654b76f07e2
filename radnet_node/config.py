"""``radnet_node.toml`` -> one frozen, validated settings object; a bad key or value is a
:class:`~radnet_node.errors.ConfigError` that names it.

Sections read so far: ``[model]`` and ``[series]``. The node adds its own sections (``[node]``,
``[audit]``, ``[[destinations]]``, ``[logging]``) as fields of :class:`Settings`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from radnet_node.engine import EngineSettings
from radnet_node.errors import ConfigError

__all__ = ["ModelSection", "SeriesSection", "Settings", "load_settings"]


class _Section(BaseModel):
    """Frozen, and an unknown key is an error (a typo must not be silently ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSection(_Section):
    """``[model]``: which weights, where they run, and the decision rule."""

    weights: str = "shipped"
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    min_consecutive_slices: Annotated[int, Field(ge=1, strict=True)] | None = None
    threads: Annotated[int, Field(ge=1, strict=True)] | None = None
    chunk_slices: Annotated[int, Field(ge=1, strict=True)] | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        text = value.strip().lower()
        if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
            return text
        raise ValueError(f"{value!r} is not auto, cpu, cuda or cuda:N")


class SeriesSection(_Section):
    """``[series]``: which series are run."""

    min_slices: Annotated[int, Field(ge=1, strict=True)] | None = None


class Settings(_Section):
    """The whole configuration; every section has defaults, so an empty file is valid."""

    model: ModelSection = ModelSection()
    series: SeriesSection = SeriesSection()

    def engine_settings(self) -> EngineSettings:
        """The engine's settings from ``[model]`` and ``[series]``."""
        return EngineSettings(
            weights=self.model.weights,
            device=self.model.device,
            precision=self.model.precision,
            threshold=self.model.threshold,
            min_consecutive_slices=self.model.min_consecutive_slices,
            min_slices=self.series.min_slices,
            threads=self.model.threads,
            chunk_slices=self.model.chunk_slices,
        )


def load_settings(path: str | Path | None) -> Settings:
    """Read and validate a TOML configuration file (``None``: the built-in defaults).

    A relative ``model.weights`` path is taken relative to the file's folder, so a config and its
    weights can move together.

    Parameters
    ----------
    path
        The TOML file, or ``None``.

    Returns
    -------
    Settings

    Raises
    ------
    ConfigError
        The file cannot be read, is not TOML, or a key is unknown or has an invalid value; the
        message names the file and the key (``model.threshold: ...``).
    """
    if path is None:
        return Settings()
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the configuration ({exc.strerror or exc})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: not valid TOML ({exc})") from exc
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{file}: {key}: {message}{more}") from exc
    weights = settings.model.weights
    if weights != "shipped" and not Path(weights).is_absolute():
        model = settings.model.model_copy(update={"weights": str(file.parent / weights)})
        settings = settings.model_copy(update={"model": model})
    return settings
