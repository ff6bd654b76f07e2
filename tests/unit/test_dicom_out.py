"""Unit tests of radnet_node.dicom_out: SR, SEG and key image built from hand-made results on small
generated CT series (and the real multi-frame Legacy Converted Enhanced CT)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage, SegmentationStorage

from radnet_node.dicom_out import (
    DicomOutputs,
    NodeIdentity,
    build_outputs,
    build_seg,
    build_sr,
    common,
    device_uid_for,
    output_uids,
    source_value_problems,
)
from radnet_node.dicom_out.key_image import (
    NOT_FOR_DIAGNOSIS,
    patient_orientation,
    render_key_image,
)
from radnet_node.dicom_out.seg import seg_frames
from radnet_node.errors import SeriesError
from radnet_node.preprocess import PreprocessSpec, prepare_series, read_hu_slices
from radnet_node.results import ModelInfo, SeriesResult
from training.dicom_writer import SeriesGeometry

SPEC = PreprocessSpec(min_slices=3)
MODEL = ModelInfo(name="RADnet", version="1.2.0", variant="full", sha256="0123456789abcdef" * 4)
IDENTITY = NodeIdentity(institution_name="Test Hospital", station_name="RADNET1")
ROWS = COLUMNS = 64
SPACING = (3.5, 3.5)
LCE_FILE = Path("derived-transcoded") / "Philips_S21610_LegacyConvertedEnhancedCT.dcm"


# ----------------------------------------------------------------------------------------------
# helpers


def make_result(
    paths: Sequence[Path | str],
    positive_slices: Sequence[int],
    *,
    model: ModelInfo = MODEL,
    box: tuple[slice, slice] = (slice(28, 36), slice(26, 40)),
) -> SeriesResult:
    """A result on a written series: probability 0.9 on ``positive_slices``, mask ``box`` there."""
    series = prepare_series(list(paths), SPEC)
    n = len(series.slices)
    probabilities = np.full(n, 0.05)
    mask = np.zeros((n, *series.source_shape), dtype=bool)
    for rank, k in enumerate(positive_slices):
        probabilities[k] = 0.7 + 0.05 * rank
        mask[k][box] = True
    voxel_ml = SPACING[0] * SPACING[1] * 5.0 / 1000.0
    return SeriesResult(
        series=series,
        slice_probabilities=probabilities,
        threshold=0.5,
        min_consecutive=3,
        ct_positive=len(positive_slices) >= 3,
        certainty=0.87 if positive_slices else 0.93,
        hemorrhage_mask=mask,
        hemorrhage_volume_ml=float(mask.sum()) * voxel_ml,
        model=model,
    )


def headers(paths: Sequence[Path | str], *, pixels: bool = False) -> dict[str, Dataset]:
    """Source headers keyed by SOP Instance UID, as the node's catalog hands them over."""
    read = [pydicom.dcmread(p, stop_before_pixels=not pixels) for p in paths]
    return {str(ds.SOPInstanceUID): ds for ds in read}


def key_hu(paths: Sequence[Path | str], result: SeriesResult) -> np.ndarray:
    return read_hu_slices(list(paths), SPEC).hu[result.key_slice_index]


def reread(ds: Dataset) -> Dataset:
    """Encode and decode: what a receiver of the object sees."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


@pytest.fixture
def regular_series(
    write_series: Callable[..., list[Path]], head_hu: Callable[..., np.ndarray]
) -> list[Path]:
    """Six 64x64 axial slices, 5 mm apart."""
    geometry = SeriesGeometry(
        rows=ROWS,
        columns=COLUMNS,
        pixel_spacing_mm=SPACING,
        table_positions_mm=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    )
    hu = head_hu((6, ROWS, COLUMNS), SPACING)
    return write_series(hu, geometry, name="regular")


@pytest.fixture
def tilted_series(
    write_series: Callable[..., list[Path]], head_hu: Callable[..., np.ndarray]
) -> list[Path]:
    """Six slices with a 15 degree gantry tilt and uneven spacing, written out of order."""
    geometry = SeriesGeometry(
        rows=ROWS,
        columns=COLUMNS,
        pixel_spacing_mm=SPACING,
        table_positions_mm=(0.0, 4.0, 10.0, 13.0, 20.0, 27.5),
        gantry_tilt_deg=15.0,
    )
    hu = head_hu((6, ROWS, COLUMNS), SPACING)
    return write_series(hu, geometry, name="tilted", instance_numbers=[6, 5, 4, 3, 2, 1])


@pytest.fixture
def positive(regular_series: list[Path]) -> tuple[SeriesResult, dict[str, Dataset], DicomOutputs]:
    result = make_result(regular_series, [2, 3, 4])
    sources = headers(regular_series)
    outputs = build_outputs(result, sources, IDENTITY, key_slice_hu=key_hu(regular_series, result))
    return result, sources, outputs


# ----------------------------------------------------------------------------------------------
# UIDs and identity


def test_output_uids_are_stable_for_the_same_inputs(regular_series: list[Path]) -> None:
    first = output_uids(make_result(regular_series, [2, 3, 4]))
    again = output_uids(make_result(regular_series, [1, 2, 3]))  # other findings, same inputs
    assert first == again
    uids = [
        first.sr_series,
        first.sr_instance,
        first.seg_series,
        first.seg_instance,
        first.key_image_series,
        first.key_image_instance,
    ]
    assert len(set(uids)) == 6
    assert all(uid.is_valid for uid in uids)
    assert first.derive("tracking/x") == again.derive("tracking/x") != first.derive("tracking/y")


@pytest.mark.parametrize(
    "other_model",
    [
        ModelInfo(MODEL.name, MODEL.version, MODEL.variant, "f" * 64),
        ModelInfo(MODEL.name, "1.3.0", MODEL.variant, MODEL.sha256),
    ],
    ids=["other-sha256", "other-version"],
)
def test_output_uids_change_with_the_model(
    regular_series: list[Path], other_model: ModelInfo
) -> None:
    ours = output_uids(make_result(regular_series, [2, 3, 4]))
    theirs = output_uids(make_result(regular_series, [2, 3, 4], model=other_model))
    assert {ours.sr_instance, ours.seg_instance, ours.key_image_instance}.isdisjoint(
        {theirs.sr_instance, theirs.seg_instance, theirs.key_image_instance}
    )
    assert ours.sr_series != theirs.sr_series


def test_output_uids_change_when_an_instance_is_added(regular_series: list[Path]) -> None:
    full = output_uids(make_result(regular_series, []))
    partial = output_uids(make_result(regular_series[:5], []))
    assert full.sr_instance != partial.sr_instance


def test_building_twice_gives_the_same_uids(
    regular_series: list[Path], positive: tuple[SeriesResult, dict[str, Dataset], DicomOutputs]
) -> None:
    result, sources, outputs = positive
    again = build_outputs(result, sources, IDENTITY, key_slice_hu=key_hu(regular_series, result))
    for kind in ("sr", "seg", "key_image"):
        assert getattr(again, kind).SOPInstanceUID == getattr(outputs, kind).SOPInstanceUID
        assert getattr(again, kind).SeriesInstanceUID == getattr(outputs, kind).SeriesInstanceUID


def test_node_identity_derives_a_stable_device_uid_from_its_name() -> None:
    assert NodeIdentity().device_uid == NodeIdentity().device_uid == device_uid_for("radnet-node")
    assert NodeIdentity(name="node-b").device_uid != NodeIdentity().device_uid
    assert NodeIdentity(device_uid="1.2.3.4").device_uid == "1.2.3.4"
    with pytest.raises(ValueError, match="device_uid"):
        NodeIdentity(device_uid="not a uid")
    with pytest.raises(ValueError, match="manufacturer"):
        NodeIdentity(manufacturer=" ")


# ----------------------------------------------------------------------------------------------
# what all three objects share


def test_objects_land_in_the_source_study_in_new_numbered_series(
    positive: tuple[SeriesResult, dict[str, Dataset], DicomOutputs],
) -> None:
    result, sources, outputs = positive
    source = next(iter(sources.values()))
    uids = output_uids(result)
    expected = {
        "sr": (9901, uids.sr_series, uids.sr_instance, "RADnet ICH SR (UNVERIFIED, research use)"),
        "seg": (
            9902,
            uids.seg_series,
            uids.seg_instance,
            "RADnet ICH SEG (UNVERIFIED, research use)",
        ),
        "key_image": (
            9903,
            uids.key_image_series,
            uids.key_image_instance,
            "RADnet ICH key image (NOT FOR DIAGNOSIS)",
        ),
    }
    for kind, (number, series_uid, sop_uid, description) in expected.items():
        ds = reread(getattr(outputs, kind))
        assert ds.SeriesNumber == number
        assert ds.SeriesInstanceUID == series_uid
        assert ds.SOPInstanceUID == sop_uid
        assert ds.SeriesDescription == description
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        for keyword in (
            "StudyInstanceUID",
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyDate",
            "StudyTime",
            "StudyID",
            "AccessionNumber",
            "StudyDescription",
        ):
            assert ds[keyword].value == source[keyword].value, (kind, keyword)
        assert ds.Manufacturer == IDENTITY.manufacturer
        assert ds.DeviceSerialNumber == IDENTITY.device_uid
        assert ds.InstitutionName == "Test Hospital"
        purposes = [
            item.PurposeOfReferenceCodeSequence[0].CodeValue
            for item in ds.ContributingEquipmentSequence
        ]
        assert "Newcode1" in purposes, kind


def test_builders_leave_the_source_headers_untouched(regular_series: list[Path]) -> None:
    result = make_result(regular_series, [2, 3, 4])
    sources = headers(regular_series, pixels=True)
    before = copy.deepcopy(sources)
    build_outputs(result, sources, IDENTITY, key_slice_hu=key_hu(regular_series, result))
    assert sources == before


TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


@pytest.mark.parametrize("how", ["missing", "empty"])
def test_sources_without_type2_patient_study_values_or_slice_thickness_still_build(
    regular_series: list[Path], how: str
) -> None:
    # anonymisers drop or empty type 2 attributes; highdicom reads them unconditionally
    result = make_result(regular_series, [2, 3, 4])
    sources = headers(regular_series)
    for ds in sources.values():
        for keyword in (*TYPE2_PATIENT_STUDY, "SliceThickness"):
            if how == "missing":
                if keyword in ds:
                    del ds[keyword]
            else:
                setattr(ds, keyword, None)
    outputs = build_outputs(result, sources, IDENTITY, key_slice_hu=key_hu(regular_series, result))

    for kind in ("sr", "seg", "key_image"):
        ds = reread(getattr(outputs, kind))
        for keyword in TYPE2_PATIENT_STUDY:
            assert keyword in ds and not ds[keyword].value, (kind, keyword)
    seg = reread(outputs.seg)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(5.0)  # the slice spacing


@pytest.mark.parametrize(
    ("removed", "method", "expected"),
    [
        ("YES", None, common.UNSTATED_DEIDENTIFICATION_METHOD),  # CQ500's images
        ("YES", "CTP Basic Profile", "CTP Basic Profile"),
        ("NO", None, None),
        (None, None, None),
    ],
)
def test_a_de_identified_source_without_its_method_gets_one_in_the_outputs(
    regular_series: list[Path], removed: str | None, method: str | None, expected: str | None
) -> None:
    # the standard requires a method once PatientIdentityRemoved is YES
    result = make_result(regular_series, [2, 3, 4])
    sources = headers(regular_series)
    for ds in sources.values():
        if removed is not None:
            ds.PatientIdentityRemoved = removed
        if method is not None:
            ds.DeidentificationMethod = method
    outputs = build_outputs(result, sources, IDENTITY, key_slice_hu=key_hu(regular_series, result))
    for kind in ("sr", "seg", "key_image"):
        ds = reread(getattr(outputs, kind))
        assert ds.get("PatientIdentityRemoved") == removed, kind
        assert ds.get("DeidentificationMethod") == expected, kind
        assert "DeidentificationMethodCodeSequence" not in ds, kind


@pytest.mark.parametrize(
    ("source", "expected"),
    [("BRAIN", "BRAIN"), ("SKULL", "SKULL"), ("Head", "HEAD"), ("KOPF", "HEAD"), (None, "HEAD")],
)
def test_outputs_name_the_body_part_with_a_defined_term(
    regular_series: list[Path], source: str | None, expected: str
) -> None:
    # "Head" is no CS value, and validators ask KOPF or CABEZA series for a Laterality
    result = make_result(regular_series, [2, 3, 4])
    sources = headers(regular_series)
    for ds in sources.values():
        if source is None:
            ds.pop("BodyPartExamined", None)
        else:
            ds.BodyPartExamined = source
    outputs = build_outputs(result, sources, IDENTITY, key_slice_hu=key_hu(regular_series, result))
    for kind in ("seg", "key_image"):
        assert reread(getattr(outputs, kind)).BodyPartExamined == expected, kind


def test_a_series_without_a_frame_of_reference_gets_one_derived_from_its_uid(
    regular_series: list[Path],
) -> None:
    # the CQ500 images have none; highdicom refuses such sources for a SEG
    result = make_result(regular_series, [2, 3, 4])
    sources = headers(regular_series)
    for ds in sources.values():
        del ds.FrameOfReferenceUID
    expected = common.derived_frame_of_reference_uid(result.series_instance_uid)
    for _ in range(2):  # the same for every build of the series' results
        outputs = build_outputs(
            result, sources, IDENTITY, key_slice_hu=key_hu(regular_series, result)
        )
        seg = reread(outputs.seg)
        assert seg.FrameOfReferenceUID == expected
        assert all(
            frame.PlanePositionSequence[0].ImagePositionPatient
            for frame in seg.PerFrameFunctionalGroupsSequence
        )
    assert expected.is_valid and expected != result.series_instance_uid
    assert all("FrameOfReferenceUID" not in ds for ds in sources.values())  # left untouched
    # not a fault carried into the outputs: result.json and the audit say it (test_jobs)
    first = next(iter(sources.values()))
    assert not any(p.startswith("FrameOfReferenceUID") for p in source_value_problems(first))


def test_one_component_patient_names_are_not_judged_in_warnings(regular_series: list[Path]) -> None:
    # highdicom warns about "HEAD" (the Philips phantom's name) quoting it: a patient name in the
    # process log, about a value the node copies verbatim on purpose
    result = make_result(regular_series, [2, 3, 4])
    sources = headers(regular_series)
    for ds in sources.values():
        ds.PatientName = "HEAD"
    with warnings.catch_warnings(record=True) as caught:
        outputs = build_outputs(
            result, sources, IDENTITY, key_slice_hu=key_hu(regular_series, result)
        )
    assert reread(outputs.sr).PatientName == "HEAD"
    assert [str(w.message) for w in caught if "HEAD" in str(w.message)] == []


@pytest.mark.filterwarnings("ignore:Unknown encoding")
@pytest.mark.parametrize(
    ("character_set", "patient_name"),
    [
        # code extensions with an empty value 1 (= ISO 2022 IR 6): the usual Japanese form
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=\u5c71\u7530^\u592a\u90ce"),
        (["", "ISO 2022 IR 149"], "Hong^Gildong=\ud64d^\uae38\ub3d9"),
        ("ISO_IR 192", "M\u00fcller^J\u00fcrgen"),
        # a value no library knows: kept as it came, the objects still build
        ("ISO_IR 999", "Doe^John"),
    ],
)
def test_patient_names_keep_the_source_s_character_set(
    regular_series: list[Path], character_set: str | list[str], patient_name: str
) -> None:
    result = make_result(regular_series, [2, 3, 4])
    sources = headers(regular_series)
    for ds in sources.values():
        ds.SpecificCharacterSet = character_set
        ds.PatientName = patient_name
    outputs = build_outputs(result, sources, IDENTITY, key_slice_hu=key_hu(regular_series, result))
    for kind in ("sr", "seg", "key_image"):
        ds = reread(getattr(outputs, kind))
        assert ds.SpecificCharacterSet == character_set, kind
        assert str(ds.PatientName) == patient_name, kind


def _encoded(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_source_value_problems_name_the_attribute_and_the_fault_not_the_value(
    regular_series: list[Path],
) -> None:
    ds = next(iter(headers(regular_series).values()))
    ds.PatientWeight, ds.PatientSize, ds.PatientAge = "72", "1.75", "054Y"  # read as numbers
    ds = pydicom.dcmread(BytesIO(_encoded(ds)))
    assert source_value_problems(ds) == []
    if "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet  # the default repertoire
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns as the values are set
        ds.StudyID = "S" * 18
        ds.PatientName = "M\u00fcller^J\u00fcrgen"
        ds.StudyDate = "2026-11-26"
    problems = source_value_problems(ds)
    assert [p.split(":")[0] for p in problems] == ["PatientName", "StudyDate", "StudyID"]
    assert "no Specific Character Set declares them" in problems[0]
    assert not any("M\u00fcller" in p or "2026-11-26" in p for p in problems)
    ds.SpecificCharacterSet = "ISO_IR 100"  # now the name's characters are declared
    assert [p.split(":")[0] for p in source_value_problems(ds)] == ["StudyDate", "StudyID"]


@pytest.mark.parametrize("sex", ["M", "U"], ids=["valid-values", "with-a-value-to-blank"])
def test_a_private_element_that_does_not_fit_its_dictionary_vr_does_not_stop_the_outputs(
    regular_series: list[Path], tmp_path: Path, sex: str
) -> None:
    # a Philips private element holding text where pydicom's private dictionary says FD: in an
    # Implicit VR file (or stored as UN by a PACS) it cannot be decoded; nothing needs it (also
    # not when a value highdicom refuses makes the builders copy the header for it)
    result = make_result(regular_series, [2, 3, 4])
    sources: dict[str, Dataset] = {}
    for path in regular_series:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ds.PatientSex = sex
        ds.add_new(0x01F10010, "LO", "ELSCINT1")
        ds.add_new(0x01F11026, "UN", b"0.391 ")
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        written = tmp_path / path.name
        ds.save_as(written, implicit_vr=True, little_endian=True)
        read = pydicom.dcmread(written, stop_before_pixels=True)
        sources[str(read.SOPInstanceUID)] = read
    with pytest.raises(Exception, match="01F1,1026"):  # the trap is real
        list(copy.deepcopy(next(iter(sources.values()))))  # iterating decodes every element
    outputs = build_outputs(result, sources, IDENTITY, key_slice_hu=key_hu(regular_series, result))
    assert reread(outputs.seg).SOPClassUID == SegmentationStorage
    assert outputs.key_image is not None
    assert reread(outputs.key_image).PatientSex == sex


def test_dates_times_and_sex_highdicom_refuses_are_copied_and_reported(
    regular_series: list[Path],
) -> None:
    result = make_result(regular_series, [2, 3, 4])
    sources = headers(regular_series)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns as the values are set
        for ds in sources.values():
            ds.PatientSex, ds.PatientBirthDate = "U", "00000000"
            ds.StudyDate, ds.StudyTime = "20150230", "09:28:15"
    outputs = build_outputs(result, sources, IDENTITY, key_slice_hu=key_hu(regular_series, result))
    for kind in ("sr", "seg", "key_image"):
        ds = reread(getattr(outputs, kind))
        # the values as they came, so the objects file with their study
        assert (ds.PatientSex, ds.PatientBirthDate) == ("U", "00000000"), kind
        assert (ds.StudyDate, ds.StudyTime) == ("20150230", "09:28:15"), kind
    problems = source_value_problems(next(iter(sources.values())))
    assert [p.split(":")[0] for p in problems] == [
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
    ]
    assert not any("00000000" in p or "20150230" in p for p in problems)


def test_source_value_problems_report_person_names_and_uids_the_outputs_carry(
    regular_series: list[Path],
) -> None:
    sources = list(headers(regular_series).values())
    first = sources[0]
    assert source_value_problems(first, sources) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns as the values are set
        first.PatientName = "A^B^C^D^E^F"
        first.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.0123.45"  # a leading zero
        for ds in sources[:2]:
            ds.SOPInstanceUID = str(ds.SOPInstanceUID)[:50] + ".011"
    problems = source_value_problems(first, sources)
    assert [p.split(":")[0] for p in problems] == [
        "PatientName",
        "SeriesInstanceUID",
        "SOPInstanceUID",
    ]
    assert "in 2 of 6 source instances" in problems[-1]


def test_positive_result_without_key_slice_is_refused(regular_series: list[Path]) -> None:
    result = make_result(regular_series, [2, 3, 4])
    with pytest.raises(SeriesError, match="key_slice_hu") as caught:
        build_outputs(result, headers(regular_series), IDENTITY)
    assert result.series_instance_uid in str(caught.value)


def test_missing_source_header_is_named(regular_series: list[Path]) -> None:
    result = make_result(regular_series, [2, 3, 4])
    sources = headers(regular_series)
    missing = result.series.slices[4].sop_instance_uid
    del sources[missing]
    with pytest.raises(SeriesError, match=missing):
        build_outputs(result, sources, IDENTITY, key_slice_hu=key_hu(regular_series, result))


# ----------------------------------------------------------------------------------------------
# SR


def _sr_groups(sr: Dataset) -> tuple[list, list]:
    report = hd.sr.Comprehensive3DSR.from_dataset(reread(sr)).content
    return report.get_image_measurement_groups(), report.get_volumetric_roi_measurement_groups()


def test_sr_positive_reports_finding_slices_and_volume(
    positive: tuple[SeriesResult, dict[str, Dataset], DicomOutputs],
) -> None:
    result, _, outputs = positive
    sr = reread(outputs.sr)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    image_groups, volume_groups = _sr_groups(outputs.sr)
    study, *per_slice = image_groups
    assert study.finding_type.value == "1386000"
    assert study.finding_sites[0].value.value == "12738006"
    [presence] = study.get_qualitative_evaluations()
    assert (presence.name.value, presence.value.value) == ("1386000", "52101004")
    [certainty] = study.get_measurements()
    assert (certainty.name.value, certainty.unit.value) == ("111012", "%")
    assert certainty.value == pytest.approx(87.0)

    assert len(per_slice) == 3
    for group, k in zip(per_slice, result.positive_slice_indices, strict=True):
        [source] = group.source_images
        assert source.referenced_sop_instance_uid == result.series.slices[k].sop_instance_uid
        assert group.get_measurements()[0].value == pytest.approx(
            100.0 * result.slice_probabilities[k]
        )

    [volume] = volume_groups
    segment = volume.referenced_segment
    assert segment.referenced_sop_instance_uid == outputs.seg.SOPInstanceUID
    assert segment.referenced_segment_numbers == [1]
    assert segment.source_series_for_segmentation.value == result.series_instance_uid
    [measurement] = volume.get_measurements()
    assert (measurement.name.value, measurement.unit.value) == ("118565006", "ml")
    assert measurement.value == pytest.approx(result.hemorrhage_volume_ml, abs=1e-3)
    # the SR's volume finding and the SEG segment are one tracked finding
    assert volume.tracking_uid == outputs.seg.SegmentSequence[0].TrackingUID

    evidence = {
        item.ReferencedSOPInstanceUID
        for study_item in sr.CurrentRequestedProcedureEvidenceSequence
        for series_item in study_item.ReferencedSeriesSequence
        for item in series_item.ReferencedSOPSequence
    }
    assert evidence == {s.sop_instance_uid for s in result.series.slices} | {
        outputs.seg.SOPInstanceUID
    }


def test_sr_observer_is_the_device_and_names_the_algorithm(
    positive: tuple[SeriesResult, dict[str, Dataset], DicomOutputs],
) -> None:
    _, _, outputs = positive
    report = hd.sr.Comprehensive3DSR.from_dataset(reread(outputs.sr)).content
    [observer] = report.get_observer_contexts()
    assert observer.observer_type.value == "121007"
    assert observer.observer_identifying_attributes.uid == IDENTITY.device_uid
    image_groups, volume_groups = _sr_groups(outputs.sr)
    for group in [*image_groups, *volume_groups]:
        texts = {
            item.ConceptNameCodeSequence[0].CodeValue: item.TextValue
            for item in group[0].ContentSequence
            if item.ValueType == "TEXT"
        }
        assert texts["111001"] == "RADnet"  # Algorithm Name
        assert texts["111003"] == "1.2.0 (sha256:0123456789ab)"  # Algorithm Version


def test_sr_negative_says_absent_and_has_no_slice_or_volume_groups(
    regular_series: list[Path],
) -> None:
    result = make_result(regular_series, [])
    outputs = build_outputs(result, headers(regular_series), IDENTITY)
    assert outputs.key_image is None
    image_groups, volume_groups = _sr_groups(outputs.sr)
    [study] = image_groups
    assert volume_groups == []
    [presence] = study.get_qualitative_evaluations()
    assert presence.value.value == "272519000"
    assert study.get_measurements()[0].value == pytest.approx(93.0)
    # the empty SEG is listed as evidence, not as a finding
    evidence = {
        item.ReferencedSOPInstanceUID
        for study_item in outputs.sr.CurrentRequestedProcedureEvidenceSequence
        for series_item in study_item.ReferencedSeriesSequence
        for item in series_item.ReferencedSOPSequence
    }
    assert outputs.seg.SOPInstanceUID in evidence
    assert "RADnet hemorrhage" not in str(outputs.sr)


def test_sr_of_a_rerun_names_the_sr_it_replaces(regular_series: list[Path]) -> None:
    sources = headers(regular_series)
    first = build_outputs(make_result(regular_series[:5], []), sources, IDENTITY).sr
    result = make_result(regular_series, [2, 3, 4])
    again = build_outputs(
        result, sources, IDENTITY, key_slice_hu=key_hu(regular_series, result), previous_sr=first
    )
    sr = reread(again.sr)
    (study,) = sr.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (ref,) = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID, ref.ReferencedSOPInstanceUID) == (
        first.StudyInstanceUID,
        first.SeriesInstanceUID,
        first.SOPInstanceUID,
    )
    assert "PredecessorDocumentsSequence" not in reread(first)


def test_sr_refuses_a_seg_of_another_series(
    regular_series: list[Path], tilted_series: list[Path]
) -> None:
    ours = make_result(regular_series, [2, 3, 4])
    theirs = make_result(tilted_series, [2, 3, 4])
    other_seg = build_seg(
        theirs, headers(tilted_series), IDENTITY, series_number=2, uid=output_uids(theirs)
    )
    with pytest.raises(SeriesError, match="SEG"):
        build_sr(
            ours,
            headers(regular_series),
            IDENTITY,
            other_seg,
            series_number=1,
            uid=output_uids(ours),
        )


# ----------------------------------------------------------------------------------------------
# SEG


def _seg_mask_by_source(seg: Dataset, result: SeriesResult) -> np.ndarray:
    """The SEG read back as (slices, rows, columns) bool in the result's slice order."""
    parsed = hd.seg.Segmentation.from_dataset(reread(seg))
    uids = [s.sop_instance_uid for s in result.series.slices]
    pixels = parsed.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], assert_missing_frames_are_empty=True
    )
    return pixels[..., 0].astype(bool)


def test_seg_holds_the_mask_with_frames_only_for_positive_slices(
    positive: tuple[SeriesResult, dict[str, Dataset], DicomOutputs],
) -> None:
    result, _, outputs = positive
    seg = reread(outputs.seg)
    assert seg.SOPClassUID == SegmentationStorage
    assert seg.SegmentationType == "BINARY"
    assert seg.NumberOfFrames == 3
    [segment] = seg.SegmentSequence
    assert segment.SegmentLabel == "Hemorrhage"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "50960005"
    assert segment.AnatomicRegionSequence[0].CodeValue == "12738006"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    assert algorithm.AlgorithmName == "RADnet"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == result.series_instance_uid
    np.testing.assert_array_equal(_seg_mask_by_source(outputs.seg, result), result.hemorrhage_mask)


def test_seg_of_a_negative_result_is_one_empty_frame_referencing_the_series(
    regular_series: list[Path],
) -> None:
    result = make_result(regular_series, [])
    seg = build_seg(
        result, headers(regular_series), IDENTITY, series_number=2, uid=output_uids(result)
    )
    assert seg.NumberOfFrames == 1
    referenced = {
        item.ReferencedSOPInstanceUID
        for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == {s.sop_instance_uid for s in result.series.slices}
    assert not _seg_mask_by_source(seg, result).any()


def test_seg_follows_a_tilted_unevenly_spaced_series(tilted_series: list[Path]) -> None:
    result = make_result(tilted_series, [1, 2, 3])
    outputs = build_outputs(
        result, headers(tilted_series), IDENTITY, key_slice_hu=key_hu(tilted_series, result)
    )
    np.testing.assert_array_equal(_seg_mask_by_source(outputs.seg, result), result.hemorrhage_mask)
    seg = reread(outputs.seg)
    by_uid = headers(tilted_series)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source_uid = (
            frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        )
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(
            [float(v) for v in position],
            [float(v) for v in by_uid[source_uid].ImagePositionPatient],
            atol=1e-3,
        )
    assert outputs.key_image is not None
    assert outputs.key_image.PatientOrientation == ["L", "PF"]


@pytest.mark.parametrize("uneven", [False, True])
def test_seg_spacing_between_slices_is_along_the_normal_or_left_out(
    write_series: Callable[..., list[Path]], head_hu: Callable[..., np.ndarray], uneven: bool
) -> None:
    # scanners write the table increment as SpacingBetweenSlices on a tilted series
    table = (0.0, 4.0, 10.0, 13.0, 20.0, 27.5) if uneven else (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
    geometry = SeriesGeometry(
        rows=ROWS,
        columns=COLUMNS,
        pixel_spacing_mm=SPACING,
        table_positions_mm=table,
        gantry_tilt_deg=15.0,
    )
    paths = write_series(head_hu((6, ROWS, COLUMNS), SPACING), geometry, name="tilted-sbs")
    result = make_result(paths, [1, 2, 3])
    sources = headers(paths)
    for ds in sources.values():
        ds.SpacingBetweenSlices = "5"
    seg = reread(build_outputs(result, sources, IDENTITY, key_slice_hu=key_hu(paths, result)).seg)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    if uneven:
        assert "SpacingBetweenSlices" not in measures  # no one value is right
    else:
        assert float(measures.SpacingBetweenSlices) == pytest.approx(
            5.0 * np.cos(np.radians(15.0)), abs=1e-4
        )
    assert all(ds.SpacingBetweenSlices == 5 for ds in sources.values())  # sources unchanged


def test_seg_refuses_a_mask_off_the_source_grid(regular_series: list[Path]) -> None:
    good = make_result(regular_series, [2, 3, 4])
    bad = SeriesResult(
        series=good.series,
        slice_probabilities=good.slice_probabilities,
        threshold=good.threshold,
        min_consecutive=good.min_consecutive,
        ct_positive=good.ct_positive,
        certainty=good.certainty,
        hemorrhage_mask=good.hemorrhage_mask[:, :32, :],
        hemorrhage_volume_ml=good.hemorrhage_volume_ml,
        model=good.model,
    )
    with pytest.raises(SeriesError, match="shape"):
        seg_frames(bad, headers(regular_series))


# ----------------------------------------------------------------------------------------------
# key image


def test_key_image_is_a_burned_in_secondary_capture_of_the_key_slice(
    positive: tuple[SeriesResult, dict[str, Dataset], DicomOutputs],
) -> None:
    result, _, outputs = positive
    assert outputs.key_image is not None
    image = reread(outputs.key_image)
    assert image.SOPClassUID == SecondaryCaptureImageStorage
    assert image.BurnedInAnnotation == "YES"
    assert list(image.ImageType) == ["DERIVED", "SECONDARY"]
    assert image.ConversionType == "WSD"
    assert image.PhotometricInterpretation == "RGB"
    [source] = image.SourceImageSequence
    key = result.series.slices[result.key_slice_index]
    assert source.ReferencedSOPInstanceUID == key.sop_instance_uid
    assert "ReferencedFrameNumber" not in source
    pixels = image.pixel_array
    # enlarged 8x (64 -> 512 columns): the mask box is red-tinted, the brain next to it grey
    assert pixels.shape[1] == 512
    band = (pixels.shape[0] - 512) // 2
    inside = pixels[band + 32 * 8, 33 * 8]
    outside = pixels[band + 32 * 8, 20 * 8]
    assert inside[0] > inside[1] + 40
    assert outside[0] == outside[1] == outside[2]


def test_render_key_image_burns_text_into_bands_above_and_below() -> None:
    hu = np.full((64, 64), 40.0)
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:20, 10:20] = True
    pixels = render_key_image(hu, mask, NOT_FOR_DIAGNOSIS, "summary")
    band = (pixels.shape[0] - 512) // 2
    assert band > 0 and pixels.shape[1] == 512
    top, bottom = pixels[:band], pixels[-band:]
    assert (top.max(axis=2) > 128).sum() > 50  # text drawn
    assert (bottom.max(axis=2) > 128).sum() > 20
    # no text yet: an empty line leaves the band black
    blank = render_key_image(hu, mask, "", "")
    assert blank[:band].max() == 0
    # the brain window puts 40 HU at mid grey, the outline at pure red
    assert tuple(pixels[band + 40 * 8, 40 * 8]) == (128, 128, 128)
    assert tuple(pixels[band + 10 * 8, 15 * 8]) == (255, 0, 0)


def test_render_key_image_refuses_mismatched_mask() -> None:
    with pytest.raises(ValueError, match="mask shape"):
        render_key_image(np.zeros((8, 8)), np.zeros((8, 9), dtype=bool), "a", "b")


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        ((1, 0, 0, 0, 1, 0), ("L", "P")),
        ((-1, 0, 0, 0, -1, 0), ("R", "A")),
        ((1, 0, 0, 0, 0.9659, -0.2588), ("L", "PF")),
    ],
)
def test_patient_orientation_from_direction_cosines(
    orientation: tuple[float, ...], expected: tuple[str, str]
) -> None:
    assert patient_orientation(orientation) == expected


# ----------------------------------------------------------------------------------------------
# multi-frame Legacy Converted Enhanced CT


def test_multiframe_source_is_referenced_by_frame(dicom_data_dir: Path) -> None:
    path = dicom_data_dir / LCE_FILE
    result = make_result([path], [20, 21, 22], box=(slice(200, 240), slice(200, 260)))
    header = pydicom.dcmread(path, stop_before_pixels=True)
    sources = {str(header.SOPInstanceUID): header}
    hu = np.full(result.series.source_shape, 40.0)  # pixels of the key slice: any HU will do
    outputs = build_outputs(result, sources, IDENTITY, key_slice_hu=hu)

    seg = reread(outputs.seg)
    assert seg.NumberOfFrames == 3
    referenced_frames = sorted(
        int(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for frame in seg.PerFrameFunctionalGroupsSequence
    )
    assert referenced_frames == sorted(
        int(result.series.slices[k].frame_number or 0) for k in (20, 21, 22)
    )
    parsed = hd.seg.Segmentation.from_dataset(seg)
    frames = [
        int(result.series.slices[k].frame_number or 0) for k in range(len(result.series.slices))
    ]
    pixels = parsed.get_pixels_by_source_frame(
        source_sop_instance_uid=header.SOPInstanceUID,
        source_frame_numbers=frames,
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), result.hemorrhage_mask)

    image_groups, _ = _sr_groups(outputs.sr)
    slice_frames = [g.source_images[0].referenced_frame_numbers[0] for g in image_groups[1:]]
    assert slice_frames == [result.series.slices[k].frame_number for k in (20, 21, 22)]

    assert outputs.key_image is not None
    [source] = outputs.key_image.SourceImageSequence
    assert source.ReferencedFrameNumber == result.series.slices[result.key_slice_index].frame_number
