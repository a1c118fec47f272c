"""The README's Python and output examples run as written (shorter schedules keep them fast)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_api_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(b for b in blocks if "ef.invert" in b)
    example = example.replace("num_steps=100, skip=36", "num_steps=8, skip=3")
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert scope["images"].shape == (6, 3, 128, 128)


def test_readme_editor_example_runs(tmp_path, monkeypatch):
    """The Python section's first example (the PIL-level Editor), on a short schedule."""
    from PIL import Image

    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(b for b in blocks if "Editor.from_pretrained" in b)
    assert text.index(example) < text.index("ef.invert")  # the Python section starts with it
    example = example.replace("steps=100, skip=36", "steps=8, skip=3").replace("seeds=3)", "seeds=3, steps=8, skip=3)")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert len(scope["codes"]) == 3 and len(scope["edits"]) == 3
    assert all(isinstance(e, Image.Image) and e.size == (64, 64) for e in scope["edits"])
    assert Image.open(tmp_path / "blue-seed0.png").size == (64, 64)


def test_readme_shows_exactly_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up: two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cmds = [line.split("#")[0].strip() for line in setup.strip().splitlines()]
    assert cmds == ["make demo", "make test"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`make demo`'s job (jobs/demo.toml, its two built-in shards, PNG) through
    the command line and a local Ray cluster, on a 4-step schedule; returns
    the output and the command's output (stdout + stderr)."""
    import os
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("demo") / "out" / "demo"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "jobs" / "demo.toml"),
                          "--set", "inversion.steps=4", "--set", "inversion.skip=1", "--set", f'output.path="{out}"',
                          "--no-progress"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stdout + res.stderr


def test_a_run_prints_no_library_noise(demo_run):
    """No Ray token-auth warning, no weight-loading bars, no accelerate warning
    from the workers: only imprint's own lines."""
    _, printed = demo_run
    for noise in ("Token authentication", "Loading weights", "accelerate", "it/s]"):
        assert noise not in printed, printed[-3000:]
    assert "imprint: results in" in printed


def test_readme_reading_and_export_examples_run(demo_run, tmp_path):
    """Every Python snippet of the Output section (reading, WebDataset export,
    imagefolder export) on the demo's own output."""
    import subprocess
    import sys

    from PIL import Image

    import pipeline

    out, _ = demo_run
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    reading = next(b for b in blocks if "pipeline.read_table" in b)
    exporting = next(b for b in blocks if "wds.WebDataset" in b)
    folder = next(b for b in blocks if '"imagefolder"' in b)
    n_results, n_sources = (pipeline.read_table(str(out), t).num_rows for t in ("results", "sources"))
    assert n_results > 0 and n_sources > 0

    scope: dict = {}
    exec(compile(reading.replace('"out/demo"', repr(str(out))), "README.md", "exec"), scope)
    assert len(scope["edits"]) == len(scope["committed"]) == n_results and len(scope["sources"]) == n_sources
    assert isinstance(scope["first_edit"], Image.Image)

    for fmt, dest in (("webdataset", tmp_path / "exports" / "demo"), ("files", tmp_path / "exports" / "demo-files")):
        res = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(out), str(dest), "--format", fmt],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    scope = {}
    exec(compile(exporting.replace('"exports/demo/*.tar"', repr(f"{tmp_path}/exports/demo/*.tar")), "README.md", "exec"), scope)
    assert isinstance(scope["edit"], Image.Image) and scope["edit"].size == scope["source"].size
    assert scope["info"]["target_prompt"]
    scope = {}
    exec(compile(folder.replace('"exports/demo-files"', repr(f"{tmp_path}/exports/demo-files")), "README.md", "exec"), scope)
    row = scope["row"]
    assert isinstance(row["image"], Image.Image) and row["image"].size == row["source"].size
    assert row["target_prompt"] and row["source_prompt"] and row["method"] == "edit-friendly" and isinstance(row["seed"], int)
    assert len(scope["pairs"]) == pipeline.read_table(str(out), "results").to_pandas()["kept"].sum()


def test_readme_own_data_commands_edit_every_captioned_image(tmp_path, monkeypatch):
    """Issue 33: the "Your own data" commands for a folder of photos, run as
    written from a fresh working directory with its relative paths (photos/,
    shards/photos/, jobs/photos.toml, out/photos), on the tiny model with
    random scorers, inline and on a short schedule: every captioned image
    gets its edits, and validate says how many samples have targets."""
    import shlex
    import shutil

    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from helpers_data import image_bytes
    from pipeline.cli import app

    text = (ROOT / "README.md").read_text()
    own = text.split("### Your own data", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cmds = [shlex.split(line.split(" #")[0]) for line in own.splitlines()
            if line.startswith("imprint ") and "photos" in line]
    assert [c[1] for c in cmds] == ["shards", "validate", "run"], cmds
    (tmp_path / "photos").mkdir()
    for i, name in enumerate(("cat", "dog")):
        (tmp_path / "photos" / f"{name}.jpg").write_bytes(image_bytes("RGB", (80, 64), "JPEG", seed=i))
        (tmp_path / "photos" / f"{name}.txt").write_text(f"a photo of a {name}")
    (tmp_path / "photos" / "nocaption.png").write_bytes(image_bytes(seed=9))
    (tmp_path / "jobs").mkdir()
    shutil.copy(ROOT / "jobs" / "photos.toml", tmp_path / "jobs" / "photos.toml")
    tiny = ["--set", "model.id=tiny", "--set", "score.clip_model=toy-clip", "--set", "score.clip_pretrained=random",
            "--set", "score.lpips_pretrained=false", "--set", "inversion.steps=3", "--set", "inversion.skip=1", "--set", "edit.seeds=1"]
    extra = {"shards": ["--no-progress"], "validate": tiny, "run": tiny + ["--executor", "inline", "--no-progress"]}
    outputs = {}
    monkeypatch.chdir(tmp_path)
    for cmd in cmds:
        res = CliRunner().invoke(app, [*cmd[1:], *extra[cmd[1]]])
        assert res.exit_code == 0, (cmd, res.output)
        outputs[cmd[1]] = res.output
    assert "skipped 1: template_field 1" in outputs["shards"], outputs["shards"]
    assert "# first shard: 2 of 2 sample(s) will have target prompts" in outputs["validate"], outputs["validate"]
    assert "0 bad samples" in outputs["run"], outputs["run"]
    rows = pq.read_table(tmp_path / "out" / "photos" / "results").to_pylist()
    assert {(r["key"], r["target_prompt"]) for r in rows} == {
        (n, f"a photo of a {n}, in the snow") for n in ("cat", "dog")}
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert all(r["clip_text"] is not None and r["lpips"] is not None for r in rows)  # scored (random weights)
