"""What the SR, SEG and key-image builders share: the node's identity, the source lookup, the
patient/study copy, and the algorithm and equipment descriptions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom import config
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pydicom.valuerep import DA, TM, validate_value

import radnet_node
from radnet_node.dicom_out import codes
from radnet_node.errors import SeriesError
from radnet_node.results import SeriesResult

__all__ = [
    "DEFAULT_NODE_NAME",
    "NodeIdentity",
    "PATIENT_STUDY_KEYWORDS",
    "algorithm_label",
    "contributing_equipment",
    "copy_patient_study",
    "derived_frame_of_reference_uid",
    "device_uid_for",
    "for_highdicom",
    "highdicom_character_set",
    "metadata_only",
    "seg_algorithm",
    "set_body_part",
    "set_equipment",
    "source_datasets",
    "source_for_slice",
    "source_value_problems",
    "sr_algorithm",
]

DEFAULT_NODE_NAME = "radnet-node"

# Patient, Patient Study and General Study modules (and the de-identification flags, so a
# de-identified study stays marked as such): copied verbatim so the objects land in the same
# study of the same patient in every PACS.
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
    "StudyDescription",
)
#: DeidentificationMethod of outputs whose source says PatientIdentityRemoved YES and names no
#: method (the standard requires one of the two method attributes then)
UNSTATED_DEIDENTIFICATION_METHOD = "not stated in the source images"
# Type 2 attributes of those modules: present (possibly empty) even when the source lacks them.
_TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
_PIXEL_TAGS = frozenset(
    tag_for_keyword(keyword) for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
)


def device_uid_for(name: str) -> UID:
    """A stable device UID derived from the node's name (the default of :class:`NodeIdentity`)."""
    return generate_uid(entropy_srcs=["radnet-node device observer", name])


@dataclass(frozen=True)
class NodeIdentity:
    """The device observer of the SR and the equipment that writes every object.

    ``device_uid`` is the node's stable UID; left empty, it is derived from ``name`` (so two nodes
    with the same name share it: give each node its own name or UID).

    Raises
    ------
    ValueError
        If ``name``, ``manufacturer``, ``model_name`` or ``software_version`` is empty, or
        ``device_uid`` is not a valid UID.
    """

    device_uid: str = ""
    name: str = DEFAULT_NODE_NAME
    manufacturer: str = "radnet-node project"
    model_name: str = "radnet-node"
    software_version: str = radnet_node.__version__
    institution_name: str | None = None
    station_name: str | None = None

    def __post_init__(self) -> None:
        for field_name in ("name", "manufacturer", "model_name", "software_version"):
            if not str(getattr(self, field_name)).strip():
                raise ValueError(f"NodeIdentity.{field_name} must not be empty")
        if not self.device_uid:
            # frozen: the derived default is set once, here
            object.__setattr__(self, "device_uid", str(device_uid_for(self.name)))
        if not UID(self.device_uid).is_valid:
            raise ValueError(f"NodeIdentity.device_uid {self.device_uid!r} is not a valid UID")


def source_for_slice(result: SeriesResult, sources: Mapping[str, Dataset], index: int) -> Dataset:
    """The source header of slice ``index`` of the result.

    Raises
    ------
    SeriesError
        If ``sources`` has no header for that slice's SOP Instance UID.
    """
    sop_uid = result.series.slices[index].sop_instance_uid
    try:
        return sources[sop_uid]
    except KeyError:
        raise SeriesError(
            result.series_instance_uid,
            f"no source header for slice {index} (SOP Instance UID {sop_uid or '(empty)'}); "
            "the DICOM writers need the header of every source instance",
        ) from None


def source_datasets(result: SeriesResult, sources: Mapping[str, Dataset]) -> list[Dataset]:
    """The distinct source headers of the result, in slice order (one per SOP instance).

    Raises
    ------
    SeriesError
        If a header is missing or belongs to another series or study.
    """
    seen: dict[str, Dataset] = {}
    for index, source in enumerate(result.series.slices):
        if source.sop_instance_uid in seen:
            continue
        ds = source_for_slice(result, sources, index)
        for keyword, expected in (
            ("SeriesInstanceUID", result.series_instance_uid),
            ("StudyInstanceUID", result.study_instance_uid),
        ):
            found = str(ds.get(keyword, ""))
            if found != expected:
                raise SeriesError(
                    result.series_instance_uid,
                    f"source header {source.sop_instance_uid} has {keyword} {found or '(none)'}, "
                    f"the result was computed on {expected}",
                )
        seen[source.sop_instance_uid] = ds
    return list(seen.values())


def _public_copy(ds: Dataset, leave_out: frozenset[int] = frozenset()) -> Dataset:
    """A shallow copy of ``ds`` without its private elements (and ``leave_out``), each element
    as read: a raw one stays raw, so nothing is decoded (setting a private element would decode
    it when its creator is in the copy already)."""
    copy = Dataset()
    for tag in ds.keys():
        if not tag.is_private and tag not in leave_out:
            copy[tag] = ds.get_item(tag)
    if hasattr(ds, "file_meta"):
        copy.file_meta = ds.file_meta
    return copy


def derived_frame_of_reference_uid(series_instance_uid: str) -> UID:
    """The Frame of Reference UID the outputs give a series whose images have none (the CQ500
    images lost theirs to de-identification): the same for every result of the series, and
    under this implementation's root, since it is new."""
    return generate_uid(entropy_srcs=["radnet-node frame of reference", series_instance_uid])


def metadata_only(
    ds: Dataset,
    *,
    slice_thickness_mm: float | None = None,
    frame_of_reference_uid: str | None = None,
) -> Dataset:
    """A shallow copy of ``ds`` without pixel data and private elements (what highdicom needs of
    a source image).

    The elements are shared with ``ds``, not copied, and not decoded: neither is modified
    afterwards. Only what the builders read is decoded, so an element nobody uses cannot fail
    them (a vendor's private element whose value does not fit the VR that pydicom's private
    dictionary gives it, in an Implicit VR file or stored as UN by a PACS). Type 2
    patient and study attributes that the source lacks (anonymisers drop them) are added empty,
    since highdicom reads them unconditionally. A single-frame source without a SliceThickness
    value (type 2 in the CT Image module) gets ``slice_thickness_mm`` when given: the SEG's pixel
    measures need one, and the nominal slice spacing is the best the series can tell. A source
    without a FrameOfReferenceUID gets ``frame_of_reference_uid`` when given (the SEG's plane
    positions are in a frame of reference; see :func:`derived_frame_of_reference_uid`).
    """
    copy = _public_copy(ds, leave_out=_PIXEL_TAGS)
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in copy:
            setattr(copy, keyword, None)
    single_frame = int(ds.get("NumberOfFrames", 1) or 1) == 1
    if single_frame and slice_thickness_mm is not None and not ds.get("SliceThickness"):
        # a new element: an empty one of ds must not change
        copy.add_new("SliceThickness", "DS", f"{slice_thickness_mm:.6g}")
    if frame_of_reference_uid is not None and not ds.get("FrameOfReferenceUID"):
        copy.add_new("FrameOfReferenceUID", "UI", frame_of_reference_uid)
    return copy


_KNOWN_CHARACTER_SETS = frozenset(value.value for value in hd.SpecificCharacterSetValues)


def _character_set_terms(source: Dataset) -> list[str]:
    """The values of the source's Specific Character Set, stripped ([] when it has none)."""
    value = source.get("SpecificCharacterSet")
    if not value:
        return []
    return [str(term).strip() for term in ([value] if isinstance(value, str) else value)]


def highdicom_character_set(source: Dataset) -> str | list[str] | None:
    """The source's Specific Character Set in the form highdicom's constructors accept.

    highdicom checks the value against its list and refuses an empty value 1, which the standard
    allows with code extensions (``\\ISO 2022 IR 87``: value 1 is then ISO 2022 IR 6, PS3.3
    C.12.1.1.2); it is spelled out here. A value highdicom does not know is not given to it
    (None): the objects' own text is ASCII, and :func:`copy_patient_study` sets the source's value
    verbatim afterwards either way, so the copied names keep the encoding they came in.
    """
    terms = _character_set_terms(source)
    if not terms:
        return None
    if len(terms) > 1 and not terms[0]:
        terms[0] = "ISO 2022 IR 6"
    if not all(term in _KNOWN_CHARACTER_SETS for term in terms):
        return None
    return terms[0] if len(terms) == 1 else terms


_TEXT_VRS = frozenset({"PN", "SH", "LO", "ST", "LT", "UT", "UC"})
_DEFAULT_REPERTOIRE = ("", "ISO_IR 6")
#: the enumerated values of Patient's Sex (PS3.3 C.7.1.1)
_PATIENT_SEX_VALUES = ("M", "F", "O")
#: the patient and study attributes highdicom's constructors convert, refusing a bad value
_CONVERTED_BY_HIGHDICOM = ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime")
#: UIDs of the source that the outputs reference (the Study Instance UID is checked with the
#: patient and study values, the SOP Instance UIDs of every source instance separately)
_REFERENCED_UIDS = ("SeriesInstanceUID", "FrameOfReferenceUID")
_UID_RULE = (
    "not a valid UID (PS3.5 9.1: digits and dots, no leading zero in a component, at most 64 "
    "characters)"
)


def _value_fault(keyword: str, vr: str, value: object) -> str | None:
    """What is wrong with one value beyond its VR's form, or None: a date or time that is none,
    a Patient's Sex outside its enumerated values, a person name with too many components."""
    text = str(value).strip()
    if not text:
        return None
    if vr in ("DA", "TM"):
        try:
            (DA if vr == "DA" else TM)(text)
        except (ValueError, TypeError):
            return f"not a valid {'date' if vr == 'DA' else 'time'} (PS3.5 6.2)"
    if keyword == "PatientSex" and text not in _PATIENT_SEX_VALUES:
        return "not one of the enumerated values M, F, O"
    if vr == "PN":
        groups = text.split("=")
        if len(groups) > 3 or any(len(group.split("^")) > 5 for group in groups):
            return "more than five components or three component groups (PS3.5 6.2)"
    return None


def for_highdicom(ds: Dataset) -> Dataset:
    """``ds`` as highdicom's constructors take it: a patient or study value that they convert
    and refuse (a birth or study date that is no date, a time that is no time, a Patient's Sex
    other than M, F or O) is left empty in a shallow copy without private elements; ``ds``
    itself when there is none.

    The builders then write the source's own values onto the new object with
    :func:`copy_patient_study`, so the result still files with its study, and
    :func:`source_value_problems` reports the faults.
    """
    faulty = [
        keyword
        for keyword in _CONVERTED_BY_HIGHDICOM
        if keyword in ds
        and ds[keyword].value not in (None, "")
        and _value_fault(keyword, ds[keyword].VR, ds[keyword].value)
    ]
    if not faulty:
        return ds
    copy = _public_copy(ds)
    for keyword in faulty:
        copy.add_new(keyword, ds[keyword].VR, None)  # a new element: ds's own stays as it is
    return copy


def source_value_problems(source: Dataset, headers: Sequence[Dataset] = ()) -> list[str]:
    """What is wrong with the patient and study values of ``source`` by the standard's rules:
    :func:`copy_patient_study` copies them as they are (so the objects file with the study they
    belong to), so the outputs carry the same faults, and a validator reports them there. The
    same holds for the UIDs the outputs reference: the series, its frame of reference, and the
    SOP Instance UIDs of ``headers`` (every source instance).

    Each entry names the attribute and the fault, never the value (it may be a patient's):
    a value too long or not of its VR's form (pydicom's checks), a date, time, sex or person
    name the standard does not allow, characters outside the default repertoire without a
    Specific Character Set that declares them, or a UID that breaks the UID rules.
    """
    undeclared = all(term in _DEFAULT_REPERTOIRE for term in _character_set_terms(source))
    problems: list[str] = []
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword not in source:
            continue
        element = source[keyword]
        if element.VR == "SQ" or element.value in (None, ""):
            continue
        values = element.value if element.VM > 1 else [element.value]
        for value in values:
            # pydicom reads DS and IS as numbers (DSfloat, IS) that keep the text they came as:
            # the text is what the standard's rules are about
            text = getattr(value, "original_string", None)
            if text is None and element.VR in ("DS", "IS"):
                text = str(value)
            try:
                validate_value(element.VR, value if text is None else text, config.RAISE)
            except ValueError as exc:
                # the messages quote some values: keep the fault, drop the value
                problems.append(f"{keyword}: {str(exc).split(':', 1)[0].rstrip('.')}")
                break
            if undeclared and element.VR in _TEXT_VRS and not str(value).isascii():
                problems.append(
                    f"{keyword}: characters outside the default repertoire, and no Specific "
                    "Character Set declares them"
                )
                break
            fault = _value_fault(keyword, element.VR, value if text is None else text)
            if fault is not None:
                problems.append(f"{keyword}: {fault}")
                break
    reported = {problem.split(":", 1)[0] for problem in problems}
    for keyword in ("StudyInstanceUID", *_REFERENCED_UIDS):
        value = str(source.get(keyword, "") or "")
        if value and keyword not in reported and not UID(value).is_valid:
            problems.append(f"{keyword}: {_UID_RULE}")
    invalid = sum(1 for ds in headers if not UID(str(ds.get("SOPInstanceUID", "") or "0")).is_valid)
    if invalid:
        problems.append(
            f"SOPInstanceUID: {_UID_RULE}, in {invalid} of {len(headers)} source instances"
        )
    return problems


def copy_patient_study(target: Dataset, source: Dataset) -> None:
    """Copy the patient and study modules of ``source`` onto ``target`` (a new object).

    Only the builders' own, freshly made ``target`` is modified; missing type 2 attributes are
    written empty. A source marked PatientIdentityRemoved YES that names no de-identification
    method (as the CQ500 images do) gets :data:`UNSTATED_DEIDENTIFICATION_METHOD` as its
    DeidentificationMethod, which the standard then requires: the outputs stay marked as
    de-identified, and valid.
    """
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            setattr(target, keyword, source[keyword].value)
        elif keyword in _TYPE2_KEYWORDS:
            setattr(target, keyword, None)
        elif keyword in target:
            delattr(target, keyword)
    if (
        str(target.get("PatientIdentityRemoved", "")).strip().upper() == "YES"
        and not target.get("DeidentificationMethod")
        and not target.get("DeidentificationMethodCodeSequence")
    ):
        target.DeidentificationMethod = UNSTATED_DEIDENTIFICATION_METHOD


def algorithm_label(result: SeriesResult) -> str:
    """The algorithm version as written in every object: model version and weights checksum.

    The sha256 prefix makes two weights files that share a version string distinguishable.
    """
    return f"{result.model.version} (sha256:{result.model.sha256[:12]})"


def sr_algorithm(result: SeriesResult) -> hd.sr.AlgorithmIdentification:
    """TID 4019 algorithm identification for the SR: model name, version, variant and weights."""
    return hd.sr.AlgorithmIdentification(
        name=result.model.name,
        version=algorithm_label(result),
        parameters=[f"variant={result.model.variant}", f"sha256={result.model.sha256}"],
    )


def seg_algorithm(result: SeriesResult) -> hd.AlgorithmIdentificationSequence:
    """The SEG segment's algorithm identification (family: Artificial Intelligence)."""
    return hd.AlgorithmIdentificationSequence(
        name=result.model.name,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=algorithm_label(result),
        parameters={
            "variant": result.model.variant,
            "sha256": result.model.sha256,
            "threshold": f"{result.threshold:g}",
        },
    )


def contributing_equipment(
    identity: NodeIdentity, result: SeriesResult
) -> Sequence[hd.ContributingEquipment]:
    """The node as contributing equipment with purpose "Processing Algorithm" (IHE AI Results)."""
    equipment = hd.ContributingEquipment(
        manufacturer=identity.manufacturer,
        # highdicom accepts CID 7005 codes only; the IHE AIR code replaces this one below
        purpose_of_reference=codes.DCM_PROCESSING_EQUIPMENT,
        manufacturer_model_name=identity.model_name,
        software_versions=identity.software_version,
        device_serial_number=identity.device_uid,
        institution_name=identity.institution_name,
        station_name=identity.station_name,
        contribution_description=(
            f"{result.model.name} {algorithm_label(result)}: automatic intracranial "
            "hemorrhage detection, unverified"
        ),
    )
    equipment.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.PROCESSING_ALGORITHM)
    ]
    return [equipment]


#: BodyPartExamined values of a source that the outputs keep (the standard's defined terms for
#: what RADnet reads); any other (empty, "Head", KOPF, CABEZA, ...) becomes HEAD
_KEPT_BODY_PARTS = frozenset({"HEAD", "BRAIN", "SKULL"})


def set_body_part(target: Dataset, source: Dataset) -> None:
    """General Series BodyPartExamined of an image-like object: HEAD, or the source's BRAIN or
    SKULL.

    RADnet reads head CT only; without it validators cannot tell that no laterality is needed.
    Sources write this in many ways (lower case, which a CS may not hold, or a local language),
    so only a defined term is kept: a value validators do not know asks for a Laterality.
    """
    body_part = str(source.get("BodyPartExamined", "") or "")
    target.BodyPartExamined = body_part if body_part in _KEPT_BODY_PARTS else "HEAD"


def set_equipment(target: Dataset, identity: NodeIdentity) -> None:
    """General Equipment module of a new object: this node."""
    target.Manufacturer = identity.manufacturer
    target.ManufacturerModelName = identity.model_name
    target.SoftwareVersions = identity.software_version
    target.DeviceSerialNumber = identity.device_uid
    if identity.institution_name is not None:
        target.InstitutionName = identity.institution_name
    if identity.station_name is not None:
        target.StationName = identity.station_name
