"""Export against real Storage SCPs on localhost: delivery, warning statuses, failures, retries with
backoff from the database, dead letters and resend, one destination never blocking another, and
C-ECHO."""

from __future__ import annotations

import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from node_support import Destination, wait_for, write_series
from pydicom.uid import ComprehensiveSRStorage, SegmentationStorage
from sqlalchemy import select

from radnet_node.audit import AuditDB, Event, Export, Job, Result, Series
from radnet_node.config import DestinationSection
from radnet_node.errors import RadnetError
from radnet_node.export import Exporter, deliver_due, echo, requeue_exports, store_files


@pytest.fixture
def db(tmp_path: Path) -> Iterator[AuditDB]:
    database = AuditDB(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    yield database
    database.dispose()


@pytest.fixture
def peer() -> Iterator[Destination]:
    destination = Destination().start()
    yield destination
    destination.stop()


def _free_port() -> int:
    """A port nobody listens on (a server started and stopped again)."""
    closed = Destination().start()
    closed.stop()
    return closed.port


def _destination(name: str, port: int, **values: object) -> DestinationSection:
    base = {"name": name, "ae_title": "PACS", "host": "127.0.0.1", "port": port}
    base.update({"retries": 2, "backoff_seconds": 0.05, "timeout_seconds": 5.0})
    return DestinationSection.model_validate({**base, **values})


def _result_folder(tmp_path: Path) -> Path:
    """A result folder with three DICOM files (and a file export must not send)."""
    folder = tmp_path / "results" / "job-1"
    folder.mkdir(parents=True)
    for index, path in enumerate(write_series(tmp_path, "out", slices=3)):
        shutil.copy(path, folder / f"object-{index}.dcm")
    (folder / "result.json").write_text("{}")
    return folder


def _export_rows(db: AuditDB, folder: Path, destinations: list[str]) -> list[int]:
    with db.session() as session:
        series = Series(series_instance_uid="1.2.3.1", study_instance_uid="1.2.3", state="done")
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, generation=1, state="done")
        session.add(job)
        session.flush()
        result = Result(
            job_id=job.id, series_id=series.id, generation=1, content_hash="0" * 64,
            ct_positive=False, certainty=0.8, sr_sop_instance_uid="1.2.9.1",
            seg_sop_instance_uid="1.2.9.2", result_dir=str(folder), result_json="{}",
        )  # fmt: skip
        session.add(result)
        session.flush()
        rows = [Export(result_id=result.id, destination=name) for name in destinations]
        session.add_all(rows)
        session.flush()
        return [r.id for r in rows]


def _export(db: AuditDB, export_id: int) -> Export:
    with db.session() as session:
        row = session.get(Export, export_id)
        assert row is not None
        return row


def _kinds(db: AuditDB) -> list[str]:
    with db.session() as session:
        return list(session.scalars(select(Event.kind).order_by(Event.id)).all())


def test_store_files_delivers_every_object(tmp_path: Path, peer: Destination) -> None:
    files = sorted(_result_folder(tmp_path).glob("*.dcm"))
    outcome = store_files(_destination("pacs", peer.port), "RADNET", files)
    assert outcome.delivered and outcome.error is None
    assert set(outcome.statuses.values()) == {0x0000}
    assert len(peer.received) == 3


@pytest.mark.parametrize("status", [0xB000, 0xB006, 0xB007])
def test_warning_statuses_count_as_delivered(
    tmp_path: Path, peer: Destination, status: int
) -> None:
    peer.status = status
    files = sorted(_result_folder(tmp_path).glob("*.dcm"))
    outcome = store_files(_destination("pacs", peer.port), "RADNET", files)
    assert outcome.delivered and outcome.last_status == status


def test_a_failure_status_is_not_delivered(tmp_path: Path, peer: Destination) -> None:
    peer.status = 0xA700
    files = sorted(_result_folder(tmp_path).glob("*.dcm"))
    outcome = store_files(_destination("pacs", peer.port), "RADNET", files)
    assert not outcome.delivered
    assert outcome.last_status == 0xA700 and "status 0xA700" in (outcome.error or "")


def test_a_rejected_association_names_the_reason(tmp_path: Path) -> None:
    picky = Destination(ae_title="PACS", require_called_aet=True).start()
    try:
        files = sorted(_result_folder(tmp_path).glob("*.dcm"))
        wrong = _destination("pacs", picky.port, ae_title="NOT-PACS")
        outcome = store_files(wrong, "RADNET", files)
    finally:
        picky.stop()
    assert not outcome.delivered and "rejected" in (outcome.error or "")


def test_a_destination_that_does_not_take_seg_gets_the_sr_and_the_key_image(
    tmp_path: Path, db: AuditDB
) -> None:
    # many PACS store SR but not SEG: the objects it refuses at negotiation are left out and
    # named, the others delivered at the first attempt (no retries on a permanent refusal)
    folder = _result_folder(tmp_path)
    files = sorted(folder.glob("*.dcm"))
    for path, (sop_class, modality) in zip(
        files[1:], [(SegmentationStorage, "SEG"), (ComprehensiveSRStorage, "SR")], strict=True
    ):  # objects of the classes a result holds (the CT slice stands for the key image)
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.Modality = modality
        ds.save_as(path)
    no_seg = Destination(excluded=(SegmentationStorage,)).start()
    try:
        outcome = store_files(_destination("pacs", no_seg.port), "RADNET", files)
        assert outcome.delivered and outcome.error is None
        assert outcome.not_accepted == (SegmentationStorage,)
        assert no_seg.modalities() == ["CT", "SR"]
        (export_id,) = _export_rows(db, folder, ["pacs"])
        deliver_due(db, _destination("pacs", no_seg.port), "RADNET")
    finally:
        no_seg.stop()
    assert _export(db, export_id).state == "delivered"
    with db.session() as session:
        event = session.scalars(select(Event).where(Event.kind == "export.delivered")).one()
        assert "does not accept Segmentation Storage" in event.message
        assert event.level == "warning"


def test_a_destination_that_takes_none_of_the_objects_is_not_delivered(tmp_path: Path) -> None:
    files = sorted(_result_folder(tmp_path).glob("*.dcm"))
    classes = tuple(sorted({str(pydicom.dcmread(f).SOPClassUID) for f in files}))
    nothing = Destination(excluded=classes).start()
    try:
        outcome = store_files(_destination("pacs", nothing.port), "RADNET", files)
    finally:
        nothing.stop()
    assert not outcome.delivered
    assert "accepts none of" in (outcome.error or "")
    assert not nothing.received


def test_destination_down_retries_then_dead_letter_then_resend(tmp_path: Path, db: AuditDB) -> None:
    port = _free_port()
    destination = _destination("pacs", port, retries=2)
    (export_id,) = _export_rows(db, _result_folder(tmp_path), ["pacs"])

    def dead() -> bool:
        deliver_due(db, destination, "RADNET")
        return _export(db, export_id).state == "dead"

    wait_for(dead, 30, "the export to be dead-lettered")
    row = _export(db, export_id)
    assert row.attempts == 3  # the first attempt and two retries
    assert "cannot connect" in (row.last_error or "")
    assert _kinds(db).count("export.retry") == 2 and _kinds(db).count("export.dead") == 1

    peer = Destination().start(port)
    try:
        assert requeue_exports(db, all_dead=True) == [export_id]
        deliver_due(db, destination, "RADNET")
        delivered = _export(db, export_id)
        assert delivered.state == "delivered" and delivered.delivered_at is not None
        assert len(peer.received) == 3
    finally:
        peer.stop()
    assert "export.requeued" in _kinds(db)


def test_retry_waits_for_the_backoff(tmp_path: Path, db: AuditDB) -> None:
    destination = _destination("pacs", _free_port(), backoff_seconds=3600.0)
    (export_id,) = _export_rows(db, _result_folder(tmp_path), ["pacs"])
    assert deliver_due(db, destination, "RADNET") == 1
    assert deliver_due(db, destination, "RADNET") == 0  # not due for an hour
    row = _export(db, export_id)
    assert (row.state, row.attempts) == ("pending", 1)


def test_resend_refuses_unknown_or_pending_exports(tmp_path: Path, db: AuditDB) -> None:
    (export_id,) = _export_rows(db, _result_folder(tmp_path), ["pacs"])
    with pytest.raises(RadnetError, match="export 999: no such export"):
        requeue_exports(db, [999])
    with pytest.raises(RadnetError, match=f"export {export_id}: already pending"):
        requeue_exports(db, [export_id])


def test_a_failing_destination_does_not_block_another(
    tmp_path: Path, db: AuditDB, peer: Destination
) -> None:
    stop = threading.Event()
    # a silent peer: the connection is accepted but never answered, so every attempt waits
    silent = _silent_listener()
    good = _destination("good", peer.port)
    slow = _destination("slow", silent.getsockname()[1], timeout_seconds=20.0, retries=0)
    good_id, slow_id = _export_rows(db, _result_folder(tmp_path), ["good", "slow"])
    exporters = [Exporter(db, d, "RADNET", stop, poll_seconds=0.1) for d in (slow, good)]
    try:
        for exporter in exporters:
            exporter.start()
        wait_for(lambda: _export(db, good_id).state == "delivered", 15, "the good destination")
        assert _export(db, slow_id).state == "sending"  # still waiting on the silent peer
    finally:
        stop.set()
        silent.close()
        for exporter in exporters:
            exporter.thread.join(30)
    assert len(peer.received) == 3


def _silent_listener() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    return listener


def test_echo_reports_success_and_failure(peer: Destination) -> None:
    ok = echo("127.0.0.1", peer.port, called_ae_title="PACS", timeout=5.0)
    assert ok.ok and ok.status == 0x0000
    down = echo("127.0.0.1", _free_port(), timeout=5.0)
    assert not down.ok and "cannot connect" in (down.error or "")
