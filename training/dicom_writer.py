"""Write a CT volume in Hounsfield units as a real DICOM CT Image Storage series.

Used by the phantom generator and by tests that need series with a given geometry (gantry tilt,
uneven spacing, rescale slope/intercept, compressed transfer syntaxes). UIDs are derived from a
seed string, so the same call writes the same files.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

_UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}


@dataclass(frozen=True)
class SeriesGeometry:
    """Geometry of an axial CT series in the DICOM patient coordinate system (LPS, mm).

    ``table_positions_mm`` are the z coordinates of the slice origins in acquisition order; they may
    be unevenly spaced. A gantry tilt rotates the image plane about the patient's left-right axis
    while the table still moves along z, which gives the sheared stack scanners write for tilted
    acquisitions. The tilt sign follows the rotation of the column direction towards -z for positive
    angles; scanners' GantryDetectorTilt sign conventions differ, so the tag is informational.
    """

    rows: int = 512
    columns: int = 512
    pixel_spacing_mm: tuple[float, float] = (0.45, 0.45)  # (between rows, between columns)
    table_positions_mm: tuple[float, ...] = tuple(float(z) for z in np.arange(0.0, 150.0, 5.0))
    slice_thickness_mm: float = 5.0
    gantry_tilt_deg: float = 0.0
    # in-plane position of the first pixel's centre (x, y); None centres the field of view on 0
    first_pixel_xy_mm: tuple[float, float] | None = None

    @property
    def number_of_slices(self) -> int:
        return len(self.table_positions_mm)

    @property
    def row_direction(self) -> np.ndarray:
        return np.array([1.0, 0.0, 0.0])

    @property
    def column_direction(self) -> np.ndarray:
        t = np.deg2rad(self.gantry_tilt_deg)
        return np.array([0.0, np.cos(t), -np.sin(t)])

    @property
    def image_orientation(self) -> list[float]:
        return [float(v) for v in (*self.row_direction, *self.column_direction)]

    def _first_pixel_xy(self) -> tuple[float, float]:
        if self.first_pixel_xy_mm is not None:
            return self.first_pixel_xy_mm
        dr, dc = self.pixel_spacing_mm
        return (-(self.columns - 1) * dc / 2.0, -(self.rows - 1) * dr / 2.0)

    def image_position(self, index: int) -> list[float]:
        x0, y0 = self._first_pixel_xy()
        return [float(x0), float(y0), float(self.table_positions_mm[index])]

    def pixel_coordinates_mm(self, index: int) -> np.ndarray:
        """Patient coordinates (rows, columns, 3) of every pixel centre of slice ``index``."""
        dr, dc = self.pixel_spacing_mm
        origin = np.asarray(self.image_position(index))
        r = np.arange(self.rows, dtype=np.float64)[:, None, None]
        c = np.arange(self.columns, dtype=np.float64)[None, :, None]
        return origin + c * dc * self.row_direction + r * dr * self.column_direction


@dataclass(frozen=True)
class StudyInfo:
    """Patient and study identity written into every instance of a generated series."""

    patient_id: str = "PHANTOM-0001"
    patient_name: str = "Phantom^Head"
    patient_sex: str = "O"
    patient_birth_date: str = "19700101"
    accession_number: str = "RN0001"
    study_id: str = "1"
    study_description: str = "CT HEAD WO CONTRAST (SYNTHETIC)"
    study_date: str = "20260101"
    study_time: str = "120000"
    uid_seed: str = "radnet-phantom-0001"  # every UID is derived from this
    manufacturer: str = "radnet-node synthetic phantom"
    institution_name: str = "radnet-node"
    body_part_examined: str = "HEAD"
    extra: dict[str, object] = field(default_factory=dict)

    def uid(self, *parts: object) -> UID:
        return generate_uid(entropy_srcs=[self.uid_seed, *[str(p) for p in parts]])


def write_ct_series(
    hu_volume: np.ndarray,
    geometry: SeriesGeometry,
    out_dir: Path | str,
    study: StudyInfo | None = None,
    *,
    series_number: int = 2,
    series_description: str = "HEAD 5MM (SYNTHETIC)",
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    signed: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    instance_numbers: Sequence[int] | None = None,
    file_prefix: str = "CT",
) -> list[Path]:
    """Write ``hu_volume`` (slices, rows, columns; HU) as one CT series, one file a slice.

    ``instance_numbers`` lets a test write InstanceNumbers that do not follow position order.
    Compressed ``transfer_syntax`` values are encoded with pydicom's ``Dataset.compress``.
    Returns the written paths in slice order.
    """
    study = study or StudyInfo()
    volume = np.asarray(hu_volume, dtype=np.float64)
    if volume.shape != (geometry.number_of_slices, geometry.rows, geometry.columns):
        raise ValueError(
            f"hu_volume shape {volume.shape} does not match geometry "
            f"({geometry.number_of_slices}, {geometry.rows}, {geometry.columns})"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    series_uid = study.uid("series", series_number)
    frame_uid = study.uid("frame-of-reference")
    study_uid = study.uid("study")
    numbers = (
        list(instance_numbers)
        if instance_numbers is not None
        else list(range(1, geometry.number_of_slices + 1))
    )
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    paths: list[Path] = []
    for index in range(geometry.number_of_slices):
        stored = np.rint((volume[index] - rescale_intercept) / rescale_slope)
        stored = np.clip(stored, info.min, info.max).astype(dtype)
        sop_uid = study.uid("instance", series_number, index)
        ds = _ct_dataset(study, geometry, index, sop_uid, series_uid, study_uid, frame_uid)
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        ds.InstanceNumber = numbers[index]
        ds.RescaleSlope = f"{rescale_slope:g}"
        ds.RescaleIntercept = f"{rescale_intercept:g}"
        ds.PixelRepresentation = 1 if signed else 0
        ds.PixelData = stored.tobytes()
        ds.file_meta = _file_meta(sop_uid)
        if UID(transfer_syntax) in _UNCOMPRESSED:
            ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        else:
            ds.compress(UID(transfer_syntax), stored)
        path = out / f"{file_prefix}{index + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _file_meta(sop_uid: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.10.1505.1")
    meta.ImplementationVersionName = "RADNET_PHANTOM"
    return meta


def _ct_dataset(  # noqa: PLR0917 (private helper, one call site)
    study: StudyInfo,
    geometry: SeriesGeometry,
    index: int,
    sop_uid: UID,
    series_uid: UID,
    study_uid: UID,
    frame_uid: UID,
) -> Dataset:
    ds = Dataset()
    # SOP Common
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = dt.date.today().strftime("%Y%m%d")
    # Patient
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    ds.StudyDescription = study.study_description
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.BodyPartExamined = study.body_part_examined
    ds.PatientPosition = "HFS"
    ds.SeriesDate = study.study_date
    ds.SeriesTime = study.study_time
    # Frame of Reference
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = study.manufacturer
    ds.InstitutionName = study.institution_name
    ds.ManufacturerModelName = "radnet-phantom"
    # General Image / CT Image
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.ContentDate = study.study_date
    ds.ContentTime = study.study_time
    ds.KVP = "120"
    ds.GantryDetectorTilt = f"{geometry.gantry_tilt_deg:g}"
    ds.ConvolutionKernel = "H30s"
    # Image Plane
    ds.PixelSpacing = [f"{v:g}" for v in geometry.pixel_spacing_mm]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in geometry.image_orientation]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in geometry.image_position(index)]
    ds.SliceThickness = f"{geometry.slice_thickness_mm:g}"
    ds.SliceLocation = f"{geometry.table_positions_mm[index]:.4f}"
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = geometry.rows
    ds.Columns = geometry.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"
    for keyword, value in study.extra.items():
        setattr(ds, keyword, value)
    return ds


def read_back(path: Path | str) -> Dataset:
    """Read one written file (a convenience for tests)."""
    return pydicom.dcmread(path)
