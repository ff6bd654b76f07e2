"""Self-signed PKI for DICOM TLS tests, made with the ``openssl`` command: a test CA, a server and a
client certificate it signs, and a second, untrusted CA with its own client (the "wrong CA" case).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CertificateAndKey", "Pki", "TlsToolError", "make_pki"]

# RSA 2048 is accepted by every DCMTK security profile and by Python's ssl defaults, and is quick
# enough to generate (well under a second per key).
_KEY_BITS = 2048
_DAYS = 2


class TlsToolError(RuntimeError):
    """``openssl`` is missing or one of its commands failed; names the command and its output."""


@dataclass(frozen=True)
class CertificateAndKey:
    """A PEM certificate and its unencrypted PEM private key."""

    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class Pki:
    """Everything a TLS test needs, all PEM files in one folder.

    ``ca`` signs ``server`` (CN and subjectAltName localhost / 127.0.0.1) and ``client``;
    ``rogue_ca`` is an unrelated CA that signs ``rogue_client``.
    """

    ca: CertificateAndKey
    server: CertificateAndKey
    client: CertificateAndKey
    rogue_ca: CertificateAndKey
    rogue_client: CertificateAndKey


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise TlsToolError("the openssl command was not found (install Debian's openssl package)")
    completed = subprocess.run(  # noqa: S603 - fixed binary, our own arguments
        [binary, *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise TlsToolError(
            f"openssl {' '.join(args)} failed ({completed.returncode}): "
            f"{completed.stderr.strip()[-1000:]}"
        )


def _make_ca(folder: Path, name: str) -> CertificateAndKey:
    pair = CertificateAndKey(folder / f"{name}.crt", folder / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", f"rsa:{_KEY_BITS}", "-nodes", "-sha256",
        "-days", str(_DAYS), "-subj", f"/CN=radnet-test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", str(pair.private_key), "-out", str(pair.certificate),
        cwd=folder,
    )  # fmt: skip
    return pair


def _make_leaf(folder: Path, name: str, ca: CertificateAndKey, usage: str) -> CertificateAndKey:
    pair = CertificateAndKey(folder / f"{name}.crt", folder / f"{name}.key")
    request = folder / f"{name}.csr"
    extensions = folder / f"{name}.ext"
    extensions.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        encoding="ascii",
    )
    _openssl(
        "req", "-new", "-newkey", f"rsa:{_KEY_BITS}", "-nodes", "-sha256",
        "-subj", "/CN=localhost", "-keyout", str(pair.private_key), "-out", str(request),
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca.certificate),
        "-CAkey", str(ca.private_key), "-CAcreateserial", "-sha256", "-days", str(_DAYS),
        "-extfile", str(extensions), "-out", str(pair.certificate),
        cwd=folder,
    )  # fmt: skip
    return pair


def make_pki(folder: Path) -> Pki:
    """Create the test PKI in ``folder`` (created if missing).

    Raises
    ------
    TlsToolError
        ``openssl`` is missing or failed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(folder, "ca")
    rogue_ca = _make_ca(folder, "rogue-ca")
    return Pki(
        ca=ca,
        server=_make_leaf(folder, "server", ca, "serverAuth,clientAuth"),
        client=_make_leaf(folder, "client", ca, "clientAuth"),
        rogue_ca=rogue_ca,
        rogue_client=_make_leaf(folder, "rogue-client", rogue_ca, "clientAuth"),
    )
