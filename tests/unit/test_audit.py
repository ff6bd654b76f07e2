"""The audit database: SQLite settings, the event stream for ``audit tail``, the story of a study
with per-step durations for ``audit show``, and the ``status`` summary."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from radnet_node import audit
from radnet_node.audit import (
    AuditDB,
    AuditError,
    Export,
    Instance,
    Job,
    Result,
    Series,
    add_event,
    status_summary,
    study_story,
    tail_events,
)

T0 = dt.datetime(2026, 1, 1, 12, 0, 0)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[AuditDB]:
    database = AuditDB(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    yield database
    database.dispose()


def _at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def _study(db: AuditDB) -> None:
    """One series through every step at known times: 0 first, 4 last, 14 complete, 14.5 queued,
    15 running, 17 result, 17.5 stored; a dead export to a second destination."""
    with db.session() as session:
        series = Series(
            series_instance_uid="1.2.3.1",
            study_instance_uid="1.2.3",
            accession_number="A100",
            modality="CT",
            series_number=2,
            series_description="HEAD",
            state="done",
            instance_count=2,
            first_instance_at=_at(0),
            last_instance_at=_at(4),
            completed_at=_at(14),
        )
        session.add(series)
        session.flush()
        session.add(
            Instance(
                sop_instance_uid="1.2.3.1.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                series_id=series.id,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                size_bytes=10,
                spool_path="/spool/x.dcm",
                received_at=_at(0),
            )
        )
        job = Job(
            series_id=series.id,
            generation=1,
            state="done",
            created_at=_at(14.5),
            started_at=_at(15),
            finished_at=_at(17),
            timings_ms={"model": 1200.0},
        )
        session.add(job)
        session.flush()
        result = Result(
            job_id=job.id,
            series_id=series.id,
            generation=1,
            created_at=_at(17),
            content_hash="0" * 64,
            ct_positive=True,
            certainty=0.9,
            sr_sop_instance_uid="1.2.9.1",
            seg_sop_instance_uid="1.2.9.2",
            result_dir="/results/1.2.3.1/job-1",
            result_json="{}",
        )
        session.add(result)
        session.flush()
        session.add(
            Export(
                result_id=result.id,
                destination="pacs",
                state="delivered",
                attempts=1,
                delivered_at=_at(17.5),
            )
        )
        session.add(
            Export(
                result_id=result.id,
                destination="archive",
                state="dead",
                attempts=3,
                last_status=0xA700,
                last_error="status 0xA700",
            )
        )
        add_event(session, "series.complete", "complete", study_instance_uid="1.2.3")
        add_event(session, "other.study", "not ours", study_instance_uid="9.9")


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(db: AuditDB) -> None:
    with db.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_story_is_found_by_any_uid_or_the_accession(db: AuditDB) -> None:
    _study(db)
    with db.session() as session:
        # study, series, a received instance, the accession, and the node's own SR and SEG
        for query in ("1.2.3", "1.2.3.1", "1.2.3.1.1", "A100", "1.2.9.1", "1.2.9.2"):
            story = study_story(session, query)
            assert story is not None and story.study_instance_uids == ("1.2.3",)
        assert study_story(session, "7.7.7") is None


def test_story_has_every_step_with_its_duration(db: AuditDB) -> None:
    _study(db)
    with db.session() as session:
        story = study_story(session, "A100")
    assert story is not None
    steps = [(s.name, s.seconds_since_previous) for s in story.series[0].steps]
    assert steps == [
        ("first instance", None),
        ("last instance", 4.0),
        ("complete", 10.0),
        ("queued", 0.5),
        ("running", 0.5),
        ("result written", 2.0),
        ("job done", 0.0),
        ("stored at pacs", 0.5),
    ]
    exports = {e["destination"]: e for e in story.series[0].exports}
    assert exports["archive"]["state"] == "dead" and exports["archive"]["last_status"] == "0xA700"
    assert [e.kind for e in story.events] == ["series.complete"]
    document = json.loads(json.dumps(story.as_dict()))
    assert document["series"][0]["results"][0]["timings_ms"] == {"model": 1200.0}


def test_status_counts_states_and_lists_dead_letters(db: AuditDB) -> None:
    _study(db)
    with db.session() as session:
        summary = status_summary(session)
    assert summary.series_by_state == {"done": 1}
    assert summary.exports_by_state == {"delivered": 1, "dead": 1}
    assert [d["destination"] for d in summary.dead_exports] == ["archive"]
    assert summary.last_results[0]["series_instance_uid"] == "1.2.3.1"


def test_status_lists_the_last_failed_jobs_and_series_not_run_with_the_reason(
    db: AuditDB,
) -> None:
    _study(db)
    with db.session() as session:
        rejected = Series(
            series_instance_uid="1.2.3.2",
            study_instance_uid="1.2.3",
            accession_number="A100",
            state="rejected",
            eligibility_reason="a LOCALIZER (scout) image, not an axial slice",
            updated_at=_at(20),
        )
        failed = Series(
            series_instance_uid="1.2.3.3",
            study_instance_uid="1.2.3",
            state="failed",
            updated_at=_at(30),
        )
        session.add_all([rejected, failed])
        session.flush()
        session.add(
            Job(
                series_id=failed.id,
                generation=1,
                state="failed",
                created_at=_at(29),
                finished_at=_at(31),
                error="InconsistentGeometryError: slices 3 and 4 share the position 12.000 mm",
            )
        )
    with db.session() as session:
        problems = status_summary(session).last_problems
    assert [(p["what"].split()[-1], p["series_instance_uid"], p["reason"]) for p in problems] == [
        (
            "failed",
            "1.2.3.3",
            "InconsistentGeometryError: slices 3 and 4 share the position 12.000 mm",
        ),
        ("run", "1.2.3.2", "a LOCALIZER (scout) image, not an axial slice"),
    ]
    assert problems[1]["accession_number"] == "A100"


def test_tail_returns_the_last_events_then_the_new_ones(db: AuditDB) -> None:
    with db.session() as session:
        for n in range(5):
            add_event(session, "test.event", f"event {n}", level="info")
    with db.session() as session:
        last = tail_events(session, limit=2)
        assert [e.message for e in last] == ["event 3", "event 4"]
        add_event(session, "test.event", "event 5", level="warning")
    with db.session() as session:
        new = tail_events(session, after_id=last[-1].id)
    assert [e.message for e in new] == ["event 5"]
    assert json.loads(json.dumps(new[0].as_dict()))["level"] == "warning"
    assert "WARNING" in new[0].line()


def test_event_level_is_checked(db: AuditDB) -> None:
    with pytest.raises(ValueError, match="event level 'loud'"), db.session() as session:
        add_event(session, "x", "y", level="loud")


def test_unusable_database_is_an_audit_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(AuditError, match="cannot create its folder"):
        AuditDB(f"sqlite:///{blocker / 'sub' / 'audit.sqlite'}")
    with pytest.raises(AuditError, match="no such file"):
        AuditDB(f"sqlite:///{tmp_path / 'missing.sqlite'}", create=False)


class _ReadOnlyFile:
    """What a node running as an ordinary user sees while its database file is ``chmod 444``:
    every connection the pool opens meanwhile is read-only (SQLite falls back to it silently),
    and stays so after the file is writable again. Root may write any file, so the connections
    are opened with ``mode=ro`` instead; ``visible``: whether the file's mode shows it too (False:
    the mode changed between SQLite's open and the node's look)."""

    def __init__(self, db: AuditDB, path: Path, monkeypatch: pytest.MonkeyPatch, *, visible: bool):
        self.on = False
        self.path = path
        event.listen(db.engine, "do_connect", self._connect)
        if visible:
            monkeypatch.setattr(audit, "_writable", lambda _path: not self.on)

    def _connect(self, _dialect: Any, _record: Any, _args: Any, _kwargs: Any) -> Any:
        if not self.on:
            return None  # SQLAlchemy connects as usual
        uri = f"file:{self.path}?mode=ro"
        return sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=30.0)


def _write(db: AuditDB, message: str) -> None:
    with db.session() as session:
        add_event(session, "test.write", message)


def _read(db: AuditDB) -> int:
    with db.session() as session:
        return len(tail_events(session, limit=1000))


@pytest.fixture
def held_open(db: AuditDB, tmp_path: Path) -> Iterator[Path]:
    """The database file, with a connection holding it (and its WAL) open as the node's older
    pooled connections do, and the pool emptied, so that it opens new connections."""
    path = tmp_path / "audit.sqlite"
    _write(db, "before")
    holder = sqlite3.connect(path)
    holder.execute("SELECT count(*) FROM events").fetchall()
    db.engine.dispose()
    yield path
    holder.close()


@pytest.mark.parametrize("visible", [True, False], ids=["mode-seen", "mode-not-seen"])
def test_connections_opened_while_the_file_was_read_only_do_not_outlive_it(
    db: AuditDB, held_open: Path, monkeypatch: pytest.MonkeyPatch, visible: bool
) -> None:
    # a tester made the file read-only for 5 s: for minutes after, associations were refused
    # and "attempt to write a readonly database" went on, from the read-only pooled connections
    window = _ReadOnlyFile(db, held_open, monkeypatch, visible=visible)
    window.on = True
    with pytest.raises(AuditError, match="attempt to write a readonly database"):
        _write(db, "while read-only")
    assert _read(db) == 1  # reads go on; this connection goes back to the pool
    window.on = False
    if not visible:
        # the node could not tell that the connection is read-only: its first write fails ...
        with pytest.raises(AuditError, match="attempt to write a readonly database"):
            _write(db, "on the stale connection")
    # ... and the next transaction (the first one where the node saw the mode) is written
    _write(db, "after")
    _write(db, "and after")
    assert _read(db) == 3
