"""The running node: the data folder lock, the SCP, recovery, the completion tick (APScheduler),
the job worker and one export thread per destination, started and stopped in the right order
(SIGTERM/SIGINT included).
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import gc
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from radnet_node.audit import AuditDB, add_event, utcnow
from radnet_node.catalog import complete_quiet_series, restart_quiet_periods
from radnet_node.config import Settings
from radnet_node.dicom_out import NodeIdentity
from radnet_node.engine import Engine
from radnet_node.errors import RadnetError
from radnet_node.export import Exporter
from radnet_node.ingest import IngestSCP
from radnet_node.jobs import Recovery, Worker, park_running_jobs, recover

__all__ = ["LOCK_FILE", "DataDirLock", "Node", "node_identity"]

#: the file in ``data_dir`` a running node holds an exclusive lock on
LOCK_FILE = "node.lock"

_log = structlog.get_logger("radnet_node.node")


def node_identity(settings: Settings) -> NodeIdentity:
    """The node as its SR, SEG and key image name it (``[node]`` name, AE title, institution)."""
    return NodeIdentity(
        name=settings.node.name,
        station_name=settings.node.ae_title,
        institution_name=settings.node.institution_name,
    )


class DataDirLock:
    """An exclusive ``flock`` on ``data_dir/node.lock``, so that one node at a time uses a data
    folder. The kernel drops it when the process ends, however it ends (kill -9 included), so a
    stale lock file never blocks a restart; the file itself stays (it holds the last holder's
    process id, for the message a second node prints)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or fail at once.

        Raises
        ------
        RadnetError
            Another node holds it (names the data folder and that node's process id), or the
            lock file cannot be created or locked.
        """
        if self._fd is not None:
            return
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RadnetError(
                f"data_dir {self.data_dir}: cannot create the lock file {self.path} "
                f"({exc.strerror or exc})"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = self._holder()
                raise RadnetError(
                    f"data_dir {self.data_dir} is in use: another radnet-node"
                    + (f" (process {holder})" if holder else "")
                    + f" holds its lock {self.path}; stop that node first, or give this one "
                    "its own node.data_dir"
                ) from None
            raise RadnetError(
                f"data_dir {self.data_dir}: cannot lock {self.path} ({exc.strerror or exc})"
            ) from exc
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        except OSError:
            pass  # the process id is only for the message of a second node
        self._fd = fd

    def _holder(self) -> str:
        try:
            text = self.path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            return ""
        return text if text.isdigit() else ""

    def release(self) -> None:
        """Give the lock back (closing the file releases it)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


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
        self.lock = DataDirLock(self.data_dir)
        # when this node came up: no series completes before a whole quiet period after it
        self.up_at: dt.datetime | None = None
        self._stopped = False

    # ---------------------------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        """Take the data folder's lock and bind the port first, so that a second node on the same
        data folder or port fails before it touches anything; then recover, start the worker,
        exporters and completion tick, and only then answer associations (a peer connecting
        meanwhile waits in the listen backlog). Returns the SCP's (host, port).

        Raises
        ------
        RadnetError
            Another node holds the data folder, the port cannot be bound, the data folder cannot
            be written, or recovery fails.
        """
        self.lock.acquire()
        try:
            self.address = self.scp.bind()
        except BaseException:
            self.lock.release()
            raise
        for folder in (self.data_dir / "spool", self.data_dir / "results"):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                # a folder that exists but cannot be written would refuse every instance later
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as exc:
                raise RadnetError(
                    f"data_dir {self.data_dir}: cannot write in {folder} "
                    f"({exc.strerror or exc})"
                ) from exc
        self.recovery = recover(self.db, self.data_dir)
        quiet = self.settings.series.quiet_seconds
        # the quiet clock of a series still receiving restarts now: the instances it got before
        # the node went down are no sign that the sender has finished
        self.up_at = utcnow()
        with self.db.session() as session:
            restart_quiet_periods(session, quiet)
        self._worker_thread.start()
        for exporter in self.exporters:
            exporter.start()
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
        # the model, torch and the libraries are loaded for good: keep the garbage collector from
        # walking them on every collection (a fifth of ingest's time went there otherwise)
        gc.freeze()
        self.scp.serve()
        runtime = self.engine.describe()
        with self.db.session() as session:
            add_event(
                session,
                "node.started",
                f"{self.settings.node.ae_title} listening on {self.address[0]}:{self.address[1]}"
                + (" (TLS)" if self.settings.node.tls else "")
                + f"; model {self.engine.model_info.name} {self.engine.model_info.version} on "
                f"{runtime['device']} {runtime['precision']}; quiet {quiet:g} s; "
                f"{len(self.exporters)} destination(s); C-STOREs received by the "
                f"{self.scp.receive_loop} loop",
                data={
                    "data_dir": str(self.data_dir),
                    "runtime": runtime,
                    "receive_loop": self.scp.receive_loop,
                },
            )
        return self.address

    def _notify_exporters(self) -> None:
        for exporter in self.exporters:
            exporter.notify()

    def _complete_tick(self) -> None:
        try:
            with self.db.session() as session:
                completed = complete_quiet_series(
                    session,
                    self.settings.series.quiet_seconds,
                    quiet_since=self.up_at,
                    receiving=self.scp.pending_series(),
                )
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
    @property
    def worker_running(self) -> bool:
        """Whether the worker thread is still alive (after :meth:`stop`: it was parked inside a
        batch, e.g. in a torch call that cannot be interrupted)."""
        return self._worker_thread.is_alive()

    def stop(self, grace_seconds: float | None = None) -> None:
        """Stop accepting associations, let the running batch finish for up to ``grace_seconds``
        (default ``node.shutdown_grace_seconds``), else park its jobs back to queued; stop the
        exporters (an export being sent is finished or, if cut, sent again at the next start).

        A node whose :meth:`start` failed before recovery (the data folder held by another node,
        the port in use) touched nothing: it only gives back what it took, and writes nothing to
        the audit. The data folder's lock is kept while the worker is still alive (until the
        process ends), so no other node can start on the folder meanwhile."""
        if self._stopped:
            return
        self._stopped = True
        grace = (
            self.settings.node.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        )
        self.scp.stop()
        self.stopping.set()
        self._wake.set()
        self._notify_exporters()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if self.recovery is None:
            self.db.dispose()
            self.lock.release()
            return
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
        if not self._worker_thread.is_alive():
            self.lock.release()

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
