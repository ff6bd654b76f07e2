"""``radnet-node serve`` as a real child process for tests: a TOML config written from a dict, start
with a readiness deadline, SIGTERM and kill -9, restart on the same port and data folder, and the
node's own CLI (``audit show --json``, ``status``) run against the same config.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fixed_weights import POSITIVE_BIAS, TINY_MODEL, write_fixed_weights
from orthanc import free_port

__all__ = [
    "TINY_MODEL",
    "NodeError",
    "NodeProcess",
    "node_command",
    "to_toml",
    "vm_hwm_mb",
    "write_test_weights",
]


class NodeError(RuntimeError):
    """The node did not start or stop as expected, or one of its commands failed; says why."""


def node_command() -> list[str]:
    """The ``radnet-node`` console script of this interpreter's environment.

    Raises
    ------
    NodeError
        The package is not installed (no console script).
    """
    beside = Path(sys.executable).parent / "radnet-node"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("radnet-node")
    if found is None:
        raise NodeError("the radnet-node console script is not installed (pip install -e .)")
    return [found]


def write_test_weights(
    out: Path, *, model: Mapping[str, Any] | None = None, positive: bool = True
) -> Path:
    """Fixed-answer weights (``tests/fixed_weights.py``): every slice scores 0.993 when
    ``positive``, else 0.007; ``model`` overrides the tiny architecture (``{}``: full size)."""
    return write_fixed_weights(
        out, model=model, slice_bias=POSITIVE_BIAS if positive else -POSITIVE_BIAS
    )


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set size (VmHWM) of a live process in MiB, from /proc; ``None`` elsewhere."""
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        # A JSON string is a valid TOML basic string for everything a test config holds.
        return json.dumps(str(value))
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def to_toml(document: Mapping[str, Any]) -> str:
    """A TOML document from a dict of sections: a dict is a ``[table]``, a list of dicts an
    ``[[array of tables]]``; values nested deeper are inline tables.

    Raises
    ------
    TypeError
        A top-level value is neither a section nor a list of sections, or a value has no TOML form.
    """
    lines: list[str] = []
    for name, section in document.items():
        if isinstance(section, Mapping):
            blocks: list[Mapping[str, Any]] = [section]
            header = f"[{name}]"
        elif isinstance(section, Sequence) and all(isinstance(s, Mapping) for s in section):
            blocks = list(section)
            header = f"[[{name}]]"
        else:
            raise TypeError(f"top-level key {name!r} must be a table or a list of tables")
        for block in blocks:
            lines.append(header)
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in block.items())
            lines.append("")
    return "\n".join(lines)


@dataclass
class NodeProcess:
    """One ``radnet-node serve`` in ``workdir`` (config, data folder and log live there).

    ``sections`` is merged into the generated config per section (``{"node": {...}}`` adds or
    replaces keys of ``[node]``; a value ``None`` removes the key, so the node's default applies);
    ``destinations`` become ``[[destinations]]``; ``environment`` is added to the process's.
    """

    workdir: Path
    weights: Path | str
    ae_title: str = "RADNET"
    quiet_seconds: float = 1.0
    destinations: Sequence[Mapping[str, Any]] = ()
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    environment: Mapping[str, str] = field(default_factory=dict)
    start_timeout_s: float = 120.0
    port: int = field(default_factory=free_port)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    starts: int = field(default=0, init=False)

    @property
    def config_path(self) -> Path:
        """The TOML config the node runs with."""
        return self.workdir / "radnet_node.toml"

    @property
    def data_dir(self) -> Path:
        """``[node] data_dir``: spool, results and the audit database."""
        return self.workdir / "var"

    @property
    def log_path(self) -> Path:
        """The process log (stdout and stderr of every start, appended)."""
        return self.workdir / "node.log"

    @property
    def database_url(self) -> str:
        """The audit database's SQLAlchemy URL (the default SQLite file in ``data_dir``)."""
        return f"sqlite:///{self.data_dir / 'audit.sqlite'}"

    def config(self) -> dict[str, Any]:
        """The configuration as a dict of sections."""
        document: dict[str, Any] = {
            "node": {
                "ae_title": self.ae_title,
                "host": "127.0.0.1",
                "port": self.port,
                "data_dir": str(self.data_dir),
                "min_free_disk_mb": 1,
            },
            "series": {"quiet_seconds": self.quiet_seconds},
            "model": {"weights": str(self.weights), "device": "cpu", "threads": 1},
            "logging": {"format": "json", "level": "info"},
        }
        for name, values in self.sections.items():
            merged = {**document.get(name, {}), **values}
            document[name] = {key: value for key, value in merged.items() if value is not None}
        if self.destinations:
            document["destinations"] = [dict(d) for d in self.destinations]
        return document

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the node process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        """The process id of the running node.

        Raises
        ------
        NodeError
            The node is not running.
        """
        if self._process is None:
            raise NodeError("the node is not running")
        return self._process.pid

    def start(self) -> NodeProcess:
        """Write the config and start ``radnet-node serve``; returns once the node says it listens
        (after its recovery) and the DICOM port accepts connections.

        Raises
        ------
        NodeError
            The node exited first or did not listen within ``start_timeout_s`` (it is killed; the
            message ends with the tail of its log).
        """
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(to_toml(self.config()), encoding="utf-8")
        env = os.environ | {"TCP_NODELAY": "1", "PYTHONUNBUFFERED": "1"} | dict(self.environment)
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts + 1} ---\n".encode())
            log.flush()
            log_offset = log.tell()
            self._process = subprocess.Popen(  # noqa: S603 - our console script, our config
                [*node_command(), "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
            )
        self.starts += 1
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise NodeError(f"radnet-node serve exited with code {code}{self.log_tail()}")
            # the port is bound before recovery; the node answers once it printed this line
            if self._log_since(log_offset).find(b" listening on ") >= 0:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                        return self
                except OSError:
                    pass
            time.sleep(0.1)
        self.kill()
        raise NodeError(
            f"radnet-node serve did not listen on port {self.port} within "
            f"{self.start_timeout_s:.0f} s{self.log_tail()}"
        )

    def _log_since(self, offset: int) -> bytes:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read()
        except OSError:
            return b""

    def kill(self) -> None:
        """kill -9 the node (no chance to clean up: the crash case)."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        self._process = None

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, as systemd stops the node; returns the exit code.

        Raises
        ------
        NodeError
            The node did not exit within ``timeout_s`` (it is then killed).
        """
        process = self._process
        if process is None:
            raise NodeError("the node is not running")
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise NodeError(f"the node ignored SIGTERM for {timeout_s:.0f} s") from None
        self._process = None
        return int(code)

    def restart_after_crash(self) -> NodeProcess:
        """kill -9, then start again with the same config, port and data folder."""
        self.kill()
        return self.start()

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        if self.running:
            try:
                self.terminate(timeout_s=30.0)
            except NodeError:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        """The end of the node's log, for failure messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"; node log ({self.log_path}):\n{tail}" if tail else ""

    # --- the node's own CLI ---------------------------------------------------------------------

    def cli(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``radnet-node ARGS --config <this config>`` to the end."""
        return subprocess.run(  # noqa: S603 - our console script
            [*node_command(), *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            cwd=self.workdir,
            env=os.environ | {"TCP_NODELAY": "1"},
        )

    def audit_show(self, uid_or_accession: str) -> Any:
        """``radnet-node audit show UID --json``, decoded.

        Raises
        ------
        NodeError
            The command failed or did not print JSON.
        """
        done = self.cli("audit", "show", uid_or_accession, "--json")
        if done.returncode != 0:
            raise NodeError(f"audit show {uid_or_accession} failed ({done.returncode}): "
                            f"{done.stderr.strip()[-2000:]}")  # fmt: skip
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError as exc:
            raise NodeError(f"audit show printed no JSON: {done.stdout[:500]!r}") from exc

    # --- the audit database, read-only ------------------------------------------------------------

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of a read-only SQL query on the node's SQLite audit database (empty when the
        database does not exist yet). Table names come from :mod:`radnet_node.audit`'s models."""
        path = self.data_dir / "audit.sqlite"
        if not path.is_file():
            return []
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
        try:
            return list(connection.execute(sql, tuple(parameters)))
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            connection.close()

    def job_states(self) -> list[str]:
        """The state of every job."""
        from radnet_node.audit import Job  # noqa: PLC0415

        return [str(row[0]) for row in self.query(f"SELECT state FROM {Job.__tablename__}")]

    def exports(self) -> list[tuple[str, str, int]]:
        """(destination, state, attempts) of every export."""
        from radnet_node.audit import Export  # noqa: PLC0415

        rows = self.query(f"SELECT destination, state, attempts FROM {Export.__tablename__}")
        return [(str(d), str(s), int(a)) for d, s, a in rows]

    def spooled_instances(self) -> dict[str, Path]:
        """SOP Instance UID -> spool file of every instance the node recorded."""
        from radnet_node.audit import Instance  # noqa: PLC0415

        rows = self.query(f"SELECT sop_instance_uid, spool_path FROM {Instance.__tablename__}")
        return {str(uid): Path(path) for uid, path in rows}

    def settled(self) -> bool:
        """Nothing left to do: at least one job, none queued or running, and every export
        delivered, dead or superseded."""
        jobs = self.job_states()
        exports = self.exports()
        return (
            bool(jobs)
            and not any(s in ("queued", "running") for s in jobs)
            and bool(exports)
            and all(s in ("delivered", "dead", "superseded") for _, s, _ in exports)
        )
