"""One loader interface (``CaseDataset``) over our own dataset layout and the public ICH datasets.

Every adapter turns one CT of its dataset into a ``Case``: the model input from
``radnet_node.preprocess``, per-slice labels, an optional hemorrhage mask on the model grid and
the CT-level label; a content-keyed ``.npz`` cache spares the decode and resampling every epoch.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import nibabel as nib
import numpy as np
import pydicom
import pydicom.config
from pydicom.errors import InvalidDicomError

from radnet_node.errors import DatasetError, RadnetError
from radnet_node.preprocess import (
    PreparedSeries,
    PreprocessSpec,
    prepare_hu_volume,
    prepare_series,
)

logger = logging.getLogger(__name__)

SOURCES = ("layout", "rsna", "physionet", "cq500")

# Bump when the content of a cache entry changes meaning; every old entry then reads as stale.
_CACHE_FORMAT = 2  # 2: the median slice spacing is stored

# SOP classes that may sit in a series folder without being part of the image series.
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

RSNA_SUBTYPES = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "any",
)
PHYSIONET_SUBTYPES = (
    "Intraventricular",
    "Intraparenchymal",
    "Subarachnoid",
    "Epidural",
    "Subdural",
)
CQ500_READERS = ("R1", "R2", "R3")


# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Case:
    """One CT, preprocessed for the model, with its labels.

    Attributes
    ----------
    case_id : str
        Identifier of the CT within its dataset (prefixed by the dataset name in a
        ``ConcatDataset``).
    image : np.ndarray
        (n, N, N) float32 in [0, 1]: the model input from ``radnet_node.preprocess``, slices in
        order along the slice normal.
    slice_labels : np.ndarray
        (n,) int8: 1 blood, 0 none, -1 unknown.
    mask : np.ndarray or None
        (n, N, N) uint8 hemorrhage mask on the model grid, or None when there is none.
    ct_label : int
        0 or 1: hemorrhage in the CT.
    source : str
        'layout', 'rsna', 'physionet' or 'cq500'.
    reader_labels : dict of str to int
        CT-level reads of individual readers when the dataset has them (CQ500: R1, R2, R3).
    slice_spacing_mm : float
        Median spacing of the slices along their normal
        (``PreparedSeries.median_slice_spacing_mm``), for a CT decision that asks for a length of
        blood rather than a count of slices; NaN when unknown.
    """

    case_id: str
    image: np.ndarray
    slice_labels: np.ndarray
    mask: np.ndarray | None
    ct_label: int
    source: str
    reader_labels: dict[str, int] = dataclasses.field(default_factory=dict)
    slice_spacing_mm: float = float("nan")

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.dtype != np.float32:
            raise ValueError(
                f"case {self.case_id}: image must be (n, N, N) float32, "
                f"got {self.image.shape} {self.image.dtype}"
            )
        if self.slice_labels.shape != (self.image.shape[0],) or self.slice_labels.dtype != np.int8:
            raise ValueError(
                f"case {self.case_id}: slice_labels must be ({self.image.shape[0]},) int8, "
                f"got {self.slice_labels.shape} {self.slice_labels.dtype}"
            )
        if self.mask is not None and (
            self.mask.shape != self.image.shape or self.mask.dtype != np.uint8
        ):
            raise ValueError(
                f"case {self.case_id}: mask must be {self.image.shape} uint8, "
                f"got {self.mask.shape} {self.mask.dtype}"
            )
        if self.ct_label not in (0, 1):
            raise ValueError(f"case {self.case_id}: ct_label must be 0 or 1, got {self.ct_label}")
        if self.source not in SOURCES:
            raise ValueError(f"case {self.case_id}: unknown source {self.source!r}")


@runtime_checkable
class CaseDataset(Protocol):
    """What the trainer and the evaluator need from a dataset."""

    name: str

    def case_ids(self) -> list[str]:
        """All case ids, sorted."""
        ...

    def ct_label(self, case_id: str) -> int:
        """CT-level label without loading the image (for stratified splits)."""
        ...

    def load(self, case_id: str) -> Case:
        """The preprocessed case; raises ``DatasetError`` naming dataset, case and problem."""
        ...


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _fail(
    dataset: str, problem: str, *, case: str | None = None, path: object = None
) -> DatasetError:
    where = [f"dataset {dataset!r}"]
    if case is not None:
        where.append(f"case {case!r}")
    if path is not None:
        where.append(str(path))
    return DatasetError(f"{', '.join(where)}: {problem}")


def _csv_rows(
    path: Path, required: Sequence[str], dataset: str
) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV file as (line number, row), streamed; checks that ``required`` columns exist.

    Raises
    ------
    DatasetError
        When the file is missing, unreadable, or lacks a required column.
    """
    if not path.is_file():
        raise _fail(dataset, "file is missing", path=path)
    try:
        # utf-8-sig: spreadsheet exports often start with a byte order mark
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            reader.fieldnames = header
            missing = [column for column in required if column not in header]
            if missing:
                raise _fail(
                    dataset,
                    f"missing column(s) {', '.join(missing)} "
                    f"(header: {', '.join(header) or 'none'})",
                    path=path,
                )
            for row in reader:
                yield (
                    reader.line_num,
                    {k: (v or "").strip() for k, v in row.items() if k is not None},
                )
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise _fail(dataset, f"cannot read CSV: {error}", path=path) from error


def _binary(value: str, dataset: str, path: Path, line: int, column: str) -> int:
    """Parse a 0/1 label ('0', '1', '0.0', '1.0')."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if number not in (0.0, 1.0):
        raise _fail(dataset, f"line {line}: {column} must be 0 or 1, got {value!r}", path=path)
    return int(number)


def _spec_digest(spec: PreprocessSpec) -> str:
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        text = json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)
    else:
        text = repr(spec)
    return hashlib.sha256(text.encode()).hexdigest()


def _files_fingerprint(files: Iterable[Path], root: Path) -> str:
    """Digest of the names, sizes and modification times of ``files``."""
    digest = hashlib.sha256()
    for path in sorted(files):
        stat = path.stat()
        digest.update(
            f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
        )
    return digest.hexdigest()


def _safe_name(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "case"
    # the digest keeps two ids that clean to the same name apart
    return f"{cleaned[:80]}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


@dataclass(frozen=True, eq=False)
class _Volume:
    """What the cache stores for one case: everything that costs decoding or resampling.

    ``slice_keys`` identify the source slice of every model slice (SOP Instance UID, or the
    1-based slice number for NIfTI volumes) so that labels, which are cheap, are attached fresh on
    every load and a corrected label file needs no rebuild.
    """

    image: np.ndarray
    slice_keys: tuple[str, ...]
    mask: np.ndarray | None
    slice_spacing_mm: float
    note: str = ""

    @classmethod
    def of(
        cls,
        prepared: PreparedSeries,
        mask: np.ndarray | None,
        slice_keys: tuple[str, ...] | None = None,
        note: str = "",
    ) -> _Volume:
        """The entry for a prepared series; slices keyed by SOP Instance UID unless given."""
        return cls(
            image=prepared.image.astype(np.float32),
            slice_keys=(
                tuple(str(s.sop_instance_uid) for s in prepared.slices)
                if slice_keys is None
                else slice_keys
            ),
            mask=mask,
            slice_spacing_mm=prepared.median_slice_spacing_mm,
            note=note,
        )


class _CaseCache:
    """Preprocessed cases as compressed ``.npz`` files, each stamped with the key it is for."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, case_id: str) -> Path:
        return self.directory / f"{_safe_name(case_id)}.npz"

    def get(self, case_id: str, key: str) -> _Volume | None:
        path = self._path(case_id)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as entry:
                if str(entry["key"]) != key:
                    logger.info("cache entry %s is stale; rebuilding case %s", path, case_id)
                    return None
                image = np.array(entry["image"], dtype=np.float32)
                keys = tuple(str(k) for k in entry["slice_keys"])
                mask = np.array(entry["mask"], dtype=np.uint8) if "mask" in entry.files else None
                note = str(entry["note"])
                spacing = float(entry["slice_spacing_mm"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            logger.warning(
                "cache entry %s is unreadable (%s); rebuilding case %s", path, error, case_id
            )
            return None
        if (
            image.ndim != 3
            or len(keys) != image.shape[0]
            or (mask is not None and mask.shape != image.shape)
        ):
            logger.warning("cache entry %s is inconsistent; rebuilding case %s", path, case_id)
            return None
        return _Volume(image=image, slice_keys=keys, mask=mask, slice_spacing_mm=spacing, note=note)

    def put(self, case_id: str, key: str, volume: _Volume) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "key": np.array(key),
            "image": volume.image,
            "slice_keys": np.array(volume.slice_keys, dtype=str),
            "note": np.array(volume.note),
            "slice_spacing_mm": np.array(volume.slice_spacing_mm, dtype=np.float64),
        }
        if volume.mask is not None:
            arrays["mask"] = volume.mask
        # write then rename, so that a crash or a parallel reader never sees half a file
        handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".npz.part")
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez_compressed(stream, **arrays)  # type: ignore[arg-type]
            os.replace(temporary, self._path(case_id))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _dicom_files(folder: Path, dataset: str, case_id: str) -> list[Path]:
    """Every regular file below ``folder`` (any names, any depth), hidden files excepted."""
    if not folder.is_dir():
        raise _fail(dataset, "case folder is missing", case=case_id, path=folder)
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    if not files:
        raise _fail(dataset, "case folder holds no DICOM files", case=case_id, path=folder)
    return files


def _image_instances(files: Sequence[Path], dataset: str, case_id: str) -> list[Path]:
    """The image instances among ``files``; a directory record (DICOMDIR, DIRFILE) is left out.

    Raises
    ------
    DatasetError
        When a file is not DICOM or cannot be read, or when no image instance is left.
    """
    images: list[Path] = []
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except (InvalidDicomError, OSError, ValueError, EOFError) as error:
            raise _fail(
                dataset, f"not a readable DICOM file ({error})", case=case_id, path=path
            ) from error
        sop_class = str(
            header.get("SOPClassUID", "") or header.file_meta.get("MediaStorageSOPClassUID", "")
        )
        if sop_class == _MEDIA_STORAGE_DIRECTORY:
            logger.debug("%s: directory record, not an image; not part of the series", path)
            continue
        images.append(path)
    if not images:
        raise _fail(dataset, "case folder holds no DICOM image", case=case_id, path=files[0].parent)
    return images


def _first_image_header(
    files: Sequence[Path], dataset: str, case_id: str
) -> pydicom.Dataset | None:
    """Header (no pixel data) of the first image instance among ``files``, or None."""
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as error:
            raise _fail(
                dataset, f"not a readable DICOM file ({error})", case=case_id, path=path
            ) from error
        if str(header.get("SOPClassUID", "")) not in ("", _MEDIA_STORAGE_DIRECTORY):
            return header
    return None


def _prepare_dicom(
    files: Sequence[Path], spec: PreprocessSpec, dataset: str, case_id: str
) -> PreparedSeries:
    try:
        return prepare_series(list(files), spec, series_label=f"{dataset}/{case_id}")
    except RadnetError as error:
        raise _fail(dataset, f"cannot preprocess the series: {error}", case=case_id) from error


def _mask_to_model_grid(
    prepared: PreparedSeries, mask_source: np.ndarray, dataset: str, case_id: str
) -> np.ndarray:
    """Resample a (n, rows, columns) source-grid mask to the model grid (nearest neighbour)."""
    try:
        resampled = prepared.to_model_grid(mask_source.astype(np.float32), interpolation="nearest")
    except RadnetError as error:
        raise _fail(dataset, f"cannot resample the mask: {error}", case=case_id) from error
    return (np.asarray(resampled) >= 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Base adapter: cache handling common to every dataset
# --------------------------------------------------------------------------------------------


class _CachedDataset:
    """Base of the adapters: looks a case up in the cache, prepares it on a miss, adds labels."""

    source: ClassVar[str] = ""

    def __init__(
        self,
        root: Path | str,
        spec: PreprocessSpec,
        cache_dir: Path | str | None = None,
        name: str | None = None,
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        self.spec = spec
        self.name = name or self.source
        if not self.root.is_dir():
            raise _fail(self.name, "dataset folder is missing", path=self.root)
        self._spec_digest = _spec_digest(spec)
        self._root_digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        self._cache = (
            _CaseCache(Path(cache_dir) / f"{self.source}-{self._root_digest}")
            if cache_dir is not None
            else None
        )
        #: problems found while indexing (things that are not cases); also logged as warnings
        self.problems: list[str] = []

    # subclasses implement these four
    def case_ids(self) -> list[str]:
        raise NotImplementedError

    def ct_label(self, case_id: str) -> int:
        raise NotImplementedError

    def _source_files(self, case_id: str) -> list[Path]:
        """Every file whose change must invalidate the cached case."""
        raise NotImplementedError

    def _prepare(self, case_id: str, files: list[Path]) -> _Volume:
        raise NotImplementedError

    def _labelled(self, case_id: str, volume: _Volume) -> Case:
        raise NotImplementedError

    def _problem(self, message: str) -> None:
        self.problems.append(message)
        logger.warning("dataset %r: %s", self.name, message)

    def _check_case(self, case_id: str) -> None:
        if case_id not in self._known:
            raise _fail(self.name, "unknown case id", case=case_id)

    @property
    def _known(self) -> Mapping[str, Any]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._known)

    def load(self, case_id: str) -> Case:
        """Load one case, from the cache when its entry matches the source files and the spec.

        Raises
        ------
        DatasetError
            Naming the dataset, the case and the file when the case cannot be loaded.
        """
        self._check_case(case_id)
        files = self._source_files(case_id)
        volume: _Volume | None = None
        key = ""
        if self._cache is not None:
            try:
                fingerprint = _files_fingerprint(files, self.root)
            except OSError as error:
                raise _fail(
                    self.name, f"cannot stat source files: {error}", case=case_id
                ) from error
            key = f"v{_CACHE_FORMAT}:{self.source}:{self._spec_digest}:{fingerprint}"
            volume = self._cache.get(case_id, key)
        if volume is None:
            volume = self._prepare(case_id, files)
            if self._cache is not None:
                try:
                    self._cache.put(case_id, key, volume)
                except OSError as error:
                    # a full or read-only cache must not stop training; the case is still good
                    logger.warning("cannot write the cache entry of case %s: %s", case_id, error)
        case = self._labelled(case_id, volume)
        return dataclasses.replace(case, slice_spacing_mm=volume.slice_spacing_mm)


# --------------------------------------------------------------------------------------------
# Our own layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SliceLabelRow:
    line: int
    slice_index: int | None
    sop_instance_uid: str
    label: int


class LayoutDataset(_CachedDataset):
    """Our own layout: what ``training/phantoms.py`` writes, and the way to bring your own data.

    Expected on disk::

        DATASET/
          labels.csv            case_id,ct_label[,subtypes,generator,split]  (ct_label 0/1)
          slice_labels.csv      optional: case_id,slice_index,sop_instance_uid,label[,subtypes]
          cases/<case_id>/      the DICOM files of one CT series (any names, any depth)
          masks/<case_id>.nii.gz  optional: uint8 voxel mask on the source grid,
                                  array (columns, rows, slices), slices in slice_index order

    ``slice_index`` is the order along the slice normal (0 = first, as ``radnet_node.preprocess``
    sorts). Slice labels are matched by SOP Instance UID; a row without UID, a multi-frame
    instance, or a case whose UIDs all differ from the files (re-exported data) falls back to
    ``slice_index``. Slices without a row are unknown (-1). When ``masks/`` exists, a negative
    case without a mask file gets an empty mask (no blood by definition); a positive case without
    one gets no mask (logged). Folders under ``cases/`` without a row in ``labels.csv`` are not
    cases and are listed in ``problems``.

    Licence: whatever the data's own licence is; phantoms are generated and free of patient data.

    Parameters
    ----------
    root : Path
        The dataset folder.
    spec : PreprocessSpec
        Model input specification.
    cache_dir : Path, optional
        Folder for preprocessed cases.
    name : str, optional
        Dataset name (default 'layout'), used in messages and in ``ConcatDataset`` ids.

    Raises
    ------
    DatasetError
        When labels.csv is missing or malformed (missing columns, duplicate case ids, a label that
        is not 0/1), or slice_labels.csv is malformed.
    """

    source = "layout"

    def __init__(
        self,
        root: Path | str,
        spec: PreprocessSpec,
        cache_dir: Path | str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(root, spec, cache_dir, name)
        labels_path = self.root / "labels.csv"
        rows = _csv_rows(labels_path, ("case_id", "ct_label"), self.name)
        self._labels: dict[str, int] = {}
        for line, row in rows:
            case_id = row["case_id"]
            if not case_id:
                raise _fail(self.name, f"line {line}: empty case_id", path=labels_path)
            if case_id in self._labels:
                raise _fail(
                    self.name, f"line {line}: case {case_id!r} is listed twice", path=labels_path
                )
            self._labels[case_id] = _binary(
                row["ct_label"], self.name, labels_path, line, "ct_label"
            )
        if not self._labels:
            raise _fail(self.name, "lists no cases", path=labels_path)
        self._slice_rows = self._read_slice_labels()
        self._masks_dir = self.root / "masks"
        self.has_masks = self._masks_dir.is_dir()
        cases_dir = self.root / "cases"
        if cases_dir.is_dir():
            unlisted = sorted(
                p.name for p in cases_dir.iterdir() if p.is_dir() and p.name not in self._labels
            )
            if unlisted:
                self._problem(
                    f"folders in cases/ without a row in labels.csv: {', '.join(unlisted)}"
                )

    def _read_slice_labels(self) -> dict[str, list[_SliceLabelRow]]:
        path = self.root / "slice_labels.csv"
        if not path.exists():
            return {}
        rows = _csv_rows(path, ("case_id", "slice_index", "label"), self.name)
        by_case: dict[str, list[_SliceLabelRow]] = {}
        for line, row in rows:
            case_id = row["case_id"]
            if case_id not in self._labels:
                raise _fail(
                    self.name, f"line {line}: case {case_id!r} is not in labels.csv", path=path
                )
            index_text = row["slice_index"]
            slice_index: int | None = None
            if index_text:
                try:
                    slice_index = int(index_text)
                except ValueError:
                    slice_index = -1
                if slice_index < 0:
                    raise _fail(
                        self.name,
                        f"line {line}: slice_index must be an integer >= 0, got {index_text!r}",
                        path=path,
                    )
            uid = row.get("sop_instance_uid", "")
            if slice_index is None and not uid:
                raise _fail(
                    self.name, f"line {line}: neither slice_index nor sop_instance_uid", path=path
                )
            label = _binary(row["label"], self.name, path, line, "label")
            by_case.setdefault(case_id, []).append(_SliceLabelRow(line, slice_index, uid, label))
        return by_case

    @property
    def _known(self) -> Mapping[str, Any]:
        return self._labels

    def case_ids(self) -> list[str]:
        return sorted(self._labels)

    def ct_label(self, case_id: str) -> int:
        self._check_case(case_id)
        return self._labels[case_id]

    def _mask_path(self, case_id: str) -> Path | None:
        for suffix in (".nii.gz", ".nii"):
            path = self._masks_dir / f"{case_id}{suffix}"
            if path.is_file():
                return path
        return None

    def _source_files(self, case_id: str) -> list[Path]:
        files = _dicom_files(self.root / "cases" / case_id, self.name, case_id)
        mask = self._mask_path(case_id) if self.has_masks else None
        return [*files, mask] if mask is not None else files

    def _prepare(self, case_id: str, files: list[Path]) -> _Volume:
        mask_path = self._mask_path(case_id) if self.has_masks else None
        dicom = [f for f in files if f != mask_path]
        prepared = _prepare_dicom(
            _image_instances(dicom, self.name, case_id), self.spec, self.name, case_id
        )
        mask = None
        if mask_path is not None:
            mask_source = _read_layout_mask(mask_path, prepared, self.name, case_id)
            mask = _mask_to_model_grid(prepared, mask_source, self.name, case_id)
        return _Volume.of(prepared, mask)

    def _labelled(self, case_id: str, volume: _Volume) -> Case:
        ct_label = self._labels[case_id]
        labels = self._match_slice_labels(case_id, volume.slice_keys)
        if ct_label == 0 and np.any(labels == 1):
            raise _fail(
                self.name,
                f"ct_label is 0 but slice_labels.csv marks slice(s) "
                f"{np.flatnonzero(labels == 1).tolist()} as blood",
                case=case_id,
            )
        if ct_label == 1 and labels.size and np.all(labels == 0):
            raise _fail(
                self.name,
                "ct_label is 1 but slice_labels.csv marks every slice as no blood",
                case=case_id,
            )
        mask = volume.mask
        if self.has_masks and mask is None:
            if ct_label == 0:
                mask = np.zeros(volume.image.shape, dtype=np.uint8)
            else:
                logger.warning(
                    "dataset %r, case %r: positive case without a mask file", self.name, case_id
                )
        return Case(
            case_id=case_id,
            image=volume.image,
            slice_labels=labels,
            mask=mask,
            ct_label=ct_label,
            source="layout",
        )

    def _match_slice_labels(self, case_id: str, uids: tuple[str, ...]) -> np.ndarray:
        labels = np.full(len(uids), -1, dtype=np.int8)
        rows = self._slice_rows.get(case_id, [])
        if not rows:
            return labels
        path = self.root / "slice_labels.csv"
        positions: dict[str, list[int]] = {}
        for index, uid in enumerate(uids):
            positions.setdefault(uid, []).append(index)
        uid_rows = [r for r in rows if r.sop_instance_uid]
        # re-exported data gets new UIDs: when none matches, the indices are all we can trust
        by_index_only = bool(uid_rows) and not any(
            r.sop_instance_uid in positions for r in uid_rows
        )
        if by_index_only:
            logger.warning(
                "dataset %r, case %r: no SOP Instance UID in slice_labels.csv matches the series; "
                "matching by slice_index",
                self.name,
                case_id,
            )
        for row in rows:
            matches = (
                []
                if by_index_only or not row.sop_instance_uid
                else positions.get(row.sop_instance_uid, [])
            )
            if row.sop_instance_uid and not by_index_only and not matches:
                raise _fail(
                    self.name,
                    f"line {row.line}: SOP Instance UID {row.sop_instance_uid} "
                    "is not in the series",
                    case=case_id,
                    path=path,
                )
            if len(matches) == 1:
                index = matches[0]
            else:  # no UID, a multi-frame instance (one UID, many slices), or re-exported UIDs
                if row.slice_index is None or row.slice_index >= len(uids):
                    raise _fail(
                        self.name,
                        f"line {row.line}: slice_index {row.slice_index} is outside the series "
                        f"({len(uids)} slices)",
                        case=case_id,
                        path=path,
                    )
                if matches and row.slice_index not in matches:
                    raise _fail(
                        self.name,
                        f"line {row.line}: slice_index {row.slice_index} is not a frame of "
                        f"SOP Instance UID {row.sop_instance_uid}",
                        case=case_id,
                        path=path,
                    )
                index = row.slice_index
            if labels[index] != -1 and labels[index] != row.label:
                raise _fail(
                    self.name,
                    f"line {row.line}: slice {index} is labelled twice, differently",
                    case=case_id,
                    path=path,
                )
            labels[index] = row.label
        return labels


def _read_layout_mask(
    path: Path, prepared: PreparedSeries, dataset: str, case_id: str
) -> np.ndarray:
    """A layout mask file as a (slices, rows, columns) array on the source grid."""
    data = np.asanyarray(_load_nifti(path, dataset, case_id).dataobj)
    rows, columns = prepared.source_shape
    expected = (columns, rows, len(prepared.slices))
    if data.shape != expected:
        raise _fail(
            dataset,
            f"mask shape {data.shape} does not match the series: "
            f"expected (columns, rows, slices) = {expected}",
            case=case_id,
            path=path,
        )
    return np.transpose(data, (2, 1, 0)) > 0


# --------------------------------------------------------------------------------------------
# RSNA 2019 Intracranial Hemorrhage Detection
# --------------------------------------------------------------------------------------------


@contextmanager
def _rsna_uids_accepted() -> Iterator[None]:
    """Read RSNA files without one warning per element: their UIDs are 'ID_<hex>', not valid UIs.

    The setting is pydicom's process-wide reading validation mode, restored on exit.
    """
    settings = pydicom.config.settings
    previous = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode = previous


def _rsna_headers(images: Path, saved: Mapping[str, list[Any]]) -> tuple[dict[str, list[Any]], int]:
    """[size, mtime_ns, SeriesInstanceUID, SOPInstanceUID] of every ``*.dcm`` in ``images``.

    Entries of ``saved`` whose size and mtime still match are reused; an unreadable file gets
    ``None`` as its series and the reason in place of the SOP Instance UID. Returns the entries
    and the number of headers read.
    """
    entries: dict[str, list[Any]] = {}
    read = 0
    for entry in os.scandir(images):
        if not entry.is_file() or not entry.name.lower().endswith(".dcm"):
            continue
        stat = entry.stat()
        old = saved.get(entry.name)
        if old is not None and old[0] == stat.st_size and old[1] == stat.st_mtime_ns:
            entries[entry.name] = list(old)
            continue
        read += 1
        try:
            header = pydicom.dcmread(
                entry.path,
                stop_before_pixels=True,
                specific_tags=["SeriesInstanceUID", "SOPInstanceUID"],
            )
            series = str(header.SeriesInstanceUID)
            sop = str(header.get("SOPInstanceUID", "") or Path(entry.name).stem)
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError) as error:
            entries[entry.name] = [stat.st_size, stat.st_mtime_ns, None, f"unreadable ({error})"]
            continue
        entries[entry.name] = [stat.st_size, stat.st_mtime_ns, series, sop]
    return entries, read


class RSNADataset(_CachedDataset):
    """RSNA 2019 Intracranial Hemorrhage Detection (Kaggle), one case per CT series.

    Where to get it: https://www.kaggle.com/competitions/rsna-intracranial-hemorrhage-detection/data
    (Kaggle account, competition rules accepted). Licence: the competition's data terms: use for
    the competition and non-commercial research and education only; credit RSNA and the
    annotating societies (ASNR). Check the current terms on the competition page before use.

    Expected on disk (as the Kaggle download unpacks)::

        ROOT/
          stage_2_train.csv          ID,Label   rows "ID_<id>_<subtype>,<0|1>" for subtypes
                                     epidural, intraparenchymal, intraventricular,
                                     subarachnoid, subdural, any
          stage_2_train/ID_<id>.dcm  one DICOM per slice, SOPInstanceUID "ID_<id>"

    Slices are grouped into CTs by SeriesInstanceUID; the case id is that UID. Grouping needs
    every header once (slow for 750,000 files): the index is kept in ``cache_dir`` and only
    changed or new files are read again. A slice's label is its 'any' row (-1 without one); the
    CT label is 1 when any slice has 'any' = 1. A series none of whose slices has a label is not
    a case (listed in ``problems``), nor are unreadable files. Exact duplicate rows in the CSV
    (the real file has some) are accepted; contradicting ones are an error. Pixel quirks of the
    real files (PixelRepresentation, intercepts) are left to ``radnet_node.preprocess``.

    Raises
    ------
    DatasetError
        When stage_2_train.csv or stage_2_train/ is missing, or the CSV is malformed.
    """

    source = "rsna"
    csv_name = "stage_2_train.csv"
    images_dir = "stage_2_train"
    _INDEX_FORMAT = 1

    def __init__(
        self,
        root: Path | str,
        spec: PreprocessSpec,
        cache_dir: Path | str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(root, spec, cache_dir, name)
        self._labels = self._read_labels(self.root / self.csv_name)
        images = self.root / self.images_dir
        if not images.is_dir():
            raise _fail(self.name, "image folder is missing", path=images)
        index_path = None
        if cache_dir is not None:
            index_path = Path(cache_dir) / f"{self.source}-{self._root_digest}-index.json"
        self._series = self._index(images, index_path)

    def _read_labels(self, path: Path) -> dict[str, int]:
        """SOP id -> bit mask: bit k says subtype k was read, bit 6 + k holds its label.

        One small int per slice keeps the 750,000 slices of the real set in about 100 MB.
        """
        labels: dict[str, int] = {}
        bits = {subtype: k for k, subtype in enumerate(RSNA_SUBTYPES)}
        for line, row in _csv_rows(path, ("ID", "Label"), self.name):
            identifier, _, subtype = row["ID"].rpartition("_")
            if not identifier.startswith("ID_") or subtype not in bits:
                raise _fail(
                    self.name, f"line {line}: ID {row['ID']!r} is not ID_<id>_<subtype>", path=path
                )
            value = _binary(row["Label"], self.name, path, line, "Label")
            k = bits[subtype]
            state = labels.get(identifier, 0)
            if state >> k & 1 and (state >> (6 + k) & 1) != value:
                raise _fail(
                    self.name, f"line {line}: {row['ID']} has contradicting labels", path=path
                )
            labels[identifier] = state | 1 << k | value << (6 + k)
        return labels

    def _index(self, images: Path, index_path: Path | None) -> dict[str, list[tuple[str, str]]]:
        """SeriesInstanceUID -> [(file name, SOP Instance UID)], reusing a saved index."""
        saved: dict[str, list[Any]] = {}
        if index_path is not None and index_path.is_file():
            try:
                content = json.loads(index_path.read_text())
                if content.get("format") == self._INDEX_FORMAT:
                    saved = content["files"]
            except (OSError, ValueError, KeyError, AttributeError) as error:
                logger.warning("RSNA index %s is unreadable (%s); rebuilding it", index_path, error)
        with _rsna_uids_accepted():
            entries, read = _rsna_headers(images, saved)
        if index_path is not None and (read or len(entries) != len(saved)):
            index_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = index_path.with_suffix(".json.part")
            temporary.write_text(json.dumps({"format": self._INDEX_FORMAT, "files": entries}))
            os.replace(temporary, index_path)
        series: dict[str, list[tuple[str, str]]] = {}
        for file_name, (_, _, series_uid, sop) in sorted(entries.items()):
            if series_uid is None:
                self._problem(f"{images / file_name}: {sop}")
                continue
            series.setdefault(series_uid, []).append((file_name, sop))
        for series_uid in list(series):
            if not any(
                self._slice_label(file_name, sop) != -1 for file_name, sop in series[series_uid]
            ):
                self._problem(
                    f"series {series_uid}: no slice has a label in {self.csv_name}; not a case"
                )
                del series[series_uid]
        return series

    def _slice_label(self, file_name: str, sop: str) -> int:
        """The slice's 'any' label, -1 when the CSV has none (matched by UID, else file name)."""
        state = self._labels.get(sop)
        if state is None:
            state = self._labels.get(Path(file_name).stem, 0)
        k = len(RSNA_SUBTYPES) - 1  # 'any'
        return state >> (6 + k) & 1 if state >> k & 1 else -1

    @property
    def _known(self) -> Mapping[str, Any]:
        return self._series

    def case_ids(self) -> list[str]:
        return sorted(self._series)

    def ct_label(self, case_id: str) -> int:
        self._check_case(case_id)
        return int(any(self._slice_label(f, sop) == 1 for f, sop in self._series[case_id]))

    def _source_files(self, case_id: str) -> list[Path]:
        images = self.root / self.images_dir
        return [images / file_name for file_name, _ in self._series[case_id]]

    def _prepare(self, case_id: str, files: list[Path]) -> _Volume:
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise _fail(self.name, "file of the series has gone", case=case_id, path=missing[0])
        with _rsna_uids_accepted():
            prepared = _prepare_dicom(files, self.spec, self.name, case_id)
        return _Volume.of(prepared, None)

    def _labelled(self, case_id: str, volume: _Volume) -> Case:
        by_uid = {sop: self._slice_label(f, sop) for f, sop in self._series[case_id]}
        labels = np.array([by_uid.get(uid, -1) for uid in volume.slice_keys], dtype=np.int8)
        return Case(
            case_id=case_id,
            image=volume.image,
            slice_labels=labels,
            mask=None,
            ct_label=self.ct_label(case_id),
            source="rsna",
        )


# --------------------------------------------------------------------------------------------
# PhysioNet CT-ICH
# --------------------------------------------------------------------------------------------

# Array axes (columns, rows, slices) point toward patient Left, Posterior, Superior: the DICOM
# patient system, so that the model sees NIfTI volumes the way it sees DICOM series.
_DICOM_AXCODES = ("L", "P", "S")


class PhysioNetCTICHDataset(_CachedDataset):
    """PhysioNet CT-ICH: Computed Tomography Images for Intracranial Hemorrhage Detection and
    Segmentation.

    Where to get it: https://physionet.org/content/ct-ich/1.3.1/ (75 head CTs of trauma
    patients, 5 mm slices, with per-slice labels and hemorrhage masks). Licence: version 1.3.1 is
    published under the *PhysioNet Restricted Health Data License 1.5.0* (restricted access: a
    PhysioNet account and the signed data use agreement); versions 1.0.0-1.3.0 were open access
    under CC BY 4.0. Cite Hssayeni et al., Data 5(1):14, 2020, and PhysioNet.

    Expected on disk (as the download unpacks)::

        ROOT/
          ct_scans/<NNN>.nii            HU volume, array (x, y, slices), e.g. 049.nii
          masks/<NNN>.nii               hemorrhage mask on the same grid (0 / >0)
          hemorrhage_diagnosis_raw_ct.csv  PatientNumber,SliceNumber,Intraventricular,
                                        Intraparenchymal,Subarachnoid,Epidural,Subdural,
                                        No_Hemorrhage,Fracture_Yes_No
          patient_demographics.csv      (not needed)

    Case ids are the three-digit file stems ('049'). ``SliceNumber`` (1-based) counts along the
    third array axis of the NIfTI file, as the dataset's own ``split_raw_data.py`` reads it.
    A slice is blood when any subtype column is 1 or No_Hemorrhage is 0; the CT label is 1
    when any slice is blood.

    Orientation (assumption, documented): the NIfTI affine (as nibabel reports it) is trusted.
    Each volume is reoriented with nibabel to columns -> patient left, rows -> posterior,
    slices -> superior (the DICOM LPS display convention) before ``prepare_hu_volume``; pixel
    spacing and slice positions come from the reoriented affine. The third array axis must be
    the head-foot axis (else the slice labels would not be slices; DatasetError); when the
    reorientation reverses it, the slice labels are reversed with it.

    Raises
    ------
    DatasetError
        When the CSV or ct_scans/ is missing or malformed.
    """

    source = "physionet"
    csv_name = "hemorrhage_diagnosis_raw_ct.csv"
    _COLUMNS = ("PatientNumber", "SliceNumber", *PHYSIONET_SUBTYPES, "No_Hemorrhage")

    def __init__(
        self,
        root: Path | str,
        spec: PreprocessSpec,
        cache_dir: Path | str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(root, spec, cache_dir, name)
        path = self.root / self.csv_name
        rows = _csv_rows(path, self._COLUMNS, self.name)
        slices: dict[str, dict[int, int]] = {}
        for line, row in rows:
            try:
                patient, number = int(row["PatientNumber"]), int(row["SliceNumber"])
            except ValueError as error:
                raise _fail(
                    self.name, f"line {line}: PatientNumber/SliceNumber not integers", path=path
                ) from error
            subtypes = [_binary(row[c], self.name, path, line, c) for c in PHYSIONET_SUBTYPES]
            none = _binary(row["No_Hemorrhage"], self.name, path, line, "No_Hemorrhage")
            per_case = slices.setdefault(f"{patient:03d}", {})
            if number in per_case:
                raise _fail(
                    self.name,
                    f"line {line}: patient {patient} slice {number} listed twice",
                    path=path,
                )
            per_case[number] = int(any(subtypes) or none == 0)
        scans = self.root / "ct_scans"
        if not scans.is_dir():
            raise _fail(self.name, "folder ct_scans/ is missing", path=scans)
        on_disk = {
            p.name.split(".")[0]: p for p in scans.iterdir() if p.name.endswith((".nii", ".nii.gz"))
        }
        self._slices = {c: s for c, s in slices.items() if c in on_disk}
        self._scans = on_disk
        for case_id in sorted(set(slices) - set(on_disk)):
            self._problem(f"patient {case_id} is in {self.csv_name} but ct_scans/ has no volume")
        for case_id in sorted(set(on_disk) - set(slices)):
            self._problem(f"ct_scans/{on_disk[case_id].name} has no rows in {self.csv_name}")

    @property
    def _known(self) -> Mapping[str, Any]:
        return self._slices

    def case_ids(self) -> list[str]:
        return sorted(self._slices)

    def ct_label(self, case_id: str) -> int:
        self._check_case(case_id)
        return int(any(self._slices[case_id].values()))

    def _mask_path(self, case_id: str) -> Path | None:
        for suffix in (".nii", ".nii.gz"):
            path = self.root / "masks" / f"{case_id}{suffix}"
            if path.is_file():
                return path
        return None

    def _source_files(self, case_id: str) -> list[Path]:
        mask = self._mask_path(case_id)
        return [self._scans[case_id], *([mask] if mask is not None else [])]

    def _prepare(self, case_id: str, files: list[Path]) -> _Volume:
        scan_path = self._scans[case_id]
        image = _load_nifti(scan_path, self.name, case_id)
        transform = _to_dicom_axes(image, self.name, case_id, scan_path)
        reoriented = image.as_reoriented(transform)
        hu = np.transpose(np.asarray(reoriented.dataobj, dtype=np.float32), (2, 1, 0))
        n = hu.shape[0]
        numbers = list(range(1, n + 1))
        if transform[2, 1] < 0:  # the reorientation reversed the slice axis
            numbers.reverse()
        affine = reoriented.affine
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # mm along (columns, rows, slices)
        normal = affine[:3, 2] / spacing[2]
        positions = [
            float(normal @ (affine[:3, :3] @ np.array([0.0, 0.0, k]) + affine[:3, 3]))
            for k in range(n)
        ]
        try:
            prepared = prepare_hu_volume(
                hu,
                (float(spacing[1]), float(spacing[0])),
                self.spec,
                normal_positions_mm=positions,
                series_label=f"{self.name}/{case_id}",
            )
        except RadnetError as error:
            raise _fail(
                self.name, f"cannot preprocess the volume: {error}", case=case_id, path=scan_path
            ) from error
        mask = None
        mask_path = self._mask_path(case_id)
        if mask_path is not None:
            mask_image = _load_nifti(mask_path, self.name, case_id)
            if mask_image.shape[:3] != image.shape[:3] or not np.allclose(
                mask_image.affine, image.affine, atol=1e-3
            ):
                raise _fail(
                    self.name,
                    f"mask grid {mask_image.shape} does not match the CT grid {image.shape}",
                    case=case_id,
                    path=mask_path,
                )
            mask_data = np.asarray(mask_image.as_reoriented(transform).dataobj)
            mask = _mask_to_model_grid(
                prepared, np.transpose(mask_data, (2, 1, 0)) > 0, self.name, case_id
            )
        return _Volume.of(prepared, mask, slice_keys=tuple(str(k) for k in numbers))

    def _labelled(self, case_id: str, volume: _Volume) -> Case:
        per_slice = self._slices[case_id]
        if len(per_slice) != len(volume.slice_keys) or set(per_slice) != set(
            range(1, len(per_slice) + 1)
        ):
            raise _fail(
                self.name,
                f"{self.csv_name} lists slices {min(per_slice)}..{max(per_slice)} "
                f"({len(per_slice)} rows) "
                f"but the volume has {len(volume.slice_keys)} slices",
                case=case_id,
                path=self._scans[case_id],
            )
        labels = np.array([per_slice[int(k)] for k in volume.slice_keys], dtype=np.int8)
        return Case(
            case_id=case_id,
            image=volume.image,
            slice_labels=labels,
            mask=volume.mask,
            ct_label=self.ct_label(case_id),
            source="physionet",
        )


def _load_nifti(path: Path, dataset: str, case_id: str) -> nib.Nifti1Image:
    try:
        image = nib.load(path)
    except (OSError, ValueError, EOFError, nib.filebasedimages.ImageFileError) as error:
        raise _fail(dataset, f"cannot read NIfTI: {error}", case=case_id, path=path) from error
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise _fail(dataset, f"not a NIfTI image ({type(image).__name__})", case=case_id, path=path)
    if len(image.shape) != 3:
        raise _fail(
            dataset, f"expected a 3-D volume, got shape {image.shape}", case=case_id, path=path
        )
    return image


def _to_dicom_axes(image: nib.Nifti1Image, dataset: str, case_id: str, path: Path) -> np.ndarray:
    """nibabel orientation transform from the file's axes to (L, P, S); slices stay on axis 3."""
    current = nib.orientations.io_orientation(image.affine)
    transform = nib.orientations.ornt_transform(
        current, nib.orientations.axcodes2ornt(_DICOM_AXCODES)
    )
    if int(transform[2, 0]) != 2:
        codes = "".join(nib.orientations.aff2axcodes(image.affine))
        raise _fail(
            dataset,
            f"third array axis is not head-foot (axis codes {codes}); "
            "slice labels cannot be placed",
            case=case_id,
            path=path,
        )
    return transform


# --------------------------------------------------------------------------------------------
# CQ500
# --------------------------------------------------------------------------------------------

_CQ500_FOLDER = re.compile(r"^CQ500-?CT-?(\d+)\b", re.IGNORECASE)
_CQ500_NAME = re.compile(r"^CQ500-CT-(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class _SeriesCandidate:
    folder: Path
    files: tuple[Path, ...]
    thickness_mm: float
    excluded: str  # why it cannot be the CT to read, '' when it can


class CQ500Dataset(_CachedDataset):
    """qure.ai CQ500: 491 head CTs with CT-level reads of three radiologists.

    Where to get it: http://headctstudy.qure.ai/dataset (also mirrored on academic torrents).
    Licence: CC BY-NC-SA 4.0 (non-commercial, share alike, attribution: Chilamkurthy et al.,
    Lancet 2018).

    Expected on disk (as the zip files unpack)::

        ROOT/
          reads.csv                      name,Category,R1:ICH,R1:IPH,...,R2:ICH,...,R3:ICH,...
          CQ500CT<N> CQ500CT<N>/Unknown Study/CT <series description>/CT*.dcm

    Case ids are the reads.csv names ('CQ500-CT-0'); scan folders are found at any depth up to
    three below ROOT by their 'CQ500CT<N>' prefix. The CT label is the majority of R1:ICH, R2:ICH
    and R3:ICH; ``reader_labels`` keeps the three reads. There are no slice labels (-1) and no
    masks.

    Series choice (each scan has several reconstructions): the thinnest axial plain series.
    A series is left out when it is a bone reconstruction ('BONE' in the folder name, series
    description or convolution kernel), contrast-enhanced (ContrastBolusAgent set, or 'POST' /
    'CONTRAST' / 'C+' in the description without 'PRE' / 'PLAIN' / 'NON'), or not axial (slice
    normal more than 45 deg from the head-foot axis). Among the rest the smallest SliceThickness
    wins, then the larger number of files, then the folder name.

    Raises
    ------
    DatasetError
        When reads.csv is missing or malformed.
    """

    source = "cq500"

    def __init__(
        self,
        root: Path | str,
        spec: PreprocessSpec,
        cache_dir: Path | str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(root, spec, cache_dir, name)
        path = self.root / "reads.csv"
        columns = tuple(f"{r}:ICH" for r in CQ500_READERS)
        rows = _csv_rows(path, ("name", *columns), self.name)
        self._reads: dict[str, dict[str, int]] = {}
        for line, row in rows:
            match = _CQ500_NAME.match(row["name"])
            if match is None:
                raise _fail(
                    self.name, f"line {line}: name {row['name']!r} is not CQ500-CT-<N>", path=path
                )
            if row["name"] in self._reads:
                raise _fail(self.name, f"line {line}: {row['name']} is listed twice", path=path)
            self._reads[row["name"]] = {
                reader: _binary(row[f"{reader}:ICH"], self.name, path, line, f"{reader}:ICH")
                for reader in CQ500_READERS
            }
        folders = self._scan_folders()
        self._folders = {n: folders[n] for n in self._reads if n in folders}
        for case_id in sorted(set(self._reads) - set(folders), key=_natural):
            self._problem(f"{case_id} is in reads.csv but no CQ500CT folder holds it")
        for case_id in sorted(set(folders) - set(self._reads), key=_natural):
            self._problem(f"{folders[case_id]} has no row in reads.csv")

    def _scan_folders(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        level = [self.root]
        for _ in range(3):
            deeper: list[Path] = []
            for folder in level:
                for child in sorted(p for p in folder.iterdir() if p.is_dir()):
                    match = _CQ500_FOLDER.match(child.name)
                    if match is None:
                        deeper.append(child)
                        continue
                    case_id = f"CQ500-CT-{int(match.group(1))}"
                    if case_id in found:
                        self._problem(
                            f"{case_id} has two folders: {found[case_id]} and {child}; "
                            "using the first"
                        )
                        continue
                    found[case_id] = child
            level = deeper
        return found

    @property
    def _known(self) -> Mapping[str, Any]:
        return self._folders

    def case_ids(self) -> list[str]:
        return sorted(self._folders, key=_natural)

    def ct_label(self, case_id: str) -> int:
        self._check_case(case_id)
        return int(sum(self._reads[case_id].values()) >= 2)

    def _source_files(self, case_id: str) -> list[Path]:
        return _dicom_files(self._folders[case_id], self.name, case_id)

    def select_series(self, case_id: str) -> tuple[Path, list[Path]]:
        """The series folder this adapter reads for ``case_id`` and its image files.

        Raises
        ------
        DatasetError
            When no series qualifies; the message lists every series and why it was left out.
        """
        self._check_case(case_id)
        files = self._source_files(case_id)
        by_folder: dict[Path, list[Path]] = {}
        for path in files:
            by_folder.setdefault(path.parent, []).append(path)
        candidates = [
            self._describe(folder, members, case_id)
            for folder, members in sorted(by_folder.items())
        ]
        usable = [c for c in candidates if not c.excluded]
        if not usable:
            reasons = "; ".join(f"{c.folder.name}: {c.excluded}" for c in candidates)
            raise _fail(
                self.name,
                f"no axial plain series ({reasons})",
                case=case_id,
                path=self._folders[case_id],
            )
        best = min(usable, key=lambda c: (c.thickness_mm, -len(c.files), c.folder.name))
        return best.folder, list(best.files)

    def _describe(self, folder: Path, members: list[Path], case_id: str) -> _SeriesCandidate:
        header = _first_image_header(members, self.name, case_id)
        if header is None:
            return _SeriesCandidate(folder, tuple(members), float("inf"), "no image instance")
        description = f"{folder.name} {header.get('SeriesDescription', '')}".upper()
        kernel = str(header.get("ConvolutionKernel", "")).upper()
        thickness = float(header.get("SliceThickness", "") or "inf")
        excluded = ""
        orientation = header.get("ImageOrientationPatient")
        if "BONE" in description or "BONE" in kernel:
            excluded = "bone reconstruction"
        elif str(header.get("ContrastBolusAgent", "")).strip() or (
            re.search(r"POST|CONTRAST|C\+", description)
            and not re.search(r"\bPRE|PLAIN|\bNON", description)
        ):
            excluded = "contrast-enhanced"
        elif orientation is None or len(orientation) != 6:
            excluded = "no ImageOrientationPatient"
        else:
            normal = np.cross(
                np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
            )
            if abs(normal[2]) < np.cos(np.deg2rad(45.0)):
                excluded = "not axial"
        return _SeriesCandidate(folder, tuple(members), thickness, excluded)

    def _prepare(self, case_id: str, files: list[Path]) -> _Volume:
        folder, series = self.select_series(case_id)
        prepared = _prepare_dicom(
            _image_instances(series, self.name, case_id), self.spec, self.name, case_id
        )
        return _Volume.of(prepared, None, note=str(folder.relative_to(self.root)))

    def _labelled(self, case_id: str, volume: _Volume) -> Case:
        return Case(
            case_id=case_id,
            image=volume.image,
            slice_labels=np.full(volume.image.shape[0], -1, dtype=np.int8),
            mask=None,
            ct_label=self.ct_label(case_id),
            source="cq500",
            reader_labels=dict(self._reads[case_id]),
        )


def _natural(text: str) -> tuple[str, int]:
    match = re.search(r"(\d+)$", text)
    return (text[: match.start()], int(match.group(1))) if match else (text, -1)


# --------------------------------------------------------------------------------------------
# Several datasets as one, opening by name, splitting
# --------------------------------------------------------------------------------------------


class ConcatDataset:
    """Several datasets as one; case ids become ``'<dataset name>/<case id>'``.

    Datasets that share a name (two layout folders) are told apart as 'layout', 'layout-2', ...
    in the order given.

    Raises
    ------
    DatasetError
        When no dataset is given or a dataset name holds '/'.
    """

    separator = "/"

    def __init__(self, datasets: Sequence[CaseDataset], name: str = "concat") -> None:
        if not datasets:
            raise DatasetError(f"dataset {name!r}: ConcatDataset needs at least one dataset")
        self.name = name
        self.datasets: dict[str, CaseDataset] = {}
        for dataset in datasets:
            prefix = dataset.name
            if self.separator in prefix:
                raise DatasetError(f"dataset {prefix!r}: a name in a ConcatDataset cannot hold '/'")
            # two datasets of one kind (say two layout folders) keep their default names apart
            count = 2
            while prefix in self.datasets:
                prefix = f"{dataset.name}-{count}"
                count += 1
            if prefix != dataset.name:
                logger.info("dataset %r is called %r within %r", dataset.name, prefix, name)
            self.datasets[prefix] = dataset

    def _split(self, case_id: str) -> tuple[CaseDataset, str]:
        prefix, separator, inner = case_id.partition(self.separator)
        if not separator or prefix not in self.datasets:
            raise _fail(
                self.name,
                f"unknown case id (expected '<dataset>{self.separator}<case>')",
                case=case_id,
            )
        return self.datasets[prefix], inner

    def case_ids(self) -> list[str]:
        return [
            f"{name}{self.separator}{c}" for name, d in self.datasets.items() for c in d.case_ids()
        ]

    def ct_label(self, case_id: str) -> int:
        dataset, inner = self._split(case_id)
        return dataset.ct_label(inner)

    def load(self, case_id: str) -> Case:
        dataset, inner = self._split(case_id)
        return dataclasses.replace(dataset.load(inner), case_id=case_id)


_DATASET_CLASSES: dict[str, type[_CachedDataset]] = {
    "layout": LayoutDataset,
    "rsna": RSNADataset,
    "physionet": PhysioNetCTICHDataset,
    "cq500": CQ500Dataset,
}


def detect_source(root: Path | str) -> str:
    """The kind of dataset in ``root``, from the files present.

    Raises
    ------
    DatasetError
        When the folder is missing or matches no known layout.
    """
    folder = Path(root)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: dataset folder is missing")
    if (folder / "labels.csv").is_file():
        return "layout"
    if (folder / RSNADataset.csv_name).is_file():
        return "rsna"
    if (folder / PhysioNetCTICHDataset.csv_name).is_file() or (folder / "ct_scans").is_dir():
        return "physionet"
    if (folder / "reads.csv").is_file():
        return "cq500"
    raise DatasetError(
        f"{folder}: not a known dataset (looked for labels.csv, {RSNADataset.csv_name}, "
        f"{PhysioNetCTICHDataset.csv_name} or ct_scans/, reads.csv); "
        f"name the kind as '<{'|'.join(SOURCES)}>:{folder}'"
    )


def open_dataset(
    spec_string_or_path: str | Path,
    preprocess: PreprocessSpec,
    cache_dir: Path | str | None = None,
) -> CaseDataset:
    """Open a dataset from ``'<kind>:<path>'`` or a bare path (kind detected from its files).

    Parameters
    ----------
    spec_string_or_path : str or Path
        'layout:/path', 'rsna:/path', 'physionet:/path', 'cq500:/path' or '/path'.
    preprocess : PreprocessSpec
        Model input specification.
    cache_dir : Path, optional
        Folder for preprocessed cases (and the RSNA header index).

    Raises
    ------
    DatasetError
        When the kind is unknown, the folder is missing or the dataset is malformed.
    """
    text = str(spec_string_or_path)
    kind, separator, rest = text.partition(":")
    if separator and kind.lower() in _DATASET_CLASSES:
        kind, path = kind.lower(), Path(rest)
    else:
        path = Path(text)
        kind = detect_source(path)
    return _DATASET_CLASSES[kind](path, preprocess, cache_dir)


def stratified_split(
    dataset: CaseDataset, fraction: float = 0.7, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split a dataset at CT level into (training, validation) case ids, stratified by CT label.

    Each class is shuffled with ``seed`` and ``round(fraction * n)`` of its cases go to training
    (at least one on each side when the class has two or more cases). Whole CTs are assigned, so
    no CT has slices on both sides. The result depends only on the case ids, their labels and the
    seed, not on the order in which the dataset lists them.

    Raises
    ------
    ValueError
        When ``fraction`` is not strictly between 0 and 1.
    DatasetError
        When the dataset has no cases or a case's label cannot be read.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie strictly between 0 and 1, got {fraction}")
    case_ids = sorted(dataset.case_ids())
    if not case_ids:
        raise DatasetError(f"dataset {dataset.name!r}: no cases to split")
    by_label: dict[int, list[str]] = {0: [], 1: []}
    for case_id in case_ids:
        by_label[dataset.ct_label(case_id)].append(case_id)
    rng = np.random.default_rng(seed)
    training: list[str] = []
    validation: list[str] = []
    for label in (0, 1):
        members = by_label[label]
        order = rng.permutation(len(members))
        count = int(round(fraction * len(members)))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        training += [members[i] for i in order[:count]]
        validation += [members[i] for i in order[count:]]
    return sorted(training), sorted(validation)


__all__ = [
    "CQ500Dataset",
    "Case",
    "CaseDataset",
    "ConcatDataset",
    "LayoutDataset",
    "PhysioNetCTICHDataset",
    "RSNADataset",
    "SOURCES",
    "detect_source",
    "open_dataset",
    "stratified_split",
]
