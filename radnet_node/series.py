"""Which DICOM instances form which series, and which series RADnet should run on.

Headers only, so selection is cheap (the one exception: the first compressed frame of one instance
per transfer syntax whose lossiness only its codestream tells, :func:`lossy_encoding`); used by
``radnet-node infer`` and by the network node's completion step.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, MediaStorageDirectoryStorage

from radnet_node.errors import InputError
from radnet_node.preprocess import CT_SOP_CLASSES

__all__ = [
    "Eligibility",
    "ScanResult",
    "SeriesGroup",
    "SkippedInput",
    "classify_series",
    "group_by_series",
    "lossy_encoding",
    "read_header",
    "scan_paths",
    "split_off_non_slices",
]

# A slice normal within this angle of the patient's z axis is axial; gantry tilts (up to ~30 deg)
# stay well inside it, sagittal and coronal reformats (90 deg) well outside. Same limit as
# preprocess.prepare_series, so a series selected here is never refused there for its orientation.
MAX_AXIAL_ANGLE_DEG = 45.0

# Words that name the head in BodyPartExamined, SeriesDescription, ProtocolName or
# StudyDescription, in the languages scanners are commonly set up in (matched as substrings of the
# upper-cased text, so "CT HEAD WO" and "SCHAEDEL" both match).
HEAD_TERMS: tuple[str, ...] = (
    "HEAD",
    "BRAIN",
    "SKULL",
    "CRANI",  # CRANIUM, CRANIAL, CRANIO, CRANE, CRANEO
    "CEREBR",  # CEREBRAL, CEREBRUM, CEREBRO
    "NEURO",
    "KOPF",
    "SCHAEDEL",
    "SCHADEL",
    "SCHÄDEL",
    "HIRN",
    "CERVEAU",
    "TETE",
    "TÊTE",
    "CABEZA",
    "CRANEO",
    "ENCEPH",  # ENCEPHALON, ENCÉPHALE
    "STROKE",
)
# BodyPartExamined values that are clearly not the head; a series with one of these and no head
# word anywhere in its descriptions is refused.
NON_HEAD_BODY_PARTS: frozenset[str] = frozenset(
    {
        "CHEST",
        "THORAX",
        "ABDOMEN",
        "PELVIS",
        "ABDOMENPELVIS",
        "CHESTABDOMEN",
        "CHESTABDPELVIS",
        "LSPINE",
        "TSPINE",
        "SPINE",
        "HEART",
        "LIVER",
        "KIDNEY",
        "LUNG",
        "KNEE",
        "HIP",
        "SHOULDER",
        "ANKLE",
        "FOOT",
        "HAND",
        "WRIST",
        "ELBOW",
        "LEG",
        "ARM",
        "EXTREMITY",
        "BACINO",
        "TORACE",
        "ADDOME",
        "BAUCH",
        "BECKEN",
    }
)
# ImageType values (any position) of images that are not plain CT slices in Hounsfield units.
_LOCALIZER_TYPES = frozenset({"LOCALIZER", "SCOUT", "SURVIEW", "TOPOGRAM"})
_DERIVED_MAP_TYPES = frozenset(
    {"PERFUSION", "MIP", "MINIP", "MINIMUM IP", "MAXIMUM IP", "PROJECTION IMAGE", "VOLUME_RENDER"}
)
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_DOSE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
        "1.2.840.10008.5.1.4.1.1.88.68",  # Radiopharmaceutical Radiation Dose SR
        "1.2.840.10008.5.1.4.1.1.88.76",  # Patient Radiation Dose SR
    }
)
# Some vendors write dose pages as secondary captures or plain CT with this in the description.
_DOSE_DESCRIPTIONS = ("DOSE REPORT", "DOSE INFO", "PATIENT PROTOCOL", "EXAM SUMMARY")
# read_header's reasons for files that are simply not candidates (skipped without error)
_NOT_DICOM = "not a DICOM file"
_DICOMDIR = "a DICOMDIR (media directory)"
_NOT_AN_IMAGE = "not an image instance"
_BENIGN_REASONS = (_NOT_DICOM, _DICOMDIR, _NOT_AN_IMAGE)


@dataclass(frozen=True)
class SkippedInput:
    """A file or series that is not run, and why.

    ``is_error`` marks input that should have been usable (a corrupt DICOM file, an eligible series
    that failed); plain non-candidates (a README, a localizer) are skipped without error.
    """

    what: str  # a file path or a series label
    reason: str
    is_error: bool = False


@dataclass(frozen=True)
class SeriesGroup:
    """The instances of one series, as headers read without pixel data.

    ``headers[i]`` was read from ``paths[i]``; both are ordered by InstanceNumber, then path.
    """

    study_instance_uid: str
    series_instance_uid: str
    headers: tuple[Dataset, ...]
    paths: tuple[str, ...]

    @property
    def first(self) -> Dataset:
        """The first header (for series-level attributes)."""
        return self.headers[0]

    @property
    def number_of_frames(self) -> int:
        """Total 2-D images: one per single-frame instance, NumberOfFrames per multi-frame one."""
        return sum(_frames_of(ds) for ds in self.headers)

    @property
    def label(self) -> str:
        """Human-readable name: series number, description and UID."""
        number = self.first.get("SeriesNumber", "")
        description = str(self.first.get("SeriesDescription", "") or "").strip()
        parts = [
            f"#{number}" if number not in (None, "") else "",
            f'"{description}"' if description else "",
            self.series_instance_uid,
        ]
        return " ".join(p for p in parts if p)


@dataclass(frozen=True)
class ScanResult:
    """Everything found under the given paths: series of readable instances, and skipped files."""

    series: tuple[SeriesGroup, ...]
    skipped: tuple[SkippedInput, ...]


@dataclass(frozen=True)
class Eligibility:
    """Whether RADnet runs on a series; ``reason`` says why not (or what was accepted)."""

    eligible: bool
    reason: str


def read_header(path: str | Path) -> Dataset:
    """Read one file's DICOM header without its pixel data.

    Parameters
    ----------
    path
        A DICOM Part 10 file.

    Returns
    -------
    Dataset
        The header, with ``filename`` set.

    Raises
    ------
    InputError
        Not a DICOM Part 10 file, unreadable or malformed, a DICOMDIR, or not an image instance
        (no SOPClassUID or SeriesInstanceUID).
    """
    where = str(path)
    try:
        ds = pydicom.dcmread(where, stop_before_pixels=True)
    except InvalidDicomError as exc:
        raise InputError(where, f"{_NOT_DICOM} (no DICM preamble)") from exc
    except OSError as exc:
        raise InputError(where, f"cannot read the file ({exc.strerror or exc})") from exc
    except (ValueError, EOFError, KeyError, TypeError, AttributeError) as exc:
        # pydicom's parser reports malformed headers with these
        raise InputError(where, f"corrupt DICOM file ({type(exc).__name__}: {exc})") from exc
    meta = getattr(ds, "file_meta", None)
    media_class = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    if media_class == MediaStorageDirectoryStorage:
        raise InputError(where, f"{_DICOMDIR}, not an image")
    if "SOPClassUID" not in ds:
        if media_class:
            # pydicom stops quietly at the end of a truncated file: what the file meta promised is
            # missing, so this was (part of) an instance, not some other kind of DICOM file
            raise InputError(
                where,
                f"corrupt DICOM file: its file meta names {UID(media_class).name} but the dataset "
                "has no SOPClassUID (truncated?)",
            )
        raise InputError(where, f"{_NOT_AN_IMAGE}: a DICOM file without SOPClassUID")
    if not str(ds.get("SeriesInstanceUID", "") or ""):
        raise InputError(where, "no SeriesInstanceUID")
    return ds


def _files_under(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    seen: set[Path] = set()
    for item in paths:
        path = Path(item)
        if not path.exists():
            raise InputError(path, "no such file or folder")
        candidates: Iterable[Path]
        listed = False
        if path.is_file() and _is_dicomdir(path):
            # a DICOMDIR given by name (a CD, a USB export) stands for the files it lists; one it
            # lists but that is missing is reported when it cannot be read
            candidates, listed = _dicomdir_files(path), True
        elif path.is_dir():
            candidates = sorted(
                Path(root) / name
                for root, dirs, names in os.walk(path)
                for name in names
                if not name.startswith(".")
            )
        else:
            candidates = [path]
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen and (listed or candidate.is_file()):
                seen.add(key)
                files.append(candidate)
    return files


def _is_dicomdir(path: Path) -> bool:
    try:
        meta = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["SOPClassUID"]
        ).file_meta
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
        return False
    return meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage


def _dicomdir_files(path: Path) -> list[Path]:
    """The files a DICOMDIR lists (the ReferencedFileID of its records).

    The IDs are relative to the root of the file-set, which is the DICOMDIR's folder by the
    standard; vendors also put one deeper (Philips' DIRFILE sits two levels below the root its IDs
    start from), so the DICOMDIR's folder and its parents are tried, and the one that resolves the
    most IDs wins (exact names, else lower case, as copies from a CD often are).

    Raises
    ------
    InputError
        The DICOMDIR cannot be read or lists no files.
    """
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise InputError(path, f"corrupt DICOMDIR ({type(exc).__name__}: {exc})") from exc
    ids: list[list[str]] = []
    for record in ds.get("DirectoryRecordSequence", []):
        reference = record.get("ReferencedFileID")
        if reference:
            parts = [reference] if isinstance(reference, str) else list(reference)
            ids.append([str(part) for part in parts])
    if not ids:
        raise InputError(path, "a DICOMDIR that lists no files")

    def resolve(base: Path, parts: list[str]) -> Path | None:
        for candidate in (base.joinpath(*parts), base.joinpath(*(p.lower() for p in parts))):
            if candidate.is_file():
                return candidate
        return None

    depth = max(len(parts) for parts in ids)
    bases = [path.parent, *path.parent.parents][: depth + 1]
    sample = ids[:50]
    base = max(bases, key=lambda b: sum(resolve(b, parts) is not None for parts in sample))
    return [resolve(base, parts) or base.joinpath(*parts) for parts in ids]


def scan_paths(paths: Iterable[str | Path]) -> ScanResult:
    """Read the headers of every file under ``paths`` (folders recursively) and group them.

    Hidden files (names starting with ".") are ignored; a file reached twice is read once. A
    DICOMDIR given as a path stands for the files it lists. Non-DICOM files and DICOMDIRs found in
    folders are skipped with a reason; an unreadable or corrupt DICOM file is
    skipped as an error (it may have been a slice of a series). Two files with the same SOP Instance
    UID keep the first, the other is reported.

    Parameters
    ----------
    paths
        Files and folders, in any mix.

    Returns
    -------
    ScanResult

    Raises
    ------
    InputError
        A given path does not exist.
    """
    headers: list[tuple[str, Dataset]] = []
    skipped: list[SkippedInput] = []
    for path in _files_under(paths):
        try:
            headers.append((str(path), read_header(path)))
        except InputError as exc:
            benign = exc.reason.startswith(_BENIGN_REASONS)
            skipped.append(SkippedInput(exc.path, exc.reason, is_error=not benign))
    groups, duplicates = _group(headers)
    return ScanResult(series=groups, skipped=tuple(skipped) + duplicates)


def group_by_series(headers: Iterable[tuple[str, Dataset]]) -> tuple[SeriesGroup, ...]:
    """Group (path, header) pairs by SeriesInstanceUID.

    Parameters
    ----------
    headers
        Headers from :func:`read_header`, with the path each came from.

    Returns
    -------
    tuple of SeriesGroup
        Ordered by StudyInstanceUID, SeriesNumber, SeriesInstanceUID; instances by InstanceNumber,
        then path. Duplicate SOP Instance UIDs are kept once (see :func:`scan_paths`).
    """
    groups, _ = _group(headers)
    return groups


def _group(
    headers: Iterable[tuple[str, Dataset]],
) -> tuple[tuple[SeriesGroup, ...], tuple[SkippedInput, ...]]:
    # Of several files with one SOP Instance UID the largest is kept: copies of one instance differ
    # in size only when one is cut short (an interrupted copy), and that one must not win.
    kept: dict[str, tuple[str, Dataset, int]] = {}
    unnamed: list[tuple[str, Dataset]] = []
    duplicates: list[SkippedInput] = []
    for path, ds in headers:
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        if not sop_uid:
            unnamed.append((path, ds))
            continue
        size = _file_size(path)
        if sop_uid not in kept:
            kept[sop_uid] = (path, ds, size)
            continue
        other_path, _, other_size = kept[sop_uid]
        dropped, winner = (path, other_path)
        if size > other_size:
            kept[sop_uid] = (path, ds, size)
            dropped, winner = (other_path, path)
        duplicates.append(SkippedInput(dropped, f"same SOPInstanceUID as {winner}, ignored"))
    by_series: dict[str, list[tuple[str, Dataset]]] = {}
    for path, ds in [(path, ds) for path, ds, _ in kept.values()] + unnamed:
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))

    def instance_key(item: tuple[str, Dataset]) -> tuple[int, str]:
        number = item[1].get("InstanceNumber")
        try:
            return (int(number), item[0])
        except (TypeError, ValueError):
            return (2**31, item[0])

    groups = []
    for series_uid, members in by_series.items():
        members.sort(key=instance_key)
        groups.append(
            SeriesGroup(
                study_instance_uid=str(members[0][1].get("StudyInstanceUID", "") or ""),
                series_instance_uid=series_uid,
                headers=tuple(ds for _, ds in members),
                paths=tuple(p for p, _ in members),
            )
        )

    def series_key(group: SeriesGroup) -> tuple[str, int, str]:
        try:
            number = int(group.first.get("SeriesNumber"))
        except (TypeError, ValueError):
            number = 2**31
        return (group.study_instance_uid, number, group.series_instance_uid)

    return tuple(sorted(groups, key=series_key)), tuple(duplicates)


def _file_size(path: str) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return -1


def _frames_of(ds: Dataset) -> int:
    if str(ds.get("SOPClassUID", "")) == pydicom.uid.CTImageStorage:
        return 1
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _image_type(ds: Dataset) -> list[str]:
    value = ds.get("ImageType", [])
    values = [value] if isinstance(value, str) else list(value)
    return [str(v).strip().upper() for v in values]


def _orientation(ds: Dataset) -> list[float] | None:
    """ImageOrientationPatient from the top level, or the shared / first per-frame group."""
    if ds.get("ImageOrientationPatient") not in (None, ""):
        return [float(v) for v in ds.ImageOrientationPatient]
    for sequence in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(sequence)
        if not groups:
            continue
        planes = groups[0].get("PlaneOrientationSequence")
        if planes and planes[0].get("ImageOrientationPatient") not in (None, ""):
            return [float(v) for v in planes[0].ImageOrientationPatient]
    return None


def _plane_of(orientation: Sequence[float]) -> tuple[str, float] | None:
    """The plane of six direction cosines (axial, coronal or sagittal) and the angle in degrees
    between the slice normal and the patient's z axis; None when they are degenerate."""
    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    norm = float(np.linalg.norm(normal))
    if not np.isfinite(norm) or norm < 1e-6:
        return None
    angle = float(np.degrees(np.arccos(min(1.0, abs(normal[2]) / norm))))
    if angle <= MAX_AXIAL_ANGLE_DEG:
        return "axial", angle
    return ("sagittal" if abs(normal[0]) >= abs(normal[1]) else "coronal"), angle


def _plane(ds: Dataset) -> str | None:
    """The plane of one instance's slices; None without a usable orientation."""
    orientation = _orientation(ds)
    if orientation is None or len(orientation) != 6:
        return None
    found = _plane_of(orientation)
    return None if found is None else found[0]


# JPEG processes that are lossy by definition (PS3.5 Table A-1: Baseline, Extended and the
# retired DCT processes; 57, 58 and 70 are the lossless ones)
_LOSSY_JPEG = frozenset(
    f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 52, 53, 54, 55, 56, 59, 60, 61, 62, 63, 64)
)
# may be lossy or not: the codestream says (JPEG 2000 and HTJ2K: the wavelet; JPEG-LS: NEAR)
_J2K_EITHER = frozenset(
    {"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203"}
)
_JPEG_LS_NEAR = "1.2.840.10008.1.2.4.81"


def lossy_encoding(headers: Sequence[Dataset]) -> str | None:
    """How the series' pixel data is lossy-compressed, judged from the encoding rather than the
    LossyImageCompression flag (which not every archive that recompresses sets); None when no
    instance is.

    A lossy JPEG process is lossy by its transfer syntax. For JPEG 2000 (and HTJ2K) the first
    codestream of one instance per transfer syntax is read: the irreversible 9-7 wavelet is
    lossy (a reversible codestream cut short by rate control is not detected); for JPEG-LS
    near-lossless, a NEAR above 0 is. Headers read without their file (no ``filename``) and
    without pixel data cannot be judged this way.
    """
    checked: set[str] = set()
    for ds in headers:
        meta = getattr(ds, "file_meta", None)
        syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
        if syntax in _LOSSY_JPEG:
            return f"{UID(syntax).name} is lossy"
        if syntax in checked or (syntax not in _J2K_EITHER and syntax != _JPEG_LS_NEAR):
            continue
        checked.add(syntax)
        frame = _first_frame(ds)
        if frame is None:
            continue
        if syntax == _JPEG_LS_NEAR:
            near = _jpeg_ls_near(frame)
            if near:
                return f"{UID(syntax).name} with NEAR {near}"
        elif _j2k_irreversible(frame):
            return f"{UID(syntax).name} with the irreversible 9-7 wavelet"
    return None


def _first_frame(ds: Dataset) -> bytes | None:
    """The first compressed frame of an instance (from its file when read without pixels)."""
    try:
        if "PixelData" not in ds:
            filename = getattr(ds, "filename", None)
            if not isinstance(filename, str | os.PathLike):
                return None
            ds = pydicom.dcmread(filename, specific_tags=["NumberOfFrames", "PixelData"])
        if "PixelData" not in ds:
            return None
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        return next(generate_frames(ds.PixelData, number_of_frames=frames))
    except (OSError, ValueError, StopIteration, InvalidDicomError, KeyError, TypeError):
        return None  # unreadable here: the decoder names the problem later


def _j2k_irreversible(codestream: bytes) -> bool:
    """Whether a JPEG 2000 codestream's COD marker names the irreversible 9-7 wavelet."""
    pos = codestream.find(b"\xff\x4f\xff\x51")  # SOC then SIZ (a JP2 header may come first)
    if pos < 0:
        return False
    pos += 2
    while pos + 4 <= len(codestream):
        marker = int.from_bytes(codestream[pos : pos + 2], "big")
        if marker in (0xFF90, 0xFF93):  # SOT / SOD: the main header ended without a COD
            return False
        if marker == 0xFF52:  # COD: Lcod, Scod, SGcod (4), levels, block w, h, style, transform
            return pos + 13 < len(codestream) and codestream[pos + 13] == 0
        pos += 2 + int.from_bytes(codestream[pos + 2 : pos + 4], "big")
    return False


def _jpeg_ls_near(stream: bytes) -> int:
    """NEAR of a JPEG-LS stream's first scan (0: lossless)."""
    pos = 2 if stream[:2] == b"\xff\xd8" else 0
    while pos + 4 <= len(stream):
        if stream[pos] != 0xFF:
            return 0
        marker = stream[pos + 1]
        if marker == 0xDA:  # SOS: Ls, Ns, Ns x (Cs, Tm), NEAR
            components = stream[pos + 4] if pos + 4 < len(stream) else 0
            at = pos + 5 + 2 * components
            return stream[at] if at < len(stream) else 0
        pos += 2 + int.from_bytes(stream[pos + 2 : pos + 4], "big")
    return 0


def _texts(ds: Dataset) -> dict[str, str]:
    return {
        keyword: str(ds.get(keyword, "") or "").strip().upper()
        for keyword in ("BodyPartExamined", "SeriesDescription", "ProtocolName", "StudyDescription")
    }


def _names_head(text: str) -> bool:
    return any(term in text for term in HEAD_TERMS)


def classify_series(
    headers: Sequence[Dataset], *, min_slices: int = 5, accept_lossy: bool = False
) -> Eligibility:
    """Decide from headers alone whether a series is an axial head CT that RADnet can run on.

    Eligible when every instance is Modality CT with a CT Image, Enhanced CT or Legacy Converted
    Enhanced CT SOP class, greyscale, not a localizer or derived map (perfusion, MIP), the slice
    normal lies within 45 degrees of the patient's z axis (gantry tilt is fine), the series
    plausibly shows the head, it holds at least ``min_slices`` images, and no instance says it was
    lossy-compressed (LossyImageCompression 01, or a lossy encoding: :func:`lossy_encoding`)
    unless ``accept_lossy``: the shipped model never saw a lossy image and calls heavily
    compressed normal slices positive (its card's limitations).

    "Plausibly the head": a head word (HEAD_TERMS: HEAD, BRAIN, SKULL, CRANI..., KOPF, ...) in
    BodyPartExamined, SeriesDescription, ProtocolName or StudyDescription; or, when none names the
    head, BodyPartExamined is missing, empty or not a known other region. Many scanners leave
    BodyPartExamined empty and the node only receives what a PACS routes to it, so a missing value
    does not refuse a series; a series labelled CHEST (and nothing head-like) is refused.

    Parameters
    ----------
    headers
        The headers of every instance of one series (from :func:`read_header`).
    min_slices
        Fewest images (frames) a series needs.
    accept_lossy
        Run series whose images were lossy-compressed (``[series] accept_lossy``).

    Returns
    -------
    Eligibility
        ``eligible`` and a one-line reason naming the first check that failed.

    Raises
    ------
    ValueError
        If ``headers`` is empty or ``min_slices`` is below 1.
    """
    if not headers:
        raise ValueError("classify_series: no headers given")
    if min_slices < 1:
        raise ValueError(f"classify_series: min_slices must be >= 1, got {min_slices}")
    for index, ds in enumerate(headers):
        refusal = _refuse_instance(ds)
        if refusal is not None:
            # a refusal that holds for the whole series needs no file; a mixed series names it
            where = getattr(ds, "filename", None) or ds.get("SOPInstanceUID", "")
            suffix = f" ({where})" if index > 0 and where else ""
            return Eligibility(False, refusal + suffix)

    first = headers[0]
    orientation = _orientation(first)
    if orientation is None or len(orientation) != 6:
        return Eligibility(False, "no ImageOrientationPatient, cannot tell whether it is axial")
    found = _plane_of(orientation)
    if found is None:
        return Eligibility(False, f"ImageOrientationPatient {orientation} is degenerate")
    plane, angle = found
    if plane != "axial":
        return Eligibility(
            False, f"not axial: a {plane} series (slice normal {angle:.0f} deg from the z axis)"
        )

    texts = _texts(first)
    head_fields = [k for k, v in texts.items() if _names_head(v)]
    body_part = texts["BodyPartExamined"].replace(" ", "").replace("_", "")
    if not head_fields and body_part in NON_HEAD_BODY_PARTS:
        return Eligibility(
            False,
            f"not a head CT: BodyPartExamined {texts['BodyPartExamined']} and no head term in "
            "the series, protocol or study description",
        )

    frames = sum(_frames_of(ds) for ds in headers)
    if frames < min_slices:
        return Eligibility(False, f"too few slices: {frames}, at least {min_slices} required")

    lossy = sum(str(ds.get("LossyImageCompression", "")).strip() == "01" for ds in headers)
    if lossy and not accept_lossy:
        return Eligibility(
            False,
            f"lossy-compressed: {lossy} of {len(headers)} instance(s) have LossyImageCompression "
            "01, and the model calls heavily compressed normal slices positive (see its card); "
            "[series] accept_lossy = true runs such series",
        )
    encoding = None if accept_lossy else lossy_encoding(headers)
    if encoding is not None:
        return Eligibility(
            False,
            f"lossy-compressed: {encoding} (LossyImageCompression does not say so), and the model "
            "calls heavily compressed normal slices positive (see its card); [series] "
            "accept_lossy = true runs such series",
        )

    why_head = (
        f"{head_fields[0]} names the head"
        if head_fields
        else "BodyPartExamined " + ("missing" if not body_part else f"{body_part!r} not excluded")
    )
    tilt = f", tilted {angle:.1f} deg" if angle >= 0.5 else ""
    return Eligibility(True, f"axial head CT, {frames} slices{tilt} ({why_head})")


def split_off_non_slices(group: SeriesGroup) -> tuple[SeriesGroup, tuple[SkippedInput, ...]]:
    """Leave out the instances of a series that cannot be CT slices when the others can.

    Some scanners and exports put a dose report, a localizer or a secondary-capture page into
    the series of the axial slices. Those instances (any that :func:`classify_series` would refuse
    one by one) are split off, each with a reason naming its file, so the slices still run. A
    series where no instance or every instance is such is returned as it is, for
    :func:`classify_series` to judge.

    Returns
    -------
    tuple
        The group of the remaining instances, and one :class:`SkippedInput` per instance left out.
    """
    refusals = [_refuse_instance(ds) for ds in group.headers]
    # a sagittal or coronal image among the axial slices (a reformat saved into the series) is
    # such an instance too, when the axial slices are the majority
    planes = [
        _plane(ds) if r is None else None for ds, r in zip(group.headers, refusals, strict=True)
    ]
    if 2 * planes.count("axial") > len(planes):
        refusals = [
            f"a {plane} image among axial slices" if plane not in (None, "axial") else r
            for plane, r in zip(planes, refusals, strict=True)
        ]
    if all(r is None for r in refusals) or all(r is not None for r in refusals):
        return group, ()
    kept = [(p, ds) for p, ds, r in zip(group.paths, group.headers, refusals, strict=True) if not r]
    left_out = tuple(
        SkippedInput(path, f"{reason}: left out of series {group.series_instance_uid}")
        for path, reason in zip(group.paths, refusals, strict=True)
        if reason
    )
    return (
        replace(group, headers=tuple(ds for _, ds in kept), paths=tuple(p for p, _ in kept)),
        left_out,
    )


def _refuse_instance(ds: Dataset) -> str | None:
    """Why one instance cannot be part of an eligible series, or None."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "")
    descriptions = " ".join(
        str(ds.get(k, "") or "").upper() for k in ("SeriesDescription", "ImageComments")
    )
    if sop_class in _DOSE_SOP_CLASSES:
        return "a radiation dose report"
    if sop_class.startswith(_SECONDARY_CAPTURE_PREFIX):
        rgb = int(ds.get("SamplesPerPixel", 1) or 1) != 1
        return "a secondary capture" + (" (RGB)" if rgb else "") + ", not CT slices"
    if modality != "CT":
        return f"Modality {modality or '(empty)'}, not CT"
    if sop_class not in CT_SOP_CLASSES:
        return f"SOP class {UID(sop_class).name} is not a CT image storage class"
    image_type = set(_image_type(ds))
    if image_type & _LOCALIZER_TYPES:
        return "a localizer (scout) image"
    derived = image_type & _DERIVED_MAP_TYPES
    if derived:
        return f"a derived image ({', '.join(sorted(derived))}), not plain CT slices"
    if any(term in descriptions for term in _DOSE_DESCRIPTIONS):
        return "a dose / exam summary page"
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return f"not greyscale (SamplesPerPixel {samples}, {photometric or 'no photometric'})"
    return None
