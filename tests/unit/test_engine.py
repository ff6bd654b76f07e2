"""The engine: verified loading, deterministic batched inference, slice order, mask and volume on
the source grid, decision-rule overrides. Tiny exported weights and a 64 px grid keep it fast."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from radnet_node.engine import (
    BF16_TOLERANCE,
    Engine,
    EngineSettings,
    cpu_supports_bf16,
    hemorrhage_volume_ml,
    prepare_hu,
)
from radnet_node.errors import ConfigError, UnsupportedImageError
from radnet_node.model import RADnet, build_model
from radnet_node.postprocess import ct_decision
from radnet_node.preprocess import PreparedSeries, PreprocessSpec, prepare_hu_volume, read_hu_slices
from radnet_node.preprocess import prepare_series as prepare_dicom_series
from radnet_node.weights import export_weights
from training.dicom_writer import SeriesGeometry

TINY = {"layers_per_block": 1, "growth_rate": 4, "stem_channels": 4, "lstm_hidden": 4}
SPEC = PreprocessSpec(pixel_spacing_mm=4.0, field_of_view_mm=256.0, min_slices=3)  # 64 px
SOURCE_SPACING = (3.2, 3.2)  # 80 px source images cover the same 256 mm


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _export(
    directory: Path,
    variant: str = "radnet",
    model: RADnet | None = None,
    min_positive_extent_mm: float | None = None,
) -> Path:
    torch.manual_seed(0)
    model = model or build_model(variant, input_size=64, **TINY)  # type: ignore[arg-type]
    out = directory / f"{variant}.pt"
    export_weights(
        model,
        out,
        name="radnet-tiny-test",
        version="0.0.1",
        preprocess=SPEC,
        threshold=0.5,
        min_consecutive_slices=3,
        training_data={"description": "none: random weights"},
        training={},
        metrics={},
        limitations=["test only"],
        min_positive_extent_mm=min_positive_extent_mm,
    )
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("weights"))


def _engine(weights: Path, **overrides: object) -> Engine:
    settings = {"weights": weights, "device": "cpu", "precision": "fp32", **overrides}
    return Engine(EngineSettings(**settings))  # type: ignore[arg-type]


def _series(
    seed: int, n: int = 6, *, positions: list[float] | None = None, uid: str = "1.2.3"
) -> PreparedSeries:
    """A head of brain and skull with a different bright blob on every slice."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:80, :80]
    radius = np.hypot(yy - 39.5, xx - 39.5)
    hu = np.full((n, 80, 80), -1000.0, dtype=np.float32)
    hu[:, radius < 30] = 1000.0
    hu[:, radius < 27] = 30.0
    for k in range(n):
        cy, cx = rng.uniform(25, 55, size=2)
        hu[k][np.hypot(yy - cy, xx - cx) < rng.uniform(2, 8)] = 70.0
    return prepare_hu_volume(
        hu,
        SOURCE_SPACING,
        SPEC,
        normal_positions_mm=positions or [5.0 * k for k in range(n)],
        study_instance_uid="1.2",
        series_instance_uid=uid,
    )


def test_engine_loads_card_and_applies_overrides(weights: Path) -> None:
    engine = _engine(weights, threshold=0.3, min_consecutive_slices=2, min_slices=4)
    assert engine.threshold == 0.3
    assert engine.min_consecutive == 2
    assert engine.spec.min_slices == 4
    assert engine.spec.matrix_size == 64
    assert engine.model_info.name == "radnet-tiny-test"
    assert len(engine.model_info.sha256) == 64
    result = engine.run([_series(1)])[0]
    assert result.threshold == 0.3
    assert result.min_consecutive == 2
    assert result.ct_positive == ct_decision(result.slice_probabilities, 0.3, 2)


def test_results_are_deterministic(weights: Path) -> None:
    engine = _engine(weights)
    series = _series(2)
    first, second = engine.run([series])[0], engine.run([series])[0]
    np.testing.assert_array_equal(first.slice_probabilities, second.slice_probabilities)
    np.testing.assert_array_equal(first.hemorrhage_mask, second.hemorrhage_mask)
    assert first.certainty == second.certainty


def test_batch_of_two_series_equals_two_single_runs(weights: Path) -> None:
    a, b = _series(3, n=5, uid="1.2.3.1"), _series(4, n=7, uid="1.2.3.2")
    single = _engine(weights, chunk_slices=1)
    # chunks of 4 slices cross the boundary between the two series
    batched = _engine(weights, chunk_slices=4).run([a, b])
    alone = [single.run([a])[0], single.run([b])[0]]
    for together, apart in zip(batched, alone, strict=True):
        assert together.series is apart.series
        np.testing.assert_allclose(
            together.slice_probabilities, apart.slice_probabilities, atol=1e-5
        )
        np.testing.assert_array_equal(together.hemorrhage_mask, apart.hemorrhage_mask)
    assert set(batched[0].timings_ms) == {"model", "postprocess"}


def test_probabilities_follow_source_slice_order(
    tmp_path: Path, head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> None:
    # Without the LSTM each slice's probability depends on that slice alone, so the engine's
    # output can be matched slice by slice against the model run on each prepared slice.
    engine = _engine(_export(tmp_path, "densenet_a"))
    geometry = SeriesGeometry(
        rows=80,
        columns=80,
        pixel_spacing_mm=SOURCE_SPACING,
        table_positions_mm=(0.0, 4.0, 9.0, 15.0, 22.0),
    )
    hu = head_hu((5, 80, 80), SOURCE_SPACING, radii_mm=(100.0, 90.0))
    for k in range(5):
        hu[k, 20 + 8 * k : 28 + 8 * k, 30:40] = 75.0  # a blob that moves with the slice
    paths = write_series(hu, geometry, "ordered", instance_numbers=[3, 5, 1, 4, 2])
    loaded = engine.load(paths[::-1])
    assert set(loaded.timings_ms) == {"read_decode", "preprocess"}
    result = engine.run([loaded])[0]
    positions = [s.image_position_mm[2] for s in result.series.slices]
    assert positions == sorted(positions)
    model = engine._model  # the same loaded weights
    with torch.no_grad():
        expected = [
            torch.sigmoid(
                model(torch.from_numpy(result.series.image[k : k + 1].copy())[None]).slice_logits
            ).item()
            for k in range(5)
        ]
    np.testing.assert_allclose(result.slice_probabilities, expected, atol=1e-5)
    assert len(set(np.round(expected, 6))) == 5  # distinct, so order matters
    assert set(result.timings_ms) == {"read_decode", "preprocess", "model", "postprocess"}


def _saturated_weights(
    directory: Path, slice_bias: float, min_positive_extent_mm: float | None = None
) -> Path:
    """A model whose finest aux head says "blood" everywhere and whose slice logit is fixed."""
    torch.manual_seed(0)
    model = build_model("radnet", input_size=64, **TINY)  # type: ignore[arg-type]
    with torch.no_grad():
        model.aux1.upsample.bias.fill_(50.0)
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(slice_bias)
    return _export(directory, "radnet", model, min_positive_extent_mm)


def test_positive_ct_mask_is_on_the_source_grid_with_its_volume(tmp_path: Path) -> None:
    engine = _engine(_saturated_weights(tmp_path, 20.0))
    series = _series(5, n=4, positions=[0.0, 5.0, 10.0, 20.0])
    result = engine.run([series])[0]
    assert result.ct_positive
    assert result.hemorrhage_mask.shape == (4, 80, 80)
    assert result.hemorrhage_mask.dtype == bool
    # the model grid covers the whole 256 mm source image: every source pixel is "blood"
    assert result.hemorrhage_mask.all()
    # spacing per slice: 5, 5, 7.5, 10 mm; 80 x 80 pixels of 3.2 x 3.2 mm
    expected_ml = 6400 * 3.2 * 3.2 * (5.0 + 5.0 + 7.5 + 10.0) / 1000.0
    assert result.hemorrhage_volume_ml == pytest.approx(expected_ml)


def test_negative_ct_has_an_empty_mask_even_where_the_head_fires(tmp_path: Path) -> None:
    engine = _engine(_saturated_weights(tmp_path, -20.0))
    result = engine.run([_series(6)])[0]
    assert not result.ct_positive
    assert result.certainty == pytest.approx(1.0)
    assert not result.hemorrhage_mask.any()
    assert result.hemorrhage_volume_ml == 0.0
    # every slice positive, but fewer than min_consecutive: negative, and the mask follows
    too_short = _engine(_saturated_weights(tmp_path, 20.0), min_consecutive_slices=7)
    result = too_short.run([_series(6, n=6)])[0]
    assert result.slice_positive.all()
    assert not result.ct_positive
    assert not result.hemorrhage_mask.any()


def test_min_positive_extent_asks_thin_series_for_more_slices(tmp_path: Path) -> None:
    weights = _saturated_weights(tmp_path, 20.0)  # every slice positive
    engine = _engine(weights, min_positive_extent_mm=14.0)
    assert engine.describe()["min_positive_extent_mm"] == 14.0
    # 5 mm slices: ceil(14 / 5) = 3, the paper's count; 6 positive slices suffice
    thick = engine.run([_series(6, n=6)])[0]
    assert thick.min_consecutive == 3
    assert thick.ct_positive
    # 2 mm slices: 7 slices are needed, 6 positive slices (12 mm) are not enough
    thin = engine.run([_series(6, n=6, positions=[2.0 * k for k in range(6)])])[0]
    assert thin.slice_positive.all()
    assert thin.min_consecutive == 7
    assert not thin.ct_positive
    assert not thin.hemorrhage_mask.any()
    # without the setting the same thin series is positive by the slice count alone
    assert (
        _engine(weights)
        .run([_series(6, n=6, positions=[2.0 * k for k in range(6)])])[0]
        .ct_positive
    )


def test_the_cards_millimetre_rule_applies_unless_the_settings_turn_it_off(tmp_path: Path) -> None:
    weights = _saturated_weights(tmp_path, 20.0, min_positive_extent_mm=14.0)
    thin = _series(6, n=6, positions=[2.0 * k for k in range(6)])  # 6 positive slices of 2 mm
    by_card = _engine(weights)
    assert by_card.describe()["min_positive_extent_mm"] == 14.0
    result = by_card.run([thin])[0]
    assert (result.min_consecutive, result.ct_positive) == (7, False)
    # a setting overrides the card; 0 turns the rule off (the slice count alone)
    assert _engine(weights, min_positive_extent_mm=10.0).run([thin])[0].ct_positive  # 5 slices
    off = _engine(weights, min_positive_extent_mm=0.0)
    assert off.describe()["min_positive_extent_mm"] is None
    result = off.run([thin])[0]
    assert (result.min_consecutive, result.ct_positive) == (3, True)


def test_hemorrhage_volume_against_a_hand_computed_mask() -> None:
    mask = np.zeros((3, 10, 10), dtype=bool)
    mask[0, :5, :4] = True  # 20 px
    mask[2, 0, :3] = True  # 3 px
    volume = hemorrhage_volume_ml(mask, (0.5, 0.4), np.array([2.0, 9.0, 4.0]))
    assert volume == pytest.approx((20 * 0.2 * 2.0 + 3 * 0.2 * 4.0) / 1000.0)
    assert hemorrhage_volume_ml(np.zeros((2, 3, 3), bool), (1.0, 1.0), np.full(2, np.nan)) == 0.0
    with pytest.raises(ValueError, match="disagree"):
        hemorrhage_volume_ml(mask, (1.0, 1.0), np.ones(2))


def test_prepare_hu_matches_prepare_series(
    head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> None:
    geometry = SeriesGeometry(
        rows=80,
        columns=80,
        pixel_spacing_mm=SOURCE_SPACING,
        table_positions_mm=(0.0, 3.0, 5.0, 10.0),
        gantry_tilt_deg=15.0,
    )
    paths = write_series(head_hu((4, 80, 80), SOURCE_SPACING), geometry, "tilted")
    reference = prepare_dicom_series(paths, SPEC)
    ours = prepare_hu(read_hu_slices(paths, SPEC), SPEC)
    np.testing.assert_array_equal(ours.image, reference.image)
    np.testing.assert_array_equal(ours.model_to_source, reference.model_to_source)
    for name in (
        "slices",
        "image_orientation",
        "normal_positions_mm",
        "slice_thickness_mm",
        "source_shape",
        "source_pixel_spacing_mm",
        "study_instance_uid",
        "series_instance_uid",
    ):
        assert getattr(ours, name) == getattr(reference, name), name


def test_prepare_hu_refuses_a_sagittal_series(
    head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> None:
    geometry = SeriesGeometry(
        rows=80, columns=80, pixel_spacing_mm=SOURCE_SPACING, table_positions_mm=(0.0, 3.0, 6.0)
    )
    hu_series = read_hu_slices(write_series(head_hu((3, 80, 80), SOURCE_SPACING), geometry), SPEC)
    sagittal = type(hu_series)(**{**hu_series.__dict__, "image_orientation": (0, 1, 0, 0, 0, -1)})
    with pytest.raises(UnsupportedImageError, match="not an axial series"):
        prepare_hu(sagittal, SPEC)


def test_series_prepared_for_another_grid_is_refused(weights: Path) -> None:
    other = prepare_hu_volume(
        np.zeros((3, 40, 40), np.float32), (1.0, 1.0), PreprocessSpec(min_slices=1)
    )
    with pytest.raises(ValueError, match="model expects 64 x 64"):
        _engine(weights).run([other])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"device": "gpu"}, "device"),
        ({"precision": "fp16"}, "precision"),
        ({"threshold": 1.0}, "threshold"),
        ({"min_consecutive_slices": 0}, "min_consecutive_slices"),
        ({"min_positive_extent_mm": -2.0}, "min_positive_extent_mm"),
        ({"min_positive_extent_mm": float("nan")}, "min_positive_extent_mm"),
        ({"chunk_slices": True}, "chunk_slices"),
    ],
)
def test_invalid_settings_name_the_field(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EngineSettings(**overrides)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error(weights: Path) -> None:
    with pytest.raises(ConfigError, match="no CUDA device"):
        Engine(EngineSettings(weights=weights, device="cuda:0"))


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")
def test_bf16_stays_within_the_stated_tolerance_of_fp32(weights: Path) -> None:
    series = _series(7)
    fp32 = _engine(weights).run([series])[0]
    bf16 = _engine(weights, precision="bf16").run([series])[0]
    difference = np.abs(fp32.slice_probabilities - bf16.slice_probabilities).max()
    assert difference <= BF16_TOLERANCE
