"""Tiny real datasets in our layout for the training/evaluation tests (32 x 32 px, a few slices).

Each case is a real CT series written by ``training/dicom_writer.py``: a disc of brain inside a bone
ring, and for positive cases a bright 75 HU blob ("blood") on a run of slices, with its voxel mask
and slice labels; readable by ``training.datasets.open_dataset("layout:DIR")``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np

from training.dicom_writer import SeriesGeometry, StudyInfo, write_ct_series

ROWS = 32
SPACING_MM = 2.0  # 64 mm field of view -> 32 px at 2 mm in the model grid
TINY_PREPROCESS = {"field_of_view_mm": 64.0, "pixel_spacing_mm": 2.0, "min_slices": 3}
TINY_MODEL = {"growth_rate": 4, "layers_per_block": 1, "stem_channels": 4, "lstm_hidden": 4}


def _head(rng: np.random.Generator, n_slices: int) -> np.ndarray:
    yy, xx = np.mgrid[:ROWS, :ROWS]
    centre = (ROWS - 1) / 2 + rng.uniform(-1.5, 1.5, size=2)
    radius = np.hypot(yy - centre[0], xx - centre[1])
    slab = np.full((ROWS, ROWS), -1000.0)
    slab[radius < 13] = 1000.0  # skull
    slab[radius < 11] = 30.0  # brain
    volume = np.repeat(slab[None], n_slices, axis=0)
    return volume + rng.normal(0.0, 3.0, volume.shape)


def write_tiny_layout(
    root: Path,
    n_cases: int = 6,
    *,
    n_slices: int = 7,
    seed: int = 0,
    bad_cases: tuple[str, ...] = (),
) -> Path:
    """Write ``n_cases`` cases (alternately negative, positive) plus unreadable ``bad_cases``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    label_rows: list[dict[str, object]] = []
    slice_rows: list[dict[str, object]] = []
    for index in range(n_cases):
        case_id = f"case{index:03d}"
        positive = index % 2 == 1
        hu = _head(rng, n_slices)
        mask = np.zeros(hu.shape, dtype=np.uint8)
        if positive:
            first = int(rng.integers(1, n_slices - 3))
            cy, cx = rng.uniform(12, 20, size=2)
            yy, xx = np.mgrid[:ROWS, :ROWS]
            blob = np.hypot(yy - cy, xx - cx) < 4.0
            for z in range(first, first + 3):
                hu[z][blob] = 75.0 + rng.normal(0.0, 3.0, int(blob.sum()))
                mask[z][blob] = 1
        geometry = SeriesGeometry(
            rows=ROWS,
            columns=ROWS,
            pixel_spacing_mm=(SPACING_MM, SPACING_MM),
            table_positions_mm=tuple(5.0 * z for z in range(n_slices)),
        )
        study = StudyInfo(patient_id=f"TINY{index:03d}", uid_seed=f"tiny-{seed}-{index}")
        write_ct_series(hu, geometry, root / "cases" / case_id, study)
        # masks: (columns, rows, slices), slices in slice_index order
        nib.save(
            nib.Nifti1Image(np.transpose(mask, (2, 1, 0)).copy(), np.eye(4)),
            root / "masks" / f"{case_id}.nii.gz",
        )
        label_rows.append({"case_id": case_id, "ct_label": int(positive)})
        for z in range(n_slices):
            slice_rows.append(
                {
                    "case_id": case_id,
                    "slice_index": z,
                    "sop_instance_uid": "",
                    "label": int(mask[z].any()),
                }
            )
    for case_id in bad_cases:
        folder = root / "cases" / case_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "CT0001.dcm").write_text("this is not a DICOM file\n", encoding="ascii")
        label_rows.append({"case_id": case_id, "ct_label": 0})
    with (root / "labels.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case_id", "ct_label"])
        writer.writeheader()
        writer.writerows(label_rows)
    with (root / "slice_labels.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=["case_id", "slice_index", "sop_instance_uid", "label"]
        )
        writer.writeheader()
        writer.writerows(slice_rows)
    return root
