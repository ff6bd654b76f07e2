"""A real Orthanc (Debian's binary) started as a plain process for tests, and its REST API.

Each :class:`Orthanc` owns a temporary folder with its JSON config, storage, index and log; it
listens on free 127.0.0.1 ports and can be stopped and started again on the same ports and storage
(the "PACS down" case).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "Modality",
    "Orthanc",
    "OrthancError",
    "OrthancTls",
    "find_orthanc_binary",
    "free_port",
    "wait_for",
]

T = TypeVar("T")

# Logs every instance Orthanc receives, duplicates included (Orthanc stores a duplicate SOP Instance
# UID once and records no change for it, so its database alone cannot show a double delivery).
_RECEPTION_LOG_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  print('radnet-test-received ' .. tostring(dicom['SOPInstanceUID']) .. ' '
    .. tostring(dicom['Modality']) .. ' ' .. tostring(origin['RequestOrigin']) .. ' '
    .. tostring(origin['RemoteAet']))
  return true
end
"""
_RECEPTION_MARK = "radnet-test-received "

# Debian installs the server in /usr/sbin, which is not on a normal user's PATH.
_ORTHANC_CANDIDATES = ("Orthanc", "/usr/sbin/Orthanc")


class OrthancError(RuntimeError):
    """Orthanc did not start, stopped unexpectedly, or a REST call failed; says which and why."""


def find_orthanc_binary() -> str | None:
    """The Orthanc binary: ``$ORTHANC_BIN``, ``Orthanc`` on PATH, or ``/usr/sbin/Orthanc``."""
    explicit = os.environ.get("ORTHANC_BIN")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for candidate in _ORTHANC_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (the kernel picks it; a tiny race before use is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], T | None],
    *,
    timeout_s: float,
    interval_s: float = 0.2,
    what: str = "condition",
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    Raises
    ------
    TimeoutError
        ``condition`` stayed falsy for ``timeout_s`` seconds; the message names ``what``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


@dataclass(frozen=True)
class Modality:
    """A remote DICOM node as Orthanc's ``DicomModalities`` sees it."""

    name: str
    ae_title: str
    host: str
    port: int
    use_tls: bool = False

    def to_config(self) -> dict[str, Any]:
        """The entry of Orthanc's ``DicomModalities`` for this node."""
        return {
            "AET": self.ae_title,
            "Host": self.host,
            "Port": self.port,
            "UseDicomTls": self.use_tls,
        }


@dataclass(frozen=True)
class OrthancTls:
    """DICOM TLS for Orthanc's SCP and SCU: its certificate and key, and the CAs it trusts (PEM)."""

    certificate: Path
    private_key: Path
    trusted_certificates: Path
    require_remote_certificate: bool = True


@dataclass
class Orthanc:
    """One Orthanc server in ``workdir``; a context manager that starts it and always stops it.

    ``modalities`` are registered in the config; ``lua_scripts`` are loaded at start (a syntax
    error makes the start fail with Orthanc's log in the message); ``extra_config`` is merged last.
    ``log_receptions`` adds a Lua filter that logs every received instance, so that
    :meth:`receptions` can count deliveries, duplicates included.
    """

    workdir: Path
    ae_title: str = "ORTHANC"
    modalities: Sequence[Modality] = ()
    lua_scripts: Sequence[Path] = ()
    tls: OrthancTls | None = None
    extra_config: Mapping[str, Any] = field(default_factory=dict)
    start_timeout_s: float = 30.0
    log_receptions: bool = True
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _starts: int = field(default=0, init=False, repr=False)

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def config_path(self) -> Path:
        """The JSON configuration file written at start."""
        return self.workdir / "orthanc.json"

    @property
    def log_path(self) -> Path:
        """Orthanc's log file of the current (or last) start (``--logfile``)."""
        return self.workdir / f"orthanc-{max(self._starts, 1)}.log"

    def log_files(self) -> list[Path]:
        """The log files of every start, oldest first (Orthanc truncates its log file at start)."""
        return [self.workdir / f"orthanc-{n}.log" for n in range(1, self._starts + 1)]

    @property
    def storage_dir(self) -> Path:
        """StorageDirectory and IndexDirectory (kept across restarts)."""
        return self.workdir / "storage"

    def config(self) -> dict[str, Any]:
        """The JSON configuration Orthanc is started with."""
        config: dict[str, Any] = {
            "Name": f"radnet-test-{self.ae_title}",
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.storage_dir),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomModalities": {m.name: m.to_config() for m in self.modalities},
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            # The tests send results back within seconds; Orthanc's default of 60 s would only
            # delay the Lua "stable" callbacks.
            "StableAge": 2,
            "DicomScuTimeout": 30,
            "SaveJobs": False,
            "OverwriteInstances": False,
            "LuaScripts": [str(p) for p in self._lua_scripts()],
            "DicomAssociationCloseDelay": 0,
        }
        if self.tls is not None:
            config |= {
                "DicomTlsEnabled": True,
                "DicomTlsCertificate": str(self.tls.certificate),
                "DicomTlsPrivateKey": str(self.tls.private_key),
                "DicomTlsTrustedCertificates": str(self.tls.trusted_certificates),
                "DicomTlsRemoteCertificateRequired": self.tls.require_remote_certificate,
            }
        config |= dict(self.extra_config)
        return config

    def _lua_scripts(self) -> list[Path]:
        scripts = list(self.lua_scripts)
        if self.log_receptions:
            scripts.append(self.workdir / "log-receptions.lua")
        return scripts

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> Orthanc:
        """Write the config, start Orthanc and wait until ``/system`` answers.

        Raises
        ------
        OrthancError
            The binary is missing, the process exited, or ``/system`` did not answer in time
            (the process is killed; the message ends with the tail of Orthanc's log).
        """
        if self.running:
            return self
        binary = find_orthanc_binary()
        if binary is None:
            raise OrthancError(
                "the Orthanc binary was not found (install Debian's orthanc package)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(exist_ok=True)
        self._starts += 1
        (self.workdir / "log-receptions.lua").write_text(_RECEPTION_LOG_LUA, encoding="utf-8")
        self.config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        # Orthanc writes its log itself; stdout/stderr only catch what it prints before that.
        with (self.workdir / "orthanc.stdout.log").open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 - fixed binary, our own arguments
                [binary, f"--logfile={self.log_path}", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise OrthancError(f"Orthanc exited with code {code} at start{self._log_tail()}")
            try:
                self.get_json("/system", timeout_s=2.0)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OrthancError):
                time.sleep(0.2)
        self.kill()
        raise OrthancError(
            f"Orthanc did not answer /system within {self.start_timeout_s:.0f} s{self._log_tail()}"
        )

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop Orthanc with SIGTERM (SIGKILL after ``timeout_s``); a stopped server is a no-op."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout_s)
        self._process = None

    def kill(self) -> None:
        """Kill Orthanc at once (SIGKILL)."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait(timeout=15.0)
        self._process = None

    def restart(self) -> Orthanc:
        """Stop and start again on the same ports and storage."""
        self.stop()
        return self.start()

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _log_tail(self, lines: int = 30) -> str:
        tails = []
        for path in (self.workdir / "orthanc.stdout.log", self.log_path):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            tail = "\n".join(text.splitlines()[-lines:])
            if tail:
                tails.append(f"{path}:\n{tail}")
        return "; Orthanc's output: " + "\n".join(tails) if tails else ""

    # --- REST -----------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str = "application/json",
        timeout_s: float = 60.0,
    ) -> bytes:
        """One REST call; returns the response body.

        Raises
        ------
        OrthancError
            Orthanc answered with an HTTP error (the message has the status and Orthanc's answer).
        urllib.error.URLError
            Orthanc is not reachable.
        """
        request = urllib.request.Request(  # noqa: S310 - always our own http://127.0.0.1 URL
            self.url + path, data=body, method=method
        )
        if body is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")[:2000]
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {detail}") from exc

    def get_json(self, path: str, *, timeout_s: float = 60.0) -> Any:
        """GET a JSON resource."""
        return json.loads(self.request("GET", path, timeout_s=timeout_s))

    def post_json(self, path: str, payload: Any, *, timeout_s: float = 120.0) -> Any:
        """POST a JSON body and decode the JSON answer."""
        answer = self.request("POST", path, json.dumps(payload).encode(), timeout_s=timeout_s)
        return json.loads(answer) if answer.strip() else None

    def upload(self, path: Path) -> str:
        """Store one DICOM file through ``POST /instances``; returns Orthanc's instance ID.

        Raises
        ------
        OrthancError
            Orthanc refused the file (not DICOM, or the store failed).
        """
        answer = json.loads(
            self.request("POST", "/instances", path.read_bytes(), content_type="application/dicom")
        )
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(f"{path}: upload status {answer.get('Status')!r}")
        return str(answer["ID"])

    def upload_files(self, paths: Iterable[Path]) -> list[str]:
        """Upload every file; returns the instance IDs in the same order."""
        return [self.upload(path) for path in paths]

    def store_to_modality(
        self, modality: str, resources: Sequence[str], *, timeout_s: float = 300.0
    ) -> dict[str, Any]:
        """C-STORE resources (Orthanc IDs of patients/studies/series/instances) to a modality.

        Synchronous: returns when the association is closed, with Orthanc's job answer.

        Raises
        ------
        OrthancError
            The store failed (modality unreachable, association rejected, a store refused).
        """
        payload = {"Resources": list(resources), "Synchronous": True, "Timeout": int(timeout_s)}
        answer = self.post_json(f"/modalities/{modality}/store", payload, timeout_s=timeout_s)
        return dict(answer or {})

    def echo(self, modality: str) -> bool:
        """C-ECHO a registered modality from Orthanc; ``True`` when it answered."""
        try:
            self.request("POST", f"/modalities/{modality}/echo", b"{}", timeout_s=30.0)
        except OrthancError:
            return False
        return True

    def find(self, level: str, query: Mapping[str, str], *, expand: bool = True) -> list[Any]:
        """``POST /tools/find`` at ``level`` (Patient, Study, Series, Instance)."""
        payload = {"Level": level, "Query": dict(query), "Expand": expand}
        return list(self.post_json("/tools/find", payload))

    def study_id(self, study_instance_uid: str) -> str | None:
        """Orthanc's ID of the study with this StudyInstanceUID, or ``None``."""
        found = self.find("Study", {"StudyInstanceUID": study_instance_uid}, expand=False)
        return str(found[0]) if found else None

    def study_instances(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Every instance of the study, each with its simplified tags (``Tags``) and ``ID``.

        An unknown study gives an empty list.
        """
        study = self.study_id(study_instance_uid)
        if study is None:
            return []
        instances = self.get_json(f"/studies/{study}/instances")
        result = []
        for instance in instances:
            tags = self.get_json(f"/instances/{instance['ID']}/simplified-tags")
            result.append({"ID": instance["ID"], "Tags": tags})
        return result

    def instances_by_modality(self, study_instance_uid: str) -> dict[str, list[dict[str, Any]]]:
        """The study's instances grouped by their Modality tag (CT, SR, SEG, OT, ...)."""
        grouped: dict[str, list[dict[str, Any]]] = {}
        for instance in self.study_instances(study_instance_uid):
            grouped.setdefault(str(instance["Tags"].get("Modality", "")), []).append(instance)
        return grouped

    def fetch_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of an instance (``GET /instances/<id>/file``)."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def statistics(self) -> dict[str, Any]:
        """``/statistics`` (counts of patients, studies, series, instances)."""
        return dict(self.get_json("/statistics"))

    def changes(self) -> list[dict[str, Any]]:
        """Every entry of ``/changes`` (NewInstance, StableSeries, ...), oldest first."""
        entries: list[dict[str, Any]] = []
        since = 0
        while True:
            page = self.get_json(f"/changes?since={since}&limit=1000")
            entries.extend(page["Changes"])
            since = int(page["Last"])
            if page["Done"]:
                return entries

    def receptions(self, origin: str = "DicomProtocol") -> Counter[str]:
        """How many times each SOP Instance UID was received (duplicates included), from Orthanc's
        log since its first start; ``origin``: ``DicomProtocol`` (C-STORE), ``RestApi``, or ``""``
        for any.

        Raises
        ------
        OrthancError
            The server was made with ``log_receptions=False``.
        """
        if not self.log_receptions:
            raise OrthancError("receptions are not logged (log_receptions=False)")
        counts: Counter[str] = Counter()
        lines = [
            line
            for path in self.log_files()
            if path.is_file()
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
        ]
        for line in lines:
            if _RECEPTION_MARK not in line:
                continue
            fields = line.split(_RECEPTION_MARK, 1)[1].split()
            if len(fields) >= 3 and (not origin or fields[2] == origin):
                counts[fields[0]] += 1
        return counts
