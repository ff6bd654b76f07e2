"""The audit database: SQLAlchemy models of every step from the first instance received to the
result stored at each destination, the event stream, and the queries behind ``status`` and
``audit tail|show``.

SQLite in the data folder by default (WAL, busy timeout, write transactions ``BEGIN IMMEDIATE``);
the types are portable, so the same models run on PostgreSQL. Every timestamp is UTC.

A SQLite connection opened while the file cannot be written is read-only for good (SQLite falls
back to read-only without a word); the pool replaces it once the file is writable again, or at
the latest when a write on it fails, so a database made read-only for a while recovers by itself.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    or_,
    select,
)
from sqlalchemy.engine import Engine, ExceptionContext, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from radnet_node.errors import RadnetError

__all__ = [
    "AuditDB",
    "AuditError",
    "Association",
    "Base",
    "Event",
    "EventView",
    "Export",
    "ExportState",
    "Instance",
    "Job",
    "JobState",
    "Result",
    "Series",
    "SeriesState",
    "SeriesStory",
    "StatusSummary",
    "Step",
    "StudyStory",
    "add_event",
    "dumps",
    "event_view",
    "sqlite_primary_code",
    "status_summary",
    "study_story",
    "tail_events",
    "utcnow",
]

_log = structlog.get_logger("radnet_node.audit")

UID = String(64)


class AuditError(RadnetError):
    """The audit database cannot be opened or written (names the database and the problem)."""


class SeriesState(enum.StrEnum):
    """received -> complete -> queued -> running -> done | failed | rejected; a late instance
    re-opens a series (back to received, generation + 1)."""

    RECEIVED = "received"
    COMPLETE = "complete"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"


class JobState(enum.StrEnum):
    """queued -> running -> done | failed; a crash or shutdown puts running back to queued; a job
    whose series was re-opened before or while it ran is superseded (its result is not sent)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class ExportState(enum.StrEnum):
    """pending -> sending -> delivered | pending (retry) | dead; superseded by a newer result."""

    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    DEAD = "dead"
    SUPERSEDED = "superseded"


def utcnow() -> dt.datetime:
    """Now, UTC, without tzinfo (how every timestamp is stored, portable across databases)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    """Declarative base of the audit models."""

    type_annotation_map = {dict[str, Any]: JSON, dt.datetime: DateTime()}


class Association(Base):
    """One incoming association, accepted or rejected."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    ended_at: Mapped[dt.datetime | None]
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    called_ae_title: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    accepted: Mapped[bool] = mapped_column(Boolean)
    reject_reason: Mapped[str | None] = mapped_column(Text)
    instances_received: Mapped[int] = mapped_column(Integer, default=0)
    end_reason: Mapped[str | None] = mapped_column(String(32))


class Series(Base):
    """A series in the catalog, with its state and the time of each step."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    accession_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None]
    series_description: Mapped[str] = mapped_column(String(256), default="")
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVED, index=True)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_instance_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_instance_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    completed_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    eligibility_reason: Mapped[str | None] = mapped_column(Text)


class Instance(Base):
    """One stored instance: where its bytes are in the spool and how they came."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    size_bytes: Mapped[int] = mapped_column(Integer)
    spool_path: Mapped[str] = mapped_column(Text)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    generation: Mapped[int] = mapped_column(Integer, default=1)


class Job(Base):
    """One run of one series generation through the engine."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    timings_ms: Mapped[dict[str, Any] | None]


class Result(Base):
    """What a job produced: the output UIDs, the folder, and the hash of what would be sent."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    content_hash: Mapped[str] = mapped_column(String(64))
    ct_positive: Mapped[bool] = mapped_column(Boolean)
    certainty: Mapped[float] = mapped_column(Float)
    hemorrhage_volume_ml: Mapped[float | None] = mapped_column(Float)
    sr_sop_instance_uid: Mapped[str] = mapped_column(UID)
    seg_sop_instance_uid: Mapped[str] = mapped_column(UID)
    key_image_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    result_dir: Mapped[str] = mapped_column(Text)
    result_json: Mapped[str] = mapped_column(Text)
    # the same content as the last result already sent for this series: not sent again
    unchanged: Mapped[bool] = mapped_column(Boolean, default=False)


class Export(Base):
    """Delivery of one result to one destination, with its retries."""

    __tablename__ = "exports"
    __table_args__ = (UniqueConstraint("result_id", "destination"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), default=ExportState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    last_status: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    delivered_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Event(Base):
    """The audit stream: one row per thing that happened, with the identifiers it concerns."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    level: Mapped[str] = mapped_column(String(8), default="info")
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    association_id: Mapped[int | None]
    job_id: Mapped[int | None]
    export_id: Mapped[int | None]
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]


_LEVELS = ("debug", "info", "warning", "error")


def add_event(
    session: Session,
    kind: str,
    message: str,
    *,
    level: str = "info",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    accession_number: str | None = None,
    association_id: int | None = None,
    job_id: int | None = None,
    export_id: int | None = None,
    data: Mapping[str, Any] | None = None,
    at: dt.datetime | None = None,
) -> Event:
    """Add an audit event to ``session`` (committed with it) and write it to the process log;
    ``at``: when it happened (UTC, as :func:`utcnow`), where that is before now (default: now).

    Raises
    ------
    ValueError
        If ``level`` is not debug, info, warning or error.
    """
    if level not in _LEVELS:
        raise ValueError(f"event level {level!r} is not one of {', '.join(_LEVELS)}")
    row = Event(
        at=at or utcnow(),
        kind=kind,
        level=level,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        accession_number=accession_number,
        association_id=association_id,
        job_id=job_id,
        export_id=export_id,
        message=message,
        data=dict(data) if data else None,
    )
    session.add(row)
    ids = {
        k: v
        for k, v in (
            ("study_uid", study_instance_uid),
            ("series_uid", series_instance_uid),
            ("sop_uid", sop_instance_uid),
            ("association_id", association_id),
            ("job_id", job_id),
            ("export_id", export_id),
        )
        if v is not None
    }
    getattr(_log, level)(message, event_kind=kind, **ids, **(dict(data) if data else {}))
    return row


# SQLITE_READONLY, "attempt to write a readonly database"; its extended codes (_RECOVERY, _CANTLOCK,
# _ROLLBACK, _DBMOVED, _CANTINIT, _DIRECTORY) keep it in their low byte
_SQLITE_READONLY = 8
# pool record info key: the connection was opened while the database file was not writable
_OPENED_READ_ONLY = "radnet_opened_read_only"


def sqlite_primary_code(error: BaseException | None) -> int | None:
    """SQLite's primary result code of a ``sqlite3`` error (an extended code keeps it in its low
    byte: SQLITE_READONLY_DBMOVED is SQLITE_READONLY), or None for any other error."""
    code = getattr(error, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _is_sqlite_read_only(error: BaseException) -> bool:
    """Whether ``error`` is SQLite refusing a write because its connection or file is read-only."""
    if not isinstance(error, sqlite3.Error):
        return False
    code = sqlite_primary_code(error)
    if code is not None:
        return code == _SQLITE_READONLY
    return "readonly database" in str(error)  # raised without a code (by a test, say)


def _writable(path: Path) -> bool:
    """Whether this process may open ``path`` for writing now: what SQLite's open decides by (the
    file's mode for the effective user, or a read-only mount; root may always)."""
    return os.access(path, os.W_OK, effective_ids=os.access in os.supports_effective_ids)


class AuditDB:
    """The audit database: an engine, sessions, and the schema created on first use.

    Parameters
    ----------
    url
        SQLAlchemy URL (``sqlite:////abs/path/audit.sqlite``, ``postgresql+psycopg://...``).
    create
        Create missing tables (the node does; the read-only CLI commands do not).

    Raises
    ------
    AuditError
        The URL is malformed or the database cannot be opened; names the database.
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise AuditError(f"audit database {url!r}: not a database URL ({exc})") from None
        self.url = parsed
        self.is_sqlite = parsed.drivername.startswith("sqlite")
        self.label = parsed.render_as_string(hide_password=True)
        # the database file, when it is a plain file (not in memory, not a ``file:`` URI)
        self._sqlite_path: Path | None = None
        if self.is_sqlite and parsed.database and parsed.database != ":memory:":
            path = Path(parsed.database)
            if not parsed.query.get("uri"):
                self._sqlite_path = path
            if not create and not path.exists():
                raise AuditError(f"audit database {path}: no such file (has the node run yet?)")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise AuditError(
                    f"audit database {path}: cannot create its folder ({exc.strerror or exc})"
                ) from exc
        self.engine: Engine = self._create_engine()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if create:
            try:
                Base.metadata.create_all(self.engine)
            except SQLAlchemyError as exc:
                raise AuditError(
                    f"audit database {self.label}: cannot create the tables ({exc})"
                ) from exc

    def _create_engine(self) -> Engine:
        if not self.is_sqlite:
            return create_engine(self.url, pool_pre_ping=True)
        engine = create_engine(self.url, connect_args={"check_same_thread": False, "timeout": 30.0})
        path = self._sqlite_path

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, record: Any) -> None:
            # sqlite3_open_v2(READWRITE) opens a file it may not write read-only, silently, and
            # the connection stays read-only after the file is writable again: note it (checkout)
            if path is not None and not _writable(path):
                record.info[_OPENED_READ_ONLY] = True
            # take transactions into our own hands (see _on_begin)
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            # WAL + NORMAL: a commit survives a process crash (kill -9); only a power loss may
            # lose the last commits, and the spool files are fsynced before their rows
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Any) -> None:
            # a deferred transaction that reads and then writes fails at once with SQLITE_BUSY
            # when another connection wrote in between; IMMEDIATE waits for the lock instead
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        @event.listens_for(engine, "checkout")
        def _on_checkout(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
            # a connection opened read-only while the file could not be written: once it can, the
            # pool opens a fresh one in its place (what DisconnectionError here asks of it), so
            # the first transaction after that already writes; while the file is still read-only
            # it is kept for reading
            if path is not None and record.info.get(_OPENED_READ_ONLY) and _writable(path):
                raise DisconnectionError("opened while the database file was read-only")

        @event.listens_for(engine, "handle_error")
        def _on_error(context: ExceptionContext) -> None:
            # a write refused as read-only: the connection may be one _on_connect could not tell
            # (the file's mode changed between SQLite's open and our look, or the file was
            # replaced); discard it like a lost connection, so the next checkout opens the file
            # afresh instead of failing on it for as long as the process runs
            if _is_sqlite_read_only(context.original_exception):
                context.is_disconnect = True
                # only this one: the others may be writable (the mode counts at open only), and
                # closing the last of them deletes the WAL, which a connection opened while the
                # file is read-only re-creates read-only too, so that none could write again
                context.invalidate_pool_on_disconnect = False

        return engine

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error.

        Raises
        ------
        AuditError
            A database error, naming the database (the original error is chained).
        """
        session = self._sessions()
        try:
            yield session
            session.commit()
        except SQLAlchemyError as exc:
            session.rollback()
            raise AuditError(f"audit database {self.label}: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


# ------------------------------------------------------------------------------------------------
# read models and queries


@dataclass(frozen=True)
class EventView:
    """One audit event, as ``audit tail`` prints it."""

    id: int
    at: dt.datetime
    kind: str
    level: str
    message: str
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    accession_number: str | None = None
    association_id: int | None = None
    job_id: int | None = None
    export_id: int | None = None
    data: Mapping[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the timestamp in ISO 8601 with a ``Z``; empty identifiers left out."""
        out: dict[str, Any] = {"id": self.id, "at": _iso(self.at), "kind": self.kind}
        out.update({"level": self.level, "message": self.message})
        for key in (
            "study_instance_uid",
            "series_instance_uid",
            "sop_instance_uid",
            "accession_number",
            "association_id",
            "job_id",
            "export_id",
        ):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.data:
            out["data"] = dict(self.data)
        return out

    def line(self) -> str:
        """One human-readable line."""
        ids = " ".join(
            f"{name}={value}"
            for name, value in (
                ("series", self.series_instance_uid),
                ("job", self.job_id),
                ("export", self.export_id),
                ("assoc", self.association_id),
            )
            if value is not None
        )
        return f"{_iso(self.at)} {self.level.upper():7} {self.kind:24} {self.message}" + (
            f"  [{ids}]" if ids else ""
        )


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.isoformat(timespec="milliseconds") + "Z"


def event_view(row: Event) -> EventView:
    """The read model of an event row."""
    return EventView(
        id=row.id,
        at=row.at,
        kind=row.kind,
        level=row.level,
        message=row.message,
        study_instance_uid=row.study_instance_uid,
        series_instance_uid=row.series_instance_uid,
        sop_instance_uid=row.sop_instance_uid,
        accession_number=row.accession_number,
        association_id=row.association_id,
        job_id=row.job_id,
        export_id=row.export_id,
        data=row.data,
    )


def tail_events(
    session: Session, *, after_id: int | None = None, limit: int = 20
) -> list[EventView]:
    """Events in order: the last ``limit`` (``after_id`` None), or every one after ``after_id``
    (up to ``limit``) for following the stream."""
    if after_id is None:
        rows = session.scalars(select(Event).order_by(Event.id.desc()).limit(limit)).all()
        return [event_view(r) for r in reversed(rows)]
    rows = session.scalars(
        select(Event).where(Event.id > after_id).order_by(Event.id).limit(limit)
    ).all()
    return [event_view(r) for r in rows]


@dataclass(frozen=True)
class Step:
    """One step of a series' story: when it ended and how long it took since the step before."""

    name: str
    at: dt.datetime
    seconds_since_previous: float | None

    def as_dict(self) -> dict[str, Any]:
        seconds = self.seconds_since_previous
        return {
            "step": self.name,
            "at": _iso(self.at),
            "seconds": None if seconds is None else round(seconds, 3),
        }


@dataclass(frozen=True)
class SeriesStory:
    """One series from its first instance to its result stored at every destination."""

    series_instance_uid: str
    series_number: int | None
    series_description: str
    modality: str
    state: str
    generation: int
    instance_count: int
    eligibility_reason: str | None
    steps: tuple[Step, ...]
    results: tuple[dict[str, Any], ...]
    exports: tuple[dict[str, Any], ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "series_instance_uid": self.series_instance_uid,
            "series_number": self.series_number,
            "series_description": self.series_description,
            "modality": self.modality,
            "state": self.state,
            "generation": self.generation,
            "instance_count": self.instance_count,
            "eligibility_reason": self.eligibility_reason,
            "steps": [s.as_dict() for s in self.steps],
            "results": list(self.results),
            "exports": list(self.exports),
        }


@dataclass(frozen=True)
class StudyStory:
    """Everything the audit knows about one study (or the studies matching an accession)."""

    query: str
    study_instance_uids: tuple[str, ...]
    accession_numbers: tuple[str, ...]
    series: tuple[SeriesStory, ...]
    events: tuple[EventView, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "study_instance_uids": list(self.study_instance_uids),
            "accession_numbers": list(self.accession_numbers),
            "series": [s.as_dict() for s in self.series],
            "events": [e.as_dict() for e in self.events],
        }


def _steps(named: Sequence[tuple[str, dt.datetime | None]]) -> tuple[Step, ...]:
    steps: list[Step] = []
    previous: dt.datetime | None = None
    for name, at in named:
        if at is None:
            continue
        since = None if previous is None else (at - previous).total_seconds()
        steps.append(Step(name, at, since))
        previous = at
    return tuple(steps)


def study_story(session: Session, query: str) -> StudyStory | None:
    """The story of the study named by ``query``: a Study, Series or SOP Instance UID (of a
    received instance or of an SR, SEG or key image the node made), or an Accession Number (every
    study with it).

    Per series: the steps first instance, last instance, complete, queued, running, done, and
    delivered at each destination, with the seconds each took (of its latest job); every job's
    result and every export; and every event of the study.

    Returns
    -------
    StudyStory or None
        None when nothing matches.
    """
    text = query.strip()
    if not text:
        return None  # not "every study without an accession number"
    studies = set(
        session.scalars(
            select(Series.study_instance_uid).where(
                or_(
                    Series.study_instance_uid == text,
                    Series.series_instance_uid == text,
                    Series.accession_number == text,
                )
            )
        ).all()
    )
    instance_study = session.scalar(
        select(Series.study_instance_uid)
        .join(Instance, Instance.series_id == Series.id)
        .where(Instance.sop_instance_uid == text)
    )
    if instance_study:
        studies.add(instance_study)
    # the node's own objects: a PACS user holding an SR, SEG or key image can trace it back
    output_study = session.scalar(
        select(Series.study_instance_uid)
        .join(Result, Result.series_id == Series.id)
        .where(
            or_(
                Result.sr_sop_instance_uid == text,
                Result.seg_sop_instance_uid == text,
                Result.key_image_sop_instance_uid == text,
            )
        )
        .limit(1)
    )
    if output_study:
        studies.add(output_study)
    # a study known only from audit rows: every instance of it refused, say
    matching_events = or_(
        Event.study_instance_uid == text,
        Event.series_instance_uid == text,
        Event.sop_instance_uid == text,
        Event.accession_number == text,
    )
    if not studies:
        studies.update(
            uid
            for uid in session.scalars(
                select(Event.study_instance_uid).where(matching_events).distinct()
            )
            if uid
        )
    if not studies:
        events = session.scalars(select(Event).where(matching_events).order_by(Event.id)).all()
        if not events:
            return None
        return StudyStory(  # not even a valid Study Instance UID is known
            query=text,
            study_instance_uids=(),
            accession_numbers=tuple(
                sorted({e.accession_number for e in events if e.accession_number})
            ),
            series=(),
            events=tuple(event_view(e) for e in events),
        )
    series_rows = session.scalars(
        select(Series)
        .where(Series.study_instance_uid.in_(studies))
        .order_by(Series.study_instance_uid, Series.series_number, Series.id)
    ).all()
    stories = []
    for series in series_rows:
        jobs = session.scalars(select(Job).where(Job.series_id == series.id).order_by(Job.id)).all()
        results = session.scalars(
            select(Result).where(Result.series_id == series.id).order_by(Result.id)
        ).all()
        exports = session.scalars(
            select(Export)
            .join(Result, Result.id == Export.result_id)
            .where(Result.series_id == series.id)
            .order_by(Export.id)
        ).all()
        latest = jobs[-1] if jobs else None
        latest_result = next(
            (r for r in reversed(results) if latest is not None and r.job_id == latest.id), None
        )
        named: list[tuple[str, dt.datetime | None]] = [
            ("first instance", series.first_instance_at),
            ("last instance", series.last_instance_at),
            ("complete", series.completed_at),
        ]
        if latest is not None:
            named += [
                ("queued", latest.created_at),
                ("running", latest.started_at),
                ("result written", latest_result.created_at if latest_result else None),
                (f"job {latest.state}", latest.finished_at),
            ]
            if latest_result is not None:
                named += [
                    (f"stored at {e.destination}", e.delivered_at)
                    for e in exports
                    if e.result_id == latest_result.id
                ]
        stories.append(
            SeriesStory(
                series_instance_uid=series.series_instance_uid,
                series_number=series.series_number,
                series_description=series.series_description,
                modality=series.modality,
                state=series.state,
                generation=series.generation,
                instance_count=series.instance_count,
                eligibility_reason=series.eligibility_reason,
                steps=_steps(named),
                results=tuple(
                    {
                        "result_id": r.id,
                        "job_id": r.job_id,
                        "generation": r.generation,
                        "at": _iso(r.created_at),
                        "ct_positive": r.ct_positive,
                        "certainty": r.certainty,
                        "hemorrhage_volume_ml": r.hemorrhage_volume_ml,
                        "unchanged": r.unchanged,
                        "content_hash": r.content_hash,
                        "sr_sop_instance_uid": r.sr_sop_instance_uid,
                        "seg_sop_instance_uid": r.seg_sop_instance_uid,
                        "key_image_sop_instance_uid": r.key_image_sop_instance_uid,
                        "result_dir": r.result_dir,
                        "timings_ms": next((j.timings_ms for j in jobs if j.id == r.job_id), None),
                    }
                    for r in results
                ),
                exports=tuple(_export_dict(e) for e in exports),
            )
        )
    events = session.scalars(
        select(Event).where(Event.study_instance_uid.in_(studies)).order_by(Event.id)
    ).all()
    accessions = sorted(
        {s.accession_number for s in series_rows if s.accession_number}
        | {e.accession_number for e in events if e.accession_number}
    )
    return StudyStory(
        query=text,
        study_instance_uids=tuple(sorted(studies)),
        accession_numbers=tuple(accessions),
        series=tuple(stories),
        events=tuple(event_view(e) for e in events),
    )


def _export_dict(row: Export) -> dict[str, Any]:
    return {
        "export_id": row.id,
        "result_id": row.result_id,
        "destination": row.destination,
        "state": row.state,
        "attempts": row.attempts,
        "next_attempt_at": _iso(row.next_attempt_at),
        "last_status": None if row.last_status is None else f"0x{row.last_status:04X}",
        "last_error": row.last_error,
        "delivered_at": _iso(row.delivered_at),
    }


@dataclass(frozen=True)
class StatusSummary:
    """What ``radnet-node status`` shows from the database."""

    series_by_state: Mapping[str, int]
    jobs_by_state: Mapping[str, int]
    exports_by_state: Mapping[str, int]
    last_results: tuple[dict[str, Any], ...]
    dead_exports: tuple[dict[str, Any], ...]
    last_event_at: dt.datetime | None
    #: the last failed jobs and series not run (rejected), newest first, with the reason
    last_problems: tuple[dict[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "series_by_state": dict(self.series_by_state),
            "jobs_by_state": dict(self.jobs_by_state),
            "exports_by_state": dict(self.exports_by_state),
            "last_results": list(self.last_results),
            "last_problems": list(self.last_problems),
            "dead_exports": list(self.dead_exports),
            "last_event_at": _iso(self.last_event_at),
        }


def status_summary(session: Session, *, last: int = 5) -> StatusSummary:
    """Counts per state, the last ``last`` results, the last ``last`` problems (failed jobs and
    rejected series, with the reason) and every dead-lettered export."""

    def counts(column: Any) -> dict[str, int]:
        rows = session.execute(select(column, func.count()).group_by(column)).all()
        return {str(state): int(n) for state, n in rows}

    recent = session.execute(
        select(Result, Series, Job.state)
        .join(Series, Series.id == Result.series_id)
        .join(Job, Job.id == Result.job_id)
        .order_by(Result.id.desc())
        .limit(last)
    ).all()
    dead = session.execute(
        select(Export, Series)
        .join(Result, Result.id == Export.result_id)
        .join(Series, Series.id == Result.series_id)
        .where(Export.state == ExportState.DEAD)
        .order_by(Export.id)
    ).all()
    failed = session.execute(
        select(Job, Series)
        .join(Series, Series.id == Job.series_id)
        .where(Job.state == JobState.FAILED)
        .order_by(Job.id.desc())
        .limit(last)
    ).all()
    rejected = session.scalars(
        select(Series)
        .where(Series.state == SeriesState.REJECTED)
        .order_by(Series.updated_at.desc())
        .limit(last)
    ).all()
    problems = [
        {
            "at": _iso(job.finished_at or job.created_at),
            "what": f"job {job.id} failed",
            "series_instance_uid": series.series_instance_uid,
            "accession_number": series.accession_number,
            "reason": job.error or "",
        }
        for job, series in failed
    ] + [
        {
            "at": _iso(series.updated_at),
            "what": "series not run",
            "series_instance_uid": series.series_instance_uid,
            "accession_number": series.accession_number,
            "reason": series.eligibility_reason or "",
        }
        for series in rejected
    ]
    problems.sort(key=lambda p: p["at"] or "", reverse=True)
    return StatusSummary(
        series_by_state=counts(Series.state),
        jobs_by_state=counts(Job.state),
        exports_by_state=counts(Export.state),
        last_results=tuple(
            {
                "result_id": r.id,
                "at": _iso(r.created_at),
                "series_instance_uid": s.series_instance_uid,
                "accession_number": s.accession_number,
                "ct_positive": r.ct_positive,
                "certainty": round(r.certainty, 4),
                "unchanged": r.unchanged,
                # its series was re-opened while it ran: kept in the results folder, not sent
                "superseded": job_state == JobState.SUPERSEDED,
            }
            for r, s, job_state in recent
        ),
        dead_exports=tuple(
            {**_export_dict(e), "series_instance_uid": s.series_instance_uid} for e, s in dead
        ),
        last_event_at=session.scalar(select(func.max(Event.at))),
        last_problems=tuple(problems[:last]),
    )


def dumps(value: Any) -> str:
    """JSON text of a read model's ``as_dict()`` (one line)."""
    return json.dumps(value, separators=(",", ":"), default=str)
