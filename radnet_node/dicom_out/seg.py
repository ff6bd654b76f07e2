"""Builder of the DICOM Segmentation (BINARY, one "Hemorrhage" segment) of a result, on the source
grid and referencing the source series."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from radnet_node.dicom_out import codes
from radnet_node.dicom_out.common import (
    contributing_equipment,
    copy_patient_study,
    derived_frame_of_reference_uid,
    for_highdicom,
    highdicom_character_set,
    metadata_only,
    seg_algorithm,
    set_body_part,
    set_equipment,
    source_datasets,
)
from radnet_node.dicom_out.uids import OutputUIDs
from radnet_node.errors import SeriesError
from radnet_node.results import SeriesResult

if TYPE_CHECKING:
    from radnet_node.dicom_out.common import NodeIdentity

__all__ = [
    "SEGMENT_LABEL",
    "SEGMENT_NUMBER",
    "SEGMENT_TRACKING_ID",
    "SEGMENT_TRACKING_KIND",
    "SEG_SERIES_DESCRIPTION",
    "build_seg",
    "seg_frames",
]

SEG_SERIES_DESCRIPTION = "RADnet ICH SEG (UNVERIFIED, research use)"
SEGMENT_NUMBER = 1
SEGMENT_LABEL = "Hemorrhage"
SEGMENT_TRACKING_ID = "RADnet hemorrhage"
# OutputUIDs.derive kind of the segment's tracking UID; the SR's volumetric finding shares it
SEGMENT_TRACKING_KIND = "tracking/hemorrhage-segment"
# sRGB red: the colour viewers use for the overlay
_DISPLAY_COLOR = hd.color.CIELabColor.from_rgb(255, 0, 0)


def seg_frames(
    result: SeriesResult, sources: Mapping[str, Dataset]
) -> tuple[list[Dataset], np.ndarray]:
    """The source images and the mask array exactly as handed to highdicom.

    Single-frame sources: one header per slice and the mask in slice order. A multi-frame source
    (Enhanced / Legacy Converted Enhanced CT): its one header and the mask in its frame order
    (frame ``f`` at index ``f - 1``), frames the series did not use left empty.

    Parameters
    ----------
    result
        The engine's result.
    sources
        Source headers keyed by SOP Instance UID (pixel data not needed).

    Returns
    -------
    tuple[list[Dataset], np.ndarray]
        Metadata-only source headers and a (frames, rows, columns) uint8 array of 0/1.

    Raises
    ------
    SeriesError
        If the mask does not match the slices or the source grid, a header is missing, or the
        series mixes multi-frame instances (highdicom takes one multi-frame source at most).
    """
    series = result.series
    label = result.series_instance_uid
    mask = np.asarray(result.hemorrhage_mask)
    expected = (len(series.slices), *series.source_shape)
    if mask.shape != expected:
        raise SeriesError(
            label,
            f"hemorrhage_mask has shape {mask.shape}, expected {expected} "
            "(slices, rows, columns on the source grid)",
        )
    headers = source_datasets(result, sources)
    for ds in headers:
        grid = (int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))
        if grid != series.source_shape:
            raise SeriesError(
                label,
                f"source {ds.get('SOPInstanceUID', '?')} is {grid[0]}x{grid[1]} pixels, the mask "
                f"is on a {series.source_shape[0]}x{series.source_shape[1]} grid",
            )
    binary = mask.astype(bool).astype(np.uint8)
    spacing = np.asarray(series.slice_spacing_mm, dtype=np.float64)
    thickness = float(np.median(spacing)) if np.isfinite(spacing).all() else None
    # (the preprocessing made sure the instances share one, or all lack it)
    frame_of_reference = derived_frame_of_reference_uid(result.series_instance_uid)
    frame_numbers = [s.frame_number for s in series.slices]
    if all(f is None for f in frame_numbers):
        between = _spacing_along_normal(series.normal_positions_mm)
        return [
            _with_spacing_between_slices(
                metadata_only(
                    ds, slice_thickness_mm=thickness, frame_of_reference_uid=frame_of_reference
                ),
                between,
            )
            for ds in headers
        ], binary
    if len(headers) != 1 or any(f is None for f in frame_numbers):
        raise SeriesError(
            label,
            f"the slices come from {len(headers)} instances, some multi-frame: a SEG can "
            "reference one multi-frame source or single-frame sources only",
        )
    source = headers[0]
    n_frames = int(source.get("NumberOfFrames", 1))
    pixels = np.zeros((n_frames, *series.source_shape), dtype=np.uint8)
    for k, source_slice in enumerate(series.slices):
        frame = int(source_slice.frame_number or 0)
        if not 1 <= frame <= n_frames:
            raise SeriesError(
                label, f"slice {k} is frame {frame} of a source with {n_frames} frames"
            )
        pixels[frame - 1] = binary[k]
    return [
        metadata_only(
            source, slice_thickness_mm=thickness, frame_of_reference_uid=frame_of_reference
        )
    ], pixels


def _spacing_along_normal(normal_positions_mm: Sequence[float]) -> float | None:
    """The distance between neighbouring slices along the slice normal when it is one distance
    (the gaps within 1 % of their median), else None."""
    positions = np.sort(np.asarray(normal_positions_mm, dtype=np.float64))
    if positions.size < 2:
        return None
    gaps = np.diff(positions)
    median = float(np.median(gaps))
    if not median > 0 or float(np.ptp(gaps)) > 0.01 * median:
        return None
    return median


def _with_spacing_between_slices(copy: Dataset, spacing_mm: float | None) -> Dataset:
    """A source copy whose SpacingBetweenSlices, if it has one, is the distance along the normal.

    highdicom puts the source's value into the SEG's pixel measures, which hold for every frame.
    On a tilted series scanners write the table increment there (2.5 mm for 2.37 mm along the
    normal on the Philips series at -18.5 degrees), and on an unevenly spaced series no single
    value is right; the frames themselves are placed by their positions. So the value becomes the
    distance along the normal, or is left out when the gaps differ. The source is not changed.
    """
    if "SpacingBetweenSlices" not in copy:
        return copy
    if spacing_mm is None:
        del copy[_SPACING_BETWEEN_SLICES]  # from the copy's own elements only
    else:
        copy[_SPACING_BETWEEN_SLICES] = DataElement(
            _SPACING_BETWEEN_SLICES, "DS", f"{spacing_mm:.6g}"
        )
    return copy


_SPACING_BETWEEN_SLICES = 0x00180088


def build_seg(
    result: SeriesResult,
    sources: Mapping[str, Dataset],
    identity: NodeIdentity,
    *,
    series_number: int,
    uid: OutputUIDs,
) -> Dataset:
    """Build the BINARY Segmentation of the result's hemorrhage mask.

    One segment "Hemorrhage" (SCT 49755003 / 50960005, region Brain, AUTOMATIC, algorithm family
    Artificial Intelligence, red), frames only for slices with hemorrhage. An empty mask (negative
    result) gives a valid SEG with one empty frame on the first slice that still references the
    whole source series (highdicom alone would keep every empty frame).

    Parameters
    ----------
    result
        The engine's result: ``hemorrhage_mask`` (slices, rows, columns) on the source grid.
    sources
        Source headers keyed by SOP Instance UID (pixel data not needed).
    identity
        The node writing the object.
    series_number
        Series Number of the new SEG series.
    uid
        The output UIDs of this result (:func:`radnet_node.dicom_out.uids.output_uids`).

    Returns
    -------
    pydicom.Dataset
        The Segmentation (a ``highdicom.seg.Segmentation``), not yet written anywhere.

    Raises
    ------
    ValueError
        If ``series_number`` is below 1.
    SeriesError
        If the mask and the source headers do not match, or highdicom refuses the sources.
    """
    if series_number < 1:
        raise ValueError(f"series_number must be >= 1, got {series_number}")
    source_images, pixels = seg_frames(result, sources)
    segment = hd.seg.SegmentDescription(
        segment_number=SEGMENT_NUMBER,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        segmented_property_type=codes.HEMORRHAGE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=seg_algorithm(result),
        tracking_uid=uid.derive(SEGMENT_TRACKING_KIND),
        tracking_id=SEGMENT_TRACKING_ID,
        anatomic_regions=[codes.BRAIN],
        display_color=_DISPLAY_COLOR,
    )
    plane_positions = None
    empty = not pixels.any()
    if empty:
        # a SEG needs at least one frame; one is enough (highdicom would keep them all)
        first = result.series.slices[0]
        pixels = np.zeros((1, *result.series.source_shape), dtype=np.uint8)
        plane_positions = [
            hd.PlanePositionSequence(
                hd.CoordinateSystemNames.PATIENT, list(first.image_position_mm)
            )
        ]
    try:
        seg = hd.seg.Segmentation(
            source_images=[for_highdicom(image) for image in source_images],
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=uid.seg_series,
            series_number=series_number,
            sop_instance_uid=uid.seg_instance,
            instance_number=1,
            manufacturer=identity.manufacturer,
            manufacturer_model_name=identity.model_name,
            software_versions=identity.software_version,
            device_serial_number=identity.device_uid,
            series_description=SEG_SERIES_DESCRIPTION,
            content_label="HEMORRHAGE",
            content_description=f"{result.model.name} intracranial hemorrhage (unverified)",
            plane_positions=plane_positions,
            omit_empty_frames=not empty,
            contributing_equipment=contributing_equipment(identity, result),
            institution_name=identity.institution_name,
            specific_character_set=highdicom_character_set(source_images[0]),
        )
    except ValueError as exc:
        raise SeriesError(result.series_instance_uid, f"cannot build the SEG: {exc}") from exc
    copy_patient_study(seg, source_images[0])
    set_body_part(seg, source_images[0])
    set_equipment(seg, identity)
    return seg
