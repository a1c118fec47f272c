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
