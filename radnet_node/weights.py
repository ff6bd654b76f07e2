"""Model weights and their model card: export, checksum verification and strict loading.

A weights file is a plain ``state_dict`` saved with ``torch.save``; its model card is a JSON file
beside it (same stem, ``.json``) that names the variant, the model and preprocessing configuration,
the decision threshold, the training data, the held-out metrics and the file's sha256. Loading
refuses a file whose checksum differs from its card and loads the state dict strictly.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from radnet_node.errors import WeightsError
from radnet_node.model import RADnet, RadnetConfig
from radnet_node.postprocess import slices_needed
from radnet_node.preprocess import PreprocessSpec

INTENDED_USE = (
    "Research and integration testing only; not a medical device. Not for diagnosis, triage or any "
    "clinical decision."
)
SHIPPED_WEIGHTS_NAME = "radnet.pt"


@dataclass(frozen=True)
class ModelCard:
    """What a weights file is, how it was made and how well it did on held-out data."""

    name: str
    version: str
    variant: str
    model_config: dict[str, Any]
    preprocess: dict[str, Any]
    threshold: float
    min_consecutive_slices: int
    sha256: str
    date: str
    intended_use: str = INTENDED_USE
    training_data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    limitations: list[str] = field(default_factory=list)
    # the decision rule's length of blood (postprocess.slices_needed); None: the slice count alone
    min_positive_extent_mm: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "model card") -> ModelCard:
        known = set(cls.__dataclass_fields__)
        missing = sorted(
            f
            for f, spec in cls.__dataclass_fields__.items()
            if f not in data and spec.default is MISSING and spec.default_factory is MISSING
        )
        if missing:
            raise WeightsError(f"{source}: missing required field(s) {', '.join(missing)}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise WeightsError(f"{source}: unknown field(s) {', '.join(unknown)}")
        try:
            card = cls(**dict(data))
            RadnetConfig.from_dict(card.model_config)
            PreprocessSpec(**card.preprocess)
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"{source}: {exc}") from exc
        if not 0.0 < float(card.threshold) < 1.0:
            raise WeightsError(f"{source}: threshold {card.threshold} is not in (0, 1)")
        try:
            slices_needed(card.min_consecutive_slices, card.min_positive_extent_mm, math.nan)
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"{source}: {exc}") from exc
        return card

    @property
    def radnet_config(self) -> RadnetConfig:
        return RadnetConfig.from_dict(self.model_config)

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        return PreprocessSpec(**self.preprocess)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_weights_path() -> Path:
    """Path of the weights file shipped inside the package."""
    return Path(str(resources.files("radnet_node") / "weights" / SHIPPED_WEIGHTS_NAME))


def card_path_for(weights: Path) -> Path:
    return weights.with_suffix(".json")


def resolve_weights(weights: str | Path | None) -> Path:
    """``None`` or ``"shipped"`` -> the shipped file; anything else is a path that must exist."""
    path = shipped_weights_path() if weights in (None, "shipped") else Path(weights)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    return path


def read_model_card(weights: Path) -> ModelCard:
    card_path = card_path_for(weights)
    if not card_path.is_file():
        raise WeightsError(f"{card_path}: model card not found beside weights {weights.name}")
    try:
        data = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{card_path}: cannot read model card: {exc}") from exc
    if not isinstance(data, dict):
        raise WeightsError(f"{card_path}: model card is not a JSON object")
    return ModelCard.from_dict(data, source=str(card_path))


def load_model(
    weights: str | Path | None = None, *, map_location: str | torch.device = "cpu"
) -> tuple[RADnet, ModelCard]:
    """Load a weights file after checking it against its model card.

    Raises
    ------
    WeightsError
        The file or card is missing or malformed, the sha256 differs from the card, or the state
        dict does not match the architecture the card names (strict load).
    """
    path = resolve_weights(weights)
    card = read_model_card(path)
    actual = sha256_of(path)
    if actual != card.sha256:
        raise WeightsError(
            f"{path}: sha256 {actual} does not match the model card ({card.sha256}); "
            "the file is corrupt or not the one the card describes"
        )
    model = RADnet(card.radnet_config)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged pickle
        raise WeightsError(f"{path}: cannot read weights: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path}: weights do not match variant {card.variant!r}: {exc}") from exc
    model.eval()
    return model, card


def export_weights(
    model: RADnet,
    out: Path,
    *,
    name: str,
    version: str,
    preprocess: PreprocessSpec,
    threshold: float,
    min_consecutive_slices: int,
    training_data: Mapping[str, Any],
    training: Mapping[str, Any],
    metrics: Mapping[str, Any],
    limitations: list[str],
    min_positive_extent_mm: float | None = None,
) -> ModelCard:
    """Write ``model``'s state dict to ``out`` and its model card beside it, both atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
        for k, v in model.state_dict().items()
    }
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".tmp", delete=False) as tmp:
        torch.save(state, tmp)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600; a weights file is not a secret
    os.replace(tmp.name, out)
    card = ModelCard(
        name=name,
        version=version,
        variant=model.config.variant,
        model_config=model.config.to_dict(),
        preprocess=preprocess.to_dict(),
        threshold=float(threshold),
        min_consecutive_slices=int(min_consecutive_slices),
        sha256=sha256_of(out),
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        training_data=dict(training_data),
        training=dict(training),
        metrics=dict(metrics),
        limitations=list(limitations),
        min_positive_extent_mm=(
            None if min_positive_extent_mm is None else float(min_positive_extent_mm)
        ),
    )
    card_tmp = card_path_for(out).with_suffix(".json.tmp")
    card_tmp.write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(card_tmp, card_path_for(out))
    return card
