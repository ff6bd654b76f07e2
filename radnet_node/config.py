"""``radnet_node.toml`` -> one frozen, validated settings object; a bad key or value is a
:class:`~radnet_node.errors.ConfigError` that names it.

Sections: ``[node]`` (the DICOM SCP), ``[series]`` (completion and selection), ``[model]``,
``[[destinations]]`` (where results go), ``[audit]`` (the database) and ``[logging]``.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from radnet_node.engine import EngineSettings
from radnet_node.errors import ConfigError

__all__ = [
    "CONFIG_ENV",
    "AuditSection",
    "DestinationSection",
    "DestinationTlsSection",
    "LoggingSection",
    "ModelSection",
    "NodeSection",
    "SeriesSection",
    "Settings",
    "TlsSection",
    "load_settings",
    "resolve_config_path",
]

#: environment variable naming the configuration file when ``--config`` is not given
CONFIG_ENV = "RADNET_NODE_CONFIG"
# a configuration error message lists at most this many problems
_MAX_CONFIG_ERRORS = 5


def _ae_title(value: str) -> str:
    # PS3.8 9.3.2: 1-16 characters of the default repertoire, no backslash or control characters;
    # leading/trailing spaces are not significant
    text = value.strip()
    if not text:
        raise ValueError("an AE title must not be empty")
    if len(text) > 16:
        raise ValueError(f"AE title {value!r} is longer than 16 characters")
    if "\\" in text or any(ord(ch) < 32 or ord(ch) > 126 for ch in text):
        raise ValueError(f"AE title {value!r} has a backslash or a non-printable character")
    return text


AETitle = Annotated[str, AfterValidator(_ae_title)]
Port = Annotated[int, Field(ge=0, le=65535, strict=True)]
PositiveInt = Annotated[int, Field(ge=1, strict=True)]
Seconds = Annotated[float, Field(gt=0.0)]


class _Section(BaseModel):
    """Frozen, and an unknown key is an error (a typo must not be silently ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class TlsSection(_Section):
    """``[node.tls]``: DICOM over TLS for incoming associations (PS3.15 B.1 profile)."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _ca_for_clients(self) -> TlsSection:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates (the client CAs)")
        return self


class NodeSection(_Section):
    """``[node]``: the node's DICOM identity, network checks and storage."""

    ae_title: AETitle = "RADNET"
    host: str = "0.0.0.0"
    port: Port = 11112
    data_dir: Path = Path("var")
    # empty: any calling AE title / any host
    allowed_calling_ae_titles: tuple[AETitle, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    max_associations: PositiveInt = 10
    min_free_disk_mb: Annotated[int, Field(ge=0, strict=True)] = 1024
    # also accept (and spool, then skip with the reason audited) every other storage SOP class, so
    # a PACS that routes a whole study does not fail on its secondary captures and dose reports
    accept_all_storage_classes: bool = True
    max_pdu_bytes: Annotated[int, Field(ge=0, strict=True)] = 131072
    # fsync every spooled file (and its folder) before answering success: survives a power loss,
    # at about half the speed (benchmarks/bench_ingest.py); without it a kill -9 loses nothing
    # either (the kernel holds the written bytes), only a power loss before they are written back
    fsync_spool: bool = False
    name: str = Field(default="radnet-node", min_length=1)
    institution_name: str | None = None
    # SIGTERM: how long the running job may take to finish before it is parked (back to queued)
    shutdown_grace_seconds: Annotated[float, Field(ge=0.0)] = 60.0
    tls: TlsSection | None = None

    @field_validator("allowed_hosts")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)"
                ) from None
        return value

    def host_allowed(self, address: str) -> bool:
        """Whether a peer's IP address is on the allow-list (an empty list allows every host)."""
        if not self.allowed_hosts:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(n, strict=False) for n in self.allowed_hosts)


class SeriesSection(_Section):
    """``[series]``: when a series is complete, and which series are run."""

    quiet_seconds: Seconds = 10.0
    min_slices: PositiveInt | None = None
    # several series waiting are handed to the engine together, up to this many
    max_batch_series: PositiveInt = 4
    # run series whose images were lossy-compressed (LossyImageCompression 01 or a lossy encoding,
    # series.lossy_encoding); refused otherwise
    accept_lossy: bool = False


class ModelSection(_Section):
    """``[model]``: which weights, where they run, and the decision rule."""

    weights: str = "shipped"
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    min_consecutive_slices: PositiveInt | None = None
    # None: the model card's; 0: off (the slice count alone)
    min_positive_extent_mm: Annotated[float, Field(ge=0.0)] | None = None
    threads: PositiveInt | None = None
    chunk_slices: PositiveInt | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        text = value.strip().lower()
        if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
            return text
        raise ValueError(f"{value!r} is not auto, cpu, cuda or cuda:N")


class DestinationTlsSection(_Section):
    """``tls`` of a destination: the CA that signs the peer, and our client certificate if asked."""

    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    check_hostname: bool = False

    @model_validator(mode="after")
    def _pair(self) -> DestinationTlsSection:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        return self


class DestinationSection(_Section):
    """One ``[[destinations]]``: a C-STORE SCP that receives every result."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Annotated[int, Field(ge=1, le=65535, strict=True)]
    calling_ae_title: AETitle | None = None  # default: [node] ae_title
    tls: DestinationTlsSection | None = None
    retries: Annotated[int, Field(ge=0, strict=True)] = 8
    backoff_seconds: Seconds = 10.0
    max_backoff_seconds: Seconds = 900.0
    timeout_seconds: Seconds = 30.0

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts (exponential, capped)."""
        exponent = max(0, attempts - 1)
        return float(min(self.max_backoff_seconds, self.backoff_seconds * 2.0 ** min(exponent, 30)))


class AuditSection(_Section):
    """``[audit]``: the database (SQLAlchemy URL); default: SQLite in ``data_dir``."""

    database_url: str | None = None

    @field_validator("database_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                make_url(value)
            except ArgumentError:
                raise ValueError(f"{value!r} is not a SQLAlchemy database URL") from None
        return value


class LoggingSection(_Section):
    """``[logging]``: the process log (the audit database is separate)."""

    format: Literal["json", "console"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"
    log_patient_names: bool = False


class Settings(_Section):
    """The whole configuration; every section has defaults, so an empty file is valid."""

    node: NodeSection = NodeSection()
    series: SeriesSection = SeriesSection()
    model: ModelSection = ModelSection()
    destinations: tuple[DestinationSection, ...] = ()
    audit: AuditSection = AuditSection()
    logging: LoggingSection = LoggingSection()

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: tuple[DestinationSection, ...]) -> tuple[DestinationSection, ...]:
        names = [d.name for d in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"destination name {name!r} is used twice")
        return value

    @property
    def database_url(self) -> str:
        """``audit.database_url``, else ``sqlite:///<data_dir>/audit.sqlite``."""
        if self.audit.database_url:
            return self.audit.database_url
        return f"sqlite:///{self.node.data_dir / 'audit.sqlite'}"

    def engine_settings(self) -> EngineSettings:
        """The engine's settings from ``[model]`` and ``[series]``."""
        return EngineSettings(
            weights=self.model.weights,
            device=self.model.device,
            precision=self.model.precision,
            threshold=self.model.threshold,
            min_consecutive_slices=self.model.min_consecutive_slices,
            min_positive_extent_mm=self.model.min_positive_extent_mm,
            min_slices=self.series.min_slices,
            threads=self.model.threads,
            chunk_slices=self.model.chunk_slices,
        )

    def relative_to(self, base: Path) -> Settings:
        """The same settings with every relative path (data dir, TLS files, weights, SQLite file)
        taken relative to ``base`` and made absolute."""

        def resolve(path: Path | None) -> Path | None:
            if path is None:
                return None
            path = path.expanduser()
            return path if path.is_absolute() else (base / path).absolute()

        node = self.node
        updates: dict[str, Any] = {"data_dir": resolve(node.data_dir)}
        if node.tls is not None:
            updates["tls"] = node.tls.model_copy(
                update={
                    "certificate": resolve(node.tls.certificate),
                    "private_key": resolve(node.tls.private_key),
                    "ca_certificates": resolve(node.tls.ca_certificates),
                }
            )
        destinations = tuple(
            d
            if d.tls is None
            else d.model_copy(
                update={
                    "tls": d.tls.model_copy(
                        update={
                            "ca_certificates": resolve(d.tls.ca_certificates),
                            "certificate": resolve(d.tls.certificate),
                            "private_key": resolve(d.tls.private_key),
                        }
                    )
                }
            )
            for d in self.destinations
        )
        model = self.model
        if model.weights != "shipped" and not Path(model.weights).expanduser().is_absolute():
            model = model.model_copy(update={"weights": str(resolve(Path(model.weights)))})
        audit = self.audit
        if audit.database_url:
            audit = audit.model_copy(
                update={"database_url": _sqlite_relative_to(audit.database_url, base)}
            )
        return self.model_copy(
            update={
                "node": node.model_copy(update=updates),
                "destinations": destinations,
                "model": model,
                "audit": audit,
            }
        )


def _sqlite_relative_to(url: str, base: Path) -> str:
    """A SQLite URL with a relative file path made absolute against ``base``; others unchanged."""
    parsed = make_url(url)  # validated by AuditSection
    database = parsed.database
    if not parsed.drivername.startswith("sqlite") or not database or database == ":memory:":
        return url
    if database.startswith("file:") or Path(database).is_absolute():
        return url
    return parsed.set(database=str((base / database).absolute())).render_as_string(
        hide_password=False
    )


def resolve_config_path(option: str | Path | None) -> Path | None:
    """The configuration file to use: ``--config``, else ``$RADNET_NODE_CONFIG``, else none."""
    if option is not None:
        return Path(option)
    from_env = os.environ.get(CONFIG_ENV, "").strip()
    return Path(from_env) if from_env else None


def load_settings(path: str | Path | None) -> Settings:
    """Read and validate a TOML configuration file (``None``: the built-in defaults).

    Relative paths in the file (``node.data_dir``, TLS files, ``model.weights``, a SQLite database
    file) are taken relative to the file's folder, so a config and its files can move together;
    with no file, relative to the current directory.

    Parameters
    ----------
    path
        The TOML file, or ``None``.

    Returns
    -------
    Settings

    Raises
    ------
    ConfigError
        The file cannot be read, is not TOML, or a key is unknown or has an invalid value; the
        message names the file and the key (``node.port: ...``).
    """
    if path is None:
        return Settings().relative_to(Path.cwd())
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the configuration ({exc.strerror or exc})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: not valid TOML ({exc})") from exc
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        # every problem, unknown keys first: a misspelt key also makes its real one "missing",
        # and the misspelling is what the admin has to see
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        problems = []
        for error in errors[:_MAX_CONFIG_ERRORS]:
            key = ".".join(str(part) for part in error["loc"]) or "(top level)"
            message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
            problems.append(f"{key}: {message}")
        more = len(errors) - len(problems)
        tail = f" (and {more} more)" if more > 0 else ""
        raise ConfigError(f"{file}: {'; '.join(problems)}{tail}") from exc
    return settings.relative_to(file.parent.absolute())
