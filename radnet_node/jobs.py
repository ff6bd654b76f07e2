"""The job queue: complete series are selected, queued jobs are handed to the engine in batches,
results are written to ``data_dir/results`` and queued for export; and crash recovery, which puts
every unfinished step back on its way from the database and the spool at start-up.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from radnet_node.audit import (
    Association,
    AuditDB,
    AuditError,
    Export,
    ExportState,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    SeriesState,
    add_event,
    sqlite_primary_code,
    utcnow,
)
from radnet_node.catalog import (
    InstanceInfo,
    is_safe_uid,
    load_series_group,
    register_instance,
    select_series,
    series_number_of,
)
from radnet_node.config import Settings
from radnet_node.dicom_out import NodeIdentity, output_uids
from radnet_node.engine import Engine, LoadedSeries
from radnet_node.errors import InputError, RadnetError
from radnet_node.infer import (
    OUTPUT_FILES,
    SeriesOutputs,
    build_series_outputs,
    content_hash,
    write_series_folder,
)
from radnet_node.logging import bound
from radnet_node.results import SeriesResult
from radnet_node.series import SeriesGroup, read_header, split_off_non_slices

__all__ = [
    "OUTPUT_FILES",
    "Recovery",
    "SeriesOutputs",
    "Worker",
    "build_series_outputs",
    "content_hash",
    "park_running_jobs",
    "recover",
]

_log = structlog.get_logger("radnet_node.jobs")

# a job whose result (or failure) the audit database could not record runs again after this many
# seconds, doubled at each failure in a row up to the maximum
_DB_RETRY_FIRST_SECONDS = 2.0
_DB_RETRY_MAX_SECONDS = 60.0
#: database failures in a row after which a job whose failure can be recorded is failed after all
#: (about 20 minutes of backoff: a safety net for an error that only looks transient)
_DB_RETRY_LIMIT = 24
# SQLite's primary result codes of a database that is unavailable for now, not of a wrong
# statement: BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN (SQLITE_ERROR, 1, is a missing
# table or column, a syntax error: the same at every try)
_SQLITE_TRANSIENT = frozenset({5, 6, 8, 10, 13, 14})


def _database_failed(error: BaseException) -> bool:
    """Whether ``error`` is the audit database failing (locked, read-only, full, I/O error, lost
    connection, pool exhausted) rather than the series or the engine.

    An :class:`AuditError` chains the SQLAlchemy error it wraps; a constraint or programming error
    (a bug in the node, the same at every try) does not count, nor does a SQLite error whose
    result code says the statement itself is wrong (SQLite reports those as OperationalError too).
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, DBAPIError) and seen.connection_invalidated:
            return True
        if isinstance(seen, (OperationalError, InterfaceError, PoolTimeoutError)):
            code = sqlite_primary_code(getattr(seen, "orig", None))
            return code is None or code in _SQLITE_TRANSIENT
        seen = seen.__cause__
    return False


@dataclass(frozen=True)
class _Claimed:
    job_id: int
    series_id: int
    series_instance_uid: str
    study_instance_uid: str
    accession_number: str
    generation: int
    paths: tuple[str, ...]

    @property
    def ids(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "accession_number": self.accession_number or None,
            "job_id": self.job_id,
        }


@dataclass
class _Prepared:
    claimed: _Claimed
    group: SeriesGroup
    loaded: LoadedSeries
    started: float = field(default_factory=time.perf_counter)


class Worker:
    """Selects complete series and runs queued jobs, one batch at a time (one thread).

    Parameters
    ----------
    db
        The audit database.
    engine
        The loaded engine (kept warm).
    settings
        The node's settings (results folder, destinations, batch size).
    identity
        The node as its DICOM objects name it.
    on_exports_queued
        Called after exports were committed (wakes the exporters).
    clock
        Monotonic seconds, for the retry backoff (tests move it).

    A job whose result or failure the audit database cannot record is not failed: it goes back
    to ``queued`` and runs again after a backoff (in memory: a restart runs it at once); if the
    database cannot even record that, it stays ``running`` there and is put back at a later step,
    or by the start-up recovery.
    """

    def __init__(
        self,
        db: AuditDB,
        engine: Engine,
        settings: Settings,
        identity: NodeIdentity,
        on_exports_queued: Callable[[], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.on_exports_queued = on_exports_queued
        self.engine = engine
        self.settings = settings
        self.identity = identity
        self.results_dir = settings.node.data_dir / "results"
        self.destinations = tuple(d.name for d in settings.destinations)
        self.clock = clock
        # job id -> (database failures in a row, when it may run again): worker thread only
        self._retry: dict[int, tuple[int, float]] = {}
        # jobs the database could not put back to queued (still running there)
        self._not_requeued: dict[int, _Claimed] = {}

    # ---------------------------------------------------------------------------------------
    def select_complete(self) -> int:
        """Select every complete series (queue it or reject it); returns how many."""
        with self.db.session() as session:
            ids = session.scalars(
                select(Series.id).where(Series.state == SeriesState.COMPLETE).order_by(Series.id)
            ).all()
        for series_id in ids:
            select_series(
                self.db,
                series_id,
                min_slices=self.engine.spec.min_slices,
                accept_lossy=self.settings.series.accept_lossy,
            )
        return len(ids)

    def _claim(self) -> list[_Claimed]:
        claimed: list[_Claimed] = []
        now = self.clock()
        waiting = [job_id for job_id, (_, at) in self._retry.items() if at > now]
        query = select(Job).where(Job.state == JobState.QUEUED)
        if waiting:
            query = query.where(Job.id.not_in(waiting))
        with self.db.session() as session:
            jobs = session.scalars(
                query.order_by(Job.id).limit(self.settings.series.max_batch_series)
            ).all()
            for job in jobs:
                series = session.get(Series, job.series_id)
                if series is None or series.generation != job.generation:
                    self._retry.pop(job.id, None)
                    job.state = JobState.SUPERSEDED
                    job.finished_at = utcnow()
                    job.error = "series re-opened before the job ran"
                    continue
                job.state = JobState.RUNNING
                job.started_at = utcnow()
                job.attempts += 1
                series.state = SeriesState.RUNNING
                paths = session.scalars(
                    select(Instance.spool_path)
                    .where(Instance.series_id == series.id)
                    .order_by(Instance.id)
                ).all()
                item = _Claimed(
                    job.id,
                    series.id,
                    series.series_instance_uid,
                    series.study_instance_uid,
                    series.accession_number,
                    job.generation,
                    tuple(paths),
                )
                add_event(
                    session,
                    "job.running",
                    f"running: {len(paths)} instance(s) received, attempt {job.attempts}",
                    **item.ids,
                )
                claimed.append(item)
        return claimed

    def run_batch(self) -> int:
        """Claim up to ``series.max_batch_series`` queued jobs and run them in one engine call.

        A series that cannot be read fails alone; if the batch call fails, each series is run
        on its own so one bad series does not fail the others. A failure of the audit database
        fails no job: it runs again later. Returns the number of jobs claimed.

        Raises
        ------
        AuditError
            The queued jobs cannot be claimed (nothing was run; tried again at the next step).
        """
        self._requeue_left_running()
        claimed = self._claim()
        if not claimed:
            return 0
        prepared: list[_Prepared] = []
        for item in claimed:
            with bound(series_uid=item.series_instance_uid, job_id=item.job_id):
                try:
                    started = time.perf_counter()
                    group, _ = split_off_non_slices(
                        load_series_group(item.paths, f"series {item.series_instance_uid}")
                    )  # what select_series left out (and audited)
                    loaded = self.engine.load(group.paths, series_label=group.label)
                    prepared.append(_Prepared(item, group, loaded, started))
                except (RadnetError, ValueError) as exc:
                    self._fail(item, str(exc), exc)
                except Exception as exc:  # noqa: BLE001 - a bug in one series must not stop the node
                    self._fail(item, f"internal error: {type(exc).__name__}: {exc}", exc)
        if not prepared:
            return len(claimed)
        try:
            results = self.engine.run([p.loaded for p in prepared])
        except Exception as exc:  # noqa: BLE001 - retried one by one below, errors recorded there
            if len(prepared) == 1:
                self._fail(
                    prepared[0].claimed, f"inference failed: {type(exc).__name__}: {exc}", exc
                )
                return len(claimed)
            _log.warning("batch failed, running its series one by one", error=str(exc))
            for one in prepared:
                try:
                    result = self.engine.run([one.loaded])[0]
                except Exception as single:  # noqa: BLE001 - recorded as this job's failure
                    self._fail(
                        one.claimed, f"inference failed: {type(single).__name__}: {single}", single
                    )
                    continue
                self._record(one, result)
            return len(claimed)
        for one, result in zip(prepared, results, strict=True):
            self._record(one, result)
        return len(claimed)

    def step(self) -> bool:
        """Select complete series, then run one batch; whether anything was done."""
        return bool(self.select_complete()) | bool(self.run_batch())

    # ---------------------------------------------------------------------------------------
    def _record(self, item: _Prepared, result: SeriesResult) -> None:
        """Write the result and record the job done (or why it failed)."""
        try:
            self._finish(item, result)
        except Exception as exc:  # noqa: BLE001 - recorded as this job's failure (or run again)
            self._fail(item.claimed, f"{type(exc).__name__}: {exc}", exc)
            return
        self._retry.pop(item.claimed.job_id, None)

    def _finish(self, item: _Prepared, result: SeriesResult) -> None:
        claimed = item.claimed
        write_start = time.perf_counter()
        timings = dict(result.timings_ms)
        previous_sr = self._previous_sr(claimed, result)
        outputs = build_series_outputs(
            result,
            item.loaded,
            item.group,
            self.identity,
            runtime=self.engine.describe(),
            timings_ms=timings,
            previous_sr=previous_sr,
        )
        folder = self.results_dir / claimed.series_instance_uid
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(folder, f"cannot create the results folder: {exc}") from exc
        final = write_series_folder(folder, f"job-{claimed.job_id}", outputs.files)
        timings["write"] = (time.perf_counter() - write_start) * 1000.0
        timings["total"] = (time.perf_counter() - item.started) * 1000.0
        volume = float(result.hemorrhage_volume_ml)
        with self.db.session() as session:
            job = session.get(Job, claimed.job_id)
            series = session.get(Series, claimed.series_id)
            assert job is not None and series is not None  # rows are never deleted
            if job.state != JobState.RUNNING:
                # parked by a shutdown that did not wait for us: the next start runs it again
                _log.warning("result discarded: the job was parked", job_id=job.id)
                return
            now = utcnow()
            job.finished_at = now
            job.timings_ms = {k: round(float(v), 1) for k, v in timings.items()}
            superseded = series.generation != claimed.generation
            row = Result(
                job_id=job.id,
                series_id=series.id,
                generation=claimed.generation,
                created_at=now,
                content_hash=outputs.content_hash,
                ct_positive=bool(result.ct_positive),
                certainty=float(result.certainty),
                hemorrhage_volume_ml=volume if math.isfinite(volume) else None,
                sr_sop_instance_uid=outputs.output_uids["sr"],
                seg_sop_instance_uid=outputs.output_uids["seg"],
                key_image_sop_instance_uid=outputs.output_uids.get("key_image"),
                result_dir=str(final),
                result_json=json.dumps(outputs.document),
            )
            session.add(row)
            session.flush()
            decision = "PRESENT" if result.ct_positive else "absent"
            summary = (
                f"hemorrhage {decision}, certainty {result.certainty:.2f}, "
                f"{len(result.positive_slice_indices)}/{len(result.slice_probabilities)} slices "
                f"positive, {timings['total'] / 1000.0:.2f} s"
            )
            if superseded:
                job.state = JobState.SUPERSEDED
                job.error = "series re-opened while the job ran; its result is not sent"
                add_event(
                    session,
                    "job.superseded",
                    f"{summary}; not sent: the series was re-opened (generation "
                    f"{series.generation}) while it ran",
                    level="warning",
                    **claimed.ids,
                )
                return
            job.state = JobState.DONE
            series.state = SeriesState.DONE
            data: dict[str, Any] = {"timings_ms": job.timings_ms, "result_dir": str(final)}
            if previous_sr is not None:
                replaced = str(previous_sr.SOPInstanceUID)
                summary += f"; its SR {outputs.output_uids['sr']} replaces SR {replaced}"
                data["replaces_sr"] = replaced
            add_event(session, "job.done", summary, data=data, **claimed.ids)
            problems = outputs.document["source_value_problems"]
            if problems:
                add_event(
                    session,
                    "result.source_values",
                    "the outputs carry the series' patient and study values as they came (so they "
                    "file with the study), and these break the standard's rules there too: "
                    + "; ".join(problems),
                    level="warning",
                    data={"problems": list(problems)},
                    **claimed.ids,
                )
            derived = outputs.document.get("derived_frame_of_reference_uid")
            if derived:
                add_event(
                    session,
                    "result.frame_of_reference",
                    "the source images have no FrameOfReferenceUID: the SEG places its frames in "
                    f"{derived}, derived from the Series Instance UID",
                    level="warning",
                    data={"frame_of_reference_uid": derived},
                    **claimed.ids,
                )
            queued = self._queue_exports(session, row, claimed)
            row.unchanged = not queued if self.destinations else self._same_as_last(session, row)
            if row.unchanged:
                add_event(
                    session,
                    "result.unchanged",
                    "same content as the last result sent for this series: not sent again",
                    **claimed.ids,
                )
        if queued and self.on_exports_queued is not None:
            self.on_exports_queued()  # committed: the exporters find them now

    def _previous_sr(self, claimed: _Claimed, result: SeriesResult) -> Dataset | None:
        """The SR of the last finished result of an earlier generation of this series (what a
        re-run replaces), read from its result folder; None if there is none, it is gone, or it
        is this very SR (the same instances run again: output UIDs follow the instances)."""
        with self.db.session() as session:
            folder = session.scalar(
                select(Result.result_dir)
                .join(Job, Job.id == Result.job_id)
                .where(
                    Result.series_id == claimed.series_id,
                    Result.generation < claimed.generation,
                    Job.state == JobState.DONE,
                )
                .order_by(Result.id.desc())
                .limit(1)
            )
        if folder is None:
            return None
        path = Path(folder) / OUTPUT_FILES["sr"]
        try:
            previous = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, InvalidDicomError, ValueError) as exc:
            _log.warning(
                "the SR this result replaces is unreadable; not referenced as its predecessor",
                path=str(path),
                error=str(exc),
                **claimed.ids,
            )
            return None
        if str(previous.get("SOPInstanceUID", "")) == output_uids(result).sr_instance:
            return None
        return previous

    def _same_as_last(self, session: Any, row: Result) -> bool:
        previous = session.scalar(
            select(Result.content_hash)
            .join(Job, Job.id == Result.job_id)
            .where(
                Result.series_id == row.series_id,
                Result.id != row.id,
                Job.state == JobState.DONE,
            )
            .order_by(Result.id.desc())
            .limit(1)
        )
        return previous == row.content_hash

    def _queue_exports(self, session: Any, row: Result, claimed: _Claimed) -> list[str]:
        """Create an export per destination unless it already has (or is getting) this content;
        a pending export of an older result of the series is superseded."""
        queued = []
        for name in self.destinations:
            same = session.scalar(
                select(Export.id)
                .join(Result, Result.id == Export.result_id)
                .where(
                    Result.series_id == row.series_id,
                    Result.content_hash == row.content_hash,
                    Export.destination == name,
                    Export.state.in_(
                        (ExportState.PENDING, ExportState.SENDING, ExportState.DELIVERED)
                    ),
                )
                .limit(1)
            )
            if same is not None:
                continue
            session.execute(
                update(Export)
                .where(
                    Export.destination == name,
                    Export.state == ExportState.PENDING,
                    Export.result_id.in_(
                        select(Result.id).where(Result.series_id == row.series_id)
                    ),
                )
                .values(state=ExportState.SUPERSEDED, last_error="a newer result replaced it")
            )
            export = Export(result_id=row.id, destination=name, next_attempt_at=utcnow())
            session.add(export)
            session.flush()
            add_event(
                session,
                "export.queued",
                f"queued for {name}",
                export_id=export.id,
                **claimed.ids,
            )
            queued.append(name)
        if not self.destinations:
            add_event(
                session,
                "result.kept",
                f"no destinations configured: the result stays in {row.result_dir}",
                **claimed.ids,
            )
        return queued

    def _fail(self, claimed: _Claimed, reason: str, error: BaseException | None = None) -> None:
        """Record the job (and its series) failed for ``reason``; but when ``error`` is the audit
        database failing, or the failure cannot be recorded, run the job again later instead: the
        series is not at fault (a series that is runs again and fails again, recorded then)."""
        tries = self._retry.get(claimed.job_id, (0, 0.0))[0]
        if error is not None and _database_failed(error) and tries < _DB_RETRY_LIMIT:
            self._retry_later(claimed, error)
            return
        try:
            with self.db.session() as session:
                job = session.get(Job, claimed.job_id)
                series = session.get(Series, claimed.series_id)
                if job is not None:
                    job.state = JobState.FAILED
                    job.finished_at = utcnow()
                    job.error = reason
                if series is not None and series.generation == claimed.generation:
                    series.state = SeriesState.FAILED
                add_event(session, "job.failed", reason, level="error", **claimed.ids)
        except AuditError as exc:
            self._retry_later(claimed, exc)
            return
        self._retry.pop(claimed.job_id, None)

    def _retry_later(self, claimed: _Claimed, error: BaseException) -> None:
        """Put a job the audit database failed back to queued, to run again after a backoff."""
        failures = self._retry.get(claimed.job_id, (0, 0.0))[0] + 1
        delay = min(_DB_RETRY_MAX_SECONDS, _DB_RETRY_FIRST_SECONDS * 2 ** (failures - 1))
        self._retry[claimed.job_id] = (failures, self.clock() + delay)
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        why = f"the audit database failed ({problem}); runs again in {delay:g} s"
        try:
            self._requeue(claimed, why)
        except AuditError as again:
            # still running in the database: put back at a later step, or by the start-up
            # recovery if the node stops first
            self._not_requeued[claimed.job_id] = claimed
            _log.error(
                "job left running: the audit database failed; put back to queued later",
                error=str(again),
                **claimed.ids,
            )

    def _requeue(self, claimed: _Claimed, why: str) -> None:
        """Put a running job (and its series) back to queued, with an audit event saying why.

        Raises
        ------
        AuditError
            The database cannot be written (the job stays running there).
        """
        with self.db.session() as session:
            job = session.get(Job, claimed.job_id)
            if job is None or job.state != JobState.RUNNING:
                return  # parked meanwhile by a shutdown
            job.state = JobState.QUEUED
            job.started_at = None
            series = session.get(Series, claimed.series_id)
            if (
                series is not None
                and series.state == SeriesState.RUNNING
                and series.generation == claimed.generation
            ):
                series.state = SeriesState.QUEUED
            add_event(
                session, "job.requeued", f"back to queued: {why}", level="warning", **claimed.ids
            )

    def _requeue_left_running(self) -> None:
        """Put back to queued the jobs the audit database could not put back when it failed."""
        for job_id, claimed in list(self._not_requeued.items()):
            try:
                self._requeue(claimed, "the audit database failed while it ran")
            except AuditError:
                return  # still failing: the next step tries again
            del self._not_requeued[job_id]


# ------------------------------------------------------------------------------------------------
# crash recovery and shutdown


@dataclass(frozen=True)
class Recovery:
    """What :func:`recover` put back on its way."""

    jobs_requeued: int = 0
    exports_reset: int = 0
    associations_closed: int = 0
    instances_registered: int = 0
    temporary_files_removed: int = 0
    files_quarantined: int = 0

    @property
    def anything(self) -> bool:
        return any(
            (
                self.jobs_requeued,
                self.exports_reset,
                self.associations_closed,
                self.instances_registered,
                self.temporary_files_removed,
                self.files_quarantined,
            )
        )


def park_running_jobs(db: AuditDB, why: str) -> int:
    """Put every running job (and its series) back to queued; returns how many."""
    with db.session() as session:
        jobs = session.scalars(select(Job).where(Job.state == JobState.RUNNING)).all()
        for job in jobs:
            job.state = JobState.QUEUED
            job.started_at = None
            series = session.get(Series, job.series_id)
            if series is not None and series.state == SeriesState.RUNNING:
                series.state = SeriesState.QUEUED
            add_event(
                session,
                "job.requeued",
                f"back to queued: {why}",
                level="warning",
                study_instance_uid=series.study_instance_uid if series else None,
                series_instance_uid=series.series_instance_uid if series else None,
                job_id=job.id,
            )
        return len(jobs)


def _spool_files(spool_dir: Path) -> tuple[list[Path], list[Path]]:
    """(instance files, temporary files) under the spool."""
    instances: list[Path] = []
    temporary: list[Path] = []
    if not spool_dir.is_dir():
        return instances, temporary
    for path in spool_dir.rglob("*"):
        if not path.is_file():
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            temporary.append(path)
        elif path.suffix == ".dcm":
            instances.append(path)
    return sorted(instances), temporary


def recover(db: AuditDB, data_dir: Path) -> Recovery:
    """Put every unfinished step back on its way after a crash (or a clean stop).

    - running jobs go back to queued (their series too); exports caught sending go back to
      pending (the destination may then receive the same SOP Instance UIDs twice, and stores
      them once);
    - associations left open are closed in the audit;
    - spool temporary files (a write cut short, never answered with success) are removed;
    - spool files without a database row (renamed into place, then killed before the commit, so
      never answered with success either) are registered now, in file-name order: nothing
      received is lost; an unreadable one is moved to ``data_dir/quarantine`` with an audit row;
    - half-written result folders are removed.

    Series still receiving complete after their quiet period as usual; complete series are
    selected and queued jobs run by the worker.

    Raises
    ------
    AuditError
        The database cannot be read or written.
    """
    requeued = park_running_jobs(db, "the node stopped while it ran")
    with db.session() as session:
        sending = session.scalars(select(Export).where(Export.state == ExportState.SENDING)).all()
        for export in sending:
            export.state = ExportState.PENDING
            export.next_attempt_at = utcnow()
            add_event(
                session,
                "export.resumed",
                f"the node stopped while sending to {export.destination}: sent again",
                level="warning",
                export_id=export.id,
            )
        open_associations = session.scalars(
            select(Association).where(Association.ended_at.is_(None))
        ).all()
        for association in open_associations:
            association.ended_at = utcnow()
            association.end_reason = "node stopped"
        known = set(session.scalars(select(Instance.spool_path)).all())
    spool_dir = data_dir / "spool"
    instances, temporary = _spool_files(spool_dir)
    for path in temporary:
        path.unlink(missing_ok=True)
    registered = quarantined = 0
    for path in instances:
        if str(path) in known:
            continue
        try:
            info = _instance_info(path)
        except InputError as exc:
            target = data_dir / "quarantine" / path.relative_to(spool_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)
            quarantined += 1
            with db.session() as session:
                add_event(
                    session,
                    "instance.quarantined",
                    f"unreadable spool file moved to {target}: {exc.reason}",
                    level="error",
                )
            continue
        with db.session() as session:
            registration = register_instance(session, info)
            add_event(
                session,
                "instance.recovered",
                f"spool file without a database row registered ({registration.outcome})",
                level="warning",
                study_instance_uid=info.study_instance_uid,
                series_instance_uid=info.series_instance_uid,
                sop_instance_uid=info.sop_instance_uid,
            )
        registered += 1
    results_dir = data_dir / "results"
    if results_dir.is_dir():
        for leftover in results_dir.glob("*/.*-job-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    recovery = Recovery(
        jobs_requeued=requeued,
        exports_reset=len(sending),
        associations_closed=len(open_associations),
        instances_registered=registered,
        temporary_files_removed=len(temporary),
        files_quarantined=quarantined,
    )
    if recovery.anything:
        with db.session() as session:
            add_event(
                session,
                "node.recovered",
                "recovered at start-up: "
                + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in _fields(recovery) if v),
                level="warning",
                data=dict(_fields(recovery)),
            )
    return recovery


def _fields(recovery: Recovery) -> list[tuple[str, int]]:
    return [(name, getattr(recovery, name)) for name in Recovery.__dataclass_fields__]


def _instance_info(path: Path) -> InstanceInfo:
    ds = read_header(path)
    meta = ds.file_meta
    uids = {
        key: str(ds.get(key, "") or "")
        for key in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    }
    for key, value in uids.items():
        if not is_safe_uid(value):
            raise InputError(path, f"{key} {value!r} is missing or not a UID")
    number = series_number_of(ds.get("SeriesNumber"))
    return InstanceInfo(
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=str(meta.get("TransferSyntaxUID", "")),
        size_bytes=path.stat().st_size,
        spool_path=str(path),
        accession_number=str(ds.get("AccessionNumber", "") or "")[:64],
        modality=str(ds.get("Modality", "") or "")[:16],
        series_number=number,
        series_description=str(ds.get("SeriesDescription", "") or ""),
    )
