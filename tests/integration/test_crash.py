"""kill -9 of the node at the worst moments: in the middle of receiving a series (some instances
acknowledged, the association still open) and in the middle of inference. After a restart every
acknowledged instance is in the spool and the result reaches the PACS (a real Orthanc) exactly once;
the quiet period of a series cut by the crash starts again when the node is up. And SIGTERM in the
middle of inference with a short grace: the job is parked, the node exits 0, the job runs after the
restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dcmtk import storescu
from node_process import NodeProcess, write_test_weights
from orthanc import Orthanc, wait_for
from pacs import PHILIPS_STUDY_UID, assert_delivered_once, wait_for_results
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from radnet_node.audit import Event, Job, Series
from training.dicom_writer import SeriesGeometry, StudyInfo, write_ct_series

pytestmark = pytest.mark.integration

ACKNOWLEDGED_BEFORE_KILL = 10
# Longer than a kill, a restart and a resend take together, so that the partial series is not
# run on its own before the sender has sent it again (that would be a legitimate second result).
# the node must restart within it (torch import and model load: slow on a busy 2-core machine)
QUIET_SECONDS_WHILE_RECEIVING = 45.0


def _sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_kill_9_while_receiving_keeps_every_acknowledged_instance_and_delivers_once(
    node_and_orthanc: Callable[..., tuple[NodeProcess, Orthanc]], philips_5mm: list[Path]
) -> None:
    node, orthanc = node_and_orthanc(quiet_seconds=QUIET_SECONDS_WHILE_RECEIVING)
    modality = AE(ae_title="MODALITY")
    modality.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    association = modality.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert association.is_established

    acknowledged: list[str] = []
    killed_at = time.monotonic()
    for index, path in enumerate(philips_5mm):
        if index == ACKNOWLEDGED_BEFORE_KILL:
            node.kill()  # association open, more instances on their way
            killed_at = time.monotonic()
        try:
            status = association.send_c_store(pydicom.dcmread(path))
        except RuntimeError:  # pynetdicom already saw the connection go
            break
        if not status or status.Status != 0x0000:
            break
        acknowledged.append(_sop_instance_uid(path))
    if association.is_established:
        association.abort()
    assert len(acknowledged) == ACKNOWLEDGED_BEFORE_KILL

    node.start()
    spooled = node.spooled_instances()
    for uid in acknowledged:
        assert uid in spooled, f"acknowledged instance {uid} was lost"
        assert _sop_instance_uid(spooled[uid]) == uid
    # the sender gets failures for the rest and sends the whole series again
    resent = storescu("127.0.0.1", node.port, philips_5mm, called_ae=node.ae_title)
    assert resent.returncode == 0, resent.stdout + resent.stderr
    assert time.monotonic() - killed_at < QUIET_SECONDS_WHILE_RECEIVING, "restart too slow"

    wait_for_results(orthanc, PHILIPS_STUDY_UID)
    wait_for(node.settled, timeout_s=120, what="every export delivered")
    assert_delivered_once(orthanc, PHILIPS_STUDY_UID)
    assert set(node.spooled_instances()) >= {_sop_instance_uid(p) for p in philips_5mm}


@pytest.fixture(scope="module")
def slower_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model that takes long enough on 28 slices to be caught while running (still small)."""
    return write_test_weights(
        tmp_path_factory.mktemp("weights") / "slower.pt",
        model={"input_size": 128, "layers_per_block": 2, "growth_rate": 8,
               "stem_channels": 8, "lstm_hidden": 8},
    )  # fmt: skip


def test_kill_9_during_inference_resumes_the_job_and_delivers_once(
    node_and_orthanc: Callable[..., tuple[NodeProcess, Orthanc]],
    philips_5mm: list[Path],
    slower_weights: Path,
) -> None:
    node, orthanc = node_and_orthanc(quiet_seconds=1.0, weights=slower_weights)

    sent = storescu("127.0.0.1", node.port, philips_5mm, called_ae=node.ae_title)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for(lambda: "running" in node.job_states(), timeout_s=120, interval_s=0.02,
             what="the job to be running")  # fmt: skip
    node.kill()

    # the kill caught the job running: nothing was exported yet
    assert "running" in node.job_states()
    assert node.exports() == []
    assert orthanc.instances_by_modality(PHILIPS_STUDY_UID) == {}

    node.start()
    wait_for_results(orthanc, PHILIPS_STUDY_UID)
    wait_for(node.settled, timeout_s=120, what="every export delivered")
    assert_delivered_once(orthanc, PHILIPS_STUDY_UID)
    assert "done" in node.job_states()


# Short enough for a test, long enough that the check below and the resend fit inside it.
QUIET_AFTER_RESTART = 8.0


def _send_then_kill(node: NodeProcess, files: list[Path]) -> list[str]:
    """Send ``files`` on one association and kill -9 the node while it is still open; returns the
    SOP Instance UIDs the node acknowledged."""
    modality = AE(ae_title="MODALITY")
    modality.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    association = modality.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert association.is_established
    acknowledged = []
    for path in files:
        status = association.send_c_store(pydicom.dcmread(path))
        assert status and status.Status == 0x0000, status
        acknowledged.append(_sop_instance_uid(path))
    node.kill()  # more instances were on their way
    association.abort()
    return acknowledged


def _series_states(node: NodeProcess) -> list[str]:
    return [str(r[0]) for r in node.query(f"SELECT state FROM {Series.__tablename__}")]


def _event_kinds(node: NodeProcess) -> list[str]:
    return [str(r[0]) for r in node.query(f"SELECT kind FROM {Event.__tablename__} ORDER BY id")]


def test_after_a_kill_9_the_half_received_series_waits_for_the_resend_and_is_sent_once(
    node_and_orthanc: Callable[..., tuple[NodeProcess, Orthanc]], philips_5mm: list[Path]
) -> None:
    node, orthanc = node_and_orthanc(quiet_seconds=QUIET_AFTER_RESTART)
    _send_then_kill(node, philips_5mm[:ACKNOWLEDGED_BEFORE_KILL])
    # the node stays down for longer than the quiet period: counted from the last instance
    # before the crash, the half series would be complete at once after the restart
    time.sleep(QUIET_AFTER_RESTART + 1.0)
    node.start()
    up = time.monotonic()
    while time.monotonic() - up < 3.0:
        assert _series_states(node) == ["received"], "the half series completed after the restart"
        time.sleep(0.1)
    assert "series.quiet_restarted" in _event_kinds(node)
    resent = storescu("127.0.0.1", node.port, philips_5mm, called_ae=node.ae_title)
    assert resent.returncode == 0, resent.stdout + resent.stderr
    assert time.monotonic() - up < QUIET_AFTER_RESTART, "the resend did not fit the quiet period"

    wait_for_results(orthanc, PHILIPS_STUDY_UID)
    wait_for(node.settled, timeout_s=120, what="every export delivered")
    assert_delivered_once(orthanc, PHILIPS_STUDY_UID)
    assert node.job_states() == ["done"]  # one run, of the whole series
    assert node.query(f"SELECT instance_count FROM {Series.__tablename__}") == [(28,)]


def test_after_a_kill_9_a_series_nobody_resends_completes_a_quiet_period_after_the_restart(
    make_node: Callable[..., NodeProcess], philips_5mm: list[Path]
) -> None:
    quiet = 3.0
    node = make_node(quiet_seconds=quiet)
    _send_then_kill(node, philips_5mm[:ACKNOWLEDGED_BEFORE_KILL])
    time.sleep(quiet + 1.0)
    node.start()
    up = time.monotonic()  # the node is up a little earlier still: this only shortens the wait
    wait_for(lambda: _series_states(node) != ["received"], timeout_s=60, interval_s=0.05,
             what="the series to complete")  # fmt: skip
    assert time.monotonic() - up >= quiet - 0.5, "completed before a quiet period after restart"
    wait_for(lambda: node.job_states() == ["done"], timeout_s=120, what="the job to be done")
    assert node.query(f"SELECT instance_count FROM {Series.__tablename__}") == [(10,)]


@pytest.fixture(scope="module")
def full_size_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full-size RADnet: a few seconds of torch on a long series, where a short shutdown
    grace runs out."""
    return write_test_weights(tmp_path_factory.mktemp("weights") / "full.pt", model={})


def _long_series(folder: Path, slices: int = 80) -> list[Path]:
    """An axial head CT of ``slices`` 64 x 64 slices (an ellipse of brain in a skull)."""
    y, x = np.mgrid[-32:32, -32:32] * 4.0
    plane = np.where((y / 100) ** 2 + (x / 85) ** 2 <= 1, 1000.0, -1000.0)
    plane[(y / 94) ** 2 + (x / 79) ** 2 <= 1] = 30.0
    geometry = SeriesGeometry(
        rows=64, columns=64, pixel_spacing_mm=(4.0, 4.0),
        table_positions_mm=tuple(2.5 * i for i in range(slices)),
    )  # fmt: skip
    study = StudyInfo(uid_seed="crash-sigterm", accession_number="SIGTERM1")
    volume = np.repeat(plane[None], slices, axis=0)
    return write_ct_series(volume, geometry, folder, study)  # type: ignore[arg-type]


def test_sigterm_during_inference_with_a_short_grace_parks_the_job_and_exits_0(
    tmp_path: Path, make_node: Callable[..., NodeProcess], full_size_weights: Path
) -> None:
    node = make_node(weights=full_size_weights, sections={"node": {"shutdown_grace_seconds": 0.5}})
    sent = storescu("127.0.0.1", node.port, _long_series(tmp_path / "in"), called_ae="RADNET")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for(lambda: "running" in node.job_states(), timeout_s=120, interval_s=0.02,
             what="the job to be running")  # fmt: skip
    time.sleep(1.0)  # reading takes a fraction of a second, the model several seconds

    code = node.terminate(timeout_s=60)
    log = node.log_path.read_text(encoding="utf-8", errors="replace")
    assert code == 0, f"exit code {code}{node.log_tail(5)}"
    assert "terminate called" not in log
    assert node.job_states() == ["queued"]
    assert _event_kinds(node)[-1] == "node.stopped" and "1 running job(s) parked" in log

    node.start()
    wait_for(lambda: node.job_states() == ["done"], timeout_s=180, what="the parked job to run")
    assert node.query(f"SELECT attempts FROM {Job.__tablename__}") == [(2,)]
