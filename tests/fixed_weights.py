"""RADnet weights with a model card whose CT-level answer is known in advance, for tests and
benchmarks (not a trained model): the slice classifier is fixed (weight 0, bias ``slice_bias``) so
every slice scores sigmoid(slice_bias); the rest of the network keeps its random initialisation.

One writer for the unit tests, the integration tests and the benchmarks (which put ``tests/`` on
``sys.path``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: a RADnet small enough to run 28 slices in well under a second on one core
TINY_MODEL: dict[str, Any] = {
    "layers_per_block": 1,
    "growth_rate": 4,
    "stem_channels": 4,
    "lstm_hidden": 4,
}
#: sigmoid(5) = 0.993: every slice positive; -5: every slice negative
POSITIVE_BIAS = 5.0


def write_fixed_weights(
    out: Path,
    *,
    model: Mapping[str, Any] | None = None,
    slice_bias: float = POSITIVE_BIAS,
    field_of_view_mm: float = 250.0,
    name: str = "radnet-test",
) -> Path:
    """Export fixed-answer weights and their model card to ``out``; returns ``out``.

    ``model``: :func:`radnet_node.model.build_model` overrides (default :data:`TINY_MODEL` at a
    64 px input; ``{}`` is the full-size RADnet). The preprocessing covers ``field_of_view_mm`` at
    the model's input size.
    """
    import torch  # noqa: PLC0415 - only what makes weights needs torch

    from radnet_node.model import build_model  # noqa: PLC0415
    from radnet_node.preprocess import PreprocessSpec  # noqa: PLC0415
    from radnet_node.weights import export_weights  # noqa: PLC0415

    overrides = dict(model) if model is not None else {"input_size": 64, **TINY_MODEL}
    torch.manual_seed(0)
    network = build_model("radnet", **overrides)
    with torch.no_grad():
        network.classifier.weight.zero_()
        network.classifier.bias.fill_(slice_bias)
    input_size = int(overrides.get("input_size", 250))
    out.parent.mkdir(parents=True, exist_ok=True)
    export_weights(
        network,
        out,
        name=name,
        version="0.0.1",
        preprocess=PreprocessSpec(
            pixel_spacing_mm=field_of_view_mm / input_size,
            field_of_view_mm=field_of_view_mm,
            min_slices=5,
        ),
        threshold=0.5,
        min_consecutive_slices=3,
        training_data={"description": "none: fixed classifier for tests"},
        training={},
        metrics={},
        limitations=["tests and benchmarks only"],
    )
    return out
