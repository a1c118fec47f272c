"""What every `imprint` command prints when it stops on an error: one
`imprint: error: ...` line on stderr and a nonzero exit. A module of its own
so the command modules (cli, report, bench) share it without importing each
other."""

from __future__ import annotations

import typer


def die(msg: str, code: int = 2) -> None:
    typer.echo(f"imprint: error: {msg}", err=True)
    raise typer.Exit(code)
