"""The ``cryoves`` command line: thin wrappers over the library, one function per command.

Library errors (:class:`cryoves.errors.CryovesError`) become one line on stderr and exit code 2;
``cryoves --debug ...`` shows the full traceback instead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from cryoves import __version__
from cryoves.errors import CryovesError

log = logging.getLogger("cryoves")

_STATE = {"debug": False}


class _Group(TyperGroup):
    """Turns library errors into one line + exit code 2 (also under ``typer.testing.CliRunner``)."""

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except CryovesError as exc:
            if _STATE["debug"]:
                raise
            typer.echo(f"error: {_one_line(exc)}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - last resort: no traceback without --debug
            if _STATE["debug"] or isinstance(exc, _click_exceptions()):
                raise
            typer.echo(
                f"internal error: {type(exc).__name__}: {_one_line(exc)} (run 'cryoves --debug ...' "
                "for the traceback and please report it)",
                err=True,
            )
            raise typer.Exit(1) from None


def _click_exceptions() -> tuple[type[BaseException], ...]:
    import click

    return (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


app = typer.Typer(
    cls=_Group,
    name="cryoves",
    help="Find every synaptic vesicle in a cryo-electron tomogram, as exact spheres.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cryoves {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv: debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    _STATE["debug"] = debug
    level = logging.WARNING if quiet else (logging.INFO if verbose <= 1 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


# Commands are grouped by pipeline stage below; each is a thin wrapper over a library function.

VoxelSizeOpt = Annotated[
    Optional[float],
    typer.Option("--voxel-size", help="Voxel size in Å; overrides the file header."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing result.")]


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
