"""Tests of training/datasets.py on small fixtures shaped like each dataset's real download."""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from synthetic_heads import synthetic_head_hu

from radnet_node.errors import DatasetError
from radnet_node.preprocess import PreprocessSpec
from training.datasets import (
    CaseDataset,
    ConcatDataset,
    CQ500Dataset,
    LayoutDataset,
    PhysioNetCTICHDataset,
    RSNADataset,
    detect_source,
    open_dataset,
    stratified_split,
)
from training.dicom_writer import SeriesGeometry, StudyInfo, write_ct_series

torch.set_num_threads(1)
# the RSNA fixtures carry the real files' 'ID_<hex>' UIDs, which pydicom warns about
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

PX = 64  # 64 x 64 px at 4 mm: 256 mm, the whole synthetic head
SPACING = 4.0
SPEC = PreprocessSpec(pixel_spacing_mm=4.0, field_of_view_mm=256.0, min_slices=3)
RSNA_SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
CQ500_FINDINGS = (
    "ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "BleedLocation-Right",
    "ChronicBleed", "Fracture", "CalvarialFracture", "OtherFracture", "MassEffect", "MidlineShift",
)  # fmt: skip


def head(n: int, blood: Sequence[int] = ()) -> np.ndarray:
    """A synthetic head (n, 64, 64) in HU with a 70 HU blob on the slices in ``blood``."""
    hu = synthetic_head_hu((n, PX, PX), (SPACING, SPACING))
    for z in blood:
        hu[z, 20:26, 36:44] = 70.0
    return hu


def write_series(
    folder: Path,
    hu: np.ndarray,
    seed: str,
    *,
    positions: Sequence[float] | None = None,
    thickness: float = 5.0,
    **kwargs: object,
) -> list[Path]:
    n = hu.shape[0]
    geometry = SeriesGeometry(
        rows=PX,
        columns=PX,
        pixel_spacing_mm=(SPACING, SPACING),
        table_positions_mm=tuple(positions or [thickness * k for k in range(n)]),
        slice_thickness_mm=thickness,
    )
    return write_ct_series(hu, geometry, folder, StudyInfo(uid_seed=seed), **kwargs)  # type: ignore[arg-type]


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# ------------------------------------------------------------------------------------------
# Our layout
# ------------------------------------------------------------------------------------------


def layout(root: Path, cases: dict[str, int]) -> Path:
    """labels.csv for ``cases`` (case_id -> ct_label) and a 5-slice series per case."""
    for index, (case_id, label) in enumerate(cases.items()):
        write_series(
            root / "cases" / case_id / "series", head(5, [2] if label else []), f"l{index}"
        )
    write_csv(root / "labels.csv", ["case_id", "ct_label"], list(cases.items()))
    return root


def test_layout_case_without_masks_or_slice_labels(tmp_path: Path) -> None:
    dataset = LayoutDataset(layout(tmp_path / "ds", {"a": 0, "b": 1}), SPEC)
    assert dataset.case_ids() == ["a", "b"]
    assert [dataset.ct_label(c) for c in dataset.case_ids()] == [0, 1]
    case = dataset.load("b")
    assert case.image.shape == (5, 64, 64) and case.image.dtype == np.float32
    assert 0.0 <= case.image.min() and case.image.max() <= 1.0 and case.image.max() > 0.5
    assert case.slice_labels.tolist() == [-1] * 5
    assert case.mask is None and case.ct_label == 1
    assert case.source == "layout" and case.reader_labels == {}
    assert case.slice_spacing_mm == pytest.approx(5.0)  # the median along the normal


def test_layout_slice_labels_follow_the_uid_not_the_file_order(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    # table positions descend with the file names: CT0001 is the last slice along the normal
    files = write_series(root / "cases" / "a", head(5, [4]), "a", positions=[20, 15, 10, 5, 0])
    write_series(root / "cases" / "b", head(5, [1]), "b")
    write_csv(root / "labels.csv", ["case_id", "ct_label"], [("a", 1), ("b", 1)])
    rows = [("a", 0, sop_uid(files[0]), 1), ("a", 4, sop_uid(files[4]), 0)]  # index ignored
    rows += [("b", 1, "", 1), ("b", 0, "", 0)]  # no UID: by slice_index
    write_csv(
        root / "slice_labels.csv", ["case_id", "slice_index", "sop_instance_uid", "label"], rows
    )
    dataset = LayoutDataset(root, SPEC)
    assert dataset.load("a").slice_labels.tolist() == [0, -1, -1, -1, 1]
    assert dataset.load("b").slice_labels.tolist() == [0, 1, -1, -1, -1]


def test_layout_re_exported_uids_fall_back_to_slice_index(tmp_path: Path) -> None:
    root = layout(tmp_path / "ds", {"a": 1})
    rows = [("a", k, f"1.2.3.{k}", int(k == 2)) for k in range(5)]
    write_csv(
        root / "slice_labels.csv", ["case_id", "slice_index", "sop_instance_uid", "label"], rows
    )
    assert LayoutDataset(root, SPEC).load("a").slice_labels.tolist() == [0, 0, 1, 0, 0]


def test_layout_mask_lands_on_its_slice_and_place_on_the_model_grid(tmp_path: Path) -> None:
    root = layout(tmp_path / "ds", {"a": 1, "b": 0})
    source = np.zeros((5, PX, PX), dtype=np.uint8)  # (slices, rows, columns)
    source[2, 20:26, 36:44] = 1  # upper (anterior) rows, right-hand (patient left) columns
    (root / "masks").mkdir()
    nib.save(
        nib.Nifti1Image(np.transpose(source, (2, 1, 0)).copy(), np.eye(4)),
        root / "masks" / "a.nii.gz",
    )
    dataset = LayoutDataset(root, SPEC)
    mask = dataset.load("a").mask
    assert mask is not None and mask.dtype == np.uint8 and mask.shape == (5, 64, 64)
    assert mask.sum(axis=(1, 2)).nonzero()[0].tolist() == [2]
    rows, columns = np.nonzero(mask[2])
    # same grid size here (256 mm / 4 mm), so the blob keeps roughly its place and size
    assert 15 <= rows.mean() <= 31 and 32 <= columns.mean() <= 48
    assert 30 <= mask[2].sum() <= 66
    # a negative case without a mask file has an empty mask when the dataset has masks
    negative = dataset.load("b").mask
    assert negative is not None and negative.sum() == 0


def test_layout_reads_real_vendor_series_with_a_directory_file_beside_it(
    tmp_path: Path, dicom_data_dir: Path
) -> None:
    series = dicom_data_dir / "dcm_qa_ct" / "Philips_Ingenuity_head_phantom" / "S21570" / "S2010"
    root = tmp_path / "ds"
    (root / "cases").mkdir(parents=True)
    (root / "cases" / "philips").symlink_to(series, target_is_directory=True)  # read in place
    write_csv(root / "labels.csv", ["case_id", "ct_label"], [("philips", 0)])
    case = LayoutDataset(root, SPEC).load("philips")  # S2010 holds a DIRFILE besides 28 slices
    assert case.image.shape == (28, 64, 64)
    assert case.image.max() > 0.5


@pytest.mark.parametrize(
    ("labels", "slice_rows", "message"),
    [
        ("case_id,ct_label\na,2\n", None, "line 2: ct_label must be 0 or 1, got '2'"),
        ("case_id,ct_label\na,1\na,0\n", None, "listed twice"),
        ("case_id,label\na,1\n", None, "missing column(s) ct_label"),
        ("case_id,ct_label\na,1\n", "a,0,,yes\n", "label must be 0 or 1, got 'yes'"),
        ("case_id,ct_label\na,1\n", "z,0,,1\n", "case 'z' is not in labels.csv"),
    ],
)
def test_layout_malformed_label_files_are_refused(
    tmp_path: Path, labels: str, slice_rows: str | None, message: str
) -> None:
    (tmp_path / "labels.csv").write_text(labels)
    if slice_rows is not None:
        (tmp_path / "slice_labels.csv").write_text(
            "case_id,slice_index,sop_instance_uid,label\n" + slice_rows
        )
    with pytest.raises(DatasetError, match=r"dataset 'layout'.*csv") as error:
        LayoutDataset(tmp_path, SPEC)
    assert message in str(error.value)


def test_layout_missing_labels_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"labels\.csv: file is missing"):
        LayoutDataset(tmp_path, SPEC)


def test_layout_bad_cases_raise_naming_case_file_and_problem(tmp_path: Path) -> None:
    root = layout(tmp_path / "ds", {"good": 1, "empty": 0, "absent": 0, "text": 0, "mask": 1})
    shutil.rmtree(root / "cases" / "empty" / "series")
    (root / "cases" / "empty" / "series").mkdir()
    shutil.rmtree(root / "cases" / "absent")
    shutil.rmtree(root / "cases" / "text" / "series")
    (root / "cases" / "text" / "notes.txt").write_text("not DICOM")
    (root / "masks").mkdir()
    nib.save(
        nib.Nifti1Image(np.zeros((PX, PX, 4), np.uint8), np.eye(4)), root / "masks" / "mask.nii.gz"
    )
    dataset = LayoutDataset(root, SPEC)
    expected = {
        "empty": "case 'empty', .*cases/empty: case folder holds no DICOM files",
        "absent": "case 'absent', .*cases/absent: case folder is missing",
        "text": r"case 'text', .*notes\.txt: not a readable DICOM file",
        "mask": r"case 'mask', .*mask\.nii\.gz: mask shape \(64, 64, 4\) does not match the "
        r"series: expected \(columns, rows, slices\) = \(64, 64, 5\)",
        "nope": "case 'nope': unknown case id",
    }
    for case_id, pattern in expected.items():
        with pytest.raises(DatasetError, match=f"^dataset 'layout', {pattern}"):
            dataset.load(case_id)
    with pytest.raises(DatasetError, match="unknown case id"):
        dataset.ct_label("nope")
    assert dataset.load("good").mask is None  # positive, masks/ exists, no file: no mask


def test_layout_contradicting_ct_and_slice_labels(tmp_path: Path) -> None:
    root = layout(tmp_path / "ds", {"a": 0})
    write_csv(root / "slice_labels.csv", ["case_id", "slice_index", "label"], [("a", 3, 1)])
    with pytest.raises(DatasetError, match=r"case 'a': ct_label is 0 but .* slice\(s\) \[3\]"):
        LayoutDataset(root, SPEC).load("a")


def test_layout_folder_without_label_row_is_reported(tmp_path: Path) -> None:
    root = layout(tmp_path / "ds", {"a": 0})
    (root / "cases" / "stray").mkdir()
    dataset = LayoutDataset(root, SPEC)
    assert dataset.case_ids() == ["a"]
    assert any("stray" in problem for problem in dataset.problems)


# ------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------


def rewrite_pixels_keeping_size_and_mtime(path: Path, hu_offset: int) -> None:
    stat = path.stat()
    ds = pydicom.dcmread(path)
    ds.PixelData = (
        (ds.pixel_array.astype(np.int32) + hu_offset).clip(0, 65535).astype(np.uint16).tobytes()
    )
    ds.save_as(path)
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_cache_hit_miss_stale_and_corrupt(tmp_path: Path) -> None:
    root = layout(tmp_path / "ds", {"a": 1})
    cache = tmp_path / "cache"
    first = LayoutDataset(root, SPEC, cache_dir=cache).load("a")
    entries = list(cache.rglob("*.npz"))
    assert len(entries) == 1
    # a hit: the files look unchanged (names, sizes, mtimes), so the cached image comes back
    files = sorted((root / "cases" / "a").rglob("*.dcm"))
    rewrite_pixels_keeping_size_and_mtime(files[2], 60)
    hit = LayoutDataset(root, SPEC, cache_dir=cache).load("a")
    np.testing.assert_array_equal(hit.image, first.image)
    assert hit.slice_spacing_mm == first.slice_spacing_mm == pytest.approx(5.0)
    # stale: a new mtime makes the entry stale and the case is prepared again
    os.utime(files[2])
    rebuilt = LayoutDataset(root, SPEC, cache_dir=cache).load("a")
    assert rebuilt.image[2].mean() > first.image[2].mean()
    # a different spec is a different key
    other = PreprocessSpec(pixel_spacing_mm=8.0, field_of_view_mm=256.0, min_slices=3)
    assert LayoutDataset(root, other, cache_dir=cache).load("a").image.shape == (5, 32, 32)
    assert LayoutDataset(root, SPEC, cache_dir=cache).load("a").image.shape == (5, 64, 64)
    # corrupt: an unreadable entry is rebuilt, never trusted
    entries[0].write_bytes(b"PK\x03\x04 not really a zip")
    again = LayoutDataset(root, SPEC, cache_dir=cache).load("a")
    np.testing.assert_array_equal(again.image, rebuilt.image)
    with np.load(entries[0]) as entry:
        assert entry["image"].shape == (5, 64, 64)


def test_cache_keeps_masks_and_labels_stay_fresh(tmp_path: Path) -> None:
    root = layout(tmp_path / "ds", {"a": 1})
    (root / "masks").mkdir()
    source = np.zeros((PX, PX, 5), np.uint8)
    source[36:44, 20:26, 2] = 1
    nib.save(nib.Nifti1Image(source, np.eye(4)), root / "masks" / "a.nii.gz")
    cache = tmp_path / "cache"
    first = LayoutDataset(root, SPEC, cache_dir=cache).load("a")
    write_csv(root / "slice_labels.csv", ["case_id", "slice_index", "label"], [("a", 2, 1)])
    second = LayoutDataset(root, SPEC, cache_dir=cache).load("a")
    assert first.mask is not None and second.mask is not None
    np.testing.assert_array_equal(second.mask, first.mask)
    assert second.slice_labels.tolist() == [-1, -1, 1, -1, -1]


# ------------------------------------------------------------------------------------------
# RSNA 2019
# ------------------------------------------------------------------------------------------


def rsna_series(images: Path, hu: np.ndarray, series_id: str, sop_ids: Sequence[str]) -> None:
    """A series written as the Kaggle files are: ID_<hex>.dcm with 'ID_' UIDs."""
    written = write_series(images.parent / f"tmp-{series_id}", hu, series_id)
    for path, sop in zip(written, sop_ids, strict=True):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SeriesInstanceUID = series_id
        ds.StudyInstanceUID = f"ID_st{series_id[3:]}"
        ds.PatientID = f"ID_pt{series_id[3:]}"
        ds.save_as(images / f"{sop}.dcm")
    shutil.rmtree(images.parent / f"tmp-{series_id}")


def rsna_rows(sop: str, any_label: int) -> list[tuple[str, int]]:
    rows = [
        (f"{sop}_{subtype}", int(any_label and subtype == "subdural")) for subtype in RSNA_SUBTYPES
    ]
    return [*rows, (f"{sop}_any", any_label)]


@pytest.fixture
def rsna_root(tmp_path: Path) -> Path:
    root = tmp_path / "rsna-intracranial-hemorrhage-detection"
    images = root / "stage_2_train"
    images.mkdir(parents=True)
    # file names are random hex, so name order is not slice order
    positive = ["ID_9f1c2e3a1", "ID_0b2d4f6a8", "ID_5e7a9c1b3", "ID_3c5e7a9b2", "ID_7a9c1e3d5"]
    negative = ["ID_2a4c6e8f0", "ID_8e0a2c4b6", "ID_4d6f8a0c2"]
    rsna_series(images, head(5, [1, 2]), "ID_a1b2c3d4e5", positive)
    rsna_series(images, head(3), "ID_f6e5d4c3b2", negative)
    rsna_series(images, head(3), "ID_0000000001", ["ID_111111111", "ID_222222222", "ID_333333333"])
    (images / "ID_6431af929.dcm").write_bytes(b"\0" * 200)  # the real set has one broken file too
    rows = [r for k, s in enumerate(positive) for r in rsna_rows(s, int(k in (1, 2)))]
    rows += [r for s in negative for r in rsna_rows(s, 0)]
    rows.append(rows[0])  # the real CSV repeats some rows
    write_csv(root / "stage_2_train.csv", ["ID", "Label"], rows)
    return root


def test_rsna_groups_slices_into_series_with_labels(rsna_root: Path, tmp_path: Path) -> None:
    dataset = RSNADataset(rsna_root, SPEC, cache_dir=tmp_path / "cache")
    assert dataset.case_ids() == ["ID_a1b2c3d4e5", "ID_f6e5d4c3b2"]
    assert dataset.ct_label("ID_a1b2c3d4e5") == 1 and dataset.ct_label("ID_f6e5d4c3b2") == 0
    assert any("ID_6431af929.dcm" in p for p in dataset.problems)
    assert any("ID_0000000001" in p and "no slice has a label" in p for p in dataset.problems)
    case = dataset.load("ID_a1b2c3d4e5")
    assert case.source == "rsna" and case.mask is None and case.image.shape == (5, 64, 64)
    assert case.slice_labels.tolist() == [0, 1, 1, 0, 0]  # in position order, not name order
    assert dataset.load("ID_f6e5d4c3b2").slice_labels.tolist() == [0, 0, 0]


def test_rsna_header_index_is_reused_until_a_file_changes(rsna_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    RSNADataset(rsna_root, SPEC, cache_dir=cache)
    assert len(list(cache.glob("rsna-*-index.json"))) == 1
    # move one slice to another series without changing size or mtime: the index still holds
    path = rsna_root / "stage_2_train" / "ID_8e0a2c4b6.dcm"
    stat = path.stat()
    ds = pydicom.dcmread(path)
    ds.SeriesInstanceUID = "ID_a1b2c3d4e5"
    ds.save_as(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert RSNADataset(rsna_root, SPEC, cache_dir=cache).ct_label("ID_f6e5d4c3b2") == 0
    assert len(RSNADataset(rsna_root, SPEC, cache_dir=cache)._series["ID_f6e5d4c3b2"]) == 3
    os.utime(path)  # now it looks changed and is read again
    assert len(RSNADataset(rsna_root, SPEC, cache_dir=cache)._series["ID_f6e5d4c3b2"]) == 2


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (("ID_9f1c2e3a1_any", "1"), "line 51: ID_9f1c2e3a1_any has contradicting labels"),
        (("ID_9f1c2e3a1_bleed", "0"), "line 51: ID 'ID_9f1c2e3a1_bleed' is not ID_<id>_<subtype>"),
        (("ID_9f1c2e3a1_any", "0.5"), "line 51: Label must be 0 or 1, got '0.5'"),
    ],
)
def test_rsna_bad_label_rows(rsna_root: Path, row: tuple[str, str], message: str) -> None:
    with (rsna_root / "stage_2_train.csv").open("a", newline="") as handle:
        csv.writer(handle).writerow(row)
    with pytest.raises(DatasetError, match="stage_2_train.csv") as error:
        RSNADataset(rsna_root, SPEC)
    assert message in str(error.value)


# ------------------------------------------------------------------------------------------
# PhysioNet CT-ICH
# ------------------------------------------------------------------------------------------

PHYSIONET_HEADER = [
    "PatientNumber", "SliceNumber", "Intraventricular", "Intraparenchymal", "Subarachnoid",
    "Epidural", "Subdural", "No_Hemorrhage", "Fracture_Yes_No",
]  # fmt: skip


def physionet_rows(patient: int, blood_by_slice_number: Sequence[int]) -> list[list[int]]:
    return [
        [patient, k + 1, 0, int(b), 0, 0, 0, int(not b), 0]
        for k, b in enumerate(blood_by_slice_number)
    ]


@pytest.fixture
def physionet_root(tmp_path: Path) -> Path:
    """Patient 49 stored as DICOM-like LPS axes, patient 50 the same head stored RAS with the
    slices reversed, patient 51 a negative case; 5 mm slices, 4 mm pixels."""
    root = (
        tmp_path
        / "computed-tomography-images-for-intracranial-hemorrhage-detection-and-segmentation-1.3.1"
    )
    (root / "ct_scans").mkdir(parents=True)
    (root / "masks").mkdir()
    hu = head(6, [3, 4])  # (slices, rows, columns), slices ascending head-ward
    hu[:, 5:10, 5:12] = 500.0  # an asymmetric mark, to see any flip
    mask = np.zeros(hu.shape, np.uint8)
    mask[[3, 4], 20:26, 36:44] = 255  # the real masks hold 0/255
    as_lps = np.transpose(hu, (2, 1, 0))  # (x, y, z): columns -> left, rows -> posterior
    lps_affine = np.diag([-SPACING, -SPACING, 5.0, 1.0])
    as_ras = as_lps[::-1, ::-1, ::-1]  # x -> right, y -> anterior, z -> inferior
    ras_affine = np.diag([SPACING, SPACING, -5.0, 1.0])
    for number, volume, maskv, affine in (
        (49, as_lps, np.transpose(mask, (2, 1, 0)), lps_affine),
        (50, as_ras, np.transpose(mask, (2, 1, 0))[::-1, ::-1, ::-1], ras_affine),
        (51, np.transpose(head(6), (2, 1, 0)), np.zeros((PX, PX, 6), np.uint8), lps_affine),
    ):
        nib.save(
            nib.Nifti1Image(volume.astype(np.int16), affine),
            root / "ct_scans" / f"{number:03d}.nii",
        )
        nib.save(
            nib.Nifti1Image(maskv.astype(np.uint8), affine), root / "masks" / f"{number:03d}.nii"
        )
    blood = [k in (3, 4) for k in range(6)]
    rows = physionet_rows(49, blood) + physionet_rows(50, blood[::-1]) + physionet_rows(51, [0] * 6)
    rows += physionet_rows(59, [0] * 4)  # 59-65: labels without a scan, as in the real data
    write_csv(root / "hemorrhage_diagnosis_raw_ct.csv", PHYSIONET_HEADER, rows)
    write_csv(
        root / "patient_demographics.csv",
        ["Patient Number", "Age\n(years)", "Gender"],
        [(49, 30, "Male")],
    )
    return root


def test_physionet_orientation_labels_and_masks(physionet_root: Path) -> None:
    dataset = PhysioNetCTICHDataset(physionet_root, SPEC)
    assert dataset.case_ids() == ["049", "050", "051"]
    assert [dataset.ct_label(c) for c in dataset.case_ids()] == [1, 1, 0]
    assert any("patient 059" in p for p in dataset.problems)
    lps, ras = dataset.load("049"), dataset.load("050")
    assert lps.image.shape == (6, 64, 64) and lps.source == "physionet"
    np.testing.assert_allclose(ras.image, lps.image, atol=1e-5)
    assert lps.slice_labels.tolist() == ras.slice_labels.tolist() == [0, 0, 0, 1, 1, 0]
    assert lps.mask is not None and ras.mask is not None
    np.testing.assert_array_equal(ras.mask, lps.mask)
    assert lps.mask.sum(axis=(1, 2)).nonzero()[0].tolist() == [3, 4]
    # the bone-bright mark sits top-left, as it was written in the DICOM-like array
    assert lps.image[0, 5:10, 5:12].mean() > 0.99
    negative = dataset.load("051")
    assert negative.mask is not None and negative.mask.sum() == 0
    assert negative.slice_labels.tolist() == [0] * 6


def test_physionet_errors(physionet_root: Path) -> None:
    path = physionet_root / "hemorrhage_diagnosis_raw_ct.csv"
    text = path.read_text()
    path.write_text(text.replace("51,6,0,0,0,0,0,1,0\n", ""))  # one slice of 51 unlabelled
    with pytest.raises(
        DatasetError, match=r"case '051'.*lists slices 1\.\.5 \(5 rows\) but the volume has 6"
    ):
        PhysioNetCTICHDataset(physionet_root, SPEC).load("051")
    sagittal = np.diag([5.0, SPACING, SPACING, 1.0])[[2, 0, 1, 3]]  # third axis runs left-right
    nib.save(
        nib.Nifti1Image(np.zeros((PX, PX, 6), np.int16), sagittal),
        physionet_root / "ct_scans" / "049.nii",
    )
    with pytest.raises(
        DatasetError, match=r"case '049', .*049\.nii: third array axis is not head-foot"
    ):
        PhysioNetCTICHDataset(physionet_root, SPEC).load("049")
    path.write_text(text.replace("49,1,0,0,0,0,0,1,0", "49,1,0,0,0,0,0,maybe,0"))
    with pytest.raises(DatasetError, match="line 2: No_Hemorrhage must be 0 or 1, got 'maybe'"):
        PhysioNetCTICHDataset(physionet_root, SPEC)


# ------------------------------------------------------------------------------------------
# CQ500
# ------------------------------------------------------------------------------------------


def cq500_reads(root: Path, reads: dict[int, tuple[int, int, int]]) -> None:
    header = ["name", "Category"] + [f"R{r}:{f}" for r in (1, 2, 3) for f in CQ500_FINDINGS]
    rows = []
    for number, (r1, r2, r3) in reads.items():
        values = [int(f == "ICH" and v) for v in (r1, r2, r3) for f in CQ500_FINDINGS]
        rows.append([f"CQ500-CT-{number}", "B1", *values])
    write_csv(root / "reads.csv", header, rows)


@pytest.fixture
def cq500_root(tmp_path: Path) -> Path:
    root = tmp_path / "qure.ai CQ500"
    scan = root / "CQ500CT0 CQ500CT0" / "Unknown Study"
    write_series(scan / "CT PLAIN THIN", head(6), "q0a", thickness=0.625, file_prefix="CT00000")
    write_series(scan / "CT BONE THIN", head(6), "q0b", thickness=0.625, series_number=3)
    write_series(scan / "CT 5mm", head(3), "q0c", thickness=5.0, series_number=4)
    write_series(scan / "CT POST CONTRAST", head(4), "q0d", thickness=0.5, series_number=5)
    write_series(root / "CQ500CT1 CQ500CT1" / "Unknown Study" / "CT 5mm", head(3), "q1")
    write_series(root / "CQ500CT2 CQ500CT2" / "Unknown Study" / "CT BONE", head(3), "q2")
    cq500_reads(root, {0: (1, 1, 0), 1: (1, 0, 0), 2: (0, 0, 0), 10: (1, 1, 1)})
    return root


def test_cq500_majority_label_readers_and_series_choice(cq500_root: Path) -> None:
    dataset = CQ500Dataset(cq500_root, SPEC)
    assert dataset.case_ids() == ["CQ500-CT-0", "CQ500-CT-1", "CQ500-CT-2"]
    assert any("CQ500-CT-10" in p for p in dataset.problems)
    assert [dataset.ct_label(c) for c in dataset.case_ids()] == [1, 0, 0]
    folder, files = dataset.select_series("CQ500-CT-0")
    assert folder.name == "CT PLAIN THIN" and len(files) == 6
    case = dataset.load("CQ500-CT-0")
    assert case.image.shape == (6, 64, 64) and case.source == "cq500"
    assert case.reader_labels == {"R1": 1, "R2": 1, "R3": 0} and case.ct_label == 1
    assert case.slice_labels.tolist() == [-1] * 6 and case.mask is None
    assert dataset.load("CQ500-CT-1").image.shape == (3, 64, 64)
    with pytest.raises(
        DatasetError, match=r"case 'CQ500-CT-2'.*no axial plain series \(CT BONE: bone"
    ):
        dataset.load("CQ500-CT-2")


# ------------------------------------------------------------------------------------------
# open_dataset, ConcatDataset, stratified_split
# ------------------------------------------------------------------------------------------


def test_open_dataset_by_kind_and_by_detection(
    tmp_path: Path, physionet_root: Path, cq500_root: Path
) -> None:
    root = layout(tmp_path / "ds", {"a": 0})
    assert isinstance(open_dataset(f"layout:{root}", SPEC), LayoutDataset)
    assert isinstance(open_dataset(root, SPEC), LayoutDataset)
    assert isinstance(open_dataset(f"physionet:{physionet_root}", SPEC), PhysioNetCTICHDataset)
    assert detect_source(physionet_root) == "physionet"
    assert isinstance(open_dataset(str(cq500_root), SPEC), CQ500Dataset)
    (tmp_path / "rsna").mkdir()
    write_csv(tmp_path / "rsna" / "stage_2_train.csv", ["ID", "Label"], [])
    assert detect_source(tmp_path / "rsna") == "rsna"
    with pytest.raises(DatasetError, match="not a known dataset"):
        open_dataset(tmp_path / "rsna" / "..", SPEC)
    with pytest.raises(DatasetError, match="dataset folder is missing"):
        open_dataset(f"cq500:{tmp_path / 'nowhere'}", SPEC)


def test_concat_prefixes_case_ids_and_keeps_same_kind_apart(tmp_path: Path) -> None:
    first = LayoutDataset(layout(tmp_path / "one", {"a": 1}), SPEC)
    second = LayoutDataset(layout(tmp_path / "two", {"a": 0, "b": 0}), SPEC)
    both = ConcatDataset([first, second])
    assert isinstance(both, CaseDataset)
    assert both.case_ids() == ["layout/a", "layout-2/a", "layout-2/b"]
    assert [both.ct_label(c) for c in both.case_ids()] == [1, 0, 0]
    case = both.load("layout-2/b")
    assert case.case_id == "layout-2/b" and case.ct_label == 0
    with pytest.raises(DatasetError, match="case 'other/a': unknown case id"):
        both.load("other/a")


def labels_only(root: Path, negatives: int, positives: int) -> LayoutDataset:
    rows = [(f"n{k:02d}", 0) for k in range(negatives)] + [
        (f"p{k:02d}", 1) for k in range(positives)
    ]
    write_csv(root / "labels.csv", ["case_id", "ct_label"], rows)
    return LayoutDataset(root, SPEC)  # ct_label needs no images


def test_stratified_split_is_stratified_disjoint_and_deterministic(tmp_path: Path) -> None:
    dataset = labels_only(tmp_path, 20, 10)
    training, validation = stratified_split(dataset, 0.7, seed=3)
    assert not set(training) & set(validation)
    assert sorted(training + validation) == dataset.case_ids()
    assert sum(c.startswith("n") for c in training) == 14
    assert sum(c.startswith("p") for c in training) == 7
    assert stratified_split(dataset, 0.7, seed=3) == (training, validation)
    assert stratified_split(dataset, 0.7, seed=4) != (training, validation)
    small = labels_only(tmp_path / "small", 2, 1)
    training, validation = stratified_split(small, 0.7)
    assert len(training) == 2 and len(validation) == 1  # each class of two has one on each side
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(dataset, 1.0)
