"""Deterministic UIDs of the node's output objects: the same source instances and model give the
same UIDs (a re-run or re-send never makes a duplicate object), another model gives new ones."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import UID, generate_uid

from radnet_node.errors import SeriesError
from radnet_node.results import SeriesResult

__all__ = ["OutputUIDs", "output_uids"]


@dataclass(frozen=True)
class OutputUIDs:
    """Series and SOP Instance UIDs of the SR, the SEG and the key image of one result.

    ``entropy`` is what they were derived from; :meth:`derive` makes further stable UIDs from it
    (tracking UIDs of SR findings and SEG segments).
    """

    sr_series: UID
    sr_instance: UID
    seg_series: UID
    seg_instance: UID
    key_image_series: UID
    key_image_instance: UID
    entropy: tuple[str, ...]

    def derive(self, kind: str) -> UID:
        """A UID for ``kind`` (e.g. ``"tracking/study-finding"``), stable for the same inputs."""
        return generate_uid(entropy_srcs=[kind, *self.entropy])


def output_uids(result: SeriesResult) -> OutputUIDs:
    """Derive the output UIDs of ``result``.

    They hash (object kind, source Series Instance UID, the sorted source SOP Instance UIDs, model
    sha256, model version): the source instances are part of it so that a series re-opened by late
    instances gets new objects rather than a second, different object under an old UID.

    Parameters
    ----------
    result
        The engine's result; its ``series.slices`` name the source instances.

    Returns
    -------
    OutputUIDs

    Raises
    ------
    SeriesError
        If the result has no Series Instance UID, a slice has no SOP Instance UID, or the model
        has no sha256 (the UIDs would not tell two different inputs or models apart).
    """
    series_uid = result.series_instance_uid
    if not series_uid:
        raise SeriesError("(no series UID)", "the result has no Series Instance UID")
    sop_uids = sorted({s.sop_instance_uid for s in result.series.slices})
    if not sop_uids or "" in sop_uids:
        raise SeriesError(
            series_uid, "a source slice has no SOP Instance UID (not read from DICOM)"
        )
    if not result.model.sha256:
        raise SeriesError(series_uid, f"model {result.model.name!r} has no sha256")
    entropy = (series_uid, *sop_uids, result.model.sha256, result.model.version)

    def uid(kind: str) -> UID:
        return generate_uid(entropy_srcs=[kind, *entropy])

    return OutputUIDs(
        sr_series=uid("sr/series"),
        sr_instance=uid("sr/instance"),
        seg_series=uid("seg/series"),
        seg_instance=uid("seg/instance"),
        key_image_series=uid("key-image/series"),
        key_image_instance=uid("key-image/instance"),
        entropy=entropy,
    )
