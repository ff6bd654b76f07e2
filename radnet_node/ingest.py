"""The DICOM SCP: C-ECHO and C-STORE, association checks (called AE, calling AE and host
allow-lists, association limit, optional TLS), and the spool, where the received bytes are written
atomically and recorded before success is answered. Only this module knows ingest DIMSE statuses.
"""

from __future__ import annotations

import errno
import os
import shutil
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import structlog
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    LegacyConvertedEnhancedCTImageStorage,
    RLELossless,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association as PynetAssociation
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target
from sqlalchemy import select

from radnet_node.audit import Association, AuditDB, Instance, add_event, utcnow
from radnet_node.catalog import InstanceInfo, RegistrationOutcome, is_safe_uid, register_instance
from radnet_node.config import NodeSection, TlsSection
from radnet_node.errors import ConfigError, RadnetError

#: the Verification SOP Class (C-ECHO)
Verification = UID("1.2.840.10008.1.1")

__all__ = [
    "CT_STORAGE_CLASSES",
    "CT_TRANSFER_SYNTAXES",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "IngestSCP",
    "server_ssl_context",
    "spool_path",
]

STATUS_SUCCESS = 0x0000
#: Refused: out of resources (disk below the threshold, the spool or database cannot be written)
STATUS_OUT_OF_RESOURCES = 0xA700
#: Error: cannot understand (the dataset cannot be parsed or lacks valid UIDs)
STATUS_CANNOT_UNDERSTAND = 0xC000

CT_STORAGE_CLASSES: tuple[UID, ...] = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)
#: what the CT classes are accepted in: every syntax the preprocessing can decode
CT_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLossless,  # process 14
    JPEGExtended12Bit,  # lossy, 12 bit
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
_REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognised
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
_REJECT_NO_REASON = (0x01, 0x01, 0x01)  # permanent, service user, no reason given (host refused)
_REJECT_LIMIT = (0x02, 0x03, 0x02)  # transient, presentation, local limit exceeded

_log = structlog.get_logger("radnet_node.ingest")


def spool_path(spool_dir: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where an instance is spooled: ``spool/<study>/<series>/<sop>.dcm``."""
    return spool_dir / study_uid / series_uid / f"{sop_uid}.dcm"


def server_ssl_context(tls: TlsSection) -> ssl.SSLContext:
    """The TLS context of the SCP (TLS 1.2 or later; client certificates when required).

    Raises
    ------
    ConfigError
        A certificate, key or CA file cannot be loaded (names the file).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.private_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"node.tls: cannot load {tls.certificate} / {tls.private_key}: {exc}"
        ) from None
    if tls.ca_certificates is not None:
        try:
            context.load_verify_locations(cafile=str(tls.ca_certificates))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"node.tls.ca_certificates: cannot load {tls.ca_certificates}: {exc}"
            ) from None
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return context


@dataclass
class _Open:
    """An accepted association: its audit row and how many instances it stored."""

    association_id: int
    stored: int = 0
    duplicates: int = 0
    refused: int = 0


class _FreeSpace:
    """Free space of the spool's file system, read at most every ``max_age_s`` seconds (a statvfs
    per instance costs as much as the rest of the checks). Each instance reserves its size under
    the lock before it is written, so concurrent associations cannot all pass the threshold with
    the same reading; a failed write keeps its reservation until the next reading."""

    def __init__(self, path: Path, max_age_s: float = 1.0) -> None:
        self.path = path
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._free_bytes = 0
        self._read_at = -float("inf")

    def reserve(self, size: int, min_free_mb: float) -> bool:
        """Take ``size`` bytes if at least ``min_free_mb`` MiB stay free afterwards.

        Raises
        ------
        OSError
            The file system cannot be queried.
        """
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= self.max_age_s:
                self._free_bytes = shutil.disk_usage(self.path).free
                self._read_at = now
            if self._free_bytes - size < min_free_mb * 1024 * 1024:
                return False
            self._free_bytes -= size
            return True


@dataclass
class _IngestState:
    """What the handlers share: bound to them at registration (no module globals)."""

    node: NodeSection
    db: AuditDB
    spool_dir: Path
    tls: bool
    on_instance: Callable[[], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    open: dict[int, _Open] = field(default_factory=dict)
    free_space: _FreeSpace = field(init=False)

    def __post_init__(self) -> None:
        self.free_space = _FreeSpace(self.spool_dir)


class IngestSCP:
    """The node's Storage SCP; start it with :meth:`start` (or :meth:`bind`, then :meth:`serve`),
    stop it with :meth:`stop`.

    Parameters
    ----------
    node
        ``[node]`` settings: AE title, address, allow-lists, limits, TLS, data folder.
    db
        The audit database (instances, series and associations are recorded there).
    on_instance
        Called (in the association's thread) after each new instance is recorded.

    Raises
    ------
    ConfigError
        The TLS files cannot be loaded.
    """

    def __init__(
        self, node: NodeSection, db: AuditDB, on_instance: Callable[[], None] | None = None
    ) -> None:
        self.node = node
        self.spool_dir = node.data_dir / "spool"
        self._ssl = server_ssl_context(node.tls) if node.tls is not None else None
        self._state = _IngestState(
            node=node,
            db=db,
            spool_dir=self.spool_dir,
            tls=self._ssl is not None,
            on_instance=on_instance,
        )
        self.ae = self._make_ae()
        self._server: ThreadedAssociationServer | None = None
        self._acceptor: threading.Thread | None = None

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.node.ae_title)
        # our own checks in EVT_REQUESTED reject with the right reason and audit it; pynetdicom's
        # would reject before we could record anything
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.maximum_associations = max(self.node.max_associations + 1, 64)
        ae.maximum_pdu_size = self.node.max_pdu_bytes
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.network_timeout = 60
        ae.add_supported_context(Verification)
        for sop_class in CT_STORAGE_CLASSES:
            ae.add_supported_context(sop_class, list(CT_TRANSFER_SYNTAXES))
        if self.node.accept_all_storage_classes:
            for context in AllStoragePresentationContexts:
                abstract = str(context.abstract_syntax)
                if abstract not in CT_STORAGE_CLASSES:
                    ae.add_supported_context(abstract, ALL_TRANSFER_SYNTAXES)
        return ae

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the server listens on (the real port when configured as 0).

        Raises
        ------
        RuntimeError
            If the server is not running.
        """
        if self._server is None:
            raise RuntimeError("the SCP is not running")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def bind(self) -> tuple[str, int]:
        """Bind and listen on the configured address without answering anyone yet: a peer that
        connects waits in the listen backlog until :meth:`serve`. Binding first lets the node
        claim its port before it touches anything (a second node on the same port fails here).
        Returns the bound (host, port).

        Raises
        ------
        RadnetError
            The address cannot be bound (in use, not allowed), naming it.
        """
        if self._server is not None:
            return self.address
        state = self._state
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, _on_requested, [state]),
            (evt.EVT_C_ECHO, _on_echo, [state]),
            (evt.EVT_C_STORE, _on_store, [state]),
            (evt.EVT_CONN_CLOSE, _on_close, [state]),
        ]
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            server = self.ae.make_server(
                (self.node.host, self.node.port),
                ssl_context=self._ssl,
                evt_handlers=handlers,
                server_class=ThreadedAssociationServer,
            )
        except OSError as exc:
            hint = (
                " (another radnet-node or DICOM server listens there: stop it or set node.port)"
                if exc.errno == errno.EADDRINUSE
                else ""
            )
            raise RadnetError(
                f"cannot listen on {self.node.host}:{self.node.port}: {exc.strerror or exc}{hint}"
            ) from exc
        self._server = cast(ThreadedAssociationServer, server)
        return self.address

    def serve(self) -> None:
        """Start answering associations on the bound address (in background threads).

        Raises
        ------
        RuntimeError
            If :meth:`bind` has not succeeded.
        """
        if self._server is None:
            raise RuntimeError("the SCP is not bound")
        if self._acceptor is not None:
            return
        # what AE.start_server(block=False) does after make_server
        self._acceptor = threading.Thread(
            target=make_target(self._server.serve_forever), name="scp-acceptor", daemon=True
        )
        self._acceptor.start()

    def start(self) -> tuple[str, int]:
        """Bind, then serve (:meth:`bind` and :meth:`serve`); returns the bound (host, port).

        Raises
        ------
        RadnetError
            The address cannot be bound (in use, not allowed), naming it.
        """
        address = self.bind()
        self.serve()
        return address

    def stop(self) -> None:
        """Stop accepting associations and close the open ones (their instances so far are kept;
        an instance in flight is not answered, so the sender sends it again)."""
        server, self._server = self._server, None
        if server is not None:
            if self._acceptor is not None:
                # the accept loop's own shutdown (waits for it to end); pynetdicom's override
                # also expects the server in AE._servers, where only start_server puts it
                socketserver.BaseServer.shutdown(server)
                self._acceptor.join()
                self._acceptor = None
            server.server_close()
        self.ae.shutdown()

    def active_associations(self) -> int:
        """How many accepted associations are open now."""
        with self._state.lock:
            return len(self._state.open)


# ------------------------------------------------------------------------------------------------
# handlers: small functions of the event, with the shared state bound at registration


def _peer(assoc: PynetAssociation) -> tuple[str, str, str, int]:
    requestor = assoc.requestor
    primitive = requestor.primitive
    calling = str(getattr(primitive, "calling_ae_title", "") or requestor.ae_title or "").strip()
    called = str(getattr(primitive, "called_ae_title", "") or "").strip()
    return calling, called, str(requestor.address), int(requestor.port or 0)


def _on_requested(event: evt.Event, state: _IngestState) -> None:
    """A-ASSOCIATE-RQ received: check it, record it, reject it with the right reason if needed."""
    assoc = event.assoc
    calling, called, host, port = _peer(assoc)
    node = state.node
    reject: tuple[int, int, int] | None = None
    reason = ""
    if called != node.ae_title:
        reject, reason = _REJECT_CALLED_AE, f"called AE title {called!r} is not {node.ae_title!r}"
    elif node.allowed_calling_ae_titles and calling not in node.allowed_calling_ae_titles:
        reject, reason = _REJECT_CALLING_AE, f"calling AE title {calling!r} is not allowed"
    elif not node.host_allowed(host):
        reject, reason = _REJECT_NO_REASON, f"host {host} is not allowed"
    else:
        with state.lock:
            if len(state.open) >= node.max_associations:
                reject = _REJECT_LIMIT
                reason = (
                    f"{len(state.open)} associations open, the limit is {node.max_associations}"
                )
    try:
        with state.db.session() as session:
            row = Association(
                started_at=utcnow(),
                calling_ae_title=calling[:16],
                called_ae_title=called[:16],
                peer_host=host[:64],
                peer_port=port,
                tls=state.tls,
                accepted=reject is None,
                reject_reason=reason or None,
            )
            if reject is not None:
                row.ended_at = row.started_at
                row.end_reason = "rejected"
            session.add(row)
            session.flush()
            association_id = row.id
            if reject is not None:
                add_event(
                    session,
                    "association.rejected",
                    f"association from {calling}@{host}:{port} rejected: {reason}",
                    level="warning",
                    association_id=association_id,
                    data={"result": reject[0], "source": reject[1], "reason": reject[2]},
                )
            else:
                add_event(
                    session,
                    "association.accepted",
                    f"association from {calling}@{host}:{port} to {called}"
                    + (" over TLS" if state.tls else ""),
                    association_id=association_id,
                )
    except RadnetError as exc:
        # nothing can be recorded: refuse rather than accept instances we could not catalog
        _log.error("association refused: audit database unavailable", error=str(exc))
        reject = reject or (0x02, 0x01, 0x01)  # transient, service user, no reason given
        association_id = -1
    if reject is not None:
        assoc.acse.send_reject(*reject)
        assoc.kill()
        return
    with state.lock:
        state.open[id(assoc)] = _Open(association_id)


def _on_close(event: evt.Event, state: _IngestState) -> None:
    """Connection closed: write how the association ended and what it stored."""
    with state.lock:
        info = state.open.pop(id(event.assoc), None)
    if info is None:
        return  # rejected (already recorded) or never got as far as an A-ASSOCIATE-RQ
    assoc = event.assoc
    how = "released" if assoc.is_released else "aborted" if assoc.is_aborted else "closed"
    # what the peer offered and this node does not take (e.g. MR with accept_all_storage_classes
    # off): the peer sees 0x0122 / "no presentation context", the admin sees it here
    refused_classes = sorted(
        {UID(str(context.abstract_syntax)).name for context in assoc.rejected_contexts}
    )
    refused_note = (
        f"; presentation contexts refused: {', '.join(refused_classes)}" if refused_classes else ""
    )
    try:
        with state.db.session() as session:
            row = session.get(Association, info.association_id)
            if row is not None:
                row.ended_at = utcnow()
                row.end_reason = how
                row.instances_received = info.stored
            add_event(
                session,
                "association.closed",
                f"association {how}: {info.stored} instance(s) stored, {info.duplicates} "
                f"duplicate(s), {info.refused} refused{refused_note}",
                level="info" if how == "released" and not refused_classes else "warning",
                association_id=info.association_id,
                data={
                    "stored": info.stored,
                    "duplicates": info.duplicates,
                    "refused": info.refused,
                    "refused_presentation_contexts": refused_classes,
                },
            )
    except RadnetError as exc:
        _log.error("cannot record the end of an association", error=str(exc))


def _on_echo(event: evt.Event, state: _IngestState) -> int:
    """C-ECHO: success (the association checks already ran)."""
    return STATUS_SUCCESS


def _write_atomically(final: Path, parts: Sequence[bytes | memoryview]) -> int:
    """Write ``parts`` one after the other to ``final`` via a temporary file in the same folder:
    fsync, rename, fsync the folder, so the file is whole or absent after a crash or power loss.
    Returns the number of bytes written."""
    temporary = final.parent / f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    size = 0
    try:
        try:
            handle = open(temporary, "wb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:  # the series' first instance: make its folder (not per file)
            _make_folder_durably(final.parent)
            handle = open(temporary, "wb")  # noqa: SIM115
        with handle:
            for part in parts:
                size += handle.write(part)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(final.parent)
    return size


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_folder_durably(folder: Path) -> None:
    """Create ``folder`` and its missing parents, fsyncing the parent of each one created, so a
    power loss cannot take a study or series folder (and the files in it) away after success."""
    missing = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    folder.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        _fsync_folder(created.parent)


def _write_received(final: Path, event: evt.Event) -> int:
    """Spool a C-STORE's dataset as received, in the DICOM file format: preamble, file meta of the
    negotiated transfer syntax, then the peer's bytes (written from pynetdicom's buffer, not
    copied). Returns the file size."""
    request = cast(C_STORE, event.request)
    header = b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta)
    stream = cast(BytesIO, request.DataSet)
    with stream.getbuffer() as received:
        return _write_atomically(final, (header, received))


def _is_recorded(db: AuditDB, sop_uid: str) -> bool:
    try:
        with db.session() as session:
            return (
                session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_uid))
                is not None
            )
    except RadnetError:
        return False  # the write and the registration that follow report the failure


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _on_store(event: evt.Event, state: _IngestState) -> int:
    """C-STORE: spool the bytes as received, record the instance, then answer.

    Success only once the file is fsynced and its row committed; anything else is a failure status
    and an audit row, never an instance reported as stored that is not.
    """
    with state.lock:
        info = state.open.get(id(event.assoc))
    association_id = info.association_id if info is not None else None
    request = cast(C_STORE, event.request)
    sop_uid = str(request.AffectedSOPInstanceUID or "").strip()

    def refuse(status: int, why: str, **ids: Any) -> int:
        if info is not None:
            info.refused += 1
        try:
            with state.db.session() as session:
                add_event(
                    session,
                    "instance.refused",
                    f"C-STORE refused with 0x{status:04X}: {why}",
                    level="error",
                    sop_instance_uid=sop_uid or None,
                    association_id=association_id,
                    data={"status": status},
                    **ids,
                )
        except RadnetError as exc:
            _log.error("C-STORE refused and not audited", why=why, error=str(exc))
        return status

    with cast(BytesIO, request.DataSet).getbuffer() as received:
        incoming = received.nbytes
    try:
        if not state.free_space.reserve(incoming, state.node.min_free_disk_mb):
            return refuse(
                STATUS_OUT_OF_RESOURCES,
                f"free disk space in {state.spool_dir} is below {state.node.min_free_disk_mb} MB",
            )
    except OSError as exc:
        return refuse(STATUS_OUT_OF_RESOURCES, f"cannot check free disk space: {exc}")

    try:
        # parses the element structure only: values are converted on access, pixels never
        ds = event.dataset
        study_uid = _text(ds, "StudyInstanceUID")
        series_uid = _text(ds, "SeriesInstanceUID")
        dataset_sop_uid = _text(ds, "SOPInstanceUID")
        accession = _text(ds, "AccessionNumber")
        modality = _text(ds, "Modality")
        description = _text(ds, "SeriesDescription")
        number_text = _text(ds, "SeriesNumber")
    except Exception as exc:  # noqa: BLE001 - pydicom reports malformed data in many types
        return refuse(
            STATUS_CANNOT_UNDERSTAND, f"the dataset cannot be parsed ({type(exc).__name__}: {exc})"
        )
    for name, value in (
        ("SOPInstanceUID", dataset_sop_uid),
        ("StudyInstanceUID", study_uid),
        ("SeriesInstanceUID", series_uid),
    ):
        if not is_safe_uid(value):
            return refuse(STATUS_CANNOT_UNDERSTAND, f"{name} {value!r} is missing or not a UID")
    if sop_uid and dataset_sop_uid != sop_uid:
        return refuse(
            STATUS_CANNOT_UNDERSTAND,
            f"the dataset's SOPInstanceUID {dataset_sop_uid} differs from the request's",
        )
    sop_uid = dataset_sop_uid
    try:
        series_number: int | None = int(float(number_text)) if number_text else None
    except ValueError:
        series_number = None
    ids = {"study_instance_uid": study_uid, "series_instance_uid": series_uid}

    final = spool_path(state.spool_dir, study_uid, series_uid, sop_uid)
    # the file is at its place already: a resend of a stored instance (skip the write), or a file
    # left by a crash between rename and commit (unrecorded, so write it again)
    resend = final.exists() and _is_recorded(state.db, sop_uid)
    size = 0
    if not resend:
        try:
            size = _write_received(final, event)
        except OSError as exc:
            return refuse(
                STATUS_OUT_OF_RESOURCES, f"cannot write {final}: {exc.strerror or exc}", **ids
            )
    instance = InstanceInfo(
        sop_instance_uid=sop_uid,
        sop_class_uid=str(request.AffectedSOPClassUID or ""),
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        transfer_syntax_uid=str(event.context.transfer_syntax),
        size_bytes=size,
        spool_path=str(final),
        accession_number=accession[:64],
        modality=modality[:16],
        series_number=series_number,
        series_description=description,
    )
    try:
        with state.db.session() as session:
            registration = register_instance(session, instance, association_id=association_id)
    except RadnetError as exc:
        if not resend:
            # not recorded, so not stored: the sender gets a failure and sends it again
            final.unlink(missing_ok=True)
        return refuse(STATUS_OUT_OF_RESOURCES, f"cannot record the instance: {exc}", **ids)
    if registration.outcome == RegistrationOutcome.DUPLICATE:
        if not resend and registration.existing_spool_path != str(final):
            final.unlink(missing_ok=True)  # the first copy lives elsewhere (other study/series)
        if info is not None:
            info.duplicates += 1
        return STATUS_SUCCESS
    if info is not None:
        info.stored += 1
    if state.on_instance is not None:
        state.on_instance()
    return STATUS_SUCCESS
