"""The ``radnet-node`` command line: the composition root that wires config, engine and use cases
(``infer``, ``serve``, ``status``, ``echo``, ``audit tail|show``, ``resend``).

Errors become one line on stderr and an exit code, never a traceback.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from radnet_node import audit
from radnet_node.config import CONFIG_ENV, Settings, load_settings, resolve_config_path
from radnet_node.engine import Engine
from radnet_node.errors import ConfigError, RadnetError
from radnet_node.infer import SeriesDone, SeriesFailed, infer_paths
from radnet_node.postprocess import rule_text

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILED",
    "EXIT_INTERNAL",
    "EXIT_NOTHING_TO_DO",
    "EXIT_OK",
    "EXIT_USAGE",
    "app",
]

#: every eligible series was processed
EXIT_OK = 0
#: an eligible series failed, or a DICOM file could not be read (the others were still processed)
EXIT_FAILED = 1
#: bad command line, configuration or weights: nothing was processed
EXIT_USAGE = 2
#: the inputs held no eligible series
EXIT_NOTHING_TO_DO = 3
#: an unexpected error (a bug)
EXIT_INTERNAL = 70
#: the reader of stdout went away (``| head``): 128 + SIGPIPE, what a shell reports for a Unix
#: tool that SIGPIPE ended; nothing is printed
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

app = typer.Typer(
    name="radnet-node",
    help="RADnet intracranial hemorrhage detection on head CT, as a DICOM node. Research software, "
    "not a medical device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """RADnet intracranial hemorrhage detection on head CT. Not a medical device."""


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"radnet-node: error: {message}", err=True)
    return typer.Exit(code)


def _stdout_closed() -> typer.Exit:
    """stdout's reader is gone (``radnet-node status | head``): end quietly with
    :data:`EXIT_BROKEN_PIPE`, as every Unix tool does. stdout is pointed at /dev/null first, or
    Python's own flush at exit would fail on the closed pipe again and print about it."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # not a real file (a test runner's capture): nothing to flush at exit
    return typer.Exit(EXIT_BROKEN_PIPE)


def _settings(config: Path | None, weights: str | None, device: str | None) -> Settings:
    settings = load_settings(resolve_config_path(config))
    overrides = {k: v for k, v in (("weights", weights), ("device", device)) if v is not None}
    if not overrides:
        return settings
    # validate the command-line values exactly as the file's
    try:
        model = type(settings.model).model_validate({**settings.model.model_dump(), **overrides})
    except ValidationError as exc:
        first = exc.errors()[0]
        option = "--" + str(first["loc"][0]) if first["loc"] else "option"
        raise ConfigError(f"{option}: {first['msg']}") from None
    return settings.model_copy(update={"model": model})


@app.command()
def infer(
    paths: Annotated[
        list[Path],
        typer.Argument(help="DICOM files and folders (searched recursively), in any mix."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder; one sub-folder per series.")
    ],
    weights: Annotated[
        str | None,
        typer.Option(help='Weights file (model card beside it) or "shipped". [default: config]'),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu, cuda or cuda:N. [default: config, else auto]")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help=f"TOML configuration (model, series sections); default ${CONFIG_ENV}."),
    ] = None,
) -> None:
    """Run RADnet on every axial head-CT series found in PATHS and write, per series, into
    OUT/<SeriesInstanceUID>/: sr.dcm, seg.dcm, key-image.dcm (when positive), preview.png and
    result.json. Prints one line per series and per skipped file.

    Exit codes: 0 every eligible series processed; 1 an eligible series failed or a DICOM file was
    unreadable; 2 bad configuration, weights or path; 3 no eligible series found.
    """
    try:
        code = _infer(paths, out, weights, device, config)
    except BrokenPipeError:
        raise _stdout_closed() from None
    except RadnetError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    except Exception as exc:  # noqa: BLE001 - the CLI promises one line, not a traceback
        raise _fail(f"internal error (a bug): {type(exc).__name__}: {exc}", EXIT_INTERNAL) from None
    raise typer.Exit(code)


def _short_warning(  # noqa: PLR0917 - the signature of warnings.showwarning
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` for ``infer``: a library's warning (pydicom on a value that breaks
    its VR's rules) as one line, without the library's source path."""
    typer.echo(f"warning: {message}", err=True)


def _infer(
    paths: list[Path], out: Path, weights: str | None, device: str | None, config: Path | None
) -> int:
    warnings.showwarning = _short_warning
    settings = _settings(config, weights, device)
    engine = Engine(settings.engine_settings())
    runtime = engine.describe()
    typer.echo(
        f"model {engine.model_info.name} {engine.model_info.version} ({engine.model_info.variant}) "
        f"on {runtime['device']} {runtime['precision']}; threshold {engine.threshold}, "
        + rule_text(engine.min_consecutive, engine.min_extent_mm)
    )
    done = failed = unreadable = skipped = 0
    for event in infer_paths(paths, out, engine, accept_lossy=settings.series.accept_lossy):
        if isinstance(event, SeriesDone):
            done += 1
            typer.echo(_done_line(event))
        elif isinstance(event, SeriesFailed):
            failed += 1
            typer.echo(f"FAILED  {event.label}: {event.reason}")
        elif event.is_error:
            unreadable += 1
            typer.echo(f"ERROR   {event.what}: {event.reason}")
        else:
            skipped += 1
            typer.echo(f"skipped {event.what}: {event.reason}")
        sys.stdout.flush()
    typer.echo(
        f"{done} series done, {failed} failed, {unreadable} unreadable file(s), {skipped} skipped"
    )
    if failed or unreadable:
        problems = [
            text
            for count, text in (
                (failed, f"{failed} eligible series failed"),
                (unreadable, f"{unreadable} DICOM file(s) could not be read"),
            )
            if count
        ]
        typer.echo(
            f"radnet-node: error: {' and '.join(problems)} (see the FAILED / ERROR lines)",
            err=True,
        )
        return EXIT_FAILED
    if done == 0:
        typer.echo("radnet-node: error: no eligible axial head-CT series found", err=True)
        return EXIT_NOTHING_TO_DO
    return EXIT_OK


def _done_line(event: SeriesDone) -> str:
    result = event.result
    decision = "PRESENT" if result.ct_positive else "absent"
    n = len(result.slice_probabilities)
    positive = len(result.positive_slice_indices)
    seconds = event.timings_ms.get("total", 0.0) / 1000.0
    return (
        f"done    {event.label}: hemorrhage {decision}, certainty {result.certainty:.2f}, "
        f"{positive}/{n} slices positive, volume {result.hemorrhage_volume_ml:.1f} mL, "
        f"{seconds:.2f} s -> {event.output_dir}"
    )


# ------------------------------------------------------------------------------------------------
# the node

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help=f"TOML configuration; default ${CONFIG_ENV}, else built-in."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="One JSON document per line.")]


def _guard(run: Callable[[], int | None]) -> None:
    """Run a command body: RadnetError -> one line and exit 2; a bug -> one line and exit 70; stdout
    closed by its reader -> nothing and exit 141."""
    try:
        code = run()
        sys.stdout.flush()  # a closed pipe shows here, not in Python's flush at exit
    except BrokenPipeError:
        raise _stdout_closed() from None
    except RadnetError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    except Exception as exc:  # noqa: BLE001 - the CLI promises one line, not a traceback
        raise _fail(f"internal error (a bug): {type(exc).__name__}: {exc}", EXIT_INTERNAL) from None
    raise typer.Exit(code or EXIT_OK)


def _node_settings(config: Path | None) -> Settings:
    return load_settings(resolve_config_path(config))


def _open_db(settings: Settings) -> audit.AuditDB:
    return audit.AuditDB(settings.database_url, create=False)


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the DICOM node in the foreground: receive, complete, run, export, audit.

    Stops cleanly on SIGTERM or SIGINT (no new associations; the running job finishes within
    node.shutdown_grace_seconds or goes back to the queue; exit code 0). Exit code 2: bad
    configuration, weights, port (in use) or data folder (another node holds it); such a node
    touches nothing of the running one.
    """

    def run() -> int:
        from radnet_node.logging import configure_logging  # noqa: PLC0415 - serve only
        from radnet_node.node import Node  # noqa: PLC0415 - keeps the other commands light

        settings = _node_settings(config)
        configure_logging(settings.logging)
        node = Node(settings)

        def started(address: tuple[str, int]) -> None:
            typer.echo(
                f"radnet-node: {settings.node.ae_title} listening on {address[0]}:{address[1]}, "
                f"data in {settings.node.data_dir}",
                err=True,
            )

        node.serve_forever(on_started=started)
        if node.worker_running:
            # The grace period ran out with the worker inside a batch (its jobs are parked). A
            # torch call cannot be interrupted, and waiting for it would break the grace the
            # operator set. Letting Python finalize with that daemon thread alive aborts the
            # process: CPython ends a daemon thread that takes the GIL back during finalization
            # with pthread_exit, and the forced unwind through torch's C++ frames (pybind11's
            # gil_scoped_release, a noexcept destructor) calls std::terminate -> "terminate
            # called without an active exception", SIGABRT, exit code 134. So leave without
            # finalization: everything that matters is committed already (the spool is fsynced,
            # the jobs are parked and node.stopped is in the audit); what the thread could still
            # do is discard its result. That is a kill -9 after a clean stop, which the node is
            # built to survive (recovery removes a half-written result folder at the next start).
            _exit_now(EXIT_OK)
        return EXIT_OK

    _guard(run)


def _exit_now(code: int) -> None:
    """End the process with ``code`` at once (``os._exit``) after flushing the log and stdio."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


@app.command()
def status(
    config: ConfigOption = None,
    as_json: JsonOption = False,
    no_echo: Annotated[
        bool, typer.Option("--no-echo", help="Do not C-ECHO the destinations.")
    ] = False,
) -> None:
    """Queue depth per state, the last results, dead letters, and whether each destination
    answers a C-ECHO. Exit code 1 when there are dead letters or a destination does not answer."""

    def run() -> int:
        from radnet_node.export import client_ssl_context, echo  # noqa: PLC0415

        settings = _node_settings(config)
        db = _open_db(settings)
        with db.session() as session:
            summary = audit.status_summary(session)
        db.dispose()
        destinations: list[dict[str, Any]] = []
        for d in settings.destinations:
            entry: dict[str, Any] = {"name": d.name, "address": f"{d.ae_title}@{d.host}:{d.port}"}
            if not no_echo:
                context = client_ssl_context(d.tls) if d.tls is not None else None
                outcome = echo(
                    d.host,
                    d.port,
                    called_ae_title=d.ae_title,
                    calling_ae_title=d.calling_ae_title or settings.node.ae_title,
                    timeout=min(d.timeout_seconds, 10.0),
                    ssl_context=context,
                )
                entry.update(reachable=outcome.ok, echo_error=outcome.error)
            destinations.append(entry)
        document = summary.as_dict()
        document["destinations"] = destinations
        document["results_dir"] = str(settings.node.data_dir / "results")
        if as_json:
            typer.echo(json.dumps(document, default=str))
        else:
            _print_status(document, bool(settings.destinations))
        unreachable = any(d.get("reachable") is False for d in destinations)
        return EXIT_FAILED if summary.dead_exports or unreachable else EXIT_OK

    _guard(run)


def _counts(title: str, counts: dict[str, int]) -> str:
    body = ", ".join(f"{state} {n}" for state, n in sorted(counts.items())) or "none"
    return f"{title:9} {body}"


def _print_status(document: dict[str, Any], has_destinations: bool) -> None:
    typer.echo(_counts("series", document["series_by_state"]))
    typer.echo(_counts("jobs", document["jobs_by_state"]))
    typer.echo(_counts("exports", document["exports_by_state"]))
    typer.echo(f"last event {document['last_event_at'] or 'none'}")
    if not has_destinations:
        typer.echo(f"no destinations configured: results stay in {document['results_dir']}")
    for d in document["destinations"]:
        reach = d.get("reachable")
        state = (
            "not checked"
            if reach is None
            else "reachable"
            if reach
            else (f"NOT reachable: {d.get('echo_error')}")
        )
        typer.echo(f"destination {d['name']} ({d['address']}): {state}")
    for r in document["last_results"]:
        decision = "PRESENT" if r["ct_positive"] else "absent"
        unchanged = " (unchanged, not re-sent)" if r["unchanged"] else ""
        if r.get("superseded"):
            unchanged = " (superseded: the series was re-opened while it ran, not sent)"
        typer.echo(
            f"result {r['result_id']} {r['at']} series {r['series_instance_uid']}: hemorrhage "
            f"{decision}, certainty {r['certainty']:.2f}{unchanged}"
        )
    for problem in document["last_problems"]:
        accession = problem["accession_number"]
        typer.echo(
            f"problem {problem['at']} {problem['what']}, series {problem['series_instance_uid']}"
            + (f" (accession {accession})" if accession else "")
            + f": {problem['reason']}"
        )
    dead = document["dead_exports"]
    typer.echo(f"dead letters: {len(dead)}" + (" (radnet-node resend --all-dead)" if dead else ""))
    for e in dead:
        typer.echo(
            f"  export {e['export_id']} to {e['destination']}, series {e['series_instance_uid']}, "
            f"{e['attempts']} attempt(s): {e['last_error']}"
        )


@app.command("echo")
def echo_command(
    host: Annotated[str, typer.Argument(help="Peer host name or IP address.")],
    port: Annotated[int, typer.Argument(help="Peer port.")],
    aec: Annotated[str, typer.Option("--aec", help="Called AE title.")] = "ANY-SCP",
    aet: Annotated[str, typer.Option("--aet", help="Our (calling) AE title.")] = "RADNET",
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 10.0,
) -> None:
    """Send a C-ECHO to HOST PORT. Exit code 0 when it answers success, 1 otherwise."""

    def run() -> int:
        from radnet_node.export import echo  # noqa: PLC0415

        outcome = echo(host, port, called_ae_title=aec, calling_ae_title=aet, timeout=timeout)
        where = f"{aec}@{host}:{port}"
        if outcome.ok:
            typer.echo(f"C-ECHO {where}: success in {outcome.seconds * 1000.0:.0f} ms")
            return EXIT_OK
        typer.echo(f"radnet-node: error: C-ECHO {where}: {outcome.error}", err=True)
        return EXIT_FAILED

    _guard(run)


audit_app = typer.Typer(help="Read the audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("tail")
def audit_tail(
    config: ConfigOption = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events.")
    ] = False,
    as_json: JsonOption = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=1, help="Events to show first.")] = 20,
    interval: Annotated[float, typer.Option(help="Seconds between polls with -f.")] = 0.5,
) -> None:
    """Print the last events of the audit log (with -f, then every new one as it happens)."""

    def show(events: list[audit.EventView]) -> None:
        for item in events:
            typer.echo(audit.dumps(item.as_dict()) if as_json else item.line())
        sys.stdout.flush()

    def run() -> int:
        settings = _node_settings(config)
        db = _open_db(settings)
        try:
            with db.session() as session:
                events = audit.tail_events(session, limit=lines)
            show(events)
            last = events[-1].id if events else 0
            while follow:
                time.sleep(interval)
                with db.session() as session:
                    events = audit.tail_events(session, after_id=last, limit=1000)
                show(events)
                if events:
                    last = events[-1].id
        finally:
            db.dispose()
        return EXIT_OK

    _guard(run)


@audit_app.command("show")
def audit_show(
    uid_or_accession: Annotated[
        str,
        typer.Argument(
            help=(
                "Study, Series or SOP Instance UID (also of an SR, SEG or key image the node "
                "made), or Accession Number."
            )
        ),
    ],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """The whole story of one study: each series with the time of every step and how long it
    took, results, exports, and every event. Exit code 3 when nothing matches."""

    def run() -> int:
        if not uid_or_accession.strip():
            # an empty accession number is what anonymised studies have: it would match them all
            typer.echo("radnet-node: error: UID_OR_ACCESSION is empty", err=True)
            return EXIT_USAGE
        settings = _node_settings(config)
        db = _open_db(settings)
        with db.session() as session:
            story = audit.study_story(session, uid_or_accession)
        db.dispose()
        if story is None:
            typer.echo(
                f"radnet-node: error: nothing in the audit matches {uid_or_accession!r}", err=True
            )
            return EXIT_NOTHING_TO_DO
        if as_json:
            typer.echo(audit.dumps(story.as_dict()))
        else:
            _print_story(story)
        return EXIT_OK

    _guard(run)


def _print_story(story: audit.StudyStory) -> None:
    typer.echo(
        f"study {', '.join(story.study_instance_uids) or '(no valid Study Instance UID received)'}"
        + (f"  accession {', '.join(story.accession_numbers)}" if story.accession_numbers else "")
    )
    for series in story.series:
        typer.echo(
            f"\nseries {series.series_number if series.series_number is not None else '?'} "
            f"{series.series_description!r} {series.modality} {series.series_instance_uid}"
        )
        typer.echo(
            f"  state {series.state}, generation {series.generation}, "
            f"{series.instance_count} instance(s)"
            + (f"; {series.eligibility_reason}" if series.eligibility_reason else "")
        )
        for step in series.steps:
            took = (
                ""
                if step.seconds_since_previous is None
                else (f"  +{step.seconds_since_previous:.3f} s")
            )
            typer.echo(f"  {step.at.isoformat(timespec='milliseconds')}Z  {step.name}{took}")
        for result in series.results:
            decision = "PRESENT" if result["ct_positive"] else "absent"
            timings = result.get("timings_ms") or {}
            split = ", ".join(f"{k} {v:.0f} ms" for k, v in timings.items())
            typer.echo(
                f"  result {result['result_id']} (job {result['job_id']}, generation "
                f"{result['generation']}): hemorrhage {decision}, certainty "
                f"{result['certainty']:.2f}"
                + (" [unchanged]" if result["unchanged"] else "")
                + (f"; {split}" if split else "")
            )
        for export in series.exports:
            typer.echo(
                f"  export {export['export_id']} to {export['destination']}: {export['state']}, "
                f"{export['attempts']} attempt(s)"
                + (f", last status {export['last_status']}" if export["last_status"] else "")
                + (f", {export['last_error']}" if export["last_error"] else "")
            )
    typer.echo("\nevents:")
    for item in story.events:
        typer.echo("  " + item.line())


@app.command()
def resend(
    export_ids: Annotated[
        list[int] | None, typer.Argument(help="Export ids (see status / audit show).")
    ] = None,
    all_dead: Annotated[bool, typer.Option("--all-dead", help="Every dead letter.")] = False,
    config: ConfigOption = None,
) -> None:
    """Queue exports to be sent again (attempts start from zero); a running node picks them up."""

    def run() -> int:
        from radnet_node.export import requeue_exports  # noqa: PLC0415

        if not export_ids and not all_dead:
            raise RadnetError("give EXPORT_ID(s) or --all-dead")
        settings = _node_settings(config)
        db = _open_db(settings)
        try:
            ids = requeue_exports(db, export_ids or (), all_dead=all_dead)
        finally:
            db.dispose()
        typer.echo(f"{len(ids)} export(s) queued again" + (f": {ids}" if ids else ""))
        return EXIT_OK

    _guard(run)


if __name__ == "__main__":
    app()
