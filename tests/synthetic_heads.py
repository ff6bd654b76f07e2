"""A synthetic head in HU for tests: an elliptic skull around brain, optionally on a table.

A plain module, not part of a conftest, so that tests can import it by name (two conftest.py files
share the module name ``conftest``, so importing from one of them is ambiguous).
"""

from __future__ import annotations

import numpy as np


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
