"""Tests of the synthetic head CT generator (training.phantoms, .anatomy and .lesions)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull

from radnet_node.errors import DatasetError, InputError
from training import anatomy
from training.anatomy import TissueHU, compose_head_hu, head_atlas
from training.dicom_writer import SeriesGeometry
from training.lesions import SUBTYPES, render_lesions, sample_hemorrhages, sample_mimics
from training.phantoms import (
    PhantomOptions,
    generate_background_case,
    generate_case,
    generate_dataset,
    load_background,
    mask_affine,
    parse_subtype_weights,
)

HITACHI = Path("pylibjpeg-data") / "J2K_pixelrep_mismatch.dcm"  # under the dicom_data_dir fixture
SECONDARY_CAPTURE = Path("deid-data") / "ctbrain1.dcm"
SMALL = PhantomOptions(rows=96, slice_thickness_mm=5.0)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def atlas():  # type: ignore[no-untyped-def]
    return head_atlas()


def _pixels(folder: Path) -> list[tuple[str, bytes]]:
    files = sorted(folder.rglob("*.dcm"))
    return [(str(pydicom.dcmread(f).SOPInstanceUID), pydicom.dcmread(f).PixelData) for f in files]


def _brain_region(hu: np.ndarray) -> np.ndarray:
    """Pixels enclosed by the skull (> 300 HU), per slice, away from the bone itself."""
    inside = np.zeros(hu.shape, bool)
    for i, image in enumerate(hu):
        bone = ndi.binary_closing(image > 300, iterations=2)
        inside[i] = ndi.binary_fill_holes(bone) & ~ndi.binary_dilation(bone, iterations=1)
    return inside


# ---------------------------------------------------------------- anatomy


def test_atlas_tissue_densities_follow_the_brief(atlas) -> None:  # type: ignore[no-untyped-def]
    hu = compose_head_hu(atlas, TissueHU(grey=38, white=27, csf=5))
    grey = atlas.grey > 230
    white = atlas.white > 230
    ventricles = atlas.ventricles > 230
    skull = atlas.extracranial_hu > 300
    assert 36 <= np.median(hu[grey]) <= 40
    assert 25 <= np.median(hu[white]) <= 29
    assert ventricles.sum() > 5000  # lateral ventricles, some 10-30 ml
    assert 0 <= np.median(hu[ventricles]) <= 12
    assert np.percentile(hu[skull], 95) > 1000
    # the cranial cavity is enclosed: 0 < inner depth only inside a skull 3-9 mm thick
    assert (atlas.inner_depth_mm > 0).sum() > 1_200_000  # > 1.2 l of intracranial volume
    outside_air = hu[0, 0, :] if hu.shape else None
    assert outside_air is not None and np.all(outside_air < -900)


# ---------------------------------------------------------------- lesions on the atlas


def test_subarachnoid_and_intraventricular_blood_lie_in_csf_spaces(atlas) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(5)
    gravity = np.array([0.0, -1.0, 0.0])
    for _ in range(3):
        (sah,) = sample_hemorrhages(atlas, rng, gravity, subtypes=("subarachnoid",))
        tissue = (atlas.grey[sah.slices].astype(float) + atlas.white[sah.slices]) / 255.0
        csf_share = np.average(1.0 - np.clip(tissue, 0, 1), weights=sah.fraction)
        assert csf_share > 0.45, f"SAH lies in CSF only {csf_share:.2f}"
        (ivh,) = sample_hemorrhages(atlas, rng, gravity, subtypes=("intraventricular",))
        ventricle_share = np.average(atlas.ventricles[ivh.slices] / 255.0, weights=ivh.fraction)
        assert ventricle_share > 0.7, f"IVH lies in the ventricles only {ventricle_share:.2f}"
        # blood layers in the dependent part: further along gravity than the ventricle's centre
        idx = np.argwhere(ivh.fraction > 0.5) + np.asarray(ivh.lo)
        vent = np.argwhere(atlas.ventricles[ivh.slices] > 128) + np.asarray(ivh.lo)
        assert (idx @ gravity).mean() > (vent @ gravity).mean()


def test_mimics_are_dense_and_not_blood(atlas) -> None:  # type: ignore[no-untyped-def]
    for seed in range(5):
        mimics = sample_mimics(atlas, np.random.default_rng(seed))
        assert mimics, "every head has at least one physiological calcification"
        assert all(not m.is_blood for m in mimics)
        assert max(float(m.hu.max()) for m in mimics) > 100


def test_render_refuses_a_volume_off_the_atlas_grid(atlas) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="atlas grid"):
        render_lesions(np.zeros((4, 4, 4), np.float32), atlas, [], TissueHU())


def test_a_process_that_loses_the_atlas_cache_race_keeps_no_copy_and_no_warning(
    atlas, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RADNET_CACHE_DIR", str(tmp_path))
    folder = anatomy._cache_dir()

    def built_while_another_process_finished_first() -> object:
        folder.mkdir(parents=True)
        (folder / "landmarks.json").write_text("{}")  # the other process's copy, in place
        return atlas  # the arrays this process built (the real atlas, not rebuilt here)

    monkeypatch.setattr(anatomy, "build_head_atlas", built_while_another_process_finished_first)
    anatomy.head_atlas.cache_clear()
    try:
        with caplog.at_level("DEBUG", logger=anatomy.logger.name):
            assert anatomy.head_atlas() is atlas
    finally:
        anatomy.head_atlas.cache_clear()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary copy left
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
    assert "another process" in caplog.records[0].getMessage()


# ---------------------------------------------------------------- whole synthetic heads


@pytest.mark.parametrize("subtype", SUBTYPES)
def test_every_subtype_gives_a_mask_of_acute_blood_density(subtype: str) -> None:
    case = generate_case(
        21,
        SUBTYPES.index(subtype),
        PhantomOptions(rows=128, slice_thickness_mm=5.0),
        subtypes=(subtype,),
    )
    mask = case.mask.astype(bool)
    assert case.ct_label == 1 and mask.sum() > 20
    assert case.subtypes == (subtype,)
    values = case.hu_noise_free[mask]
    assert 50 <= np.percentile(values, 75) <= 90, np.percentile(values, [10, 50, 75, 90])
    assert 40 <= np.median(values) <= 90
    assert (
        mask[~_brain_region(case.hu_noise_free) & (case.hu_noise_free < 0)].sum() == 0
    )  # never in air


def test_subdural_blood_touches_the_inner_table() -> None:
    case = generate_case(
        22, 0, PhantomOptions(rows=128, slice_thickness_mm=5.0), subtypes=("subdural",)
    )
    bone = case.hu_noise_free > 300
    touching = ndi.binary_dilation(case.mask.astype(bool), iterations=2) & bone
    assert touching.sum() > 0.2 * case.mask.sum() / max(case.mask.any(axis=(1, 2)).sum(), 1)
    # a crescent along the convexity is not convex: its area is well below its convex hull's
    k = int(case.mask.sum(axis=(1, 2)).argmax())
    points = np.argwhere(case.mask[k])
    assert case.mask[k].sum() / ConvexHull(points).volume < 0.8


def test_epidural_blood_is_a_compact_convex_lens() -> None:
    case = generate_case(
        23, 0, PhantomOptions(rows=128, slice_thickness_mm=5.0), subtypes=("epidural",)
    )
    k = int(case.mask.sum(axis=(1, 2)).argmax())
    points = np.argwhere(case.mask[k])
    solidity = case.mask[k].sum() / ConvexHull(points).volume
    assert solidity > 0.8
    bone = case.hu_noise_free[k] > 300
    assert (ndi.binary_dilation(case.mask[k].astype(bool), iterations=2) & bone).any()
    extent = np.ptp(points, axis=0) * np.asarray(case.geometry.pixel_spacing_mm)
    assert extent.max() < 80.0  # compact: bounded by sutures


def test_negative_cases_have_no_blood_but_dense_mimics() -> None:
    options = PhantomOptions(rows=128, slice_thickness_mm=5.0, positive_fraction=0.0)
    for index in range(2):
        case = generate_case(24, index, options)
        assert case.ct_label == 0 and not case.mask.any() and not any(case.slice_labels)
        assert case.lesions == ()
        brain = _brain_region(case.hu_noise_free)
        assert case.hu_noise_free[brain].max() > 100, (
            "calcification mimic expected inside the skull"
        )


def test_positive_and_negative_versions_differ_only_by_blood() -> None:
    negative = generate_case(
        25, 3, PhantomOptions(rows=64, slice_thickness_mm=5.0, positive_fraction=0.0)
    )
    positive = generate_case(
        25, 3, PhantomOptions(rows=64, slice_thickness_mm=5.0, positive_fraction=1.0)
    )
    assert negative.geometry == positive.geometry
    assert negative.rescale == positive.rescale
    noise_neg = negative.hu - negative.hu_noise_free
    noise_pos = positive.hu - positive.hu_noise_free
    assert np.abs(noise_neg - noise_pos).max() < 0.2 * np.abs(noise_neg).max()
    assert positive.mask.any()
    far = ~ndi.binary_dilation(positive.mask.astype(bool), iterations=12)
    assert np.median(np.abs(positive.hu_noise_free - negative.hu_noise_free)[far]) < 1.0


def test_tilted_uneven_series_is_written_with_complete_modules(tmp_path: Path) -> None:
    options = PhantomOptions(
        rows=64, slice_thickness_mm=5.0, tilt_probability=1.0, uneven_probability=1.0
    )
    out = generate_dataset(tmp_path / "ds", 1, seed=3, options=options, progress=False)
    (case_dir,) = (out / "cases").iterdir()
    datasets = [pydicom.dcmread(f) for f in sorted(case_dir.glob("*.dcm"))]
    required = [
        "PatientID",
        "PatientName",
        "StudyInstanceUID",
        "StudyDate",
        "SeriesInstanceUID",
        "Modality",
        "FrameOfReferenceUID",
        "ImageOrientationPatient",
        "ImagePositionPatient",
        "PixelSpacing",
        "SliceThickness",
        "RescaleSlope",
        "RescaleIntercept",
        "SOPInstanceUID",
        "SOPClassUID",
    ]
    for ds in datasets:
        missing = [k for k in required if k not in ds]
        assert not missing, missing
        assert ds.Modality == "CT" and ds.Rows == 64
    orientation = np.asarray(datasets[0].ImageOrientationPatient, float)
    tilt = float(datasets[0].GantryDetectorTilt)
    assert 5.0 <= abs(tilt) <= 25.0
    assert abs(orientation[5]) > 0.05  # the tilted column direction leaves the axial plane
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])
    steps = np.diff(np.sort(z))
    assert np.ptp(steps) > 0.3, "uneven spacing requested"
    hu = datasets[len(datasets) // 2].pixel_array * float(datasets[0].RescaleSlope) + float(
        datasets[0].RescaleIntercept
    )
    assert hu.min() < -900 and hu.max() > 700  # air and bone: plausible HU after rescale
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["case_list"][0]["geometry"][
        "gantry_tilt_deg"
    ] == pytest.approx(tilt)


def test_same_seed_gives_identical_pixels_and_uids(tmp_path: Path) -> None:
    first = generate_dataset(tmp_path / "a", 2, seed=9, options=SMALL, progress=False)
    second = generate_dataset(tmp_path / "b", 2, seed=9, options=SMALL, progress=False)
    other = generate_dataset(tmp_path / "c", 2, seed=10, options=SMALL, progress=False)
    assert _pixels(first) == _pixels(second)
    assert (first / "labels.csv").read_text() == (second / "labels.csv").read_text()
    assert (first / "slice_labels.csv").read_text() == (second / "slice_labels.csv").read_text()
    uids_first = {uid for uid, _ in _pixels(first)}
    other_pixels = _pixels(other)
    assert uids_first.isdisjoint({uid for uid, _ in other_pixels})
    assert [p for _, p in _pixels(first)][0] != [p for _, p in other_pixels][0]


def test_slice_labels_and_mask_nifti_agree_with_the_series(tmp_path: Path) -> None:
    options = PhantomOptions(
        rows=96, slice_thickness_mm=5.0, positive_fraction=1.0, tilt_probability=1.0
    )
    out = generate_dataset(tmp_path / "ds", 1, seed=12, options=options, progress=False)
    with open(out / "labels.csv") as handle:
        (label_row,) = list(csv.DictReader(handle))
    assert (
        label_row["ct_label"] == "1"
        and label_row["generator"] == "mni152"
        and label_row["subtypes"]
    )
    with open(out / "slice_labels.csv") as handle:
        rows = list(csv.DictReader(handle))
    case_id = label_row["case_id"]
    files = sorted((out / "cases" / case_id).glob("*.dcm"))
    datasets = sorted(
        (pydicom.dcmread(f) for f in files), key=lambda ds: float(ds.ImagePositionPatient[2])
    )
    assert [r["sop_instance_uid"] for r in rows] == [str(ds.SOPInstanceUID) for ds in datasets]
    image = nib.load(out / "masks" / f"{case_id}.nii.gz")
    mask = np.asarray(image.dataobj)
    assert mask.dtype == np.uint8 and mask.shape == (96, 96, len(datasets))
    spacing = [float(v) for v in datasets[0].PixelSpacing]
    for row in rows:
        k = int(row["slice_index"])
        positive = mask[:, :, k].sum() * spacing[0] * spacing[1] >= options.min_positive_area_mm2
        assert int(row["label"]) == int(positive)
        assert bool(row["subtypes"]) == positive
    # the affine puts voxel (column, row, slice) where the DICOM geometry does (LPS -> RAS)
    k = int(np.argmax(mask.sum(axis=(0, 1))))
    c, r = np.argwhere(mask[:, :, k])[0]
    ds = datasets[k]
    orientation = np.asarray(ds.ImageOrientationPatient, float)
    lps = (
        np.asarray(ds.ImagePositionPatient, float)
        + c * spacing[1] * orientation[:3]
        + r * spacing[0] * orientation[3:]
    )
    ras = image.affine @ np.array([c, r, k, 1.0])
    np.testing.assert_allclose(ras[:3], lps * np.array([-1, -1, 1]), atol=1e-3)
    # and the blood is where the written pixels are dense
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.median(hu.T[mask[:, :, k] > 0]) > 40


def test_mask_affine_of_an_even_axial_series_is_diagonal() -> None:
    geometry = SeriesGeometry(
        rows=4, columns=4, pixel_spacing_mm=(0.5, 0.5), table_positions_mm=(0.0, 5.0, 10.0)
    )
    affine = mask_affine(geometry)
    np.testing.assert_allclose(np.diag(affine), [-0.5, -0.5, 5.0, 1.0])


def test_out_folder_that_is_not_empty_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        generate_dataset(tmp_path, 1, seed=0, options=SMALL, progress=False)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.phantoms",
            "--out",
            str(tmp_path),
            "--cases",
            "1",
            "--rows",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (
        result.returncode == 2 and "not empty" in result.stderr and "--overwrite" in result.stderr
    )


def test_options_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="positive_fraction"):
        PhantomOptions(positive_fraction=1.5)
    with pytest.raises(ValueError, match="rows"):
        PhantomOptions(rows=8)
    with pytest.raises(ValueError, match="subtype_weights"):
        PhantomOptions(subtype_weights=(1.0, 0.0))
    with pytest.raises(ValueError, match="subtype_weights"):
        PhantomOptions(subtype_weights=(0.0,) * len(SUBTYPES))


def test_subtype_weights_parse_by_name_and_keep_unnamed_defaults() -> None:
    weights = parse_subtype_weights("subdural=2, epidural=0")
    assert dict(zip(SUBTYPES, weights, strict=True)) == {
        "intraparenchymal": 0.28,
        "subdural": 2.0,
        "epidural": 0.0,
        "subarachnoid": 0.20,
        "intraventricular": 0.14,
    }
    normalised = PhantomOptions(subtype_weights=weights).subtype_weights
    assert sum(normalised) == pytest.approx(1.0) and normalised[2] == 0.0
    assert (
        PhantomOptions().subtype_weights
        == PhantomOptions(subtype_weights=parse_subtype_weights("")).subtype_weights
    )
    for bad, reason in (
        ("sdh=1", "SUBTYPE=WEIGHT"),
        ("subdural=x", "not a number"),
        ("subdural=-1", ">= 0"),
        ("subdural", "SUBTYPE=WEIGHT"),
    ):
        with pytest.raises(ValueError, match=reason):
            parse_subtype_weights(bad)


def test_subtype_weights_choose_the_subtypes_of_generated_cases() -> None:
    only = PhantomOptions(
        rows=96,
        slice_thickness_mm=5.0,
        positive_fraction=1.0,
        subtype_weights=(1.0, 0.0, 0.0, 0.0, 0.0),
    )
    drawn = {lesion.subtype for i in range(3) for lesion in generate_case(11, i, only).lesions}
    assert drawn == {"intraparenchymal"}


# ---------------------------------------------------------------- insertion into real slices


def test_background_hitachi_slice_gets_blood_inside_the_skull(dicom_data_dir: Path) -> None:
    background = load_background(dicom_data_dir / HITACHI)
    assert (
        -1100 < np.median(background.hu[background.hu > -1100]) < 200
    )  # signed/unsigned trap avoided
    options = PhantomOptions(positive_fraction=1.0, background_slices=6)
    case = generate_background_case(4, 0, background, options)
    assert case.ct_label == 1 and case.mask.any()
    assert case.geometry.pixel_spacing_mm == background.pixel_spacing_mm
    inside = background.intracranial
    assert np.all(inside[case.mask.any(axis=0).astype(bool)]), (
        "blood outside the intracranial region"
    )
    values = case.hu_noise_free[case.mask.astype(bool)]
    assert 45 <= np.median(values) <= 95
    far = ~ndi.binary_dilation(case.mask.any(axis=0), iterations=8)
    np.testing.assert_array_equal(case.hu_noise_free[0][far], background.hu[far])


def test_background_subtype_weights_choose_the_inserted_subtypes(dicom_data_dir: Path) -> None:
    background = load_background(dicom_data_dir / HITACHI)
    options = PhantomOptions(
        positive_fraction=1.0, background_slices=4, subtype_weights=(0.0, 1.0, 0.0, 0.0, 0.0)
    )
    drawn = {
        lesion.subtype
        for i in range(3)
        for lesion in generate_background_case(5, i, background, options).lesions
    }
    assert drawn == {"subdural"}


def test_background_folder_skips_unusable_files_with_a_warning(
    tmp_path: Path, dicom_data_dir: Path
) -> None:
    folder = tmp_path / "bg"
    folder.mkdir()
    (folder / "hitachi.dcm").symlink_to(dicom_data_dir / HITACHI)
    (folder / "secondary_capture.dcm").symlink_to(dicom_data_dir / SECONDARY_CAPTURE)
    (folder / "notes.txt").write_text("not dicom")
    options = PhantomOptions(positive_fraction=1.0, background_slices=4)
    with pytest.warns(UserWarning, match="background skipped"):
        out = generate_dataset(
            tmp_path / "ds", 1, seed=1, options=options, background=folder, progress=False
        )
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["backgrounds_skipped"]) == 2
    assert any(
        "secondary_capture.dcm" in m and "not a CT" in m for m in manifest["backgrounds_skipped"]
    )
    files = sorted((out / "cases").rglob("*.dcm"))
    assert len(files) == 4
    ds = pydicom.dcmread(files[0])
    assert ds.Rows == 512 and [float(v) for v in ds.PixelSpacing] == pytest.approx([0.431, 0.431])
    assert float(ds.GantryDetectorTilt) == pytest.approx(-22.0)
    with open(out / "labels.csv") as handle:
        assert next(csv.DictReader(handle))["generator"] == "background"


def test_a_background_that_is_not_ct_names_the_file(dicom_data_dir: Path) -> None:
    with pytest.raises(InputError, match="ctbrain1.dcm.*not a CT"):
        load_background(dicom_data_dir / SECONDARY_CAPTURE)
