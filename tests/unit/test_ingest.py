"""The SCP against real associations on localhost: spool bytes and rows, duplicates, the association
checks with their A-ASSOCIATE-RJ reasons, the association limit, the disk threshold, compressed
transfer syntaxes; every refusal has an audit row.

Every test runs twice: with the C receive loop (radnet_node/_fastscp.c, which settles ordinary
C-STOREs and hands everything else to the Python code at a clean point) and with the Python loop
alone (``RADNET_NODE_INGEST_LOOP=python``)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
from association_pdus import (
    VERIFICATION,
    associate_rq_pdu,
    c_store_rq,
    command_pdu,
    encoded,
    p_data_tf,
    raw_association,
    read_pdu,
    read_response,
    release,
)
from node_support import reject_reason, send, wait_for, write_series
from pydicom import dcmwrite
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    Verification,
)
from sqlalchemy import func, select

from radnet_node import dicom_ul, ingest
from radnet_node.audit import Association, AuditDB, Base, Event, Instance, Series, study_story
from radnet_node.config import NodeSection
from radnet_node.ingest import (
    CT_STORAGE_CLASSES,
    CT_TRANSFER_SYNTAXES,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    IngestSCP,
    _FreeSpace,
    _place,
    _Recorder,
    _write_all,
    spool_path,
)


@pytest.fixture(autouse=True, params=["c", "python"])
def receive_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The receive loop of the SCPs a test starts (read when an IngestSCP is made)."""
    if request.param == "c":
        assert ingest._fastscp is not None, "the C receive loop is not built (see setup.py)"
    monkeypatch.setenv(ingest.C_LOOP_ENV, request.param)
    return str(request.param)


def _node(tmp_path: Path, **values: object) -> NodeSection:
    base = {"host": "127.0.0.1", "port": 0, "data_dir": tmp_path / "data", "min_free_disk_mb": 0}
    return NodeSection.model_validate({**base, **values})


@pytest.fixture
def db(tmp_path: Path) -> Iterator[AuditDB]:
    database = AuditDB(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    yield database
    database.dispose()


@contextmanager
def _running(node: NodeSection, db: AuditDB) -> Iterator[IngestSCP]:
    scp = IngestSCP(node, db)
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


@pytest.fixture
def scp(tmp_path: Path, db: AuditDB) -> Iterator[IngestSCP]:
    with _running(_node(tmp_path), db) as running:
        yield running


def _events(db: AuditDB, kind: str) -> list[Event]:
    with db.session() as session:
        return list(session.scalars(select(Event).where(Event.kind == kind)).all())


def test_store_spools_the_bytes_as_sent_and_records_them(
    tmp_path: Path, scp: IngestSCP, db: AuditDB
) -> None:
    files = write_series(tmp_path, "a")
    assert send(scp.address[1], files) == [0x0000] * len(files)
    _closed_associations(db, 1)
    with db.session() as session:
        rows = session.scalars(select(Instance).order_by(Instance.id)).all()
        series = session.scalars(select(Series)).one()
    assert len(rows) == len(files) and series.instance_count == len(files)
    assert series.state == "received" and series.accession_number == "ACCa"
    # dated when the instance came, not when its row was committed (after the release)
    (first,) = _events(db, "series.first_instance")
    assert first.at == series.first_instance_at == rows[0].received_at
    for path, row in zip(files, rows, strict=True):
        sent = pydicom.dcmread(path)
        spooled = Path(row.spool_path)
        assert spooled == spool_path(
            scp.spool_dir, sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID
        )
        stored = pydicom.dcmread(spooled)
        assert stored.PixelData == sent.PixelData
        assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert row.size_bytes == spooled.stat().st_size
        assert row.association_id is not None
    assert not [p for p in scp.spool_dir.rglob(".*")]  # no temporary file left behind
    closed = wait_for(lambda: _events(db, "association.closed"), 10, "association closed row")
    assert "6 instance(s) stored" in closed[0].message


def test_a_duplicate_sop_instance_is_stored_once_and_audited(
    tmp_path: Path, scp: IngestSCP, db: AuditDB
) -> None:
    files = write_series(tmp_path, "a")
    send(scp.address[1], files[:2])
    before = Path(spool_path(scp.spool_dir, *_uids(files[0]))).stat().st_mtime_ns
    assert send(scp.address[1], files[:1]) == [0x0000]
    _closed_associations(db, 2)
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 2
        assert session.scalars(select(Series)).one().instance_count == 2
    assert Path(spool_path(scp.spool_dir, *_uids(files[0]))).stat().st_mtime_ns == before
    duplicate = _events(db, "instance.duplicate")
    assert len(duplicate) == 1 and duplicate[0].sop_instance_uid == _uids(files[0])[2]


def _uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_transfer_syntaxes_are_accepted_without_decoding(
    tmp_path: Path, scp: IngestSCP, db: AuditDB, syntax: str
) -> None:
    files = write_series(tmp_path, "c", slices=1, transfer_syntax=syntax)
    assert send(scp.address[1], files) == [0x0000]
    _closed_associations(db, 1)
    with db.session() as session:
        row = session.scalars(select(Instance)).one()
    assert row.transfer_syntax_uid == syntax
    # the encapsulated stream as sent (the file meta is the receiver's own)
    assert pydicom.dcmread(row.spool_path).PixelData == pydicom.dcmread(files[0]).PixelData


def test_ct_classes_are_offered_in_the_usual_transfer_syntaxes(scp: IngestSCP) -> None:
    supported = {c.abstract_syntax: set(c.transfer_syntax) for c in scp.supported_contexts}
    for sop_class in CT_STORAGE_CLASSES:
        assert {
            "1.2.840.10008.1.2.1",  # explicit VR little endian
            "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
            "1.2.840.10008.1.2.4.57",  # JPEG lossless P14
            "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
            "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
            "1.2.840.10008.1.2.4.91",  # JPEG 2000
            "1.2.840.10008.1.2.5",  # RLE
        } <= supported[sop_class]


def test_echo_succeeds(scp: IngestSCP) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.address[1], ae_title="RADNET")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_wrong_called_ae_title_is_rejected_and_audited(scp: IngestSCP, db: AuditDB) -> None:
    assert reject_reason(scp.address[1], called="OTHER") == (0x01, 0x01, 0x07)
    with db.session() as session:
        row = session.scalars(select(Association)).one()
    assert not row.accepted and "called AE title 'OTHER'" in (row.reject_reason or "")
    assert _events(db, "association.rejected")


def test_calling_ae_and_host_allow_lists(tmp_path: Path, db: AuditDB) -> None:
    node = _node(tmp_path, allowed_calling_ae_titles=["ORTHANC"], allowed_hosts=["127.0.0.1"])
    with _running(node, db) as scp:
        port = scp.address[1]
        assert reject_reason(port, calling="MODALITY") == (0x01, 0x01, 0x03)
        assert reject_reason(port, calling="ORTHANC") is None
        # an address outside the allow-list (pynetdicom binds the client to it)
        refused = reject_reason(port, calling="ORTHANC", bind_address=("127.0.0.2", 0))
        assert refused == (0x01, 0x01, 0x01)
    reasons = [e.message for e in _events(db, "association.rejected")]
    assert any("calling AE title 'MODALITY' is not allowed" in r for r in reasons)
    assert any("host 127.0.0.2 is not allowed" in r for r in reasons)


def test_associations_beyond_the_limit_are_rejected_transiently(
    tmp_path: Path, db: AuditDB
) -> None:
    with _running(_node(tmp_path, max_associations=1), db) as scp:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        first = ae.associate("127.0.0.1", scp.address[1], ae_title="RADNET")
        assert first.is_established
        try:
            assert reject_reason(scp.address[1]) == (0x02, 0x03, 0x02)
        finally:
            first.release()
        wait_for(lambda: scp.active_associations() == 0, 10, "the first association to close")
        assert reject_reason(scp.address[1]) is None
    assert "the limit is 1" in _events(db, "association.rejected")[0].message


def test_low_disk_space_refuses_with_out_of_resources(tmp_path: Path, db: AuditDB) -> None:
    files = write_series(tmp_path, "d", slices=1)
    with _running(_node(tmp_path, min_free_disk_mb=10**12), db) as scp:
        assert send(scp.address[1], files) == [STATUS_OUT_OF_RESOURCES]
        assert not list(scp.spool_dir.rglob("*.dcm"))
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
    refused = _events(db, "instance.refused")
    assert "0xA700" in refused[0].message and "free disk space" in refused[0].message


def test_free_space_is_reserved_per_instance_between_readings(tmp_path: Path) -> None:
    # read once an hour: each instance reserves its size under the lock, so associations cannot
    # all pass the threshold on the same reading
    free = _FreeSpace(tmp_path, max_age_s=3600.0)
    assert free.reserve(0, 0)
    available = free._free_bytes
    mib = 1024 * 1024
    assert free.reserve(available - 100 * mib, 50)  # leaves 100 MiB
    assert not free.reserve(60 * mib, 50)  # would leave 40 MiB: refused, nothing taken
    assert free.reserve(50 * mib, 50)  # leaves exactly 50 MiB
    assert not free.reserve(1, 50)
    fresh = _FreeSpace(tmp_path, max_age_s=0.0)  # read every time: back to the real figure
    assert fresh.reserve(available - 1024 * mib, 50)
    assert fresh.reserve(available - 1024 * mib, 50)


def test_the_first_instance_of_a_new_study_creates_its_folders(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    for durable in (False, True):
        final = spool_path(spool, "1.2.3", f"1.2.3.{int(durable)}", "1.2.3.4.5")
        temporary = spool / ".incoming.tmp"
        temporary.write_bytes(b"abcdef")
        _place(temporary, final, durable=durable)
        assert final.read_bytes() == b"abcdef"
        assert not temporary.exists()
        assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_a_database_failure_keeps_what_was_answered_and_refuses_more_until_it_is_back(
    tmp_path: Path, scp: IngestSCP, db: AuditDB
) -> None:
    first, second = write_series(tmp_path, "e", slices=2)
    with db.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE instances")  # every insert fails from now on
    # answered once its file is in the spool: the row follows from the recorder, which now fails
    assert send(scp.address[1], [first]) == [0x0000]
    first_path = spool_path(scp.spool_dir, *_uids(first))
    assert first_path.is_file()
    recorder = scp._state.recorder  # type: ignore[union-attr]
    wait_for(lambda: recorder.error is not None, 10, "the recorder to see the failure")
    # its series is still arriving for the completion tick: no row says so, the recorder does
    assert scp.pending_series() == {pydicom.dcmread(first).SeriesInstanceUID}
    # while the database fails nothing more is taken: the sender keeps it and sends it again
    assert send(scp.address[1], [second]) == [STATUS_OUT_OF_RESOURCES]
    assert not spool_path(scp.spool_dir, *_uids(second)).exists()
    Base.metadata.create_all(db.engine)  # the database is back: the retried batch commits
    wait_for(lambda: recorder.error is None and recorder.backlog == 0, 15, "the retry")
    assert scp.pending_series() == set()
    with db.session() as session:
        paths = session.scalars(select(Instance.spool_path)).all()
    assert paths == [str(first_path)]
    assert send(scp.address[1], [second]) == [0x0000]


def test_an_association_whose_row_cannot_be_written_is_aborted_then_rejected_until_it_can(
    tmp_path: Path, scp: IngestSCP, db: AuditDB
) -> None:
    # while the database answers, the A-ASSOCIATE-AC goes out before the association's row is
    # written; when that write fails, nothing is taken on that association (A-ABORT), and the
    # next row is written before the answer again, so the next association is rejected
    (first,) = write_series(tmp_path, "a", slices=1)
    with db.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE associations")
    with socket.create_connection(("127.0.0.1", scp.address[1]), timeout=20) as sock:
        sock.sendall(associate_rq_pdu([VERIFICATION, CTImageStorage]))
        assert read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
        assert read_pdu(sock)[0] == 0x07  # A-ABORT
    assert reject_reason(scp.address[1]) == (0x02, 0x01, 0x01)  # transient, no reason given
    Base.metadata.create_all(db.engine)  # the database is back
    assert send(scp.address[1], [first]) == [0x0000]
    assert send(scp.address[1], [first]) == [0x0000]  # (a duplicate) answered first again

    def ends() -> list[Any]:  # (written after the A-RELEASE-RP)
        with db.session() as session:
            rows = session.execute(select(Association.accepted, Association.end_reason)).all()
        return rows if all(end for _, end in rows) else []

    assert wait_for(ends, 10, "both associations' ends") == [(True, "released")] * 2
    assert not scp._state.audit_failing  # type: ignore[union-attr]


def test_a_dataset_without_valid_uids_is_not_understood(
    tmp_path: Path, scp: IngestSCP, db: AuditDB
) -> None:
    first, second, third = write_series(tmp_path, "f", slices=3)
    ds = pydicom.dcmread(second)
    ds.SeriesInstanceUID = "../../etc"
    # between good ones on one association: each request after the first gets the temporary file
    # the association opened ahead, and the refused one's is dropped
    assert send(scp.address[1], [first, ds, third]) == [0x0000, 0xC000, 0x0000]
    assert sorted(p.name for p in (tmp_path / "data").rglob("*.dcm")) == sorted(
        f"{pydicom.dcmread(f).SOPInstanceUID}.dcm" for f in (first, third)
    )
    assert not list((tmp_path / "data").rglob(".incoming*"))
    assert "SeriesInstanceUID '../../etc'" in _events(db, "instance.refused")[0].message


def test_a_refused_study_is_found_by_audit_show_by_its_accession_or_series(
    tmp_path: Path, scp: IngestSCP, db: AuditDB
) -> None:
    # every instance refused: no series row, yet the admin looks it up by what the PACS shows
    datasets = [pydicom.dcmread(p) for p in write_series(tmp_path, "nostudy", slices=2)]
    for ds in datasets:
        del ds.StudyInstanceUID
        ds.AccessionNumber = "ACC-REFUSED"
    assert send(scp.address[1], datasets) == [0xC000, 0xC000]
    with db.session() as session:
        for query in ("ACC-REFUSED", str(datasets[0].SeriesInstanceUID)):
            story = study_story(session, query)
            assert story is not None, query
            assert story.series == () and story.accession_numbers == ("ACC-REFUSED",)
            assert [e.kind for e in story.events] == ["instance.refused"] * 2
            assert "StudyInstanceUID '' is missing or not a UID" in story.events[0].message
        assert study_story(session, "ACC-OTHER") is None


def test_only_ct_classes_when_other_storage_is_not_accepted(tmp_path: Path, db: AuditDB) -> None:
    scp = IngestSCP(_node(tmp_path, accept_all_storage_classes=False), db)
    classes = {c.abstract_syntax for c in scp.supported_contexts}
    assert classes == {*CT_STORAGE_CLASSES, Verification}
    assert CTImageStorage in classes


def test_presentation_contexts_the_node_does_not_take_are_named_in_the_audit(
    tmp_path: Path, db: AuditDB
) -> None:
    with _running(_node(tmp_path, accept_all_storage_classes=False), db) as running:
        scu = AE(ae_title="MODALITY")
        scu.add_requested_context(CTImageStorage)
        scu.add_requested_context(MRImageStorage)
        assoc = scu.associate("127.0.0.1", running.address[1], ae_title="RADNET")
        assert assoc.is_established
        assert [str(c.abstract_syntax) for c in assoc.accepted_contexts] == [CTImageStorage]
        assoc.release()
        closed = wait_for(lambda: _events(db, "association.closed"), 10, "association closed row")
    assert "presentation contexts refused: MR Image Storage" in closed[0].message
    assert closed[0].level == "warning"


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_uncompressed_syntaxes_are_spooled_as_sent(
    tmp_path: Path, scp: IngestSCP, db: AuditDB, syntax: str
) -> None:
    # implicit VR: the header scan's other encoding; big endian: read back with pydicom instead
    original = pydicom.dcmread(write_series(tmp_path, "s", slices=1)[0])
    original.file_meta.TransferSyntaxUID = syntax
    dcmwrite(
        tmp_path / "re-encoded.dcm",
        original,
        implicit_vr=syntax == ImplicitVRLittleEndian,
        little_endian=syntax != ExplicitVRBigEndian,
        force_encoding=True,
    )
    ds = pydicom.dcmread(tmp_path / "re-encoded.dcm")
    assert send(scp.address[1], [ds]) == [0x0000]
    spooled = pydicom.dcmread(spool_path(scp.spool_dir, *_uids_of(ds)))
    assert spooled.file_meta.TransferSyntaxUID == syntax
    assert spooled.SeriesDescription == ds.SeriesDescription
    assert spooled.PixelData == ds.PixelData
    wait_for(lambda: _instance_count(db) == 1, 10, "the instance row")


def test_fsync_spool_makes_every_file_durable_before_success(tmp_path: Path, db: AuditDB) -> None:
    files = write_series(tmp_path, "d", slices=2)
    with _running(_node(tmp_path, fsync_spool=True), db) as running:
        assert send(running.address[1], files) == [0x0000, 0x0000]
        for path in files:
            assert spool_path(running.spool_dir, *_uids(path)).read_bytes()[128:132] == b"DICM"


def _closed_associations(db: AuditDB, count: int) -> None:
    """Wait until ``count`` associations have their closed row: each association's instance rows
    are committed before it (after the A-RELEASE-RP, which does not wait for them)."""
    wait_for(lambda: len(_events(db, "association.closed")) >= count, 10, "the closed rows")


def _uids_of(ds: pydicom.Dataset) -> tuple[str, str, str]:
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _instance_count(db: AuditDB) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def test_a_broken_protocol_aborts_the_association_with_the_reason_audited(
    scp: IngestSCP, db: AuditDB
) -> None:
    with raw_association(scp.address[1]) as sock:
        # a PDV on presentation context 99, which was never proposed
        sock.sendall(struct.pack(">BBIIBB", 0x04, 0, 8, 4, 99, 0x03) + b"xx")
        assert read_pdu(sock)[0] == 0x07  # A-ABORT
    closed = wait_for(lambda: _events(db, "association.closed"), 10, "association closed row")
    assert "aborted (protocol error: P-DATA on presentation context 99" in closed[0].message


def test_an_empty_command_set_aborts_the_association_with_the_reason_audited(
    scp: IngestSCP, db: AuditDB
) -> None:
    with raw_association(scp.address[1]) as sock:
        sock.sendall(p_data_tf(b"", 0x03))  # a last command fragment of no bytes
        assert read_pdu(sock)[0] == 0x07  # A-ABORT
    closed = wait_for(lambda: _events(db, "association.closed"), 10, "association closed row")
    assert "aborted (protocol error: command set lacks (0000,0100))" in closed[0].message


def test_a_data_set_that_cannot_be_parsed_is_refused_and_nothing_is_kept(
    scp: IngestSCP, db: AuditDB
) -> None:
    # an undefined length on an element that starts no sequence, in the first fragment; the
    # rest of the data set follows in a second one
    bad = struct.pack("<HHI", 0x0008, 0x0005, 0xFFFFFFFF) + struct.pack("<HHI", 0x0008, 0x0016, 4)
    with raw_association(scp.address[1]) as sock:
        sock.sendall(c_store_rq("1.2.826.0.1.3680043.8.498.5"))
        sock.sendall(_dataset_pdu(bad + b"1.2\x00", last=False))
        sock.sendall(_dataset_pdu(b"\x00" * 4096))
        assert read_response(sock).Status == 0xC000
        release(sock)
    refused = _events(db, "instance.refused")
    assert len(refused) == 1
    assert (
        "the dataset cannot be parsed (unexpected tag 00080016 in a sequence)" in refused[0].message
    )
    assert not [p for p in scp.spool_dir.rglob("*") if p.is_file()]


def test_a_peer_silent_in_the_middle_of_a_dataset_is_aborted_and_nothing_is_kept(
    tmp_path: Path, db: AuditDB
) -> None:
    with _running(_node(tmp_path), db) as scp:
        scp.NETWORK_TIMEOUT_S = 0.5
        with raw_association(scp.address[1]) as sock:
            sock.sendall(c_store_rq("1.2.826.0.1.3680043.8.498.1"))
            # the first bytes of the data set (not its last fragment), then nothing
            part = struct.pack("<HHI", 0x0008, 0x0016, 26) + b"1.2.840.10008.5.1.4.1.1.2\x00"
            sock.sendall(_dataset_pdu(part, last=False))
            started = time.monotonic()
            assert read_pdu(sock)[0] == 0x07  # A-ABORT
            assert time.monotonic() - started < 10
        closed = wait_for(lambda: _events(db, "association.closed"), 10, "association closed row")
        assert "aborted (no progress for 0.5 s)" in closed[0].message
        # the unfinished instance was never answered: no file of it is kept, not even a temporary
        wait_for(
            lambda: not [p for p in scp.spool_dir.rglob("*") if p.is_file()], 10, "empty spool"
        )


def _dataset_pdu(data: bytes, *, last: bool = True) -> bytes:
    """A P-DATA-TF holding a data set fragment (the last one unless ``last`` is False)."""
    return p_data_tf(data, 0x02 if last else 0x00)


def _implicit_dataset(tmp_path: Path) -> tuple[pydicom.Dataset, bytes]:
    """A one-slice CT instance and its data set encoded in Implicit VR Little Endian."""
    return _implicit_dataset_of(pydicom.dcmread(write_series(tmp_path, "s", slices=1)[0]))


def _implicit_dataset_of(ds: pydicom.Dataset) -> tuple[pydicom.Dataset, bytes]:
    return ds, encoded(ds, implicit=True)


def _store_first_of_series(tmp_path: Path, sock: socket.socket) -> pydicom.Dataset:
    """Store the first slice of a two-slice series (its folders then exist: the C loop settles
    the second itself); returns the second."""
    first, second = (pydicom.dcmread(p) for p in write_series(tmp_path, "pair", slices=2))
    sock.sendall(c_store_rq(str(first.SOPInstanceUID), 7))
    sock.sendall(_dataset_pdu(_implicit_dataset_of(first)[1]))
    assert read_response(sock).Status == 0x0000
    return second


def test_a_data_set_of_another_sop_class_than_its_request_is_refused(
    tmp_path: Path, scp: IngestSCP, db: AuditDB
) -> None:
    # a CT request on the CT context whose data set says MR: 0xA900 (PS3.4 B.2.3), nothing kept
    with raw_association(scp.address[1]) as sock:
        ds = _store_first_of_series(tmp_path, sock)
        ds.SOPClassUID = MRImageStorage
        _, data = _implicit_dataset_of(ds)
        sock.sendall(c_store_rq(str(ds.SOPInstanceUID)))
        sock.sendall(_dataset_pdu(data))
        assert read_response(sock).Status == 0xA900
        release(sock)
    refused = _events(db, "instance.refused")
    assert len(refused) == 1
    assert "SOPClassUID MR Image Storage" in refused[0].message
    assert "CT Image Storage" in refused[0].message
    assert len(list(scp.spool_dir.rglob("*.dcm"))) == 1  # the first slice only
    assert not spool_path(scp.spool_dir, *_uids_of(ds)).exists()


def test_a_data_set_whose_sop_instance_uid_is_not_its_request_s_is_refused(
    tmp_path: Path, scp: IngestSCP, db: AuditDB
) -> None:
    # the file would be stored under the request's UID while the data set says another
    request_uid = "1.2.826.0.1.3680043.8.498.77"
    with raw_association(scp.address[1]) as sock:
        ds = _store_first_of_series(tmp_path, sock)
        sock.sendall(c_store_rq(request_uid))
        sock.sendall(_dataset_pdu(_implicit_dataset_of(ds)[1]))
        assert read_response(sock).Status == 0xC000
        release(sock)
    refused = _events(db, "instance.refused")
    assert len(refused) == 1
    assert f"SOPInstanceUID {ds.SOPInstanceUID} differs from the request's" in refused[0].message
    assert len(list(scp.spool_dir.rglob("*.dcm"))) == 1  # the first slice only
    assert not spool_path(scp.spool_dir, *_uids_of(ds)[:2], request_uid).exists()
    wait_for(lambda: _instance_count(db) == 1, 5, "the first slice's row")


def test_a_slow_peer_that_keeps_sending_is_not_cut_off(tmp_path: Path, db: AuditDB) -> None:
    # one PDU that takes longer than the network timeout to arrive, each pause shorter than it:
    # the timeout is about progress, not about how long a PDU takes
    ds, data = _implicit_dataset(tmp_path)
    with _running(_node(tmp_path), db) as scp:
        scp.NETWORK_TIMEOUT_S = 0.6
        with raw_association(scp.address[1]) as sock:
            sock.sendall(c_store_rq(ds.SOPInstanceUID))
            pdu = _dataset_pdu(data)
            pieces = 5
            step = len(pdu) // pieces + 1
            for start in range(0, len(pdu), step):
                sock.sendall(pdu[start : start + step])
                time.sleep(0.25)  # 5 x 0.25 s: the PDU takes twice the timeout
            pdu_type, body = read_pdu(sock)
            assert pdu_type == 0x04
            assert pydicom.dcmread(BytesIO(body[6:]), force=True).Status == 0x0000
            sock.sendall(bytes.fromhex("05000000000400000000"))  # A-RELEASE-RQ
            assert read_pdu(sock)[0] == 0x06
        spooled = pydicom.dcmread(spool_path(scp.spool_dir, *_uids_of(ds)))
        assert spooled.PixelData == ds.PixelData


def test_a_peer_silent_in_the_middle_of_a_pdu_is_aborted_and_nothing_is_kept(
    tmp_path: Path, db: AuditDB
) -> None:
    ds, data = _implicit_dataset(tmp_path)
    with _running(_node(tmp_path), db) as scp:
        scp.NETWORK_TIMEOUT_S = 1.0
        with raw_association(scp.address[1]) as sock:
            sock.sendall(c_store_rq(ds.SOPInstanceUID))
            pdu = _dataset_pdu(data)
            sock.sendall(pdu[: len(pdu) // 2])  # half of the PDU, then nothing
            started = time.monotonic()
            assert read_pdu(sock)[0] == 0x07  # A-ABORT
            # after the timeout, not twice it (a read that must fill the PDU restarts no clock)
            assert time.monotonic() - started < 1.8
        closed = wait_for(lambda: _events(db, "association.closed"), 10, "association closed row")
        assert "aborted (no progress for 1 s)" in closed[0].message
        wait_for(
            lambda: not [p for p in scp.spool_dir.rglob("*") if p.is_file()], 10, "empty spool"
        )


def test_a_c_store_whose_sop_class_uid_is_not_a_uid_is_refused_and_nothing_is_kept(
    scp: IngestSCP, db: AuditDB
) -> None:
    with raw_association(scp.address[1]) as sock:
        command = b"".join(
            struct.pack("<HHI", 0, element, len(value)) + value
            for element, value in (
                (0x0002, b"1.2.840.\xff\x00"),  # not a UID (nor ASCII)
                (0x0100, struct.pack("<H", 0x0001)),  # C-STORE-RQ
                (0x0110, struct.pack("<H", 5)),
                (0x0700, struct.pack("<H", 0)),
                (0x0800, struct.pack("<H", 0x0000)),
                (0x1000, b"1.2.826.0.1.3680043.8.498.2\x00"),
            )
        )
        sock.sendall(p_data_tf(command, 0x03))
        part = struct.pack("<HHI", 0x0008, 0x0016, 26) + b"1.2.840.10008.5.1.4.1.1.2\x00"
        sock.sendall(_dataset_pdu(part))  # the whole (tiny) data set
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x04
        response = pydicom.dcmread(BytesIO(body[6:]), force=True)
        assert response.MessageIDBeingRespondedTo == 5
        assert response.Status == 0xC000
        sock.sendall(bytes.fromhex("05000000000400000000"))  # A-RELEASE-RQ
        assert read_pdu(sock)[0] == 0x06
    assert "AffectedSOPClassUID" in _events(db, "instance.refused")[0].message
    assert not [p for p in scp.spool_dir.rglob("*") if p.is_file()]


def test_a_service_the_node_does_not_offer_is_refused_and_the_association_goes_on(
    scp: IngestSCP,
) -> None:
    with raw_association(scp.address[1]) as sock:
        # a C-FIND-RQ (no data set) on the Verification context, then a C-ECHO-RQ
        for field_, message_id in ((0x0020, 7), (0x0030, 8)):
            command = b"".join(
                struct.pack("<HHI", 0, element, len(value)) + value
                for element, value in (
                    (0x0002, b"1.2.840.10008.1.1\x00"),
                    (0x0100, struct.pack("<H", field_)),
                    (0x0110, struct.pack("<H", message_id)),
                    (0x0800, struct.pack("<H", 0x0101)),
                )
            )
            sock.sendall(p_data_tf(command, 0x03, context_id=1))
            pdu_type, body = read_pdu(sock)
            assert pdu_type == 0x04
            response = pydicom.dcmread(BytesIO(body[6:]), force=True)
            assert response.CommandField == field_ | 0x8000
            assert response.MessageIDBeingRespondedTo == message_id
            assert response.Status == (0x0211 if field_ == 0x0020 else 0x0000)
        sock.sendall(bytes.fromhex("05000000000400000000"))  # A-RELEASE-RQ
        assert read_pdu(sock)[0] == 0x06  # A-RELEASE-RP


def test_the_file_meta_and_the_first_fragment_go_in_one_write_in_order(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert _write_all(fd, b"meta", memoryview(b"-fragment")) == 13
        assert _write_all(fd, b"", memoryview(b"-next")) == 5
        assert _write_all(fd, b"-last") == 5
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"meta-fragment-next-last"


def test_a_write_cut_short_raises_and_what_was_written_is_in_order() -> None:
    # a pipe nobody reads takes only its capacity, like a disk that fills up mid-write
    read_end, write_end = os.pipe()
    try:
        capacity = fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # its smallest
        os.set_blocking(write_end, False)
        first, second = b"m" * 100, bytes(range(256)) * 64
        with pytest.raises(OSError):
            _write_all(write_end, first, memoryview(second))
        assert os.read(read_end, 1 << 20) == (first + second)[:capacity]
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.filterwarnings("ignore:Unknown encoding 'ISO_IR 999'")
@pytest.mark.parametrize(
    ("charset", "description", "expected"),
    [
        ("ISO_IR 192", "Schädel nativ – 頭部".encode(), "Schädel nativ – 頭部"),
        ("ISO_IR 100", "Schädel nativ".encode("latin-1"), "Schädel nativ"),
        # a character set nobody knows: the instance is stored, its text read leniently
        ("ISO_IR 999", "Schädel".encode("latin-1"), "Schädel"),
    ],
)
def test_text_elements_reach_the_catalog_in_the_dataset_s_character_set(
    tmp_path: Path,
    scp: IngestSCP,
    db: AuditDB,
    *,
    charset: str,
    description: bytes,
    expected: str,
) -> None:
    ds = pydicom.dcmread(write_series(tmp_path, "s", slices=1)[0])
    ds.SpecificCharacterSet = charset
    ds["SeriesDescription"] = pydicom.DataElement(0x0008103E, "LO", description)
    assert send(scp.address[1], [ds]) == [0x0000]
    wait_for(lambda: _instance_count(db) == 1, 10, "the instance row")
    with db.session() as session:
        series = session.scalars(select(Series)).one()
    assert series.series_description == expected


def test_an_instance_whose_peer_leaves_without_waiting_for_the_answer_is_recorded(
    tmp_path: Path, scp: IngestSCP, db: AuditDB
) -> None:
    # the peer closes the connection right after the last fragment (no release): the instance
    # is at its place and gets its row whether or not the answer could still be sent
    ds, data = _implicit_dataset(tmp_path)
    with raw_association(scp.address[1]) as sock:
        sock.sendall(c_store_rq(ds.SOPInstanceUID))
        sock.sendall(_dataset_pdu(data))
    wait_for(lambda: _instance_count(db) == 1, 10, "the instance row")
    closed = wait_for(lambda: _events(db, "association.closed"), 10, "association closed row")
    assert "1 instance(s) stored" in closed[0].message
    assert spool_path(scp.spool_dir, *_uids_of(ds)).is_file()


def test_an_instance_whose_answer_cannot_be_sent_is_still_recorded(
    tmp_path: Path, db: AuditDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the connection breaks as the success answer goes out: the file is at its place, so its row
    # must follow (the sender will send it again, and it is then a duplicate)
    def broken(self: object, request: object, status: int, *args: object, **kw: object) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("radnet_node.ingest._Association._answer", broken)
    monkeypatch.setattr(ingest, "_C_BUDGET", 1)  # the C loop hands the dataset to that code
    ds, data = _implicit_dataset(tmp_path)
    with _running(_node(tmp_path), db) as scp, raw_association(scp.address[1]) as sock:
        sock.sendall(c_store_rq(ds.SOPInstanceUID))
        sock.sendall(_dataset_pdu(data))
        wait_for(lambda: _instance_count(db) == 1, 10, "the instance row")
        closed = wait_for(lambda: _events(db, "association.closed"), 10, "association closed")
        assert "aborted (connection failed" in closed[0].message
        assert "1 instance(s) stored" in closed[0].message
        assert spool_path(scp.spool_dir, *_uids_of(ds)).is_file()
        assert not list(scp.spool_dir.glob(".incoming*"))


@pytest.mark.parametrize("number", [b"inf ", b"1e99", b"nan ", b"x   "])
def test_a_series_number_that_is_no_usable_number_is_stored_without_one(
    tmp_path: Path, db: AuditDB, number: bytes
) -> None:
    # answered with success before the row is built: nothing in the row may fail after that
    ds = pydicom.dcmread(write_series(tmp_path, "s", slices=1)[0])
    ds.SeriesNumber = 1234
    _, data = _implicit_dataset_of(ds)
    element = struct.pack("<HHI", 0x0020, 0x0011, 4) + b"1234"
    assert data.count(element) == 1
    data = data.replace(element, element[:8] + number)  # what pydicom would not write
    with _running(_node(tmp_path), db) as scp, raw_association(scp.address[1]) as sock:
        sock.sendall(c_store_rq(ds.SOPInstanceUID))
        sock.sendall(_dataset_pdu(data))
        pdu_type, body = read_pdu(sock)
        assert pydicom.dcmread(BytesIO(body[6:]), force=True).Status == 0x0000
        sock.sendall(bytes.fromhex("05000000000400000000"))  # A-RELEASE-RQ
        assert read_pdu(sock)[0] == 0x06
    with db.session() as session:
        assert session.scalars(select(Series)).one().series_number is None
    closed = wait_for(lambda: _events(db, "association.closed"), 10, "association closed row")
    assert "released: 1 instance(s) stored" in closed[0].message


def test_the_release_is_answered_before_the_catalog_commit_and_the_rows_follow(
    tmp_path: Path, db: AuditDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every instance was answered once its file was in the spool: the A-RELEASE-RP does not
    # wait for the catalog (a commit blocked here), and the rows and the association's end follow
    commit, flush, release_rp = _Recorder._commit, _Recorder.flush, dicom_ul.release_rp_pdu
    go = threading.Event()
    steps: list[str] = []

    def blocked_commit(self: _Recorder, batch: list[Any]) -> bool:
        go.wait(60)
        return commit(self, batch)

    def flush_noted(self: _Recorder, timeout_s: float, **kwargs: Any) -> bool:
        steps.append("flush")
        return flush(self, timeout_s, **kwargs)

    def release_rp_noted() -> bytes:
        steps.append("A-RELEASE-RP")
        return release_rp()

    monkeypatch.setattr(_Recorder, "_commit", blocked_commit)
    monkeypatch.setattr(_Recorder, "flush", flush_noted)
    monkeypatch.setattr(dicom_ul, "release_rp_pdu", release_rp_noted)
    files = write_series(tmp_path, "r", slices=3)
    with _running(_node(tmp_path), db) as scp:
        assert send(scp.address[1], files) == [0x0000] * 3  # released, the commit still blocked
        assert not go.is_set()
        assert _instance_count(db) == 0
        assert steps[0] == "A-RELEASE-RP"  # not after waiting for the recorder
        assert len(list((tmp_path / "data" / "spool").rglob("*.dcm"))) == 3
        go.set()
        wait_for(lambda: _instance_count(db) == 3, 10, "the three rows")
        closed = wait_for(lambda: _events(db, "association.closed"), 10, "association closed row")
        assert "association released: 3 instance(s) stored" in closed[0].message


_UNKNOWN_CLASS = "1.2.826.0.1.3680043.8.498.99"


@pytest.mark.parametrize(
    ("sop_class", "context_id", "context_name"),
    [
        (MRImageStorage, 3, "CT Image Storage"),  # MR refused at negotiation, sent on CT
        (_UNKNOWN_CLASS, 3, "CT Image Storage"),
        (CTImageStorage, 1, "Verification"),
        (Verification, 1, "Verification"),  # no storage class at all
    ],
)
def test_a_c_store_on_a_context_of_another_sop_class_is_refused_and_dropped(
    tmp_path: Path,
    scp: IngestSCP,
    db: AuditDB,
    *,
    sop_class: str,
    context_id: int,
    context_name: str,
) -> None:
    ds, data = _implicit_dataset(tmp_path)
    with raw_association(scp.address[1]) as sock:
        sock.sendall(c_store_rq(ds.SOPInstanceUID, 5, sop_class=sop_class, context_id=context_id))
        # the data set in two fragments: read and dropped
        half = len(data) // 2
        sock.sendall(p_data_tf(data[:half], 0x00, context_id))
        sock.sendall(p_data_tf(data[half:], 0x02, context_id))
        response = read_response(sock)
        assert response.Status == STATUS_SOP_CLASS_NOT_SUPPORTED == 0x0122
        assert response.MessageIDBeingRespondedTo == 5
        assert response.AffectedSOPInstanceUID == ds.SOPInstanceUID
        # the association goes on: the same instance on its own context is stored
        sock.sendall(c_store_rq(ds.SOPInstanceUID, 6))
        sock.sendall(_dataset_pdu(data))
        assert read_response(sock).Status == 0x0000
        release(sock)
    (refused,) = _events(db, "instance.refused")
    assert refused.message.startswith("C-STORE refused with 0x0122: C-STORE-RQ for SOP class ")
    assert sop_class in refused.message
    assert f"on presentation context {context_id}, whose abstract syntax is {context_name}" in (
        refused.message
    )
    assert refused.sop_instance_uid == ds.SOPInstanceUID
    assert refused.data["sop_class_uid"] == sop_class
    closed = wait_for(lambda: _events(db, "association.closed"), 10, "association closed row")
    assert "released: 1 instance(s) stored, 0 duplicate(s), 1 refused" in closed[0].message
    wait_for(lambda: _instance_count(db) == 1, 10, "the instance row")
    with db.session() as session:
        assert session.scalars(select(Instance.sop_class_uid)).one() == CTImageStorage
    assert not list(scp.spool_dir.rglob(".incoming*"))


def test_a_c_echo_on_a_storage_context_is_refused_and_audited(scp: IngestSCP, db: AuditDB) -> None:
    with raw_association(scp.address[1]) as sock:
        sock.sendall(command_pdu(0x0030, 7, context_id=3, sop_class=Verification))
        response = read_response(sock)
        assert response.CommandField == 0x8030
        assert response.Status == 0x0122
        sock.sendall(command_pdu(0x0030, 8))  # on the Verification context
        assert read_response(sock).Status == 0x0000
        release(sock)
    (refused,) = _events(db, "request.refused")
    assert refused.level == "warning"
    assert "C-ECHO-RQ refused with 0x0122" in refused.message
    assert "whose abstract syntax is CT Image Storage" in refused.message
    closed = wait_for(lambda: _events(db, "association.closed"), 10, "association closed row")
    assert "1 refused" in closed[0].message


def test_a_c_cancel_is_ignored_and_the_association_goes_on(scp: IngestSCP, db: AuditDB) -> None:
    # a C-CANCEL-RQ as PS3.7 defines it: MessageIDBeingRespondedTo (0000,0120), no MessageID
    cancel = b"".join(
        struct.pack("<HHI", 0, element, len(value)) + value
        for element, value in (
            (0x0100, struct.pack("<H", 0x0FFF)),
            (0x0120, struct.pack("<H", 1)),
            (0x0800, struct.pack("<H", 0x0101)),
        )
    )
    with raw_association(scp.address[1]) as sock:
        sock.sendall(p_data_tf(cancel, 0x03, context_id=1))
        sock.sendall(command_pdu(0x0030, 2))
        response = read_response(sock)  # no answer to the C-CANCEL: the next is the C-ECHO's
        assert response.CommandField == 0x8030
        assert response.MessageIDBeingRespondedTo == 2
        assert response.Status == 0x0000
        release(sock)
    closed = wait_for(lambda: _events(db, "association.closed"), 10, "association closed row")
    assert closed[0].message.startswith("association released: ")
    assert not _events(db, "request.refused")


def test_every_request_refused_with_0211_is_audited_and_counted(
    tmp_path: Path, scp: IngestSCP, db: AuditDB
) -> None:
    ds, data = _implicit_dataset(tmp_path)
    with raw_association(scp.address[1]) as sock:
        sock.sendall(command_pdu(0x0020, 1))  # C-FIND-RQ without an identifier
        assert read_response(sock).Status == 0x0211
        sock.sendall(command_pdu(0x0021, 2, data_set_follows=True))  # C-MOVE-RQ, identifier
        sock.sendall(p_data_tf(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ", 0x02, 1))
        assert read_response(sock).Status == 0x0211
        sock.sendall(command_pdu(0x0110, 3))  # N-GET-RQ
        assert read_response(sock).Status == 0x0211
        # a C-STORE-RQ whose CommandDataSetType says that no data set follows
        sock.sendall(c_store_rq(ds.SOPInstanceUID, 4, data_set_type=0x0101))
        assert read_response(sock).Status == 0x0211
        release(sock)
    refused = sorted(_events(db, "request.refused"), key=lambda e: e.id)
    assert [e.message.split(" refused with ")[0] for e in refused] == [
        "C-FIND-RQ",
        "C-MOVE-RQ",
        "N-GET-RQ",
        "C-STORE-RQ",
    ]
    assert all("0x0211" in e.message and e.level == "warning" for e in refused)
    assert all(e.association_id is not None and e.data["status"] == 0x0211 for e in refused)
    assert "no data set follows" in refused[3].message
    assert refused[3].sop_instance_uid == ds.SOPInstanceUID
    closed = wait_for(lambda: _events(db, "association.closed"), 10, "association closed row")
    assert "0 instance(s) stored, 0 duplicate(s), 4 refused" in closed[0].message
    assert not list(scp.spool_dir.rglob("*.dcm"))


@pytest.mark.parametrize("end", ["close", "abort", "release"])
def test_an_instance_cut_off_by_the_end_of_its_association_is_named_in_the_audit(
    tmp_path: Path, scp: IngestSCP, db: AuditDB, end: str
) -> None:
    ds, data = _implicit_dataset(tmp_path)
    with raw_association(scp.address[1]) as sock:
        sock.sendall(c_store_rq(ds.SOPInstanceUID))
        sock.sendall(_dataset_pdu(data[: len(data) // 2], last=False))
        if end == "abort":
            sock.sendall(bytes.fromhex("07000000000400000000"))  # A-ABORT
        elif end == "release":
            release(sock)
    closed = wait_for(lambda: _events(db, "association.closed"), 10, "association closed row")
    message = closed[0].message
    assert "0 instance(s) stored" in message
    assert f"the unfinished instance {ds.SOPInstanceUID} was dropped" in message
    assert closed[0].level == "warning"
    assert closed[0].data["unfinished_sop_instance_uid"] == ds.SOPInstanceUID
    wait_for(lambda: not [p for p in scp.spool_dir.rglob("*") if p.is_file()], 10, "empty spool")


_MALFORMED_RQ = (
    b"\x00\x01\x00\x00"
    + b"RADNET".ljust(16)
    + b"RAW".ljust(16)
    + b"\x00" * 32
    + b"\x99\x00\x00\x05hello"
)


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "protocol error: unknown PDU type 0x47"),
        (
            struct.pack(">BBI", 1, 0, len(_MALFORMED_RQ)) + _MALFORMED_RQ,
            "protocol error: malformed A-ASSOCIATE-RQ",
        ),
        (
            command_pdu(0x0030, 1),
            "protocol error: PDU type 0x04 before A-ASSOCIATE-RQ",
        ),
        (struct.pack(">BBI", 1, 0, 0xFFFFFFFF), "protocol error: PDU of 4294967295 bytes"),
        (b"\x01\x00\x00", "the peer closed the connection in the middle of a PDU"),
        (b"", "no A-ASSOCIATE-RQ within 0.5 s"),  # connect, then silence
    ],
    ids=["garbage", "malformed-rq", "p-data-first", "huge-length", "closed-mid-pdu", "silence"],
)
def test_a_connection_that_fails_before_an_association_is_logged_and_audited_once(
    scp: IngestSCP, db: AuditDB, sent: bytes, reason: str
) -> None:
    scp.ACSE_TIMEOUT_S = 0.5
    with structlog.testing.capture_logs() as logs:
        with socket.create_connection(("127.0.0.1", scp.address[1]), timeout=20) as sock:
            port = sock.getsockname()[1]
            sock.sendall(sent)
            if sent == b"\x01\x00\x00":
                sock.shutdown(socket.SHUT_WR)  # 3 bytes of a PDU header, then the end
            with contextlib.suppress(OSError, EOFError):
                while read_pdu(sock)[0] != 0x07:  # up to the A-ABORT (or the close)
                    pass
        event = wait_for(lambda: _events(db, "connection.aborted"), 10, "connection.aborted row")
    assert len(event) == 1 and event[0].level == "warning"
    assert f"connection from 127.0.0.1:{port} " in event[0].message
    assert "before an association was established: " + reason in event[0].message
    assert event[0].data["peer_port"] == port
    # the event is in the process log too, once
    (logged,) = [e for e in logs if e.get("event_kind") == "connection.aborted"]
    assert logged["log_level"] == "warning" and logged["event"] == event[0].message
    assert logged["peer_port"] == port and logged["reason"].startswith(reason)
    assert not _events(db, "association.closed")


def test_a_connection_closed_without_a_byte_is_not_audited(scp: IngestSCP, db: AuditDB) -> None:
    # a TCP health check or port probe: the audit would fill with them
    socket.create_connection(("127.0.0.1", scp.address[1]), timeout=20).close()
    # then a garbage one, audited: the probe before it wrote nothing in the meantime
    with socket.create_connection(("127.0.0.1", scp.address[1]), timeout=20) as sock:
        sock.sendall(b"\xff" * 6)
    event = wait_for(lambda: _events(db, "connection.aborted"), 10, "connection.aborted row")
    time.sleep(0.2)
    assert len(_events(db, "connection.aborted")) == 1
    assert "unknown PDU type 0xFF" in event[0].message


def test_stopping_the_node_aborts_open_associations_and_says_why(
    tmp_path: Path, db: AuditDB
) -> None:
    ds, data = _implicit_dataset(tmp_path)
    with _running(_node(tmp_path), db) as scp:
        idle = raw_association(scp.address[1])
        busy = raw_association(scp.address[1])
        busy.sendall(c_store_rq(ds.SOPInstanceUID))
        busy.sendall(_dataset_pdu(data[:100], last=False))
        wait_for(lambda: scp.active_associations() == 2, 10, "both associations")
        started = time.monotonic()
        scp.stop()
        assert time.monotonic() - started < 2.0
    for sock in (idle, busy):
        with sock:
            pdu_type, body = read_pdu(sock)
            assert pdu_type == 0x07  # A-ABORT
            assert body[2] == 0x02  # source: service provider
    closed = _events(db, "association.closed")
    assert len(closed) == 2
    assert all(c.message.startswith("association aborted (the node is stopping): ") for c in closed)
    assert any(f"the unfinished instance {ds.SOPInstanceUID}" in c.message for c in closed)
    assert not [p for p in (tmp_path / "data" / "spool").rglob("*") if p.is_file()]


def _negotiate(
    scp: IngestSCP,
    contexts: list[tuple[str, list[str]]],
    roles: dict[str, tuple[bool, bool]] | None = None,
) -> tuple[dicom_ul.Negotiated, Any]:
    """Negotiate an A-ASSOCIATE-RQ proposing ``contexts`` (IDs 1, 3, ...) and SCP/SCU role
    selection items ``roles`` (SOP class: (SCU role, SCP role)) against the node's contexts; the
    outcome and the decoded A-ASSOCIATE-AC."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "MODALITY", "RADNET"
    proposed = []
    for index, (abstract, syntaxes) in enumerate(contexts):
        context = build_context(abstract, syntaxes)
        context.context_id = 2 * index + 1
        proposed.append(context)
    primitive.presentation_context_definition_list = proposed
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    items: list[Any] = [maximum]
    for sop_class, (scu, scp_role) in (roles or {}).items():
        item = SCP_SCU_RoleSelectionNegotiation()
        item.sop_class_uid, item.scu_role, item.scp_role = sop_class, scu, scp_role
        items.append(item)
    primitive.user_information = items
    request = A_ASSOCIATE_RQ()
    request.from_primitive(primitive)
    negotiated = scp.negotiate(request.encode())
    accept = A_ASSOCIATE_AC()
    accept.decode(negotiated.accept_pdu)
    return negotiated, accept.to_primitive()


def test_the_answer_kept_for_a_request_is_given_for_those_bytes_only(
    tmp_path: Path, db: AuditDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest, "_NEGOTIATIONS", 2)
    scp = IngestSCP(_node(tmp_path), db)
    ct = associate_rq_pdu([CTImageStorage])
    first = scp.negotiate(ct)
    assert first.accepted == {1: (CTImageStorage, ImplicitVRLittleEndian)}
    first.accepted.clear()  # an association's own copy: the next one gets the whole answer
    assert scp.negotiate(ct).accepted == {1: (CTImageStorage, ImplicitVRLittleEndian)}
    other = scp.negotiate(associate_rq_pdu([CTImageStorage], called="OTHER"))
    assert other.called_ae_title == "OTHER"
    echo = scp.negotiate(associate_rq_pdu([VERIFICATION]))
    assert echo.accepted == {1: (VERIFICATION, ImplicitVRLittleEndian)}
    assert len(scp._negotiations) <= 2  # forgotten when full
    for _ in range(2):  # a request that cannot be decoded is never kept
        with pytest.raises(dicom_ul.ProtocolError, match="malformed A-ASSOCIATE-RQ"):
            scp.negotiate(ct[:20])


@pytest.mark.parametrize(
    ("proposed", "chosen"),
    [
        ([ImplicitVRLittleEndian, ExplicitVRLittleEndian], ExplicitVRLittleEndian),
        ([JPEG2000, ImplicitVRLittleEndian], ImplicitVRLittleEndian),
        ([RLELossless, ExplicitVRLittleEndian], ExplicitVRLittleEndian),
        ([JPEG2000Lossless, JPEGExtended12Bit], JPEGExtended12Bit),
        ([JPEG2000Lossless], JPEG2000Lossless),
    ],
)
def test_the_transfer_syntax_is_the_first_of_the_node_s_list_that_was_proposed(
    tmp_path: Path, db: AuditDB, proposed: list[str], chosen: str
) -> None:
    # the requester's order does not count (deploy/CONFORMANCE.md, section 2)
    scp = IngestSCP(_node(tmp_path), db)
    negotiated, _ = _negotiate(scp, [(CTImageStorage, proposed)])
    assert negotiated.accepted == {1: (CTImageStorage, chosen)}


def test_the_ct_transfer_syntaxes_are_those_of_the_conformance_statement(
    tmp_path: Path, db: AuditDB
) -> None:
    statement = (Path(__file__).parents[2] / "deploy" / "CONFORMANCE.md").read_text("utf-8")
    section = statement.split("## 2. Transfer syntaxes")[1].split("Other storage classes")[0]
    listed = re.findall(r"^\|[^|]+\| (1\.2\.840\.10008\.1\.2[.0-9]*) \|$", section, re.M)
    assert listed == list(CT_TRANSFER_SYNTAXES)  # the same, in the order that decides
    scp = IngestSCP(_node(tmp_path), db)
    for context in scp.supported_contexts:
        if context.abstract_syntax in CT_STORAGE_CLASSES:
            assert context.transfer_syntax == list(CT_TRANSFER_SYNTAXES)


def test_scp_scu_role_selection_is_answered_the_node_is_only_the_scp(
    tmp_path: Path, db: AuditDB
) -> None:
    scp = IngestSCP(_node(tmp_path), db)
    contexts = [(c, [ExplicitVRLittleEndian]) for c in (CTImageStorage, EnhancedCTImageStorage)]
    contexts.append((Verification, [ImplicitVRLittleEndian]))
    # CT: the requester proposes both roles; Enhanced CT, a class the node takes: only the SCP
    # role (it wants to be sent to), which alone refuses the context
    roles = {CTImageStorage: (True, True), EnhancedCTImageStorage: (False, True)}
    negotiated, answer = _negotiate(scp, contexts, roles)
    assert sorted(negotiated.accepted) == [1, 5]  # CT and Verification
    assert negotiated.refused == [EnhancedCTImageStorage]
    assert sorted(_negotiate(scp, contexts)[0].accepted) == [1, 3, 5]  # without the roles
    replies = {
        str(item.sop_class_uid): (item.scu_role, item.scp_role)
        for item in answer.user_information
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
    }
    # the requester may be the SCU, not the SCP; no item for what was not proposed
    assert replies == {CTImageStorage: (True, False)}
    # no role selection proposed: no item returned, default roles
    _, plain = _negotiate(scp, contexts)
    assert not [
        i for i in plain.user_information if isinstance(i, SCP_SCU_RoleSelectionNegotiation)
    ]


def test_an_instance_stored_whose_answer_cannot_be_sent_is_not_called_unfinished(
    tmp_path: Path, scp: IngestSCP, db: AuditDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the whole data set arrived and was stored; the peer is gone before the answer: the closing
    # row must not say that an unfinished instance was dropped (it is in the spool and catalog)
    real = ingest._Association._answer

    def failing(self: Any, request: Any, status: int, context_id: int, **kw: Any) -> None:
        if request.command_field == 0x0001:
            raise ConnectionResetError(104, "Connection reset by peer")
        real(self, request, status, context_id, **kw)

    monkeypatch.setattr(ingest._Association, "_answer", failing)
    monkeypatch.setattr(ingest, "_C_BUDGET", 1)  # the C loop hands the dataset to that code
    ds, data = _implicit_dataset(tmp_path)
    with raw_association(scp.address[1]) as sock:
        sock.sendall(c_store_rq(str(ds.SOPInstanceUID)))
        sock.sendall(_dataset_pdu(data))
        closed = wait_for(lambda: _events(db, "association.closed"), 10, "association closed row")
    assert "1 instance(s) stored" in closed[0].message
    assert "unfinished" not in closed[0].message
    assert "unfinished_sop_instance_uid" not in (closed[0].data or {})
    assert [p.name for p in scp.spool_dir.rglob("*.dcm")] == [f"{ds.SOPInstanceUID}.dcm"]
