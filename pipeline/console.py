"""What every `imprint` command prints when it stops on an error: one
`imprint: error: ...` line on stderr and a nonzero exit. A module of its own
so the command modules (cli, report, bench) share it without importing each
other."""

from __future__ import annotations

import os

import typer


def die(msg: str, code: int = 2) -> None:
    typer.echo(f"imprint: error: {msg}", err=True)
    raise typer.Exit(code)


_PROGRESS_QUIETED = False  # whether quiet_libraries, not the user, turned the hub's progress bars off


def show_download_progress() -> None:
    """The hub's progress bars back on, for a command whose point is a
    download (`imprint pull`), unless the user turned them off."""
    if not _PROGRESS_QUIETED:
        return
    os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()


def quiet_libraries() -> None:
    """No weight-loading progress bars in `imprint` commands and their
    workers: the libraries' own switches (Hugging Face hub, transformers and
    diffusers), plus the environment variable, which a local Ray cluster's
    workers inherit before they import anything. A user's explicit setting
    of the variable wins."""
    global _PROGRESS_QUIETED
    _PROGRESS_QUIETED = _PROGRESS_QUIETED or "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"].upper() not in ("1", "ON", "YES", "TRUE"):
        return
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - a dependency
        pass
    import sys

    # transformers and diffusers read their switch once: set it only when they are loaded (importing them costs seconds)
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
