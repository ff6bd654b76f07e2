"""The whole node in-process on localhost with the tiny engine: a series in, SR + SEG + key image
out at a real Storage SCP, the other series of the study skipped with the reason; a late instance; a
crash during inference recovered at the next start with the result delivered once; a shutdown that
parks the running job."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
import torch
from node_support import (
    Destination,
    node_settings,
    send,
    tiny_weights,
    wait_for,
    write_series,
)
from sqlalchemy import select

from radnet_node.audit import Event, Job, study_story
from radnet_node.config import LoggingSection, Settings
from radnet_node.engine import Engine, EngineSettings
from radnet_node.errors import RadnetError
from radnet_node.logging import bound, configure_logging
from radnet_node.node import Node
from training.dicom_writer import StudyInfo

SR = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SC = "1.2.840.10008.5.1.4.1.1.7"  # the key image


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def engine(weights: Path) -> Engine:
    torch.set_num_threads(1)
    return Engine(EngineSettings(weights=weights, device="cpu", precision="fp32", threads=1))


@pytest.fixture
def pacs() -> Iterator[Destination]:
    destination = Destination().start()
    yield destination
    destination.stop()


@pytest.fixture
def settings(tmp_path: Path, weights: Path, pacs: Destination) -> Settings:
    destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
    return node_settings(tmp_path / "data", weights, destinations=[destination])


@pytest.fixture
def node(settings: Settings, engine: Engine) -> Iterator[Node]:
    running = Node(settings, engine)
    running.start()
    yield running
    running.stop()


def _classes(pacs: Destination) -> list[str]:
    return sorted(str(ds.SOPClassUID) for ds in list(pacs.received))


def test_a_study_in_sr_seg_and_key_image_out_into_the_same_study(
    tmp_path: Path, node: Node, pacs: Destination
) -> None:
    study = StudyInfo(uid_seed="node-e2e", accession_number="E2E1")
    head = write_series(tmp_path, "head", study=study, series_number=2)
    scout = write_series(
        tmp_path, "scout", study=study, series_number=1, slices=2,
        series_description="SCOUT",
    )  # fmt: skip
    for path in scout:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(path)
    assert node.address is not None
    assert send(node.address[1], scout + head) == [0x0000] * 8
    wait_for(lambda: len(pacs.received) >= 3, 60, "SR, SEG and key image at the PACS")
    assert _classes(pacs) == sorted([SR, SEG, SC])
    source = pydicom.dcmread(head[0])
    for ds in pacs.received:
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID and ds.AccessionNumber == "E2E1"

    def delivered_story() -> Any:
        with node.db.session() as session:
            story = study_story(session, "E2E1")
        done = story is not None and any(
            step.name == "stored at pacs" for s in story.series for step in s.steps
        )
        return story if done else None

    story = wait_for(delivered_story, 10, "the export to be recorded as delivered")
    by_description = {s.series_description: s for s in story.series}
    assert by_description["SCOUT"].state == "rejected"
    assert "localizer" in (by_description["SCOUT"].eligibility_reason or "")
    steps = [step.name for step in by_description["HEAD 5MM (SYNTHETIC)"].steps]
    assert steps == [
        "first instance", "last instance", "complete", "queued", "running", "result written",
        "job done", "stored at pacs",
    ]  # fmt: skip


def test_a_localizer_inside_the_series_is_left_out_and_the_slices_run(
    tmp_path: Path, node: Node, pacs: Destination
) -> None:
    files = write_series(tmp_path, "mixed", slices=7)
    scout = pydicom.dcmread(files[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.save_as(files[0])
    assert node.address is not None
    assert send(node.address[1], files) == [0x0000] * 7
    wait_for(lambda: SR in _classes(pacs), 60, "the SR at the PACS")
    (sr,) = [ds for ds in list(pacs.received) if str(ds.SOPClassUID) == SR]
    referenced = {
        str(ref.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert str(scout.SOPInstanceUID) not in referenced
    assert {str(pydicom.dcmread(f).SOPInstanceUID) for f in files[1:]} <= referenced


def test_a_late_instance_reruns_and_sends_the_new_result(
    tmp_path: Path, node: Node, pacs: Destination
) -> None:
    files = write_series(tmp_path, "late", slices=7)
    assert node.address is not None
    send(node.address[1], files[:6])
    wait_for(lambda: len(pacs.received) >= 3, 60, "the first result")
    first = set(pacs.sop_uids())
    send(node.address[1], files[6:])
    wait_for(lambda: len(pacs.received) >= 6, 60, "the second result")
    assert len(set(pacs.sop_uids()) - first) == 3  # new objects, new UIDs
    # the new SR names the one it replaces, so a reader can tell which report is current
    first_sr, second_sr = (ds for ds in list(pacs.received) if str(ds.SOPClassUID) == SR)
    assert "PredecessorDocumentsSequence" not in first_sr
    (study,) = second_sr.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == first_sr.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first_sr.SeriesInstanceUID
    (ref,) = series.ReferencedSOPSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        first_sr.SOPClassUID,
        first_sr.SOPInstanceUID,
    )
    # and the audit says so, findable by the SR a PACS user holds
    with node.db.session() as session:
        story = study_story(session, str(second_sr.SOPInstanceUID))
    assert story is not None
    done = [e.message for e in story.events if e.kind == "job.done"]
    assert any(f"replaces SR {first_sr.SOPInstanceUID}" in message for message in done)
    with node.db.session() as session:
        kinds = session.scalars(select(Event.kind)).all()
    assert "series.reopened" in kinds


# the worker thread is meant to die here, as the whole process would
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_crash_during_inference_is_resumed_and_delivered_once(
    tmp_path: Path, settings: Settings, engine: Engine, pacs: Destination,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    files = write_series(tmp_path, "crash")
    crashed = threading.Event()

    def killed(series: Any) -> Any:
        crashed.set()
        raise SystemExit("killed during inference")  # ends the worker thread as a kill would

    monkeypatch.setattr(engine, "run", killed)
    first = Node(settings, engine)
    address = first.start()
    send(address[1], files)
    wait_for(crashed.is_set, 30, "inference to start")
    # the process dies here: nothing is stopped cleanly, the job is left running
    first.scp.stop()
    first.stopping.set()
    first.db.dispose()
    first.lock.release()  # the kernel drops a dead process's lock on the data folder
    with first.db.session() as session:
        assert [j.state for j in session.scalars(select(Job)).all()] == ["running"]
    monkeypatch.undo()

    second = Node(settings, engine)
    second.start()
    try:
        assert second.recovery is not None and second.recovery.jobs_requeued == 1
        wait_for(lambda: len(pacs.received) >= 3, 60, "the result after the restart")
        with second.db.session() as session:
            jobs = session.scalars(select(Job)).all()
        assert [(j.state, j.attempts) for j in jobs] == [("done", 2)]
    finally:
        second.stop()
    assert sorted(pacs.sop_uids()) == sorted(set(pacs.sop_uids()))  # nothing twice
    assert len(pacs.received) == 3


def test_stop_parks_a_job_that_does_not_finish_in_time(
    tmp_path: Path, settings: Settings, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = threading.Event()
    release = threading.Event()
    real_run = engine.run

    def slow(series: Any) -> Any:
        running.set()
        release.wait(30)
        return real_run(series)

    monkeypatch.setattr(engine, "run", slow)
    node = Node(settings, engine)
    address = node.start()
    try:
        send(address[1], write_series(tmp_path, "park"))
        wait_for(running.is_set, 30, "inference to start")
        node.stop(grace_seconds=0.0)
        with node.db.session() as session:
            job = session.scalars(select(Job)).one()
            kinds = session.scalars(select(Event.kind).order_by(Event.id)).all()
        assert job.state == "queued"
        assert "job.requeued" in kinds and kinds[-1] == "node.stopped"
    finally:
        release.set()
        node._worker_thread.join(30)
    with node.db.session() as session:
        assert session.scalars(select(Job)).one().state == "queued"  # the late finish discarded


@pytest.mark.parametrize("allowed", [False, True])
def test_process_log_is_json_with_bound_ids_and_no_patient_names_unless_allowed(
    allowed: bool,
) -> None:
    stream = io.StringIO()
    pynetdicom_logger = logging.getLogger("pynetdicom")
    saved = (pynetdicom_logger.handlers[:], pynetdicom_logger.level, pynetdicom_logger.propagate)
    try:
        configure_logging(
            LoggingSection(format="json", level="info", log_patient_names=allowed), stream
        )
        with bound(series_uid="1.2.3", job_id=7):
            structlog.get_logger("test").info("hello", patient_name="Doe^Jane")
        structlog.get_logger("test").debug("not at info level")
    finally:
        structlog.reset_defaults()
        pynetdicom_logger.handlers[:], pynetdicom_logger.level, pynetdicom_logger.propagate = saved
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert (record["event"], record["series_uid"], record["job_id"]) == ("hello", "1.2.3", 7)
    assert ("patient_name" in record) is allowed


def test_library_warnings_become_log_events_not_raw_stderr() -> None:
    # a raw "UserWarning: ..." line on stderr would break JSON logs
    stream = io.StringIO()
    pynetdicom_logger = logging.getLogger("pynetdicom")
    saved = (pynetdicom_logger.handlers[:], pynetdicom_logger.level, pynetdicom_logger.propagate)
    saved_showwarning = warnings.showwarning
    try:
        configure_logging(LoggingSection(format="json", level="info"), stream)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library complains", UserWarning, stacklevel=1)
    finally:
        warnings.showwarning = saved_showwarning
        structlog.reset_defaults()
        pynetdicom_logger.handlers[:], pynetdicom_logger.level, pynetdicom_logger.propagate = saved
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "a library complains"
    assert (record["event_kind"], record["category"], record["level"]) == (
        "python.warning",
        "UserWarning",
        "warning",
    )


def test_a_spool_folder_that_cannot_be_written_stops_the_node_at_start(
    tmp_path: Path, weights: Path, engine: Engine
) -> None:
    # it would otherwise say "listening" and then refuse every instance
    spool = tmp_path / "data" / "spool"
    spool.mkdir(parents=True)
    # root writes through permission bits: the immutable attribute stops it too
    made = subprocess.run(["chattr", "+i", str(spool)], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot make a folder unwritable here: {made.stderr.decode().strip()}")
    try:
        node = Node(node_settings(tmp_path / "data", weights), engine)
        with pytest.raises(RadnetError, match=f"cannot write in {spool}"):
            node.start()
        node.stop()
    finally:
        subprocess.run(["chattr", "-i", str(spool)], check=True)
