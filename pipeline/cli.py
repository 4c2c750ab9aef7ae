"""The `pipeline` command. It parses, calls one function and maps errors to exit codes."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from pipeline.config import Settings, load_settings
from pipeline.errors import PipelineError

app = typer.Typer(
    help="Run Claude tasks from Redis Streams: nothing lost, nothing paid twice.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)

ConfigOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional on 3.11
    typer.Option(
        "--config",
        "-c",
        help="TOML config file (else $PIPELINE_CONFIG).",
        envvar="PIPELINE_CONFIG",
        show_envvar=False,
    ),
]


def _settings(config: Path | None) -> Settings:
    return load_settings(config)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run(coro: object) -> None:
    try:
        import uvloop  # optional: faster event loop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


@app.callback()
def _root() -> None:
    """Run Claude tasks from Redis Streams: nothing lost, nothing paid twice."""


@app.command()
def worker(
    stage: Annotated[
        list[str],
        typer.Option(
            "--stage",
            "-s",
            help="Stage to run (repeatable): cache-check, router, claude-call, store.",
        ),
    ] = [],  # noqa: B006
    all_stages: Annotated[bool, typer.Option("--all", help="Run every stage.")] = False,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency", "-n", min=1, help="Entries in flight per stage (default from config)."
        ),
    ] = None,
    consumer: Annotated[
        str | None,
        typer.Option(help="Stable consumer name (default: <hostname>-<n>, the lowest free n)."),
    ] = None,
    app_spec: Annotated[
        str, typer.Option("--app", help="module:attribute of the App to run.")
    ] = "stages:app",
    config: ConfigOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run stage workers until SIGTERM/SIGINT (then finish or hand back in-flight work)."""
    from pipeline.worker import load_app, run_worker

    _logging(verbose)
    settings = _settings(config)
    the_app = load_app(app_spec)
    names = [s.name for s in the_app.stages] if all_stages else stage
    if not names:
        raise typer.BadParameter("give --stage NAME (repeatable) or --all")
    for name in names:
        the_app.stage(name)
    _run(run_worker(the_app, names, settings, concurrency=concurrency, consumer=consumer))


def main() -> None:
    """Entry point: one clear line for expected errors, not a traceback."""
    try:
        app()
    except PipelineError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise SystemExit(2) from None
    except KeyError as exc:
        err.print(f"[bold red]error:[/] {exc.args[0]}")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
