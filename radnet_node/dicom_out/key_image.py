"""Builder of the Secondary Capture key image of a positive result: the most affected slice in the
brain window with the hemorrhage overlay and "NOT FOR DIAGNOSIS" burned in, for viewers that show
neither SR nor SEG."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from radnet_node.dicom_out.common import (
    contributing_equipment,
    copy_patient_study,
    for_highdicom,
    highdicom_character_set,
    metadata_only,
    set_body_part,
    set_equipment,
    source_for_slice,
)
from radnet_node.dicom_out.uids import OutputUIDs
from radnet_node.errors import SeriesError
from radnet_node.results import SeriesResult

if TYPE_CHECKING:
    from radnet_node.dicom_out.common import NodeIdentity

__all__ = [
    "KEY_IMAGE_SERIES_DESCRIPTION",
    "NOT_FOR_DIAGNOSIS",
    "build_key_image",
    "finding_summary",
    "patient_orientation",
    "render_key_image",
]

KEY_IMAGE_SERIES_DESCRIPTION = "RADnet ICH key image (NOT FOR DIAGNOSIS)"
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS"
WINDOW_LEVEL_HU = 40.0
WINDOW_WIDTH_HU = 80.0
# Small source images are enlarged by a whole factor to at least this size so the text is legible.
_MIN_DISPLAY_PX = 512
_OVERLAY_RGB = np.array([255.0, 0.0, 0.0])
_FILL_ALPHA = 0.35
_TEXT_RGB = (255, 255, 0)


def finding_summary(result: SeriesResult, index: int) -> str:
    """The one-line finding burned into the key image of slice ``index``."""
    return (
        f"AI: intracranial hemorrhage present ({100.0 * result.certainty:.0f}% certainty), "
        f"{result.hemorrhage_volume_ml:.1f} mL; slice {index + 1}/{len(result.series.slices)}, "
        f"p={float(result.slice_probabilities[index]):.2f}"
    )


def render_key_image(
    hu: np.ndarray,
    mask: np.ndarray,
    top_text: str,
    bottom_text: str,
) -> np.ndarray:
    """Brain window (L40/W80) of one slice with the mask and two lines of text burned in.

    The slice is enlarged by a whole factor to at least 512 pixels (nearest neighbour), the mask is
    drawn as a translucent red fill with a solid red outline, and the text sits on black bands
    above and below the image so that no anatomy is hidden.

    Parameters
    ----------
    hu
        (rows, columns) Hounsfield units of the slice.
    mask
        (rows, columns) bool hemorrhage mask on the same grid.
    top_text, bottom_text
        One line each.

    Returns
    -------
    np.ndarray
        (band + rows * scale + band, columns * scale, 3) uint8 RGB.

    Raises
    ------
    ValueError
        If ``hu`` is not 2-D and finite or ``mask`` has another shape.
    """
    hu = np.asarray(hu, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if hu.ndim != 2 or 0 in hu.shape or not np.all(np.isfinite(hu)):
        raise ValueError(f"key slice must be a finite 2-D HU array, got shape {hu.shape}")
    if mask.shape != hu.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the key slice {hu.shape}")
    scale = max(1, math.ceil(_MIN_DISPLAY_PX / max(hu.shape)))
    low = WINDOW_LEVEL_HU - WINDOW_WIDTH_HU / 2.0
    windowed = np.clip((hu - low) / WINDOW_WIDTH_HU, 0.0, 1.0) * 255.0
    grey = np.kron(windowed, np.ones((scale, scale)))
    big_mask = np.kron(mask, np.ones((scale, scale), dtype=bool))
    rgb = np.repeat(grey[..., np.newaxis], 3, axis=2)
    rgb[big_mask] = (1.0 - _FILL_ALPHA) * rgb[big_mask] + _FILL_ALPHA * _OVERLAY_RGB
    width = max(1, scale // 2)
    outline = big_mask & ~ndimage.binary_erosion(big_mask, iterations=width, border_value=0)
    rgb[outline] = _OVERLAY_RGB
    image = np.rint(rgb).astype(np.uint8)

    columns = image.shape[1]
    font = _fitting_font([top_text, bottom_text], columns)
    band = _band_height(font)
    canvas = Image.new("RGB", (columns, image.shape[0] + 2 * band), (0, 0, 0))
    canvas.paste(Image.fromarray(image, mode="RGB"), (0, band))
    draw = ImageDraw.Draw(canvas)
    margin = max(2, band // 6)
    draw.text((margin, margin), top_text, fill=_TEXT_RGB, font=font)
    draw.text((margin, band + image.shape[0] + margin), bottom_text, fill=_TEXT_RGB, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def _fitting_font(lines: Sequence[str], width: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The largest default font (size width/28 at most) in which every line fits the width."""
    size = max(8, width // 28)
    while True:
        font = ImageFont.load_default(size=size)
        if size <= 8 or all(font.getlength(line) <= width - 4 for line in lines):
            return font
        size -= 1


def _band_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return int(math.ceil(bottom - min(top, 0))) + 2 * max(2, int(bottom) // 6)


def patient_orientation(image_orientation: Sequence[float]) -> tuple[str, str]:
    """PatientOrientation (row, column directions) from ImageOrientationPatient.

    Letters of every axis that contributes more than 0.25, the largest first (e.g. ``("L", "PF")``
    for a tilted axial slice).
    """
    cosines = np.asarray(image_orientation, dtype=np.float64).reshape(2, 3)
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    result = []
    for direction in cosines:
        order = np.argsort(-np.abs(direction))
        text = "".join(
            letters[axis][0 if direction[axis] > 0 else 1]
            for axis in order
            if abs(direction[axis]) > 0.25
        )
        result.append(text)
    return result[0], result[1]


def build_key_image(
    result: SeriesResult,
    sources: Mapping[str, Dataset],
    identity: NodeIdentity,
    key_slice_hu: np.ndarray,
    *,
    series_number: int,
    uid: OutputUIDs,
) -> Dataset:
    """Build the RGB Secondary Capture key image of a positive result.

    The slice is ``result.key_slice_index`` (largest hemorrhage area); BurnedInAnnotation YES,
    ImageType DERIVED\\SECONDARY, ConversionType WSD, a Source Image Sequence pointing at the CT
    slice (and frame), in its own series.

    Parameters
    ----------
    result
        A positive result.
    sources
        Source headers keyed by SOP Instance UID (pixel data not needed).
    identity
        The node writing the object.
    key_slice_hu
        (rows, columns) HU of the key slice on the source grid (the caller reads it, e.g. with
        :func:`radnet_node.preprocess.read_hu_slices`).
    series_number
        Series Number of the new key-image series.
    uid
        The output UIDs of this result (:func:`radnet_node.dicom_out.uids.output_uids`).

    Returns
    -------
    pydicom.Dataset
        The Secondary Capture Image (a ``highdicom.sc.SCImage``), not yet written anywhere.

    Raises
    ------
    ValueError
        If ``series_number`` is below 1.
    SeriesError
        If the result is negative, the slice does not match the source grid, or its header is
        missing.
    """
    if series_number < 1:
        raise ValueError(f"series_number must be >= 1, got {series_number}")
    label = result.series_instance_uid
    if not result.ct_positive:
        raise SeriesError(label, "a key image is made for positive results only")
    index = result.key_slice_index
    hu = np.asarray(key_slice_hu)
    if hu.shape != result.series.source_shape:
        raise SeriesError(
            label,
            f"key_slice_hu has shape {hu.shape}, the source grid is {result.series.source_shape}",
        )
    source = result.series.slices[index]
    header = source_for_slice(result, sources, index)
    try:
        pixels = render_key_image(
            hu,
            np.asarray(result.hemorrhage_mask[index], dtype=bool),
            f"{NOT_FOR_DIAGNOSIS} - research AI output, unverified",
            finding_summary(result, index),
        )
    except ValueError as exc:
        raise SeriesError(label, f"cannot render the key image: {exc}") from exc
    scale = pixels.shape[1] / hu.shape[1]
    spacing = result.series.source_pixel_spacing_mm
    orientation = patient_orientation(result.series.image_orientation)
    try:
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=for_highdicom(metadata_only(header)),
            specific_character_set=highdicom_character_set(header),
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=uid.key_image_series,
            series_number=series_number,
            sop_instance_uid=uid.key_image_instance,
            instance_number=1,
            manufacturer=identity.manufacturer,
            pixel_spacing=(spacing[0] / scale, spacing[1] / scale),
            # highdicom takes single letters only; the oblique form is set below
            patient_orientation=(orientation[0][0], orientation[1][0]),
            series_description=KEY_IMAGE_SERIES_DESCRIPTION,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=contributing_equipment(identity, result),
        )
    except ValueError as exc:
        raise SeriesError(label, f"cannot build the key image: {exc}") from exc
    copy_patient_study(image, header)
    set_body_part(image, header)
    set_equipment(image, identity)
    image.PatientOrientation = list(orientation)
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.ConversionType = "WSD"
    image.BurnedInAnnotation = "YES"
    image.ImageComments = NOT_FOR_DIAGNOSIS
    image.DerivationDescription = (
        f"Brain window L{WINDOW_LEVEL_HU:g}/W{WINDOW_WIDTH_HU:g} of the CT slice with the "
        f"{result.model.name} hemorrhage mask and annotations burned in; {NOT_FOR_DIAGNOSIS}"
    )
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.sop_class_uid
    reference.ReferencedSOPInstanceUID = source.sop_instance_uid
    if source.frame_number is not None:
        reference.ReferencedFrameNumber = int(source.frame_number)
    image.SourceImageSequence = [reference]
    return image
