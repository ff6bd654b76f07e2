"""Shared test fixtures: where the real DICOM test data lives, a synthetic head in HU, and a writer
of generated CT series into the test's temporary folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from training.dicom_writer import SeriesGeometry, StudyInfo, write_ct_series

# Real vendor DICOM, read in place (never copied into the repo): <repo>/../shared/data/dicom
DICOM_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"


@pytest.fixture(scope="session")
def dicom_data_dir() -> Path:
    """The shared folder of real CT DICOM files (see its README.md).

    Outside CI a checkout without ``../shared`` skips these tests; in CI (``CI`` set) a missing
    folder fails them, so a check that did not run is never reported as passing.
    """
    if not DICOM_DATA_DIR.is_dir():
        message = f"real DICOM test data not found at {DICOM_DATA_DIR}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return DICOM_DATA_DIR


def synthetic_head_hu(
    shape: tuple[int, int, int],
    pixel_spacing_mm: tuple[float, float],
    *,
    centre_mm: tuple[float, float] | None = None,
    radii_mm: tuple[float, float] = (90.0, 72.0),
    skull_mm: float = 6.0,
    brain_hu: float = 30.0,
    skull_hu: float = 1000.0,
    table_gap_mm: float | None = None,
    table_thickness_mm: float = 4.0,
) -> np.ndarray:
    """An elliptic head (skull around brain) in air (-1000 HU), the same on every slice.

    ``centre_mm`` is (row, col) in millimetres from pixel (0, 0); default: the image centre.
    ``table_gap_mm`` adds a thin full-width table (200 HU) that far below the head (larger rows).
    """
    n, rows, columns = shape
    dr, dc = pixel_spacing_mm
    if centre_mm is None:
        centre_mm = ((rows - 1) * dr / 2.0, (columns - 1) * dc / 2.0)
    y = np.arange(rows)[:, None] * dr - centre_mm[0]
    x = np.arange(columns)[None, :] * dc - centre_mm[1]
    outer = (y / radii_mm[0]) ** 2 + (x / radii_mm[1]) ** 2 <= 1.0
    inner = (y / (radii_mm[0] - skull_mm)) ** 2 + (x / (radii_mm[1] - skull_mm)) ** 2 <= 1.0
    plane = np.full((rows, columns), -1000.0)
    plane[outer] = skull_hu
    plane[inner] = brain_hu
    if table_gap_mm is not None:
        top = radii_mm[0] + table_gap_mm
        table = (y >= top) & (y < top + table_thickness_mm)
        plane[np.broadcast_to(table, plane.shape)] = 200.0
    return np.repeat(plane[np.newaxis], n, axis=0)


@pytest.fixture
def head_hu() -> Callable[..., np.ndarray]:
    """:func:`synthetic_head_hu`, as a fixture."""
    return synthetic_head_hu


@pytest.fixture
def write_series(tmp_path: Path) -> Callable[..., list[Path]]:
    """Write a generated CT series under the test's tmp_path; returns the paths in slice order.

    Call as ``write_series(hu, geometry, name="a", **write_ct_series_kwargs)``; ``study`` defaults
    to a StudyInfo seeded with ``name``.
    """

    def write(
        hu: np.ndarray,
        geometry: SeriesGeometry,
        name: str = "series",
        study: StudyInfo | None = None,
        **kwargs: object,
    ) -> list[Path]:
        study = study or StudyInfo(uid_seed=f"radnet-test-{name}")
        return write_ct_series(hu, geometry, tmp_path / name, study, **kwargs)  # type: ignore[arg-type]

    return write
