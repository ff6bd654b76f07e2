"""``radnet-node serve`` as a process with DCMTK as the modality (``echoscu``, ``storescu``) and as
the destination (``storescp``): results delivered, refusals audited, ``status``/``audit``/``resend``
from the command line, a destination down until the dead letter is re-sent, SIGTERM, and a second
node on the same data folder or port, which exits 2 and leaves the first alone."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from association_pdus import associate_rq_pdu
from dcmtk import StoreScp, echoscu, storescu
from node_process import NodeProcess, to_toml
from orthanc import free_port, wait_for

from radnet_node.audit import Event
from training.dicom_writer import SeriesGeometry, StudyInfo, write_ct_series

pytestmark = pytest.mark.integration

SR, SEG, SC = (
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.840.10008.5.1.4.1.1.7",
)


def _series(folder: Path, accession: str, **kwargs: object) -> list[Path]:
    """A 6-slice 64 x 64 axial head CT (an ellipse of brain in a skull)."""
    y, x = np.mgrid[-32:32, -32:32] * 4.0
    plane = np.where((y / 100) ** 2 + (x / 85) ** 2 <= 1, 1000.0, -1000.0)
    plane[(y / 94) ** 2 + (x / 79) ** 2 <= 1] = 30.0
    geometry = SeriesGeometry(
        rows=64, columns=64, pixel_spacing_mm=(4.0, 4.0),
        table_positions_mm=tuple(5.0 * i for i in range(6)),
    )  # fmt: skip
    study = StudyInfo(uid_seed=f"node-dcmtk-{accession}", accession_number=accession)
    return write_ct_series(np.repeat(plane[None], 6, axis=0), geometry, folder, study, **kwargs)  # type: ignore[arg-type]


def _destination(receiver: StoreScp, **overrides: object) -> dict[str, object]:
    return {
        "name": "storescp", "ae_title": receiver.ae_title, "host": "127.0.0.1",
        "port": receiver.port, "retries": 1, "backoff_seconds": 0.2, "timeout_seconds": 10.0,
    } | overrides  # fmt: skip


def _classes(receiver: StoreScp) -> list[str]:
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID)
                  for p in receiver.received())  # fmt: skip


def _events(node: NodeProcess) -> list[dict[str, object]]:
    done = node.cli("audit", "tail", "--json", "-n", "500")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_storescu_in_sr_seg_key_image_out_at_storescp_and_sigterm(
    tmp_path: Path,
    make_node: Callable[..., NodeProcess],
    make_storescp: Callable[..., StoreScp],
) -> None:
    receiver = make_storescp()
    node = make_node(destinations=[_destination(receiver)])
    assert echoscu("127.0.0.1", node.port, called_ae="RADNET").returncode == 0
    files = _series(tmp_path / "in", "DC1")
    sent = storescu("127.0.0.1", node.port, files, called_ae="RADNET")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for(
        lambda: len(receiver.received()) >= 3,
        timeout_s=90,
        what="SR, SEG and key image at storescp",
    )
    assert _classes(receiver) == sorted([SR, SEG, SC])
    wait_for(node.settled, timeout_s=30, what="the export to be recorded")

    story = node.audit_show("DC1")
    (series,) = story["series"]
    steps = [s["step"] for s in series["steps"]]
    assert steps[0] == "first instance" and steps[-1] == "stored at storescp"
    assert all(s["seconds"] is None or s["seconds"] >= 0 for s in series["steps"])
    status = node.cli("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "destination storescp" in status.stdout and "reachable" in status.stdout
    assert "dead letters: 0" in status.stdout

    assert node.terminate() == 0
    kinds = [e["kind"] for e in _events(node)]
    assert kinds[-1] == "node.stopped"


def test_refused_associations_are_audited(make_node: Callable[..., NodeProcess]) -> None:
    node = make_node(sections={"node": {"allowed_calling_ae_titles": ["MODALITY"]}})
    wrong_called = echoscu("127.0.0.1", node.port, called_ae="NOT-RADNET", calling_ae="MODALITY")
    wrong_calling = echoscu("127.0.0.1", node.port, called_ae="RADNET", calling_ae="INTRUDER")
    assert wrong_called.returncode != 0 and wrong_calling.returncode != 0
    assert (
        echoscu("127.0.0.1", node.port, called_ae="RADNET", calling_ae="MODALITY").returncode == 0
    )
    rejected = [e["message"] for e in _events(node) if e["kind"] == "association.rejected"]
    assert len(rejected) == 2
    assert any("called AE title 'NOT-RADNET'" in str(m) for m in rejected)
    assert any("calling AE title 'INTRUDER' is not allowed" in str(m) for m in rejected)


def test_destination_down_dead_letter_then_resend(
    tmp_path: Path,
    make_node: Callable[..., NodeProcess],
    make_storescp: Callable[..., StoreScp],
) -> None:
    port = free_port()
    node = make_node(destinations=[{
        "name": "storescp", "ae_title": "STORESCP", "host": "127.0.0.1", "port": port,
        "retries": 1, "backoff_seconds": 0.2, "timeout_seconds": 10.0,
    }])  # fmt: skip
    sent = storescu("127.0.0.1", node.port, _series(tmp_path / "in", "DC3"), called_ae="RADNET")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for(
        lambda: ("storescp", "dead", 2) in node.exports(), timeout_s=90, what="the dead letter"
    )
    status = node.cli("status")
    assert status.returncode == 1  # a dead letter, and the destination does not answer
    assert "dead letters: 1" in status.stdout and "NOT reachable" in status.stdout

    receiver = make_storescp(port=port)
    resend = node.cli("resend", "--all-dead")
    assert resend.returncode == 0 and "1 export(s) queued again" in resend.stdout
    wait_for(
        lambda: len(receiver.received()) >= 3, timeout_s=60, what="the re-sent result at storescp"
    )
    wait_for(
        lambda: node.exports() == [("storescp", "delivered", 1)], timeout_s=30, what="delivered"
    )
    assert _classes(receiver) == sorted([SR, SEG, SC])


def _audit_rows(node: NodeProcess) -> list[tuple[object, ...]]:
    return node.query(f"SELECT id, kind, message FROM {Event.__tablename__} ORDER BY id")


def _in_flight_spool_file(node: NodeProcess) -> Path:
    """A spool temporary file as an instance being received looks (recovery would remove it)."""
    folder = node.data_dir / "spool" / "1.2.3" / "1.2.3.4"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".1.2.3.4.5.dcm.1.2.tmp"
    path.write_bytes(b"half an instance")
    return path


def test_a_second_node_on_the_same_data_dir_exits_2_and_leaves_the_first_alone(
    tmp_path: Path, make_node: Callable[..., NodeProcess]
) -> None:
    node = make_node()
    in_flight = _in_flight_spool_file(node)
    before = _audit_rows(node)

    second = node.cli("serve")  # the same config: same data_dir, same port
    assert second.returncode == 2, second.stderr
    assert f"data_dir {node.data_dir} is in use: another radnet-node (process {node.pid})" in (
        second.stderr
    )
    assert "Traceback" not in second.stderr and "terminate called" not in second.stderr
    assert _audit_rows(node) == before  # no recovery, no node.stopped
    assert in_flight.exists()

    assert node.running
    assert echoscu("127.0.0.1", node.port, called_ae="RADNET").returncode == 0
    sent = storescu("127.0.0.1", node.port, _series(tmp_path / "in", "LCK1"), called_ae="RADNET")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for(lambda: node.job_states() == ["done"], timeout_s=90, what="the first node's result")


def test_a_node_on_a_port_in_use_exits_2_without_touching_the_audit(
    make_node: Callable[..., NodeProcess],
) -> None:
    first = make_node("first")
    before = _audit_rows(first)
    # its own data folder, but the first node's port and audit database: a misconfiguration
    second = make_node(
        "second", start=False, port=first.port,
        sections={"audit": {"database_url": first.database_url}},
    )  # fmt: skip
    second.workdir.mkdir(parents=True)
    second.config_path.write_text(to_toml(second.config()), encoding="utf-8")

    done = second.cli("serve")
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{first.port}: Address already in use" in done.stderr
    assert "Traceback" not in done.stderr and "terminate called" not in done.stderr
    assert _audit_rows(first) == before  # no recovery, no node.stopped
    assert echoscu("127.0.0.1", first.port, called_ae="RADNET").returncode == 0


def _pdu_type(sock: socket.socket) -> int | None:
    """The type of the next PDU (its body read and dropped); None when the connection ends."""
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return None
        header += chunk
    left = struct.unpack(">I", header[2:])[0]
    while left:
        chunk = sock.recv(min(left, 65536))
        if not chunk:
            return None
        left -= len(chunk)
    return header[0]


def test_a_peer_speaking_another_protocol_and_an_association_open_at_sigterm_are_audited(
    make_node: Callable[..., NodeProcess],
) -> None:
    node = make_node()
    # not DICOM (a scanner, an HTTP health check on the wrong port): aborted, one audit row
    with socket.create_connection(("127.0.0.1", node.port), timeout=20) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: radnet\r\n\r\n")
        assert _pdu_type(sock) == 0x07  # A-ABORT
    # an association left open while the node stops
    with socket.create_connection(("127.0.0.1", node.port), timeout=20) as sock:
        sock.sendall(associate_rq_pdu(["1.2.840.10008.5.1.4.1.1.2"]))
        assert _pdu_type(sock) == 0x02  # A-ASSOCIATE-AC
        assert node.terminate() == 0
        assert _pdu_type(sock) == 0x07  # A-ABORT, from the node's stop
    events = _events(node)
    (aborted,) = [e for e in events if e["kind"] == "connection.aborted"]
    assert aborted["level"] == "warning"
    assert "before an association was established: protocol error: unknown PDU type 0x47" in str(
        aborted["message"]
    )
    closed = [e for e in events if e["kind"] == "association.closed"]
    assert str(closed[-1]["message"]).startswith("association aborted (the node is stopping)")
