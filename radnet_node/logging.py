"""The process log: structlog as JSON lines or console text, with study/series/job identifiers bound
as context variables, and patient names removed unless the configuration allows them."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

from radnet_node.config import LoggingSection

__all__ = ["PATIENT_NAME_KEYS", "bound", "configure_logging", "redact_patient_names"]

#: log keys whose values are patient names; dropped unless ``logging.log_patient_names``
PATIENT_NAME_KEYS = frozenset({"patient_name", "PatientName", "patients_name"})


def redact_patient_names(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: remove every patient-name key from the event."""
    for key in PATIENT_NAME_KEYS & event_dict.keys():
        del event_dict[key]
    return event_dict


def configure_logging(settings: LoggingSection, stream: TextIO | None = None) -> None:
    """Set up structlog (and the stdlib loggers pynetdicom and APScheduler write to).

    Parameters
    ----------
    settings
        ``[logging]``: format (json or console), level, whether patient names may appear.
    stream
        Where the log goes; default stderr.
    """
    level = getattr(logging, settings.level.upper())
    out = stream or sys.stderr
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not settings.log_patient_names:
        processors.append(redact_patient_names)
    renderer: Any
    if settings.format == "json":
        processors.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # pynetdicom logs every PDU at INFO/DEBUG: keep it to warnings unless debugging
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name, lib_level in (
        ("pynetdicom", logging.DEBUG if level <= logging.DEBUG else logging.WARNING),
        ("apscheduler", logging.WARNING),
    ):
        lib = logging.getLogger(name)
        lib.handlers[:] = [handler]
        lib.setLevel(lib_level)
        lib.propagate = False
    # library warnings (highdicom, pydicom) become log events, so JSON logs stay one object a line
    warnings.showwarning = _log_warning


def _log_warning(  # noqa: PLR0917 - the signature of warnings.showwarning
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` replacement: a structlog warning event instead of raw stderr."""
    structlog.get_logger("radnet_node").warning(
        str(message),
        event_kind="python.warning",
        category=category.__name__,
        where=f"{filename}:{lineno}",
    )


@contextmanager
def bound(**identifiers: Any) -> Iterator[None]:
    """Bind identifiers (study_uid, series_uid, job_id, ...) to every log line in the block."""
    tokens = structlog.contextvars.bind_contextvars(
        **{k: v for k, v in identifiers.items() if v is not None}
    )
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
