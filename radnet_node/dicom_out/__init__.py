"""Pure builders of what the node writes back into the study: the TID 1500 SR, the SEG and the
key image of one :class:`~radnet_node.results.SeriesResult`, as pydicom datasets (no file I/O)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from radnet_node.dicom_out.common import NodeIdentity, device_uid_for, source_value_problems
from radnet_node.dicom_out.key_image import build_key_image
from radnet_node.dicom_out.seg import build_seg
from radnet_node.dicom_out.sr import build_sr
from radnet_node.dicom_out.uids import OutputUIDs, output_uids
from radnet_node.errors import SeriesError
from radnet_node.results import SeriesResult

__all__ = [
    "DicomOutputs",
    "NodeIdentity",
    "OutputUIDs",
    "build_key_image",
    "build_outputs",
    "build_seg",
    "build_sr",
    "device_uid_for",
    "output_uids",
    "source_value_problems",
]


@dataclass(frozen=True)
class DicomOutputs:
    """The objects written for one result; ``key_image`` is None for a negative result."""

    sr: Dataset
    seg: Dataset
    key_image: Dataset | None


def build_outputs(
    result: SeriesResult,
    sources: Mapping[str, Dataset],
    identity: NodeIdentity,
    *,
    key_slice_hu: np.ndarray | None = None,
    series_number_base: int = 9900,
    previous_sr: Dataset | None = None,
) -> DicomOutputs:
    """Build the SR, the SEG and (positive results only) the key image of one result.

    Series numbers are ``series_number_base`` + 1 (SR), + 2 (SEG), + 3 (key image); the UIDs
    are those of :func:`output_uids`, so building twice gives the same UIDs.

    Parameters
    ----------
    result
        The engine's result.
    sources
        Source headers keyed by SOP Instance UID (pixel data not needed).
    identity
        The node writing the objects.
    key_slice_hu
        (rows, columns) HU of slice ``result.key_slice_index``; required when the result is
        positive, ignored otherwise.
    series_number_base
        The new series get the next three numbers.
    previous_sr
        The SR of the result this one replaces, if any (see :func:`build_sr`).

    Returns
    -------
    DicomOutputs

    Raises
    ------
    ValueError
        If ``series_number_base`` is negative.
    SeriesError
        If a positive result comes without ``key_slice_hu``, or a builder refuses the result (see
        :func:`build_seg`, :func:`build_sr`, :func:`build_key_image`).
    """
    if series_number_base < 0:
        raise ValueError(f"series_number_base must be >= 0, got {series_number_base}")
    if result.ct_positive and key_slice_hu is None:
        raise SeriesError(
            result.series_instance_uid,
            f"positive result: key_slice_hu (HU of slice {result.key_slice_index}) is needed "
            "for the key image",
        )
    uids = output_uids(result)
    with _names_not_judged():
        seg = build_seg(result, sources, identity, series_number=series_number_base + 2, uid=uids)
        sr = build_sr(
            result,
            sources,
            identity,
            seg,
            series_number=series_number_base + 1,
            uid=uids,
            previous_sr=previous_sr,
        )
        key_image = None
        if result.ct_positive and key_slice_hu is not None:  # None refused above
            key_image = build_key_image(
                result,
                sources,
                identity,
                key_slice_hu,
                series_number=series_number_base + 3,
                uid=uids,
            )
    return DicomOutputs(sr=sr, seg=seg, key_image=key_image)


@contextmanager
def _names_not_judged() -> Iterator[None]:
    """Silence highdicom's warning about one-component person names while building.

    highdicom judges every person name it copies and warns about one-component names ("DOE", the
    Philips phantom's "HEAD"), quoting the name. The names are the source study's, copied verbatim
    on purpose (the objects must match the study in every PACS); a warning that quotes them would
    put patient names into the process log.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"The string .* is unlikely to represent the intended person name",
            category=UserWarning,
        )
        yield
