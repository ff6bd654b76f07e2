"""The ``infer`` use case: DICOM files and folders in, one output folder per eligible series out
(SR, SEG, key image, preview, result.json), each written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from radnet_node.dicom_out import NodeIdentity, build_outputs, source_value_problems
from radnet_node.durable import fsync_folder
from radnet_node.engine import Engine, LoadedSeries
from radnet_node.errors import InputError, RadnetError, SeriesError
from radnet_node.preview import preview_png
from radnet_node.results import SeriesResult
from radnet_node.series import (
    SeriesGroup,
    SkippedInput,
    classify_series,
    scan_paths,
    split_off_non_slices,
)
from radnet_node.weights import INTENDED_USE

__all__ = [
    "InferEvent",
    "SeriesDone",
    "SeriesFailed",
    "SkippedInput",
    "infer_paths",
    "process_series",
    "result_document",
    "write_series_folder",
    "OUTPUT_FILES",
    "SeriesOutputs",
    "build_series_outputs",
    "content_hash",
]

RESULT_SCHEMA_VERSION = 1


@dataclass(frozen=True, eq=False)
class SeriesDone:
    """An eligible series that was run and whose outputs are in ``output_dir``."""

    label: str
    result: SeriesResult
    output_dir: Path
    outputs: Mapping[str, str]  # output kind -> file name inside output_dir
    timings_ms: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SeriesFailed:
    """An eligible series that could not be processed; nothing was written for it."""

    label: str
    reason: str


InferEvent = SkippedInput | SeriesDone | SeriesFailed


def infer_paths(
    paths: Iterable[str | Path],
    out_dir: str | Path,
    engine: Engine,
    identity: NodeIdentity | None = None,
    *,
    accept_lossy: bool = False,
) -> Iterator[InferEvent]:
    """Run every eligible series found under ``paths`` and write its outputs into ``out_dir``.

    Events come as they happen: first the skipped files, then per series (ordered by study and
    series number) a skip, a success or a failure. Several eligible series of one study (e.g. a
    5 mm and a 2.5 mm reconstruction) are all run. A failure of one series never stops the others.

    Parameters
    ----------
    paths
        Files and folders (recursively), in any mix.
    out_dir
        Created if missing; series ``X`` is written to ``out_dir/X/``.
    engine
        The loaded engine.
    identity
        The node as the DICOM objects name it; default :class:`NodeIdentity()`.
    accept_lossy
        Run series whose images were lossy-compressed (``[series] accept_lossy``); skipped else.

    Yields
    ------
    SkippedInput | SeriesDone | SeriesFailed

    Raises
    ------
    InputError
        A given path does not exist, or ``out_dir`` cannot be created.
    """
    identity = identity or NodeIdentity()
    scan = scan_paths(paths)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(out, f"cannot create the output folder ({exc.strerror or exc})") from exc
    yield from scan.skipped
    for whole in scan.series:
        group, left_out = split_off_non_slices(whole)
        yield from left_out
        eligibility = classify_series(
            group.headers, min_slices=engine.spec.min_slices, accept_lossy=accept_lossy
        )
        if not eligibility.eligible:
            yield SkippedInput(group.label, eligibility.reason)
            continue
        yield process_series(group, out, engine, identity)


def process_series(
    group: SeriesGroup, out_dir: Path, engine: Engine, identity: NodeIdentity
) -> SeriesDone | SeriesFailed:
    """Read, run, build and write one eligible series; any failure becomes a SeriesFailed.

    Parameters
    ----------
    group
        The series' headers and paths (from :func:`radnet_node.series.scan_paths`).
    out_dir
        Existing output folder.
    engine, identity
        As in :func:`infer_paths`.

    Returns
    -------
    SeriesDone | SeriesFailed
    """
    start = time.perf_counter()
    try:
        loaded = engine.load(group.paths, series_label=group.label)
        result = engine.run([loaded])[0]
        write_start = time.perf_counter()
        timings = dict(result.timings_ms)
        built = build_series_outputs(
            result, loaded, group, identity, runtime=engine.describe(), timings_ms=timings,
            started=start,
        )  # fmt: skip
        outputs = dict(built.document["outputs"])
        payload = dict(built.files)
        final = write_series_folder(out_dir, result.series_instance_uid, payload)
        # result.json cannot hold the time of its own writing; the returned timings do
        timings["write"] = (time.perf_counter() - write_start) * 1000.0
        timings["total"] = (time.perf_counter() - start) * 1000.0
    except SeriesError as exc:
        return SeriesFailed(group.label, exc.reason)  # the label already names the series
    except RadnetError as exc:
        return SeriesFailed(group.label, str(exc))
    except Exception as exc:  # noqa: BLE001 - one series' bug must not stop the others; reported
        return SeriesFailed(group.label, f"internal error: {type(exc).__name__}: {exc}")
    return SeriesDone(
        label=group.label, result=result, output_dir=final, outputs=outputs, timings_ms=timings
    )


#: output kind -> file name in the result folder (the DICOM ones are what export sends)
OUTPUT_FILES = {
    "sr": "sr.dcm",
    "seg": "seg.dcm",
    "key_image": "key-image.dcm",
    "preview": "preview.png",
    "result": "result.json",
}
# Values that change on every build of the same result: creation dates and times, and the SEG's
# Dimension Organization UID, which highdicom generates anew on every build.
_TIME_VRS = frozenset({"DA", "TM", "DT"})
_RANDOM_TAGS = frozenset({0x00209164})  # DimensionOrganizationUID


def content_hash(datasets: Mapping[str, Dataset]) -> str:
    """SHA-256 of what would be sent, without what changes on every build of the same result.

    Every element of every dataset (in sequences too) except those with VR DA, TM or DT and the
    Dimension Organization UID goes in
    by tag, VR and value; the output UIDs are deterministic for (source instances, model), so
    the same inputs and model give the same hash, and any other content another.

    Parameters
    ----------
    datasets
        Output kind -> dataset.

    Returns
    -------
    str
        64 hex digits.
    """
    digest = hashlib.sha256()
    for kind in sorted(datasets):
        digest.update(kind.encode() + b"\0")
        for element in datasets[kind].iterall():
            if element.VR in _TIME_VRS or element.VR == "SQ" or element.tag in _RANDOM_TAGS:
                continue
            value = element.value
            raw = value if isinstance(value, bytes) else repr(value).encode("utf-8")
            digest.update(f"{element.tag:08X}{element.VR}".encode() + raw + b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class SeriesOutputs:
    """What one result becomes: the files of its folder, the output UIDs and the content hash."""

    files: Mapping[str, bytes]  # file name -> content
    output_uids: Mapping[str, str]  # output kind -> SOP Instance UID
    content_hash: str
    document: Mapping[str, Any]


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def build_series_outputs(
    result: SeriesResult,
    loaded: LoadedSeries,
    group: SeriesGroup,
    identity: NodeIdentity,
    *,
    runtime: Mapping[str, Any],
    timings_ms: Mapping[str, float],
    started: float | None = None,
    previous_sr: Dataset | None = None,
) -> SeriesOutputs:
    """Build the SR, SEG, key image (positive results), preview and result.json of one result,
    for ``radnet-node infer`` and the node alike.

    result.json's timings are ``timings_ms`` plus "write" (the time to build the files) and, when
    ``started`` (a :func:`time.perf_counter` value) is given, "total" since then. ``previous_sr``:
    the SR of the result this one replaces (the node's re-run of a series), referenced as its
    predecessor.

    Raises
    ------
    SeriesError
        A builder refuses the result (see :func:`radnet_node.dicom_out.build_outputs`).
    """
    build_start = time.perf_counter()
    sources = {str(ds.SOPInstanceUID): ds for ds in group.headers}
    key_hu = loaded.hu.hu[result.key_slice_index] if result.ct_positive else None
    dicom = build_outputs(result, sources, identity, key_slice_hu=key_hu, previous_sr=previous_sr)
    datasets: dict[str, Dataset] = {"sr": dicom.sr, "seg": dicom.seg}
    if dicom.key_image is not None:
        datasets["key_image"] = dicom.key_image
    files = {OUTPUT_FILES[kind]: _encode(ds) for kind, ds in datasets.items()}
    files[OUTPUT_FILES["preview"]] = preview_png(result, loaded.hu.hu)
    uids = {kind: str(ds.SOPInstanceUID) for kind, ds in datasets.items()}
    outputs = {kind: OUTPUT_FILES[kind] for kind in (*datasets, "preview", "result")}
    timings = dict(timings_ms)
    # result.json cannot hold the time of its own writing: "write" is the time to build the files
    timings["write"] = (time.perf_counter() - build_start) * 1000.0
    if started is not None:
        timings["total"] = (time.perf_counter() - started) * 1000.0
    document = result_document(
        result,
        outputs=outputs,
        output_uids=uids,
        timings_ms=timings,
        series_description=str(group.first.get("SeriesDescription", "") or ""),
        runtime=runtime,
        source_value_problems=source_value_problems(group.first, group.headers),
        # the one the SEG builder gave it, when the source has none
        derived_frame_of_reference_uid=(
            None if group.first.get("FrameOfReferenceUID") else str(dicom.seg.FrameOfReferenceUID)
        ),
    )
    files[OUTPUT_FILES["result"]] = (json.dumps(document, indent=2) + "\n").encode("utf-8")
    return SeriesOutputs(files, uids, content_hash(datasets), document)


def result_document(
    result: SeriesResult,
    *,
    outputs: Mapping[str, str],
    output_uids: Mapping[str, str],
    timings_ms: Mapping[str, float],
    series_description: str = "",
    runtime: Mapping[str, Any] | None = None,
    source_value_problems: Sequence[str] = (),
    derived_frame_of_reference_uid: str | None = None,
) -> dict[str, Any]:
    """The ``result.json`` content of one series (schema version 1).

    Parameters
    ----------
    result
        The series result.
    outputs
        Output kind (``sr``, ``seg``, ``key_image``, ``preview``, ``result``) -> file name in the
        series folder.
    output_uids
        Output kind -> SOP Instance UID of the DICOM objects.
    timings_ms
        Stage -> milliseconds.
    series_description
        The source series' description.
    runtime
        Device and precision the engine ran with.
    source_value_problems
        Faults of the source's patient and study values (copied into the DICOM outputs as they
        are), by attribute.
    derived_frame_of_reference_uid
        The Frame of Reference UID the SEG was given because the source images have none
        (:func:`radnet_node.dicom_out.common.derived_frame_of_reference_uid`); None otherwise.

    Returns
    -------
    dict
        JSON-serialisable; an unknown volume (NaN) is ``null``.
    """
    slices = [
        {
            "index": index,
            "sop_instance_uid": source.sop_instance_uid,
            "frame_number": source.frame_number,
            "instance_number": source.instance_number,
            "probability": round(float(probability), 6),
            "positive": bool(probability >= result.threshold),
        }
        for index, (source, probability) in enumerate(
            zip(result.series.slices, result.slice_probabilities, strict=True)
        )
    ]
    volume = float(result.hemorrhage_volume_ml)
    return {
        "schema_version": RESULT_SCHEMA_VERSION,
        "study_instance_uid": result.study_instance_uid,
        "series_instance_uid": result.series_instance_uid,
        "series_description": series_description,
        "ct_positive": bool(result.ct_positive),
        "certainty": round(float(result.certainty), 6),
        "threshold": float(result.threshold),
        "min_consecutive_slices": int(result.min_consecutive),
        "positive_slice_count": int(np.count_nonzero(result.slice_positive)),
        "key_slice_index": result.key_slice_index if result.ct_positive else None,
        "hemorrhage_volume_ml": None if not np.isfinite(volume) else round(volume, 3),
        "slices": slices,
        "model": {
            "name": result.model.name,
            "version": result.model.version,
            "variant": result.model.variant,
            "sha256": result.model.sha256,
        },
        "runtime": dict(runtime or {}),
        "timings_ms": {k: round(float(v), 1) for k, v in timings_ms.items()},
        "outputs": dict(outputs),
        "output_sop_instance_uids": dict(output_uids),
        "intended_use": INTENDED_USE,
        "source_value_problems": list(source_value_problems),
        "derived_frame_of_reference_uid": derived_frame_of_reference_uid,
    }


@contextmanager
def _removed_on_error(path: Path) -> Iterator[Path]:
    """Yield ``path``; if the block fails, delete it so no half-written folder stays behind."""
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def write_series_folder(out_dir: Path, name: str, files: Mapping[str, bytes]) -> Path:
    """Write ``files`` into ``out_dir/name/`` so that the folder appears complete or not at all.

    The files go into ``out_dir/.tmp-<name>-<pid>/`` and are fsynced; the folder is then renamed
    into place. An existing ``out_dir/name`` is renamed away first and deleted after the new one is
    in, so a reader sees the old complete folder or the new complete folder (or, for an instant,
    none), never a mix.

    Parameters
    ----------
    out_dir
        Existing output folder (on one file system with the temporary folder, by construction).
    name
        Folder name (the SeriesInstanceUID).
    files
        File name -> content.

    Returns
    -------
    Path
        ``out_dir/name``.

    Raises
    ------
    InputError
        The folder cannot be written (names the folder and the OS error).
    """
    if not name or "/" in name or name.startswith("."):
        raise InputError(out_dir / name, "not a usable output folder name")
    pid = os.getpid()
    temporary = out_dir / f".tmp-{name}-{pid}"
    final = out_dir / name
    try:
        if temporary.exists():
            shutil.rmtree(temporary)  # left by an earlier crash of a process with our pid
        temporary.mkdir()
        with _removed_on_error(temporary):
            for file_name, content in files.items():
                with open(temporary / file_name, "wb") as handle:
                    handle.write(content)
                    handle.flush()
                    os.fsync(handle.fileno())
            fsync_folder(temporary)
            if final.exists():
                old = out_dir / f".old-{name}-{pid}"
                if old.exists():
                    shutil.rmtree(old)
                os.rename(final, old)
                try:
                    os.rename(temporary, final)
                except OSError:
                    os.rename(old, final)  # put the previous complete result back
                    raise
                shutil.rmtree(old)
            else:
                os.rename(temporary, final)
        fsync_folder(out_dir)
    except OSError as exc:
        raise InputError(final, f"cannot write the outputs ({exc.strerror or exc})") from exc
    return final
