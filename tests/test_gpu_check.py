"""tools/gpu-check.sh runs end to end in its reduced CPU mode, so the GPU
check cannot rot between GPU sessions (slow: four CLI runs)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu-check.sh"), "--cpu-smoke", str(tmp_path / "gc")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gc" / "summary.json").read_text())
    assert summary["mode"] == "cpu"
    for name in ("eager", "compile"):
        run = summary["runs"][name]
        assert run["edits_per_s"] > 0 and 0 < run["unet_busy_fraction"] <= 1
        assert run["host_syncs_per_step"]["invert"] == run["host_syncs_per_step"]["edit"] == 0
        assert run["targets"]["no_host_sync_in_step_loop"] is True
    assert summary["runs"]["compile"]["channels_last"] is True
    assert summary["demo"]["wall_s"] > 0 and summary["edit-codes"]["wall_s"] > 0
    for name in ("eager", "compile"):  # the SDXL-shaped turbo-edit step (tiny in the smoke run)
        run = summary["sdxl_turbo"][name]
        assert run["turbo_edit_edits_per_s"] > 0 and run["edit_friendly_edits_per_s"] > 0 and run["nonfinite_edits"] == 0
        assert run["evals_per_edit"]["turbo-edit"] < run["evals_per_edit"]["edit-friendly"]
    flow = summary["flow"]  # the flow-shaped step (tiny-flux in the smoke run)
    assert flow["counts_match_closed_form"] and flow["recon_error_max"]["edit-friendly"] < 1e-4
    assert flow["flowedit"]["edits_per_s"] > 0 and flow["flowedit"]["flops_per_edit"] > 0
    assert flow["flowedit"]["nonfinite_edits"] == flow["edit-friendly"]["nonfinite_edits"] == 0
    assert "gpu-check: wrote" in proc.stdout
