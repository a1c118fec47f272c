"""Long runs kept out of `make test` (run them with `make test-slow`)."""

import pytest

from pipeline.executor import run_job
from pipeline.spec import load_spec
from pipeline.store import OutputStore


@pytest.mark.slow
def test_compare_methods_job_as_shipped(tmp_path):
    """jobs/compare-methods.toml end to end: the five methods it names (every
    method but turbo-edit, which is for few-step distilled models) on the same
    inputs in one table, and a report that compares them."""
    from pipeline.report import build_report

    spec = load_spec("jobs/compare-methods.toml", ["run.executor=inline", f'output.path="{tmp_path / "out"}"'])
    report = run_job(spec, progress=False)
    assert report.done == 1 and not report.failed
    res = OutputStore.open(str(tmp_path / "out")).read_table("results").to_pylist()
    methods = spec.inversion.methods
    assert sorted(methods) == ["cycle", "ddim", "ddim-forward", "edict", "edit-friendly"]
    by_method = {m: [r for r in res if r["method"] == m] for m in methods}
    # images x targets x seeds; deterministic inversions give one code per image, so one edit per (image, target)
    assert {m: len(rows) for m, rows in by_method.items()} == {
        m: 8 * 2 * (1 if m in ("ddim", "edict") else 2) for m in methods}
    assert all(r["seed_index"] == 0 and not r["diversity"] == r["diversity"] for m in ("ddim", "edict") for r in by_method[m])
    assert all(r["diversity"] > 0 for m in ("edit-friendly", "cycle", "ddim-forward") for r in by_method[m])
    html = build_report([str(tmp_path / "out")])
    assert all(m in html for m in methods) and 'id="scatter"' in html
