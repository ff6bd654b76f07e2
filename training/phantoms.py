"""Synthetic head CT series with acute hemorrhages, written as real DICOM, for training RADnet.

Mode 1 samples whole heads from the MNI152-based atlas (``training.anatomy``) with lesions and
mimics (``training.lesions``) through a scanner model; mode 2 inserts the same lesion kinds into
real head CT slices. ``radnet-phantoms`` writes the dataset layout ``training.datasets`` reads.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import math
import shutil
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
import torch
import torch.nn.functional as F
import typer
from scipy import ndimage as ndi
from tqdm import tqdm

from radnet_node.errors import DatasetError, InputError, RadnetError
from training.anatomy import ATLAS_VERSION, HeadAtlas, TissueHU, compose_head_hu, head_atlas
from training.dicom_writer import SeriesGeometry, StudyInfo, write_ct_series
from training.lesions import (
    SUBTYPE_WEIGHTS,
    SUBTYPES,
    LesionField,
    MassEffect,
    draw_subtypes,
    render_lesions,
    sample_hemorrhages,
    sample_mimics,
)

GENERATOR_VERSION = "1.0.0"
logger = logging.getLogger(__name__)

# independent random streams of one case: the label and the blood never change anything else
_STREAM_LABEL, _STREAM_POSE, _STREAM_SCANNER, _STREAM_MIMICS, _STREAM_LESIONS, _STREAM_NOISE = (
    range(6)
)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# (slope, intercept, signed) as scanners write them
_RESCALES = (
    (1.0, -1024.0, False),
    (1.0, -1024.0, True),
    (1.0, 0.0, True),
    (1.0, -8192.0, False),
    (0.5, -1024.0, False),
)
_RESCALE_WEIGHTS = (0.45, 0.2, 0.2, 0.1, 0.05)
_BONE_DOMINATED_HU = 150.0


@dataclass(frozen=True)
class PhantomOptions:
    """How cases are generated; every random choice is drawn from the ranges below per case.

    Parameters
    ----------
    rows : int
        Image rows and columns (512 for real use; 64-128 for tests). The field of view stays
        ~205-256 mm, so the pixel spacing grows as ``rows`` shrinks.
    slice_thickness_mm : float, optional
        Fixed slice thickness (and nominal spacing); random in 1-5 mm when None.
    positive_fraction : float
        Probability that a case has hemorrhage.
    tilt_probability : float
        Probability of a gantry tilt (5-25 degrees).
    uneven_probability : float
        Probability of unevenly spaced table positions.
    noise_sigma_hu : tuple of float
        Range of the quantum-noise standard deviation (HU).
    min_positive_area_mm2 : float
        A slice is labelled positive when its mask covers at least this area (2 mm2 is ~10
        pixels at 0.45 mm).
    background_slices : int
        Mode 2: slices in the series built from one real background slice.
    subtype_weights : tuple of float
        Relative frequency of each hemorrhage subtype, in ``SUBTYPES`` order (intraparenchymal,
        subdural, epidural, subarachnoid, intraventricular); normalised to sum to 1.

    Raises
    ------
    ValueError
        When a value is out of range.
    """

    rows: int = 512
    slice_thickness_mm: float | None = None
    positive_fraction: float = 0.5
    tilt_probability: float = 0.2
    uneven_probability: float = 0.1
    noise_sigma_hu: tuple[float, float] = (3.0, 8.0)
    min_positive_area_mm2: float = 2.0
    background_slices: int = 12
    subtype_weights: tuple[float, ...] = SUBTYPE_WEIGHTS

    def __post_init__(self) -> None:
        if not 32 <= self.rows <= 1024:
            raise ValueError(f"rows must be in 32-1024, got {self.rows}")
        if self.slice_thickness_mm is not None and not 0.5 <= self.slice_thickness_mm <= 10.0:
            raise ValueError(
                f"slice_thickness_mm must be in 0.5-10 mm, got {self.slice_thickness_mm}"
            )
        for name in ("positive_fraction", "tilt_probability", "uneven_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        low, high = self.noise_sigma_hu
        if not 0.0 <= low <= high <= 50.0:
            raise ValueError(
                f"noise_sigma_hu must be 0 <= low <= high <= 50, got {self.noise_sigma_hu}"
            )
        if self.min_positive_area_mm2 <= 0:
            raise ValueError(f"min_positive_area_mm2 must be > 0, got {self.min_positive_area_mm2}")
        if not 3 <= self.background_slices <= 64:
            raise ValueError(f"background_slices must be in 3-64, got {self.background_slices}")
        weights = tuple(float(w) for w in self.subtype_weights)
        total = sum(weights)
        if len(weights) != len(SUBTYPES) or min(weights) < 0 or total <= 0:
            raise ValueError(
                f"subtype_weights must be {len(SUBTYPES)} non-negative numbers "
                f"({', '.join(SUBTYPES)}) with a positive sum, got {self.subtype_weights}"
            )
        if abs(total - 1.0) > 1e-9:  # the defaults pass unchanged: same draws as before
            weights = tuple(w / total for w in weights)
        object.__setattr__(self, "subtype_weights", weights)


@dataclass(frozen=True)
class LesionRecord:
    """One hemorrhage as it came out in the series (measured on the output mask)."""

    subtype: str
    centre_mm: tuple[float, float, float]  # patient LPS
    volume_ml: float
    mean_hu: float


@dataclass(frozen=True, eq=False)
class PhantomCase:
    """One generated series before it is written.

    Attributes
    ----------
    case_id : str
        Dataset case identifier.
    hu : np.ndarray
        float32 (slices, rows, columns): HU as written (noise included), inferior to superior.
    hu_noise_free : np.ndarray
        The same before quantum noise and streaks.
    mask : np.ndarray
        uint8 (slices, rows, columns): 1 = blood (fraction >= 0.5 of the pixel).
    geometry : SeriesGeometry
        Where the slices are.
    lesions : tuple of LesionRecord
        The hemorrhages (empty for a negative case).
    ct_label : int
        1 when any slice is positive.
    slice_labels : tuple of int
        Per slice: 1 when the mask covers ``min_positive_area_mm2``.
    slice_subtypes : tuple of tuple of str
        Per slice: the subtypes present.
    rescale : tuple
        (slope, intercept, signed) to write with.
    study : StudyInfo
        Patient/study identity and the UID seed.
    generator : str
        ``mni152`` (mode 1) or ``background`` (mode 2).
    details : dict
        JSON-serialisable record of every random choice (for the manifest).
    """

    case_id: str
    hu: np.ndarray
    hu_noise_free: np.ndarray
    mask: np.ndarray
    geometry: SeriesGeometry
    lesions: tuple[LesionRecord, ...]
    ct_label: int
    slice_labels: tuple[int, ...]
    slice_subtypes: tuple[tuple[str, ...], ...]
    rescale: tuple[float, float, bool]
    study: StudyInfo
    generator: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def subtypes(self) -> tuple[str, ...]:
        """Subtypes with at least one positive slice, in ``SUBTYPES`` order."""
        present = {s for per_slice in self.slice_subtypes for s in per_slice}
        return tuple(s for s in SUBTYPES if s in present)


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(
        np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index), stream, 0x5ADE7])
    )


# ---------------------------------------------------------------- pose: MNI <-> patient


def _rotation(yaw_deg: float, roll_deg: float, pitch_deg: float) -> np.ndarray:
    """RAS rotation: yaw about S, roll about A, pitch about R (degrees)."""
    a, b, c = np.deg2rad([yaw_deg, roll_deg, pitch_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class _Pose:
    """patient LPS p = F (R S (m - m_c)) + t  for an MNI point m; an elastic warp on top."""

    linear: np.ndarray  # 3x3: MNI -> patient LPS
    mni_centre: np.ndarray
    translation: np.ndarray  # patient LPS of mni_centre
    elastic: tuple[tuple[float, ...], ...]  # (axis, amplitude, kx, ky, kz, phase)
    pushes: tuple[MassEffect, ...]

    def to_patient(self, mni: np.ndarray) -> np.ndarray:
        return (np.asarray(mni) - self.mni_centre) @ self.linear.T + self.translation

    def to_mni(self, patient: np.ndarray) -> np.ndarray:
        inverse = np.linalg.inv(self.linear)
        return (np.asarray(patient) - self.translation) @ inverse.T + self.mni_centre


def _warp(points: np.ndarray, pose: _Pose, atlas: HeadAtlas) -> np.ndarray:
    """Atlas voxel indices (..., 3) of patient points, with the elastic field and mass effects."""
    mni = pose.to_mni(points)
    elastic = np.zeros_like(mni)
    for axis, amp, kx, ky, kz, phase in pose.elastic:
        elastic[..., int(axis)] += amp * np.sin(
            mni[..., 0] * kx + mni[..., 1] * ky + mni[..., 2] * kz + phase
        )
    mni = mni + elastic
    if pose.pushes:
        idx = np.rint(mni - atlas.origin_mm).astype(np.int64)
        for a in range(3):
            np.clip(idx[..., a], 0, atlas.shape[a] - 1, out=idx[..., a])
        # the skull and scalp never move: only the cranial contents are displaced
        inside = atlas.inner_depth_mm[idx[..., 0], idx[..., 1], idx[..., 2]] > 0.0
        for push in pose.pushes:
            centre = np.asarray(push.centre_mni)
            d = mni - centre
            r = np.linalg.norm(d, axis=-1)
            rho = max(2.0 * push.amplitude_mm, 3.0)
            u = (
                push.amplitude_mm
                * np.tanh(r / rho)
                * np.clip(1.0 - (r / push.radius_mm) ** 2, 0.0, 1.0) ** 2
            )
            scale = np.where(inside & (r > 1e-6), 1.0 - u / np.maximum(r, 1e-6), 1.0)
            mni = centre + d * scale[..., None]
    return mni - atlas.origin_mm


# ---------------------------------------------------------------- sampling the volume


def _plane_points(
    geometry: SeriesGeometry, index: int, factor: int, offset_mm: float, coarse: int
) -> tuple[np.ndarray, int]:
    """Patient coordinates of a coarse grid over one sub-plane's low-resolution sampling grid."""
    n_lo = geometry.rows // factor
    m_lo = geometry.columns // factor
    nr = (n_lo - 1) // coarse + 2
    nc = (m_lo - 1) // coarse + 2
    r_lo = np.linspace(0.0, n_lo - 1, nr)
    c_lo = np.linspace(0.0, m_lo - 1, nc)
    rr = r_lo * factor + (factor - 1) / 2.0
    cc = c_lo * factor + (factor - 1) / 2.0
    dr, dc = geometry.pixel_spacing_mm
    origin = np.asarray(geometry.image_position(index), dtype=np.float64)
    normal = np.cross(geometry.row_direction, geometry.column_direction)
    pts = (
        origin
        + offset_mm * normal
        + cc[None, :, None] * dc * geometry.row_direction
        + rr[:, None, None] * dr * geometry.column_direction
    )
    return pts, nr


def _sub_plane_offsets(thickness_mm: float) -> np.ndarray:
    # the slice sensitivity profile as a box of sub-planes at most ~1 mm apart
    n = max(1, int(math.ceil(thickness_mm / 1.0 - 1e-6)))
    return (np.arange(n) + 0.5) / n * thickness_mm - thickness_mm / 2.0


def _normalised_grid(
    idx: torch.Tensor, shape: Sequence[int], lo: Sequence[int] = (0, 0, 0)
) -> torch.Tensor:
    """grid_sample coordinates (x -> last dim) of atlas indices (..., 3) for a volume (X, Y, Z)."""
    parts = [
        (idx[..., a] - float(lo[a])) / max(float(shape[a]) - 1.0, 1.0) * 2.0 - 1.0
        for a in (2, 1, 0)
    ]
    return torch.stack(parts, dim=-1)


def _sample_series(
    geometry: SeriesGeometry,
    pose: _Pose,
    atlas: HeadAtlas,
    volume: np.ndarray,
    *,
    crops: Sequence[LesionField],
    factor: int,
) -> tuple[np.ndarray, np.ndarray]:
    """HU and per-lesion fractions of every slice on the low-resolution grid, slab-averaged.

    ``volume`` holds HU + 1000 so that the zero padding of grid_sample is air.
    """
    offsets = _sub_plane_offsets(geometry.slice_thickness_mm)
    n_lo, m_lo = geometry.rows // factor, geometry.columns // factor
    vol_t = torch.from_numpy(volume)[None, None]
    crop_t = [torch.from_numpy(c.fraction)[None, None] for c in crops]
    hu = np.empty((geometry.number_of_slices, n_lo, m_lo), dtype=np.float32)
    fractions = np.zeros((len(crops), geometry.number_of_slices, n_lo, m_lo), dtype=np.float32)
    coarse = 8
    for i in range(geometry.number_of_slices):
        grids = []
        for offset in offsets:
            pts, nr = _plane_points(geometry, i, factor, float(offset), coarse)
            grids.append(_warp(pts, pose, atlas))
        coarse_idx = torch.from_numpy(np.stack(grids).astype(np.float32)).permute(0, 3, 1, 2)
        idx = F.interpolate(coarse_idx, size=(n_lo, m_lo), mode="bilinear", align_corners=True)
        idx = idx.permute(0, 2, 3, 1)  # (sub, n_lo, m_lo, 3)
        grid = _normalised_grid(idx, atlas.shape)[None]  # (1, sub, n_lo, m_lo, 3)
        sampled = F.grid_sample(
            vol_t, grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )
        hu[i] = sampled[0, 0].mean(dim=0).numpy() - 1000.0
        for k, lesion in enumerate(crops):
            lo = np.asarray(lesion.lo, dtype=np.float32)
            hi = lo + np.asarray(lesion.fraction.shape, dtype=np.float32) - 1
            flat = idx.reshape(-1, 3)
            if ((flat.amax(0).numpy() < lo - 1).any()) or ((flat.amin(0).numpy() > hi + 1).any()):
                continue
            g = _normalised_grid(idx, lesion.fraction.shape, lesion.lo)[None]
            f = F.grid_sample(
                crop_t[k], g, mode="bilinear", padding_mode="zeros", align_corners=True
            )
            fractions[k, i] = f[0, 0].mean(dim=0).numpy()
    return hu, fractions


def _upsample(images: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return images
    t = torch.from_numpy(images)[:, None]
    return F.interpolate(t, scale_factor=factor, mode="bilinear", align_corners=False)[:, 0].numpy()


def _gaussian_blur(images: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px < 0.2:
        return images
    return ndi.gaussian_filter(images, (0, sigma_px, sigma_px), mode="nearest").astype(np.float32)


def _correlated_noise(
    shape: tuple[int, int, int],
    pixel_mm: float,
    sigma: float,
    cutoff: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Quantum noise with a CT-like (band-pass, ramp-filtered) noise power spectrum."""
    n, rows, cols = shape
    fy = np.fft.fftfreq(rows, d=pixel_mm)[:, None]
    fx = np.fft.rfftfreq(cols, d=pixel_mm)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    # NPS ~ f * apodisation: the ramp filter of filtered back-projection times the kernel's roll-off
    nps = (f + 0.04) * np.exp(-((f / cutoff) ** 2))
    fy_full = np.fft.fftfreq(cols, d=pixel_mm)[None, :]
    nps_full = (np.sqrt(fy_full**2 + fy**2) + 0.04) * np.exp(-((fy_full**2 + fy**2) / cutoff**2))
    gain = (sigma / np.sqrt(nps_full.mean())) * np.sqrt(nps)
    white = rng.standard_normal(shape, dtype=np.float32)
    spectrum = np.fft.rfft2(white, norm="ortho") * gain[None].astype(np.float32)
    return np.fft.irfft2(spectrum, s=(rows, cols), norm="ortho").astype(np.float32)


def _beam_hardening(images: np.ndarray, pixel_mm: float, strength: float) -> np.ndarray:
    """Streaks and cupping from uncorrected beam hardening in bone (HU to add), per slice.

    The polychromatic error of a ray grows with the square of the bone it crosses; filtered
    back-projection of that error gives the dark bands between dense bones (petrous ridges,
    skull base) and faint streaks along the skull. Computed on a ~3.6 mm grid: the bands are broad.
    """
    n, rows, cols = images.shape
    size = 64
    t = torch.from_numpy(np.ascontiguousarray(images))[:, None]
    small = F.interpolate(t, size=(size, size), mode="area")
    bone = torch.clamp((small - 200.0) / 1000.0, min=0.0) * (rows * pixel_mm / size)  # mm of bone
    angles = torch.linspace(0.0, math.pi, 61)[:-1]
    cos, sin = torch.cos(angles), torch.sin(angles)
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(theta, [len(angles), 1, size, size], align_corners=False)
    artefact = torch.zeros((n, size, size))
    padded = 2 * size  # zero padding keeps the ramp filter from shifting the mean
    ramp = 2.0 * torch.fft.rfftfreq(padded)  # Ram-Lak filter
    back_grid = F.affine_grid(
        _inverse_theta(theta), [len(angles), 1, size, size], align_corners=False
    )
    for i in range(n):
        if float(bone[i].max()) <= 0:
            continue
        rotated = F.grid_sample(
            bone[i : i + 1].expand(len(angles), -1, -1, -1), grid, align_corners=False
        )
        projection = rotated.sum(dim=2)  # (angles, 1, size): line integrals of bone (mm)
        error = -(projection**2)
        spectrum = torch.fft.rfft(error, n=padded, dim=-1) * ramp
        filtered = torch.fft.irfft(spectrum, n=padded, dim=-1)[..., :size]
        smeared = filtered[:, :, None, :].expand(-1, -1, size, -1)
        back = F.grid_sample(smeared, back_grid, align_corners=False).sum(dim=0)[0]
        artefact[i] = back * (math.pi / len(angles))
    # next to the bone the coarse grid rings; what shows in the brain are the far-reaching bands
    bone_mask = (small[:, 0] > 400.0).numpy()
    near = np.stack(
        [ndi.distance_transform_edt(~b) if b.any() else np.full(b.shape, 1e3) for b in bone_mask]
    )
    keep = 1.0 - np.exp(-0.5 * (near * (rows * pixel_mm / size) / 5.0) ** 2)
    brain = ((small[:, 0] > 0.0) & (small[:, 0] < 80.0)).numpy()
    artefact_np = artefact.numpy() * keep
    for i in range(n):
        if brain[i].any():
            artefact_np[i] -= np.median(artefact_np[i][brain[i]])
    artefact_np *= keep
    big = F.interpolate(
        torch.from_numpy(artefact_np)[:, None].float(),
        size=(rows, cols),
        mode="bicubic",
        align_corners=False,
    )[:, 0]
    return (strength * big).numpy().astype(np.float32)


def _inverse_theta(theta: torch.Tensor) -> torch.Tensor:
    inverse = theta.clone()
    inverse[:, :, :2] = theta[:, :, :2].transpose(1, 2)
    return inverse


def _headrest(
    geometry: SeriesGeometry,
    centre_xy: tuple[float, float],
    radius_mm: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """A curved head holder behind the head and the table under it: (fraction, HU) in-plane.

    The holder runs along the table, so its cross-section is the same in every slice.
    """
    dr, dc = geometry.pixel_spacing_mm
    x0, y0 = geometry.image_position(0)[:2]
    cos_t = math.cos(math.radians(geometry.gantry_tilt_deg))
    y = y0 + np.arange(geometry.rows)[:, None] * dr * cos_t
    x = x0 + np.arange(geometry.columns)[None, :] * dc
    r = np.sqrt((x - centre_xy[0]) ** 2 + (y - centre_xy[1]) ** 2)
    shell = rng.uniform(2.5, 4.5)
    holder = np.clip(shell / 2.0 - np.abs(r - radius_mm) + 0.5, 0.0, 1.0) * (
        y > centre_xy[1] + 10.0
    )
    pad = np.clip(radius_mm - 1.0 - r, 0.0, 1.0) * np.clip(
        r - (radius_mm - rng.uniform(6, 14)), 0.0, 1.0
    )
    pad *= y > centre_xy[1] + 25.0
    table_y = centre_xy[1] + radius_mm + rng.uniform(8.0, 25.0)
    table = np.clip(2.5 - np.abs(y - table_y) + 0.5, 0.0, 1.0) * np.ones_like(x)
    holder_hu = rng.uniform(150.0, 450.0)
    fraction = np.clip(holder + table + 0.6 * pad, 0.0, 1.0)
    hu = np.where(pad > holder + table, rng.uniform(-850.0, -650.0), holder_hu) * np.ones_like(x)
    return fraction.astype(np.float32), hu.astype(np.float32)


# ---------------------------------------------------------------- mode 1: whole heads


@functools.lru_cache(maxsize=2)
def _head_points(atlas: HeadAtlas) -> tuple[np.ndarray, np.ndarray]:
    """MNI points (subsampled) of the skull and of the lowest brain: field of view and coverage."""
    skull = np.argwhere(atlas.extracranial_hu[::3, ::3, ::3] > 300.0) * 3 + atlas.origin_mm
    skull = skull[skull[:, 2] > -60.0]
    brain = np.argwhere(atlas.intracranial[::2, ::2, ::2] > 128) * 2 + atlas.origin_mm
    brain = brain[(brain[:, 2] > -62.0) & (brain[:, 2] < -30.0)]
    return skull.astype(np.float64), brain.astype(np.float64)


def _tissue(rng: np.random.Generator) -> TissueHU:
    return TissueHU(
        grey=float(rng.uniform(35.0, 40.0)),
        white=float(rng.uniform(25.0, 30.0)),
        csf=float(rng.uniform(0.0, 10.0)),
        bone_factor=float(rng.uniform(0.85, 1.15)),
        venous_blood=float(rng.uniform(40.0, 60.0)),  # flowing blood: hematocrit-dependent, normal
        falx_extra=float(rng.uniform(10.0, 55.0)),
        inner_table_rim=float(rng.uniform(-2.0, 8.0)),
    )


def _mask_summary(
    fractions: np.ndarray,
    geometry: SeriesGeometry,
    options: PhantomOptions,
    subtypes: Sequence[str],
) -> tuple[np.ndarray, tuple[int, ...], tuple[tuple[str, ...], ...], np.ndarray]:
    """Mask, slice labels and slice subtypes from per-lesion fractions (lesion, slice, row, col)."""
    n = geometry.number_of_slices
    shape = (n, geometry.rows, geometry.columns)
    if len(subtypes) == 0:
        return np.zeros(shape, np.uint8), (0,) * n, ((),) * n, np.zeros((0, *shape), bool)
    per_lesion = fractions >= 0.5
    mask = (np.clip(fractions.sum(axis=0), 0.0, 1.0) >= 0.5) | per_lesion.any(axis=0)
    area = float(np.prod(geometry.pixel_spacing_mm))
    min_pixels = options.min_positive_area_mm2 / area
    labels = tuple(int(mask[i].sum() >= min_pixels) for i in range(n))
    slice_subtypes = tuple(
        tuple(
            s
            for s in SUBTYPES
            if any(
                subtypes[k] == s and per_lesion[k, i].sum() >= min(min_pixels, 1.0)
                for k in range(len(subtypes))
            )
        )
        if labels[i]
        else ()
        for i in range(n)
    )
    return mask.astype(np.uint8), labels, slice_subtypes, per_lesion


def _pixel_to_patient(geometry: SeriesGeometry, k: float, r: float, c: float) -> np.ndarray:
    z = np.interp(k, np.arange(geometry.number_of_slices), np.asarray(geometry.table_positions_mm))
    x0, y0 = geometry.image_position(0)[:2]
    dr, dc = geometry.pixel_spacing_mm
    return (
        np.array([x0, y0, z]) + c * dc * geometry.row_direction + r * dr * geometry.column_direction
    )


def _lesion_records(
    per_lesion: np.ndarray,
    hu_noise_free: np.ndarray,
    geometry: SeriesGeometry,
    subtypes: Sequence[str],
    fallback_centres: Sequence[npt.ArrayLike],
) -> tuple[LesionRecord, ...]:
    spacing = np.diff(np.asarray(geometry.table_positions_mm))
    slice_step = (
        float(np.mean(spacing)) * math.cos(math.radians(geometry.gantry_tilt_deg))
        if len(spacing)
        else (geometry.slice_thickness_mm)
    )
    voxel_ml = float(np.prod(geometry.pixel_spacing_mm)) * slice_step / 1000.0
    records = []
    for k, subtype in enumerate(subtypes):
        m = per_lesion[k]
        if m.any():
            kk, rr, cc = (float(v.mean()) for v in np.nonzero(m))
            centre = _pixel_to_patient(geometry, kk, rr, cc)
            mean_hu = float(hu_noise_free[m].mean())
        else:
            centre, mean_hu = np.asarray(fallback_centres[k]), float("nan")
        records.append(
            LesionRecord(
                subtype,
                tuple(round(float(v), 2) for v in centre),  # type: ignore[arg-type]
                round(float(m.sum()) * voxel_ml, 3),
                round(mean_hu, 1),
            )
        )
    return tuple(records)


def _reconstruction_circle(
    images: np.ndarray, geometry: SeriesGeometry, pad_hu: float | None
) -> None:
    if pad_hu is None:
        return
    rows, cols = geometry.rows, geometry.columns
    r = np.hypot(
        np.arange(rows)[:, None] - (rows - 1) / 2, np.arange(cols)[None, :] - (cols - 1) / 2
    )
    images[:, r > min(rows, cols) / 2.0] = pad_hu


def _choose_rescale(rng: np.random.Generator) -> tuple[tuple[float, float, bool], float | None]:
    slope, intercept, signed = _RESCALES[int(rng.choice(len(_RESCALES), p=_RESCALE_WEIGHTS))]
    lowest = intercept + slope * (-32768 if signed else 0)
    pads = [p for p in (-2000.0, -3024.0) if p >= lowest]
    pad = float(rng.choice(pads)) if pads and rng.random() < 0.6 else None
    return (slope, intercept, signed), pad


def generate_case(
    seed: int,
    index: int,
    options: PhantomOptions | None = None,
    subtypes: tuple[str, ...] | None = None,
) -> PhantomCase:
    """Generate case ``index`` of the dataset with ``seed`` (mode 1: a whole synthetic head).

    Every random choice comes from streams derived from (seed, index), so cases can be generated in
    any order or in parallel. The label, the hemorrhages and the noise have their own streams: a
    positive case differs from the negative case with the same (seed, index) only by its blood.

    Parameters
    ----------
    seed : int
        Dataset seed.
    index : int
        Case number.
    options : PhantomOptions, optional
        Generation options.
    subtypes : tuple of str, optional
        Force a positive case with exactly these hemorrhages (one lesion per entry).

    Returns
    -------
    PhantomCase

    Raises
    ------
    DatasetError
        When the atlas cannot be built (missing templates).
    ValueError
        When a forced subtype is unknown.
    """
    options = options or PhantomOptions()
    atlas = head_atlas()
    positive = bool(_rng(seed, index, _STREAM_LABEL).random() < options.positive_fraction) or bool(
        subtypes
    )
    pose_rng = _rng(seed, index, _STREAM_POSE)
    scan_rng = _rng(seed, index, _STREAM_SCANNER)

    # anatomy and pose
    tissue = _tissue(pose_rng)
    atrophy = float(pose_rng.uniform(0.25, 0.9)) if pose_rng.random() < 0.35 else 0.0
    scale = pose_rng.uniform(0.9, 1.1) * pose_rng.uniform(0.97, 1.03, 3)
    angles = (
        float(pose_rng.uniform(-10, 10)),
        float(pose_rng.uniform(-10, 10)),
        float(pose_rng.uniform(-15, 15)),
    )
    linear = _LPS_TO_RAS @ _rotation(*angles) @ np.diag(scale)
    elastic = tuple(
        (
            float(axis),
            float(pose_rng.uniform(0.8, 2.5)),
            *(
                pose_rng.standard_normal(3)
                * 2
                * np.pi
                / pose_rng.uniform(60.0, 140.0)
                / math.sqrt(3.0)
            ).tolist(),
            float(pose_rng.uniform(0, 2 * np.pi)),
        )
        for axis in range(3)
        for _ in range(2)
    )
    pushes: list[MassEffect] = []
    if atrophy > 0:  # enlarged lateral ventricles
        for side in ("left", "right"):
            pushes.append(
                MassEffect(atlas.landmarks[f"lateral_ventricle_{side}"], 1.5 + 4.0 * atrophy, 38.0)
            )

    # scanner geometry
    thickness = options.slice_thickness_mm or float(
        scan_rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0])
    )
    tilt = (
        float(scan_rng.uniform(5.0, 25.0)) * (1 if scan_rng.random() < 0.85 else -1)
        if (scan_rng.random() < options.tilt_probability)
        else 0.0
    )
    skull_pts, base_pts = _head_points(atlas)
    centre = np.array([0.0, -17.0, 10.0])
    skull_p = (skull_pts - centre) @ linear.T
    lo, hi = skull_p.min(axis=0), skull_p.max(axis=0)
    extent = float(max(hi[0] - lo[0], (hi[1] - lo[1]) / math.cos(math.radians(tilt))))
    pixel = float(scan_rng.uniform(0.4, 0.5)) * 512.0 / options.rows
    pixel = max(pixel, (extent + 12.0) / options.rows)
    fov = pixel * options.rows
    allowed = np.maximum((fov - (hi - lo)[:2]) / 2.0 - 6.0, 0.0)
    offset = np.array(
        [
            scan_rng.uniform(-1, 1) * min(30.0, allowed[0]),
            scan_rng.uniform(-1, 1) * min(30.0, allowed[1]),
        ]
    )
    translation = np.array(
        [offset[0] - (lo[0] + hi[0]) / 2.0, offset[1] - (lo[1] + hi[1]) / 2.0, 0.0]
    )
    y0 = -(options.rows - 1) * pixel / 2.0
    tan_t = math.tan(math.radians(tilt))

    def table_value(points: np.ndarray) -> np.ndarray:
        p = (points - centre) @ linear.T + translation
        return p[:, 2] + (p[:, 1] - y0) * tan_t

    v_min = float(table_value(base_pts).min()) - float(scan_rng.uniform(0.0, 5.0))
    v_max = float(table_value(skull_pts).max()) + float(scan_rng.uniform(0.0, 3.0))
    uneven = scan_rng.random() < options.uneven_probability
    positions = [v_min]
    while positions[-1] < v_max:
        step = thickness * (float(scan_rng.uniform(0.7, 1.35)) if uneven else 1.0)
        positions.append(positions[-1] + step)
    geometry = SeriesGeometry(
        rows=options.rows,
        columns=options.rows,
        pixel_spacing_mm=(pixel, pixel),
        table_positions_mm=tuple(round(p, 3) for p in positions),
        slice_thickness_mm=thickness,
        gantry_tilt_deg=round(tilt, 3),
    )
    rescale, pad_hu = _choose_rescale(scan_rng)
    blur_fwhm = float(scan_rng.uniform(0.6, 1.0))
    sigma = float(scan_rng.uniform(*options.noise_sigma_hu))
    cutoff = float(scan_rng.uniform(0.18, 0.35))
    beam_hardening = float(scan_rng.uniform(0.3, 1.2))
    headrest_radius = float((hi[1] - lo[1]) / 2.0 + scan_rng.uniform(4.0, 15.0))
    headrest = _headrest(geometry, (offset[0], offset[1]), headrest_radius, scan_rng)

    # findings
    mimics = sample_mimics(atlas, _rng(seed, index, _STREAM_MIMICS))
    gravity = np.linalg.inv(linear) @ np.array(
        [0.0, 1.0, 0.0]
    )  # supine: towards the patient's back
    gravity /= np.linalg.norm(gravity)
    lesion_rng = _rng(seed, index, _STREAM_LESIONS)
    pose = _Pose(linear, centre, translation, elastic, tuple(pushes))
    factor = max(1, int(round(1.0 / pixel)))
    if options.rows % factor:
        factor = 1
    base = compose_head_hu(atlas, tissue, atrophy)
    render_lesions(base, atlas, mimics, tissue)

    for _attempt in range(6):
        lesions = (
            sample_hemorrhages(
                atlas, lesion_rng, gravity, subtypes=subtypes, weights=options.subtype_weights
            )
            if positive
            else []
        )
        volume = base.copy() if lesions else base
        render_lesions(volume, atlas, lesions, tissue)
        volume += np.float32(1000.0)
        case_pose = dataclasses.replace(
            pose,
            pushes=pose.pushes
            + tuple(les.mass_effect for les in lesions if les.mass_effect is not None),
        )
        hu_lo, frac_lo = _sample_series(
            geometry, case_pose, atlas, volume, crops=lesions, factor=factor
        )
        if not lesions:
            volume -= np.float32(1000.0)
        hu_up = _upsample(hu_lo, factor)
        fractions = np.stack([_upsample(f, factor) for f in frac_lo]) if lesions else np.zeros((0,))
        if lesions:
            # a pixel dominated by bone partial volume (skull base, inner table) reads as bone
            fractions *= (hu_up < _BONE_DOMINATED_HU)[None]
        lesion_subtypes = [les.subtype for les in lesions]
        subtypes = tuple(lesion_subtypes)  # a further attempt draws lesions of these subtypes
        mask, labels, slice_subtypes, per_lesion = _mask_summary(
            fractions, geometry, options, lesion_subtypes
        )
        if not positive or any(labels):
            break
    hu = _gaussian_blur(hu_up, blur_fwhm / 2.355 / pixel)
    holder_frac, holder_hu = headrest
    outside = np.clip((-300.0 - hu) / 300.0, 0.0, 1.0)  # the holder never overlaps the head
    hu += outside * holder_frac * (holder_hu - hu)
    hu_noise_free = hu.astype(np.float32)
    noise_rng = _rng(seed, index, _STREAM_NOISE)
    noise = _correlated_noise(hu.shape, pixel, sigma, cutoff, noise_rng)
    # thicker bone (skull base) absorbs more photons: those slices are noisier
    attenuation = np.clip(hu_noise_free + 1000.0, 0.0, 3000.0).mean(axis=(1, 2))
    noise *= np.clip(np.sqrt(attenuation / np.median(attenuation)), 0.85, 1.3)[
        :, None, None
    ].astype(np.float32)
    noise *= np.float32(math.sqrt(5.0 / thickness)) ** np.float32(0.5)  # thin slices: fewer photons
    hu = hu_noise_free + noise + _beam_hardening(hu_noise_free, pixel, beam_hardening)
    _reconstruction_circle(hu, geometry, pad_hu)
    _reconstruction_circle(hu_noise_free, geometry, pad_hu)

    records = _lesion_records(
        per_lesion,
        hu_noise_free,
        geometry,
        lesion_subtypes,
        [case_pose.to_patient(np.asarray(les.centre_mni)) for les in lesions],
    )
    case_id = f"ph{seed}-{index:05d}"
    details = {
        "atlas": ATLAS_VERSION,
        "tissue_hu": dataclasses.asdict(tissue),
        "atrophy": round(atrophy, 3),
        "scale": [round(float(v), 4) for v in scale],
        "yaw_roll_pitch_deg": [round(v, 2) for v in angles],
        "offset_mm": [round(float(v), 2) for v in offset],
        "noise_sigma_hu": round(sigma, 2),
        "noise_cutoff_lp_mm": round(cutoff, 3),
        "blur_fwhm_mm": round(blur_fwhm, 3),
        "beam_hardening": round(beam_hardening, 3),
        "uneven_spacing": bool(uneven),
        "padding_hu": pad_hu,
        "mimics": [
            {
                "kind": m.subtype,
                "centre_mm": [
                    round(float(v), 1) for v in case_pose.to_patient(np.asarray(m.centre_mni))
                ],
                "hu": round(float(m.hu.max()), 1),
            }
            for m in mimics
        ],
    }
    return PhantomCase(
        case_id=case_id,
        hu=hu.astype(np.float32),
        hu_noise_free=hu_noise_free,
        mask=mask,
        geometry=geometry,
        lesions=records,
        ct_label=int(any(labels)),
        slice_labels=labels,
        slice_subtypes=slice_subtypes,
        rescale=rescale,
        study=_study(case_id, f"radnet-phantoms/{seed}/{index}"),
        generator="mni152",
        details=details,
    )


def _study(case_id: str, uid_seed: str, extra: dict[str, object] | None = None) -> StudyInfo:
    return StudyInfo(
        patient_id=case_id,
        patient_name=f"Phantom^{case_id}",
        accession_number=case_id[-16:],
        uid_seed=uid_seed,
        extra=dict(extra or {}),
    )


# ---------------------------------------------------------------- mode 2: real slices


@dataclass(frozen=True, eq=False)
class BackgroundSlice:
    """One real head CT slice usable as background: HU, where the brain is, and its geometry."""

    path: str
    hu: np.ndarray  # float32 (rows, columns)
    intracranial: np.ndarray  # bool: inside the inner table
    inner_depth_mm: np.ndarray  # float32: distance to the inner table inside, 0 outside
    csf_like: np.ndarray  # float32 0-1: how CSF-like a pixel is (smoothed HU)
    ventricles: np.ndarray  # float32 0-1: CSF in large deep spaces (ventricles)
    pixel_spacing_mm: tuple[float, float]
    slice_thickness_mm: float
    tilt_deg: float  # in SeriesGeometry's convention, from ImageOrientationPatient
    gantry_tilt_tag: str | None
    position_mm: tuple[float, float, float]
    midline_column: float


def load_background(path: Path | str) -> BackgroundSlice:
    """Read one real head CT slice and find its brain.

    Parameters
    ----------
    path : Path or str
        A DICOM file.

    Returns
    -------
    BackgroundSlice

    Raises
    ------
    InputError
        When the file is not DICOM, not a CT image, has no or undecodable pixel data, implausible
        HU (a pixel-representation or rescale problem), an orientation other than axial, or no
        brain can be found inside a skull.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError) as error:
        raise InputError(path, f"not readable as DICOM ({error})") from error
    if ds.get("Modality") != "CT" or ds.get("SOPClassUID") != pydicom.uid.CTImageStorage:
        sop_class = getattr(ds.get("SOPClassUID"), "name", ds.get("SOPClassUID"))
        raise InputError(
            path, f"not a CT image (Modality {ds.get('Modality')!r}, SOP class {sop_class})"
        )
    if "PixelData" not in ds:
        raise InputError(path, "no pixel data")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError(path, "not a single-frame greyscale image")
    try:
        stored = ds.pixel_array
    except Exception as error:  # decoders raise many types; name the file and the cause
        raise InputError(
            path, f"pixel data cannot be decoded ({type(error).__name__}: {error})"
        ) from error
    hu = pydicom.pixels.apply_modality_lut(stored, ds).astype(np.float32)
    plausible = (hu > -1100) & (hu < 3500)
    soft = np.mean((hu > -20) & (hu < 80))
    if plausible.mean() < 0.3 or soft < 0.05 or np.mean(hu > 300) < 0.005:
        raise InputError(
            path, "HU implausible for a head CT (check pixel representation and rescale)"
        )
    orientation = np.asarray(
        [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    )
    if not np.allclose(orientation[:3], [1, 0, 0], atol=1e-3) or abs(orientation[3]) > 1e-3:
        raise InputError(
            path, f"orientation {orientation.tolist()} is not an axial (possibly tilted) slice"
        )
    tilt = math.degrees(math.atan2(-orientation[5], orientation[4]))
    spacing = tuple(float(v) for v in ds.get("PixelSpacing", [0.5, 0.5]))
    position = tuple(float(v) for v in ds.get("ImagePositionPatient", [0.0, 0.0, 0.0]))
    intracranial, depth, midline = _find_brain(hu, spacing, path)
    smooth = ndi.gaussian_filter(hu, 1.0 / spacing[0])
    csf_like = np.clip((22.0 - smooth) / 14.0, 0.0, 1.0) * (smooth > -30) * intracranial
    deep = (csf_like > 0.5) & (depth > 15.0)
    labels, count = ndi.label(deep)
    sizes = ndi.sum_labels(deep, labels, index=np.arange(1, count + 1)) * spacing[0] * spacing[1]
    ventricles = np.isin(labels, 1 + np.flatnonzero(sizes >= 30.0)) * csf_like
    return BackgroundSlice(
        path=str(path),
        hu=hu,
        intracranial=intracranial,
        inner_depth_mm=depth,
        csf_like=csf_like.astype(np.float32),
        ventricles=ventricles.astype(np.float32),
        pixel_spacing_mm=(spacing[0], spacing[1]),
        slice_thickness_mm=float(ds.get("SliceThickness", 5.0) or 5.0),
        tilt_deg=tilt,
        gantry_tilt_tag=str(ds.get("GantryDetectorTilt")) if "GantryDetectorTilt" in ds else None,
        position_mm=(position[0], position[1], position[2]),
        midline_column=midline,
    )


def _find_brain(
    hu: np.ndarray, spacing: tuple[float, ...], path: Path
) -> tuple[np.ndarray, np.ndarray, float]:
    """Intracranial region (inside the > 300 HU skull), its depth map (mm), the midline column."""
    bone = hu > 300.0
    labels, count = ndi.label(bone)
    if count == 0:
        raise InputError(path, "cannot find the brain: no bone (> 300 HU) in the slice")
    sizes = ndi.sum_labels(bone, labels, index=np.arange(1, count + 1))
    skull = labels == 1 + int(np.argmax(sizes))
    closed = ndi.binary_closing(skull, iterations=int(round(3.0 / spacing[0])))
    filled = ndi.binary_fill_holes(closed)
    inside = filled & ~ndi.binary_dilation(skull, iterations=1) & (hu > -30) & (hu < 100)
    labels, count = ndi.label(inside)
    if count == 0:
        raise InputError(path, "cannot find the brain: no soft tissue inside the skull")
    sizes = ndi.sum_labels(inside, labels, index=np.arange(1, count + 1))
    brain = labels == 1 + int(np.argmax(sizes))
    brain = ndi.binary_fill_holes(brain)
    area_mm2 = brain.sum() * spacing[0] * spacing[1]
    if area_mm2 < 2500.0:
        raise InputError(
            path, f"cannot find the brain: the region inside the skull is only {area_mm2:.0f} mm2"
        )
    depth = ndi.distance_transform_edt(brain, sampling=spacing).astype(np.float32)
    columns = np.nonzero(brain.any(axis=0))[0]
    return brain, depth, float((columns[0] + columns[-1]) / 2.0)


def _background_lesion(
    bg: BackgroundSlice, subtype: str, rng: np.random.Generator, z_mm: np.ndarray
) -> tuple[np.ndarray, float]:
    """Blood fraction (slices, rows, cols) of one lesion across the virtual slices, and its HU."""
    rows, cols = bg.hu.shape
    dr, dc = bg.pixel_spacing_mm
    y = (np.arange(rows, dtype=np.float32) * dr)[:, None]
    x = (np.arange(cols, dtype=np.float32) * dc)[None, :]
    inside = bg.intracranial
    depth = bg.inner_depth_mm
    offsets = _sub_plane_offsets(bg.slice_thickness_mm)
    out = np.zeros((len(z_mm), rows, cols), dtype=np.float32)
    if subtype == "intraparenchymal":
        ok = np.argwhere(inside & (depth > 12.0) & (bg.csf_like < 0.3))
        radius = float(np.exp(rng.uniform(np.log(2.5), np.log(22.0))))
        ok = ok[depth[tuple(ok.T)] > min(radius + 3.0, 40.0)] if len(ok) else ok
        if len(ok) == 0:
            return out, 0.0
        r0, c0 = ok[rng.integers(len(ok))]
        centre = np.array([c0 * dc, r0 * dr, 0.0])
        axes = rng.uniform(0.75, 1.25, 3)
        bumps = [
            (
                rng.standard_normal(3),
                rng.uniform(1, 3),
                rng.uniform(0.05, 0.15),
                rng.uniform(0, 6.28),
            )
            for _ in range(4)
        ]
        for i, z in enumerate(z_mm):
            acc = np.zeros((rows, cols), np.float32)
            for off in offsets:
                d = [
                    (x - centre[0]) / axes[0],
                    (y - centre[1]) / axes[1],
                    np.float32((z + off - centre[2]) / axes[2]),
                ]
                r = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) + 1e-3
                wobble = sum(
                    a
                    * np.cos(
                        f
                        * np.pi
                        * (d[0] * n[0] + d[1] * n[1] + d[2] * n[2])
                        / np.linalg.norm(n)
                        / r
                        + p
                    )
                    for n, f, a, p in bumps
                )
                acc += np.clip(0.5 - (r - radius * (1 + wobble)), 0.0, 1.0)
            out[i] = acc / len(offsets)
        out *= inside
    elif subtype in ("subdural", "epidural"):
        edge = np.argwhere(
            inside
            & (depth < 1.0)
            & (np.abs(np.arange(cols)[None, :] - bg.midline_column) * dc > 20.0)
        )
        if len(edge) == 0:
            return out, 0.0
        r0, c0 = edge[rng.integers(len(edge))]
        side = 1.0 if c0 > bg.midline_column else -1.0
        if subtype == "subdural":
            cap, thickness = (
                rng.uniform(35, 80),
                float(np.exp(rng.uniform(np.log(3.0), np.log(18.0)))),
            )
        else:
            cap = rng.uniform(16, 35)
            thickness = min(rng.uniform(8, 25), 0.9 * cap)
        for i, z in enumerate(z_mm):
            acc = np.zeros((rows, cols), np.float32)
            for off in offsets:
                d = np.sqrt((x - c0 * dc) ** 2 + (y - r0 * dr) ** 2 + (z + off) ** 2)
                ratio = np.clip(1.0 - (d / cap) ** 2, 0.0, 1.0)
                profile = thickness * (ratio**0.8 if subtype == "subdural" else np.sqrt(ratio))
                acc += np.clip(profile - depth + 0.5, 0.0, 1.0) * (profile > 0.3)
            out[i] = acc / len(offsets)
        midline_x = bg.midline_column * dc
        out *= inside * np.clip(side * (x - midline_x) - 1.0, 0.0, 1.0)
    elif subtype in ("subarachnoid", "intraventricular"):
        if subtype == "intraventricular":
            csf = bg.ventricles
            spread = rng.uniform(15.0, 30.0)
        else:  # sulci and cisterns: thin CSF structures (white top-hat of the CSF map)
            radius = max(1, int(round(2.5 / dr)))
            csf = np.clip(
                bg.csf_like - ndi.grey_opening(bg.csf_like, size=(2 * radius + 1,) * 2), 0.0, 1.0
            )
            spread = rng.uniform(10.0, 25.0)
        candidates = np.argwhere(csf > 0.6)
        if len(candidates) == 0:
            return out, 0.0
        r0, c0 = candidates[rng.integers(len(candidates))]
        if subtype == "intraventricular":
            # dependent layering: rows grow towards the patient's back (supine)
            level = r0 * dr - rng.uniform(0.0, 6.0)
            csf = csf * np.clip(y - level + 0.5, 0.0, 1.0)
        for i, z in enumerate(z_mm):
            envelope = np.exp(-((x - c0 * dc) ** 2 + (y - r0 * dr) ** 2 + z**2) / (2.0 * spread**2))
            out[i] = np.clip(1.6 * csf, 0.0, 1.0) * np.clip((envelope - 0.15) / 0.5, 0.0, 1.0)
    else:
        raise ValueError(f"unknown hemorrhage subtype {subtype!r}")
    return out, float(rng.uniform(58.0, 85.0))


def generate_background_case(
    seed: int, index: int, background: BackgroundSlice, options: PhantomOptions | None = None
) -> PhantomCase:
    """Mode 2: a short series built from one real slice, with hemorrhages inserted (or none).

    The series repeats the real slice ``options.background_slices`` times at the source's spacing,
    each copy with fresh low-amplitude correlated noise; lesions are 3-D objects, so their cross
    sections vary smoothly from copy to copy. Blood replaces the local mean of the background and
    keeps its real noise; pixel spacing, orientation (tilt) and in-plane position are the source's.

    Parameters
    ----------
    seed, index : int
        Dataset seed and case number (all randomness derives from them).
    background : BackgroundSlice
        The real slice.
    options : PhantomOptions, optional
        ``positive_fraction``, ``background_slices``, ``min_positive_area_mm2`` are used.

    Returns
    -------
    PhantomCase
    """
    options = options or PhantomOptions()
    positive = bool(_rng(seed, index, _STREAM_LABEL).random() < options.positive_fraction)
    lesion_rng = _rng(seed, index, _STREAM_LESIONS)
    noise_rng = _rng(seed, index, _STREAM_NOISE)
    n = options.background_slices
    spacing = background.slice_thickness_mm
    z_mm = (np.arange(n) - (n - 1) / 2.0) * spacing
    rows, cols = background.hu.shape
    geometry = SeriesGeometry(
        rows=rows,
        columns=cols,
        pixel_spacing_mm=background.pixel_spacing_mm,
        table_positions_mm=tuple(round(background.position_mm[2] + float(z), 3) for z in z_mm),
        slice_thickness_mm=background.slice_thickness_mm,
        gantry_tilt_deg=round(background.tilt_deg, 4),
        first_pixel_xy_mm=(background.position_mm[0], background.position_mm[1]),
    )
    fractions: list[np.ndarray]
    blood: list[float]
    subtypes: list[str]
    fractions, blood, subtypes = [], [], []
    if positive:
        for _attempt in range(10):
            fractions, blood = [], []
            subtypes = list(draw_subtypes(lesion_rng, options.subtype_weights))
            for subtype in subtypes:
                f, h = _background_lesion(background, subtype, lesion_rng, z_mm)
                fractions.append(f)
                blood.append(h)
            keep = [k for k, f in enumerate(fractions) if f.max() >= 0.5]
            fractions = [fractions[k] for k in keep]
            blood = [blood[k] for k in keep]
            subtypes = [subtypes[k] for k in keep]
            if fractions:
                _, labels, _, _ = _mask_summary(np.stack(fractions), geometry, options, subtypes)
                if any(labels):
                    break
    # the local mean of the brain only: bone and air next to the inner table must not leak into it
    weight = (background.intracranial & (background.hu > -50) & (background.hu < 120)).astype(
        np.float32
    )
    sigma_px = 1.5 / background.pixel_spacing_mm[0]
    local_mean = ndi.gaussian_filter(background.hu * weight, sigma_px) / np.maximum(
        ndi.gaussian_filter(weight, sigma_px), 1e-3
    )
    texture = ndi.gaussian_filter(
        lesion_rng.standard_normal(background.hu.shape).astype(np.float32), 1.5
    )
    hu_noise_free = np.repeat(background.hu[None], n, axis=0)
    for f, h in zip(fractions, blood, strict=True):
        blood_hu = h + 2.5 * texture / (texture.std() + 1e-6)
        # replace the local mean, keep the real noise: blood looks scanned by the same scanner
        hu_noise_free += f * (blood_hu - local_mean)[None]
    stacked = np.stack(fractions) if fractions else np.zeros((0,))
    mask, labels, slice_subtypes, per_lesion = _mask_summary(stacked, geometry, options, subtypes)
    extra_sigma = float(noise_rng.uniform(1.0, 3.0))
    noise = _correlated_noise(
        hu_noise_free.shape, background.pixel_spacing_mm[0], extra_sigma, 0.35, noise_rng
    )
    body = (background.hu > -500)[None]
    hu = hu_noise_free + noise * body
    records = _lesion_records(
        per_lesion, hu_noise_free, geometry, subtypes, [(0.0, 0.0, 0.0)] * len(subtypes)
    )
    case_id = f"bg{seed}-{index:05d}"
    extra: dict[str, object] = {}
    if background.gantry_tilt_tag is not None:
        extra["GantryDetectorTilt"] = background.gantry_tilt_tag
    details = {"background": background.path, "extra_noise_sigma_hu": round(extra_sigma, 2)}
    return PhantomCase(
        case_id=case_id,
        hu=hu.astype(np.float32),
        hu_noise_free=hu_noise_free.astype(np.float32),
        mask=mask,
        geometry=geometry,
        lesions=records,
        ct_label=int(any(labels)),
        slice_labels=labels,
        slice_subtypes=slice_subtypes,
        rescale=(1.0, -1024.0, True),
        study=_study(case_id, f"radnet-phantoms/background/{seed}/{index}", extra),
        generator="background",
        details=details,
    )


# ---------------------------------------------------------------- writing a dataset


def mask_affine(geometry: SeriesGeometry) -> np.ndarray:
    """NIfTI affine (RAS) of a mask array (columns, rows, slices) on the series grid.

    Unevenly spaced slices get their mean spacing (the affine cannot hold more).
    """
    dr, dc = geometry.pixel_spacing_mm
    first = np.asarray(geometry.image_position(0))
    n = geometry.number_of_slices
    step = (
        (np.asarray(geometry.image_position(n - 1)) - first) / (n - 1)
        if n > 1
        else (
            np.cross(geometry.row_direction, geometry.column_direction)
            * geometry.slice_thickness_mm
        )
    )
    lps = np.eye(4)
    lps[:3, 0] = geometry.row_direction * dc
    lps[:3, 1] = geometry.column_direction * dr
    lps[:3, 2] = step
    lps[:3, 3] = first
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_case(case: PhantomCase, out: Path) -> dict[str, Any]:
    """Write one case's DICOM series and mask; return its rows for the CSVs and the manifest.

    Parameters
    ----------
    case : PhantomCase
        The generated case.
    out : Path
        The dataset folder (``cases/`` and ``masks/`` are created in it).

    Returns
    -------
    dict
        ``label_row``, ``slice_rows`` and ``manifest`` entries.
    """
    slope, intercept, signed = case.rescale
    thickness = case.geometry.slice_thickness_mm
    paths = write_ct_series(
        case.hu,
        case.geometry,
        out / "cases" / case.case_id,
        case.study,
        series_description=f"HEAD {thickness:g}MM (SYNTHETIC)",
        rescale_slope=slope,
        rescale_intercept=intercept,
        signed=signed,
    )
    uids = [
        str(
            pydicom.dcmread(
                p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
            ).SOPInstanceUID
        )
        for p in paths
    ]
    (out / "masks").mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(
        np.ascontiguousarray(case.mask.transpose(2, 1, 0)), mask_affine(case.geometry)
    )
    image.set_data_dtype(np.uint8)
    nib.save(image, out / "masks" / f"{case.case_id}.nii.gz")
    subtypes = ";".join(case.subtypes)
    geometry = case.geometry
    return {
        "label_row": [case.case_id, case.ct_label, subtypes, case.generator],
        "slice_rows": [
            [case.case_id, i, uid, case.slice_labels[i], ";".join(case.slice_subtypes[i])]
            for i, uid in enumerate(uids)
        ],
        "manifest": {
            "case_id": case.case_id,
            "ct_label": case.ct_label,
            "generator": case.generator,
            "lesions": [dataclasses.asdict(rec) for rec in case.lesions],
            "geometry": {
                "rows": geometry.rows,
                "columns": geometry.columns,
                "pixel_spacing_mm": list(geometry.pixel_spacing_mm),
                "slice_thickness_mm": geometry.slice_thickness_mm,
                "gantry_tilt_deg": geometry.gantry_tilt_deg,
                "table_positions_mm": list(geometry.table_positions_mm),
                "rescale_slope": slope,
                "rescale_intercept": intercept,
                "signed": signed,
            },
            "details": case.details,
        },
    }


def _background_files(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise DatasetError(f"background {folder}: not a file or folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def load_backgrounds(folder: Path) -> tuple[list[BackgroundSlice], list[str]]:
    """Every usable real slice under ``folder`` and one message per skipped file.

    Raises
    ------
    DatasetError
        When ``folder`` does not exist.
    """
    usable, skipped = [], []
    for path in _background_files(folder):
        try:
            usable.append(load_background(path))
        except InputError as error:
            skipped.append(str(error))
    return usable, skipped


def _generate_and_write(task: tuple[int, int, PhantomOptions, str | None, str]) -> dict[str, Any]:
    seed, index, options, background_path, out = task
    torch.set_num_threads(1)
    if background_path is None:
        case = generate_case(seed, index, options)
    else:
        case = generate_background_case(seed, index, _cached_background(background_path), options)
    return write_case(case, Path(out))


@functools.lru_cache(maxsize=16)
def _cached_background(path: str) -> BackgroundSlice:
    return load_background(path)


def generate_dataset(
    out: Path,
    cases: int,
    seed: int,
    options: PhantomOptions | None = None,
    *,
    background: Path | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Generate ``cases`` cases into ``out`` in the layout ``training.datasets`` reads.

    Parameters
    ----------
    out : Path
        Output folder; must be absent or empty unless ``overwrite``.
    cases : int
        Number of cases.
    seed : int
        Dataset seed: the same seed gives identical pixels and UIDs.
    options : PhantomOptions, optional
        Generation options.
    background : Path, optional
        Mode 2: a DICOM file or folder of real head CT slices to insert hemorrhages into.
    workers : int
        Parallel processes (1 = in this process).
    overwrite : bool
        Replace a non-empty ``out``.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    DatasetError
        When ``out`` is not empty (without ``overwrite``), ``cases`` < 1, or no background slice is
        usable.
    """
    options = options or PhantomOptions()
    out = Path(out)
    if cases < 1:
        raise DatasetError(f"{out}: cases must be >= 1, got {cases}")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DatasetError(f"{out}: output folder is not empty (use --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    backgrounds: list[str | None] = [None]
    skipped: list[str] = []
    if background is not None:
        usable, skipped = load_backgrounds(Path(background))
        for message in skipped:
            warnings.warn(f"background skipped: {message}", stacklevel=2)
            logger.warning("background skipped: %s", message)
        if not usable:
            raise DatasetError(
                f"background {background}: no usable head CT slice ({len(skipped)} skipped)"
            )
        backgrounds = [bg.path for bg in usable]
    tasks = [(seed, i, options, backgrounds[i % len(backgrounds)], str(out)) for i in range(cases)]
    results: list[dict[str, Any]] = []
    bar = tqdm(total=cases, desc="phantoms", unit="case", disable=not progress)
    if workers <= 1:
        for task in tasks:
            results.append(_generate_and_write(task))
            bar.update()
    else:
        head_atlas()  # build the on-disk cache once, before the workers map it
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(_generate_and_write, tasks):
                results.append(result)
                bar.update()
    bar.close()
    with open(out / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "ct_label", "subtypes", "generator"])
        writer.writerows(r["label_row"] for r in results)
    with open(out / "slice_labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "slice_index", "sop_instance_uid", "label", "subtypes"])
        for r in results:
            writer.writerows(r["slice_rows"])
    manifest = {
        "generator": "radnet-phantoms",
        "version": GENERATOR_VERSION,
        "atlas": ATLAS_VERSION,
        "seed": seed,
        "cases": cases,
        "options": dataclasses.asdict(options),
        "background": str(background) if background is not None else None,
        "backgrounds_used": [b for b in backgrounds if b is not None],
        "backgrounds_skipped": skipped,
        "slice_positive_rule": (
            f"mask area >= {options.min_positive_area_mm2} mm2 (mask: blood fraction >= 0.5)"
        ),
        "case_list": [r["manifest"] for r in results],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


# ---------------------------------------------------------------- command line


def parse_subtype_weights(text: str) -> tuple[float, ...]:
    """``"subdural=0.4,intraparenchymal=0.4"`` -> weights in ``SUBTYPES`` order.

    Subtypes not named keep their default weight; the result is normalised by ``PhantomOptions``.

    Raises
    ------
    ValueError
        When an entry is not ``name=number``, names an unknown subtype or a negative weight.
    """
    weights = dict(zip(SUBTYPES, SUBTYPE_WEIGHTS, strict=True))
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = entry.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            raise ValueError(
                f"--subtype-weights entry {entry!r}: expected SUBTYPE=WEIGHT with SUBTYPE one of "
                f"{', '.join(SUBTYPES)}"
            )
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(
                f"--subtype-weights entry {entry!r}: {value!r} is not a number"
            ) from None
        if weights[name] < 0:
            raise ValueError(f"--subtype-weights entry {entry!r}: the weight must be >= 0")
    return tuple(weights[s] for s in SUBTYPES)


def _command(  # noqa: PLR0917 (typer maps every parameter to an option)
    out: Annotated[Path, typer.Option("--out", help="output dataset folder")],
    cases: Annotated[int, typer.Option("--cases", min=1, help="number of cases")],
    seed: Annotated[int, typer.Option("--seed", help="dataset seed")] = 0,
    positive_fraction: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.5,
    background: Annotated[
        Path | None, typer.Option(help="DICOM file/folder of real head CT slices")
    ] = None,
    slice_thickness: Annotated[
        float | None, typer.Option(help="mm (random 1-5 when omitted)")
    ] = None,
    rows: Annotated[int, typer.Option(help="image rows and columns")] = 512,
    tilt_probability: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.2,
    uneven_probability: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.1,
    background_slices: Annotated[int, typer.Option(help="slices per background series")] = 12,
    subtype_weights: Annotated[
        str,
        typer.Option(
            help="relative subtype frequencies, e.g. 'subdural=0.4,intraparenchymal=0.4' "
            "(unnamed subtypes keep their default: "
            + ", ".join(f"{s} {w:.2f}" for s, w in zip(SUBTYPES, SUBTYPE_WEIGHTS, strict=True))
            + ")"
        ),
    ] = "",
    workers: Annotated[int, typer.Option(min=1)] = 1,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty --out")] = False,
) -> None:
    """Generate synthetic head CT series with hemorrhages (radnet-node training data)."""
    try:
        options = PhantomOptions(
            rows=rows,
            slice_thickness_mm=slice_thickness,
            positive_fraction=positive_fraction,
            tilt_probability=tilt_probability,
            uneven_probability=uneven_probability,
            background_slices=background_slices,
            subtype_weights=parse_subtype_weights(subtype_weights),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generate_dataset(
                out,
                cases,
                seed,
                options,
                background=background,
                workers=workers,
                overwrite=overwrite,
            )
        for warning in caught:
            typer.echo(f"warning: {warning.message}", err=True)
        skipped = sum(1 for w in caught if str(w.message).startswith("background skipped"))
        if skipped:
            typer.echo(f"{skipped} background file(s) skipped", err=True)
    except (RadnetError, ValueError) as error:
        typer.echo(f"radnet-phantoms: error: {error}", err=True)
        raise typer.Exit(code=2) from error
    typer.echo(f"wrote {cases} case(s) to {out}")


def main() -> None:
    """Entry point of ``radnet-phantoms``."""
    typer.run(_command)


if __name__ == "__main__":
    main()
