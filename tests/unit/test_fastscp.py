"""The C receive loop (radnet_node/_fastscp.c) against the Python code it stands in for: the header
walk and the UID check give the same answers on real and broken datasets, both loops spool the same
bytes and record the same rows, and what the C loop hands over (a budget used up, a pause of the
peer in the middle of a dataset, a C-ECHO between two C-STOREs) is finished by the Python code.

The behaviour of ingest as a whole is tested with both loops in ``test_ingest.py``.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from association_pdus import (
    c_store_rq,
    command_pdu,
    encoded,
    p_data_tf,
    raw_association,
    read_response,
    release,
)
from node_support import send, wait_for, write_series
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from radnet_node import catalog, dicom_ul, ingest
from radnet_node.audit import AuditDB, Instance, Series
from radnet_node.config import NodeSection
from radnet_node.ingest import IngestSCP

fastscp = ingest._fastscp


@pytest.fixture(autouse=True)
def _built() -> None:
    assert fastscp is not None, "the C receive loop is not built (see setup.py)"


def test_the_loops_share_their_limits() -> None:
    assert fastscp.HEAD_LIMIT == ingest._HEAD_LIMIT
    assert fastscp.MAX_COMMAND == dicom_ul.MAX_COMMAND


# ------------------------------------------------------------------------------------------------
# the header walk and the UID check


def _python_scan(data: bytes, implicit: bool) -> tuple[str, dict[str, bytes] | None]:
    try:
        return "ok", dicom_ul.scan_header(memoryview(data), implicit=implicit).values
    except dicom_ul.NeedMoreData:
        return "more", None
    except dicom_ul.ProtocolError:
        return "bad", None


def _with_sequences(ds: Dataset) -> Dataset:
    """``ds`` with an undefined-length sequence (items of undefined and defined length, one
    nesting another) among the elements the walk must step over."""
    ds = ds.copy()
    inner = Dataset()
    inner.ReferencedSOPClassUID = CTImageStorage
    inner.ReferencedSOPInstanceUID = "1.2.3.4"
    outer = Dataset()
    outer.ReferencedSOPClassUID = CTImageStorage
    outer.ReferencedSOPInstanceUID = "1.2.3.5"
    outer.SourceImageSequence = Sequence([inner])
    outer["SourceImageSequence"].is_undefined_length = True
    ds.ReferencedImageSequence = Sequence([outer, inner])
    ds["ReferencedImageSequence"].is_undefined_length = True
    outer.is_undefined_length_sequence_item = True
    return ds


def _nested(ds: Dataset, depth: int) -> Dataset:
    """``ds`` with undefined-length sequences nested ``depth`` deep before the wanted elements
    end (the walk gives up beyond 16)."""
    ds = ds.copy()
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    for _ in range(depth):
        outer = Dataset()
        outer.ReferencedImageSequence = Sequence([item])
        outer["ReferencedImageSequence"].is_undefined_length = True
        outer.is_undefined_length_sequence_item = True
        item = outer
    ds.ReferencedImageSequence = item.ReferencedImageSequence
    ds["ReferencedImageSequence"].is_undefined_length = True
    return ds


def _corpus(tmp_path: Path, dicom_data_dir: Path) -> list[tuple[bytes, bool]]:
    datasets = [pydicom.dcmread(p) for p in write_series(tmp_path, "scan", slices=2)]
    datasets.append(_with_sequences(datasets[0]))
    datasets += [_nested(datasets[0], depth) for depth in (2, 17, 18)]
    for path in sorted(dicom_data_dir.rglob("*"))[:400]:
        if path.is_file() and len(datasets) < 40:
            try:
                datasets.append(pydicom.dcmread(path, stop_before_pixels=True))
            except Exception:  # noqa: BLE001 - the folder holds READMEs and DICOMDIRs too
                continue
    corpus = []
    for ds in datasets:
        for implicit in (True, False):
            try:
                corpus.append((encoded(ds, implicit=implicit)[:4096], implicit))
            except Exception:  # noqa: BLE001 - a value pydicom cannot write in that encoding
                continue
    return corpus


def test_the_header_walk_gives_the_python_answer_on_real_truncated_and_broken_datasets(
    tmp_path: Path, dicom_data_dir: Path
) -> None:
    corpus = _corpus(tmp_path, dicom_data_dir)
    assert len(corpus) >= 40
    rng = random.Random(20261127)
    outcomes = {"ok": 0, "more": 0, "bad": 0}
    checked = 0
    for data, implicit in corpus:
        variants = [data[:length] for length in range(0, min(len(data), 700), 3)]
        for _ in range(150):  # a few bytes changed among the first ones
            broken = bytearray(data[:2048])
            for _ in range(rng.randint(1, 4)):
                broken[rng.randrange(min(len(broken), 600))] = rng.randrange(256)
            variants.append(bytes(broken))
        for variant in variants:
            expected = _python_scan(variant, implicit)
            assert fastscp.scan_header(variant, implicit) == expected, (variant[:64], implicit)
            outcomes[expected[0]] += 1
            checked += 1
    # every kind of answer was compared, many times
    assert min(outcomes.values()) > 100, outcomes
    # and the nesting limit is the same: 18 levels of sequences are too many, 17 are not
    for depth, answer in ((17, "ok"), (18, "bad")):
        for implicit in (True, False):
            data = encoded(_nested(Dataset(), depth), implicit=implicit) + encoded(
                _wanted_after(), implicit=implicit
            )
            assert fastscp.scan_header(data, implicit)[0] == answer
            assert _python_scan(data, implicit)[0] == answer
    assert checked > 10_000


def _wanted_after() -> Dataset:
    """An element past the last one the walk looks for: where it ends."""
    ds = Dataset()
    ds.AcquisitionNumber = "1"  # (0020,0012)
    return ds


@pytest.mark.parametrize(
    "value",
    [
        "1.2.840.10008.5.1.4.1.1.2",
        "1",
        "0.0",
        "01.2",
        "1.2\n",
        "1..2",
        ".1",
        "1.",
        "",
        "1.2.a",
        "1.2 ",
        "1" * 64,
        "1" * 65,
        "1.2\x00",
        "../../etc",
    ],
)
def test_the_uid_check_is_the_catalog_s(value: str) -> None:
    assert fastscp.is_safe_uid(value.encode()) == catalog.is_safe_uid(value)


def test_a_uid_ending_in_a_newline_is_not_a_uid() -> None:
    # the catalog's pattern once took "1.2\n" ('$' matches before a final newline): a file name
    assert not catalog.is_safe_uid("1.2\n")


# ------------------------------------------------------------------------------------------------
# both loops against real associations


def _node(tmp_path: Path) -> NodeSection:
    return NodeSection.model_validate(
        {"host": "127.0.0.1", "port": 0, "data_dir": tmp_path, "min_free_disk_mb": 0}
    )


@contextmanager
def _scp(tmp_path: Path, loop: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[IngestSCP]:
    monkeypatch.setenv(ingest.C_LOOP_ENV, loop)
    db = AuditDB(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    scp = IngestSCP(_node(tmp_path), db)
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()
        db.dispose()


def _rows(scp: IngestSCP) -> list[dict[str, object]]:
    with scp._db.session() as session:
        pairs = session.execute(
            select(Instance, Series)
            .join(Series, Instance.series_id == Series.id)
            .order_by(Instance.sop_instance_uid)
        ).all()
        return [
            {
                "sop_instance_uid": i.sop_instance_uid,
                "sop_class_uid": i.sop_class_uid,
                "transfer_syntax_uid": i.transfer_syntax_uid,
                "size_bytes": i.size_bytes,
                "spool_path": str(Path(i.spool_path).relative_to(scp.spool_dir)),
                "series": (
                    s.series_instance_uid,
                    s.study_instance_uid,
                    s.series_number,
                    s.modality,
                    s.series_description,
                    s.accession_number,
                    s.instance_count,
                ),
            }
            for i, s in pairs
        ]


def _spooled(scp: IngestSCP) -> dict[str, bytes]:
    return {str(p.relative_to(scp.spool_dir)): p.read_bytes() for p in scp.spool_dir.rglob("*.dcm")}


def test_both_loops_spool_the_same_bytes_and_record_the_same_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # more instances than the C loop reports at once (8 here), two series (each series' folders
    # made by the loop), implicit and explicit VR, a non-ASCII description
    monkeypatch.setattr(ingest, "_C_REPORT", 8)
    files = write_series(tmp_path / "in", "a", slices=20)
    files += write_series(tmp_path / "in", "b", slices=3, series_number=3)
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets[-3:]:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SeriesDescription = "Schädel nativ"
    implicit = pydicom.dcmread(files[5])
    implicit.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    implicit.file_meta.MediaStorageSOPInstanceUID = implicit.SOPInstanceUID
    implicit.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    pydicom.dcmwrite(tmp_path / "implicit.dcm", implicit, implicit_vr=True, little_endian=True)
    datasets.append(pydicom.dcmread(tmp_path / "implicit.dcm"))
    results = {}
    for loop in ("c", "python"):
        with _scp(tmp_path / loop, loop, monkeypatch) as scp:
            assert send(scp.address[1], datasets) == [0] * len(datasets)
            wait_for(lambda scp=scp: len(_rows(scp)) == len(datasets), 10, "rows")
            results[loop] = (_spooled(scp), _rows(scp))
    assert results["c"][1] == results["python"][1]
    assert results["c"][0].keys() == results["python"][0].keys()
    for name, data in results["c"][0].items():
        assert data == results["python"][0][name], name
    assert len(results["c"][0]) == len(datasets)


def _instances(tmp_path: Path, count: int) -> list[tuple[str, bytes]]:
    """(SOP Instance UID, implicit VR data set) of a new series of ``count`` slices."""
    out = []
    for path in write_series(tmp_path, f"raw{count}", slices=count):
        ds = pydicom.dcmread(path)
        out.append((str(ds.SOPInstanceUID), encoded(ds, implicit=True)))
    return out


def test_a_peer_pausing_inside_a_dataset_finds_the_instances_before_it_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the C loop never holds answered instances back while the peer is silent: it hands the
    # dataset under way to the Python code, which finishes it when the peer goes on
    (first_uid, first), (second_uid, second) = _instances(tmp_path, 2)
    with _scp(tmp_path / "node", "c", monkeypatch) as scp, raw_association(scp.address[1]) as sock:
        sock.sendall(c_store_rq(first_uid, 1) + p_data_tf(first, 0x02, 3))
        assert read_response(sock).Status == 0
        half = len(second) // 2
        sock.sendall(c_store_rq(second_uid, 2) + p_data_tf(second[:half], 0x00, 3))
        wait_for(lambda: len(_rows(scp)) == 1, 5, "the first instance's row")
        sock.sendall(p_data_tf(second[half:], 0x02, 3))
        assert read_response(sock).Status == 0
        release(sock)
        rows = wait_for(lambda: _rows(scp) if len(_rows(scp)) == 2 else None, 10, "both rows")
    assert [r["sop_instance_uid"] for r in rows] == sorted([first_uid, second_uid])
    spooled = _spooled(scp)
    assert {pydicom.dcmread(BytesIO(b)).SOPInstanceUID for b in spooled.values()} == {
        first_uid,
        second_uid,
    }


def test_full_reports_of_the_c_loop_wait_for_the_release_and_commit_in_one_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a report of the C loop's full size (4 here) means the sender is going on: its rows wait for
    # the association's end (a commit beside the stream slows the stream), and so does the last
    # report, cut by the A-RELEASE-RQ (answered first): all are committed in one go after the
    # A-RELEASE-RP; not even a pause of the puts (0.2 s here) commits them, and the batch wait is
    # a minute here. The first instance makes the series' folders in the C loop too.
    monkeypatch.setattr(ingest, "_C_REPORT", 4)
    monkeypatch.setattr(ingest, "_PAUSE_S", 0.2)
    monkeypatch.setattr(ingest, "_BATCH_WAIT_S", 60.0)
    commits: list[int] = []
    commit = ingest._Recorder._commit
    resumed: list[object] = []

    def spy(self: ingest._Recorder, batch: list[ingest._Received]) -> bool:
        commits.append(len(batch))
        return commit(self, batch)

    monkeypatch.setattr(ingest._Recorder, "_commit", spy)
    original = ingest._Incoming._resumed

    def resumed_spy(self: ingest._Incoming, resume: ingest._Resume) -> None:
        resumed.append(resume)
        original(self, resume)

    monkeypatch.setattr(ingest._Incoming, "_resumed", resumed_spy)
    instances = _instances(tmp_path, 9)
    with _scp(tmp_path / "node", "c", monkeypatch) as scp, raw_association(scp.address[1]) as sock:
        # 1-4 and 5-8 are full reports, 9 is cut by the release; the peer pauses after the first
        # report (the C loop then holds nothing to report)
        for number, (uid, data) in enumerate(instances, start=1):
            sock.sendall(c_store_rq(uid, number) + p_data_tf(data, 0x02, 3))
            assert read_response(sock).Status == 0
            if number == 4:
                time.sleep(0.6)
                assert _rows(scp) == []
        release(sock)
        wait_for(lambda: len(_rows(scp)) == 9, 10, "the rows, after the release")
    assert commits == [9]
    assert resumed == []  # nothing finished in Python, the first instance neither


def test_a_report_after_a_pause_of_the_peer_is_committed_while_the_association_is_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a report smaller than the C loop's full size comes from a pause of the peer (50 ms here):
    # committed at once, without waiting for the batch wait (a minute here) or the release
    monkeypatch.setattr(ingest, "_PAUSE_S", 0.05)
    monkeypatch.setattr(ingest, "_BATCH_WAIT_S", 60.0)
    instances = _instances(tmp_path, 5)
    with _scp(tmp_path / "node", "c", monkeypatch) as scp, raw_association(scp.address[1]) as sock:
        for number, (uid, data) in enumerate(instances[:4], start=1):
            sock.sendall(c_store_rq(uid, number) + p_data_tf(data, 0x02, 3))
            assert read_response(sock).Status == 0
        wait_for(lambda: len(_rows(scp)) == 4, 10, "the rows, association still open")
        uid, data = instances[4]
        sock.sendall(c_store_rq(uid, 5) + p_data_tf(data, 0x02, 3))
        assert read_response(sock).Status == 0
        release(sock)
        wait_for(lambda: len(_rows(scp)) == 5, 10, "the fifth row, after the release")


def test_a_c_echo_between_c_stores_is_answered_and_the_stores_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    instances = _instances(tmp_path, 4)
    with _scp(tmp_path / "node", "c", monkeypatch) as scp, raw_association(scp.address[1]) as sock:
        for number, (uid, data) in enumerate(instances, start=1):
            sock.sendall(c_store_rq(uid, number) + p_data_tf(data, 0x02, 3))
            assert read_response(sock).Status == 0
            sock.sendall(command_pdu(0x0030, 100 + number))
            assert read_response(sock).Status == 0
        release(sock)
        wait_for(lambda: len(_rows(scp)) == 4, 10, "the rows, after the release")


def test_one_p_data_tf_holding_more_c_stores_than_a_report_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a peer may pack whole C-STOREs, command and data set, into one PDU: the C loop stores as
    # many as one report holds (4 here) and hands the rest of the PDU to the Python code (it once
    # wrote past the end of its results)
    monkeypatch.setattr(ingest, "_C_REPORT", 4)
    instances = _instances(tmp_path, 11)
    (first_uid, first), rest = instances[0], instances[1:]
    with _scp(tmp_path / "node", "c", monkeypatch) as scp, raw_association(scp.address[1]) as sock:
        sock.sendall(c_store_rq(first_uid, 1) + p_data_tf(first, 0x02, 3))  # makes the folders
        assert read_response(sock).Status == 0
        pdvs = b"".join(
            c_store_rq(uid, number)[6:] + p_data_tf(data, 0x02, 3)[6:]
            for number, (uid, data) in enumerate(rest, start=2)
        )
        sock.sendall(struct.pack(">BBI", 0x04, 0, len(pdvs)) + pdvs)
        assert [read_response(sock).Status for _ in rest] == [0] * len(rest)
        release(sock)
        wait_for(lambda: len(_rows(scp)) == len(instances), 10, "the rows, after the release")
        assert sorted(r["sop_instance_uid"] for r in _rows(scp)) == sorted(u for u, _ in instances)


def test_instances_beyond_the_disk_budget_are_finished_in_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a budget smaller than one instance: every dataset is handed over whole, and checked,
    # placed, answered and recorded by the Python code
    monkeypatch.setattr(ingest, "_C_BUDGET", 1000)
    resumed = []
    original = ingest._Incoming._resumed

    def spy(self: ingest._Incoming, resume: ingest._Resume) -> None:
        resumed.append(resume.complete)
        original(self, resume)

    monkeypatch.setattr(ingest._Incoming, "_resumed", spy)
    files = write_series(tmp_path / "in", "budget", slices=5)
    with _scp(tmp_path / "node", "c", monkeypatch) as scp:
        assert send(scp.address[1], files) == [0] * 5
        wait_for(lambda: len(_rows(scp)) == 5, 10, "rows")
    assert resumed == [True] * 5
    for path in files:
        ds = pydicom.dcmread(path)
        stored = pydicom.dcmread(
            ingest.spool_path(
                scp.spool_dir, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
            )
        )
        assert stored.PixelData == ds.PixelData


def test_the_receive_loop_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = AuditDB(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    try:
        monkeypatch.setenv(ingest.C_LOOP_ENV, "c")
        assert IngestSCP(_node(tmp_path), db).receive_loop == "C (radnet_node._fastscp)"
        monkeypatch.setenv(ingest.C_LOOP_ENV, "python")
        assert IngestSCP(_node(tmp_path), db).receive_loop == (
            f"Python ({ingest.C_LOOP_ENV}=python)"
        )
    finally:
        db.dispose()


@pytest.mark.parametrize("loop", ["c", "python"])
def test_a_long_header_in_tiny_pdvs_is_scanned_a_few_times_not_once_per_pdv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    # a private element of 192 KiB before the study and series UIDs the scan looks for, sent in
    # 1,600 PDVs of 128 bytes: the kept head is scanned again only when it has doubled, not for
    # every PDV
    path = write_series(tmp_path / "in", "long", slices=1)[0]
    ds = pydicom.dcmread(path)
    ds.add_new(0x00090010, "LO", "RADNET TEST")
    ds.add_new(0x00091001, "OB", bytes(range(256)) * 768)
    data = encoded(ds, implicit=True)
    # the Study Instance UID, which the scan needs, comes after the long element
    assert data.index(str(ds.StudyInstanceUID).encode()) > 192 * 1024
    scans = []
    real_scan = dicom_ul.scan_header

    def counted(*args: object, **kwargs: object) -> dicom_ul.HeaderScan:
        scans.append(1)
        return real_scan(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dicom_ul, "scan_header", counted)
    chunks = [data[i : i + 128] for i in range(0, len(data), 128)]
    with _scp(tmp_path / loop, loop, monkeypatch) as scp, raw_association(scp.address[1]) as sock:
        sock.sendall(
            c_store_rq(str(ds.SOPInstanceUID), 1)
            + b"".join(
                p_data_tf(chunk, 0x02 if i == len(chunks) - 1 else 0x00, 3)
                for i, chunk in enumerate(chunks)
            )
        )
        assert read_response(sock).Status == 0
        release(sock)
        wait_for(lambda scp=scp: len(_rows(scp)) == 1, 10, "the instance's row")
        (spooled,) = _spooled(scp).values()
    assert pydicom.dcmread(BytesIO(spooled))[0x00091001].value == ds[0x00091001].value
    if loop == "python":
        assert 1 <= len(scans) <= 16, len(scans)  # log2(1,600) + the final scan, not 1,600
