"""Builder of the Comprehensive 3D SR (TID 1500 Imaging Measurement Report) of a result: the
study-level finding with its certainty, the positive slices and the hemorrhage volume."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from radnet_node.dicom_out import codes
from radnet_node.dicom_out.common import (
    contributing_equipment,
    copy_patient_study,
    for_highdicom,
    highdicom_character_set,
    metadata_only,
    set_equipment,
    source_datasets,
    sr_algorithm,
)
from radnet_node.dicom_out.seg import SEGMENT_NUMBER, SEGMENT_TRACKING_ID, SEGMENT_TRACKING_KIND
from radnet_node.dicom_out.uids import OutputUIDs
from radnet_node.errors import SeriesError
from radnet_node.results import SeriesResult

if TYPE_CHECKING:
    from radnet_node.dicom_out.common import NodeIdentity

__all__ = [
    "SR_SERIES_DESCRIPTION",
    "STUDY_FINDING_ID",
    "build_sr",
    "slice_finding_id",
]

SR_SERIES_DESCRIPTION = "RADnet ICH SR (UNVERIFIED, research use)"
STUDY_FINDING_ID = "RADnet ICH study-level finding"


def slice_finding_id(index: int, n_slices: int) -> str:
    """Tracking identifier of the per-slice finding on slice ``index`` (0-based, slice order)."""
    return f"RADnet ICH slice {index + 1} of {n_slices}"


def build_sr(
    result: SeriesResult,
    sources: Mapping[str, Dataset],
    identity: NodeIdentity,
    seg: Dataset,
    *,
    series_number: int,
    uid: OutputUIDs,
    previous_sr: Dataset | None = None,
) -> Dataset:
    """Build the TID 1500 Comprehensive 3D SR of the result.

    Content: observer = the node as a device; procedure reported LN 24725-4 "CT Head"; one
    study-level group (finding SCT 1386000 "Intracranial hemorrhage", Present/Absent, site Brain,
    DCM 111012 "Certainty of Finding" in %); for a positive result also one group per positive
    slice (its source image and probability in %) and a volumetric group that references segment 1
    of ``seg`` with the hemorrhage volume in ml. A negative result has only the study-level group;
    its (empty) SEG is still listed in the evidence, but not referenced by any finding.
    Flags: COMPLETE, UNVERIFIED, PRELIMINARY; contributing equipment "Processing Algorithm".

    Parameters
    ----------
    result
        The engine's result.
    sources
        Source headers keyed by SOP Instance UID (pixel data not needed).
    identity
        The node: device observer and equipment.
    seg
        The SEG built for the same result (:func:`radnet_node.dicom_out.seg.build_seg`).
    series_number
        Series Number of the new SR series.
    uid
        The output UIDs of this result (:func:`radnet_node.dicom_out.uids.output_uids`).
    previous_sr
        The SR this one replaces (a re-run of the series after more instances arrived), header
        enough: referenced in the Predecessor Documents Sequence, so a reader can tell which
        report is current.

    Returns
    -------
    pydicom.Dataset
        The SR (a ``highdicom.sr.Comprehensive3DSR``), not yet written anywhere.

    Raises
    ------
    ValueError
        If ``series_number`` is below 1.
    SeriesError
        If a source header is missing, ``seg`` is not a SEG of this series and study, or
        highdicom refuses the content.
    """
    if series_number < 1:
        raise ValueError(f"series_number must be >= 1, got {series_number}")
    label = result.series_instance_uid
    _check_seg(result, seg)
    headers = [metadata_only(ds) for ds in source_datasets(result, sources)]
    algorithm = sr_algorithm(result)
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = [_study_group(result, uid, algorithm)]
    if result.ct_positive:
        groups.extend(_slice_groups(result, uid, algorithm))
        groups.append(_volume_group(result, seg, uid, algorithm))
    try:
        observer = hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept.from_code(codes.DEVICE),
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=identity.device_uid,
                name=identity.name,
                manufacturer_name=identity.manufacturer,
                model_name=identity.model_name,
            ),
        )
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=codes.CT_HEAD,
            imaging_measurements=groups,
        )
        sr = hd.sr.Comprehensive3DSR(
            evidence=[for_highdicom(ds) for ds in (*headers, seg)],
            content=report,
            series_instance_uid=uid.sr_series,
            series_number=series_number,
            sop_instance_uid=uid.sr_instance,
            instance_number=1,
            manufacturer=identity.manufacturer,
            is_complete=True,
            is_final=False,
            is_verified=False,
            institution_name=identity.institution_name,
            contributing_equipment=contributing_equipment(identity, result),
            series_description=SR_SERIES_DESCRIPTION,
            specific_character_set=highdicom_character_set(headers[0]),
            previous_versions=(
                None if previous_sr is None else [for_highdicom(metadata_only(previous_sr))]
            ),
        )
    except ValueError as exc:
        raise SeriesError(label, f"cannot build the SR: {exc}") from exc
    copy_patient_study(sr, headers[0])
    set_equipment(sr, identity)
    return sr


def _check_seg(result: SeriesResult, seg: Dataset) -> None:
    if seg.get("SOPClassUID") != SegmentationStorage:
        raise SeriesError(
            result.series_instance_uid,
            f"the SR must reference a Segmentation, got SOP class {seg.get('SOPClassUID')}",
        )
    if seg.get("StudyInstanceUID") != result.study_instance_uid:
        raise SeriesError(
            result.series_instance_uid,
            f"SEG {seg.get('SOPInstanceUID')} belongs to study {seg.get('StudyInstanceUID')}, "
            f"not to the result's study {result.study_instance_uid}",
        )
    referenced = {item.SeriesInstanceUID for item in seg.get("ReferencedSeriesSequence", [])}
    if result.series_instance_uid not in referenced:
        raise SeriesError(
            result.series_instance_uid,
            f"SEG {seg.get('SOPInstanceUID')} does not reference this series",
        )


def _certainty(percent: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=codes.CERTAINTY_OF_FINDING,
        value=round(float(percent), 2),
        unit=codes.PERCENT,
    )


def _presence(present: bool) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(
        name=codes.INTRACRANIAL_HEMORRHAGE,
        value=codes.PRESENT if present else codes.ABSENT,
    )


def _study_group(
    result: SeriesResult, uid: OutputUIDs, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The CT-level decision: present/absent with the model's certainty of that decision."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid.derive("tracking/study-finding"), identifier=STUDY_FINDING_ID
        ),
        finding_type=codes.INTRACRANIAL_HEMORRHAGE,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes.BRAIN)],
        qualitative_evaluations=[_presence(result.ct_positive)],
        measurements=[_certainty(100.0 * result.certainty)],
    )


def _slice_groups(
    result: SeriesResult, uid: OutputUIDs, algorithm: hd.sr.AlgorithmIdentification
) -> Sequence[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One group per positive slice: its source image (frame) and its probability in %."""
    slices = result.series.slices
    groups = []
    for index in result.positive_slice_indices:
        source = slices[index]
        frames = None if source.frame_number is None else [int(source.frame_number)]
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=uid.derive(f"tracking/slice/{source.sop_instance_uid}/{frames}"),
                    identifier=slice_finding_id(index, len(slices)),
                ),
                finding_type=codes.INTRACRANIAL_HEMORRHAGE,
                algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(codes.BRAIN)],
                qualitative_evaluations=[_presence(True)],
                measurements=[_certainty(100.0 * float(result.slice_probabilities[index]))],
                source_images=[
                    hd.sr.SourceImageForMeasurementGroup(
                        referenced_sop_class_uid=source.sop_class_uid,
                        referenced_sop_instance_uid=source.sop_instance_uid,
                        referenced_frame_numbers=frames,
                    )
                ],
            )
        )
    return groups


def _volume_group(
    result: SeriesResult,
    seg: Dataset,
    uid: OutputUIDs,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """The hemorrhage as a volume: segment 1 of the SEG, with its volume in ml."""
    # by hand: highdicom 0.28's ReferencedSegment.from_segmentation fails for one-segment SEGs
    segment = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=SEGMENT_NUMBER,
        source_series=hd.sr.SourceSeriesForSegmentation(result.series_instance_uid),
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        # the SEG segment's tracking UID: one finding, tracked across SEG and SR
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uid.derive(SEGMENT_TRACKING_KIND), identifier=SEGMENT_TRACKING_ID
        ),
        referenced_segment=segment,
        finding_type=codes.INTRACRANIAL_HEMORRHAGE,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes.BRAIN)],
        measurements=[
            hd.sr.Measurement(
                name=codes.VOLUME,
                value=round(float(result.hemorrhage_volume_ml), 3),
                unit=codes.MILLILITER,
            )
        ],
    )
