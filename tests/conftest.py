"""Shared test fixtures: where the real DICOM test data lives, a synthetic head in HU, and a writer
of generated CT series into the test's temporary folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from synthetic_heads import synthetic_head_hu

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
