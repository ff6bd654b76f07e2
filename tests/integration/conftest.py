"""Fixtures for tests with real components: Orthanc, DCMTK, openssl certificates, real series.

A missing program skips its tests on a developer machine and fails them in CI (``CI`` set), so a
check that did not run is never reported as passing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dcmtk import DcmtkError, StoreScp, find_binary
from node_process import NodeError, NodeProcess, node_command, write_test_weights
from orthanc import Modality, Orthanc, OrthancError, find_orthanc_binary, free_port
from pacs import (
    PHILIPS_5MM,
    PHILIPS_5MM_SLICES,
    missing_tool,
    need_program,
    orthanc_destination,
)
from tls import Pki, TlsToolError, make_pki


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
