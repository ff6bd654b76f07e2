"""Export: C-STORE SCU of each result's SR, SEG and key image to every destination, with retries
driven by the database (``next_attempt_at``, exponential backoff), so they survive restarts; a
dead letter after the last retry; and C-ECHO for ``status`` and ``echo``.
"""

from __future__ import annotations

import datetime as dt
import ssl
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import structlog
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association as PynetAssociation
from sqlalchemy import select

from radnet_node.audit import (
    AuditDB,
    Export,
    ExportState,
    Result,
    Series,
    add_event,
    utcnow,
)
from radnet_node.config import DestinationSection, DestinationTlsSection
from radnet_node.errors import ConfigError, RadnetError
from radnet_node.logging import bound

#: the Verification SOP Class (C-ECHO)
Verification = UID("1.2.840.10008.1.1")

__all__ = [
    "WARNING_STATUSES",
    "EchoOutcome",
    "Exporter",
    "StoreOutcome",
    "client_ssl_context",
    "deliver_due",
    "echo",
    "requeue_exports",
    "store_files",
]

_log = structlog.get_logger("radnet_node.export")

#: warning statuses a PACS answers for an object it stored (coerced, elements discarded, ...):
#: delivered
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})


def client_ssl_context(tls: DestinationTlsSection) -> ssl.SSLContext:
    """The TLS context for a destination (TLS 1.2 or later, the peer verified against the CA).

    Raises
    ------
    ConfigError
        A CA, certificate or key file cannot be loaded (names it).
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.check_hostname
    try:
        if tls.ca_certificates is not None:
            context.load_verify_locations(cafile=str(tls.ca_certificates))
        if tls.certificate is not None and tls.private_key is not None:
            context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"destination tls: cannot load a certificate or key: {exc}") from None
    return context


def _ae(calling_ae_title: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def _associate(
    ae: AE,
    host: str,
    port: int,
    called_ae_title: str,
    ssl_context: ssl.SSLContext | None,
) -> tuple[PynetAssociation | None, str]:
    """An established association, or None and why not."""
    tls_args = (ssl_context, host) if ssl_context is not None else None
    assoc = ae.associate(host, port, ae_title=called_ae_title, max_pdu=131072, tls_args=tls_args)
    if assoc.is_established:
        return assoc, ""
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        detail = ""
        if primitive is not None:
            detail = (
                f" (result {primitive.result_str}, source {primitive.source_str}, "
                f"reason {primitive.reason_str})"
            )
        return None, f"association rejected by {called_ae_title}@{host}:{port}{detail}"
    if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
        # pynetdicom aborts an association on which the peer accepted no presentation context
        refused = sorted({UID(str(c.abstract_syntax)).name for c in assoc.rejected_contexts})
        return None, f"{called_ae_title}@{host}:{port} accepts none of {', '.join(refused)}"
    socket = assoc.dul.socket
    if socket is None or not getattr(socket, "_is_connected", False):
        return None, f"cannot connect to {host}:{port} (refused, unreachable or timed out)"
    return None, f"association aborted by {called_ae_title}@{host}:{port} (or no answer)"


@dataclass(frozen=True)
class EchoOutcome:
    """The answer to a C-ECHO."""

    ok: bool
    status: int | None
    error: str | None
    seconds: float


def echo(
    host: str,
    port: int,
    *,
    called_ae_title: str = "ANY-SCP",
    calling_ae_title: str = "RADNET",
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> EchoOutcome:
    """Send a C-ECHO and say whether the peer answered success."""
    start = time.perf_counter()
    ae = _ae(calling_ae_title, timeout)
    ae.add_requested_context(Verification)
    assoc, why = _associate(ae, host, port, called_ae_title, ssl_context)
    if assoc is None:
        return EchoOutcome(False, None, why, time.perf_counter() - start)
    try:
        status = assoc.send_c_echo()
        code = int(status.Status) if status and "Status" in status else None
    finally:
        assoc.release()
    ok = code == 0x0000
    error = None if ok else ("no answer" if code is None else f"status 0x{code:04X}")
    return EchoOutcome(ok, code, error, time.perf_counter() - start)


@dataclass(frozen=True)
class StoreOutcome:
    """The result of storing a set of files at one destination."""

    delivered: bool
    statuses: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> status
    error: str | None = None
    #: SOP classes of objects not sent because the destination refused them at negotiation
    #: (a PACS that stores SR but not SEG, say): the others are delivered without them
    not_accepted: tuple[str, ...] = ()

    @property
    def last_status(self) -> int | None:
        """The worst status received (a failure before a warning before success)."""
        if not self.statuses:
            return None
        return max(self.statuses.values(), key=_severity)


def _severity(status: int) -> int:
    if status == 0x0000:
        return 0
    if status in WARNING_STATUSES:
        return 1
    return 2


def store_files(
    destination: DestinationSection,
    calling_ae_title: str,
    files: Sequence[Path],
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> StoreOutcome:
    """Send ``files`` to ``destination`` on one association.

    Delivered when every object was answered success or a warning (B000, B006, B007). An object
    whose SOP class the destination refuses at negotiation is not sent and does not hold back the
    others (named in ``not_accepted``): a PACS that takes the SR but not the SEG gets the SR.
    Nothing is delivered when it takes none of them (pynetdicom then aborts the association).

    Parameters
    ----------
    destination
        The destination.
    calling_ae_title
        Our AE title.
    files
        DICOM Part 10 files.
    ssl_context
        For a TLS destination.

    Returns
    -------
    StoreOutcome
        Never raises for network or peer problems: they are the outcome's ``error``.

    Raises
    ------
    InputError
        Not raised: an unreadable file is reported as the outcome's error too.
    """
    datasets = []
    for path in files:
        try:
            datasets.append(pydicom.dcmread(path))
        except (OSError, InvalidDicomError) as exc:
            return StoreOutcome(False, error=f"cannot read {path}: {exc}")
    ae = _ae(calling_ae_title, destination.timeout_seconds)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc, why = _associate(
        ae, destination.host, destination.port, destination.ae_title, ssl_context
    )
    if assoc is None:
        return StoreOutcome(False, error=why)
    accepted = {str(context.abstract_syntax) for context in assoc.accepted_contexts}
    not_accepted = tuple(sorted({str(ds.SOPClassUID) for ds in datasets} - accepted))
    sendable = [ds for ds in datasets if str(ds.SOPClassUID) in accepted]
    statuses: dict[str, int] = {}
    error = None
    try:
        for ds in sendable:
            sop_uid = str(ds.SOPInstanceUID)
            try:
                answer = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as exc:
                error = f"{sop_uid}: cannot be sent: {exc}"
                break
            if not answer or "Status" not in answer:
                error = f"{sop_uid}: no answer (association aborted or timed out)"
                break
            code = int(answer.Status)
            statuses[sop_uid] = code
            if _severity(code) == 2:
                comment = str(answer.get("ErrorComment", "") or "")
                error = f"{sop_uid}: status 0x{code:04X}" + (f" ({comment})" if comment else "")
    finally:
        if assoc.is_established:
            assoc.release()
    delivered = error is None and len(statuses) == len(sendable)
    return StoreOutcome(delivered, statuses, error, not_accepted)


# ------------------------------------------------------------------------------------------------
# the database-driven delivery loop


@dataclass(frozen=True)
class _Due:
    export_id: int
    attempts: int
    result_dir: str
    study_instance_uid: str
    series_instance_uid: str
    accession_number: str


def _claim_due(db: AuditDB, destination: str) -> _Due | None:
    with db.session() as session:
        row = session.execute(
            select(Export, Result, Series)
            .join(Result, Result.id == Export.result_id)
            .join(Series, Series.id == Result.series_id)
            .where(
                Export.destination == destination,
                Export.state == ExportState.PENDING,
                Export.next_attempt_at <= utcnow(),
            )
            .order_by(Export.next_attempt_at, Export.id)
            .limit(1)
        ).first()
        if row is None:
            return None
        export, result, series = row
        export.state = ExportState.SENDING
        export.attempts += 1
        export.started_at = utcnow()
        return _Due(
            export.id,
            export.attempts,
            result.result_dir,
            series.study_instance_uid,
            series.series_instance_uid,
            series.accession_number,
        )


def _dicom_files(result_dir: str) -> list[Path]:
    return sorted(Path(result_dir).glob("*.dcm"))


def deliver_due(
    db: AuditDB,
    destination: DestinationSection,
    calling_ae_title: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Send every export of ``destination`` that is due now; returns how many were attempted.

    Each attempt: the export is marked ``sending`` (committed), the files are sent, then it is
    marked ``delivered``, or ``pending`` with ``next_attempt_at`` = now + backoff, or ``dead``
    after ``retries`` retries.

    Raises
    ------
    AuditError
        The database cannot be read or written.
    """
    attempted = 0
    while stop is None or not stop.is_set():
        due = _claim_due(db, destination.name)
        if due is None:
            break
        attempted += 1
        with bound(series_uid=due.series_instance_uid, export_id=due.export_id):
            files = _dicom_files(due.result_dir)
            if files:
                outcome = store_files(destination, calling_ae_title, files, ssl_context=ssl_context)
            else:
                outcome = StoreOutcome(False, error=f"no DICOM files in {due.result_dir}")
            _record(db, destination, due, outcome)
    return attempted


def _record(db: AuditDB, destination: DestinationSection, due: _Due, outcome: StoreOutcome) -> None:
    ids = {
        "study_instance_uid": due.study_instance_uid,
        "series_instance_uid": due.series_instance_uid,
        "accession_number": due.accession_number or None,
        "export_id": due.export_id,
    }
    with db.session() as session:
        export = session.get(Export, due.export_id)
        assert export is not None  # rows are never deleted
        export.last_status = outcome.last_status
        statuses = {uid: f"0x{code:04X}" for uid, code in outcome.statuses.items()}
        if outcome.delivered:
            export.state = ExportState.DELIVERED
            export.delivered_at = utcnow()
            export.last_error = None
            warned = [s for s in outcome.statuses.values() if s != 0x0000]
            left_out = [UID(uid).name for uid in outcome.not_accepted]
            add_event(
                session,
                "export.delivered",
                f"stored at {destination.name} ({len(outcome.statuses)} object(s)"
                + (f", warnings {', '.join(f'0x{s:04X}' for s in warned)}" if warned else "")
                + f", attempt {due.attempts})"
                + (
                    f"; not sent, the destination does not accept {', '.join(left_out)}"
                    if left_out
                    else ""
                ),
                level="warning" if left_out else "info",
                data={"statuses": statuses, "not_accepted": list(outcome.not_accepted)},
                **ids,  # type: ignore[arg-type]
            )
            return
        export.last_error = outcome.error
        if due.attempts > destination.retries:
            export.state = ExportState.DEAD
            add_event(
                session,
                "export.dead",
                f"dead letter after {due.attempts} attempt(s) to {destination.name}: "
                f"{outcome.error} (radnet-node resend {due.export_id})",
                level="error",
                data={"statuses": statuses},
                **ids,  # type: ignore[arg-type]
            )
            return
        delay = destination.backoff(due.attempts)
        export.state = ExportState.PENDING
        export.next_attempt_at = utcnow() + dt.timedelta(seconds=delay)
        add_event(
            session,
            "export.retry",
            f"attempt {due.attempts} to {destination.name} failed: {outcome.error}; "
            f"retry in {delay:g} s ({destination.retries + 1 - due.attempts} left)",
            level="warning",
            data={"statuses": statuses},
            **ids,  # type: ignore[arg-type]
        )


class Exporter:
    """One destination's delivery thread: one failing destination never blocks another.

    Parameters
    ----------
    db
        The audit database.
    destination
        The destination.
    calling_ae_title
        Our AE title.
    stop
        Set to end the loop.
    poll_seconds
        How often due exports are looked for.

    Raises
    ------
    ConfigError
        The destination's TLS files cannot be loaded.
    """

    def __init__(
        self,
        db: AuditDB,
        destination: DestinationSection,
        calling_ae_title: str,
        stop: threading.Event,
        poll_seconds: float = 0.5,
    ) -> None:
        self.db = db
        self.destination = destination
        self.calling_ae_title = destination.calling_ae_title or calling_ae_title
        self.stop = stop
        self.poll_seconds = poll_seconds
        self.ssl_context = (
            client_ssl_context(destination.tls) if destination.tls is not None else None
        )
        self.wake = threading.Event()
        self.thread = threading.Thread(
            target=self._loop, name=f"export-{destination.name}", daemon=True
        )

    def start(self) -> None:
        """Start the delivery thread."""
        self.thread.start()

    def notify(self) -> None:
        """Look for due exports now rather than at the next poll."""
        self.wake.set()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                deliver_due(
                    self.db,
                    self.destination,
                    self.calling_ae_title,
                    ssl_context=self.ssl_context,
                    stop=self.stop,
                )
            except RadnetError as exc:
                _log.error("export loop error", destination=self.destination.name, error=str(exc))
            except Exception:  # noqa: BLE001 - a bug must not silently end this destination's thread
                _log.exception("export loop error (a bug)", destination=self.destination.name)
            self.wake.wait(self.poll_seconds)
            self.wake.clear()


def requeue_exports(
    db: AuditDB, export_ids: Iterable[int] = (), *, all_dead: bool = False
) -> list[int]:
    """Send exports again: dead ones (``all_dead``) or the given ids (dead, delivered or
    superseded); attempts start again from zero. Returns the ids re-queued.

    Raises
    ------
    RadnetError
        A given id does not exist or is pending or being sent (names it).
    AuditError
        The database cannot be read or written.
    """
    wanted = list(export_ids)
    with db.session() as session:
        rows: list[Export] = []
        if all_dead:
            rows.extend(
                session.scalars(select(Export).where(Export.state == ExportState.DEAD)).all()
            )
        for export_id in wanted:
            row = session.get(Export, export_id)
            if row is None:
                raise RadnetError(f"export {export_id}: no such export")
            if row.state in (ExportState.PENDING, ExportState.SENDING):
                raise RadnetError(f"export {export_id}: already {row.state}, nothing to re-send")
            if row not in rows:
                rows.append(row)
        for row in rows:
            previous = row.state
            row.state = ExportState.PENDING
            row.attempts = 0
            row.next_attempt_at = utcnow()
            series = session.scalar(
                select(Series)
                .join(Result, Result.series_id == Series.id)
                .where(Result.id == row.result_id)
            )
            add_event(
                session,
                "export.requeued",
                f"re-queued for {row.destination} by an operator (was {previous})",
                study_instance_uid=series.study_instance_uid if series else None,
                series_instance_uid=series.series_instance_uid if series else None,
                export_id=row.id,
            )
        return [r.id for r in rows]
