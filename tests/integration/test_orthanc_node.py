"""A real Orthanc as the PACS: the test harness itself (store, find, fetch, send, restart), the
example auto-routing Lua script of ``deploy/``, and the node end to end (Orthanc sends the real
Philips series, SR and SEG come back into the same study)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dcmtk import StoreScp, storescu
from node_process import NodeProcess
from orthanc import Modality, Orthanc, OrthancError, free_port, wait_for
from pacs import (
    PHILIPS_5MM_SLICES,
    PHILIPS_STUDY_UID,
    SECONDARY_CAPTURE,
    assert_delivered_once,
    dciodvfy_errors,
    need_program,
    wait_for_results,
)

from training.dicom_writer import SeriesGeometry

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
AUTOROUTE_LUA = REPO / "deploy" / "orthanc" / "radnet-autoroute.lua"
EXAMPLE_ORTHANC_JSON = REPO / "deploy" / "orthanc" / "orthanc.json"


def _sop_instance_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


# --- the harness ----------------------------------------------------------------------------------


def test_orthanc_stores_finds_and_returns_the_philips_series_bit_for_bit(
    make_orthanc: Callable[..., Orthanc], philips_5mm: list[Path]
) -> None:
    orthanc = make_orthanc()
    ids = orthanc.upload_files(philips_5mm)

    assert len(set(ids)) == PHILIPS_5MM_SLICES
    assert orthanc.statistics()["CountInstances"] == PHILIPS_5MM_SLICES
    by_modality = orthanc.instances_by_modality(PHILIPS_STUDY_UID)
    assert list(by_modality) == ["CT"]
    assert len(by_modality["CT"]) == PHILIPS_5MM_SLICES
    assert orthanc.fetch_file(ids[0]) == philips_5mm[0].read_bytes()
    found = orthanc.find("Series", {"SeriesDescription": "STD BRAIN 5MM"})
    assert len(found) == 1 and found[0]["MainDicomTags"]["BodyPartExamined"] == "BRAIN"
    assert orthanc.study_instances("1.2.3.4.5.6.7.8.9") == []


def test_orthanc_sends_a_series_to_a_dcmtk_receiver_on_request(
    make_orthanc: Callable[..., Orthanc],
    make_storescp: Callable[..., StoreScp],
    philips_5mm: list[Path],
) -> None:
    receiver = make_storescp(ae_title="RECEIVER")
    orthanc = make_orthanc(
        modalities=[Modality("receiver", "RECEIVER", "127.0.0.1", receiver.port)]
    )
    orthanc.upload_files(philips_5mm)
    study = orthanc.study_id(PHILIPS_STUDY_UID)
    assert study is not None

    assert orthanc.echo("receiver")
    orthanc.store_to_modality("receiver", [study])

    assert _sop_instance_uids(receiver.received()) == _sop_instance_uids(philips_5mm)


def test_orthanc_refuses_nothing_while_down_and_keeps_its_storage_across_a_restart(
    make_orthanc: Callable[..., Orthanc], philips_5mm: list[Path], dcmtk: None
) -> None:
    orthanc = make_orthanc()
    orthanc.upload_files(philips_5mm[:2])
    orthanc.stop()

    down = storescu("127.0.0.1", orthanc.dicom_port, philips_5mm[2:4], called_ae="ORTHANC",
                    timeout_s=5)  # fmt: skip
    assert down.returncode != 0

    orthanc.start()
    up = storescu("127.0.0.1", orthanc.dicom_port, philips_5mm[2:4], called_ae="ORTHANC")
    assert up.returncode == 0, up.stdout + up.stderr
    assert orthanc.statistics()["CountInstances"] == 4


def test_orthanc_start_failure_names_the_problem(orthanc_binary: str, tmp_path: Path) -> None:
    broken_lua = tmp_path / "broken.lua"
    broken_lua.write_text("function OnStableSeries(\n", encoding="utf-8")
    server = Orthanc(workdir=tmp_path / "o", lua_scripts=[broken_lua], start_timeout_s=20)
    with pytest.raises(OrthancError, match="Orthanc"):
        server.start()
    assert not server.running


# --- the example Orthanc configuration and Lua script of deploy/ --------------------------------


def test_example_orthanc_config_is_json_and_routes_with_the_shipped_lua_script() -> None:
    config = json.loads(EXAMPLE_ORTHANC_JSON.read_text(encoding="utf-8"))

    assert "radnet" in config["DicomModalities"]
    assert any(Path(p).name == AUTOROUTE_LUA.name for p in config["LuaScripts"])


def test_autoroute_lua_sends_the_head_ct_series_and_nothing_else(
    make_orthanc: Callable[..., Orthanc],
    make_storescp: Callable[..., StoreScp],
    philips_5mm: list[Path],
    dicom_data_dir: Path,
) -> None:
    receiver = make_storescp(ae_title="RADNET")
    orthanc = make_orthanc(
        modalities=[Modality("radnet", "RADNET", "127.0.0.1", receiver.port)],
        lua_scripts=[AUTOROUTE_LUA],
    )
    study = dicom_data_dir / "dcm_qa_ct/Philips_Ingenuity_head_phantom/S21570"
    summary = sorted((study / "S4010").glob("I*"))  # secondary captures, Modality CT
    spine = dicom_data_dir / "pydicom-testfiles/CT_small.dcm"  # a CT, not of the head
    orthanc.upload_files([*philips_5mm, *summary, spine])

    def decisions() -> list[str] | None:
        lines = [line for line in orthanc.log_path.read_text(errors="replace").splitlines()
                 if "radnet-autoroute:" in line]  # fmt: skip
        done = any(re.search(r"series \S+ sent to radnet \(job", line) for line in lines)
        return lines if len(lines) >= 4 and done else None

    lines = wait_for(decisions, timeout_s=60, what="the auto-routing decisions in the log")
    wait_for(lambda: len(receiver.received()) >= PHILIPS_5MM_SLICES, timeout_s=60,
             what="the routed series at the receiver")  # fmt: skip

    assert _sop_instance_uids(receiver.received()) == _sop_instance_uids(philips_5mm)
    assert sum(bool(re.search(r"series \S+ sent to radnet \(job", line)) for line in lines) == 1
    assert any("not a CT image SOP class" in line for line in lines)
    assert any("no head-like body part or description" in line for line in lines)


def test_autoroute_lua_sends_again_a_series_that_failed_while_the_node_was_down(
    make_orthanc: Callable[..., Orthanc],
    make_storescp: Callable[..., StoreScp],
    philips_5mm: list[Path],
    write_series: Callable[..., list[Path]],
    head_hu: Callable[..., np.ndarray],
) -> None:
    # the node's port answers nothing: the routing job fails, and Orthanc itself never retries
    port = free_port()
    orthanc = make_orthanc(
        modalities=[Modality("radnet", "RADNET", "127.0.0.1", port)], lua_scripts=[AUTOROUTE_LUA]
    )
    orthanc.upload_files(philips_5mm)

    def log_lines(pattern: str) -> list[str] | None:
        lines = [line for line in orthanc.log_path.read_text(errors="replace").splitlines()
                 if re.search(f"radnet-autoroute: series \\S+ {pattern}", line)]  # fmt: skip
        return lines or None

    wait_for(lambda: log_lines("NOT sent to radnet"), timeout_s=60, what="the failed job")
    # the node is back; the next stable series (or, from Orthanc 1.11, the heart beat) retries it
    receiver = make_storescp(ae_title="RADNET", port=port)
    geometry = SeriesGeometry(rows=32, columns=32, pixel_spacing_mm=(7.0, 7.0),
                              table_positions_mm=(0.0, 5.0, 10.0))  # fmt: skip
    later = write_series(head_hu((3, 32, 32), (7.0, 7.0)), geometry, name="later")
    orthanc.upload_files(later)
    expected = _sop_instance_uids(philips_5mm) | _sop_instance_uids(later)
    wait_for(lambda: _sop_instance_uids(receiver.received()) >= expected or None, timeout_s=90,
             what="both series at the node")  # fmt: skip
    assert _sop_instance_uids(receiver.received()) == expected
    assert len(log_lines(r"sent to radnet \(job") or []) == 2  # one per series


# --- the node end to end ------------------------------------------------------------------------


def _referenced_uids(dataset: pydicom.Dataset) -> set[str]:
    return {str(e.value) for e in dataset.iterall() if e.keyword == "ReferencedSOPInstanceUID"}


def test_orthanc_sends_the_philips_series_and_gets_a_valid_sr_and_seg_back_into_the_study(
    node_and_orthanc: Callable[..., tuple[NodeProcess, Orthanc]],
    philips_5mm: list[Path],
    tmp_path: Path,
) -> None:
    need_program("dciodvfy")  # before the minutes below, not after them
    node, orthanc = node_and_orthanc(quiet_seconds=1.5)
    orthanc.upload_files(philips_5mm)
    (series,) = orthanc.find("Series", {"SeriesDescription": "STD BRAIN 5MM"}, expand=False)

    assert orthanc.echo("radnet")
    orthanc.store_to_modality("radnet", [series])
    wait_for_results(orthanc, PHILIPS_STUDY_UID)
    wait_for(node.settled, timeout_s=120, what="every export delivered")
    grouped = orthanc.instances_by_modality(PHILIPS_STUDY_UID)

    # the tiny test weights call every slice positive: a key image comes too
    (key_image,) = [i for instances in grouped.values() for i in instances
                    if i["Tags"].get("SOPClassUID") == SECONDARY_CAPTURE]  # fmt: skip
    files = {name: tmp_path / f"{name}.dcm" for name in ("sr", "seg", "key-image")}
    for name, instance in (("sr", grouped["SR"][0]), ("seg", grouped["SEG"][0]),
                           ("key-image", key_image)):  # fmt: skip
        files[name].write_bytes(orthanc.fetch_file(instance["ID"]))
    sr = hd.sr.srread(files["sr"])
    seg = hd.seg.segread(files["seg"])
    key = pydicom.dcmread(files["key-image"])
    assert sr.StudyInstanceUID == seg.StudyInstanceUID == key.StudyInstanceUID == PHILIPS_STUDY_UID
    assert seg.SOPInstanceUID in _referenced_uids(sr)
    assert _referenced_uids(seg) <= _sop_instance_uids(philips_5mm)
    assert _referenced_uids(seg)
    for path in files.values():
        assert dciodvfy_errors(path) == [], path.name
    assert_delivered_once(orthanc, PHILIPS_STUDY_UID)

    story = node.audit_show(PHILIPS_STUDY_UID)
    assert story["study_instance_uids"] == [PHILIPS_STUDY_UID]
    (run,) = [s for s in story["series"] if s["results"]]
    assert run["instance_count"] == PHILIPS_5MM_SLICES
    assert {e["state"] for e in run["exports"]} == {"delivered"}
    assert node.terminate(timeout_s=60) == 0  # SIGTERM, as systemd stops it: a clean exit


def test_results_wait_while_the_pacs_is_down_and_arrive_once_when_it_is_back(
    node_and_orthanc: Callable[..., tuple[NodeProcess, Orthanc]], philips_5mm: list[Path]
) -> None:
    node, orthanc = node_and_orthanc(quiet_seconds=1.0)
    orthanc.stop()

    sent = storescu("127.0.0.1", node.port, philips_5mm, called_ae=node.ae_title)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    def failed_attempts() -> int:
        return sum(attempts for _, state, attempts in node.exports() if state != "delivered")

    wait_for(lambda: failed_attempts() >= 2, timeout_s=180, what="two failed export attempts")
    assert all(state != "delivered" for _, state, _ in node.exports())

    orthanc.start()
    wait_for_results(orthanc, PHILIPS_STUDY_UID)
    wait_for(node.settled, timeout_s=120, what="every export delivered")
    assert_delivered_once(orthanc, PHILIPS_STUDY_UID)
