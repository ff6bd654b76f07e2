"""Weights export and loading: the checksum in the model card is verified and loading is strict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from radnet_node.errors import WeightsError
from radnet_node.model import build_model
from radnet_node.preprocess import PreprocessSpec
from radnet_node.weights import ModelCard, export_weights, load_model, read_model_card

TINY = {
    "layers_per_block": 1,
    "growth_rate": 4,
    "stem_channels": 4,
    "lstm_hidden": 4,
    "input_size": 32,
}


def _export(tmp_path: Path, variant: str = "radnet") -> tuple[Path, ModelCard]:
    torch.manual_seed(0)
    model = build_model(variant, **TINY)  # type: ignore[arg-type]
    out = tmp_path / "w" / "model.pt"
    card = export_weights(
        model,
        out,
        name="radnet-test",
        version="0.0.1",
        preprocess=PreprocessSpec(field_of_view_mm=64, pixel_spacing_mm=2.0),
        threshold=0.5,
        min_consecutive_slices=3,
        training_data={"description": "none"},
        training={"epochs": 0},
        metrics={},
        limitations=["test only"],
    )
    return out, card


def test_exported_weights_load_strictly_and_reproduce_outputs(tmp_path: Path) -> None:
    out, card = _export(tmp_path)
    model, loaded_card = load_model(out)
    assert loaded_card == card
    assert loaded_card.preprocess_spec.matrix_size == 32
    torch.manual_seed(0)
    reference = build_model("radnet", **TINY)  # type: ignore[arg-type]
    reference.eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x).slice_logits, reference(x).slice_logits)


def test_a_modified_weights_file_is_refused_by_checksum(tmp_path: Path) -> None:
    out, _ = _export(tmp_path)
    data = bytearray(out.read_bytes())
    data[-10] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        load_model(out)


def test_a_card_naming_another_variant_fails_the_strict_load(tmp_path: Path) -> None:
    out, _ = _export(tmp_path, "densenet_a")
    card_path = out.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["model_config"]["variant"] = "radnet"  # the file has no LSTM weights
    card_path.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="do not match"):
        load_model(out)


def test_missing_card_and_unknown_fields_are_named(tmp_path: Path) -> None:
    out, _ = _export(tmp_path)
    card_path = out.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["surprise"] = 1
    card_path.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="unknown field.*surprise"):
        read_model_card(out)
    del card["surprise"], card["sha256"]
    card_path.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="missing required field.*sha256"):
        read_model_card(out)
    card_path.unlink()
    with pytest.raises(WeightsError, match="model card not found"):
        load_model(out)
    with pytest.raises(WeightsError, match="weights file not found"):
        load_model(tmp_path / "nope.pt")


def test_the_cards_millimetre_rule_is_optional_and_checked(tmp_path: Path) -> None:
    out, card = _export(tmp_path)
    assert card.min_positive_extent_mm is None  # cards written before the rule still load
    card_path = out.with_suffix(".json")
    data = json.loads(card_path.read_text())
    data["min_positive_extent_mm"] = 14.0
    card_path.write_text(json.dumps(data))
    assert read_model_card(out).min_positive_extent_mm == 14.0
    data["min_positive_extent_mm"] = -1.0
    card_path.write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="model.json: min_extent_mm must be a positive number"):
        read_model_card(out)
