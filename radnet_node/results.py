"""The result of running RADnet on one series: what the engine hands to the DICOM writers and to
``result.json``; the writers need nothing else but the source headers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from radnet_node.preprocess import PreparedSeries


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the weights that produced a result (from the model card)."""

    name: str
    version: str
    variant: str
    sha256: str


@dataclass(frozen=True, eq=False)
class SeriesResult:
    """RADnet's findings for one series, on the source grid and in source-slice order.

    Slice order is the order of ``series.slices`` (sorted along the slice normal); every per-slice
    array below follows it.
    """

    series: PreparedSeries
    slice_probabilities: np.ndarray  # (n,) float in [0, 1]
    threshold: float
    min_consecutive: int
    ct_positive: bool
    certainty: float  # 0.5-1: how sure the model is of the CT-level decision (see postprocess)
    # (n, rows, columns) bool on the source grid, from the finest auxiliary head
    hemorrhage_mask: np.ndarray
    hemorrhage_volume_ml: float
    model: ModelInfo
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def slice_positive(self) -> np.ndarray:
        """(n,) bool: slices at or above the threshold."""
        return np.asarray(self.slice_probabilities) >= self.threshold

    @property
    def positive_slice_indices(self) -> tuple[int, ...]:
        return tuple(int(i) for i in np.flatnonzero(self.slice_positive))

    @property
    def study_instance_uid(self) -> str:
        return self.series.study_instance_uid

    @property
    def series_instance_uid(self) -> str:
        return self.series.series_instance_uid

    @property
    def key_slice_index(self) -> int:
        """The most affected slice: largest mask area, then highest probability."""
        areas = self.hemorrhage_mask.reshape(len(self.series.slices), -1).sum(axis=1)
        order = np.lexsort((np.asarray(self.slice_probabilities), areas))
        return int(order[-1])
