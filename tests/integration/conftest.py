"""Fixtures for tests with real components: Orthanc, DCMTK, openssl certificates, real series.

A missing program skips its tests on a developer machine and fails them in CI (``CI`` set), so a
check that did not run is never reported as passing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dcmtk import DcmtkError, StoreScp, find_binary
from orthanc import Orthanc, OrthancError, find_orthanc_binary, free_port
from tls import Pki, TlsToolError, make_pki

PHILIPS_5MM = "dcm_qa_ct/Philips_Ingenuity_head_phantom/S21570/S2010"
PHILIPS_STUDY_UID = "1.3.46.670589.33.1.27492712521914879309.27169771283235650014"
PHILIPS_5MM_SLICES = 28


def missing_tool(message: str) -> None:
    """Fail in CI, skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def need_program(name: str) -> str:
    """The path of a program on PATH; skips (fails in CI) when it is missing."""
    found = shutil.which(name)
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
