"""The audit database: SQLite settings, the event stream for ``audit tail``, the story of a study
with per-step durations for ``audit show``, and the ``status`` summary."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

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
