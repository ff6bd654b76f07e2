"""DICOM TLS with a self-signed test CA: a client that trusts the CA and shows a certificate the
CA signed is accepted; a client without the CA, without a certificate where one is required, with a
certificate from another CA, or without TLS at all is refused. Checked first against DCMTK's
``storescp`` (the reference), then against the node."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from dcmtk import StoreScp, TlsOptions, echoscu
from tls import Pki

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
