"""The series catalog: registration, duplicates, completion after the quiet period, re-opening by a
late instance (superseding a queued job), and selection with the reason audited."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from node_support import instance_info, write_series
from sqlalchemy import select

from radnet_node import catalog
from radnet_node.audit import AuditDB, Event, Instance, Job, Series, utcnow
from radnet_node.catalog import (
    Arrival,
    RegistrationOutcome,
    Selection,
    complete_quiet_series,
    is_safe_uid,
    register_instance,
    register_instances,
    restart_quiet_periods,
    select_series,
    series_number_of,
)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[AuditDB]:
    database = AuditDB(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    yield database
    database.dispose()


def _register(db: AuditDB, paths: list[Path], at: dt.datetime | None = None) -> list[str]:
    outcomes = []
    with db.session() as session:
        for path in paths:
            outcomes.append(register_instance(session, instance_info(path), now=at).outcome)
    return outcomes


def _series(db: AuditDB) -> Series:
    with db.session() as session:
        return session.scalars(select(Series)).one()


def _kinds(db: AuditDB) -> list[str]:
    with db.session() as session:
        return list(session.scalars(select(Event.kind).order_by(Event.id)).all())


def test_uid_check_keeps_paths_inside_the_spool() -> None:
    assert is_safe_uid("1.2.840.10008.5.1.4.1.1.2")
    for bad in ("", "../x", "1.2/3", "1.2.", ".1", "1" * 65, "1.2.a"):
        assert not is_safe_uid(bad)


def test_series_completes_only_after_the_quiet_period(tmp_path: Path, db: AuditDB) -> None:
    files = write_series(tmp_path, "a")
    start = utcnow()
    assert _register(db, files, at=start) == [RegistrationOutcome.NEW] * len(files)
    with db.session() as session:
        assert complete_quiet_series(session, 10.0, now=start + dt.timedelta(seconds=9)) == []
    with db.session() as session:
        assert len(complete_quiet_series(session, 10.0, now=start + dt.timedelta(seconds=10)))
    series = _series(db)
    assert series.state == "complete" and series.instance_count == len(files)
    assert _kinds(db) == ["series.first_instance", "series.complete"]


def test_a_series_with_instances_on_their_way_to_the_catalog_is_not_quiet(
    tmp_path: Path, db: AuditDB
) -> None:
    # rows older than the quiet period, but the ingest recorder still holds newer instances
    files = write_series(tmp_path, "a")
    start = utcnow()
    _register(db, files, at=start)
    uid = _series(db).series_instance_uid
    later = start + dt.timedelta(seconds=10)
    with db.session() as session:
        assert complete_quiet_series(session, 10.0, now=later, receiving={uid}) == []
    assert _series(db).state == "received"
    with db.session() as session:
        assert len(complete_quiet_series(session, 10.0, now=later, receiving={"1.2.3"})) == 1
    assert _series(db).state == "complete"


def test_after_a_restart_a_series_still_receiving_gets_a_whole_quiet_period_again(
    tmp_path: Path, db: AuditDB
) -> None:
    files = write_series(tmp_path, "a")
    start = utcnow()
    _register(db, files[:3], at=start)  # then the node died; it is up again a minute later
    up = start + dt.timedelta(seconds=60)
    with db.session() as session:
        assert restart_quiet_periods(session, 10.0) == 1
    with db.session() as session:
        assert complete_quiet_series(session, 10.0, now=up, quiet_since=up) == []
        assert complete_quiet_series(
            session, 10.0, now=up + dt.timedelta(seconds=9.9), quiet_since=up
        ) == []  # fmt: skip
    series = _series(db)
    assert series.state == "received" and series.last_instance_at == start  # the facts stay
    with db.session() as session:
        completed = complete_quiet_series(
            session, 10.0, now=up + dt.timedelta(seconds=10), quiet_since=up
        )
    assert completed == [series.id]
    assert _kinds(db) == ["series.first_instance", "series.quiet_restarted", "series.complete"]


def test_duplicate_changes_nothing(tmp_path: Path, db: AuditDB) -> None:
    files = write_series(tmp_path, "a")
    _register(db, files[:3])
    assert _register(db, files[:1]) == [RegistrationOutcome.DUPLICATE]
    assert _series(db).instance_count == 3
    assert _kinds(db)[-1] == "instance.duplicate"


def test_batches_in_the_usual_case_record_what_the_general_path_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the usual case (new instances of receiving series) takes four plain statements; the
    # others (a new series, a duplicate, one twice in a batch, a late instance) the general path.
    # Both must leave the same rows.
    first = write_series(tmp_path / "in", "a", slices=9)
    second = write_series(tmp_path / "in", "b", slices=4, series_number=3)
    start = dt.datetime(2026, 11, 27, 8, 0, 0)
    batches = [first[:1], first[1:5] + second[:1], first[5:8] + second[1:3], first[2:3], second[3:]]
    batches += [first[8:] + first[8:]]
    taken: list[bool] = []
    usual = catalog._register_in_receiving_series

    def spy(session: Any, arrivals: Any) -> Any:
        result = usual(session, arrivals)
        taken.append(result is not None)
        return result

    tables = {}
    for path in ("usual", "general"):
        monkeypatch.setattr(
            catalog, "_register_in_receiving_series", spy if path == "usual" else lambda s, a: None
        )
        database = AuditDB(f"sqlite:///{tmp_path / path}.sqlite")
        outcomes = []
        at = start
        for batch in batches:
            arrivals = []
            for file in batch:
                at += dt.timedelta(seconds=1)
                arrivals.append(Arrival(instance_info(file), None, at))
            with database.session() as session:
                outcomes.append([r.outcome for r in register_instances(session, arrivals)])
        with database.session() as session:
            instances = session.execute(
                select(Instance.sop_instance_uid, Instance.series_id, Instance.spool_path,
                       Instance.received_at, Instance.generation, Instance.association_id,
                       Instance.size_bytes, Instance.transfer_syntax_uid)
                .order_by(Instance.sop_instance_uid)
            ).all()  # fmt: skip
            series = session.execute(
                select(Series.series_instance_uid, Series.instance_count, Series.state,
                       Series.generation, Series.first_instance_at, Series.last_instance_at)
                .order_by(Series.id)
            ).all()  # fmt: skip
            kinds = session.scalars(select(Event.kind).order_by(Event.id)).all()
        tables[path] = (outcomes, instances, series, kinds)
        database.dispose()
    assert taken == [False, False, True, False, True, False]  # each path is taken
    assert tables["usual"] == tables["general"]
    outcomes, instances, series, _ = tables["usual"]
    assert outcomes[3] == [RegistrationOutcome.DUPLICATE]
    assert [(s[1], s[5]) for s in series] == [
        (9, start + dt.timedelta(seconds=14)),  # its last arrival is a duplicate
        (4, start + dt.timedelta(seconds=13)),
    ]
    assert len(instances) == 13


def test_late_instance_reopens_and_supersedes_the_queued_job(tmp_path: Path, db: AuditDB) -> None:
    files = write_series(tmp_path, "a")
    _register(db, files[:-1])
    with db.session() as session:
        complete_quiet_series(session, 0.0)
    selection = select_series(db, _series(db).id, min_slices=5)
    assert selection.state == "queued" and selection.job_id is not None
    assert _register(db, files[-1:]) == [RegistrationOutcome.REOPENED]
    series = _series(db)
    assert (series.state, series.generation, series.completed_at) == ("received", 2, None)
    with db.session() as session:
        job = session.get(Job, selection.job_id)
        assert job is not None and job.state == "superseded"
    assert "series.reopened" in _kinds(db)


def test_selection_queues_an_axial_head_ct(tmp_path: Path, db: AuditDB) -> None:
    _register(db, write_series(tmp_path, "a"))
    with db.session() as session:
        complete_quiet_series(session, 0.0)
    selection = select_series(db, _series(db).id, min_slices=5)
    assert selection.state == "queued"
    series = _series(db)
    assert series.state == "queued" and "axial head CT, 6 slices" in (
        series.eligibility_reason or ""
    )
    with db.session() as session:
        job = session.scalars(select(Job)).one()
    assert (job.state, job.generation) == ("queued", 1)


def _select_with_localizers(db: AuditDB, files: list[Path], scouts: list[Path]) -> Selection:
    """Mark ``scouts`` as localizers, receive every file, complete the series and select it."""
    for path in scouts:
        scout = pydicom.dcmread(path)
        scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        scout.save_as(path)
    _register(db, files)
    with db.session() as session:
        complete_quiet_series(session, 0.0)
    return select_series(db, _series(db).id, min_slices=5)


def test_a_localizer_inside_the_series_is_left_out_and_the_rest_queued(
    tmp_path: Path, db: AuditDB
) -> None:
    files = write_series(tmp_path, "s", slices=7)
    selection = _select_with_localizers(db, files, files[:1])
    assert selection.state == "queued"
    assert "axial head CT, 6 slices" in selection.reason
    assert f"left out: {files[0].name}, a localizer (scout) image" in selection.reason
    with db.session() as session:
        queued = session.scalars(select(Event).where(Event.kind == "series.selected")).one()
        assert "left out" in queued.message


def test_a_rejected_series_names_the_instances_left_out_too(tmp_path: Path, db: AuditDB) -> None:
    files = write_series(tmp_path, "s", slices=6)
    selection = _select_with_localizers(db, files, files[:4])
    assert selection.state == "rejected"
    assert "too few slices: 2" in selection.reason
    assert selection.reason.count("a localizer (scout) image") == 4


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "a localizer (scout) image"),
        ({"Modality": "MR"}, "Modality MR, not CT"),
        ({}, "too few slices: 3"),
        ({"LossyImageCompression": "01"}, "lossy-compressed: 6 of 6 instance(s)"),
    ],
)
def test_selection_rejects_with_the_reason_audited(
    tmp_path: Path, db: AuditDB, change: dict[str, object], reason: str
) -> None:
    files = write_series(tmp_path, "r", slices=3 if not change else 6)
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in change.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    _register(db, files)
    with db.session() as session:
        complete_quiet_series(session, 0.0)
    selection = select_series(db, _series(db).id, min_slices=5)
    assert selection.state == "rejected" and reason in selection.reason
    with db.session() as session:
        rejected = session.scalars(select(Event).where(Event.kind == "series.rejected")).one()
        assert reason in rejected.message
        assert session.scalars(select(Job)).all() == []


def test_selection_runs_a_lossy_series_when_accepted(tmp_path: Path, db: AuditDB) -> None:
    files = write_series(tmp_path, "l", slices=6)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.LossyImageCompression = "01"
        ds.save_as(path)
    _register(db, files)
    with db.session() as session:
        complete_quiet_series(session, 0.0)
    selection = select_series(db, _series(db).id, min_slices=5, accept_lossy=True)
    assert selection.state == "queued", selection


def test_a_missing_spool_file_fails_the_series_naming_it(tmp_path: Path, db: AuditDB) -> None:
    files = write_series(tmp_path, "m")
    _register(db, files)
    files[2].unlink()
    with db.session() as session:
        complete_quiet_series(session, 0.0)
    selection = select_series(db, _series(db).id, min_slices=5)
    assert selection.state == "failed" and str(files[2]) in selection.reason


@pytest.mark.parametrize(
    ("value", "expected"),
    [("2", 2), (" 3 ", 3), ("2.0", 2), ("-5", -5), (7, 7), (None, None), ("", None),
     ("inf", None), ("nan", None), ("1e99", None), (2**40, None), ("x", None)],
)  # fmt: skip
def test_series_numbers_the_catalog_cannot_hold_are_none(
    value: object, expected: int | None
) -> None:
    assert series_number_of(value) == expected
