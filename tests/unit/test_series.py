"""Series selection from headers: which files are skipped, how instances group into series, and
which series are axial head CT (real vendor studies and generated edge cases)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet

from radnet_node.errors import InputError
from radnet_node.series import (
    SeriesGroup,
    classify_series,
    group_by_series,
    lossy_encoding,
    read_header,
    scan_paths,
    split_off_non_slices,
)
from training.dicom_writer import SeriesGeometry

PHILIPS = "dcm_qa_ct/Philips_Ingenuity_head_phantom"
GEOMETRY = SeriesGeometry(
    rows=16, columns=16, pixel_spacing_mm=(16.0, 16.0), table_positions_mm=(0, 5, 10, 15, 20)
)


def _by_folder(scan_series: tuple, root: Path) -> dict[str, tuple]:
    return {str(Path(g.paths[0]).parent.relative_to(root)): g for g in scan_series}


def test_philips_study_selection_table(dicom_data_dir: Path) -> None:
    root = dicom_data_dir / PHILIPS
    scan = scan_paths([root])
    groups = _by_folder(scan.series, root)
    expected = {
        "S21570/S1000": (False, "localizer"),
        "S21570/S2010": (True, "28 slices"),
        "S21570/S4010": (False, "secondary capture"),
        "S21610/S2010": (True, "tilted 18.5 deg"),
    }
    assert set(groups) == set(expected)
    for folder, (eligible, words) in expected.items():
        verdict = classify_series(groups[folder].headers)
        assert verdict.eligible is eligible, (folder, verdict)
        assert words in verdict.reason, (folder, verdict)
    # one DIRFILE per folder: skipped, not an error
    assert {Path(s.what).name for s in scan.skipped} == {"DIRFILE"}
    assert all("DICOMDIR" in s.reason and not s.is_error for s in scan.skipped)
    # both axial series of the one study are selected
    assert len({g.study_instance_uid for g in scan.series if g.paths[0].endswith("I10")}) <= 2


@pytest.mark.parametrize(
    ("relative", "eligible", "words"),
    [
        ("derived-transcoded/Philips_S21610_J2K_lossless", True, "54 slices"),
        ("derived-transcoded/Philips_S21610_LegacyConvertedEnhancedCT.dcm", True, "54 slices"),
        ("deid-data/ctbrain1.dcm", False, "secondary capture (RGB)"),
        ("pydicom-testfiles/693_UNCR.dcm", False, "too few slices: 1"),
        ("pydicom-testfiles/eCT_Supplemental.dcm", False, "PERFUSION"),
        ("pydicom-testfiles/liver.dcm", False, "Modality SEG"),
        ("pylibjpeg-data/MAROTECH_CT_JP2Lossy.dcm", False, "localizer"),
        ("pylibjpeg-data/TOSHIBA_J2K_SIZ0_PixRep1.dcm", False, "not axial: a coronal"),
    ],
)
def test_real_files_are_classified(
    dicom_data_dir: Path, relative: str, eligible: bool, words: str
) -> None:
    scan = scan_paths([dicom_data_dir / relative])
    assert len(scan.series) == 1
    verdict = classify_series(scan.series[0].headers)
    assert verdict.eligible is eligible
    assert words in verdict.reason


def test_generated_tilted_series_with_uneven_spacing_is_eligible(
    head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> None:
    geometry = SeriesGeometry(
        rows=16,
        columns=16,
        pixel_spacing_mm=(16.0, 16.0),
        table_positions_mm=(0.0, 2.0, 7.0, 8.0, 20.0, 21.5),
        gantry_tilt_deg=30.0,
    )
    paths = write_series(head_hu((6, 16, 16), (16.0, 16.0)), geometry, "tilt")
    verdict = classify_series([read_header(p) for p in paths])
    assert verdict.eligible
    assert "tilted 30.0 deg" in verdict.reason


def _header(**values: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = "1.2.3"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("values", "eligible", "words"),
    [
        ({}, True, "BodyPartExamined missing"),
        ({"BodyPartExamined": "HEAD"}, True, "BodyPartExamined names the head"),
        ({"BodyPartExamined": "CHEST"}, False, "not a head CT: BodyPartExamined CHEST"),
        ({"BodyPartExamined": "CHEST", "ProtocolName": "Kopf nativ"}, True, "ProtocolName"),
        ({"StudyDescription": "CT SCHAEDEL"}, True, "StudyDescription"),
        ({"BodyPartExamined": "NECK"}, True, "'NECK' not excluded"),
        ({"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}, False, "sagittal"),
        # 40 degrees from z: still axial (a steep gantry tilt)
        ({"ImageOrientationPatient": [1, 0, 0, 0, 0.766, -0.643]}, True, "tilted 40.0 deg"),
        ({"ImageOrientationPatient": [1, 0, 0, 0, 0.5, -0.866]}, False, "coronal"),
        ({"Modality": "MR"}, False, "Modality MR"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, False, "localizer"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.67"}, False, "dose report"),
        ({"SOPClassUID": pydicom.uid.SecondaryCaptureImageStorage}, False, "secondary capture"),
        ({"SeriesDescription": "Dose Report"}, False, "dose"),
        ({"PhotometricInterpretation": "RGB", "SamplesPerPixel": 3}, False, "not greyscale"),
    ],
)
def test_header_rules(values: dict[str, object], eligible: bool, words: str) -> None:
    verdict = classify_series([_header(**values) for _ in range(5)], min_slices=5)
    assert verdict.eligible is eligible, verdict
    assert words in verdict.reason, verdict


def test_slice_count_counts_frames_and_respects_min_slices() -> None:
    headers = [_header() for _ in range(4)]
    assert not classify_series(headers, min_slices=5).eligible
    assert "too few slices: 4, at least 5" in classify_series(headers, min_slices=5).reason
    assert classify_series(headers, min_slices=4).eligible


def test_lossy_compressed_series_are_refused_unless_accepted() -> None:
    headers = [_header() for _ in range(5)]
    assert classify_series(headers).eligible
    headers[2].LossyImageCompression = "01"
    verdict = classify_series(headers)
    assert not verdict.eligible
    assert "lossy-compressed: 1 of 5 instance(s) have LossyImageCompression 01" in verdict.reason
    assert "accept_lossy" in verdict.reason
    assert classify_series(headers, accept_lossy=True).eligible
    headers[2].LossyImageCompression = "00"  # "not subjected to lossy compression"
    assert classify_series(headers).eligible


@pytest.mark.parametrize(
    ("name", "words"),
    [
        # real files: a vendor's lossy JPEG 2000 without the flag, and flagged ones
        ("pylibjpeg-data/MAROTECH_CT_JP2Lossy.dcm", "JPEG 2000 Image Compression with the irr"),
        ("pylibjpeg-data/ELSCINT1_JP2vsJ2K.dcm", "irreversible 9-7 wavelet"),
        ("pylibjpeg-data/CT1_JLSN.dcm", "Near-Lossless) Image Compression with NEAR 4"),
        ("deid-data/ctbrain1.dcm", "JPEG Baseline (Process 1) is lossy"),
        ("pydicom-testfiles/693_J2KR.dcm", None),
        ("pylibjpeg-data/TOSHIBA_J2K_SIZ1_PixRep0.dcm", None),
        ("pylibjpeg-data/JPEGLossless_1s_1f_i_16_16_bad.dcm", None),
        ("pydicom-testfiles/693_UNCR.dcm", None),
    ],
)
def test_lossy_encodings_are_told_from_the_codestream(
    dicom_data_dir: Path, name: str, words: str | None
) -> None:
    found = lossy_encoding([read_header(dicom_data_dir / name)])  # the pixels read from the file
    assert found is None if words is None else words in str(found), found


def test_a_lossy_encoding_without_the_flag_is_refused_unless_accepted(
    dicom_data_dir: Path, tmp_path: Path
) -> None:
    # pydicom's own lossy JPEG 2000 encoder writes no LossyImageCompression
    headers = []
    for k in range(5):
        ds = pydicom.dcmread(dicom_data_dir / "pydicom-testfiles" / "693_UNCR.dcm")
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.7{k}"
        if k == 3:
            ds.compress(pydicom.uid.JPEG2000, j2k_cr=[20])
        assert "LossyImageCompression" not in ds
        ds.save_as(tmp_path / f"{k}.dcm", enforce_file_format=True)
        headers.append(read_header(tmp_path / f"{k}.dcm"))
    verdict = classify_series(headers)
    assert not verdict.eligible
    assert "lossy-compressed: JPEG 2000 Image Compression with the irreversible 9-7" in (
        verdict.reason
    )
    assert "LossyImageCompression does not say so" in verdict.reason
    assert classify_series(headers, accept_lossy=True).eligible


def test_mixed_series_names_the_offending_instance() -> None:
    headers = [_header() for _ in range(5)]
    headers[3].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    headers[3].filename = "/data/scout.dcm"
    verdict = classify_series(headers)
    assert not verdict.eligible
    assert "/data/scout.dcm" in verdict.reason


def test_odd_instances_are_split_off_a_series_of_slices() -> None:
    headers = [_header() for _ in range(6)]
    headers[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    headers[5].SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR
    headers[5].Modality = "SR"
    group = SeriesGroup("1.2", "1.2.3", tuple(headers), tuple(f"/in/{k}.dcm" for k in range(6)))

    kept, left_out = split_off_non_slices(group)

    assert kept.paths == ("/in/1.dcm", "/in/2.dcm", "/in/3.dcm", "/in/4.dcm")
    assert kept.headers == tuple(headers[1:5])
    assert [(s.what, s.is_error) for s in left_out] == [("/in/0.dcm", False), ("/in/5.dcm", False)]
    assert left_out[0].reason == "a localizer (scout) image: left out of series 1.2.3"
    assert left_out[1].reason == "a radiation dose report: left out of series 1.2.3"
    assert classify_series(kept.headers, min_slices=4).eligible


def test_a_coronal_image_saved_among_axial_slices_is_left_out() -> None:
    headers = [_header() for _ in range(6)]
    headers[5].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    group = SeriesGroup("1.2", "1.2.3", tuple(headers), tuple(f"/in/{k}.dcm" for k in range(6)))
    kept, left_out = split_off_non_slices(group)
    assert len(kept.paths) == 5
    assert [(s.what, s.reason) for s in left_out] == [
        ("/in/5.dcm", "a coronal image among axial slices: left out of series 1.2.3")
    ]
    # a series that is mostly coronal is not turned into an axial one
    for ds in headers[:4]:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    assert split_off_non_slices(group) == (group, ())


def test_a_series_of_nothing_but_odd_instances_is_left_whole() -> None:
    headers = [_header(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]) for _ in range(3)]
    group = SeriesGroup("1.2", "1.2.3", tuple(headers), ("/a", "/b", "/c"))
    assert split_off_non_slices(group) == (group, ())
    assert "localizer" in classify_series(group.headers, min_slices=1).reason


def test_scan_skips_non_dicom_reports_corrupt_and_duplicate_files(
    tmp_path: Path, head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> None:
    paths = write_series(head_hu((5, 16, 16), (16.0, 16.0)), GEOMETRY, "a")
    (tmp_path / "a" / "notes.txt").write_text("not DICOM")
    (tmp_path / "a" / ".hidden").write_text("ignored")
    corrupt = tmp_path / "a" / "corrupt.dcm"
    corrupt.write_bytes(paths[0].read_bytes()[:300])  # header cut in the middle
    copy = tmp_path / "copy.dcm"
    copy.write_bytes(paths[1].read_bytes())
    # a folder and a file inside it: each file is read once
    scan = scan_paths([tmp_path / "a", paths[0], copy])
    assert len(scan.series) == 1
    assert len(scan.series[0].paths) == 5
    reasons = {Path(s.what).name: s for s in scan.skipped}
    assert set(reasons) == {"notes.txt", "corrupt.dcm", "copy.dcm"}
    assert not reasons["notes.txt"].is_error
    assert reasons["corrupt.dcm"].is_error
    assert "corrupt DICOM file" in reasons["corrupt.dcm"].reason
    assert "same SOPInstanceUID" in reasons["copy.dcm"].reason


def test_of_two_copies_of_an_instance_the_complete_one_is_kept(
    tmp_path: Path, head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> None:
    paths = write_series(head_hu((5, 16, 16), (16.0, 16.0)), GEOMETRY, "a")
    cut = tmp_path / "0-cut.dcm"  # scanned first; its header is whole, its pixel data is not
    cut.write_bytes(paths[2].read_bytes()[:-200])
    scan = scan_paths([cut, tmp_path / "a"])
    assert len(scan.series) == 1
    assert str(paths[2]) in scan.series[0].paths
    assert str(cut) not in scan.series[0].paths
    (skipped,) = scan.skipped
    assert skipped.what == str(cut)
    assert f"same SOPInstanceUID as {paths[2]}" in skipped.reason


def test_a_dicomdir_given_by_name_stands_for_the_files_it_lists(dicom_data_dir: Path) -> None:
    # users of CDs point at the DICOMDIR; Philips calls it DIRFILE and puts it two levels below
    # the root its file IDs start from
    folder = dicom_data_dir / PHILIPS / "S21610" / "S2010"
    scan = scan_paths([folder / "DIRFILE"])
    assert [len(g.paths) for g in scan.series] == [54]
    assert scan.skipped == ()


def test_a_dicomdir_runs_only_what_it_lists_and_names_what_is_missing(
    tmp_path: Path, head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> None:
    listed = write_series(head_hu((5, 16, 16), (16.0, 16.0)), GEOMETRY, "listed")
    fileset = FileSet()
    for path in listed:
        fileset.add(path)
    cd = tmp_path / "cd"
    fileset.write(cd)
    # another patient's series lies in the same folder but is not in the DICOMDIR
    other = write_series(head_hu((5, 16, 16), (16.0, 16.0)), GEOMETRY, "other")
    (cd / "OTHER").mkdir()
    for path in other:
        (cd / "OTHER" / path.name).write_bytes(path.read_bytes())
    scan = scan_paths([cd / "DICOMDIR"])
    assert [len(g.paths) for g in scan.series] == [5]
    assert scan.series[0].series_instance_uid == pydicom.dcmread(listed[0]).SeriesInstanceUID
    assert scan.skipped == ()

    gone = Path(scan.series[0].paths[2])
    gone.unlink()
    scan = scan_paths([cd / "DICOMDIR"])
    (missing,) = scan.skipped
    assert (missing.what, missing.is_error) == (str(gone), True)


def test_scan_of_a_missing_path_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        scan_paths([tmp_path / "absent"])


def test_group_by_series_orders_instances_and_series(
    head_hu: Callable[..., np.ndarray], write_series: Callable[..., list[Path]]
) -> None:
    hu = head_hu((5, 16, 16), (16.0, 16.0))
    late = write_series(hu, GEOMETRY, "b", series_number=7, instance_numbers=[5, 3, 1, 2, 4])
    early = write_series(hu, GEOMETRY, "b", series_number=3, file_prefix="X")
    pairs = [(str(p), read_header(p)) for p in [*late, *early]]
    groups = group_by_series(pairs[::-1])
    assert [int(g.first.SeriesNumber) for g in groups] == [3, 7]
    assert [int(ds.InstanceNumber) for ds in groups[1].headers] == [1, 2, 3, 4, 5]
    assert groups[1].number_of_frames == 5
    assert groups[1].label.startswith('#7 "HEAD 5MM (SYNTHETIC)"')
