"""Command-line conventions: -h everywhere, --version, bare `imprint` is help
(exit 0), help text reflowed (no line breaks inside a sentence), and the
switches that keep library noise out of a run."""

import os
import re
import subprocess
import sys

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from pipeline import __version__
from pipeline.cli import app

WIDE = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}


def _commands() -> list[str]:
    return sorted(get_command(app).commands)


def _help(args) -> str:
    res = CliRunner().invoke(app, args, env=WIDE, prog_name="imprint")
    assert res.exit_code == 0, res.output
    return res.output


def test_bare_imprint_prints_help_and_exits_0():
    res = subprocess.run([sys.executable, "-m", "pipeline.cli"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "Usage" in res.stdout and all(c in res.stdout for c in ("run", "export", "validate"))


def test_version():
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == f"imprint {__version__}"


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_flags_on_the_app(flag):
    assert "Usage" in _help([flag])


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_h_and_help_without_hard_line_breaks(command):
    out = _help([command, "-h"])
    assert out == _help([command, "--help"])
    assert f"imprint {command}" in out
    doc = get_command(app).commands[command].help or ""
    first = " ".join(doc.split("\n\n")[0].split())  # the docstring's first paragraph as one line
    lines = [" ".join(line.strip(" │").split()) for line in out.splitlines()]
    assert first and first in lines, (first, out)  # shown whole on one line, not broken where the source broke it


def test_quiet_libraries_sets_the_switches(monkeypatch):
    from pipeline.console import quiet_libraries

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    import transformers.utils.logging as tl
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    try:
        quiet_libraries()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert are_progress_bars_disabled() and not tl.is_progress_bar_enabled()
    finally:
        os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        enable_progress_bars()
        tl.enable_progress_bar()


def test_accelerate_is_installed_so_diffusers_loads_without_its_warning():
    """diffusers warns on every model load without accelerate (and then loads
    a second full copy of the weights); it is a dependency."""
    import importlib.util

    assert importlib.util.find_spec("accelerate") is not None, "pip install accelerate (pyproject dependency)"
    assert any(re.match(r"accelerate\b", d) for d in _dependencies())


def _dependencies() -> list[str]:
    import tomllib
    from pathlib import Path

    return tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
