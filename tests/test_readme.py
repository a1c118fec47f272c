"""The README's Python example runs as written (a shorter schedule keeps it fast)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_api_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(b for b in blocks if "ef.invert" in b)
    example = example.replace("num_steps=100, skip=36", "num_steps=8, skip=3")
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert scope["images"].shape == (6, 3, 128, 128)


def test_readme_shows_exactly_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up: two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    cmds = [line.split("#")[0].strip() for line in setup.strip().splitlines()]
    assert cmds == ["make demo", "make test"]


def test_readme_reading_and_export_examples_run(tmp_path):
    """The Output section's reading examples, on a small real output."""
    import subprocess
    import sys

    from PIL import Image

    from helpers_data import write
    from pipeline.executor import run_job
    from pipeline.spec import load_spec
    from test_outputs import raw_job, samples

    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    reading = next(b for b in blocks if "pipeline.read_table" in b)
    exporting = next(b for b in blocks if "wds.WebDataset" in b)
    out = tmp_path / "out" / "demo"
    shard = write(tmp_path / "in-000.tar", samples("r", 2))
    run_job(load_spec(raw=raw_job(out, [shard], output={"image_format": "webp"})), progress=False)

    scope: dict = {}
    exec(compile(reading.replace('"out/demo"', repr(str(out))), "README.md", "exec"), scope)
    assert len(scope["edits"]) == len(scope["committed"]) == 6 and len(scope["sources"]) == 2
    assert isinstance(scope["first_edit"], Image.Image)

    dest = tmp_path / "exports" / "demo"
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(out), str(dest)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    scope = {}
    exec(compile(exporting.replace('"exports/demo/*.tar"', repr(f"{dest}/*.tar")), "README.md", "exec"), scope)
    assert isinstance(scope["edit"], Image.Image) and scope["edit"].size == scope["source"].size
    assert scope["info"]["target_prompt"]
