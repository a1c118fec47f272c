"""turbo-edit through the pipeline: the shipped SDXL jobs, stored residual
codes and `edit-codes`, P2P control, and job validation.

The shipped jobs run with `model.id = "tiny-sdxl"` (MODEL below), the SDXL
adapter's random model; the P2P and stored-code unit tests use the SD-shaped
`tiny` model.
"""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import p2p
from pipeline.codes import CodeError, check_code_rows, row_to_code
from pipeline.executor import run_job
from pipeline.inversion import get_method
from pipeline.spec import SpecError, load_spec
from pipeline.store import OutputStore

MODEL = "tiny-sdxl"
TINY_SCORES = ["score.clip_model=imprint-tiny-clip", "score.clip_pretrained=none", "score.lpips_net=squeeze",
               "score.lpips_pretrained=false"]


def table(out, name):
    return OutputStore.open(str(out)).read_table(name).to_pylist()


# -- P2P over turbo-edit ----------------------------------------------------------


@pytest.fixture(scope="module")
def turbo(tiny):
    m = tiny
    torch.manual_seed(3)
    x0 = m.encode_images(torch.rand(1, 3, 64, 64) * 2 - 1)
    prompts = ["a red circle on a white background", "a yellow circle on a white background"]
    emb = m.encode_text(prompts)
    te = get_method("turbo-edit")
    code = te.invert(m.unet, m.scheduler, x0.repeat(2, 1, 1, 1), emb[:1], None,
                     generator=[torch.Generator().manual_seed(s) for s in (0, 1)])
    return m, prompts, emb, code, x0


def test_p2p_over_turbo_edit(turbo, counting):
    m, prompts, emb, code, x0 = turbo
    te = get_method("turbo-edit")
    # rows: seed 0 source, seed 1 source, seed 0 target, seed 1 target
    rows, text, source_of = [0, 1, 0, 1], [prompts[0], prompts[0], prompts[1], prompts[1]], [0, 1, 0, 1]
    cond = emb[[0, 0, 1, 1]]
    recon = torch.tensor([True, True, False, False])
    plain = te.edit(m.unet, m.scheduler, code[rows], cond, None, source=emb[:1], reconstruct=recon)
    off = p2p.edit(te, m.unet, m.scheduler, code[rows], cond, None, prompts=text, source_of=source_of,
                   tokenizer=m.tokenizer, config=p2p.P2PConfig(cross_until=0.0, self_until=0.0), source=emb[:1], cfg_scale=1.0)
    assert torch.allclose(off, plain, atol=1e-6)
    net = counting(m.unet)
    cfg = p2p.P2PConfig(cross_until=1.0, self_until=1.0, self_max_tokens=10_000)
    on = p2p.edit(te, net, m.scheduler, code[rows], cond, None, prompts=text, source_of=source_of,
                  tokenizer=m.tokenizer, config=cfg, source=emb[:1], cfg_scale=1.0)
    # one call per step on [4 rows with the source prompt; the 2 edit rows with the target]
    assert net.calls == 4 and net.rows == 4 * 6
    assert (on[:2] - x0).abs().max() < 1e-4  # the source rows reconstruct
    assert not torch.allclose(on[2:], plain[2:], atol=1e-4)  # the injected maps change the edits
    # each edit row draws its maps from the source prompt on its OWN edited latent: with the target
    # equal to the source, the injection is the identity and the rows are the plain edits
    same = p2p.edit(te, m.unet, m.scheduler, code[rows], emb[[0, 0, 0, 0]], None, prompts=[prompts[0]] * 4,
                    source_of=source_of, tokenizer=m.tokenizer, config=cfg, source=emb[:1], cfg_scale=1.0)
    ref = te.edit(m.unet, m.scheduler, code[rows], emb[[0, 0, 0, 0]], None, source=emb[:1], reconstruct=recon)
    # float rounding only (explicit attention vs SDPA): about 1.2e-4 with the unclamped x0 (the default), 3e-5
    # clamped; the injection itself moves these rows by about 0.25
    assert torch.allclose(same, ref, atol=5e-4)


# -- the shipped jobs ---------------------------------------------------------------


def _turbo_job(tmp_path, *extra):
    return load_spec("jobs/sdxl-turbo.toml", [f"model.id={MODEL}", "model.dtype=float32", "image.resolution=64",
                                              "run.executor=inline", "edit.seeds=2", "output.noise_dtype=float32",
                                              f'output.path="{tmp_path / "turbo"}"', *TINY_SCORES, *extra])


def test_sdxl_turbo_job_runs_reconstructs_and_its_codes_edit_again(tmp_path, monkeypatch):
    monkeypatch.setenv("IMPRINT_CACHE", str(tmp_path / "cache"))
    spec = _turbo_job(tmp_path, 'edit.control=["none", "p2p"]', 'edit.mode="refine"',
                      "output.image_format=png")
    assert spec.inversion.steps == 4 and spec.edit.params == {"w": 1.5}
    report = run_job(spec, progress=False)
    assert report.errors == 0 and report.images == 5
    src = table(tmp_path / "turbo", "sources")
    assert all(s["recon_error_max"] < 1e-3 for s in src)  # exact: no clipping on the reconstruction rows
    res = table(tmp_path / "turbo", "results")
    assert {r["method"] for r in res} == {"turbo-edit", "turbo-edit+p2p"} and len(res) == 5 * 2 * 2 * 2  # images x targets x seeds x controls
    plain = [r for r in res if r["method"] == "turbo-edit"]
    p = json.loads(plain[0]["params"])
    assert p["noise_shift"] == 200 and p["max_norm"] == 15.5 and p["clip_sample"] is False and p["edit"] == {"w": 1.5}
    by_key = {}
    for r in plain:
        by_key.setdefault((r["key"], r["target_prompt"]), []).append(r["image"]["bytes"])
    assert all(len(set(v)) == 2 for v in by_key.values())  # 2 seeds, 2 different edits
    noise = table(tmp_path / "turbo", "noise")
    assert len(noise) == 5 * 2 and {n["zs_kind"] for n in noise} == {"residual"} and noise[0]["zs_shape"][0] == 4

    # edit-codes: the stored residual codes give the same edits without inverting
    job = tmp_path / "recode.toml"
    job.write_text(
        '[input]\ntemplates = ["{source}, oil painting"]\n[model]\nid = "' + MODEL + '"\n[image]\nresolution = 64\n'
        '[inversion]\nmethod = "turbo-edit"\nsteps = 4\nskip = 0\ncfg_source = 1.0\n'
        '[edit]\ncfg_target = 1.0\nseeds = 2\n[edit.params]\nw = 1.5\n'
        f'[output]\npath = "{tmp_path / "again"}"\nimage_format = "png"\n'
        '[score]\nclip_model = "imprint-tiny-clip"\nclip_pretrained = "none"\nlpips_net = "squeeze"\nlpips_pretrained = false\n'
        '[run]\nexecutor = "inline"\n'
    )
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "edit-codes", str(tmp_path / "turbo"), str(job),
                          "--no-progress"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    again = {(r["key"], r["seed_index"], r["target_prompt"]): r for r in table(tmp_path / "again", "results")}
    first = {(r["key"], r["seed_index"], r["target_prompt"]): r for r in plain}
    # the stored samples carry no targets of their own: the template's edits are compared (those chains have
    # fewer rows than the first run's, so the UNet's float rounding may differ: equal up to 8-bit rounding)
    assert set(again) and set(again) <= set(first)
    for k, r in again.items():
        a, b = (np.asarray(Image.open(io.BytesIO(x["image"]["bytes"])), dtype=np.int16) for x in (first[k], r))
        assert np.abs(a - b).max() <= 1, k


def test_sdxl_job_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("IMPRINT_CACHE", str(tmp_path / "cache"))
    spec = load_spec("jobs/sdxl.toml", [f"model.id={MODEL}", "model.dtype=float32", "image.resolution=64",
                                        "inversion.steps=6", "inversion.skip=2", "edit.seeds=1", "run.executor=inline",
                                        f'output.path="{tmp_path / "sdxl"}"', *TINY_SCORES])
    assert spec.inversion.method == "edit-friendly" and spec.edit.cfg_target > 1
    report = run_job(spec, progress=False)
    assert report.errors == 0 and report.images == 5 and report.edits == 5 * 2  # 2 targets each
    assert all(s["recon_error_max"] < 1e-3 for s in table(tmp_path / "sdxl", "sources"))


# -- validation and stored codes --------------------------------------------------------


@pytest.mark.parametrize("sets,field", [
    (["inversion.cfg_source=3.5"], "inversion.cfg_source"),
    (["edit.cfg_target=7.5"], "edit.cfg_target"),
    (["inversion.params.max_norm=[1.0, 2.0]"], "inversion.params"),
    (["inversion.params.max_norm=-1"], "inversion.params.max_norm"),
    (["inversion.params.noise_levels=500"], "inversion.params.noise_levels"),
    (["inversion.params.noise_levels=[600, 700, 100, 0]"], "inversion.params"),
    (["inversion.params.timesteps=[800, 600.5, 400, 200]"], "inversion.params.timesteps"),
    (["inversion.params.noise_shift=1.5"], "inversion.params.noise_shift"),
    (["edit.params.eta=1.0"], "edit.params.eta"),
    (["manipulate.strokes=true"], "manipulate.strokes"),
])
def test_job_errors_name_the_field(sets, field, tmp_path):
    with pytest.raises(SpecError) as err:
        _turbo_job(tmp_path, *sets)
    assert str(err.value).startswith(field), str(err.value)


def test_explicit_per_step_params_validate(tmp_path):
    spec = _turbo_job(tmp_path, "inversion.params.max_norm=[0, 0, 20.0, 15.5]",
                      "inversion.params.noise_levels=[600, 400, 200, 0]", "inversion.params.timesteps=[799, 599, 399, 199]")
    assert spec.inversion.params["max_norm"] == [0, 0, 20.0, 15.5]


def test_stored_code_kind(turbo, tmp_path):
    from pipeline.codes import code_to_rows
    from pipeline.data import Sample

    m, prompts, emb, code, x0 = turbo
    sample = Sample(key="k", shard="s", image=torch.zeros(3, 64, 64), source_prompt=prompts[0], target_prompts=[])
    rows = code_to_rows(code, sample, [0, 1], m, "float32")
    assert rows[0]["zs_kind"] == "residual"
    check_code_rows(rows, m)
    back = row_to_code(rows[0])
    assert back.zs_kind == "residual" and torch.equal(back.zs[:, 0], code.zs[:, 0])
    # a row written before the column (no zs_kind) holds noise maps: a turbo-edit row without it is refused
    old = [{k: v for k, v in r.items() if k != "zs_kind"} for r in rows]
    assert row_to_code(old[0]).zs_kind == "noise"
    with pytest.raises(CodeError, match="zs_kind"):
        check_code_rows(old, m)
    with pytest.raises(CodeError, match="timesteps"):
        check_code_rows([{**r, "timesteps": [999, 749, 499, 249]} for r in rows], m)
