"""Methods, stored codes and noise-space manipulations through the batch
pipeline (issues 5 and 6 on the pipeline side)."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_data import good_samples, image_bytes, write
from pipeline.codes import check_compatible, row_to_code
from pipeline.executor import run_job
from pipeline.inversion import get_method, method_names
from pipeline.spec import SpecError, load_spec
from pipeline.store import OutputStore

TINY_SCORES = {"clip_model": "imprint-tiny-clip", "clip_pretrained": "none", "lpips_net": "squeeze", "lpips_pretrained": False}


def spec_for(tmp_path, shards, out="out", **sections):
    raw = {
        "input": {"shards": [str(s) for s in shards], "templates": ["{source}, in the snow"]},
        "inversion": {"steps": 5, "skip": 1},
        "edit": {"seeds": 2},
        "output": {"path": str(tmp_path / out), "noise": True, "image_format": "png"},
        "score": TINY_SCORES,
        "run": {"executor": "inline", "threads": 2},
    }
    for sec, vals in sections.items():
        raw.setdefault(sec, {}).update(vals)
    return load_spec(raw=raw)


def table(out, name):
    return OutputStore.open(str(out)).read_table(name).to_pylist()


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    samples = good_samples("s", 3)
    for s in samples:  # caption only: targets come from the job's templates
        s.pop("json", None)
        s["txt"] = f"a picture of {s['__key__']}"
    return write(d / "p-000.tar", samples)


def test_all_methods_in_one_job_one_table(shard, tmp_path):
    spec = spec_for(tmp_path, [shard], inversion={"method": method_names("sd"), "per_method": {
        "ddim": {"cfg_target": 7.5}, "turbo-edit": {"cfg_source": 1.0, "cfg_target": 1.0}}})
    report = run_job(spec, progress=False)
    assert report.done == 1 and not report.failed
    res = table(tmp_path / "out", "results")
    by_method = {}
    for r in res:
        by_method.setdefault(r["method"], []).append(r)
    assert set(by_method) == set(method_names("sd"))
    for m, rows in by_method.items():
        # images x targets x seeds; deterministic methods: one row per (image, target) whatever edit.seeds
        assert len(rows) == 3 * 1 * (1 if get_method(m).SEED_INDEPENDENT else 2)
        p = json.loads(rows[0]["params"])
        assert p["method"] == m and p["num_steps"] == 5
    assert json.loads(by_method["ddim"][0]["params"])["cfg_target"] == 7.5
    assert json.loads(by_method["edict"][0]["params"])["mix"] == 0.93
    assert json.loads(by_method["cycle"][0]["params"])["eta"] == 0.1
    src = table(tmp_path / "out", "sources")
    errs = json.loads(src[0]["recon_errors"])
    assert set(errs) == set(method_names("sd"))
    assert errs["edit-friendly"] < 1e-4 and errs["edict"] < 1e-4 and errs["cycle"] < 1e-4 and errs["turbo-edit"] < 1e-4
    # diversity is computed within (image, method, target) groups
    assert all(r["diversity"] == r["diversity"] for r in by_method["edit-friendly"])


@pytest.mark.parametrize("method", ["ddim", "edict", "ddim-forward", "cycle"])
def test_demo_job_runs_each_method(method, tmp_path, monkeypatch):
    monkeypatch.setenv("IMPRINT_CACHE", str(tmp_path / "cache"))
    spec = load_spec("jobs/demo.toml", ["model.id=tiny", 'input.shards=["demo"]', 'input.templates=["{source}, oil painting"]',
                                        f"inversion.method={method}", "inversion.steps=4", "inversion.skip=1",
                                        "edit.seeds=1", "run.executor=inline", f'output.path="{tmp_path / "o"}"',
                                        "score.lpips_net=squeeze"])
    report = run_job(spec, progress=False)
    assert report.done == 2 and report.images == 5 and report.errors == 0
    res = table(tmp_path / "o", "results")
    assert {r["method"] for r in res} == {method} and len(res) == report.edits == 10


def test_edit_codes_equal_editing_right_after_inversion(shard, tmp_path):
    first = spec_for(tmp_path, [shard], "first", batch={"images": 1}, output={"noise_dtype": "float32"})
    run_job(first, progress=False)
    noise = table(tmp_path / "first", "noise")
    assert len(noise) == 3 * 2 and noise[0]["zs_shape"][0] == 4  # minimal: steps - skip maps
    job = tmp_path / "recode.toml"
    job.write_text(
        '[input]\ntemplates = ["{source}, in the snow"]\n[edit]\nseeds = 2\n[batch]\nimages = 1\n'
        f'[output]\npath = "{tmp_path / "again"}"\nimage_format = "png"\n'
        '[score]\nclip_model = "imprint-tiny-clip"\nclip_pretrained = "none"\nlpips_net = "squeeze"\nlpips_pretrained = false\n'
        '[run]\nexecutor = "inline"\nthreads = 2\n'
    )
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "edit-codes", str(tmp_path / "first"), str(job), "--no-progress"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    a = {(r["key"], r["seed_index"]): r for r in table(tmp_path / "first", "results")}
    b = {(r["key"], r["seed_index"]): r for r in table(tmp_path / "again", "results")}
    assert set(a) == set(b)
    for k in a:
        assert a[k]["image"]["bytes"] == b[k]["image"]["bytes"], k  # same bytes
        assert b[k]["seed"] == a[k]["seed"] and json.loads(b[k]["params"])["from_codes"]
    # float16 codes (the default) still edit, up to rounding
    assert noise[0]["dtype"] == "float32"


def test_stored_code_with_other_model_or_schedule_is_refused(shard, tmp_path, tiny):
    run_job(spec_for(tmp_path, [shard]), progress=False)
    row = table(tmp_path / "out", "noise")[0]
    check_compatible(row, tiny)
    with pytest.raises(ValueError, match="made with model 'sd-x'"):
        check_compatible({**row, "model_id": "sd-x"}, tiny)
    sched = json.loads(row["scheduler_config"]) | {"steps_offset": 0}
    with pytest.raises(ValueError, match="differs in steps_offset"):
        check_compatible({**row, "scheduler_config": json.dumps(sched)}, tiny)
    code = row_to_code(row)
    assert code.zs.shape == (4, 1, 4, 16, 16) and code.method == "edit-friendly"


def test_storage_cost_of_a_code_at_paper_defaults():
    # 4x64x64 latents, 100 steps, skip 36: x_start + 64 maps in float16
    from pipeline.codes import _pack

    zs_bytes, shape = _pack(torch.zeros(64, 4, 64, 64), "float16")
    xs_bytes, _ = _pack(torch.zeros(4, 64, 64), "float16")
    # 64 maps x 16384 values x 2 bytes = 2 MiB, plus 32 KiB for x_start
    assert shape == [64, 4, 64, 64] and len(zs_bytes) + len(xs_bytes) == 2_129_920


def test_shift_and_flip_from_the_job(shard, tmp_path):
    from pipeline import noise_space

    run_job(spec_for(tmp_path, [shard], "plain"), progress=False)
    run_job(spec_for(tmp_path, [shard], "moved", manipulate={"shift_x": 3, "flip": "vertical"}), progress=False)
    plain = {(r["key"], r["seed_index"]): row_to_code(r) for r in table(tmp_path / "plain", "noise")}
    moved = {(r["key"], r["seed_index"]): row_to_code(r) for r in table(tmp_path / "moved", "noise")}
    for k, code in plain.items():
        expect = noise_space.flip(noise_space.shift(code, dx=3), horizontal=False)
        torch.testing.assert_close(moved[k].zs, expect.zs, atol=1e-3, rtol=0)
        torch.testing.assert_close(moved[k].x_start, expect.x_start, atol=1e-3, rtol=0)


def _png(color, size=(96, 80)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_color_strokes_per_sample_and_missing_inputs(tmp_path):
    mask = np.zeros((80, 96, 3), np.uint8)
    mask[20:60, 30:70] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    samples = [
        {"__key__": "with", "png": image_bytes(), "txt": "a wall", "mask.png": buf.getvalue(), "stroke.png": _png((255, 0, 0))},
        {"__key__": "without", "png": image_bytes(), "txt": "a wall"},
    ]
    shard = write(tmp_path / "st-000.tar", samples)
    spec = spec_for(tmp_path, [shard], manipulate={"strokes": True, "strokes_strength": 0.5}, inversion={"steps": 10, "skip": 2})
    run_job(spec, progress=False)
    src = {r["key"]: r for r in table(tmp_path / "out", "sources")}
    assert src["with"]["status"] == "ok" and src["with"]["recon_error_max"] < 1e-4  # recon rows are not stroked
    assert src["without"]["status"] == "error" and "mask.png" in src["without"]["error"]
    assert len(table(tmp_path / "out", "results")) == 2


def test_strokes_need_noise_maps(shard, tmp_path):
    with pytest.raises(SpecError, match="^manipulate.strokes: .*'ddim'"):
        spec_for(tmp_path, [shard], manipulate={"strokes": True}, inversion={"method": "ddim"})
    with pytest.raises(SpecError, match="^inversion.params: with several methods"):
        spec_for(tmp_path, [shard], inversion={"method": ["ddim", "edict"], "params": {"mix": 0.9}})
    with pytest.raises(SpecError, match="^inversion.per_method.cycle"):
        spec_for(tmp_path, [shard], inversion={"method": ["ddim"], "per_method": {"cycle": {"skip": 1}}})


def test_inspect_noise_cli(shard, tmp_path):
    run_job(spec_for(tmp_path, [shard], inversion={"steps": 12, "skip": 2}), progress=False)
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect-noise", str(tmp_path / "out"), "--out", str(tmp_path / "st")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    stats = json.loads((tmp_path / "st" / "noise_stats.json").read_text())
    ef = stats["edit-friendly 16x16"]
    assert ef["std_mean"] > 1 and ef["corr_mean"] < 0
    assert abs(stats["native 16x16"]["std_mean"] - 1) < 0.05
    assert (tmp_path / "st" / "noise_stats.png").read_bytes().startswith(b"\x89PNG")


def test_job_level_stroke_files_serve_samples_without_their_own(tmp_path):
    from pipeline.data import Sample
    from pipeline.engine import stroke_inputs

    (tmp_path / "m.png").write_bytes(_png((255, 255, 255)))
    (tmp_path / "c.png").write_bytes(_png((0, 0, 255)))
    spec = spec_for(tmp_path, ["x.tar"], manipulate={"strokes": True, "strokes_mask": str(tmp_path / "m.png"),
                                                      "strokes_image": str(tmp_path / "c.png")})
    assert stroke_inputs(Sample("k", "x.tar"), spec) == (_png((255, 255, 255)), _png((0, 0, 255)))
    own = Sample("k", "x.tar", extras={"mask.jpg": b"M", "stroke.webp": b"S"})
    assert stroke_inputs(own, spec) == (b"M", b"S")  # the sample's own entries win
    with pytest.raises(SpecError, match="^manipulate.strokes_mask: file not found"):
        spec_for(tmp_path, ["x.tar"], manipulate={"strokes": True, "strokes_mask": "nope.png", "strokes_image": str(tmp_path / "c.png")})


def test_edit_codes_resolved_spec_does_not_claim_the_jobs_steps_and_skip(tmp_path):
    """job.resolved.toml of an edit-codes job leaves out the inversion
    settings the stored codes bring (the rows carry the codes' own), and says
    so; a normal job writes them."""
    import tomllib

    from pipeline.spec import load_spec, to_toml

    raw = {"input": {"codes": str(tmp_path)}, "inversion": {"steps": 50, "skip": 12}, "output": {"path": str(tmp_path / "o")}}
    text = to_toml(load_spec(raw=raw))
    assert text.startswith("# edit-codes:") and "each stored code's own" in text
    parsed = tomllib.loads(text)
    assert not {"method", "steps", "skip", "cfg_source"} & set(parsed.get("inversion", {}))
    plain = tomllib.loads(to_toml(load_spec(raw={"input": {"shards": ["demo"]}, "inversion": {"steps": 50, "skip": 12},
                                                 "output": {"path": str(tmp_path / "o")}})))
    assert plain["inversion"]["steps"] == 50 and plain["inversion"]["skip"] == 12
