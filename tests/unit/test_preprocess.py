"""Tests of radnet_node.preprocess: generated series (every geometry trap) and real vendor DICOM."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.encaps import encapsulate

from radnet_node.errors import (
    DecodeError,
    DuplicatePositionError,
    InconsistentGeometryError,
    InputError,
    NoPixelDataError,
    SeriesError,
    TooFewSlicesError,
    UnsupportedImageError,
)
from radnet_node.preprocess import (
    PreparedSeries,
    PreprocessSpec,
    prepare_hu_volume,
    prepare_series,
    read_hu_slices,
    window,
)
from training.dicom_writer import SeriesGeometry, StudyInfo

ONE_SLICE = PreprocessSpec(min_slices=1)
TILTED_DIR = "dcm_qa_ct/Philips_Ingenuity_head_phantom/S21610/S2010"
FIVE_MM_DIR = "dcm_qa_ct/Philips_Ingenuity_head_phantom/S21570/S2010"


def _image_files(folder: Path) -> list[Path]:
    # The Philips folders also hold a non-DICOM DIRFILE; callers filter files, and so do we.
    return sorted(p for p in folder.iterdir() if p.name != "DIRFILE")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


def _model_px(prepared: PreparedSeries, source_row: float, source_col: float) -> np.ndarray:
    return np.linalg.inv(prepared.model_to_source) @ np.array([source_row, source_col, 1.0])


TILTED_GEOMETRY = SeriesGeometry(
    rows=96,
    columns=96,
    pixel_spacing_mm=(2.6, 2.6),
    table_positions_mm=(0.0, 3.0, 5.0, 10.0, 12.5, 20.0, 21.0, 30.0),
    slice_thickness_mm=2.0,
    gantry_tilt_deg=20.0,
)


@pytest.fixture
def tilted_series(
    head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> list[Path]:
    """8 slices, 96x96 at 2.6 mm, 20 degree tilt, uneven spacing, InstanceNumbers shuffled."""
    hu = head_hu((8, 96, 96), (2.6, 2.6), radii_mm=(80.0, 65.0))
    return write_series(hu, TILTED_GEOMETRY, "tilted", instance_numbers=[5, 2, 8, 1, 7, 3, 6, 4])


# ------------------------------------------------------------------------------------------------
# spec


def test_spec_defaults_give_250_px_and_round_trip_through_dict() -> None:
    spec = PreprocessSpec()
    assert spec.matrix_size == 250
    values = spec.to_dict()
    assert values == {
        "window_level_hu": 40.0,
        "window_width_hu": 80.0,
        "pixel_spacing_mm": 1.0,
        "field_of_view_mm": 250.0,
        "min_slices": 5,
    }
    assert PreprocessSpec(**values) == spec
    assert PreprocessSpec.from_dict({**values, "matrix_size": 250}) == spec
    with pytest.raises(ValueError, match="matrix_size"):
        PreprocessSpec.from_dict({**values, "matrix_size": 512})
    with pytest.raises(ValueError, match="window_width_hu"):
        PreprocessSpec(window_width_hu=0.0)


def test_window_maps_level_and_width_to_unit_range() -> None:
    hu = np.array([-1000.0, 0.0, 20.0, 40.0, 60.0, 80.0, 3000.0])
    expected = [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    np.testing.assert_allclose(window(hu, PreprocessSpec()), expected, atol=1e-6)
    custom = window(hu, PreprocessSpec(window_level_hu=50.0, window_width_hu=100.0))
    np.testing.assert_allclose(custom[2:5], [0.2, 0.4, 0.6], atol=1e-6)


def test_window_shoulder_keeps_blood_below_bone() -> None:
    hu = np.array([-1000.0, 20.0, 60.0, 70.0, 85.0, 100.0, 130.0, 1000.0])
    plain = window(hu, PreprocessSpec())
    spec = PreprocessSpec(window_knee_hu=70.0, window_ceiling_hu=130.0)
    shoulder = window(hu, spec)
    # unchanged up to the knee, then a flatter line from 0.875 to 1.0 at the ceiling
    np.testing.assert_allclose(shoulder[:4], plain[:4], atol=1e-6)
    np.testing.assert_allclose(shoulder[4:], [0.90625, 0.9375, 1.0, 1.0], atol=1e-6)
    # the plain window paints 85 HU blood and the skull the same white; the shoulder does not
    assert plain[4] == plain[7] == 1.0
    assert shoulder[4] < shoulder[5] < shoulder[7]
    assert spec.to_dict()["window_knee_hu"] == 70.0
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec


def test_window_shoulder_is_checked_and_left_out_of_old_cards() -> None:
    # a spec without a shoulder writes the same five keys as before it existed
    assert sorted(PreprocessSpec().to_dict()) == sorted(
        ["window_level_hu", "window_width_hu", "pixel_spacing_mm", "field_of_view_mm", "min_slices"]
    )
    with pytest.raises(ValueError, match="go together"):
        PreprocessSpec(window_knee_hu=70.0)
    with pytest.raises(ValueError, match="window_knee_hu < 80 < window_ceiling_hu"):
        PreprocessSpec(window_knee_hu=90.0, window_ceiling_hu=130.0)
    with pytest.raises(ValueError, match="got knee 70.0 and ceiling 75.0"):
        PreprocessSpec(window_knee_hu=70.0, window_ceiling_hu=75.0)


# ------------------------------------------------------------------------------------------------
# sorting, tilt, spacing


def test_sorts_along_normal_not_instance_number(
    head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> None:
    geometry = SeriesGeometry(
        rows=48, columns=48, pixel_spacing_mm=(5.0, 5.0), table_positions_mm=(0, 5, 10, 15, 20, 25)
    )
    hu = head_hu((6, 48, 48), (5.0, 5.0))
    brain = hu == 30.0
    # a different brain value per slice tells the slices apart after resampling
    for k in range(6):
        hu[k][brain[k]] = 5.0 + 10.0 * k
    numbers = [4, 6, 1, 3, 5, 2]
    paths = write_series(hu, geometry, "sorted", instance_numbers=numbers)
    shuffled = [paths[i] for i in (3, 0, 5, 1, 4, 2)]

    prepared = prepare_series(shuffled)

    assert prepared.normal_positions_mm == pytest.approx([0, 5, 10, 15, 20, 25])
    assert [s.path for s in prepared.slices] == [str(p) for p in paths]
    assert [s.instance_number for s in prepared.slices] == numbers
    centre = prepared.image[:, 125, 125]
    np.testing.assert_allclose(centre, window(5.0 + 10.0 * np.arange(6), prepared.spec), atol=1e-5)


def test_tilt_and_uneven_spacing_keep_true_positions(tilted_series: list[Path]) -> None:
    prepared = prepare_series(tilted_series[::-1])

    tilt = np.deg2rad(TILTED_GEOMETRY.gantry_tilt_deg)
    normal = np.array([0.0, np.sin(tilt), np.cos(tilt)])
    expected_ipp = [TILTED_GEOMETRY.image_position(k) for k in range(8)]
    assert [s.image_position_mm for s in prepared.slices] == [
        pytest.approx(p, abs=1e-4) for p in expected_ipp
    ]
    expected_positions = np.array(expected_ipp) @ normal
    np.testing.assert_allclose(prepared.normal_positions_mm, expected_positions, atol=1e-3)
    # uneven table steps, shortened by cos(tilt) along the normal
    gaps = np.diff(TILTED_GEOMETRY.table_positions_mm) * np.cos(tilt)
    np.testing.assert_allclose(np.diff(prepared.normal_positions_mm), gaps, atol=1e-3)
    spacing = prepared.slice_spacing_mm
    np.testing.assert_allclose(spacing[1:-1], (gaps[:-1] + gaps[1:]) / 2, atol=1e-3)
    assert spacing[0] == pytest.approx(gaps[0], abs=1e-3)
    assert spacing[-1] == pytest.approx(gaps[-1], abs=1e-3)
    assert prepared.slice_thickness_mm == 2.0
    assert prepared.image_orientation == pytest.approx(TILTED_GEOMETRY.image_orientation, abs=1e-6)
    assert prepared.image.shape == (8, 250, 250)
    assert prepared.image.dtype == np.float32
    assert not prepared.image.flags.writeable
    assert 0.0 <= prepared.image.min() and prepared.image.max() <= 1.0


# ------------------------------------------------------------------------------------------------
# mapping back to the source


@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_mask_round_trip_lands_on_same_source_pixels(
    tilted_series: list[Path], interpolation: str
) -> None:
    prepared = prepare_series(tilted_series)
    rows, cols = prepared.source_shape
    r = np.arange(rows)[:, None]
    c = np.arange(cols)[None, :]
    mask = np.zeros((8, rows, cols), dtype=bool)
    for k in range(8):  # a 10-pixel (26 mm) disc that moves from slice to slice
        mask[k] = (r - 35 - 3 * k) ** 2 + (c - 40 - 2 * k) ** 2 <= 10**2

    on_model = prepared.to_model_grid(mask, interpolation=interpolation)  # type: ignore[arg-type]
    back = prepared.to_source_grid(on_model, interpolation=interpolation)  # type: ignore[arg-type]

    assert on_model.shape == (8, 250, 250) and back.shape == (8, rows, cols)
    for k in range(8):
        assert _dice(back[k] > 0.5, mask[k]) > 0.95, f"slice {k}"


def test_round_trip_from_fine_source_pixels(
    head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> None:
    # 0.5 mm source pixels: the model grid is coarser than the source, as in real head CT
    geometry = SeriesGeometry(
        rows=200, columns=200, pixel_spacing_mm=(0.5, 0.5), table_positions_mm=(0, 5, 10, 15, 20)
    )
    hu = head_hu((5, 200, 200), (0.5, 0.5), radii_mm=(40.0, 35.0))
    prepared = prepare_series(write_series(hu, geometry, "fine"))
    r = np.arange(200)[:, None]
    c = np.arange(200)[None, :]
    mask = np.broadcast_to((r - 90) ** 2 + (c - 110) ** 2 <= 40**2, (5, 200, 200))
    back = prepared.to_source_grid(prepared.to_model_grid(mask))
    assert _dice(back > 0.5, mask) > 0.95


def test_known_source_pixel_maps_to_expected_model_pixel(
    head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> None:
    hu = head_hu((8, 96, 96), (2.6, 2.6), radii_mm=(80.0, 65.0), brain_hu=0.0, skull_hu=40.0)
    dot = (40, 57)
    hu[3, dot[0], dot[1]] = 80.0  # top of the window: the brightest point of slice 3
    prepared = prepare_series(write_series(hu, TILTED_GEOMETRY, "dot"))

    expected = _model_px(prepared, *dot)
    peak = np.unravel_index(np.argmax(prepared.image[3]), prepared.image[3].shape)
    assert peak == (round(expected[0]), round(expected[1]))
    assert prepared.image[3][peak] > 0.9
    # the model FOV centre is the head centre, in source pixels
    half = (prepared.spec.matrix_size - 1) / 2
    centre = prepared.model_to_source @ np.array([half, half, 1.0])
    assert tuple(centre[:2]) == pytest.approx(prepared.head_centre_px)
    # one model pixel is spec.pixel_spacing_mm; one source pixel is 2.6 mm
    assert prepared.model_to_source[0, 0] == pytest.approx(1.0 / 2.6)
    assert prepared.model_to_source[1, 1] == pytest.approx(1.0 / 2.6)
    # and the dot itself, put on the source grid, lands on the same model pixel
    source_dot = np.zeros((8, 96, 96), dtype=np.float32)
    source_dot[3, dot[0], dot[1]] = 1.0
    on_model = prepared.to_model_grid(source_dot)
    assert np.unravel_index(np.argmax(on_model[3]), on_model[3].shape) == peak
    assert on_model[[0, 1, 2, 4, 5, 6, 7]].max() == 0.0  # nothing leaks into other slices


def _reorient(paths: list[Path], out: Path, how: str) -> list[Path]:
    """Rewrite a head-first-supine series as ``how`` ("prone", "feet_first", "transposed") with the
    same anatomy at the same patient positions: new orientation, pixels moved to match, and
    ImagePositionPatient moved to the new first pixel."""
    out.mkdir()
    written = []
    for path in paths:
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array
        rows, cols = stored.shape
        dr, dc = (float(v) for v in ds.PixelSpacing)
        along_cols = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])
        along_rows = np.array([float(v) for v in ds.ImageOrientationPatient[3:]])
        first = np.array([float(v) for v in ds.ImagePositionPatient])
        if how == "prone":  # rows and columns both reversed
            stored = stored[::-1, ::-1]
            first = first + (cols - 1) * dc * along_cols + (rows - 1) * dr * along_rows
            along_cols, along_rows = -along_cols, -along_rows
        elif how == "feet_first":  # columns reversed (the patient's left is on the image left)
            stored = stored[:, ::-1]
            first = first + (cols - 1) * dc * along_cols
            along_cols = -along_cols
        else:  # transposed: image rows run along the patient's x, columns along y
            stored = stored.T
            along_cols, along_rows = along_rows, along_cols
            ds.PixelSpacing = [dc, dr]
            ds.Rows, ds.Columns = cols, rows
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*along_cols, *along_rows)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in first]
        target = out / path.name
        ds.save_as(target)
        written.append(target)
    return written


@pytest.mark.parametrize("how", ["prone", "feet_first", "transposed"])
def test_prone_feet_first_and_transposed_series_reach_the_model_head_first_supine(
    head_hu: Callable[..., np.ndarray],
    write_series: Callable[..., list[Path]],
    tmp_path: Path,
    how: str,
) -> None:
    # the model was trained on head-first-supine images: other patient positions are turned into
    # that display orientation, not fed upside down or mirrored
    geometry = SeriesGeometry(
        rows=96, columns=96, pixel_spacing_mm=(2.6, 2.6), table_positions_mm=(0, 5, 10, 15, 20, 25)
    )
    hu = head_hu((6, 96, 96), (2.6, 2.6), radii_mm=(80.0, 65.0), brain_hu=0.0, skull_hu=40.0)
    hu[2, 30, 55] = 80.0  # anterior, patient's left: the brightest point of slice 2
    hu[4, 62, 38] = 80.0  # posterior, patient's right: the brightest point of slice 4
    canonical = prepare_series(write_series(hu, geometry, "hfs"))
    variant = prepare_series(_reorient(write_series(hu, geometry, "src"), tmp_path / how, how))

    for k in (2, 4):
        want = np.unravel_index(np.argmax(canonical.image[k]), canonical.image[k].shape)
        got = np.unravel_index(np.argmax(variant.image[k]), variant.image[k].shape)
        # the head centre is searched on a ~2 mm grid, so the field of view may move a pixel or two
        assert np.abs(np.subtract(got, want)).max() <= 2, f"slice {k}: {got} vs {want}"
        # a one-pixel dot: where the model grid falls on it depends on the sampling phase
        assert variant.image[k][got] > 0.75
    # and the whole picture matches, not just two points
    assert np.abs(variant.image - canonical.image).mean() < 0.02

    # a mask drawn on the variant's own source pixels survives the round trip there
    rows, cols = variant.source_shape
    r = np.arange(rows)[:, None]
    c = np.arange(cols)[None, :]
    mask = np.broadcast_to((r - 40) ** 2 + (c - 50) ** 2 <= 10**2, (6, rows, cols))
    back = variant.to_source_grid(variant.to_model_grid(mask))
    assert _dice(back > 0.5, mask) > 0.95


def test_head_off_centre_with_table_ends_up_centred(
    head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> None:
    spacing = (0.9, 0.9)
    size = 256
    centre_mm = ((size - 1) * 0.9 / 2 - 30.0, (size - 1) * 0.9 / 2 - 40.0)  # 30 mm up, 40 mm left
    hu = head_hu(
        # the head rests on a thin table that spans the whole width
        (5, size, size),
        spacing,
        centre_mm=centre_mm,
        radii_mm=(70.0, 55.0),
        table_gap_mm=0.0,
    )
    geometry = SeriesGeometry(
        rows=size, columns=size, pixel_spacing_mm=spacing, table_positions_mm=(0, 5, 10, 15, 20)
    )
    prepared = prepare_series(write_series(hu, geometry, "offcentre"))

    true_centre_px = (centre_mm[0] / 0.9, centre_mm[1] / 0.9)
    # a sliver of table right under the skull survives the opening: allow 3 mm
    assert prepared.head_centre_px == pytest.approx(true_centre_px, abs=3.5)
    # the brain (30 HU -> 0.375) must sit in the middle of the 250 px grid (skull, table: 1.0)
    brain = np.abs(prepared.image[2] - window(np.array(30.0), prepared.spec)) < 0.02
    rows, cols = np.nonzero(brain)
    assert rows.mean() == pytest.approx(124.5, abs=3.5)
    assert cols.mean() == pytest.approx(124.5, abs=1.5)


# ------------------------------------------------------------------------------------------------
# HU and decoding


@pytest.mark.parametrize(
    "transfer_syntax",
    [
        uid.ExplicitVRLittleEndian,
        uid.ImplicitVRLittleEndian,
        uid.RLELossless,
        uid.JPEGLSLossless,
        uid.JPEG2000Lossless,
    ],
    ids=["explicit", "implicit", "rle", "jpeg-ls", "jpeg2000"],
)
def test_hu_from_signed_slope_intercept_series(
    write_series: Callable[..., list[Path]], transfer_syntax: str
) -> None:
    geometry = SeriesGeometry(
        rows=32, columns=32, pixel_spacing_mm=(8.0, 8.0), table_positions_mm=(0, 5, 10, 15, 20)
    )
    rng = np.random.default_rng(7)
    hu = rng.integers(-1000, 1500, size=(5, 32, 32)).astype(np.float64)
    hu[:, 8:24, 8:24] = 25.5  # a brain-window region
    paths = write_series(
        hu,
        geometry,
        "hu",
        signed=True,
        rescale_slope=0.5,
        rescale_intercept=-20.0,
        transfer_syntax=transfer_syntax,
    )

    series = read_hu_slices(paths)
    np.testing.assert_array_equal(series.hu, hu.astype(np.float32))

    prepared = prepare_series(paths)
    inside = prepared.image[:, 124, 124]  # the 128 mm field is centred: its middle is the square
    np.testing.assert_allclose(inside, (25.5 - 0.0) / 80.0, atol=1e-5)


def test_j2k_pixel_representation_mismatch_gives_plausible_hu(dicom_data_dir: Path) -> None:
    # Hitachi head slice: J2K stream unsigned, PixelRepresentation 1, BitsStored 13
    hu = read_hu_slices(
        [dicom_data_dir / "pylibjpeg-data/J2K_pixelrep_mismatch.dcm"], ONE_SLICE
    ).hu[0]
    assert np.mean((hu > -1100) & (hu < -900)) > 0.1  # air around the head
    assert 20.0 <= np.median(hu[300:380, 200:300]) <= 45.0  # cerebellum
    assert np.percentile(hu, 99) > 300.0  # skull
    assert hu.min() >= -2048.0 and hu.max() < 3000.0


def test_toshiba_signed_unsigned_j2k_variants_decode_alike(dicom_data_dir: Path) -> None:
    folder = dicom_data_dir / "pylibjpeg-data"
    signed = read_hu_slices([folder / "TOSHIBA_J2K_SIZ0_PixRep1.dcm"], ONE_SLICE).hu[0]
    # header says unsigned, codestream says signed: read as unsigned, air would be 63488 HU
    trap = read_hu_slices([folder / "TOSHIBA_J2K_SIZ1_PixRep0.dcm"], ONE_SLICE).hu[0]
    np.testing.assert_array_equal(trap, signed)
    assert trap.max() < 3000.0
    assert np.mean((trap > -200) & (trap < 200)) > 0.3  # soft tissue of the pelvis


def test_real_head_slice_lossless_j2k_equals_uncompressed(dicom_data_dir: Path) -> None:
    folder = dicom_data_dir / "pydicom-testfiles"
    raw = read_hu_slices([folder / "693_UNCR.dcm"], ONE_SLICE).hu
    j2k = read_hu_slices([folder / "693_J2KR.dcm"], ONE_SLICE).hu
    np.testing.assert_array_equal(raw, j2k)


@pytest.mark.parametrize(
    "name", ["CT1_JLSN.dcm", "JPEGLossless_1s_1f_i_16_16_bad.dcm"], ids=["jpeg-ls", "jpeg-lossless"]
)
def test_real_jpeg_ls_and_jpeg_lossless_slices_decode(dicom_data_dir: Path, name: str) -> None:
    path = dicom_data_dir / "pylibjpeg-data" / name
    series = read_hu_slices([path], ONE_SLICE)
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    # both files mark the outside of the scanned circle with PixelPaddingValue -2000: air
    assert ds.PixelPaddingValue == -2000
    expected[ds.pixel_array == -2000] = -1024.0
    np.testing.assert_array_equal(series.hu[0], expected.astype(np.float32))


def test_undecodable_pixel_data_names_file_and_transfer_syntax(
    tmp_path: Path, head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> None:
    geometry = SeriesGeometry(
        rows=32, columns=32, pixel_spacing_mm=(8.0, 8.0), table_positions_mm=(0, 5, 10, 15, 20)
    )
    paths = write_series(head_hu((5, 32, 32), (8.0, 8.0)), geometry, "corrupt")
    ds = pydicom.dcmread(paths[2])
    ds.file_meta.TransferSyntaxUID = uid.JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])  # SOC, SIZ marker, then rubbish
    ds["PixelData"].VR = "OB"
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken, enforce_file_format=True)

    with pytest.raises(DecodeError) as caught:
        prepare_series([*paths[:2], broken, *paths[3:]])
    assert str(broken) in str(caught.value)
    assert "JPEG 2000" in str(caught.value)
    assert caught.value.series == ds.SeriesInstanceUID


# ------------------------------------------------------------------------------------------------
# refusals


@pytest.fixture
def five_datasets(
    head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> list[pydicom.Dataset]:
    geometry = SeriesGeometry(
        rows=32, columns=32, pixel_spacing_mm=(8.0, 8.0), table_positions_mm=(0, 5, 10, 15, 20)
    )
    paths = write_series(head_hu((5, 32, 32), (8.0, 8.0)), geometry, "refusals")
    return [pydicom.dcmread(p) for p in paths]


@pytest.mark.parametrize(("implicit", "little"), [(True, True), (False, True)], ids=str)
def test_bare_datasets_without_file_meta_decode_as_they_were_written(
    five_datasets: list[pydicom.Dataset], tmp_path: Path, implicit: bool, little: bool
) -> None:
    # some exporters write the preamble and the dataset but no file meta group: the transfer
    # syntax is named nowhere, and pydicom only knows how it read the header
    reference = prepare_series(five_datasets)
    bare = []
    for k, ds in enumerate(five_datasets):
        path = tmp_path / f"bare{k}"
        raw = copy.deepcopy(ds)
        del raw.file_meta
        raw.preamble = b"\0" * 128
        raw.save_as(path, enforce_file_format=False, implicit_vr=implicit, little_endian=little)
        bare.append(path)
    assert not pydicom.dcmread(bare[0]).file_meta.get("TransferSyntaxUID")

    prepared = prepare_series(bare)
    np.testing.assert_array_equal(prepared.image, reference.image)


@pytest.mark.parametrize("limit", [None, 65000])
def test_pixel_padding_becomes_air_not_tissue(
    five_datasets: list[pydicom.Dataset], limit: int | None
) -> None:
    # unsigned 63536 is -2000 written as unsigned: rescaled like tissue it would be +62,512 HU
    reference = read_hu_slices(copy.deepcopy(five_datasets)).hu
    for ds in five_datasets:
        pixels = ds.pixel_array.copy()
        pixels[:3, :3] = 63536
        pixels[-3:, -3:] = 64000
        ds.PixelData = pixels.tobytes()
        ds.PixelPaddingValue = 63536
        if limit is not None:
            ds.PixelPaddingRangeLimit = limit
    hu = read_hu_slices(five_datasets).hu
    assert (hu[:, :3, :3] == -1024.0).all()
    if limit is None:  # 64000 is not padding then: it stays what the rescale makes of it
        assert (hu[:, -3:, -3:] == 64000 - 1024).all()
    else:
        assert (hu[:, -3:, -3:] == -1024.0).all()
    np.testing.assert_array_equal(hu[:, 3:-3, 3:-3], reference[:, 3:-3, 3:-3])  # the rest as it was


def _mixed_orientation(datasets: list[pydicom.Dataset]) -> None:
    a = np.deg2rad(10.0)
    datasets[3].ImageOrientationPatient = [np.cos(a), np.sin(a), 0.0, -np.sin(a), np.cos(a), 0.0]


def _mixed_size(datasets: list[pydicom.Dataset]) -> None:
    datasets[1].Rows = datasets[1].Columns = 16
    datasets[1].PixelData = np.zeros((16, 16), dtype=np.uint16).tobytes()


def _duplicate_position(datasets: list[pydicom.Dataset]) -> None:
    datasets[4].ImagePositionPatient = datasets[2].ImagePositionPatient


def _no_pixel_data(datasets: list[pydicom.Dataset]) -> None:
    del datasets[0].PixelData


def _mr_modality(datasets: list[pydicom.Dataset]) -> None:
    for ds in datasets:
        ds.Modality = "MR"


def _mr_sop_class(datasets: list[pydicom.Dataset]) -> None:
    for ds in datasets:
        ds.SOPClassUID = uid.MRImageStorage


def _two_stacks(datasets: list[pydicom.Dataset]) -> None:
    x, y, z = (float(v) for v in datasets[2].ImagePositionPatient)
    datasets[2].ImagePositionPatient = [x + 30.0, y, z]  # a second field of view mixed in


def _decimal_comma(datasets: list[pydicom.Dataset]) -> None:
    datasets[1].add_new(0x00281053, "LO", "1,0")  # RescaleSlope as some locales write it
    datasets[1][0x00281053].VR = "DS"


def _two_slopes(datasets: list[pydicom.Dataset]) -> None:
    datasets[0].RescaleSlope = [1, 1]


def _nan_position(datasets: list[pydicom.Dataset]) -> None:
    x, y, _ = datasets[2].ImagePositionPatient
    datasets[2].ImagePositionPatient = [x, y, float("nan")]


def _slope_zero(datasets: list[pydicom.Dataset]) -> None:
    for ds in datasets:
        ds.RescaleSlope = 0


def _no_study_uid(datasets: list[pydicom.Dataset]) -> None:
    for ds in datasets:
        del ds.StudyInstanceUID


def _no_sop_uid(datasets: list[pydicom.Dataset]) -> None:
    del datasets[3].SOPInstanceUID


def _rows_not_the_pixel_data(datasets: list[pydicom.Dataset]) -> None:
    for ds in datasets:  # 32 x 32 pixels, described as 32 x 16: pydicom would cut half away
        ds.Columns = 16


def _stored_as_hu_plus_1024(datasets: list[pydicom.Dataset]) -> None:
    for ds in datasets:  # air at about 0 "HU": data written as HU + 1024 with the old intercept
        ds.RescaleIntercept = float(ds.RescaleIntercept) + 1024


def _constant_image(datasets: list[pydicom.Dataset]) -> None:
    for ds in datasets:
        ds.PixelData = np.full((ds.Rows, ds.Columns), 24, ds.pixel_array.dtype).tobytes()


@pytest.mark.parametrize(
    ("damage", "error", "words"),
    [
        (_decimal_comma, UnsupportedImageError, "RescaleSlope '1,0' is not a finite decimal"),
        (_two_slopes, UnsupportedImageError, "RescaleSlope '1.0\\\\1.0' has 2 value\\(s\\), not 1"),
        (_nan_position, InconsistentGeometryError, "ImagePositionPatient .* is not a finite"),
        (_slope_zero, UnsupportedImageError, "RescaleSlope is 0"),
        (_no_study_uid, SeriesError, "no StudyInstanceUID"),
        (_no_sop_uid, SeriesError, "no SOPInstanceUID"),
        (_rows_not_the_pixel_data, DecodeError, "PixelData holds 2048 bytes, but Rows 32 x Col"),
        (_stored_as_hu_plus_1024, UnsupportedImageError, "not Hounsfield units of a head CT"),
        (_constant_image, UnsupportedImageError, "not Hounsfield units of a head CT"),
        (_mixed_orientation, InconsistentGeometryError, "mixed orientations"),
        (_mixed_size, InconsistentGeometryError, "mixed image sizes"),
        (_duplicate_position, DuplicatePositionError, "share the position"),
        (_no_pixel_data, NoPixelDataError, "no PixelData"),
        (_mr_modality, UnsupportedImageError, "Modality is MR"),
        (_mr_sop_class, UnsupportedImageError, "MR Image Storage"),
        (_two_stacks, InconsistentGeometryError, "one stack"),
    ],
    ids=[
        "decimal-comma",
        "two-slopes",
        "nan-position",
        "slope-zero",
        "no-study-uid",
        "no-sop-uid",
        "columns-wrong",
        "hu-plus-1024",
        "constant",
        "orientation",
        "size",
        "duplicate",
        "no-pixels",
        "modality",
        "sop-class",
        "two-stacks",
    ],
)
def test_refuses_broken_series_naming_it(
    five_datasets: list[pydicom.Dataset],
    damage: Callable[[list[pydicom.Dataset]], None],
    error: type[SeriesError],
    words: str,
) -> None:
    series_uid = five_datasets[0].SeriesInstanceUID
    damage(five_datasets)
    with pytest.raises(error, match=words) as caught:
        prepare_series(five_datasets)
    assert caught.value.series == series_uid
    assert series_uid in str(caught.value)


def test_series_label_replaces_uid_in_errors(five_datasets: list[pydicom.Dataset]) -> None:
    _duplicate_position(five_datasets)
    with pytest.raises(DuplicatePositionError) as caught:
        prepare_series(five_datasets, series_label="study 7 / series 3")
    assert caught.value.series == "study 7 / series 3"


def test_refuses_too_few_slices(five_datasets: list[pydicom.Dataset]) -> None:
    with pytest.raises(TooFewSlicesError, match="3 slice") as caught:
        prepare_series(five_datasets[:3])
    assert caught.value.series == five_datasets[0].SeriesInstanceUID
    assert prepare_series(five_datasets[:3], PreprocessSpec(min_slices=3)).image.shape[0] == 3


def test_refuses_instances_of_two_series(
    head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> None:
    geometry = SeriesGeometry(
        rows=32, columns=32, pixel_spacing_mm=(8.0, 8.0), table_positions_mm=(0, 5, 10, 15, 20)
    )
    study = StudyInfo(uid_seed="radnet-test-two")
    hu = head_hu((5, 32, 32), (8.0, 8.0))
    first = write_series(hu, geometry, "two-a", study, series_number=2)
    second = write_series(hu, geometry, "two-b", study, series_number=3)
    with pytest.raises(SeriesError, match="2 series") as caught:
        prepare_series([*first, second[0]])
    assert study.uid("series", 2) in str(caught.value)
    assert study.uid("series", 3) in str(caught.value)


@pytest.mark.parametrize(
    ("keyword", "value", "expected"),
    [
        ("PatientID", "SOMEONE-ELSE", "instances disagree on PatientID"),
        ("FrameOfReferenceUID", "1.2.3.4", "instances disagree on FrameOfReferenceUID"),
    ],
)
def test_refuses_a_series_whose_instances_disagree_on_patient_or_frame_of_reference(
    five_datasets: list[pydicom.Dataset], keyword: str, value: str, expected: str
) -> None:
    datasets = [copy.deepcopy(ds) for ds in five_datasets]
    setattr(datasets[3], keyword, value)
    with pytest.raises(SeriesError, match=expected) as caught:
        prepare_series(datasets)
    assert caught.value.series == datasets[0].SeriesInstanceUID
    if keyword == "PatientID":
        # the message names the instances, never the patient identifiers
        assert "SOMEONE-ELSE" not in str(caught.value)
    else:  # each frame of reference with an instance that has it
        assert f"1.2.3.4 ({datasets[3].filename})" in str(caught.value)
    assert str(datasets[3].filename) in str(caught.value)


def test_refuses_rgb_secondary_capture(dicom_data_dir: Path) -> None:
    path = dicom_data_dir / "deid-data/ctbrain1.dcm"
    with pytest.raises(UnsupportedImageError, match="Secondary Capture") as caught:
        prepare_series([path], ONE_SLICE)
    assert caught.value.series == pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID


def test_refuses_non_dicom_file(dicom_data_dir: Path) -> None:
    dirfile = dicom_data_dir / TILTED_DIR / "DIRFILE"
    with pytest.raises(InputError) as caught:
        prepare_series([*_image_files(dicom_data_dir / TILTED_DIR), dirfile])
    assert caught.value.path == str(dirfile)


def test_refuses_sagittal_reformat(dicom_data_dir: Path) -> None:
    path = dicom_data_dir / "pylibjpeg-data/TOSHIBA_J2K_SIZ0_PixRep1.dcm"  # a coronal MPR
    with pytest.raises(UnsupportedImageError, match="not an axial series"):
        prepare_series([path], ONE_SLICE)


# ------------------------------------------------------------------------------------------------
# real series


@pytest.fixture(scope="module")
def tilted_real(dicom_data_dir: Path) -> PreparedSeries:
    return prepare_series(_image_files(dicom_data_dir / TILTED_DIR))


def test_real_philips_5mm_series_loads_in_order(dicom_data_dir: Path) -> None:
    files = _image_files(dicom_data_dir / FIVE_MM_DIR)
    assert len(files) == 28
    prepared = prepare_series(files[::-1])
    assert prepared.image.shape == (28, 250, 250)
    np.testing.assert_allclose(np.diff(prepared.normal_positions_mm), 5.0, atol=1e-3)
    assert [s.instance_number for s in prepared.slices] == list(range(1, 29))
    assert prepared.slice_thickness_mm == 5.0
    assert prepared.source_pixel_spacing_mm == pytest.approx((0.451171875, 0.451171875))


def test_real_tilted_series_loads_with_true_positions(tilted_real: PreparedSeries) -> None:
    assert tilted_real.image.shape == (54, 250, 250)
    gaps = np.diff(tilted_real.normal_positions_mm)
    np.testing.assert_allclose(gaps, 2.5 * np.cos(np.deg2rad(18.5)), atol=2e-3)
    # the scanner's sheared geometry is kept: each slice keeps its own ImagePositionPatient
    first, last = tilted_real.slices[0], tilted_real.slices[-1]
    assert pydicom.dcmread(
        first.path, stop_before_pixels=True
    ).ImagePositionPatient == pytest.approx(first.image_position_mm)
    # the table moved along z while the gantry was tilted: the origins shift along the columns
    column_direction = np.asarray(tilted_real.image_orientation[3:])
    shift = (np.subtract(last.image_position_mm, first.image_position_mm)) @ column_direction
    assert shift == pytest.approx(-53 * 2.5 * np.sin(np.deg2rad(18.5)), abs=0.1)
    assert 0.02 < float(tilted_real.image.mean()) < 0.5  # a head in the window, not air or bone


def test_j2k_reencoding_of_tilted_series_gives_same_image(
    dicom_data_dir: Path, tilted_real: PreparedSeries
) -> None:
    j2k = prepare_series(
        _image_files(dicom_data_dir / "derived-transcoded/Philips_S21610_J2K_lossless")
    )
    np.testing.assert_allclose(j2k.image, tilted_real.image, atol=1e-6)
    assert j2k.normal_positions_mm == pytest.approx(tilted_real.normal_positions_mm)


def test_legacy_converted_enhanced_ct_gives_same_image(
    dicom_data_dir: Path, tilted_real: PreparedSeries
) -> None:
    path = dicom_data_dir / "derived-transcoded/Philips_S21610_LegacyConvertedEnhancedCT.dcm"
    legacy = prepare_series([path])
    np.testing.assert_allclose(legacy.image, tilted_real.image, atol=1e-6)
    assert legacy.normal_positions_mm == pytest.approx(tilted_real.normal_positions_mm)
    assert {s.sop_instance_uid for s in legacy.slices} == {legacy.slices[0].sop_instance_uid}
    assert sorted(s.frame_number for s in legacy.slices) == list(range(1, 55))  # type: ignore[type-var]
    np.testing.assert_allclose(
        [s.image_position_mm for s in legacy.slices],
        [s.image_position_mm for s in tilted_real.slices],
        atol=1e-4,
    )
    assert [s.instance_number for s in legacy.slices] == [
        s.instance_number for s in tilted_real.slices
    ]


def test_enhanced_ct_two_frames_loads(dicom_data_dir: Path) -> None:
    path = dicom_data_dir / "pydicom-testfiles/eCT_Supplemental.dcm"
    prepared = prepare_series([path], ONE_SLICE)
    assert prepared.image.shape == (2, 250, 250)
    # normal = (-1,0,0) x (0,1,0) = (0,0,-1), a feet-first stack: sorted from the feet up all the
    # same (frame 1 at z -159 before frame 2 at z -149), as every series the model was trained on
    assert [s.frame_number for s in prepared.slices] == [1, 2]
    assert prepared.normal_positions_mm == pytest.approx((-159.0, -149.0))
    assert prepared.source_pixel_spacing_mm == pytest.approx((0.388672, 0.388672))
    assert prepared.slice_thickness_mm == 10.0


# ------------------------------------------------------------------------------------------------
# HU volumes (NIfTI datasets)


def test_hu_volume_takes_the_same_path_as_dicom(
    head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> None:
    geometry = SeriesGeometry(
        rows=64, columns=64, pixel_spacing_mm=(3.0, 3.0), table_positions_mm=(0, 4, 8, 12, 16)
    )
    hu = head_hu((5, 64, 64), (3.0, 3.0), centre_mm=(80.0, 110.0), radii_mm=(60.0, 50.0))
    from_dicom = prepare_series(write_series(hu, geometry, "volume"))
    from_volume = prepare_hu_volume(hu, (3.0, 3.0), normal_positions_mm=[0, 4, 8, 12, 16])
    np.testing.assert_allclose(from_volume.image, from_dicom.image, atol=1e-6)
    np.testing.assert_allclose(from_volume.model_to_source, from_dicom.model_to_source)
    np.testing.assert_allclose(from_volume.slice_spacing_mm, 4.0)
    assert [s.frame_number for s in from_volume.slices] == [1, 2, 3, 4, 5]


def test_hu_volume_refusals_name_the_volume() -> None:
    hu = np.full((5, 16, 16), -1000.0)
    with pytest.raises(TooFewSlicesError) as caught:
        prepare_hu_volume(hu[:2], (1.0, 1.0), series_label="case-042")
    assert caught.value.series == "case-042"
    with pytest.raises(DuplicatePositionError, match="case-042"):
        prepare_hu_volume(
            hu, (1.0, 1.0), normal_positions_mm=[0, 1, 1, 2, 3], series_label="case-042"
        )
    with pytest.raises(InconsistentGeometryError, match="ascending"):
        prepare_hu_volume(hu, (1.0, 1.0), normal_positions_mm=[0, 2, 1, 3, 4])
    bad = hu.copy()
    bad[2, 3, 3] = np.nan
    with pytest.raises(SeriesError, match="non-finite"):
        prepare_hu_volume(bad, (1.0, 1.0))


def test_prepared_series_is_immutable(five_datasets: list[pydicom.Dataset]) -> None:
    before = copy.deepcopy(five_datasets[0])
    prepared = prepare_series(five_datasets)
    assert five_datasets[0] == before  # the caller's datasets are not changed
    with pytest.raises(ValueError, match="read-only"):
        prepared.image[0, 0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        prepared.model_to_source[0, 0] = 2.0
    with pytest.raises(AttributeError):
        prepared.head_centre_px = (0.0, 0.0)  # type: ignore[misc]
