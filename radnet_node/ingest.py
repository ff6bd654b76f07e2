"""The DICOM SCP: C-ECHO and C-STORE, association checks (called AE, calling AE and host
allow-lists, association limit, optional TLS), and the spool, where the received bytes are streamed
to a temporary file as they arrive and moved to their place before success is answered; the
catalog row follows from a recorder thread (recovery registers a file whose row a kill prevented).
Only this module knows ingest DIMSE statuses. The Upper Layer is :mod:`radnet_node.dicom_ul`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import itertools
import os
import shutil
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
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
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context

from radnet_node import dicom_ul
from radnet_node.audit import Association, AuditDB, add_event, utcnow
from radnet_node.catalog import (
    Arrival,
    InstanceInfo,
    RegistrationOutcome,
    is_safe_uid,
    register_instances,
    series_number_of,
)
from radnet_node.config import NodeSection, TlsSection
from radnet_node.durable import fsync_folder, make_folder_durably
from radnet_node.errors import ConfigError, RadnetError

try:  # the C-STORE receive loop in C (setup.py builds it when a C compiler is there)
    from radnet_node import _fastscp
except ImportError:  # pragma: no cover - the Python loop then receives everything
    _fastscp = None  # type: ignore[assignment]

#: the environment variable that selects the receive loop: ``c`` (default, when built) or ``python``
C_LOOP_ENV = "RADNET_NODE_INGEST_LOOP"

#: the Verification SOP Class (C-ECHO)
Verification = UID("1.2.840.10008.1.1")

__all__ = [
    "CT_STORAGE_CLASSES",
    "CT_TRANSFER_SYNTAXES",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DATASET_DOES_NOT_MATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SOP_CLASS_NOT_SUPPORTED",
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
#: Refused: SOP Class not supported (the request's SOP class is not the abstract syntax of the
#: presentation context it came on)
STATUS_SOP_CLASS_NOT_SUPPORTED = dicom_ul.STATUS_SOP_CLASS_NOT_SUPPORTED
#: Error: data set does not match SOP class (its own SOPClassUID is not the request's; PS3.4 B.2.3)
STATUS_DATASET_DOES_NOT_MATCH = 0xA900

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
        return self.reserve_lot(size, min_free_mb) is not None

    def reserve_lot(self, size: int, min_free_mb: float) -> float | None:
        """:meth:`reserve`, returning a token for :meth:`give_back` (None: refused)."""
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= self.max_age_s:
                self._free_bytes = shutil.disk_usage(self.path).free
                self._read_at = now
            if self._free_bytes - size < min_free_mb * 1024 * 1024:
                return None
            self._free_bytes -= size
            return self._read_at

    def give_back(self, size: int, token: float) -> None:
        """Return the unused part of a reservation (unless the space was read again since: the
        new reading counts only what was written)."""
        with self._lock:
            if self._read_at == token:
                self._free_bytes += size


#: instances registered in one transaction at most; the longest the recorder waits to fill one;
#: the pause in arrivals after which it commits what it has
_BATCH = 256
_BATCH_WAIT_S = 0.5
_PAUSE_S = 0.02
#: instances the C loop reports at most at a time (its results array; a report of this size means
#: the sender is going on, and its rows wait: :meth:`_Association._record_stored`)
_C_REPORT = 32
#: A-ASSOCIATE-RQs whose answers :meth:`IngestSCP.negotiate` keeps (all forgotten when full), and
#: the largest it keeps
_NEGOTIATIONS = 64
_NEGOTIATION_MAX_BYTES = 16 << 10
#: how long :meth:`IngestSCP.stop` lets the associations send their A-ABORT before it closes
#: the connections of those still busy
_STOP_ABORT_S = 2.0


class _Received:
    """One instance spooled and answered, on its way to the catalog: what the catalog records
    of it, or (from the C loop) the raw header values that is made of, decoded when the
    recorder's thread first asks, not in the association's."""

    __slots__ = ("_info", "_raw", "_received_at", "association", "written")

    def __init__(
        self,
        association: _Open | None,
        received_at: dt.datetime | float,
        *,
        written: bool = True,
        info: InstanceInfo | None = None,
        raw: tuple[dict[str, bytes], str, UID, Path, int] | None = None,
    ) -> None:
        self.association = association
        self._received_at = received_at
        #: this C-STORE wrote the file (False: a file was at its place already)
        self.written = written
        self._info = info
        #: (the scan's values, SOP class, transfer syntax, spool folder, file size)
        self._raw = raw

    @property
    def info(self) -> InstanceInfo:
        if self._info is None:
            found, sop_class, syntax, spool_dir, size = self._raw  # type: ignore[misc]
            header = _header_of(found)
            # spool_path's, as text (the C loop checked the UIDs; pathlib's joins cost more than
            # the rest of this)
            final = (
                f"{spool_dir}/{header['StudyInstanceUID']}/{header['SeriesInstanceUID']}/"
                f"{header['SOPInstanceUID']}.dcm"
            )
            self._info = _instance_info(
                header,
                _texts_or_empty(found, final),
                sop_class=sop_class,
                syntax=syntax,
                final=final,
                size=size,
            )
            # (the raw values stay: another thread may be reading them right now, the recorder
            # and a completion tick's pending_series both ask)
        return self._info

    @property
    def received_at(self) -> dt.datetime:
        """When its command arrived (UTC, no tzinfo, as :func:`radnet_node.audit.utcnow`)."""
        if isinstance(self._received_at, float):
            self._received_at = _from_timestamp(self._received_at)
        return self._received_at


def _instance_info(
    header: dict[str, str],
    texts: dict[str, str],
    *,
    sop_class: str,
    syntax: UID,
    final: Path | str,
    size: int,
) -> InstanceInfo:
    """What the catalog records of an instance: its UIDs (``header``), its text elements."""
    return InstanceInfo(
        sop_instance_uid=header["SOPInstanceUID"],
        sop_class_uid=sop_class,
        study_instance_uid=header["StudyInstanceUID"],
        series_instance_uid=header["SeriesInstanceUID"],
        transfer_syntax_uid=str(syntax),
        size_bytes=size,
        spool_path=str(final),
        accession_number=texts["AccessionNumber"][:64],
        modality=texts["Modality"][:16],
        series_number=series_number_of(texts["SeriesNumber"]),
        series_description=texts["SeriesDescription"],
    )


def _texts_or_empty(found: dict[str, bytes], final: Path | str) -> dict[str, str]:
    """:func:`_texts_of`, or empty texts (logged) when they cannot be decoded: the instance was
    answered with success already, its row must follow."""
    try:
        return _texts_of(found)
    except Exception:  # noqa: BLE001
        _log.exception("cannot decode the text elements of a stored instance", path=str(final))
        return dict.fromkeys(_TEXT_ELEMENTS, "")


class _Recorder:
    """Registers spooled instances in the catalog, in batches, in its own thread.

    An instance is answered with success once its file is at its place in the spool; its row
    follows once the arrivals pause (:data:`_PAUSE_S`), or with a full batch, or at most
    :data:`_BATCH_WAIT_S` after it: a commit holds the interpreter for milliseconds, which every
    association thread would wait for. What the C loop reports is a batch already: committed at
    once (``put(..., whole=True)``), unless the sender is going on or releasing
    (``later=True``), whose rows wait for the association's end (after its A-RELEASE-RP), a
    full batch or the batch wait. A kill in between loses
    nothing: recovery registers spool files without a row at the next start
    (:func:`radnet_node.jobs.recover`). While the database fails, the batch is retried with
    backoff and :attr:`error` says why, so ingest refuses new instances (0xA700) instead of
    taking more it cannot record.
    """

    def __init__(self, db: AuditDB, on_instance: Callable[[], None] | None) -> None:
        self.db = db
        self.on_instance = on_instance
        #: the last database failure; None once a batch has been committed again
        self.error: str | None = None
        self._queue: deque[_Received] = deque()
        self._in_flight = 0
        self._batch: list[_Received] = []  # what is being committed now
        self._last_put = 0.0
        self._flushing = 0  # callers of flush(): no waiting for a fuller batch
        self._whole = False  # a batch put whole (the C loop's report): no waiting either
        self._later = False  # the last put said more follow: no commit on a pause of the puts
        self._stopping = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ingest-recorder", daemon=True)
        self._thread.start()

    def put(self, *items: _Received, whole: bool = False, later: bool = False) -> None:
        """Queue ``items`` for the catalog: ``whole``, a batch to commit at once; ``later``,
        more follow at once (no commit on a pause of the puts: at a flush, a full batch, or
        :data:`_BATCH_WAIT_S` after the first item queued)."""
        with self._wake:
            before = len(self._queue)
            self._queue.extend(items)
            self._last_put = time.monotonic()
            self._later = later
            if whole:
                self._whole = True
            # the recorder waits for a first one or a full batch
            if before == 0 or whole or before < _BATCH <= len(self._queue):
                self._wake.notify()

    def pending_series(self) -> set[str]:
        """The Series Instance UIDs of the instances answered but not committed yet."""
        with self._wake:
            return {item.info.series_instance_uid for item in (*self._queue, *self._batch)}

    @property
    def backlog(self) -> int:
        """Instances answered but not yet committed."""
        return len(self._queue) + self._in_flight

    def flush(self, timeout_s: float) -> bool:
        """Wait until every instance handed over so far is committed; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._wake:
            self._flushing += 1
            self._wake.notify_all()
            try:
                return self._wait_empty(deadline)
            finally:
                self._flushing -= 1

    def _wait_empty(self, deadline: float) -> bool:
        while self._queue or self._in_flight:
            left = deadline - time.monotonic()
            if left <= 0 or not self._wake.wait(left):
                return not (self._queue or self._in_flight)
        return True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Commit what is queued (up to ``timeout_s``), then end the thread; anything left is in
        the spool and registered by recovery at the next start."""
        self.flush(timeout_s)
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if not self._queue:
                    return
                # group commit: one transaction for what arrives until the sender pauses (or a
                # full batch, or _BATCH_WAIT_S): each commit holds the interpreter for a few
                # milliseconds, which the associations then wait for
                deadline = time.monotonic() + _BATCH_WAIT_S
                while len(self._queue) < _BATCH and not (
                    self._stopping or self._flushing or self._whole
                ):
                    paused = deadline if self._later else self._last_put + _PAUSE_S
                    left = min(deadline, paused) - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), _BATCH))]
                self._whole = False
                self._in_flight = len(batch)
                self._batch = batch
            backoff = 0.2
            while not self._commit(batch):
                with self._wake:
                    if self._stopping:
                        self._in_flight = 0
                        self._batch = []
                        return
                    self._wake.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            with self._wake:
                self._in_flight = 0
                self._batch = []
                self._wake.notify_all()
            if self.on_instance is not None:
                self.on_instance()

    def _commit(self, batch: list[_Received]) -> bool:
        try:
            with self.db.session() as session:
                registrations = register_instances(
                    session,
                    [
                        Arrival(
                            item.info,
                            item.association.association_id if item.association else None,
                            item.received_at,
                        )
                        for item in batch
                    ],
                )
        except Exception as exc:  # noqa: BLE001 - the recorder outlives any failure; ingest refuses
            if self.error is None:
                _log.error("cannot record received instances; retrying", error=str(exc))
            self.error = str(exc)
            return False
        self.error = None
        for item, registration in zip(batch, registrations, strict=True):
            duplicate = registration.outcome == RegistrationOutcome.DUPLICATE
            if (
                duplicate
                and item.written
                and registration.existing_spool_path != item.info.spool_path
            ):
                Path(item.info.spool_path).unlink(missing_ok=True)  # the first copy lives elsewhere
            if item.association is not None:
                if duplicate:
                    item.association.duplicates += 1
                else:
                    item.association.stored += 1
        return True


@dataclass
class _IngestState:
    """What the associations share (no module globals)."""

    node: NodeSection
    db: AuditDB
    spool_dir: Path
    tls: bool
    recorder: _Recorder
    lock: threading.Lock = field(default_factory=threading.Lock)
    open: dict[int, _Open] = field(default_factory=dict)
    free_space: _FreeSpace = field(init=False)
    #: names temporary spool files uniquely within the process
    counter: itertools.count[int] = field(default_factory=itertools.count)
    #: the start of this process's temporary spool file names
    temporary_prefix: str = field(init=False)
    #: the last association row could not be written: the next one is written before the
    #: A-ASSOCIATE-AC (and the association rejected if it cannot be), not after it
    audit_failing: bool = False

    def __post_init__(self) -> None:
        self.free_space = _FreeSpace(self.spool_dir)
        self.temporary_prefix = f".incoming.{os.getpid()}."


def _supported_contexts(node: NodeSection) -> list[PresentationContext]:
    """The presentation contexts the node accepts. The transfer syntax chosen for a context is
    the first of this list's syntaxes (not the requester's) that the requester proposed
    (:func:`pynetdicom.presentation.negotiate_as_acceptor`)."""
    contexts = [build_context(Verification)]
    contexts += [build_context(c, list(CT_TRANSFER_SYNTAXES)) for c in CT_STORAGE_CLASSES]
    if node.accept_all_storage_classes:
        contexts += [
            build_context(str(c.abstract_syntax), ALL_TRANSFER_SYNTAXES)
            for c in AllStoragePresentationContexts
            if str(c.abstract_syntax) not in CT_STORAGE_CLASSES
        ]
    for context in contexts:
        # SCP/SCU Role Selection (PS3.7 D.3.3.4), answered where the requester proposes it: the
        # requester may be the SCU, never the SCP (the node only receives here); a context whose
        # requester wants the SCP role only is refused, as neither side could then send
        context.scu_role, context.scp_role = True, False
    return contexts


class IngestSCP:
    """The node's Storage SCP; start it with :meth:`start` (or :meth:`bind`, then :meth:`serve`),
    stop it with :meth:`stop`. One thread per association, reading with blocking calls.

    Parameters
    ----------
    node
        ``[node]`` settings: AE title, address, allow-lists, limits, TLS, data folder.
    db
        The audit database (instances, series and associations are recorded there).
    on_instance
        Called (in the recorder's thread) after each batch of new instances is recorded.

    Raises
    ------
    ConfigError
        The TLS files cannot be loaded.
    """

    #: seconds a peer has to send its A-ASSOCIATE-RQ (and finish the TLS handshake)
    ACSE_TIMEOUT_S = 30.0
    #: seconds of silence after which an association is aborted
    NETWORK_TIMEOUT_S = 60.0

    def __init__(
        self, node: NodeSection, db: AuditDB, on_instance: Callable[[], None] | None = None
    ) -> None:
        self.node = node
        self.spool_dir = node.data_dir / "spool"
        self._ssl = server_ssl_context(node.tls) if node.tls is not None else None
        self.supported_contexts = _supported_contexts(node)
        self._negotiations: dict[bytes, dicom_ul.Negotiated] = {}
        self._db = db
        self._on_instance = on_instance
        self._state: _IngestState | None = None
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        #: whether ordinary C-STOREs are received by the C loop (radnet_node/_fastscp.c): when it
        #: is built and ``RADNET_NODE_INGEST_LOOP`` is not ``python``
        self.c_loop = _fastscp is not None and os.environ.get(C_LOOP_ENV, "c") != "python"

    @property
    def receive_loop(self) -> str:
        """Which loop receives ordinary C-STOREs, in words (the start-up log says it)."""
        if self.c_loop:
            return (
                "C (radnet_node._fastscp)"
                + ("; Python on TLS" if self.node.tls is not None else "")
                + ("; Python with fsync_spool" if self.node.fsync_spool else "")
            )
        if _fastscp is None:
            return "Python (the C loop is not built: no C compiler at install)"
        return f"Python ({C_LOOP_ENV}=python)"

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the server listens on (the real port when configured as 0).

        Raises
        ------
        RuntimeError
            If the server is not running.
        """
        if self._listener is None:
            raise RuntimeError("the SCP is not running")
        host, port = self._listener.getsockname()[:2]
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
        if self._listener is not None:
            return self.address
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            family = socket.AF_INET6 if ":" in self.node.host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((self.node.host, self.node.port))
                listener.listen(128)
            except BaseException:
                listener.close()
                raise
        except OSError as exc:
            hint = (
                " (another radnet-node or DICOM server listens there: stop it or set node.port)"
                if exc.errno == errno.EADDRINUSE
                else ""
            )
            raise RadnetError(
                f"cannot listen on {self.node.host}:{self.node.port}: {exc.strerror or exc}{hint}"
            ) from exc
        listener.settimeout(0.25)  # accept() wakes up to see a stop
        self._listener = listener
        return self.address

    def serve(self) -> None:
        """Start answering associations on the bound address (in background threads).

        Raises
        ------
        RuntimeError
            If :meth:`bind` has not succeeded.
        """
        if self._listener is None:
            raise RuntimeError("the SCP is not bound")
        if self._acceptor is not None:
            return
        self._state = _IngestState(
            node=self.node,
            db=self._db,
            spool_dir=self.spool_dir,
            tls=self._ssl is not None,
            recorder=_Recorder(self._db, self._on_instance),
        )
        self._stopping.clear()
        self._acceptor = threading.Thread(target=self._accept, name="scp-acceptor", daemon=True)
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
        """Stop accepting associations and abort the open ones with an A-ABORT (their instances
        so far are kept; an instance in flight is not answered, so the sender sends it again),
        then commit what the recorder holds."""
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join()
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        # shutting the reading side wakes each association's blocking read (once what arrived is
        # read); its own thread then sends the A-ABORT: a second thread writing while that one
        # answers would interleave the bytes. TLS connections are closed without it: the TLS
        # layer takes an end of the input as fatal and garbles what would be sent after it
        self._shutdown_connections(socket.SHUT_RD)
        deadline = time.monotonic() + _STOP_ABORT_S
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        # still busy (a peer streaming a long dataset, or not reading what is sent): cut it off
        self._shutdown_connections(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10.0)
        self._threads = []
        if self._state is not None:
            self._state.recorder.stop()
            self._state = None

    def _shutdown_connections(self, how: int) -> None:
        """Shut the open connections down (``how``; TLS ones entirely)."""
        with self._connections_lock:
            for connection in self._connections:
                tls = isinstance(connection, ssl.SSLSocket)
                with contextlib.suppress(OSError):
                    # the socket's own shutdown: SSLSocket's drops the TLS state under the thread
                    # that reads, which would then read the TLS records as DICOM
                    socket.socket.shutdown(connection, socket.SHUT_RDWR if tls else how)

    @property
    def stopping(self) -> bool:
        """:meth:`stop` has been called (an association that ends now was ended by it)."""
        return self._stopping.is_set()

    def pending_series(self) -> set[str]:
        """Series Instance UIDs of instances received and answered whose catalog rows are not
        committed yet (at most :data:`_BATCH_WAIT_S` behind): a series among them is not quiet."""
        return set() if self._state is None else self._state.recorder.pending_series()

    def active_associations(self) -> int:
        """How many accepted associations are open now."""
        if self._state is None:
            return 0
        with self._state.lock:
            return len(self._state.open)

    def negotiate(self, request: bytes) -> dicom_ul.Negotiated:
        """:func:`radnet_node.dicom_ul.negotiate` with this node's presentation contexts, the
        answer kept per request: a modality or a PACS sends the same A-ASSOCIATE-RQ bytes every
        time, and decoding one with pynetdicom costs most of a millisecond of the peer's wait.

        Raises
        ------
        radnet_node.dicom_ul.ProtocolError
            The PDU cannot be decoded (never kept).
        """
        known = self._negotiations.get(request)
        if known is None:
            known = dicom_ul.negotiate(
                request, self.supported_contexts, max_pdu=self.node.max_pdu_bytes
            )
            if len(request) <= _NEGOTIATION_MAX_BYTES:
                if len(self._negotiations) >= _NEGOTIATIONS:
                    self._negotiations.clear()
                self._negotiations[request] = known
        # (each association its own copy of what it may change)
        return replace(known, accepted=dict(known.accepted), refused=list(known.refused))

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None and self._state is not None
        while not self._stopping.is_set():
            try:
                connection, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                _log.warning("accept failed", error=str(exc))
                time.sleep(0.1)
                continue
            thread = threading.Thread(
                target=self._serve_connection,
                args=(connection, peer),
                name=f"scp-{peer[0]}:{peer[1]}",
                daemon=True,
            )
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve_connection(self, connection: socket.socket, peer: tuple[Any, ...]) -> None:
        state = self._state
        assert state is not None
        with self._connections_lock:
            self._connections.add(connection)
        try:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.settimeout(self.ACSE_TIMEOUT_S)
            if self._ssl is not None:
                try:
                    secured = self._ssl.wrap_socket(connection, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    _audit_tls_failure(state, peer, exc)
                    return
                with self._connections_lock:
                    self._connections.discard(connection)
                    self._connections.add(secured)
                connection = secured
            _Association(state, self, connection, str(peer[0]), int(peer[1])).run()
        except Exception as exc:  # noqa: BLE001 - one association never takes the node down
            _log.exception("association failed", peer=f"{peer[0]}:{peer[1]}", error=str(exc))
        finally:
            with self._connections_lock:
                self._connections.discard(connection)
            with contextlib.suppress(OSError):
                connection.close()


def _audit_tls_failure(state: _IngestState, peer: tuple[Any, ...], exc: Exception) -> None:
    reason = getattr(exc, "reason", None) or exc
    try:
        with state.db.session() as session:
            add_event(
                session,
                "association.tls_failed",
                f"TLS handshake with {peer[0]}:{peer[1]} failed: {reason}",
                level="warning",
            )
    except RadnetError as error:
        _log.error("TLS handshake failed and not audited", error=str(error))


# ------------------------------------------------------------------------------------------------
# one association


class _Association:
    """An association from the A-ASSOCIATE-RQ to its end, in the connection's thread."""

    def __init__(
        self, state: _IngestState, scp: IngestSCP, sock: socket.socket, host: str, port: int
    ) -> None:
        self.state = state
        self.scp = scp
        self.sock = sock
        self.host = host
        self.port = port
        limit = max(state.node.max_pdu_bytes, 1 << 20) if state.node.max_pdu_bytes else 64 << 20
        self.reader = dicom_ul.PduReader(sock, limit)
        self.info: _Open | None = None
        self.negotiated: dicom_ul.Negotiated | None = None
        self.calling = ""
        self._spare: tuple[Path, int] | None = None
        # what the Python loop has under way: the dataset being received, the command set being
        # gathered; the SOP Instance UID of a dataset the C loop dropped, cut off
        self._incoming: _Incoming | _Discard | None = None
        self._command_bytes = bytearray()
        self._unfinished: str | None = None
        # the C loop's temporary files: their names' start (per association) and number
        self._temporary_prefix = b""
        self._c_counter = 0
        self._c_loop_on = False  # the C loop receives this association's ordinary C-STOREs

    def take_spare(self) -> tuple[Path, int] | None:
        """The temporary file opened ahead for the next C-STORE (now its caller's), or None."""
        spare, self._spare = self._spare, None
        return spare

    def _drop_spare(self) -> None:
        """Remove the temporary file opened ahead for a request that never came."""
        spare = self.take_spare()
        if spare is not None:
            with contextlib.suppress(OSError):
                os.close(spare[1])
            with contextlib.suppress(OSError):
                spare[0].unlink()

    def _make_spare(self) -> None:
        """Open the next C-STORE's temporary file now, while the peer reads the answer and
        prepares its next request: creating a file costs about a tenth of an instance's time,
        and it then stays off the path between the request and the answer."""
        if self._spare is None:
            path = _temporary_path(self.state)
            with contextlib.suppress(OSError):  # the request then opens its own (and reports)
                self._spare = (path, _open_temporary(path))

    def run(self) -> None:
        how, why = "closed", ""
        try:
            pdu_type, body = self.reader.read()
            if pdu_type != dicom_ul.ASSOCIATE_RQ:
                raise dicom_ul.ProtocolError(f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ")
            if not self._associate(self.reader.header + bytes(body)):
                return
            dicom_ul.set_kernel_timeouts(self.sock, self.scp.NETWORK_TIMEOUT_S)
            fast = self._fast_contexts()
            self._c_loop_on = bool(fast)
            while True:
                if fast and self._incoming is None and not self._command_bytes:
                    pdu = self._receive_fast(fast)
                    if pdu is None:
                        continue
                    pdu_type, body = pdu
                else:
                    pdu_type, body = self.reader.read()
                if pdu_type == dicom_ul.PDATA:
                    self._pdata(body)
                elif pdu_type == dicom_ul.RELEASE_RQ:
                    self._drop_spare()  # before the peer learns that the association is over
                    # answered at once: every instance was answered once its file was at its
                    # place in the spool, which recovery registers after any crash; the rows
                    # and the association's end are committed after the answer (_closed)
                    self.sock.sendall(dicom_ul.release_rp_pdu())
                    how = "released"
                    return
                elif pdu_type == dicom_ul.ABORT:
                    how, why = "aborted", "A-ABORT from the peer"
                    return
                else:
                    raise dicom_ul.ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
        except dicom_ul.ProtocolError as exc:
            how, why = "aborted", f"protocol error: {exc}"
            self._abort()
        except (TimeoutError, *dicom_ul.KERNEL_TIMEOUTS):
            how = "aborted"
            if self.negotiated is None:
                why = f"no A-ASSOCIATE-RQ within {self.scp.ACSE_TIMEOUT_S:g} s"
            else:
                why = f"no progress for {self.scp.NETWORK_TIMEOUT_S:g} s"
            self._abort()
        except EOFError as exc:
            how = "closed"
            if self.scp.stopping:  # IngestSCP.stop() shut the reading side
                how, why = "aborted", "the node is stopping"
                self._abort()
            elif isinstance(exc, dicom_ul.ConnectionClosed) and exc.mid_pdu:
                why = str(exc)
        except OSError as exc:
            how, why = "aborted", f"connection failed: {exc.strerror or exc}"
            if self.scp.stopping:
                why = f"the node is stopping ({why})"
        finally:
            unfinished = self._unfinished
            incoming, self._incoming = self._incoming, None
            if incoming is not None:
                incoming.discard()
                if isinstance(incoming, _Incoming):
                    unfinished = incoming.request.affected_sop_instance_uid
            self._drop_spare()
            if self.info is not None:
                self._closed(how, why, unfinished=unfinished)
            elif self.negotiated is None:  # no A-ASSOCIATE-RQ was understood
                self._failed_before_association(how, why)

    def _pdata(self, body: memoryview) -> None:
        """The PDVs of a P-DATA-TF: command fragments gathered and answered, dataset fragments
        streamed to the spool, each dataset answered once whole."""
        accepted = self.negotiated.accepted  # type: ignore[union-attr]
        command = self._command_bytes
        for context_id, control, fragment in dicom_ul.pdvs(body):
            if context_id not in accepted:
                raise dicom_ul.ProtocolError(
                    f"P-DATA on presentation context {context_id}, not accepted"
                )
            incoming = self._incoming
            if control & 0x01:  # a command fragment
                if incoming is not None:
                    raise dicom_ul.ProtocolError("a command inside a dataset")
                if len(command) + len(fragment) > dicom_ul.MAX_COMMAND:
                    raise dicom_ul.ProtocolError(
                        f"a command set of more than {dicom_ul.MAX_COMMAND} bytes"
                    )
                command += fragment
                if control & 0x02:
                    self._incoming = self._command(bytes(command), context_id)
                    command.clear()
            else:
                if incoming is None or incoming.context_id != context_id:
                    raise dicom_ul.ProtocolError("a dataset without its command")
                incoming.write(fragment)
                if control & 0x02:
                    # the data set is whole: not unfinished, whatever the answer
                    self._incoming = None
                    self._dataset_done(incoming, context_id)

    def _dataset_done(self, done: _Incoming | _Discard, context_id: int) -> None:
        """Check and place a whole dataset (its file is dropped unless placed), answer, record,
        and open the next temporary file."""
        status = done.finish()
        try:
            self._answer(done.request, status, context_id)
        finally:
            done.record()
        self._make_spare()

    def _fast_contexts(self) -> dict[int, tuple[bytes, int, bytes, bytes] | None]:
        """What the C receive loop needs of the accepted presentation contexts ({} when it does
        not run here: not built, turned off, TLS, fsync_spool, another system than Linux or
        macOS): per context ID its abstract syntax, how its datasets are scanned (1 implicit VR,
        0 explicit, -1 read back with pydicom) and the file meta around the instance's UID;
        None for the Verification context (C-ECHO is answered in Python)."""
        state = self.state
        if (
            _fastscp is None
            or not self.scp.c_loop
            or state.tls
            or state.node.fsync_spool
            or sys.platform not in ("linux", "darwin")
        ):
            return {}
        contexts: dict[int, tuple[bytes, int, bytes, bytes] | None] = {}
        for context_id, (abstract, syntax) in self.negotiated.accepted.items():  # type: ignore[union-attr]
            if abstract == Verification:
                contexts[context_id] = None
                continue
            mode = _scan_mode(syntax)
            before, after = dicom_ul.file_meta_parts(str(abstract), str(syntax), self.calling)
            contexts[context_id] = (
                str(abstract).encode("ascii"),
                -1 if mode is None else int(mode),
                before,
                after,
            )
        self._temporary_prefix = os.fsencode(
            state.spool_dir / f"{state.temporary_prefix}c{next(state.counter)}-"
        )
        return contexts

    def _receive_fast(
        self, contexts: dict[int, tuple[bytes, int, bytes, bytes] | None]
    ) -> tuple[int, memoryview] | None:
        """Let the C loop receive ordinary C-STOREs; register what it stored and take over what
        it hands back. A PDU for :meth:`run` to handle, or None to go on."""
        state = self.state
        recorder = state.recorder
        token = None
        if recorder.error is None and recorder.backlog < _MAX_BACKLOG - _BATCH:
            try:
                token = state.free_space.reserve_lot(_C_BUDGET, state.node.min_free_disk_mb)
            except OSError:
                token = None  # the Python path checks the instance, and refuses it
        if token is None:  # this PDU in Python (which refuses the instance, if it comes to it)
            return self.reader.read()
        spare = self.take_spare()
        # it reports what it stored after _C_REPORT instances, the batch wait after the first
        # instance not reported, or a pause of the peer
        kind, stored, self._c_counter, spare_out, spent, detail = _fastscp.receive(
            sock=self.sock.fileno(),
            buffer=self.reader.buffer,
            limit=self.reader.limit,
            contexts=contexts,
            spool_dir=os.fsencode(state.spool_dir),
            temp_prefix=self._temporary_prefix,
            counter=self._c_counter,
            spare=None if spare is None else (os.fsencode(spare[0]), spare[1]),
            budget=_C_BUDGET,
            max_instances=_C_REPORT,
            max_seconds=_BATCH_WAIT_S,
            pause_seconds=_PAUSE_S,
        )
        state.free_space.give_back(_C_BUDGET - spent, token)
        if spare_out is not None:
            self._spare = (Path(os.fsdecode(spare_out[0])), spare_out[1])
        if stored:
            # a full report means the sender is going on: its rows wait for the association's
            # end, a full batch or the batch wait (a commit beside the stream slows the stream's
            # next instance by about half the commit's CPU time); so do the rows of a report that
            # ends at the A-RELEASE-RQ, which is answered first (a commit holds the interpreter:
            # the answer would wait for it); any other report is committed at once
            releasing = kind == _fastscp.KIND_PDU and detail[0] == dicom_ul.RELEASE_RQ
            self._record_stored(stored, going_on=len(stored) >= _C_REPORT or releasing)
        if kind == _fastscp.KIND_BATCH:
            return None
        if kind == _fastscp.KIND_PDU:
            pdu_type, body, self._unfinished = detail
            return pdu_type, memoryview(body)
        if kind == _fastscp.KIND_COMMAND:
            context_id, command, rest = detail
            self._incoming = self._command(command, context_id)
        elif kind == _fastscp.KIND_DATASET:
            (context_id, command, temporary, fd, size, head, complete, error, rest, at) = detail
            request = dicom_ul.Command.decode(command)
            abstract, syntax = self.negotiated.accepted[context_id]  # type: ignore[union-attr]
            incoming = _Incoming(
                self,
                request,
                context_id,
                abstract,
                syntax,
                resume=_Resume(
                    Path(os.fsdecode(temporary)),
                    None if fd < 0 else fd,
                    size,
                    head,
                    bool(complete),
                    error,
                    _from_timestamp(at),
                ),
            )
            if complete:
                self._dataset_done(incoming, context_id)
            else:
                self._incoming = incoming
        else:
            code, error, message, self._unfinished = detail
            if code in (_fastscp.ERR_CLOSED, _fastscp.ERR_CLOSED_MID_PDU):
                raise dicom_ul.ConnectionClosed(mid_pdu=code == _fastscp.ERR_CLOSED_MID_PDU)
            if code == _fastscp.ERR_TIMEOUT:
                raise TimeoutError(message)
            if code == _fastscp.ERR_OS:
                raise OSError(error, os.strerror(error))
            raise dicom_ul.ProtocolError(message)
        if rest:
            self._pdata(memoryview(rest))
        return None

    def _record_stored(
        self, stored: list[tuple[dict[str, bytes], int, int, float]], *, going_on: bool
    ) -> None:
        """Hand the instances the C loop stored (and answered) to the recorder; ``going_on``:
        the sender is still sending (the C loop stopped at its report size)."""
        spool_dir = self.state.spool_dir
        accepted = self.negotiated.accepted  # type: ignore[union-attr]
        self.state.recorder.put(
            *(
                _Received(
                    self.info,
                    at,
                    raw=(
                        found,
                        str(accepted[context_id][0]),
                        accepted[context_id][1],
                        spool_dir,
                        size,
                    ),
                )
                for found, context_id, size, at in stored
            ),
            whole=not going_on,
            later=going_on,
        )

    def record(
        self,
        header: dict[str, str],
        found: dict[str, bytes] | None,
        *,
        sop_class: str,
        syntax: UID,
        final: Path,
        size: int,
        written: bool,
        received_at: dt.datetime,
        texts: dict[str, str] | None = None,
    ) -> None:
        """Hand a stored instance to the recorder: its UIDs (``header``), its text elements
        (decoded from ``found``, the raw values, or given as ``texts``)."""
        info = _instance_info(
            header,
            texts if found is None else _texts_or_empty(found, final),
            sop_class=sop_class,
            syntax=syntax,
            final=final,
            size=size if written else 0,
        )
        # where the C loop receives, an instance the Python code finishes is out of the ordinary
        # (the first of a series, a duplicate, ...): committed at once, so that the rows the C
        # loop leaves for the release do not wait behind it on the catalog's general path
        self.state.recorder.put(
            _Received(self.info, received_at, written=written, info=info), whole=self._c_loop_on
        )

    def _abort(self) -> None:
        """Send an A-ABORT (service provider), if the peer still takes it."""
        with contextlib.suppress(OSError):
            # a peer that stopped reading must not hold this thread for another timeout
            dicom_ul.set_kernel_timeouts(self.sock, 1.0)
            self.sock.sendall(dicom_ul.abort_pdu())

    def _failed_before_association(self, how: str, why: str) -> None:
        """Log, and audit, a connection that ended before an A-ASSOCIATE-RQ was understood: a
        port scanner, a peer speaking another protocol, a misconfigured one. A peer that closes
        without sending a byte (a TCP health check, a port probe) and a connection the node's
        stop ended are only logged, at debug level."""
        peer = f"{self.host}:{self.port}"
        if not why or self.scp.stopping:
            _log.debug("connection ended before an association", peer=peer, reason=why or how)
            return
        try:  # (the event goes to the process log too, as a warning)
            with self.state.db.session() as session:
                add_event(
                    session,
                    "connection.aborted",
                    f"connection from {peer} {how} before an association was established: {why}",
                    level="warning",
                    data={"peer_host": self.host, "peer_port": self.port, "reason": why},
                )
        except RadnetError as exc:
            _log.error(
                "connection aborted before an association, not audited",
                peer=peer,
                reason=why,
                error=str(exc),
            )

    def _associate(self, request: bytes) -> bool:
        """Negotiate, check, record; send the accept or the reject. True when accepted."""
        state = self.state
        node = state.node
        negotiated = self.scp.negotiate(request)
        self.negotiated = negotiated
        calling, called, host, port = (
            negotiated.calling_ae_title,
            negotiated.called_ae_title,
            self.host,
            self.port,
        )
        reject: tuple[int, int, int] | None = None
        reason = ""
        if called != node.ae_title:
            reject, reason = (
                _REJECT_CALLED_AE,
                f"called AE title {called!r} is not {node.ae_title!r}",
            )
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
                else:  # hold the place while the row is written
                    state.open[id(self)] = _Open(-1)
        # the accept goes first while the database answers: the peer prepares its first request
        # while the row is written (a millisecond or two); after a failure the row goes first
        # again, so that a database still failing rejects instead of accepting and aborting
        answered: OSError | None = None
        answer_first = reject is None and not state.audit_failing and state.recorder.error is None
        if answer_first:
            try:
                self.sock.sendall(negotiated.accept_pdu)
            except OSError as exc:  # the peer is gone: the row still says it was accepted
                answered = exc
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
            state.audit_failing = True
            if answer_first:
                _log.error("association aborted: audit database unavailable", error=str(exc))
                with state.lock:
                    state.open.pop(id(self), None)
                if answered is None:
                    self._abort()
                return False
            _log.error("association refused: audit database unavailable", error=str(exc))
            reject = reject or (0x02, 0x01, 0x01)  # transient, service user, no reason given
            association_id = -1
        else:
            state.audit_failing = False
        if reject is not None:
            with state.lock:
                state.open.pop(id(self), None)
            with contextlib.suppress(OSError):
                self.sock.sendall(dicom_ul.reject_pdu(*reject))
            return False
        self.calling = calling
        self.info = _Open(association_id)
        with state.lock:
            state.open[id(self)] = self.info
        if answered is not None:
            raise answered
        if not answer_first:
            self.sock.sendall(negotiated.accept_pdu)
        return True

    def _command(self, data: bytes, context_id: int) -> _Incoming | _Discard | None:
        """A whole command set: answer it, or return what receives the dataset that follows."""
        request = dicom_ul.Command.decode(data)
        abstract, transfer = self.negotiated.accepted[context_id]  # type: ignore[union-attr]
        field_ = request.command_field
        if field_ == dicom_ul.C_STORE_RQ and request.has_dataset:
            return _Incoming(self, request, context_id, abstract, transfer)
        if field_ == dicom_ul.C_CANCEL_RQ:
            return None  # nothing runs long enough here to cancel; C-CANCEL has no response
        status = dicom_ul.STATUS_UNRECOGNIZED_OPERATION
        why = "the node offers only C-ECHO and C-STORE"
        if field_ == dicom_ul.C_ECHO_RQ and not request.has_dataset:
            sop_class = request.affected_sop_class_uid
            if abstract == Verification and sop_class in ("", abstract):
                self._answer(request, STATUS_SUCCESS, context_id, sop_class_uid=str(abstract))
                return None
            status = STATUS_SOP_CLASS_NOT_SUPPORTED
            why = _wrong_context(request, context_id, abstract)
        elif field_ == dicom_ul.C_STORE_RQ:
            why = "its CommandDataSetType says that no data set follows"
        elif field_ == dicom_ul.C_ECHO_RQ:
            why = "a C-ECHO-RQ has no data set"
        # refused (after the dataset, if one follows)
        if request.has_dataset:
            return _Discard(self, request, context_id, status, why)
        self._answer(request, self.refuse_request(request, status, why), context_id)
        return None

    def refuse_request(self, request: dicom_ul.Command, status: int, why: str) -> int:
        """Audit a request refused other than a C-STORE's instance (``request.refused``, counted
        in the association's refused total); returns ``status``."""
        self.audit_refusal(
            "request.refused",
            f"{request.name} refused with 0x{status:04X}: {why}",
            level="warning",
            sop_instance_uid=request.affected_sop_instance_uid or None,
            data={"status": status, "command_field": request.name},
        )
        return status

    def audit_refusal(self, kind: str, message: str, *, level: str, **fields: Any) -> None:
        """Count a refusal in the association's refused total and write its audit row."""
        info = self.info
        if info is not None:
            info.refused += 1
        try:
            with self.state.db.session() as session:
                add_event(
                    session,
                    kind,
                    message,
                    level=level,
                    association_id=info.association_id if info is not None else None,
                    **fields,
                )
        except RadnetError as exc:
            _log.error("request refused and not audited", message=message, error=str(exc))

    def _answer(
        self, request: dicom_ul.Command, status: int, context_id: int, *, sop_class_uid: str = ""
    ) -> None:
        response = dicom_ul.command_response(request, status, sop_class_uid=sop_class_uid)
        self.sock.sendall(dicom_ul.pdata_pdu(context_id, response))

    def _closed(self, how: str, why: str, *, unfinished: str | None = None) -> None:
        """Write how the association ended and what it stored (once its instances are recorded);
        ``unfinished``: the SOP Instance UID of the C-STORE whose dataset was cut off (dropped,
        never answered)."""
        state = self.state
        with state.lock:
            info = state.open.pop(id(self), None)
        if info is None:
            return
        state.recorder.flush(5.0)
        negotiated = self.negotiated
        # what the peer offered and this node does not take (e.g. MR with accept_all_storage_classes
        # off): the peer sees 0x0122 / "no presentation context", the admin sees it here
        refused_classes = sorted(
            {UID(str(c)).name for c in (negotiated.refused if negotiated else [])}
        )
        refused_note = (
            f"; presentation contexts refused: {', '.join(refused_classes)}"
            if refused_classes
            else ""
        )
        why_note = f" ({why})" if why else ""
        unfinished_note = (
            f"; the unfinished instance {unfinished or '(no SOP Instance UID)'} was dropped "
            "(its data set was cut off, never answered)"
            if unfinished is not None
            else ""
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
                    f"association {how}{why_note}: {info.stored} instance(s) stored, "
                    f"{info.duplicates} duplicate(s), {info.refused} refused"
                    f"{unfinished_note}{refused_note}",
                    level="info"
                    if how == "released" and not refused_classes and unfinished is None
                    else "warning",
                    association_id=info.association_id,
                    data={
                        "stored": info.stored,
                        "duplicates": info.duplicates,
                        "refused": info.refused,
                        "refused_presentation_contexts": refused_classes,
                        **({"reason": why} if why else {}),
                        **({"unfinished_sop_instance_uid": unfinished} if unfinished else {}),
                    },
                )
        except RadnetError as exc:
            _log.error("cannot record the end of an association", error=str(exc))


def _wrong_context(request: dicom_ul.Command, context_id: int, abstract: UID) -> str:
    """Why ``request`` does not belong on its presentation context (status 0x0122)."""
    return (
        f"{request.name} for SOP class {_uid_text(request.affected_sop_class_uid)} on "
        f"presentation context {context_id}, whose abstract syntax is {_uid_text(abstract)}"
    )


def _uid_text(uid: str) -> str:
    """A UID for a message, with its name when it is a known one."""
    if not uid:
        return "(none)"
    if not is_safe_uid(uid):
        return repr(uid[:80])
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


class _Discard:
    """Swallows the dataset of a request the node does not serve, then refuses it."""

    def __init__(
        self,
        association: _Association,
        request: dicom_ul.Command,
        context_id: int,
        status: int,
        why: str,
    ) -> None:
        self.association = association
        self.request = request
        self.context_id = context_id
        self.status = status
        self.why = why

    def write(self, fragment: memoryview) -> None:
        pass

    def finish(self) -> int:
        return self.association.refuse_request(self.request, self.status, self.why)

    def record(self) -> None:
        pass

    def discard(self) -> None:
        pass


# the header elements the catalog records, decoded as text
_TEXT_ELEMENTS = ("AccessionNumber", "Modality", "SeriesDescription", "SeriesNumber")
_UID_ELEMENTS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
#: what :meth:`_Incoming._header` gives: those, and the SOP class (checked against the request)
_HEADER_UIDS = (*_UID_ELEMENTS, "SOPClassUID")
#: how much of a dataset's start is kept to find those elements (beyond it: read the spooled file)
_HEAD_LIMIT = 1 << 20


class _Incoming:
    """One C-STORE's dataset: streamed to a temporary spool file as it arrives (no decode), its
    header elements found in the first bytes, then checked, placed and answered."""

    def __init__(
        self,
        association: _Association,
        request: dicom_ul.Command,
        context_id: int,
        abstract: UID,
        syntax: UID,
        *,
        resume: _Resume | None = None,
    ) -> None:
        state = association.state
        self.association = association
        self.state = state
        self.request = request
        self.context_id = context_id
        self.transfer_syntax = syntax
        self.received_at = utcnow() if resume is None else resume.received_at
        self._fd: int | None = None
        self.size = 0  # the file's: file meta and dataset
        if resume is not None:  # what the C loop received of it
            self.temporary, self._fd, self.size = resume.temporary, resume.fd, resume.size
        else:
            # the temporary file the association opened while it waited for this request, if any
            spare = association.take_spare()
            if spare is not None:
                self.temporary, self._fd = spare
            else:
                self.temporary = _temporary_path(state)
        # the file meta information, written together with the first fragment
        self._meta = b""
        self.error: tuple[int, str] | None = None
        self._error_data: dict[str, str] = {}  # for the refusal's audit row
        self._scan_mode = _scan_mode(syntax)
        self._placed = False
        self._head = bytearray()
        self._scan_next = 0  # the kept head is scanned again once it is this long
        self._found: dict[str, bytes] | None = None
        # set once the instance is at its place: what record() hands to the recorder
        self._to_record: tuple[dict[str, str], Path, bool] | None = None
        self._found_text: dict[str, str] = {}
        sop_uid = request.affected_sop_instance_uid
        for name, uid in (
            ("AffectedSOPInstanceUID", sop_uid),
            ("AffectedSOPClassUID", request.affected_sop_class_uid),
        ):
            if not is_safe_uid(uid):
                self.error = (
                    STATUS_CANNOT_UNDERSTAND,
                    f"the request's {name} {uid!r} is missing or not a UID",
                )
                self.discard()
                return
        if request.affected_sop_class_uid != abstract or abstract == Verification:
            # e.g. an MR image on the CT context, MR having been refused at negotiation
            self.error = (
                STATUS_SOP_CLASS_NOT_SUPPORTED,
                _wrong_context(request, context_id, abstract),
            )
            self._error_data = {
                "sop_class_uid": request.affected_sop_class_uid,
                "abstract_syntax": str(abstract),
            }
            self.discard()
            return
        if self.size == 0:  # (the C loop wrote it with the first fragment)
            self._meta = dicom_ul.file_meta_header(
                request.affected_sop_class_uid, sop_uid, syntax, association.calling
            )
        if resume is not None:
            self._resumed(resume)
        elif self._fd is None:
            try:
                self._fd = _open_temporary(self.temporary)
            except OSError as exc:
                self._fail_write(exc)

    def _resumed(self, resume: _Resume) -> None:
        """Take over from the C loop: its write error, or the header scan of what it received."""
        if resume.error:
            failure = OSError(resume.error, os.strerror(resume.error))
            if not resume.complete:
                self._fail_write(failure)  # the rest of the dataset is read and dropped
            else:  # closing the file failed
                self.error = (
                    STATUS_OUT_OF_RESOURCES,
                    f"cannot write {self.temporary}: {failure}",
                )
            return
        if resume.head:
            self._scan_head(memoryview(resume.head))

    def _fail_write(self, exc: OSError) -> None:
        self.error = (
            STATUS_OUT_OF_RESOURCES,
            f"cannot write {self.temporary}: {exc.strerror or exc}",
        )
        self.discard()

    def write(self, fragment: memoryview) -> None:
        if self._fd is None:
            return  # refused already: the rest of the dataset is read and dropped
        if self._scan_mode is not None and self._found is None and not self._scan_head(fragment):
            return
        try:
            self.size += _write_all(self._fd, self._meta, fragment)
            self._meta = b""
        except OSError as exc:
            self._fail_write(exc)

    def _scan_head(self, fragment: memoryview) -> bool:
        """Look for the header elements in the dataset's bytes received so far; False when they
        cannot be parsed (the instance is then refused, its file dropped)."""
        # the first fragment nearly always holds the header: scan it in place, keep a copy
        # only when the scan needs the next fragment too
        if self._head:
            self._head += fragment
            # scanned again only once it has doubled: a peer sending tiny PDVs before a long
            # header would otherwise cost a scan of the whole head per PDV (quadratic)
            if len(self._head) < self._scan_next and len(self._head) <= _HEAD_LIMIT:
                return True
        # (a copy: the bytearray cannot grow while a view of it is held)
        head = memoryview(bytes(self._head)) if self._head else fragment
        self._scan_next = 2 * len(head)
        try:
            self._found = dicom_ul.scan_header(head, implicit=self._scan_mode).values
            self._head = bytearray()
        except dicom_ul.NeedMoreData:
            if len(head) > _HEAD_LIMIT:
                self._scan_mode, self._head = None, bytearray()  # read it from the file
            elif not self._head:
                self._head = bytearray(fragment)
        except dicom_ul.ProtocolError as exc:
            self.error = (STATUS_CANNOT_UNDERSTAND, f"the dataset cannot be parsed ({exc})")
            self.discard()
            return False
        return True

    def discard(self) -> None:
        """Drop the temporary file (the dataset is refused or was cut short)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self.temporary.unlink(missing_ok=True)

    def finish(self) -> int:
        """The whole dataset is in: check it, place it, hand it to the recorder; the status.
        Unless it was placed, the temporary file is dropped."""
        try:
            return self._finish()
        finally:
            if not self._placed:
                self.discard()

    def _refuse(self, status: int, why: str, **ids: Any) -> int:
        self.association.audit_refusal(
            "instance.refused",
            f"C-STORE refused with 0x{status:04X}: {why}",
            level="error",
            sop_instance_uid=self.request.affected_sop_instance_uid or None,
            data={"status": status, **self._error_data},
            **ids,
        )
        return status

    def _known_ids(self, header: dict[str, str]) -> dict[str, str]:
        """What names the refused instance's study in its audit row, so that ``audit show`` finds
        it by accession or by a UID the sender knows: the valid study and series UIDs, and the
        accession number."""
        ids = {
            key: header[name]
            for key, name in (
                ("study_instance_uid", "StudyInstanceUID"),
                ("series_instance_uid", "SeriesInstanceUID"),
            )
            if is_safe_uid(header[name])
        }
        texts = self._found_text or (_texts_of(self._found) if self._found else {})
        accession = texts.get("AccessionNumber", "")[:64]
        if accession:
            ids["accession_number"] = accession
        return ids

    def _finish(self) -> int:
        if self.error is not None:
            return self._refuse(*self.error)
        state = self.state
        fd = self._fd
        try:
            if fd is not None:  # (None: the C loop closed it)
                if state.node.fsync_spool:
                    os.fsync(fd)
                self._fd = None
                os.close(fd)
        except OSError as exc:
            return self._refuse(STATUS_OUT_OF_RESOURCES, f"cannot write {self.temporary}: {exc}")
        try:
            header = self._header()
        except Exception as exc:  # noqa: BLE001 - pydicom reports malformed data in many types
            return self._refuse(
                STATUS_CANNOT_UNDERSTAND,
                f"the dataset cannot be parsed ({type(exc).__name__}: {exc})",
            )
        sop_uid = self.request.affected_sop_instance_uid
        for name in _UID_ELEMENTS:
            if not is_safe_uid(header[name]):
                return self._refuse(
                    STATUS_CANNOT_UNDERSTAND,
                    f"{name} {header[name]!r} is missing or not a UID",
                    **self._known_ids(header),
                )
        if header["SOPInstanceUID"] != sop_uid:
            return self._refuse(
                STATUS_CANNOT_UNDERSTAND,
                f"the dataset's SOPInstanceUID {header['SOPInstanceUID']} differs from the "
                "request's",
            )
        dataset_class = header["SOPClassUID"]
        if dataset_class and dataset_class != self.request.affected_sop_class_uid:
            return self._refuse(
                STATUS_DATASET_DOES_NOT_MATCH,
                f"the dataset's SOPClassUID {_uid_text(dataset_class)} differs from the "
                f"request's {_uid_text(self.request.affected_sop_class_uid)}",
            )
        study_uid, series_uid = header["StudyInstanceUID"], header["SeriesInstanceUID"]
        ids = {"study_instance_uid": study_uid, "series_instance_uid": series_uid}
        recorder = state.recorder
        if recorder.error is not None:
            return self._refuse(
                STATUS_OUT_OF_RESOURCES, f"cannot record instances: {recorder.error}", **ids
            )
        if recorder.backlog >= _MAX_BACKLOG:
            return self._refuse(
                STATUS_OUT_OF_RESOURCES,
                f"{recorder.backlog} received instances wait for the audit database",
                **ids,
            )
        try:
            if not state.free_space.reserve(self.size, state.node.min_free_disk_mb):
                return self._refuse(
                    STATUS_OUT_OF_RESOURCES,
                    f"free disk space in {state.spool_dir} is below "
                    f"{state.node.min_free_disk_mb} MB",
                    **ids,
                )
        except OSError as exc:
            return self._refuse(STATUS_OUT_OF_RESOURCES, f"cannot check free disk space: {exc}")
        final = spool_path(state.spool_dir, study_uid, series_uid, sop_uid)
        # at its place already: a resend of a stored instance (the first copy is kept), or a file
        # left by a crash before its row (registered now, or by recovery)
        written = not final.exists()
        try:
            if written:
                _place(self.temporary, final, durable=state.node.fsync_spool)
                self._placed = True
        except OSError as exc:
            return self._refuse(
                STATUS_OUT_OF_RESOURCES, f"cannot write {final}: {exc.strerror or exc}", **ids
            )
        self._to_record = (header, final, written)
        return STATUS_SUCCESS

    def record(self) -> None:
        """Hand a stored instance to the recorder (nothing for a refused one). Called once the
        peer has its answer: the file is at its place already, so the catalog row needs none of
        the time between the request and the answer (a kill before the row: recovery registers
        the file at the next start)."""
        if self._to_record is None:
            return
        header, final, written = self._to_record
        self._to_record = None
        self.association.record(
            header,
            self._found,
            sop_class=self.request.affected_sop_class_uid,
            syntax=self.transfer_syntax,
            final=final,
            size=self.size,
            written=written,
            received_at=self.received_at,
            texts=self._found_text,
        )

    def _header(self) -> dict[str, str]:
        """The UIDs as text (the SOP class's too, empty when the dataset has none): from the
        scan, or from the spooled file with pydicom (which gives the text elements too, kept
        for :meth:`record`)."""
        if self._found is None and self._scan_mode is not None:
            # the whole dataset was shorter than what the scan needed
            self._found = dicom_ul.scan_header(
                memoryview(self._head), implicit=self._scan_mode, complete=True
            ).values
        if self._found is None:
            ds = dcmread(self.temporary, stop_before_pixels=True)
            self._found_text = {name: _text(ds, name) for name in _TEXT_ELEMENTS}
            return {name: _text(ds, name) for name in _HEADER_UIDS}
        return _header_of(self._found)


@dataclass(frozen=True)
class _Resume:
    """A dataset the C loop hands over: its temporary file (``fd`` None: closed), bytes written
    (file meta included), the dataset's first bytes, whether it is whole, the errno of a failed
    write (or close), and when its command arrived."""

    temporary: Path
    fd: int | None
    size: int
    head: bytes
    complete: bool
    error: int
    received_at: dt.datetime


def _header_of(found: dict[str, bytes]) -> dict[str, str]:
    """The header UIDs as text, from the raw values a scan found ('' when absent)."""
    return {
        name: found.get(name, b"").rstrip(b"\x00 ").decode("ascii", "replace")
        for name in _HEADER_UIDS
    }


def _texts_of(found: dict[str, bytes]) -> dict[str, str]:
    """The text elements the catalog records, decoded in the dataset's character set."""
    charsets = found.get("SpecificCharacterSet", b"").decode("ascii", "replace").split("\\")
    values: dict[str, str] = {}
    try:
        encodings = convert_encodings([term.strip() for term in charsets])
    except (LookupError, ValueError):  # the instance is answered already: never lose it
        encodings = None
    for name in _TEXT_ELEMENTS:
        raw = found.get(name, b"")
        try:
            text = decode_bytes(raw, encodings, set()) if raw and encodings else ""
        except (LookupError, ValueError):
            text = ""
        values[name] = (text or raw.decode("ascii", "replace")).strip("\x00 ")
    return values


def _from_timestamp(seconds: float) -> dt.datetime:
    """A POSIX time as :func:`radnet_node.audit.utcnow` gives times (UTC, no tzinfo)."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).replace(tzinfo=None)


#: disk space the C loop may fill before the free space is checked again (an instance that does
#: not fit is finished in Python, which checks it against the threshold)
_C_BUDGET = 64 << 20

#: instances answered but not yet in the database beyond which ingest refuses (0xA700)
_MAX_BACKLOG = 10_000


def _temporary_path(state: _IngestState) -> Path:
    """A new temporary spool file name (start-up recovery removes those a crash leaves)."""
    return state.spool_dir / f"{state.temporary_prefix}{next(state.counter)}.tmp"


def _open_temporary(path: Path) -> int:
    """A temporary spool file opened for writing, as a bare descriptor: the dataset goes in a
    few large writes, which need no buffered file object (nor its extra system calls)."""
    return os.open(path, _TEMPORARY_FLAGS, 0o644)


_TEMPORARY_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


def _write_all(fd: int, first: bytes, second: bytes | memoryview = b"") -> int:
    """Write ``first`` then ``second`` (in one system call); the number of bytes.

    Raises
    ------
    OSError
        The write failed, or was cut short and the rest failed (a full disk).
    """
    total = len(first) + len(second)
    written = os.writev(fd, (first, second))
    if written < total:  # a short write: the rest, or the error that stopped it
        rest = memoryview(bytes(first) + bytes(second))[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]
    return total


def _scan_mode(syntax: UID) -> bool | None:
    """How a dataset in ``syntax`` is scanned as it arrives: implicit VR (True) or explicit VR
    little endian (False, compressed syntaxes included); None: read back from the spooled file
    with pydicom (big endian, deflate)."""
    if syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        return None
    return syntax == ImplicitVRLittleEndian


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _place(temporary: Path, final: Path, *, durable: bool) -> None:
    """Move a written temporary spool file to its place (same file system: atomic), making the
    study and series folders on the way; ``durable``: fsync the folders, so a power loss cannot
    take the file away after success (the file itself was fsynced before)."""
    try:
        os.replace(temporary, final)
    except FileNotFoundError:
        if not temporary.exists():
            raise
        if durable:
            make_folder_durably(final.parent)
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temporary, final)
    if durable:
        fsync_folder(final.parent)
