"""kill -9 of the node at the worst moments: in the middle of receiving a series (some instances
acknowledged, the association still open) and in the middle of inference. After a restart every
acknowledged instance is in the spool and the result reaches the PACS (a real Orthanc) exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from dcmtk import storescu
from node_process import NodeProcess, write_test_weights
from orthanc import Orthanc, wait_for
from pacs import PHILIPS_STUDY_UID, assert_delivered_once, wait_for_results
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

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
