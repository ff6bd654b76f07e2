"""DICOM TLS with a self-signed test CA: a client that trusts the CA and shows a certificate the
CA signed is accepted; a client without the CA, without a certificate where one is required, with a
certificate from another CA, or without TLS at all is refused. Checked first against DCMTK's
``storescp`` (the reference), then against the node, with the node's other association checks
(called AE title, calling AE title and host allow-lists, maximum associations, out of
resources)."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from dcmtk import StoreScp, TlsOptions, echoscu, storescu
from node_process import NodeProcess
from orthanc import Modality, Orthanc, OrthancTls, wait_for
from pacs import (
    PHILIPS_STUDY_UID,
    assert_delivered_once,
    orthanc_destination,
    wait_for_results,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select
from tls import Pki

from radnet_node.audit import AuditDB, Event
from radnet_node.config import NodeSection
from radnet_node.ingest import IngestSCP

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Client:
    """One TLS client case: how echoscu connects, and whether it must get through."""

    name: str
    accepted: bool
    options: Callable[[Pki], TlsOptions | None]


CLIENTS = [
    Client("trusted CA, client certificate", True,
           lambda p: TlsOptions(p.client.certificate, p.client.private_key, [p.ca.certificate])),
    Client("does not trust the server's CA", False,
           lambda p: TlsOptions(p.client.certificate, p.client.private_key,
                                [p.rogue_ca.certificate])),
    Client("no client certificate", False,
           lambda p: TlsOptions(None, None, [p.ca.certificate])),
    Client("client certificate from another CA", False,
           lambda p: TlsOptions(p.rogue_client.certificate, p.rogue_client.private_key,
                                [p.ca.certificate])),
    Client("plain TCP to a TLS port", False, lambda p: None),
]  # fmt: skip


def _server_tls(pki: Pki) -> TlsOptions:
    # The server trusts only the test CA and requires a client certificate.
    return TlsOptions(pki.server.certificate, pki.server.private_key, [pki.ca.certificate])


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.name)
def test_dcmtk_reference_server_accepts_only_clients_of_its_ca(
    client: Client, pki: Pki, make_storescp: Callable[..., StoreScp]
) -> None:
    server = make_storescp(ae_title="TLSSCP", tls=_server_tls(pki), store=False)

    result = echoscu("127.0.0.1", server.port, called_ae="TLSSCP", tls=client.options(pki),
                     timeout_s=10)  # fmt: skip

    output = result.stdout + result.stderr
    assert (result.returncode == 0) is client.accepted, output


# --- the node ------------------------------------------------------------------------------------


def _node_tls(pki: Pki, *, require_client_certificate: bool) -> dict[str, object]:
    return {
        "certificate": str(pki.server.certificate),
        "private_key": str(pki.server.private_key),
        "ca_certificates": str(pki.ca.certificate),
        "require_client_certificate": require_client_certificate,
    }


def test_node_with_tls_accepts_only_clients_of_its_ca(
    pki: Pki, make_node: Callable[..., NodeProcess]
) -> None:
    node = make_node(sections={"node": {"tls": _node_tls(pki, require_client_certificate=True)}})

    outcomes = {}
    for client in CLIENTS:
        result = echoscu("127.0.0.1", node.port, called_ae=node.ae_title,
                         tls=client.options(pki), timeout_s=10)  # fmt: skip
        outcomes[client.name] = result.returncode == 0
    assert outcomes == {c.name: c.accepted for c in CLIENTS}
    assert node.running


def test_node_with_tls_and_no_client_certificate_required_accepts_anonymous_clients(
    pki: Pki, make_node: Callable[..., NodeProcess], philips_5mm: list[Path]
) -> None:
    node = make_node(sections={"node": {"tls": _node_tls(pki, require_client_certificate=False)}})
    anonymous = TlsOptions(None, None, [pki.ca.certificate])

    echo = echoscu("127.0.0.1", node.port, called_ae=node.ae_title, tls=anonymous)
    store = storescu("127.0.0.1", node.port, philips_5mm[:2], called_ae=node.ae_title,
                     tls=anonymous)  # fmt: skip
    untrusted = echoscu("127.0.0.1", node.port, called_ae=node.ae_title,
                        tls=TlsOptions(None, None, [pki.rogue_ca.certificate]))  # fmt: skip

    assert echo.returncode == 0, echo.stdout + echo.stderr
    assert store.returncode == 0, store.stdout + store.stderr
    assert len(node.spooled_instances()) == 2
    assert untrusted.returncode != 0


def _rejection(result: subprocess.CompletedProcess[str]) -> str:
    """The reason line of an A-ASSOCIATE-RJ as echoscu prints it ("" when not rejected)."""
    for line in (result.stdout + result.stderr).splitlines():
        if "Reason:" in line:
            return line.split("Reason:", 1)[1].strip()
    return ""


def test_node_answers_c_echo_and_rejects_a_wrong_called_ae_title(
    make_node: Callable[..., NodeProcess],
) -> None:
    node = make_node()

    good = echoscu("127.0.0.1", node.port, called_ae=node.ae_title)
    wrong = echoscu("127.0.0.1", node.port, called_ae="NOTRADNET")

    assert good.returncode == 0, good.stdout + good.stderr
    assert wrong.returncode != 0
    assert _rejection(wrong) == "Called AE Title Not Recognized"


def test_node_rejects_a_calling_ae_title_that_is_not_on_the_allow_list(
    make_node: Callable[..., NodeProcess],
) -> None:
    node = make_node(sections={"node": {"allowed_calling_ae_titles": ["PACS1"]}})

    allowed = echoscu("127.0.0.1", node.port, called_ae=node.ae_title, calling_ae="PACS1")
    refused = echoscu("127.0.0.1", node.port, called_ae=node.ae_title, calling_ae="INTRUDER")

    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert refused.returncode != 0
    assert _rejection(refused) == "Calling AE Title Not Recognized"


def test_node_rejects_a_host_that_is_not_on_the_allow_list(
    make_node: Callable[..., NodeProcess],
) -> None:
    node = make_node(sections={"node": {"allowed_hosts": ["192.0.2.0/24"]}})

    refused = echoscu("127.0.0.1", node.port, called_ae=node.ae_title)

    assert refused.returncode != 0
    assert "Rejected Permanent" in refused.stdout + refused.stderr


def test_node_refuses_instances_with_out_of_resources_when_the_disk_is_full(
    make_node: Callable[..., NodeProcess], philips_5mm: list[Path]
) -> None:
    # more free space required than any test machine has
    node = make_node(sections={"node": {"min_free_disk_mb": 1_000_000_000}})

    refused = storescu("127.0.0.1", node.port, philips_5mm[:1], called_ae=node.ae_title)

    assert refused.returncode != 0
    assert "Refused: OutOfResources" in refused.stdout + refused.stderr  # A700
    assert node.spooled_instances() == {}


def test_orthanc_and_the_node_exchange_the_study_and_the_results_over_tls_only(
    pki: Pki,
    make_node: Callable[..., NodeProcess],
    make_orthanc: Callable[..., Orthanc],
    philips_5mm: list[Path],
) -> None:
    # both ends use the server certificate (it carries serverAuth and clientAuth), both trust the CA
    node = make_node(
        start=False,
        quiet_seconds=1.0,
        sections={"node": {"tls": _node_tls(pki, require_client_certificate=True)}},
    )
    orthanc = make_orthanc(
        modalities=[Modality("radnet", node.ae_title, "127.0.0.1", node.port, use_tls=True)],
        tls=OrthancTls(pki.server.certificate, pki.server.private_key, pki.ca.certificate),
    )
    client = {
        "ca_certificates": str(pki.ca.certificate),
        "certificate": str(pki.client.certificate),
        "private_key": str(pki.client.private_key),
    }
    node.destinations = [orthanc_destination(orthanc, tls=client)]
    node.start()
    orthanc.upload_files(philips_5mm)
    (series,) = orthanc.find("Series", {"SeriesDescription": "STD BRAIN 5MM"}, expand=False)

    orthanc.store_to_modality("radnet", [series])
    wait_for_results(orthanc, PHILIPS_STUDY_UID)
    wait_for(node.settled, timeout_s=120, what="every export delivered")

    assert_delivered_once(orthanc, PHILIPS_STUDY_UID)
    plain = echoscu("127.0.0.1", orthanc.dicom_port, called_ae=orthanc.ae_title)
    assert plain.returncode != 0  # Orthanc's port speaks TLS only: the results came over TLS


def test_node_rejects_associations_beyond_its_maximum_as_transient(
    make_node: Callable[..., NodeProcess],
) -> None:
    node = make_node(sections={"node": {"max_associations": 1}})
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(Verification)
    held = holder.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert held.is_established
    try:
        refused = echoscu("127.0.0.1", node.port, called_ae=node.ae_title)
    finally:
        held.release()
    again = wait_for(
        lambda: echoscu("127.0.0.1", node.port, called_ae=node.ae_title).returncode == 0,
        timeout_s=30,
        what="a C-ECHO once the held association is released",
    )

    assert refused.returncode != 0
    assert "Rejected Transient" in refused.stdout + refused.stderr, refused.stdout
    assert again


def test_a_silent_peer_over_tls_is_aborted_after_the_network_timeout(
    pki: Pki, tmp_path: Path
) -> None:
    # The SCP in this process with a short timeout. Over TLS a read interrupted by the kernel's
    # own timeout is retried inside the ssl module, so the node must use a socket timeout there.
    db = AuditDB(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    node = NodeSection(
        host="127.0.0.1", port=0, data_dir=tmp_path / "data", min_free_disk_mb=1,
        tls=_node_tls(pki, require_client_certificate=False),
    )  # fmt: skip
    scp = IngestSCP(node, db)
    scp.NETWORK_TIMEOUT_S = 0.5
    scp.start()
    try:
        context = ssl.create_default_context(cafile=str(pki.ca.certificate))
        context.check_hostname = False
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        association = ae.associate(
            "127.0.0.1", scp.address[1], ae_title="RADNET", tls_args=(context, None)
        )
        assert association.is_established
        # the client sends nothing more: the node aborts the association instead of waiting
        wait_for(lambda: association.is_aborted, timeout_s=10, what="an A-ABORT from the node")
    finally:
        scp.stop()

    def closed() -> list[str]:
        with db.session() as session:
            query = select(Event.message).where(Event.kind == "association.closed")
            return list(session.scalars(query))

    message = wait_for(closed, timeout_s=10, what="the association's closed row")
    assert "aborted (no progress for 0.5 s)" in message[0]
