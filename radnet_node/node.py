"""The running node: recovery, the SCP, the completion tick (APScheduler), the job worker and one
export thread per destination, started and stopped in the right order (SIGTERM/SIGINT included).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from radnet_node.audit import AuditDB, add_event
from radnet_node.catalog import complete_quiet_series
from radnet_node.config import Settings
from radnet_node.dicom_out import NodeIdentity
from radnet_node.engine import Engine
from radnet_node.errors import RadnetError
from radnet_node.export import Exporter
from radnet_node.ingest import IngestSCP
from radnet_node.jobs import Recovery, Worker, park_running_jobs, recover

__all__ = ["Node", "node_identity"]

_log = structlog.get_logger("radnet_node.node")


def node_identity(settings: Settings) -> NodeIdentity:
    """The node as its SR, SEG and key image name it (``[node]`` name, AE title, institution)."""
    return NodeIdentity(
        name=settings.node.name,
        station_name=settings.node.ae_title,
        institution_name=settings.node.institution_name,
    )


class Node:
    """radnet-node as a service.

    Parameters
    ----------
    settings
        The validated configuration.
    engine
        A loaded engine; default: loaded from ``settings`` (the weights are verified).

    Raises
    ------
    WeightsError, ConfigError
        The engine cannot be loaded.
    AuditError
        The database cannot be opened.
    """

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.data_dir: Path = settings.node.data_dir
        self.db = AuditDB(settings.database_url)
        self.engine = engine if engine is not None else Engine(settings.engine_settings())
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self.scp = IngestSCP(settings.node, self.db)
        self.exporters = [
            Exporter(self.db, d, settings.node.ae_title, self.stopping)
            for d in settings.destinations
        ]
        self.worker = Worker(
            self.db,
            self.engine,
            settings,
            node_identity(settings),
            on_exports_queued=self._notify_exporters,
        )
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._worker_thread = threading.Thread(target=self._work, name="worker", daemon=True)
        self.recovery: Recovery | None = None
        self.address: tuple[str, int] | None = None

    # ---------------------------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        """Recover, then start the worker, exporters, completion tick and SCP (in that order, so
        nothing is received before the node can process it). Returns the SCP's (host, port).

        Raises
        ------
        RadnetError
            The port cannot be bound, the data folder cannot be written, or recovery fails.
        """
        try:
            (self.data_dir / "spool").mkdir(parents=True, exist_ok=True)
            (self.data_dir / "results").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RadnetError(f"data_dir {self.data_dir}: cannot create it ({exc})") from exc
        self.recovery = recover(self.db, self.data_dir)
        self._worker_thread.start()
        for exporter in self.exporters:
            exporter.start()
        quiet = self.settings.series.quiet_seconds
        tick = min(1.0, max(0.1, quiet / 4.0))
        self._scheduler.add_job(
            self._complete_tick,
            "interval",
            seconds=tick,
            id="complete-quiet-series",
            max_instances=1,
            coalesce=True,
        )
        self._scheduler.start()
        self.address = self.scp.start()
        runtime = self.engine.describe()
        with self.db.session() as session:
            add_event(
                session,
                "node.started",
                f"{self.settings.node.ae_title} listening on {self.address[0]}:{self.address[1]}"
                + (" (TLS)" if self.settings.node.tls else "")
                + f"; model {self.engine.model_info.name} {self.engine.model_info.version} on "
                f"{runtime['device']} {runtime['precision']}; quiet {quiet:g} s; "
                f"{len(self.exporters)} destination(s)",
                data={"data_dir": str(self.data_dir), "runtime": runtime},
            )
        return self.address

    def _notify_exporters(self) -> None:
        for exporter in self.exporters:
            exporter.notify()

    def _complete_tick(self) -> None:
        try:
            with self.db.session() as session:
                completed = complete_quiet_series(session, self.settings.series.quiet_seconds)
        except RadnetError as exc:
            _log.error("completion tick failed", error=str(exc))
            return
        if completed:
            self._wake.set()

    def _work(self) -> None:
        while not self.stopping.is_set():
            try:
                busy = self.worker.step()
            except RadnetError as exc:
                _log.error("worker step failed", error=str(exc))
                busy = False
            except Exception:  # noqa: BLE001 - a bug must not silently end the worker thread
                _log.exception("worker step failed with an unexpected error (a bug)")
                busy = False
            if not busy:
                self._wake.wait(1.0)
                self._wake.clear()

    # ---------------------------------------------------------------------------------------
    def stop(self, grace_seconds: float | None = None) -> None:
        """Stop accepting associations, let the running batch finish for up to ``grace_seconds``
        (default ``node.shutdown_grace_seconds``), else park its jobs back to queued; stop the
        exporters (an export being sent is finished or, if cut, sent again at the next start)."""
        grace = (
            self.settings.node.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        )
        self.scp.stop()
        self.stopping.set()
        self._wake.set()
        self._notify_exporters()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        parked = 0
        if self._worker_thread.is_alive():
            self._worker_thread.join(grace)
            if self._worker_thread.is_alive():
                parked = park_running_jobs(self.db, "the node was stopped while it ran")
        for exporter in self.exporters:
            if exporter.thread.is_alive():
                exporter.thread.join(exporter.destination.timeout_seconds + 1.0)
        try:
            with self.db.session() as session:
                add_event(
                    session,
                    "node.stopped",
                    "stopped" + (f"; {parked} running job(s) parked" if parked else ""),
                )
        except RadnetError as exc:
            _log.error("cannot record the stop", error=str(exc))
        self.db.dispose()

    def serve_forever(self, on_started: Callable[[tuple[str, int]], None] | None = None) -> None:
        """Start, run until SIGTERM or SIGINT, then stop cleanly (main thread only)."""
        received: list[int] = []

        def handle(signum: int, _frame: FrameType | None) -> None:
            received.append(signum)
            self.stopping.set()

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            address = self.start()
            if on_started is not None:
                on_started(address)
            while not self.stopping.wait(0.5):
                pass
            _log.info("stopping", signal=signal.Signals(received[0]).name if received else None)
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
