"""The series catalog: instances registered as they arrive, series completed after a quiet period,
re-opened by late instances, and selected (run or rejected, with the reason) once complete.

Only database rows and spool headers here; no DIMSE and no inference.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from radnet_node.audit import (
    AuditDB,
    Instance,
    Job,
    JobState,
    Series,
    SeriesState,
    add_event,
    utcnow,
)
from radnet_node.errors import InputError
from radnet_node.series import (
    SeriesGroup,
    classify_series,
    group_by_series,
    read_header,
    split_off_non_slices,
)

__all__ = [
    "Arrival",
    "InstanceInfo",
    "Registration",
    "RegistrationOutcome",
    "Selection",
    "complete_quiet_series",
    "is_safe_uid",
    "series_number_of",
    "load_series_group",
    "register_instance",
    "register_instances",
    "reopen_series",
    "restart_quiet_periods",
    "select_series",
]

# A DICOM UID: digits and dots, at most 64 characters (PS3.5 9.1). Checked before a UID becomes a
# file or folder name in the spool, so a peer cannot write outside it.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_safe_uid(value: str) -> bool:
    """Whether ``value`` is a syntactically valid UID (and so a safe file name)."""
    return len(value) <= 64 and bool(_UID.fullmatch(value))


def series_number_of(value: object) -> int | None:
    """A Series Number (IS) as an int, or None when it is absent or not a number the catalog can
    hold (IS ranges over 32-bit integers; ``inf``, ``nan``, ``1e300`` and words are None)."""
    if value is None or value == "":
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    if not math.isfinite(number) or not -(2**31) <= number < 2**31:
        return None
    return int(number)


class _InstanceEventIds(TypedDict):
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    accession_number: str | None


@dataclass(frozen=True)
class InstanceInfo:
    """What the catalog records of one received instance (read from its header, no pixels)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    size_bytes: int
    spool_path: str
    accession_number: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""

    def event_ids(self) -> _InstanceEventIds:
        """The identifiers an audit event about this instance carries."""
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "accession_number": self.accession_number or None,
        }


class RegistrationOutcome(enum.StrEnum):
    """What registering an instance did."""

    NEW = "new"  # a new instance of a series still receiving (or a new series)
    REOPENED = "reopened"  # a late instance: the series was complete or further, now received again
    DUPLICATE = "duplicate"  # the SOP Instance UID is already stored: nothing changed


@dataclass(frozen=True)
class Registration:
    """The outcome of :func:`register_instance`."""

    outcome: RegistrationOutcome
    series_id: int
    generation: int
    # for a duplicate: where the first copy is stored
    existing_spool_path: str | None = None


def register_instance(
    session: Session,
    info: InstanceInfo,
    *,
    association_id: int | None = None,
    now: dt.datetime | None = None,
) -> Registration:
    """Record one received instance and update its series: :func:`register_instances` of one.

    Parameters
    ----------
    session
        An open session; the caller commits.
    info
        The instance.
    association_id
        The association it came on (None: recovered from the spool at start-up).
    now
        The time of receipt; default now.

    Returns
    -------
    Registration
    """
    return register_instances(session, [Arrival(info, association_id, now or utcnow())])[0]


@dataclass(frozen=True)
class Arrival:
    """One instance to register: what it is, the association it came on (None: recovered from the
    spool at start-up) and when it was received."""

    info: InstanceInfo
    association_id: int | None
    received_at: dt.datetime


def register_instances(session: Session, arrivals: Sequence[Arrival]) -> list[Registration]:
    """Record received instances, in order, and update their series (one transaction's worth:
    the caller commits). The same as registering them one by one, in a handful of statements:
    one query for SOP Instance UIDs already stored, one for the series, one bulk insert.

    A new series starts in ``received``; an instance for a series that is complete or further
    re-opens it (generation + 1, back to ``received``; a queued job of the old generation is
    superseded). A SOP Instance UID already stored (or earlier in ``arrivals``) changes nothing
    (audited as a duplicate).

    Returns
    -------
    list[Registration]
        One per arrival, in order.
    """
    usual = _register_in_receiving_series(session, arrivals)
    if usual is not None:
        return usual
    uids = list({a.info.sop_instance_uid for a in arrivals})
    stored: dict[str, tuple[str, int, int]] = {}
    for start in range(0, len(uids), 500):
        for row in session.execute(
            select(Instance.sop_instance_uid, Instance.spool_path, Instance.series_id,
                   Series.generation)
            .join(Series, Series.id == Instance.series_id)
            .where(Instance.sop_instance_uid.in_(uids[start : start + 500]))
        ):  # fmt: skip
            stored[row[0]] = (row[1], row[2], row[3])
    series_uids = list({a.info.series_instance_uid for a in arrivals})
    series_by_uid = {
        s.series_instance_uid: s
        for s in session.scalars(select(Series).where(Series.series_instance_uid.in_(series_uids)))
    }
    rows: list[dict[str, object]] = []
    registrations: list[Registration] = []
    for arrival in arrivals:
        info, association_id, now = arrival.info, arrival.association_id, arrival.received_at
        existing = stored.get(info.sop_instance_uid)
        if existing is not None:
            add_event(
                session,
                "instance.duplicate",
                f"SOP Instance UID already stored, kept the first copy ({existing[0]})",
                level="warning",
                association_id=association_id,
                at=now,
                **info.event_ids(),
            )
            registrations.append(
                Registration(
                    RegistrationOutcome.DUPLICATE,
                    existing[1],
                    existing[2],
                    existing_spool_path=existing[0],
                )
            )
            continue
        series = series_by_uid.get(info.series_instance_uid)
        outcome = RegistrationOutcome.NEW
        if series is None:
            series = Series(
                series_instance_uid=info.series_instance_uid,
                study_instance_uid=info.study_instance_uid,
                accession_number=info.accession_number,
                modality=info.modality,
                series_number=info.series_number,
                series_description=info.series_description[:256],
                state=SeriesState.RECEIVED,
                generation=1,
                instance_count=0,
                first_instance_at=now,
                last_instance_at=now,
            )
            session.add(series)
            session.flush()
            series_by_uid[info.series_instance_uid] = series
            add_event(
                session,
                "series.first_instance",
                f"first instance of series {info.series_number or '?'} "
                f"{info.series_description!r} ({info.modality or 'no modality'})",
                association_id=association_id,
                at=now,  # (its row may be committed at the association's end)
                **info.event_ids(),
            )
        elif series.state != SeriesState.RECEIVED:
            outcome = RegistrationOutcome.REOPENED
            _reopen(session, series, f"late instance {info.sop_instance_uid}", association_id)
        series.instance_count += 1
        series.last_instance_at = now
        rows.append(_instance_row(arrival, series.id, series.generation))
        stored[info.sop_instance_uid] = (info.spool_path, series.id, series.generation)
        registrations.append(Registration(outcome, series.id, series.generation))
    if rows:
        session.execute(insert(Instance), rows)
    return registrations


def _instance_row(arrival: Arrival, series_id: int, generation: int) -> dict[str, object]:
    """The ``instances`` row of a new arrival in series ``series_id`` at ``generation``."""
    info = arrival.info
    return {
        "sop_instance_uid": info.sop_instance_uid,
        "sop_class_uid": info.sop_class_uid,
        "series_id": series_id,
        "transfer_syntax_uid": info.transfer_syntax_uid,
        "size_bytes": info.size_bytes,
        "spool_path": info.spool_path,
        "association_id": arrival.association_id,
        "received_at": arrival.received_at,
        "generation": generation,
    }


# the statements of the usual case, made once (SQLAlchemy then reuses their compiled form)
_ANY_STORED = select(Instance.id).where(
    Instance.sop_instance_uid.in_(bindparam("uids", expanding=True))
)
_SERIES_STATES = select(
    Series.series_instance_uid, Series.id, Series.state, Series.generation
).where(Series.series_instance_uid.in_(bindparam("uids", expanding=True)))
_COUNT_INSTANCES = (
    update(Series)
    .where(Series.id == bindparam("series"))
    .values(
        instance_count=Series.instance_count + bindparam("added"),
        last_instance_at=bindparam("last"),
    )
)
_INSERT_INSTANCES = insert(Instance.__table__)


def _register_in_receiving_series(
    session: Session, arrivals: Sequence[Arrival]
) -> list[Registration] | None:
    """:func:`register_instances` in the usual case, in four plain statements: every instance new
    (and once in ``arrivals``), every series known and receiving, so there is no event to write,
    no series to create or re-open. None, having written nothing, in any other case."""
    uids = [a.info.sop_instance_uid for a in arrivals]
    if not 0 < len(uids) <= 500 or len(set(uids)) != len(uids):
        return None
    connection = session.connection()
    if connection.execute(_ANY_STORED, {"uids": uids}).first() is not None:
        return None
    series = {
        row[0]: row[1:]
        for row in connection.execute(
            _SERIES_STATES, {"uids": list({a.info.series_instance_uid for a in arrivals})}
        )
    }
    rows: list[dict[str, object]] = []
    registrations: list[Registration] = []
    counts: dict[int, tuple[int, dt.datetime]] = {}
    for arrival in arrivals:
        info = arrival.info
        known = series.get(info.series_instance_uid)
        if known is None or known[1] != SeriesState.RECEIVED:
            return None
        series_id, generation = known[0], known[2]
        rows.append(_instance_row(arrival, series_id, generation))
        registrations.append(Registration(RegistrationOutcome.NEW, series_id, generation))
        counts[series_id] = (counts.get(series_id, (0, arrival.received_at))[0] + 1,
                             arrival.received_at)  # fmt: skip
    connection.execute(_INSERT_INSTANCES, rows)
    connection.execute(
        _COUNT_INSTANCES,
        [{"series": k, "added": n, "last": last} for k, (n, last) in counts.items()],
    )
    return registrations


def _reopen(session: Session, series: Series, why: str, association_id: int | None) -> None:
    previous = series.state
    series.generation += 1
    series.state = SeriesState.RECEIVED
    series.completed_at = None
    queued = session.scalars(
        select(Job).where(Job.series_id == series.id, Job.state == JobState.QUEUED)
    ).all()
    for job in queued:
        job.state = JobState.SUPERSEDED
        job.finished_at = utcnow()
        job.error = "series re-opened"
    superseded = len(queued)
    add_event(
        session,
        "series.reopened",
        f"re-opened ({why}): was {previous}, now generation {series.generation}"
        + (f"; {superseded} queued job(s) superseded" if superseded else ""),
        **_event_ids(series),
        association_id=association_id,
        data={"previous_state": previous, "generation": series.generation},
    )


def reopen_series(session: Session, series_instance_uid: str, why: str) -> int:
    """Re-open a series as a late instance would (generation + 1); returns the new generation.

    Raises
    ------
    KeyError
        If the series is not in the catalog.
    """
    series = session.scalar(select(Series).where(Series.series_instance_uid == series_instance_uid))
    if series is None:
        raise KeyError(f"series {series_instance_uid} is not in the catalog")
    if series.state != SeriesState.RECEIVED:
        _reopen(session, series, why, None)
        series.last_instance_at = utcnow()
    return series.generation


def complete_quiet_series(
    session: Session,
    quiet_seconds: float,
    *,
    now: dt.datetime | None = None,
    quiet_since: dt.datetime | None = None,
    receiving: Collection[str] = (),
) -> list[int]:
    """Mark complete every received series without a new instance for ``quiet_seconds``.

    Parameters
    ----------
    session
        An open session; the caller commits.
    quiet_seconds
        The quiet period.
    now
        The time of the check; default now.
    quiet_since
        The quiet clock of every series starts no earlier than this: the node passes the moment
        it came up, so a series still receiving when the node stopped (or was killed) gets a
        whole quiet period after the restart for the sender to go on or send it again, instead of
        completing at once with the instances that arrived before the crash.
    receiving
        Series Instance UIDs with instances received but not in the catalog yet (the ingest
        recorder's queue): not quiet, whatever their rows say.

    Returns
    -------
    list of int
        The ids of the series completed.
    """
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=quiet_seconds)
    if quiet_since is not None and quiet_since > cutoff:
        # max(last instance, quiet_since) <= cutoff cannot hold for any series yet
        return []
    quiet = [
        series
        for series in session.scalars(
            select(Series).where(
                Series.state == SeriesState.RECEIVED, Series.last_instance_at <= cutoff
            )
        )
        if series.series_instance_uid not in receiving
    ]
    for series in quiet:
        series.state = SeriesState.COMPLETE
        series.completed_at = now
        add_event(
            session,
            "series.complete",
            f"complete: {series.instance_count} instance(s), none for {quiet_seconds:g} s "
            f"(generation {series.generation})",
            **_event_ids(series),
            data={"instances": series.instance_count, "generation": series.generation},
        )
    return [s.id for s in quiet]


def restart_quiet_periods(session: Session, quiet_seconds: float) -> int:
    """Audit, for every series still receiving (a node stopped or killed while it arrived), that
    its quiet period starts again now; returns how many. The clock itself is the
    ``quiet_since`` of :func:`complete_quiet_series`."""
    receiving = session.scalars(
        select(Series).where(Series.state == SeriesState.RECEIVED).order_by(Series.id)
    ).all()
    for series in receiving:
        add_event(
            session,
            "series.quiet_restarted",
            f"still receiving when the node stopped ({series.instance_count} instance(s)): the "
            f"quiet period of {quiet_seconds:g} s starts again now",
            **_event_ids(series),
            data={"instances": series.instance_count, "generation": series.generation},
        )
    return len(receiving)


@dataclass(frozen=True)
class Selection:
    """What :func:`select_series` decided for one complete series."""

    series_id: int
    series_instance_uid: str
    state: SeriesState  # queued, rejected or failed; or the unchanged state if it moved on
    reason: str
    job_id: int | None = None


class _EventIds(TypedDict):
    study_instance_uid: str
    series_instance_uid: str
    accession_number: str | None


def _event_ids(series: Series) -> _EventIds:
    """The identifiers every audit event of a series carries."""
    return {
        "study_instance_uid": series.study_instance_uid,
        "series_instance_uid": series.series_instance_uid,
        "accession_number": series.accession_number or None,
    }


def load_series_group(paths: Sequence[str], label: str) -> SeriesGroup:
    """Read the headers of one series' spool files (no pixel data) into a :class:`SeriesGroup`.

    Raises
    ------
    InputError
        A spool file is missing, unreadable or not DICOM (names the file).
    ValueError
        If the files hold more or less than one series.
    """
    headers = [(path, read_header(path)) for path in paths]
    groups = group_by_series(headers)
    if len(groups) != 1:
        raise ValueError(f"{label}: the spool files hold {len(groups)} series, expected one")
    return groups[0]


def select_series(
    db: AuditDB, series_id: int, *, min_slices: int, accept_lossy: bool = False
) -> Selection:
    """Decide whether a complete series is run: queue a job, or reject it with the reason.

    The headers are read outside any transaction; the decision is written only if the series is
    still complete in the same generation (a late instance may have re-opened it meanwhile).

    Parameters
    ----------
    db
        The audit database.
    series_id
        A series in state ``complete``.
    min_slices
        Fewest slices a series needs (the engine's preprocessing spec).

    Returns
    -------
    Selection

    Raises
    ------
    AuditError
        The database cannot be read or written.
    """
    with db.session() as session:
        series = session.get(Series, series_id)
        if series is None or series.state != SeriesState.COMPLETE:
            now_state = SeriesState(series.state) if series is not None else SeriesState.REJECTED
            return Selection(series_id, "", now_state, "no longer complete")
        generation = series.generation
        series_uid = series.series_instance_uid
        paths = list(
            session.scalars(
                select(Instance.spool_path)
                .where(Instance.series_id == series_id)
                .order_by(Instance.id)
            ).all()
        )
    state: SeriesState
    try:
        group, left_out = split_off_non_slices(load_series_group(paths, f"series {series_uid}"))
        eligibility = classify_series(
            group.headers, min_slices=min_slices, accept_lossy=accept_lossy
        )
        state = SeriesState.QUEUED if eligibility.eligible else SeriesState.REJECTED
        reason = eligibility.reason
        if left_out:
            # the job leaves the same instances out (it splits the same headers the same way); a
            # rejected series names them too, they may be why too few slices are left
            reason += "; left out: " + "; ".join(
                f"{Path(s.what).name}, {s.reason.split(': left out')[0]}" for s in left_out
            )
    except (InputError, ValueError) as exc:
        state, reason = SeriesState.FAILED, f"cannot read the spooled instances: {exc}"
    with db.session() as session:
        series = session.get(Series, series_id)
        if (
            series is None
            or series.state != SeriesState.COMPLETE
            or (series.generation != generation)
        ):
            return Selection(
                series_id, series_uid, SeriesState(series.state if series else "rejected"),
                "re-opened while being selected",
            )  # fmt: skip
        series.state = state
        series.eligibility_reason = reason
        ids = _event_ids(series)
        job_id = None
        if state == SeriesState.QUEUED:
            job = Job(series_id=series_id, generation=generation, state=JobState.QUEUED)
            session.add(job)
            session.flush()
            job_id = job.id
            add_event(session, "series.selected", f"queued: {reason}", job_id=job_id, **ids)
        elif state == SeriesState.REJECTED:
            add_event(session, "series.rejected", f"skipped: {reason}", **ids)
        else:
            add_event(session, "series.failed", reason, level="error", **ids)
    return Selection(series_id, series_uid, state, reason, job_id)
