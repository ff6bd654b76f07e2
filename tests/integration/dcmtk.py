"""DCMTK as a real peer in tests: ``echoscu`` and ``storescu`` as a modality, ``storescp`` as a
reference receiver, with optional DICOM TLS.

Debian's DCMTK leaves Nagle's algorithm on and then stalls at ~20 images/s on loopback; every
command here runs with ``TCP_NODELAY=1`` in its environment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

__all__ = [
    "DcmtkError",
    "StoreScp",
    "TlsOptions",
    "dcmtk_env",
    "echoscu",
    "find_binary",
    "require_binary",
    "storescu",
    "storescu_command",
    "wait_for_port",
]

MAX_PDU = 131072


class DcmtkError(RuntimeError):
    """A DCMTK program is missing or did not start; names the program and why."""


def dcmtk_env() -> dict[str, str]:
    """The current environment with ``TCP_NODELAY=1`` (see the module docstring)."""
    return os.environ | {"TCP_NODELAY": "1"}


def find_binary(name: str) -> str | None:
    """The DCMTK program ``name``: in ``$DCMTK_BIN`` if set, else the first on PATH that is a
    compiled program.

    pynetdicom installs Python scripts called ``echoscu``/``storescu``/``storescp`` into the
    virtual environment, which comes first on PATH; those are not DCMTK and are skipped.
    """
    folders = [os.environ["DCMTK_BIN"]] if os.environ.get("DCMTK_BIN") else None
    search = folders or os.environ.get("PATH", "").split(os.pathsep)
    for folder in search:
        candidate = Path(folder) / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        with candidate.open("rb") as handle:
            if handle.read(2) != b"#!":
                return str(candidate)
    return None


def require_binary(name: str) -> str:
    """The absolute path of a DCMTK program (see :func:`find_binary`).

    Raises
    ------
    DcmtkError
        It is not installed.
    """
    found = find_binary(name)
    if found is None:
        raise DcmtkError(f"DCMTK's {name} was not found on PATH (install Debian's dcmtk package)")
    return found


@dataclass(frozen=True)
class TlsOptions:
    """DICOM TLS for a DCMTK program.

    ``certificate``/``private_key`` ``None``: anonymous TLS (``+tla``, no client certificate).
    ``trusted`` are the CA files to trust (``+cf``); ``peer``: ``require`` (``-rc``), ``verify``
    (``-vc``, storescp only: verify if present) or ``ignore`` (``-ic``).
    """

    certificate: Path | None = None
    private_key: Path | None = None
    trusted: Sequence[Path] = ()
    peer: str = "require"

    def arguments(self) -> list[str]:
        """The DCMTK command-line options."""
        if self.certificate is None or self.private_key is None:
            args = ["+tla"]
        else:
            args = ["+tls", str(self.private_key), str(self.certificate)]
        for ca in self.trusted:
            args += ["+cf", str(ca)]
        args.append({"require": "-rc", "verify": "-vc", "ignore": "-ic"}[self.peer])
        return args


def _association_args(
    called_ae: str, calling_ae: str, tls: TlsOptions | None, timeout_s: float
) -> list[str]:
    args = ["-aec", called_ae, "-aet", calling_ae, "-to", str(int(timeout_s))]
    args += ["-ta", str(int(timeout_s)), "-td", str(int(timeout_s))]
    return args + (tls.arguments() if tls else [])


def echoscu(
    host: str,
    port: int,
    *,
    called_ae: str,
    calling_ae: str = "ECHOSCU",
    tls: TlsOptions | None = None,
    timeout_s: float = 20.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``echoscu`` once; returns the finished process (exit 0: the C-ECHO succeeded)."""
    command = [require_binary("echoscu"), "-v"]
    command += _association_args(called_ae, calling_ae, tls, timeout_s) + [host, str(port)]
    return subprocess.run(  # noqa: S603 - our own arguments
        command,
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s + 30,
        check=False,
    )


def storescu_command(
    host: str,
    port: int,
    files: Sequence[Path],
    *,
    called_ae: str,
    calling_ae: str = "STORESCU",
    tls: TlsOptions | None = None,
    timeout_s: float = 60.0,
    max_pdu: int = MAX_PDU,
) -> list[str]:
    """The ``storescu`` command line that sends ``files`` on one association.

    ``-R`` proposes only the SOP classes present in the files; storescu stops at the first
    refused file (exit code not 0).
    """
    command = [require_binary("storescu"), "-v", "-R", "-pdu", str(max_pdu)]
    command += _association_args(called_ae, calling_ae, tls, timeout_s)
    return command + [host, str(port), *[str(f) for f in files]]


def storescu(
    host: str,
    port: int,
    files: Sequence[Path],
    *,
    called_ae: str,
    calling_ae: str = "STORESCU",
    tls: TlsOptions | None = None,
    timeout_s: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``storescu`` to the end; returns the finished process (exit 0: every store succeeded)."""
    command = storescu_command(
        host, port, files, called_ae=called_ae, calling_ae=calling_ae, tls=tls,
        timeout_s=timeout_s,
    )  # fmt: skip
    return subprocess.run(  # noqa: S603 - our own arguments
        command, env=dcmtk_env(), capture_output=True, text=True, timeout=timeout_s + 60,
        check=False,
    )  # fmt: skip


def wait_for_port(
    host: str,
    port: int,
    *,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None = None,
    what: str = "server",
) -> None:
    """Wait until ``host:port`` accepts a TCP connection.

    Raises
    ------
    DcmtkError
        ``process`` exited first, or the port did not open within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise DcmtkError(f"{what} exited with code {process.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.1)
    raise DcmtkError(f"{what} did not listen on {host}:{port} within {timeout_s:.0f} s")


@dataclass
class StoreScp:
    """DCMTK ``storescp`` on 127.0.0.1 writing what it receives to ``output_dir`` bit for bit.

    ``store=False`` receives and discards (``--ignore``). A context manager that starts it and
    always stops it.
    """

    port: int
    output_dir: Path
    ae_title: str = "STORESCP"
    tls: TlsOptions | None = None
    store: bool = True
    max_pdu: int = MAX_PDU
    log: Path | None = None
    #: storescp -v (a log line per association and instance)
    verbose: bool = True
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def start(self) -> StoreScp:
        """Start and wait until the port accepts connections.

        Raises
        ------
        DcmtkError
            storescp is missing or did not start listening.
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        command = [require_binary("storescp"), *(["-v"] if self.verbose else []), "-aet",
                   self.ae_title, "-pdu", str(self.max_pdu), "+xa", "-od",
                   str(self.output_dir)]  # fmt: skip
        command += ["+B"] if self.store else ["--ignore"]
        command += self.tls.arguments() if self.tls else []
        command.append(str(self.port))
        log = self.log or self.output_dir.parent / f"storescp-{self.port}.log"
        with log.open("ab") as out:
            self._process = subprocess.Popen(  # noqa: S603 - our own arguments
                command, env=dcmtk_env(), stdout=out, stderr=subprocess.STDOUT
            )
        try:
            wait_for_port("127.0.0.1", self.port, timeout_s=15.0, process=self._process,
                          what="storescp")  # fmt: skip
        except DcmtkError as exc:
            self.stop()
            tail = log.read_text(errors="replace")[-1500:]
            raise DcmtkError(f"{exc}; storescp log:\n{tail}") from exc
        return self

    @property
    def pid(self) -> int:
        """The process id of the running storescp.

        Raises
        ------
        DcmtkError
            storescp is not running.
        """
        if self._process is None:
            raise DcmtkError("storescp is not running")
        return self._process.pid

    def stop(self) -> None:
        """Stop storescp (SIGTERM, then SIGKILL after 10 s)."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self._process = None

    def received(self) -> list[Path]:
        """The files received so far; storescp writes into its folder directly, so a file still
        being written (not yet readable as a whole DICOM file) is not counted."""
        return sorted(p for p in self.output_dir.iterdir() if p.is_file() and _complete(p))

    def __enter__(self) -> StoreScp:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _complete(path: Path) -> bool:
    try:
        pydicom.dcmread(path)  # a truncated file fails to read
    except Exception:  # noqa: BLE001 - a partial file fails in many ways; it is simply not done
        return False
    return True
