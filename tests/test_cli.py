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


def test_the_command_listing_wraps_evenly_at_any_width():
    """`imprint -h` at an ordinary terminal width: each command's entry wraps
    greedily (a line breaks only where the next word would not fit), not
    where its docstring's source broke."""
    for width in (80, 100, 120):
        res = CliRunner().invoke(app, ["-h"], env={"COLUMNS": str(width), "TERMINAL_WIDTH": str(width)},
                                 prog_name="imprint")
        rows = [line for line in res.output.splitlines() if line.startswith("│")]
        panel = rows[rows.index(next(r for r in rows if r.split()[1:2] == ["run"])):]
        indent = len(panel[0]) - len(panel[0][panel[0].index("run") + 3:].lstrip())
        width_text = len(panel[0]) - 2 - indent  # text room inside the panel
        for prev, line in zip(panel, panel[1:]):
            if line[1:indent].strip():  # a new command's first line
                continue
            first_word = line[indent:].split()[0]
            used = len(prev[indent:].rstrip(" │"))
            assert used + 1 + len(first_word) > width_text - 1, (width, prev, line)


def test_run_on_a_folder_points_to_imprint_shards(tmp_path):
    (tmp_path / "photos").mkdir()
    res = CliRunner().invoke(app, ["run", str(tmp_path / "photos")])
    assert res.exit_code == 2 and "is a folder, not a job file" in res.output and "imprint shards" in res.output, res.output
    assert "file not found" not in res.output


def test_a_table_in_input_shards_names_the_table_in_the_hint():
    from pipeline.data import check_is_shard_name

    with pytest.raises(ValueError, match=r"`imprint shards data/captions\.csv SHARDS_FOLDER`"):
        check_is_shard_name("data/captions.csv")
    with pytest.raises(ValueError, match=r"`imprint shards \./captions\.csv SHARDS_FOLDER`|`imprint shards captions\.csv SHARDS_FOLDER`"):
        check_is_shard_name("captions.csv")
    with pytest.raises(ValueError, match=r"`imprint shards photos SHARDS_FOLDER`"):
        check_is_shard_name("photos/*.png")
