"""The one preprocessing path of radnet-node: the DICOM slices of one CT series (or an HU volume) ->
RADnet's input (brain window, 1 mm pixels, 250 mm field of view centred on the head), with the exact
mapping back to every source slice and pixel.

Training and serving both call this module, so the model always sees what it was trained on.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array
from pydicom.pixels.utils import get_j2k_parameters
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    LegacyConvertedEnhancedCTImageStorage,
)
from scipy import ndimage

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

__all__ = [
    "HuSeries",
    "PreparedSeries",
    "PreprocessSpec",
    "SourceSlice",
    "prepare_hu_series",
    "prepare_hu_volume",
    "prepare_series",
    "read_hu_slices",
    "window",
]

CT_SOP_CLASSES: dict[str, str] = {
    CTImageStorage: "CT Image Storage",
    EnhancedCTImageStorage: "Enhanced CT Image Storage",
    LegacyConvertedEnhancedCTImageStorage: "Legacy Converted Enhanced CT Image Storage",
}

AIR_HU = -1024.0
#: the darkest 1 % of a head CT series (air around the head) must be below this
_MAX_AIR_HU = -500.0
# Body mask threshold: above fat/soft tissue noise floor of air, below every tissue of the head.
_BODY_HU = -300.0
# Head finding runs on a grid of about this pixel size: fast, and fine enough for a centre.
_HEAD_SEARCH_MM = 2.0
# Structures thinner than twice this (table, head holder, cables) are removed before head finding.
_THIN_STRUCTURE_RADIUS_MM = 5.0
# Tolerances for "the same" geometry: DS values carry 6-10 digits; scanner jitter stays below these.
_ORIENTATION_TOL = 1e-3
_SPACING_RTOL = 1e-4
_DUPLICATE_TOL_MM = 0.01
# A slice normal further than this from the patient's z axis is not an axial (or tilted) slice.
_MIN_AXIAL_COS = float(np.cos(np.deg2rad(45.0)))


@dataclass(frozen=True)
class PreprocessSpec:
    """How a series becomes model input; stored in the model card so serving matches training.

    ``window_knee_hu`` and ``window_ceiling_hu`` (both or neither) give the window a shoulder:
    above the knee the slope drops so that 1.0 is reached only at the ceiling. Acute blood at
    80-90 HU then stays below the inner table of the skull, which a plain 40/80 window paints the
    same white. Below the knee the window is unchanged.

    Raises
    ------
    ValueError
        If a width, spacing or field of view is not positive, ``min_slices`` is below 1, or the
        shoulder is not ``level - width / 2 < knee < level + width / 2 < ceiling``.
    """

    window_level_hu: float = 40.0
    window_width_hu: float = 80.0
    pixel_spacing_mm: float = 1.0
    field_of_view_mm: float = 250.0
    min_slices: int = 5
    window_knee_hu: float | None = None
    window_ceiling_hu: float | None = None

    def __post_init__(self) -> None:
        for name in ("window_width_hu", "pixel_spacing_mm", "field_of_view_mm"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"PreprocessSpec.{name} must be a positive number, got {value!r}")
        if not np.isfinite(self.window_level_hu):
            raise ValueError(
                f"PreprocessSpec.window_level_hu must be finite, got {self.window_level_hu!r}"
            )
        if int(self.min_slices) != self.min_slices or self.min_slices < 1:
            raise ValueError(
                f"PreprocessSpec.min_slices must be an integer >= 1, got {self.min_slices!r}"
            )
        self._check_shoulder()
        if self.matrix_size < 1:
            raise ValueError(
                f"PreprocessSpec: field_of_view_mm {self.field_of_view_mm} / pixel_spacing_mm "
                f"{self.pixel_spacing_mm} gives an empty matrix"
            )

    def _check_shoulder(self) -> None:
        knee, ceiling = self.window_knee_hu, self.window_ceiling_hu
        if knee is None and ceiling is None:
            return
        if knee is None or ceiling is None:
            raise ValueError(
                "PreprocessSpec: window_knee_hu and window_ceiling_hu go together, got "
                f"{knee!r} and {ceiling!r}"
            )
        low = self.window_level_hu - self.window_width_hu / 2.0
        high = self.window_level_hu + self.window_width_hu / 2.0
        if not (np.isfinite(knee) and np.isfinite(ceiling) and low < knee < high < ceiling):
            raise ValueError(
                f"PreprocessSpec: the window shoulder needs {low:g} < window_knee_hu < {high:g} "
                f"< window_ceiling_hu, got knee {knee!r} and ceiling {ceiling!r}"
            )

    @property
    def matrix_size(self) -> int:
        """Pixels along each side of the model input: round(field_of_view_mm / pixel_spacing_mm)."""
        return round(self.field_of_view_mm / self.pixel_spacing_mm)

    def to_dict(self) -> dict[str, float | int]:
        """The fields as plain numbers (model card); ``PreprocessSpec(**d)`` rebuilds it.

        An unset shoulder is left out, so cards and cache keys written before it existed still
        describe the same spec.
        """
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessSpec:
        """Rebuild a spec written by :meth:`to_dict`; an extra ``matrix_size`` key is checked.

        Raises
        ------
        ValueError
            If a key is unknown, a value is invalid, or ``matrix_size`` disagrees with the others.
        """
        fields = {k: v for k, v in values.items() if k != "matrix_size"}
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"PreprocessSpec: unknown keys {unknown}")
        spec = cls(**fields)
        if "matrix_size" in values and int(values["matrix_size"]) != spec.matrix_size:
            raise ValueError(
                f"PreprocessSpec: matrix_size {values['matrix_size']} does not match "
                f"field_of_view_mm / pixel_spacing_mm = {spec.matrix_size}"
            )
        return spec


@dataclass(frozen=True)
class SourceSlice:
    """Where one model slice came from: a single-frame instance or a frame of a multi-frame one."""

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None  # 1-based frame for multi-frame objects, None for single-frame
    path: str | None  # file it came from, when read from a path
    image_position_mm: tuple[float, float, float]
    instance_number: int | None


@dataclass(frozen=True, eq=False)
class HuSeries:
    """One series in Hounsfield units, sorted along the slice normal, before any resampling.

    ``hu`` is (n_slices, rows, columns) float32 and read-only; the other fields mean what they mean
    in :class:`PreparedSeries`.
    """

    study_instance_uid: str
    series_instance_uid: str
    series_label: str
    hu: np.ndarray
    slices: tuple[SourceSlice, ...]
    pixel_spacing_mm: tuple[float, float]
    image_orientation: tuple[float, ...]
    normal_positions_mm: tuple[float, ...]
    slice_thickness_mm: float | None


@dataclass(frozen=True, eq=False)
class PreparedSeries:
    """RADnet's input for one series and the exact mapping back to the source slices and pixels.

    Every model slice ``k`` is source slice ``slices[k]`` resampled in its own plane; all slices
    share one in-plane mapping ``model_to_source`` (source pixels, not patient millimetres), so a
    sheared (gantry-tilted) stack stays sheared exactly as the scanner wrote it and stays aligned.
    The model grid is always in the head-first-supine display orientation the model was trained on
    (model columns towards the patient's left, rows towards posterior): a prone, feet-first or
    transposed source is flipped or transposed by ``model_to_source``, whose 2 x 2 part is then a
    signed permutation scaled by the spacings rather than a diagonal.
    """

    study_instance_uid: str
    series_instance_uid: str
    spec: PreprocessSpec
    image: np.ndarray  # (n_slices, N, N) float32 in [0, 1], sorted along the normal, read-only
    slices: tuple[SourceSlice, ...]  # same order as image
    source_shape: tuple[int, int]  # (rows, columns) of the source images
    source_pixel_spacing_mm: tuple[float, float]  # (between rows, between columns)
    image_orientation: tuple[float, ...]  # the 6 direction cosines
    normal_positions_mm: tuple[
        float, ...
    ]  # position of each slice along the slice normal (ascending)
    slice_thickness_mm: float | None
    head_centre_px: tuple[float, float]  # (row, col) in source pixels: centre of the model FOV
    # 3x3 homogeneous affine mapping model (row, col, 1) -> source (row, col, 1)
    model_to_source: np.ndarray

    def to_source_grid(
        self,
        model_grid: np.ndarray,
        *,
        interpolation: Literal["linear", "nearest"] = "linear",
    ) -> np.ndarray:
        """Map per-slice maps on the model grid back onto the source images.

        Parameters
        ----------
        model_grid
            (n_slices, N, N) values on the model grid, same slice order as ``image``.
        interpolation
            ``"linear"`` for probabilities, ``"nearest"`` for label maps.

        Returns
        -------
        np.ndarray
            (n_slices, rows, columns) float32 on the source grid; 0 outside the model field of view.

        Raises
        ------
        ValueError
            If the shape does not match this series' model grid or ``interpolation`` is unknown.
        """
        n, size = len(self.slices), self.spec.matrix_size
        _check_shape(model_grid, (n, size, size), "model_grid")
        step = self.spec.pixel_spacing_mm
        origin = self._model_origin_mm()
        resampled = _resample_stack(
            np.asarray(model_grid, dtype=np.float32),
            input_spacing=(step, step),
            input_origin=origin,
            input_axes=self._model_axes(),
            output_shape=self.source_shape,
            output_spacing=self.source_pixel_spacing_mm,
            output_origin=(0.0, 0.0),
            interpolation=interpolation,
            outside_value=0.0,
        )
        return sitk.GetArrayFromImage(resampled)

    def to_model_grid(
        self,
        source_grid: np.ndarray,
        *,
        interpolation: Literal["linear", "nearest"] = "linear",
    ) -> np.ndarray:
        """Map per-slice maps on the source images onto the model grid (as the image was mapped).

        Parameters
        ----------
        source_grid
            (n_slices, rows, columns) values on the source grid, same slice order as ``image``.
        interpolation
            ``"linear"`` for continuous values, ``"nearest"`` for label maps.

        Returns
        -------
        np.ndarray
            (n_slices, N, N) float32 on the model grid; 0 where it leaves the source image.

        Raises
        ------
        ValueError
            If the shape does not match the source series or ``interpolation`` is unknown.
        """
        n, size = len(self.slices), self.spec.matrix_size
        _check_shape(source_grid, (n, *self.source_shape), "source_grid")
        step = self.spec.pixel_spacing_mm
        resampled = _resample_stack(
            np.asarray(source_grid, dtype=np.float32),
            input_spacing=self.source_pixel_spacing_mm,
            input_origin=(0.0, 0.0),
            output_shape=(size, size),
            output_spacing=(step, step),
            output_origin=self._model_origin_mm(),
            output_axes=self._model_axes(),
            interpolation=interpolation,
            outside_value=0.0,
        )
        return sitk.GetArrayFromImage(resampled)

    @property
    def slice_spacing_mm(self) -> np.ndarray:
        """(n_slices,) thickness each slice represents along the normal, for volumes.

        Half the distance to each neighbour (the whole gap at the two ends), which is right for
        uneven spacing, gaps and overlapping reconstructions alike. A single slice represents its
        SliceThickness (NaN when unknown).
        """
        return _slice_spacing(np.asarray(self.normal_positions_mm), self.slice_thickness_mm)

    @property
    def median_slice_spacing_mm(self) -> float:
        """The median of ``slice_spacing_mm``: the one spacing of the series that the CT decision
        in millimetres (``postprocess.slices_needed``) uses, in the node and in evaluation alike."""
        return float(np.median(self.slice_spacing_mm))

    def _model_origin_mm(self) -> tuple[float, float]:
        """(y, x) in the source image's pixel-aligned millimetres of model pixel (0, 0)."""
        dr, dc = self.source_pixel_spacing_mm
        return (float(self.model_to_source[0, 2]) * dr, float(self.model_to_source[1, 2]) * dc)

    def _model_axes(self) -> np.ndarray:
        """The signed permutation (row, col) of :func:`_display_axes` used for this series."""
        dr, dc = self.source_pixel_spacing_mm
        step = self.spec.pixel_spacing_mm
        axes = self.model_to_source[:2, :2] * np.array([[dr], [dc]]) / step
        return np.rint(axes)


def prepare_series(
    instances: Sequence[str | Path | Dataset],
    spec: PreprocessSpec = PreprocessSpec(),  # noqa: B008 - frozen, so a shared default is safe
    *,
    series_label: str | None = None,
) -> PreparedSeries:
    """Turn the DICOM instances of one CT series into RADnet's input.

    Parameters
    ----------
    instances
        Paths or datasets of every instance of the series, in any order. Single-frame CT Image
        Storage, Enhanced CT and Legacy Converted Enhanced CT are accepted.
    spec
        Window, pixel spacing, field of view and minimum slice count.
    series_label
        Name used in errors instead of the SeriesInstanceUID.

    Returns
    -------
    PreparedSeries
        The windowed, resampled stack sorted along the slice normal, with its mapping to the source.

    Raises
    ------
    InputError
        A path cannot be read or is not a DICOM file.
    SeriesError
        The instances belong to more than one series or study, or the series is empty.
    UnsupportedImageError
        Not a greyscale CT image (other SOP class or modality, RGB, localizer, non-axial, no
        rescale).
    NoPixelDataError
        An instance carries no pixel data.
    DecodeError
        Pixel data cannot be decoded (names the file and its transfer syntax).
    InconsistentGeometryError
        Mixed orientations, sizes or pixel spacings, missing geometry, or slices that are not one
        stack.
    DuplicatePositionError
        Two slices share one position along the normal.
    TooFewSlicesError
        Fewer than ``spec.min_slices`` slices.
    """
    return prepare_hu_series(read_hu_slices(instances, spec, series_label=series_label), spec)


def prepare_hu_series(
    series: HuSeries,
    spec: PreprocessSpec = PreprocessSpec(),  # noqa: B008 - frozen, so a shared default is safe
) -> PreparedSeries:
    """Prepare a series already read by :func:`read_hu_slices`, exactly as :func:`prepare_series`.

    Splitting reading from preparing lets a caller time the two apart and keep the HU.

    Raises
    ------
    UnsupportedImageError
        The slice normal is more than 45 degrees from the patient's z axis.
    """
    _check_axial(series)
    return _prepare(series, spec)


def _check_axial(series: HuSeries) -> None:
    """RADnet sees axial slices; a sagittal or coronal reformat would be nonsense input."""
    orientation = np.asarray(series.image_orientation, dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    normal /= np.linalg.norm(normal)
    if abs(normal[2]) < _MIN_AXIAL_COS:
        raise UnsupportedImageError(
            series.series_label,
            f"not an axial series: slice normal {np.round(normal, 3).tolist()} is more than 45 "
            "degrees from the patient's z axis",
        )


def prepare_hu_volume(
    hu: np.ndarray,
    pixel_spacing_mm: tuple[float, float],
    spec: PreprocessSpec = PreprocessSpec(),  # noqa: B008 - frozen, so a shared default is safe
    *,
    normal_positions_mm: Sequence[float] | None = None,
    series_label: str = "volume",
    study_instance_uid: str = "",
    series_instance_uid: str = "",
) -> PreparedSeries:
    """Turn an HU volume (e.g. a NIfTI case) into RADnet's input along the same code path as DICOM.

    The volume gets a nominal axial geometry (identity orientation); ``slices[k]`` has
    ``frame_number = k + 1`` (the slice of the given volume) and empty UIDs.

    Parameters
    ----------
    hu
        (n_slices, rows, columns) Hounsfield units, already in slice order.
    pixel_spacing_mm
        (between rows, between columns).
    spec
        Window, pixel spacing, field of view and minimum slice count.
    normal_positions_mm
        Strictly ascending slice positions along the normal. Without them the positions are the
        slice indices 0, 1, 2, ... (so ``slice_spacing_mm`` counts slices, not millimetres).
    series_label, study_instance_uid, series_instance_uid
        Names for errors and for the result.

    Returns
    -------
    PreparedSeries

    Raises
    ------
    SeriesError
        ``hu`` is not a finite 3-D array or the pixel spacing is not positive.
    TooFewSlicesError
        Fewer than ``spec.min_slices`` slices.
    InconsistentGeometryError
        ``normal_positions_mm`` has the wrong length or is not ascending.
    DuplicatePositionError
        Two positions are equal.
    """
    volume = np.asarray(hu)
    if volume.ndim != 3 or 0 in volume.shape:
        raise SeriesError(
            series_label, f"HU volume must be (slices, rows, columns), got {volume.shape}"
        )
    # min/max propagate NaN and expose inf without a volume-sized temporary
    if not np.issubdtype(volume.dtype, np.number) or not (
        np.isfinite(volume.min()) and np.isfinite(volume.max())
    ):
        raise SeriesError(series_label, "HU volume holds non-finite or non-numeric values")
    spacing = (float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1]))
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise SeriesError(series_label, f"pixel spacing must be positive, got {pixel_spacing_mm}")
    n = volume.shape[0]
    _check_slice_count(n, spec, series_label)
    if normal_positions_mm is None:
        positions = np.arange(n, dtype=np.float64)
    else:
        positions = np.asarray(normal_positions_mm, dtype=np.float64)
        if positions.shape != (n,) or not np.all(np.isfinite(positions)):
            raise InconsistentGeometryError(
                series_label,
                f"normal_positions_mm must be {n} finite values, got shape {positions.shape}",
            )
        gaps = np.diff(positions)
        if np.any(np.abs(gaps) < _DUPLICATE_TOL_MM):
            k = int(np.argmax(np.abs(gaps) < _DUPLICATE_TOL_MM))
            raise DuplicatePositionError(
                series_label, f"slices {k} and {k + 1} share the position {positions[k]:.3f} mm"
            )
        if np.any(gaps < 0):
            raise InconsistentGeometryError(series_label, "normal_positions_mm must be ascending")
    slices = tuple(
        SourceSlice(
            sop_instance_uid="",
            sop_class_uid="",
            frame_number=k + 1,
            path=None,
            image_position_mm=(0.0, 0.0, float(positions[k])),
            instance_number=None,
        )
        for k in range(n)
    )
    # a read-only view (no copy of a large volume): the HuSeries lives only inside this call
    hu_f32 = np.asarray(volume, dtype=np.float32).view()
    hu_f32.setflags(write=False)
    series = HuSeries(
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        series_label=series_label,
        hu=hu_f32,
        slices=slices,
        pixel_spacing_mm=spacing,
        image_orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        normal_positions_mm=tuple(float(p) for p in positions),
        slice_thickness_mm=None,
    )
    return _prepare(series, spec)


def read_hu_slices(
    instances: Sequence[str | Path | Dataset],
    spec: PreprocessSpec = PreprocessSpec(),  # noqa: B008 - frozen, so a shared default is safe
    *,
    series_label: str | None = None,
) -> HuSeries:
    """Read, validate, sort and decode one CT series into Hounsfield units (no resampling).

    Each file is read once; headers are validated and slices sorted before any pixel data is
    decoded, so a refused series costs no decoding. Parameters and errors are those of
    :func:`prepare_series`, except that any orientation is accepted here (reformats included).

    Returns
    -------
    HuSeries
        The slices in HU, sorted along the slice normal n = row_cosines x column_cosines.

    Raises
    ------
    InputError, SeriesError
        See :func:`prepare_series`.
    """
    if len(instances) == 0:
        raise SeriesError(series_label or "(no instances)", "no instances given")
    loaded = [_load(item) for item in instances]
    label, series_uid, study_uid = _series_identity(loaded, series_label)
    for ds, path in loaded:
        _check_image(ds, path, label)
    frames = [
        frame
        for index, (ds, path) in enumerate(loaded)
        for frame in _frames(ds, path, index, label)
    ]
    _check_slice_count(len(frames), spec, label)
    frames, positions, orientation, spacing = _sort_and_check_geometry(frames, label)

    rows, columns = frames[0].rows, frames[0].columns
    hu = np.empty((len(frames), rows, columns), dtype=np.float32)
    by_dataset: dict[int, list[tuple[int, _Frame]]] = {}
    for k, frame in enumerate(frames):
        by_dataset.setdefault(frame.dataset_index, []).append((k, frame))
    for dataset_index, placed in by_dataset.items():
        ds, path = loaded[dataset_index]
        stored = _decode(ds, path, label)
        padding = _padding_range(ds, stored.dtype)
        for k, frame in placed:
            index = 0 if frame.frame_index is None else frame.frame_index
            np.multiply(stored[index], np.float32(frame.slope), out=hu[k], casting="unsafe")
            hu[k] += np.float32(frame.intercept)
            if padding is not None:
                hu[k][(stored[index] >= padding[0]) & (stored[index] <= padding[1])] = AIR_HU
    hu.setflags(write=False)
    _check_hounsfield(hu, frames[0], label)

    thicknesses = {f.thickness for f in frames if f.thickness is not None}
    thickness = thicknesses.pop() if len(thicknesses) == 1 else None
    return HuSeries(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        series_label=label,
        hu=hu,
        slices=tuple(f.source for f in frames),
        pixel_spacing_mm=spacing,
        image_orientation=tuple(float(v) for v in orientation),
        normal_positions_mm=tuple(float(p) for p in positions),
        slice_thickness_mm=thickness,
    )


# ----------------------------------------------------------------------------------------------
# reading and validation


@dataclass(frozen=True)
class _Frame:
    """One 2-D image of the series (a single-frame instance or one frame) with its geometry."""

    dataset_index: int
    frame_index: int | None  # 0-based frame of a multi-frame object, None for single-frame
    source: SourceSlice
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    thickness: float | None
    slope: float
    intercept: float
    rows: int
    columns: int
    where: str  # for messages: file (or SOP Instance UID) and frame


def _load(item: str | Path | Dataset) -> tuple[Dataset, str | None]:
    if isinstance(item, Dataset):
        filename = getattr(item, "filename", None)
        path = filename if isinstance(filename, str) and filename else None
        if "SOPClassUID" not in item:
            raise InputError(path or "(in-memory dataset)", "no SOPClassUID, not an image instance")
        return item, path
    path = str(item)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise InputError(path, f"not a DICOM file ({exc})") from exc
    except OSError as exc:
        raise InputError(path, f"cannot read the file ({exc})") from exc
    except (ValueError, EOFError, KeyError, TypeError) as exc:
        # pydicom's parser reports truncated or malformed files with these
        raise InputError(path, f"malformed DICOM file ({type(exc).__name__}: {exc})") from exc
    if "SOPClassUID" not in ds:
        meta = getattr(ds, "file_meta", None)
        media_class = meta.get("MediaStorageSOPClassUID") if meta is not None else None
        kind = f"a {media_class.name} file" if media_class else "a DICOM file without SOPClassUID"
        raise InputError(path, f"{kind}, not an image instance")
    return ds, path


def _series_identity(
    loaded: list[tuple[Dataset, str | None]], series_label: str | None
) -> tuple[str, str, str]:
    series_uids = sorted({str(ds.get("SeriesInstanceUID", "")) for ds, _ in loaded})
    study_uids = sorted({str(ds.get("StudyInstanceUID", "")) for ds, _ in loaded})
    if len(series_uids) > 1:
        raise SeriesError(
            series_label or " + ".join(u or "(none)" for u in series_uids),
            f"instances come from {len(series_uids)} series: "
            + ", ".join(u or "(none)" for u in series_uids),
        )
    label = series_label or series_uids[0] or "(series without SeriesInstanceUID)"
    if len(study_uids) > 1:
        raise SeriesError(label, f"instances disagree on StudyInstanceUID: {', '.join(study_uids)}")
    # one patient per series: the results carry the first instance's patient, so an instance of
    # another patient would file them wrongly (the message names files, not the identifiers)
    first_ds, first_path = loaded[0]
    patient = str(first_ds.get("PatientID", "") or "")
    for ds, path in loaded[1:]:
        if str(ds.get("PatientID", "") or "") != patient:
            raise SeriesError(
                label,
                f"instances disagree on PatientID: {_describe(first_ds, first_path)} and "
                f"{_describe(ds, path)} name different patients",
            )
    # one frame of reference: the SEG places its frames in it
    frames: dict[str, str] = {}  # each FrameOfReferenceUID and the first instance with it
    for ds, path in loaded:
        frames.setdefault(str(ds.get("FrameOfReferenceUID", "") or ""), _describe(ds, path))
    if len(frames) > 1:
        raise SeriesError(
            label,
            "instances disagree on FrameOfReferenceUID: "
            + ", ".join(f"{uid or '(none)'} ({where})" for uid, where in sorted(frames.items())),
        )
    return label, series_uids[0], study_uids[0]


def _describe(ds: Dataset, path: str | None) -> str:
    return path or f"SOPInstanceUID {ds.get('SOPInstanceUID', '(none)')}"


def _check_image(ds: Dataset, path: str | None, label: str) -> None:
    where = _describe(ds, path)
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not str(ds.get(keyword, "") or "").strip():
            raise SeriesError(label, f"{where}: no {keyword}")
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in CT_SOP_CLASSES:
        name = pydicom.uid.UID(sop_class).name if sop_class else "(no SOPClassUID)"
        raise UnsupportedImageError(
            label, f"{where}: SOP class {name} is not a CT image storage class"
        )
    modality = str(ds.get("Modality", ""))
    if modality != "CT":
        raise UnsupportedImageError(label, f"{where}: Modality is {modality or '(empty)'}, not CT")
    samples = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedImageError(
            label,
            f"{where}: not a greyscale image (SamplesPerPixel {samples}, "
            f"PhotometricInterpretation {photometric or '(none)'})",
        )
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if "LOCALIZER" in image_type:
        raise UnsupportedImageError(
            label, f"{where}: a LOCALIZER (scout) image, not an axial slice"
        )
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        reason = f"{where}: no PixelData" + (f" (has {other[0]}, not a CT image)" if other else "")
        raise NoPixelDataError(label, reason)


def _item(sequence_owner: Dataset | None, keyword: str) -> Dataset | None:
    if sequence_owner is None or keyword not in sequence_owner:
        return None
    sequence = sequence_owner[keyword].value
    return sequence[0] if sequence else None


def _functional_value(
    per_frame: Dataset | None, shared: Dataset | None, top: Dataset, sequence: str, keyword: str
) -> Any:
    """A value from the per-frame group, else the shared group, else the top level."""
    for group in (per_frame, shared):
        item = _item(group, sequence)
        if item is not None and keyword in item and item[keyword].value not in (None, ""):
            return item[keyword].value
    value = top.get(keyword)
    return None if value in (None, "") else value


def _frames(ds: Dataset, path: str | None, dataset_index: int, label: str) -> list[_Frame]:
    where = _describe(ds, path)
    rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows < 1 or columns < 1:
        raise InconsistentGeometryError(label, f"{where}: Rows/Columns missing or zero")
    top_instance_number = _int_or_none(ds.get("InstanceNumber"))
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    sop_class = str(ds.SOPClassUID)
    multi_frame = sop_class != CTImageStorage
    if not multi_frame:
        plan: list[tuple[int | None, Dataset | None, Dataset | None]] = [(None, None, None)]
    else:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        per_frame_groups = ds.get("PerFrameFunctionalGroupsSequence")
        shared_seq = ds.get("SharedFunctionalGroupsSequence")
        shared = shared_seq[0] if shared_seq else None
        if per_frame_groups is None or len(per_frame_groups) != n_frames:
            found = 0 if per_frame_groups is None else len(per_frame_groups)
            raise InconsistentGeometryError(
                label, f"{where}: NumberOfFrames {n_frames} but {found} per-frame functional groups"
            )
        plan = [(i, per_frame_groups[i], shared) for i in range(n_frames)]

    frames = []
    for frame_index, per_frame, shared in plan:
        frame_where = where if frame_index is None else f"{where} frame {frame_index + 1}"

        def value(
            sequence: str,
            keyword: str,
            per_frame: Dataset | None = per_frame,
            shared: Dataset | None = shared,
        ) -> Any:
            return _functional_value(per_frame, shared, ds, sequence, keyword)

        position = value("PlanePositionSequence", "ImagePositionPatient")
        orientation = value("PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = value("PixelMeasuresSequence", "PixelSpacing")
        thickness = value("PixelMeasuresSequence", "SliceThickness")
        slope = value("PixelValueTransformationSequence", "RescaleSlope")
        intercept = value("PixelValueTransformationSequence", "RescaleIntercept")
        for name, val, count in (
            ("ImagePositionPatient", position, 3),
            ("ImageOrientationPatient", orientation, 6),
            ("PixelSpacing", spacing, 2),
        ):
            if val is None or len(_values(val)) != count:
                raise InconsistentGeometryError(
                    label, f"{frame_where}: {name} missing or malformed"
                )
        if slope is None or intercept is None:
            raise UnsupportedImageError(
                label,
                f"{frame_where}: no RescaleSlope/RescaleIntercept, Hounsfield units are unknown",
            )
        position = _finite(position, "ImagePositionPatient", frame_where, label, count=3)
        orientation = _finite(orientation, "ImageOrientationPatient", frame_where, label, count=6)
        spacing = _finite(spacing, "PixelSpacing", frame_where, label, count=2)
        (slope,) = _finite(slope, "RescaleSlope", frame_where, label, error=UnsupportedImageError)
        (intercept,) = _finite(
            intercept, "RescaleIntercept", frame_where, label, error=UnsupportedImageError
        )
        if slope == 0:
            raise UnsupportedImageError(
                label, f"{frame_where}: RescaleSlope is 0, Hounsfield units are unknown"
            )
        try:
            thickness = None if thickness is None else float(thickness)
        except (TypeError, ValueError):
            thickness = None  # a hint only (type 2): the positions give the spacing
        if thickness is not None and not np.isfinite(thickness):
            thickness = None
        instance_number = top_instance_number
        if per_frame is not None:
            converted = _item(per_frame, "UnassignedPerFrameConvertedAttributesSequence")
            if converted is not None and converted.get("InstanceNumber") not in (None, ""):
                instance_number = _int_or_none(converted.InstanceNumber)
        pixel_spacing = (float(spacing[0]), float(spacing[1]))
        if not all(np.isfinite(s) and s > 0 for s in pixel_spacing):
            raise InconsistentGeometryError(
                label, f"{frame_where}: PixelSpacing {pixel_spacing} is not positive"
            )
        frames.append(
            _Frame(
                dataset_index=dataset_index,
                frame_index=frame_index,
                source=SourceSlice(
                    sop_instance_uid=sop_uid,
                    sop_class_uid=sop_class,
                    frame_number=None if frame_index is None else frame_index + 1,
                    path=path,
                    image_position_mm=(float(position[0]), float(position[1]), float(position[2])),
                    instance_number=instance_number,
                ),
                orientation=tuple(orientation),
                pixel_spacing=pixel_spacing,
                thickness=thickness,
                slope=slope,
                intercept=intercept,
                rows=rows,
                columns=columns,
                where=frame_where,
            )
        )
    return frames


def _values(value: Any) -> list[Any]:
    """The values of a multi-valued attribute, or the one value of a single-valued one."""
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _finite(
    value: Any,
    name: str,
    where: str,
    label: str,
    *,
    error: type[SeriesError] = InconsistentGeometryError,
    count: int = 1,
) -> tuple[float, ...]:
    """The values of a DS attribute as finite floats; ``error`` naming the file and the attribute
    when one is not a number (a decimal comma, a NaN) or there are not ``count`` of them."""
    values = _values(value)
    shown = "\\".join(str(v) for v in values)
    if len(values) != count:
        raise error(label, f"{where}: {name} '{shown}' has {len(values)} value(s), not {count}")
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count or not all(np.isfinite(n) for n in numbers):
        raise error(label, f"{where}: {name} '{shown}' is not a finite decimal number")
    return numbers


def _padding_range(ds: Dataset, dtype: np.dtype) -> tuple[int, int] | None:
    """Stored values that are padding outside the scanned field (PixelPaddingValue, up to
    PixelPaddingRangeLimit), in the signedness of the decoded pixels; None without padding.

    Padding becomes air: scanners pick values such as 63536 (-2000 written as unsigned) that,
    rescaled like tissue, would turn the corners of the image into a ring of bone or worse.
    """
    value = ds.get("PixelPaddingValue")
    if value is None or value == "":
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    bits = 8 * np.dtype(dtype).itemsize

    def as_stored(raw: Any) -> int:
        number = int(raw)
        if np.dtype(dtype).kind == "i" and number >= 2 ** (bits - 1):
            return number - 2**bits
        if np.dtype(dtype).kind == "u" and number < 0:
            return number + 2**bits
        return number

    low = as_stored(value)
    high = low if limit is None or limit == "" else as_stored(limit)
    return (min(low, high), max(low, high))


def _int_or_none(value: Any) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _check_slice_count(n: int, spec: PreprocessSpec, label: str) -> None:
    if n < spec.min_slices:
        raise TooFewSlicesError(label, f"{n} slice(s), at least {spec.min_slices} required")


def _sort_and_check_geometry(
    frames: list[_Frame], label: str
) -> tuple[list[_Frame], np.ndarray, np.ndarray, tuple[float, float]]:
    """Check that the frames form one stack and sort them along the slice normal."""
    first = frames[0]
    orientation = np.asarray(first.orientation)
    for frame in frames[1:]:
        if np.max(np.abs(np.asarray(frame.orientation) - orientation)) > _ORIENTATION_TOL:
            raise InconsistentGeometryError(
                label,
                f"mixed orientations: {first.where} has {list(first.orientation)}, "
                f"{frame.where} has {list(frame.orientation)}",
            )
        if (frame.rows, frame.columns) != (first.rows, first.columns):
            raise InconsistentGeometryError(
                label,
                f"mixed image sizes: {first.where} is {first.rows}x{first.columns}, "
                f"{frame.where} is {frame.rows}x{frame.columns}",
            )
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=_SPACING_RTOL, atol=0.0):
            raise InconsistentGeometryError(
                label,
                f"mixed pixel spacings: {first.where} has {first.pixel_spacing}, "
                f"{frame.where} has {frame.pixel_spacing}",
            )
    row_dir, col_dir = orientation[:3], orientation[3:]
    if not (
        np.isclose(np.linalg.norm(row_dir), 1, atol=1e-2)
        and np.isclose(np.linalg.norm(col_dir), 1, atol=1e-2)
        and abs(float(row_dir @ col_dir)) < 1e-2
    ):
        raise InconsistentGeometryError(
            label,
            f"{first.where}: ImageOrientationPatient {list(first.orientation)} is not two "
            "orthonormal directions",
        )
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    if normal[2] < 0:
        # feet-first (or transposed) stacks: sort from the feet to the vertex all the same, the
        # order the model was trained on
        normal = -normal
    ipp = np.array([f.source.image_position_mm for f in frames], dtype=np.float64)
    keys = ipp @ normal
    order = np.argsort(keys, kind="stable")
    frames = [frames[i] for i in order]
    keys, ipp = keys[order], ipp[order]

    gaps = np.diff(keys)
    close = np.flatnonzero(gaps < _DUPLICATE_TOL_MM)
    if close.size:
        a, b = frames[close[0]], frames[close[0] + 1]
        same = " (the same instance given twice)" if a.source == b.source else ""
        raise DuplicatePositionError(
            label,
            f"{a.where} and {b.where} share the position {keys[close[0]]:.3f} mm along the slice "
            f"normal{same}; {close.size} duplicate(s) in all",
        )

    # The in-plane offset of each slice origin must move linearly with its normal position: constant
    # for an ordinary stack, a fixed shear for a gantry tilt. Anything else is two stacks mixed.
    if len(frames) > 2:
        in_plane = np.stack([ipp @ row_dir, ipp @ col_dir], axis=1)
        design = np.stack([keys, np.ones_like(keys)], axis=1)
        coeffs, *_ = np.linalg.lstsq(design, in_plane, rcond=None)
        residual = np.abs(in_plane - design @ coeffs).max()
        tolerance = max(first.pixel_spacing)
        if residual > tolerance:
            raise InconsistentGeometryError(
                label,
                f"slice origins do not form one stack: in-plane offsets stray {residual:.2f} mm "
                f"from a straight line (tolerance {tolerance:.2f} mm)",
            )
    return frames, keys, orientation, first.pixel_spacing


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return f"{uid.name} ({uid})" if uid else "unknown transfer syntax (no file meta)"


def _with_syntax_as_read(ds: Dataset) -> Dataset:
    """``ds``, or a shallow copy that names the transfer syntax it was read in when its file meta
    does not (a bare dataset without a file meta header: pydicom knows how it read the bytes, and
    native pixel data needs nothing more). Encapsulated pixel data cannot be guessed this way."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return ds
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        return ds
    syntax = (
        ImplicitVRLittleEndian
        if implicit
        else ExplicitVRLittleEndian
        if little
        else ExplicitVRBigEndian
    )
    named = copy.copy(ds)
    named.file_meta = FileMetaDataset(meta or FileMetaDataset())
    named.file_meta.TransferSyntaxUID = syntax
    return named


def _decode(ds: Dataset, path: str | None, label: str) -> np.ndarray:
    """Stored values of every frame as (frames, rows, columns), signedness resolved."""
    where = _describe(ds, path)
    ds = _with_syntax_as_read(ds)
    _check_native_length(ds, where, label)
    try:
        stored = pixel_array(ds)
    except Exception as exc:
        # Decoder plugins raise anything from RuntimeError to their own types: all mean undecodable.
        raise DecodeError(
            label,
            f"{where}: cannot decode pixel data in {_transfer_syntax(ds)}: "
            f"{type(exc).__name__}: {exc}",
        ) from exc
    if stored.ndim == 2:
        stored = stored[np.newaxis]
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = (n_frames, int(ds.Rows), int(ds.Columns))
    if stored.shape != expected:
        raise DecodeError(
            label,
            f"{where}: decoded shape {stored.shape} in {_transfer_syntax(ds)}, expected {expected}",
        )
    return _resolve_j2k_sign(ds, stored)


def _check_hounsfield(hu: np.ndarray, first: _Frame, label: str) -> None:
    """Refuse a series whose values cannot be Hounsfield units of a head CT: air (about -1000 HU)
    surrounds every head, so the darkest 1 % of the voxels is far below -500 HU. A rescale that
    is wrong (data stored as HU + 1024 with RescaleIntercept 0, a slope of the wrong scale) or an
    image without contrast would otherwise run and give a confident, meaningless result."""
    sample = hu[:, ::4, ::4]
    darkest = float(np.percentile(sample, 1))
    if darkest > _MAX_AIR_HU or float(sample.max()) - float(sample.min()) < 1.0:
        raise UnsupportedImageError(
            label,
            f"the pixel values are not Hounsfield units of a head CT: the darkest 1 % of the "
            f"series is at {darkest:.0f} HU and the values span "
            f"{float(sample.min()):.0f} to {float(sample.max()):.0f} HU, where air should be "
            f"about -1000 (RescaleSlope {first.slope:g}, RescaleIntercept {first.intercept:g} "
            f"in {first.where}: check them)",
        )


def _check_native_length(ds: Dataset, where: str, label: str) -> None:
    """Uncompressed pixel data must be as long as the header says (one byte of padding to an even
    length allowed): pydicom would cut an excess away with a warning and decode the rest on the
    header's grid, which gives a wrong image, not an error (Rows or Columns wrong)."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or syntax.is_compressed or "PixelData" not in ds:
        return
    try:
        bits = int(ds.BitsAllocated)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        expected = (int(ds.Rows) * int(ds.Columns) * n_frames * samples * bits + 7) // 8
    except (AttributeError, TypeError, ValueError) as exc:
        raise DecodeError(
            label, f"{where}: BitsAllocated, Rows or Columns unusable ({exc})"
        ) from exc
    found = len(ds.PixelData)
    if found not in (expected, expected + 1):
        raise DecodeError(
            label,
            f"{where}: PixelData holds {found} bytes, but Rows {ds.Rows} x Columns {ds.Columns} x "
            f"{n_frames} frame(s) x BitsAllocated {bits} need "
            f"{expected}",
        )


def _resolve_j2k_sign(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """Trust a signed full-precision JPEG 2000 codestream over PixelRepresentation 0.

    Some encoders write PixelRepresentation 0 for data whose codestream is signed at the full
    BitsAllocated precision; read as unsigned, air (-2048) becomes 63488 and HU are nonsense.
    Read as signed, every value below 2**(bits-1) is unchanged: genuine unsigned CT is not harmed.
    (Lower precisions are sign-corrected by pydicom according to PixelRepresentation.)
    """
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax not in JPEG2000TransferSyntaxes or int(ds.get("PixelRepresentation", 0)) != 0:
        return stored
    if stored.dtype.kind != "u":
        return stored
    first_frame = next(
        generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1))
    )
    parameters = get_j2k_parameters(first_frame)
    if parameters.get("is_signed") and parameters.get("precision") == 8 * stored.dtype.itemsize:
        return stored.view(stored.dtype.str.replace("u", "i"))
    return stored


# ----------------------------------------------------------------------------------------------
# head centring, resampling, windowing


def _display_axes(orientation: Sequence[float]) -> np.ndarray:
    """Which way the model's rows and columns run on the source image, as a signed permutation.

    Returns the 2 x 2 matrix ``A`` (in (row, col) order) such that one step along model row ``i``
    and column ``j`` moves ``A @ (di, dj)`` in source (row, col): model columns go along the source
    axis closest to the patient's +x (left), model rows along the other source axis, signed towards
    the patient's +y (posterior). The identity for the usual head-first-supine
    [1, 0, 0, 0, 1, 0]; flips for prone or feet-first series; a swap for transposed ones.
    """
    along_cols = np.asarray(orientation[:3], dtype=np.float64)  # patient direction of +column
    along_rows = np.asarray(orientation[3:6], dtype=np.float64)  # patient direction of +row

    def sign(value: float) -> float:
        return -1.0 if value < 0 else 1.0

    if abs(along_cols[0]) >= abs(along_rows[0]):
        # model columns along source columns, model rows along source rows
        return np.array([[sign(along_rows[1]), 0.0], [0.0, sign(along_cols[0])]])
    # transposed: model columns along source rows, model rows along source columns
    return np.array([[0.0, sign(along_rows[0])], [sign(along_cols[1]), 0.0]])


def _prepare(series: HuSeries, spec: PreprocessSpec) -> PreparedSeries:
    n, rows, columns = series.hu.shape
    dr, dc = series.pixel_spacing_mm
    head_row, head_col = _head_centre_px(series.hu, series.pixel_spacing_mm)
    size, step = spec.matrix_size, spec.pixel_spacing_mm
    half = (size - 1) / 2.0
    axes = _display_axes(series.image_orientation)
    # Model pixel (i, j) sits at head + axes @ ((i, j) - half) * step, in (row, col) millimetres
    # from source pixel (0, 0); model pixel (half, half) is the head centre.
    origin_mm = np.array([head_row * dr, head_col * dc]) - axes @ np.array([half, half]) * step
    model_to_source = np.array(
        [
            [axes[0, 0] * step / dr, axes[0, 1] * step / dr, origin_mm[0] / dr],
            [axes[1, 0] * step / dc, axes[1, 1] * step / dc, origin_mm[1] / dc],
            [0.0, 0.0, 1.0],
        ]
    )
    model_to_source.setflags(write=False)
    resampled = _resample_stack(
        series.hu,
        input_spacing=(dr, dc),
        input_origin=(0.0, 0.0),
        output_shape=(size, size),
        output_spacing=(step, step),
        output_origin=(float(origin_mm[0]), float(origin_mm[1])),
        output_axes=axes,
        interpolation="linear",
        outside_value=AIR_HU,
    )
    # window() writes a new array, so a view on the SimpleITK buffer saves one full copy
    image = window(sitk.GetArrayViewFromImage(resampled), spec)
    del resampled
    image.setflags(write=False)
    return PreparedSeries(
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        spec=spec,
        image=image,
        slices=series.slices,
        source_shape=(rows, columns),
        source_pixel_spacing_mm=(dr, dc),
        image_orientation=series.image_orientation,
        normal_positions_mm=series.normal_positions_mm,
        slice_thickness_mm=series.slice_thickness_mm,
        head_centre_px=(float(head_row), float(head_col)),
        model_to_source=model_to_source,
    )


def window(hu: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Brain window to [0, 1]: clip((HU - (level - width / 2)) / width, 0, 1), new float32 array.

    With a shoulder (``window_knee_hu``, ``window_ceiling_hu``) values above the knee rise on a
    second, flatter line from the knee's value to 1.0 at the ceiling.
    """
    low = spec.window_level_hu - spec.window_width_hu / 2.0
    out = np.array(hu, dtype=np.float32, copy=True)
    out -= np.float32(low)
    out *= np.float32(1.0 / spec.window_width_hu)
    knee, ceiling = spec.window_knee_hu, spec.window_ceiling_hu
    if knee is not None and ceiling is not None:
        at_knee = (knee - low) / spec.window_width_hu
        slope = (1.0 - at_knee) / (ceiling - knee)
        # out holds (HU - low) / width; above the knee rewrite it as at_knee + slope * (HU - knee)
        above = out > np.float32(at_knee)
        shoulder = out[above]
        shoulder -= np.float32(at_knee)
        shoulder *= np.float32(spec.window_width_hu * slope)
        shoulder += np.float32(at_knee)
        out[above] = shoulder
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _head_centre_px(hu: np.ndarray, pixel_spacing_mm: tuple[float, float]) -> tuple[float, float]:
    """(row, col) of the head's bounding-box centre over the whole stack, in source pixels.

    Body = HU above -300 on a ~2 mm grid; an in-plane opening removes thin things (table, head
    holder, cables); the largest 3-D connected component is the head. Without any body voxel (an
    empty or all-air series) the centre of the source image is used.
    """
    n, rows, columns = hu.shape
    dr, dc = pixel_spacing_mm
    step_r = max(1, round(_HEAD_SEARCH_MM / dr))
    step_c = max(1, round(_HEAD_SEARCH_MM / dc))
    body = hu[:, ::step_r, ::step_c] > _BODY_HU
    if not body.any():
        return ((rows - 1) / 2.0, (columns - 1) / 2.0)
    radius_r = _THIN_STRUCTURE_RADIUS_MM / (dr * step_r)
    radius_c = _THIN_STRUCTURE_RADIUS_MM / (dc * step_c)
    rr = int(np.floor(radius_r))
    rc = int(np.floor(radius_c))
    yy, xx = np.ogrid[-rr : rr + 1, -rc : rc + 1]
    disk = ((yy / max(radius_r, 1e-9)) ** 2 + (xx / max(radius_c, 1e-9)) ** 2) <= 1.0
    opened = ndimage.binary_opening(body, structure=disk[np.newaxis]) if disk.size > 1 else body
    if not opened.any():
        # everything is thinner than the opening (a tiny test object): use the body as it is
        opened = body
    labels, count = ndimage.label(opened)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        head = labels == int(np.argmax(sizes))
    else:
        head = opened
    head_rows = np.flatnonzero(head.any(axis=(0, 2)))
    head_cols = np.flatnonzero(head.any(axis=(0, 1)))
    centre_row = (head_rows[0] + head_rows[-1]) / 2.0 * step_r
    centre_col = (head_cols[0] + head_cols[-1]) / 2.0 * step_c
    return (float(centre_row), float(centre_col))


_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}


def _resample_stack(
    stack: np.ndarray,
    *,
    input_spacing: tuple[float, float],
    input_origin: tuple[float, float],
    output_shape: tuple[int, int],
    output_spacing: tuple[float, float],
    output_origin: tuple[float, float],
    interpolation: str,
    outside_value: float,
    input_axes: np.ndarray | None = None,
    output_axes: np.ndarray | None = None,
) -> sitk.Image:
    """Resample every slice of (n, rows, cols) in its own plane; spacings, origins: (row, col) mm.

    ``input_axes`` / ``output_axes`` (default identity) are the directions, in (row, col) order, of
    the grid's row and column steps (see :func:`_display_axes`).

    The stack is one 3-D SimpleITK image whose slice axis has spacing 1 and the same sampling on
    both sides, so every output slice is interpolated from its own input slice only (no mixing
    along z). Returns the float32 SimpleITK image; take its array with ``GetArrayFromImage``.

    Raises
    ------
    ValueError
        If ``interpolation`` is not ``"linear"`` or ``"nearest"``.
    """
    if interpolation not in _INTERPOLATORS:
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(stack, dtype=np.float32))
    image.SetSpacing((float(input_spacing[1]), float(input_spacing[0]), 1.0))
    image.SetOrigin((float(input_origin[1]), float(input_origin[0]), 0.0))
    image.SetDirection(_sitk_direction(input_axes))
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize((int(output_shape[1]), int(output_shape[0]), int(stack.shape[0])))
    resampler.SetOutputSpacing((float(output_spacing[1]), float(output_spacing[0]), 1.0))
    resampler.SetOutputOrigin((float(output_origin[1]), float(output_origin[0]), 0.0))
    resampler.SetOutputDirection(_sitk_direction(output_axes))
    resampler.SetInterpolator(_INTERPOLATORS[interpolation])
    resampler.SetDefaultPixelValue(float(outside_value))
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    return resampler.Execute(image)


def _sitk_direction(axes: np.ndarray | None) -> tuple[float, ...]:
    """SimpleITK's (x = column, y = row, z) direction matrix for (row, col) ``axes``."""
    if axes is None:
        return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    a = np.asarray(axes, dtype=np.float64)
    return (a[1, 1], a[1, 0], 0.0, a[0, 1], a[0, 0], 0.0, 0.0, 0.0, 1.0)


def _check_shape(array: np.ndarray, expected: tuple[int, ...], name: str) -> None:
    shape = np.shape(array)
    if tuple(shape) != expected:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(shape)}")


def _slice_spacing(positions: np.ndarray, thickness: float | None) -> np.ndarray:
    n = positions.size
    if n == 1:
        return np.array([np.nan if thickness is None else thickness], dtype=np.float64)
    gaps = np.diff(positions)
    spacing = np.empty(n, dtype=np.float64)
    spacing[0], spacing[-1] = gaps[0], gaps[-1]
    spacing[1:-1] = (gaps[:-1] + gaps[1:]) / 2.0
    spacing.setflags(write=False)
    return spacing
