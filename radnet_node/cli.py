"""The ``radnet-node`` command line: the composition root that wires config, engine and use cases.

Errors become one line on stderr and an exit code, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from radnet_node.config import Settings, load_settings
from radnet_node.engine import Engine
from radnet_node.errors import ConfigError, RadnetError
from radnet_node.infer import SeriesDone, SeriesFailed, infer_paths

__all__ = ["EXIT_FAILED", "EXIT_INTERNAL", "EXIT_NOTHING_TO_DO", "EXIT_OK", "EXIT_USAGE", "app"]

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


def _settings(config: Path | None, weights: str | None, device: str | None) -> Settings:
    settings = load_settings(config)
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
        Path | None, typer.Option(help="TOML configuration ([model], [series]).")
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
    except RadnetError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    except Exception as exc:  # noqa: BLE001 - the CLI promises one line, not a traceback
        raise _fail(f"internal error (a bug): {type(exc).__name__}: {exc}", EXIT_INTERNAL) from None
    raise typer.Exit(code)


def _infer(
    paths: list[Path], out: Path, weights: str | None, device: str | None, config: Path | None
) -> int:
    settings = _settings(config, weights, device)
    engine = Engine(settings.engine_settings())
    runtime = engine.describe()
    typer.echo(
        f"model {engine.model_info.name} {engine.model_info.version} ({engine.model_info.variant}) "
        f"on {runtime['device']} {runtime['precision']}; threshold {engine.threshold}, "
        f">= {engine.min_consecutive} consecutive slices"
    )
    done = failed = unreadable = skipped = 0
    for event in infer_paths(paths, out, engine):
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
        typer.echo(
            f"radnet-node: error: {failed} eligible series failed and {unreadable} DICOM file(s) "
            "could not be read (see the FAILED / ERROR lines)",
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


if __name__ == "__main__":
    app()
