"""The job worker with the real (tiny) engine: results and exports, batching, unchanged results not
sent again, late instances, failures kept to their series, and crash recovery from the database and
the spool."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
from node_support import instance_info, node_settings, tiny_weights, write_series
from sqlalchemy import create_engine, event, select
from sqlalchemy.exc import OperationalError

from radnet_node.audit import (
    Association,
    AuditDB,
    Event,
    Export,
    Instance,
    Job,
    Result,
    Series,
    status_summary,
)
from radnet_node.catalog import (
    complete_quiet_series,
    register_instance,
    reopen_series,
)
from radnet_node.config import Settings
from radnet_node.engine import Engine, EngineSettings
from radnet_node.jobs import Worker, _database_failed, content_hash, recover
from radnet_node.node import node_identity

DESTINATIONS = [
    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
    {"name": "archive", "ae_title": "ARCH", "host": "127.0.0.1", "port": 105},
]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def engine(weights: Path) -> Engine:
    torch.set_num_threads(1)
    return Engine(EngineSettings(weights=weights, device="cpu", precision="fp32", threads=1))


@pytest.fixture
def settings(tmp_path: Path, weights: Path) -> Settings:
    return node_settings(tmp_path / "data", weights, destinations=DESTINATIONS)


@pytest.fixture
def db(settings: Settings) -> Iterator[AuditDB]:
    database = AuditDB(settings.database_url)
    yield database
    database.dispose()


@pytest.fixture
def worker(db: AuditDB, engine: Engine, settings: Settings) -> Worker:
    return Worker(db, engine, settings, node_identity(settings))


def _receive(db: AuditDB, paths: list[Path], *, complete: bool = True) -> None:
    with db.session() as session:
        for path in paths:
            register_instance(session, instance_info(path))
    if complete:
        with db.session() as session:
            complete_quiet_series(session, 0.0)


def _rows(db: AuditDB, model: Any) -> list[Any]:
    with db.session() as session:
        return list(session.scalars(select(model).order_by(model.id)).all())


def _kinds(db: AuditDB) -> list[str]:
    return [e.kind for e in _rows(db, Event)]


def test_a_complete_series_is_run_written_and_queued_for_every_destination(
    tmp_path: Path, db: AuditDB, worker: Worker
) -> None:
    _receive(db, write_series(tmp_path, "a"))
    assert worker.step()
    (job,) = _rows(db, Job)
    (result,) = _rows(db, Result)
    (series,) = _rows(db, Series)
    assert (job.state, series.state) == ("done", "done")
    assert {"read_decode", "model", "write", "total"} <= set(job.timings_ms)
    folder = Path(result.result_dir)
    assert folder == worker.results_dir / series.series_instance_uid / f"job-{job.id}"
    names = {p.name for p in folder.iterdir()}
    assert names == {"sr.dcm", "seg.dcm", "key-image.dcm", "preview.png", "result.json"}
    assert pydicom.dcmread(folder / "sr.dcm").SOPInstanceUID == result.sr_sop_instance_uid
    assert result.ct_positive and len(result.content_hash) == 64 and not result.unchanged
    exports = _rows(db, Export)
    assert sorted(e.destination for e in exports) == ["archive", "pacs"]
    assert {e.state for e in exports} == {"pending"}
    assert _kinds(db)[-4:] == ["job.running", "job.done", "export.queued", "export.queued"]
    assert not worker.step()  # nothing left to do


def test_faulty_patient_and_study_values_are_copied_as_they_are_and_audited(
    tmp_path: Path, db: AuditDB, worker: Worker
) -> None:
    # the outputs must file with the study, so its values are not "repaired"; the admin learns
    # why a validator will find the same faults in them (and the log gets no value)
    paths = write_series(tmp_path, "a")
    accession = "ACC-2026-00000000012345"  # 23 characters: SH allows 16
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = accession
        ds.save_as(path)
    _receive(db, paths)
    assert worker.step()
    (result,) = _rows(db, Result)
    assert pydicom.dcmread(Path(result.result_dir) / "sr.dcm").AccessionNumber == accession
    document = json.loads((Path(result.result_dir) / "result.json").read_text())
    assert [p.split(":")[0] for p in document["source_value_problems"]] == ["AccessionNumber"]
    (event,) = [e for e in _rows(db, Event) if e.kind == "result.source_values"]
    assert event.level == "warning" and "AccessionNumber" in event.message
    assert "exceeds the maximum length of 16" in event.message
    assert accession not in event.message


def test_a_series_without_a_frame_of_reference_is_run_and_the_derived_one_audited(
    tmp_path: Path, db: AuditDB, worker: Worker
) -> None:
    # the CQ500 images lost theirs to de-identification
    paths = write_series(tmp_path, "a")
    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path)
    _receive(db, paths)
    assert worker.step()
    (result,) = _rows(db, Result)
    document = json.loads((Path(result.result_dir) / "result.json").read_text())
    derived = document["derived_frame_of_reference_uid"]
    seg = pydicom.dcmread(Path(result.result_dir) / "seg.dcm")
    assert derived and seg.FrameOfReferenceUID == derived
    assert document["source_value_problems"] == []
    (event,) = [e for e in _rows(db, Event) if e.kind == "result.frame_of_reference"]
    assert event.level == "warning" and derived in event.message
    assert not [e for e in _rows(db, Event) if e.kind == "result.source_values"]


def test_series_waiting_together_go_through_one_engine_call(
    tmp_path: Path, db: AuditDB, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    real_run = worker.engine.run

    def counting_run(series: Any) -> Any:
        batches.append(len(series))
        return real_run(series)

    monkeypatch.setattr(worker.engine, "run", counting_run)
    _receive(db, write_series(tmp_path, "a") + write_series(tmp_path, "b"))
    worker.select_complete()
    assert worker.run_batch() == 2
    assert batches == [2]
    assert [j.state for j in _rows(db, Job)] == ["done", "done"]


def test_an_unchanged_result_is_not_sent_again(tmp_path: Path, db: AuditDB, worker: Worker) -> None:
    _receive(db, write_series(tmp_path, "a"))
    worker.step()
    (series,) = _rows(db, Series)
    with db.session() as session:
        # re-opened with the same instances (as after a crash between two steps)
        reopen_series(session, series.series_instance_uid, "test")
    with db.session() as session:
        complete_quiet_series(session, 0.0)
    worker.step()
    first, second = _rows(db, Result)
    assert second.content_hash == first.content_hash
    assert second.sr_sop_instance_uid == first.sr_sop_instance_uid
    assert second.unchanged
    assert len(_rows(db, Export)) == 2  # only the first result's
    assert "result.unchanged" in _kinds(db)


def test_a_late_instance_gives_a_new_result_that_replaces_the_pending_export(
    tmp_path: Path, db: AuditDB, worker: Worker
) -> None:
    files = write_series(tmp_path, "a")
    _receive(db, files[:-1])
    worker.step()
    _receive(db, files[-1:])
    worker.step()
    first, second = _rows(db, Result)
    assert (first.generation, second.generation) == (1, 2)
    assert second.content_hash != first.content_hash
    assert second.sr_sop_instance_uid != first.sr_sop_instance_uid
    states = {(e.result_id, e.destination): e.state for e in _rows(db, Export)}
    assert states == {
        (first.id, "pacs"): "superseded",
        (first.id, "archive"): "superseded",
        (second.id, "pacs"): "pending",
        (second.id, "archive"): "pending",
    }


def test_a_series_reopened_while_it_runs_is_not_sent(
    tmp_path: Path, db: AuditDB, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = write_series(tmp_path, "a")
    _receive(db, files[:-1])
    real_run = worker.engine.run

    def late_instance_during_run(series: Any) -> Any:
        _receive(db, files[-1:], complete=False)
        return real_run(series)

    monkeypatch.setattr(worker.engine, "run", late_instance_during_run)
    worker.step()
    (job,) = _rows(db, Job)
    (series,) = _rows(db, Series)
    assert job.state == "superseded" and series.state == "received" and series.generation == 2
    assert _rows(db, Export) == []
    monkeypatch.setattr(worker.engine, "run", real_run)
    with db.session() as session:
        complete_quiet_series(session, 0.0)
    worker.step()
    assert [j.state for j in _rows(db, Job)] == ["superseded", "done"]
    assert len(_rows(db, Export)) == 2
    with db.session() as session:  # `status` says which of the two results was never sent
        results = status_summary(session).last_results
    assert [r["superseded"] for r in results] == [False, True]  # newest first


def test_a_broken_series_fails_alone(tmp_path: Path, db: AuditDB, worker: Worker) -> None:
    good = write_series(tmp_path, "good")
    bad = write_series(tmp_path, "bad")
    ds = pydicom.dcmread(bad[3])
    ds.PixelData = ds.PixelData[:100]  # too short for 64 x 64
    ds.save_as(bad[3])
    _receive(db, good + bad)
    worker.step()
    jobs = {j.series_id: j for j in _rows(db, Job)}
    states = {s.series_instance_uid: (s.state, jobs[s.id]) for s in _rows(db, Series)}
    bad_uid = str(pydicom.dcmread(bad[0]).SeriesInstanceUID)
    good_uid = str(pydicom.dcmread(good[0]).SeriesInstanceUID)
    assert states[good_uid][0] == "done"
    assert states[bad_uid][0] == "failed"
    assert states[bad_uid][1].error  # the reason, for the audit
    failed = [e for e in _rows(db, Event) if e.kind == "job.failed"]
    assert len(failed) == 1 and failed[0].series_instance_uid == bad_uid


def test_content_hash_ignores_dates_and_times_only() -> None:
    a = pydicom.Dataset()
    a.ContentDate, a.ContentTime, a.PatientID = "20260101", "120000", "P1"
    b = pydicom.Dataset()
    b.ContentDate, b.ContentTime, b.PatientID = "20270202", "130101", "P1"
    assert content_hash({"sr": a}) == content_hash({"sr": b})
    b.PatientID = "P2"
    assert content_hash({"sr": a}) != content_hash({"sr": b})


def test_recovery_requeues_running_jobs_and_resends_interrupted_exports(
    tmp_path: Path,
    db: AuditDB,
    worker: Worker,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _receive(db, write_series(tmp_path, "a"))

    def killed(series: Any) -> Any:
        raise SystemExit("killed during inference")

    # what a kill -9 during inference leaves: the job running, an association still open
    monkeypatch.setattr(worker.engine, "run", killed)
    with pytest.raises(SystemExit):
        worker.step()
    monkeypatch.undo()
    with db.session() as session:
        session.add(
            Association(
                calling_ae_title="M", called_ae_title="RADNET", peer_host="127.0.0.1",
                peer_port=1, accepted=True,
            )
        )  # fmt: skip
    assert [(j.state, j.attempts) for j in _rows(db, Job)] == [("running", 1)]
    recovery = recover(db, settings.node.data_dir)
    assert (recovery.jobs_requeued, recovery.associations_closed) == (1, 1)
    assert [j.state for j in _rows(db, Job)] == ["queued"]
    assert _rows(db, Series)[0].state == "queued"
    assert _rows(db, Association)[0].end_reason == "node stopped"
    worker.step()
    assert [(j.state, j.attempts) for j in _rows(db, Job)] == [("done", 2)]
    assert len(_rows(db, Result)) == 1 and len(_rows(db, Export)) == 2

    # killed while sending: the export goes back to pending and is sent again
    with db.session() as session:
        session.scalars(select(Export)).first().state = "sending"  # type: ignore[union-attr]
    assert recover(db, settings.node.data_dir).exports_reset == 1
    assert {e.state for e in _rows(db, Export)} == {"pending"}


def test_recovery_registers_spool_files_without_rows_and_cleans_the_rest(
    tmp_path: Path, db: AuditDB, settings: Settings
) -> None:
    files = write_series(tmp_path, "a")
    spool = settings.node.data_dir / "spool" / "1.2" / "1.2.3"
    spool.mkdir(parents=True)
    for path in files[:2]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        shutil.copy(path, spool / f"{ds.SOPInstanceUID}.dcm")
    (spool / ".9.9.123.tmp").write_bytes(b"half a file")
    (spool / "1.2.3.4.dcm").write_bytes(b"garbage")
    recovery = recover(db, settings.node.data_dir)
    assert recovery.instances_registered == 2
    assert recovery.temporary_files_removed == 1
    assert recovery.files_quarantined == 1
    assert not (spool / ".9.9.123.tmp").exists()
    assert (settings.node.data_dir / "quarantine" / "1.2" / "1.2.3" / "1.2.3.4.dcm").exists()
    assert {Path(i.spool_path).parent for i in _rows(db, Instance)} == {spool}
    assert "node.recovered" in _kinds(db)
    assert recover(db, settings.node.data_dir).anything is False  # idempotent


class _FailingWrites:
    """Make the audit database refuse the statements ``when`` picks, as SQLite does while the
    file is read-only (the error comes from the cursor, through SQLAlchemy and the session)."""

    def __init__(self, db: AuditDB, when: Callable[[str], bool]) -> None:
        self.when = when
        self.refused: list[str] = []
        event.listen(db.engine, "before_cursor_execute", self._execute)

    def _execute(self, *args: Any) -> None:
        statement: str = args[2]
        if self.when(statement):
            self.refused.append(statement)
            raise sqlite3.OperationalError("attempt to write a readonly database")


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _exports_queued(worker: Worker) -> list[int]:
    calls: list[int] = []
    worker.on_exports_queued = lambda: calls.append(1)
    return calls


def test_an_audit_database_failure_when_the_job_finishes_runs_it_again_and_sends_once(
    tmp_path: Path, db: AuditDB, worker: Worker
) -> None:
    # the log showed job.failed "AuditError: ... attempt to write a readonly database [SQL: UPDATE
    # jobs SET finished_at=?, ...]", the series failed and the result was never sent
    _receive(db, write_series(tmp_path, "a"))
    worker.clock = clock = _Clock()
    notified = _exports_queued(worker)
    once = _FailingWrites(
        db, lambda sql: sql.startswith("UPDATE jobs SET finished_at") and not once.refused
    )
    assert worker.step()
    assert once.refused  # the result was refused ...
    (job,) = _rows(db, Job)
    (series,) = _rows(db, Series)
    assert (job.state, series.state, job.error) == ("queued", "queued", None)  # ... not failed
    assert _rows(db, Result) == [] and _rows(db, Export) == [] and not notified
    (requeued,) = [e for e in _rows(db, Event) if e.kind == "job.requeued"]
    assert "readonly database" in requeued.message and "runs again in 2 s" in requeued.message
    assert "job.failed" not in _kinds(db)
    assert worker.run_batch() == 0  # backing off
    clock.now += 2.0
    assert worker.step()
    (job,) = _rows(db, Job)
    assert (job.state, job.attempts, _rows(db, Series)[0].state) == ("done", 2, "done")
    (result,) = _rows(db, Result)
    exports = _rows(db, Export)
    assert sorted(e.destination for e in exports) == ["archive", "pacs"]
    assert {e.result_id for e in exports} == {result.id} and len(notified) == 1
    assert Path(result.result_dir).is_dir()
    assert not worker.step()


def test_a_job_whose_failure_cannot_be_recorded_is_put_back_when_the_database_is_back(
    tmp_path: Path, db: AuditDB, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    _receive(db, write_series(tmp_path, "a"))
    worker.clock = clock = _Clock()
    real_run = worker.engine.run
    writes = _FailingWrites(db, lambda sql: False)

    def crash_with_the_database_down(series: Any) -> Any:
        monkeypatch.setattr(worker.engine, "run", real_run)
        writes.when = lambda sql: sql.startswith(("INSERT", "UPDATE"))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(worker.engine, "run", crash_with_the_database_down)
    assert worker.step()
    writes.when = lambda sql: False  # the database is back
    # neither the failure nor the way back to queued could be written: still running there
    assert [(j.state, j.attempts) for j in _rows(db, Job)] == [("running", 1)]
    assert _kinds(db)[-1] == "job.running"
    assert worker.run_batch() == 0  # put back to queued, but backing off
    assert [j.state for j in _rows(db, Job)] == ["queued"]
    assert _kinds(db)[-1] == "job.requeued"
    clock.now += 2.0
    assert worker.step()
    assert [(j.state, j.attempts) for j in _rows(db, Job)] == [("done", 2)]
    assert len(_rows(db, Result)) == 1 and len(_rows(db, Export)) == 2
    assert "job.failed" not in _kinds(db)


def test_a_series_failure_still_fails_the_job(
    tmp_path: Path, db: AuditDB, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    _receive(db, write_series(tmp_path, "a"))

    def engine_error(series: Any) -> Any:
        raise RuntimeError("the model cannot take this series")

    monkeypatch.setattr(worker.engine, "run", engine_error)
    worker.step()
    (job,) = _rows(db, Job)
    assert job.state == "failed" and "cannot take this series" in (job.error or "")
    assert _rows(db, Series)[0].state == "failed"


def test_only_errors_of_an_unavailable_database_count_as_its_failure(tmp_path: Path) -> None:
    # SQLite reports a wrong statement as OperationalError too: that one would fail at every
    # try, so it must fail the job rather than requeue it forever
    engine = create_engine(f"sqlite:///{tmp_path / 'x.sqlite'}")
    with engine.connect() as connection, pytest.raises(OperationalError) as wrong:
        connection.exec_driver_sql("SELECT no_such_column FROM no_such_table")
    assert not _database_failed(wrong.value)
    path = tmp_path / "y.sqlite"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.commit()
    read_only = create_engine("sqlite:///file:" + str(path) + "?mode=ro&uri=true")
    with read_only.connect() as connection, pytest.raises(OperationalError) as refused:
        connection.exec_driver_sql("INSERT INTO t VALUES (1)")
    assert _database_failed(refused.value)  # SQLITE_READONLY: the database, not the statement
