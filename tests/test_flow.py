"""Rectified-flow models (SD3 / FLUX): the stochastic flow step's algebra,
the exact edit-friendly flow inversion, FlowEdit against the reference's
update, and the FLUX packing. On the tiny random models built offline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.inversion import flow_edit_friendly as efflow
from pipeline.inversion import flowedit
from pipeline.inversion.flow import FlowSchedule, calculate_shift, flow_sample, predict_eps, predict_x0, step_mean
from pipeline.models import load_models
from pipeline.models.flow import FLUX_SCHEDULER, SD3_SCHEDULER, image_ids, pack, unpack

MODELS = ["tiny-sd3", "tiny-flux"]


@pytest.fixture(scope="module", params=MODELS)
def flow_models(request):
    return load_models(request.param, device="cpu")


def _latents(models, b=2, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, 3, h, w, generator=g) * 2 - 1
    return models.encode_images(img)


def _gens(n, base=0):
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


# -- the step's algebra ------------------------------------------------------


def test_x0_and_eps_from_velocity_are_the_endpoints():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    for sigma in (0.0, 0.3, 0.77, 1.0):
        x = flow_sample(x0, sigma, eps)
        v = eps - x0
        assert torch.allclose(predict_x0(x, v, sigma), x0, atol=1e-12)
        assert torch.allclose(predict_eps(x, v, sigma), eps, atol=1e-12)
        # eta = 0: the stochastic step is the Euler step
        assert torch.allclose(step_mean(x, v, sigma, sigma * 0.5, 0.0), x + (sigma * 0.5 - sigma) * v, atol=1e-12)


@pytest.mark.parametrize("sigma,sigma_next", [(0.9, 0.7), (0.5, 0.48), (0.2, 0.05)])
def test_eta_one_is_the_posterior_of_the_flow_noising_process(sigma, sigma_next):
    """The posterior variance against Bayes' rule for two Gaussians: from
    x_sigma' = a' x0 + sigma' e1 and x_sigma = (a/a') x_sigma' + sqrt(sigma^2 -
    (a/a')^2 sigma'^2) e2, q(x_sigma' | x_sigma, x0) has precision
    1/sigma'^2 + (a/a')^2 / (sigma^2 - (a/a')^2 sigma'^2)."""
    sched = FlowSchedule(torch.tensor([sigma, sigma_next, 0.0], dtype=torch.float64))
    a, a_n = 1 - sigma, 1 - sigma_next
    k = a / a_n
    trans = sigma**2 - k**2 * sigma_next**2
    var_bayes = 1.0 / (1.0 / sigma_next**2 + k**2 / trans)
    assert sched.posterior_std(0, 1.0) == pytest.approx(math.sqrt(var_bayes), rel=1e-12)
    assert sched.posterior_std(0, 0.5) == pytest.approx(0.5 * math.sqrt(var_bayes), rel=1e-12)
    assert sched.posterior_std(1, 1.0) == 0.0  # the last step lands on sigma' = 0


def test_every_eta_keeps_the_marginal():
    """x' = a' x0 + sqrt(sigma'^2 - s^2) eps + s z has noise variance sigma'^2 for any s (checked on 200k draws)."""
    g = torch.Generator().manual_seed(3)
    sched = FlowSchedule(torch.tensor([0.8, 0.6, 0.0], dtype=torch.float64))
    eps, z = torch.randn(200_000, generator=g, dtype=torch.float64), torch.randn(200_000, generator=g, dtype=torch.float64)
    for eta in (0.0, 0.5, 1.0):
        s = sched.posterior_std(0, eta)
        noise = math.sqrt(0.6**2 - s * s) * eps + s * z
        assert float(noise.std()) == pytest.approx(0.6, rel=0.01)


def _perfect_net(x0):
    """The exact velocity of a one-point data distribution at x0: v = (x - x0) / sigma."""

    def net(x, sigma, tokens, added_cond_kwargs=None):
        s = sigma.view(-1, 1, 1, 1) if sigma.dim() else sigma
        return (x - x0.repeat(x.shape[0] // x0.shape[0], 1, 1, 1)) / s

    return net


def test_codes_of_a_forward_markov_chain_are_standard_normal_under_a_perfect_model():
    """With a perfect model, the eta = 1 step IS the posterior of the flow's
    noising process: inverting a path of that Markov process recovers iid
    N(0, 1) maps. Edit-friendly's independent draws give maps of larger
    variance (the paper's observation for DDPM), which the same check shows."""
    sched = FlowSchedule.from_scheduler(_sd3_scheduler(), 20, (16, 16))
    sig = sched.sigmas
    x0 = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    # the forward Markov chain, upward from x0: x_sigma = (a/a') x_sigma' + sqrt(sigma^2 - (a/a')^2 sigma'^2) xi
    chain = [x0]
    for i in range(19, -1, -1):
        s_hi, s_lo = float(sig[i]), float(sig[i + 1])
        k = (1 - s_hi) / (1 - s_lo)
        chain.append(k * chain[-1] + math.sqrt(max(s_hi**2 - k * k * s_lo**2, 0.0)) * torch.randn(x0.shape, generator=g))
    xs = chain[::-1][:-1]  # x at sigmas[0..19]
    noise = torch.stack([(x - (1 - float(sig[i])) * x0) / float(sig[i]) for i, x in enumerate(xs)])
    code = efflow.invert(_perfect_net(x0), _sd3_scheduler(), x0, torch.zeros(1, 1, 8), None, num_steps=20,
                         noise=noise, cfg_scale=1.0)
    zs = code.zs[:-1]  # the last entry is the (zero) residual of sigma' = 0
    assert float(zs.mean()).__abs__() < 0.02
    assert float(zs.std()) == pytest.approx(1.0, abs=0.02)
    corr = float((zs[1:] * zs[:-1]).mean() / zs.var())
    assert abs(corr) < 0.02
    assert float(code.zs[-1].abs().max()) < 1e-5  # a perfect model predicts x0 exactly
    # independent draws (edit-friendly): not the chain's statistics
    ef = efflow.invert(_perfect_net(x0), _sd3_scheduler(), x0, torch.zeros(1, 1, 8), None, num_steps=20,
                       generator=torch.Generator().manual_seed(7), cfg_scale=1.0)
    assert float(ef.zs[:-1].std()) > 1.5


def _sd3_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)


def _flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)


# -- schedules ---------------------------------------------------------------


def test_sd3_sigmas_are_the_schedulers_static_shift_and_the_scheduler_is_not_touched():
    s = _sd3_scheduler()
    before = s.sigmas.clone()
    sched = FlowSchedule.from_scheduler(s, 50, (128, 128))
    assert torch.equal(s.sigmas, before)  # a copy was set, not the caller's scheduler
    def shift(x):
        return 3.0 * x / (1 + 2.0 * x)

    # diffusers: the training sigmas are shifted at construction, then the
    # inference linspace between their ends is shifted again (what SD3's pipeline runs)
    lin = np.linspace(1.0, shift(1 / 1000), 50)
    expect = shift(lin)
    assert np.allclose(sched.sigmas[:-1].numpy(), expect, atol=1e-6) and float(sched.sigmas[-1]) == 0.0


def test_flux_sigmas_shift_with_the_token_count():
    s = _flux_scheduler()
    small = FlowSchedule.from_scheduler(s, 28, (64, 64))  # 512 px: 1024 tokens
    large = FlowSchedule.from_scheduler(s, 28, (128, 128))  # 1024 px: 4096 tokens
    mu = calculate_shift(32 * 32, s.config)
    assert mu == pytest.approx(0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256))
    lin = np.linspace(1.0, 1 / 28, 28)
    expect = math.exp(mu) / (math.exp(mu) + (1 / lin - 1))
    assert np.allclose(small.sigmas[:-1].numpy(), expect, atol=1e-6)
    assert bool((large.sigmas[1:-1] > small.sigmas[1:-1]).all())  # more tokens, more shift toward noise


# -- FLUX packing --------------------------------------------------------------


def test_flux_packing_round_trips_and_its_ids_cover_every_token():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 12, 8)
    packed = pack(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 12, 8))
    assert torch.equal(unpack(packed, 12, 8), x)
    ids = image_ids(12, 8, "cpu", torch.float32)
    assert ids.shape == (packed.shape[1], 3)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 6, 4, "cpu", torch.float32))
    assert len({tuple(r) for r in ids.tolist()}) == packed.shape[1]  # one distinct position per token


# -- edit-friendly on flows ------------------------------------------------------


def test_edit_friendly_flow_reconstructs_exactly(flow_models):
    m = flow_models
    x0 = _latents(m)
    emb = m.encode_text(["a cat on a sofa", ""])
    for skip, cfg in ((0, 1.0), (3, 3.5)):
        code = efflow.invert(m.unet, m.scheduler, x0, emb[0:1], emb[1:2], num_steps=10, skip=skip, cfg_scale=cfg,
                             generator=_gens(2))
        rec = efflow.edit(m.unet, m.scheduler, code, emb[0:1], emb[1:2], cfg_scale=cfg)
        assert float((rec - x0).norm() / x0.norm()) < 1e-4, (m.model_id, skip, cfg)
        assert code.zs.shape[0] == 10 - skip


def test_edit_friendly_flow_codes_differ_per_seed_and_edits_follow_the_prompt(flow_models):
    m = flow_models
    x0 = _latents(m, b=1).repeat(3, 1, 1, 1)
    emb = m.encode_text(["a cat on a sofa", "a dog on a sofa", ""])
    code = efflow.invert(m.unet, m.scheduler, x0, emb[0:1], emb[2:3], num_steps=8, skip=2, cfg_scale=2.0,
                         generator=_gens(3))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not torch.allclose(code.zs[:, a], code.zs[:, b])
    edits = efflow.edit(m.unet, m.scheduler, code, emb[1:2], emb[2:3], cfg_scale=4.0)
    assert float((edits[0] - edits[1]).abs().max()) > 1e-3  # N codes, N different edits
    assert float((edits - x0).abs().max()) > 1e-3  # the target prompt changed the image
    again = efflow.invert(m.unet, m.scheduler, x0, emb[0:1], emb[2:3], num_steps=8, skip=2, cfg_scale=2.0,
                          generator=_gens(3))
    assert torch.equal(again.zs, code.zs)  # a seed gives the same code


def test_edit_friendly_flow_noise_is_injectable_and_checked(flow_models):
    m = flow_models
    x0 = _latents(m, b=1)
    emb = m.encode_text(["a", ""])
    noise = torch.randn(6, 1, *x0.shape[1:], generator=torch.Generator().manual_seed(9))
    a = efflow.invert(m.unet, m.scheduler, x0, emb[0:1], None, num_steps=8, skip=2, noise=noise)
    b = efflow.invert(m.unet, m.scheduler, x0, emb[0:1], None, num_steps=8, skip=2, noise=noise.clone())
    assert torch.equal(a.zs, b.zs)
    assert torch.allclose(a.x_start, flow_sample(x0, float(FlowSchedule.from_scheduler(
        m.scheduler, 8, tuple(x0.shape[-2:])).sigmas[2]), noise[0]), atol=1e-6)
    with pytest.raises(ValueError, match="noise must have shape"):
        efflow.invert(m.unet, m.scheduler, x0, emb[0:1], None, num_steps=8, skip=2, noise=noise[:3])
    with pytest.raises(ValueError, match="eta > 0"):
        efflow.invert(m.unet, m.scheduler, x0, emb[0:1], None, num_steps=8, eta=0.0)


def test_batched_inversion_equals_one_latent_at_a_time(flow_models):
    m = flow_models
    x0 = _latents(m, b=2)
    emb = m.encode_text(["a", ""])
    both = efflow.invert(m.unet, m.scheduler, x0, emb[0:1], emb[1:2], num_steps=6, cfg_scale=2.0, generator=_gens(2))
    for k in range(2):
        one = efflow.invert(m.unet, m.scheduler, x0[k : k + 1], emb[0:1], emb[1:2], num_steps=6, cfg_scale=2.0,
                            generator=_gens(1, base=k))
        assert torch.allclose(one.zs[:, 0], both.zs[:, k], atol=1e-4, rtol=1e-4)


def test_a_code_refuses_another_resolutions_schedule():
    m = load_models("tiny-flux", device="cpu")
    code = efflow.invert(m.unet, m.scheduler, _latents(m, b=1, h=64, w=64), m.encode_text(["a"]), None,
                         num_steps=6, generator=_gens(1))
    moved = type(code)(**{**code.__dict__, "x_start": torch.zeros(1, 4, 16, 16),
                          "zs": torch.zeros(6, 1, 4, 16, 16)})
    with pytest.raises(ValueError, match="scheduler gives"):
        efflow.edit(m.unet, m.scheduler, moved, m.encode_text(["a"]), None)


# -- FlowEdit --------------------------------------------------------------------


def test_flowedit_with_the_source_prompt_and_guidance_returns_x_src_exactly(flow_models):
    m = flow_models
    x0 = _latents(m)
    emb = m.encode_text(["a cat on a sofa", ""])
    for cfg in (1.0, 3.5):
        code = flowedit.invert(m.unet, m.scheduler, x0, emb[0:1], emb[1:2], num_steps=10, skip=3, cfg_scale=cfg,
                               n_avg=2, generator=_gens(2))
        out = flowedit.edit(m.unet, m.scheduler, code, emb[0:1], emb[1:2], cfg_scale=cfg, source=emb[0:1])
        assert torch.equal(out, x0), (m.model_id, cfg)


def _reference_flowedit(m, x_src, src, tar, uncond, noise, *, steps, n_max, src_cfg, tar_cfg):
    """FlowEdit's update as fallenshock/FlowEdit's FlowEditSD3 / FlowEditFLUX
    compute it (their timesteps, their Z_tar = (Z_edit + Z_src) - x_src, their
    transformer calls), with `noise[k]` in place of randn_like. FLUX packs
    with FluxPipeline's helpers at the latent's own size (the reference's
    vae_scale_factor path is its diffusers >= 0.32 defect)."""
    from diffusers import FluxPipeline

    s = __import__("copy").deepcopy(m.scheduler)
    h, w = x_src.shape[-2:]
    if m.kind == "flux":
        s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift((h // 2) * (w // 2), s.config))
        x = FluxPipeline._pack_latents(x_src, x_src.shape[0], x_src.shape[1], h, w)
        ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    else:
        s.set_timesteps(steps)
        x = x_src
    z_edit = x.clone()
    k = 0
    for i, t in enumerate(s.timesteps):
        if steps - i > n_max:
            continue
        t_i = s.sigmas[i]
        t_im1 = s.sigmas[i + 1]
        n = pack(noise[k]) if m.kind == "flux" else noise[k]
        k += 1
        zt_src = (1 - t_i) * x + t_i * n
        zt_tar = z_edit + zt_src - x
        if m.kind == "sd3":
            inp = torch.cat([zt_src, zt_src, zt_tar, zt_tar])
            emb = torch.cat([uncond.tokens, src.tokens, uncond.tokens, tar.tokens])
            pooled = torch.cat([uncond.added["pooled_projections"], src.added["pooled_projections"],
                                uncond.added["pooled_projections"], tar.added["pooled_projections"]])
            out = m.transformer(hidden_states=inp, timestep=t.expand(inp.shape[0]), encoder_hidden_states=emb,
                                pooled_projections=pooled, return_dict=False)[0]
            su, sc, tu, tc = out.chunk(4)
            v_src, v_tar = su + src_cfg * (sc - su), tu + tar_cfg * (tc - tu)
        else:
            def calc(lat, c, g):
                return m.transformer(hidden_states=lat, timestep=t.expand(1) / 1000, guidance=torch.tensor([g]),
                                     encoder_hidden_states=c.tokens, txt_ids=torch.zeros(c.tokens.shape[1], 3),
                                     img_ids=ids, pooled_projections=c.added["pooled_projections"], return_dict=False)[0]
            v_src, v_tar = calc(zt_src, src, src_cfg), calc(zt_tar, tar, tar_cfg)
        z_edit = z_edit.to(torch.float32) + (t_im1 - t_i) * (v_tar - v_src)
    return unpack(z_edit, h, w) if m.kind == "flux" else z_edit


def test_flowedit_update_matches_the_reference_with_the_same_noise(flow_models):
    m = flow_models
    x0 = _latents(m, b=1)
    emb = m.encode_text(["a cat on a sofa", "a dog on a sofa", ""])
    steps, n_max = 10, 6
    src_cfg, tar_cfg = (3.5, 13.5) if m.kind == "sd3" else (1.5, 5.5)
    code = flowedit.invert(m.unet, m.scheduler, x0, emb[0:1], emb[2:3], num_steps=steps, skip=steps - n_max,
                           cfg_scale=src_cfg, generator=_gens(1))
    ours = flowedit.edit(m.unet, m.scheduler, code, emb[1:2], emb[2:3], cfg_scale=tar_cfg, source=emb[0:1])
    ref = _reference_flowedit(m, x0, emb[0:1], emb[1:2], emb[2:3], code.zs[:, 0:1], steps=steps, n_max=n_max,
                              src_cfg=src_cfg, tar_cfg=tar_cfg)
    assert float((ours - x0).abs().max()) > 1e-3  # the edit moved
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), float((ours - ref).abs().max())


def test_flowedit_runs_the_settings_the_reference_fails_on():
    """SD3 with guidance <= 1 on either side, SD3 with n_min > 0, FLUX with
    n_min > n_max, SD3 with several images in one batch."""
    sd3, flux = load_models("tiny-sd3", device="cpu"), load_models("tiny-flux", device="cpu")
    x = _latents(sd3, b=3)
    emb = sd3.encode_text(["a cat", "a dog", ""])
    for src_cfg, tar_cfg in ((1.0, 1.0), (1.0, 5.0), (0.5, 1.0)):
        code = flowedit.invert(sd3.unet, sd3.scheduler, x, emb[0:1], emb[2:3], num_steps=8, skip=3,
                               cfg_scale=src_cfg, generator=_gens(3))
        out = flowedit.edit(sd3.unet, sd3.scheduler, code, emb[1:2], emb[2:3], cfg_scale=tar_cfg, source=emb[0:1])
        assert out.shape == x.shape and torch.isfinite(out).all()
        # rows of a batch are independent: the second image edited alone gives its row
        alone = flowedit.edit(sd3.unet, sd3.scheduler, code[1], emb[1:2], emb[2:3], cfg_scale=tar_cfg, source=emb[0:1])
        assert torch.allclose(alone, out[1:2], atol=1e-5)
    code = flowedit.invert(sd3.unet, sd3.scheduler, x, emb[0:1], emb[2:3], num_steps=8, skip=2, cfg_scale=3.5,
                           n_min=2, generator=_gens(3))
    assert code.zs.shape[0] == 4 + 1  # 4 ODE steps, one draw to start the sampling phase
    out = flowedit.edit(sd3.unet, sd3.scheduler, code, emb[1:2], emb[2:3], cfg_scale=13.5, source=emb[0:1])
    assert torch.isfinite(out).all() and float((out - x).abs().max()) > 1e-3
    fx = _latents(flux, b=1)
    femb = flux.encode_text(["a cat", "a dog"])
    code = flowedit.invert(flux.unet, flux.scheduler, fx, femb[0:1], None, num_steps=8, skip=4, cfg_scale=1.5,
                           n_min=6, generator=_gens(1))  # n_min 6 > n_max 4: every step that runs samples
    assert code.zs.shape[0] == 1
    out = flowedit.edit(flux.unet, flux.scheduler, code, femb[1:2], None, cfg_scale=5.5, source=femb[0:1])
    assert torch.isfinite(out).all()


def test_flowedit_seeds_give_diverse_edits_and_its_params_are_checked(flow_models):
    m = flow_models
    x0 = _latents(m, b=1).repeat(2, 1, 1, 1)
    emb = m.encode_text(["a cat", "a dog", ""])
    code = flowedit.invert(m.unet, m.scheduler, x0, emb[0:1], emb[2:3], num_steps=8, skip=2, cfg_scale=2.0,
                           generator=_gens(2))
    out = flowedit.edit(m.unet, m.scheduler, code, emb[1:2], emb[2:3], cfg_scale=6.0, source=emb[0:1])
    assert float((out[0] - out[1]).abs().max()) > 1e-4
    with pytest.raises(ValueError, match="n_avg"):
        flowedit.invert(m.unet, m.scheduler, x0, emb[0:1], None, num_steps=8, n_avg=0)
    with pytest.raises(ValueError, match="source"):
        flowedit.edit(m.unet, m.scheduler, code, emb[1:2], emb[2:3])


# -- jobs, validation, stored codes, the Editor, bench -------------------------------

TINY_SCORES = ["score.clip_model=imprint-tiny-clip", "score.clip_pretrained=none", "score.lpips_net=squeeze",
               "score.lpips_pretrained=false"]


def _table(out, name):
    import pyarrow.parquet as pq

    rows = []
    for f in sorted((out / name).glob("*.parquet")):
        rows.extend(pq.read_table(f).to_pylist())
    return rows


@pytest.fixture(scope="module")
def small_shard(tmp_path_factory):
    from helpers_data import good_samples, write

    # two images (96x80 and 112x80: non-square), each with a source prompt and one target
    samples = [s for s in good_samples(n=3) if "json" in s]
    return write(tmp_path_factory.mktemp("flow") / "s.tar", samples)


@pytest.mark.parametrize("job,model", [("jobs/sd3.toml", "tiny-sd3"), ("jobs/flux.toml", "tiny-flux")])
def test_flow_job_runs_both_methods_and_its_codes_edit_again(tmp_path, monkeypatch, small_shard, job, model):
    """The shipped flow job (both methods, its guidance and skip ratio) on a
    tiny model, scored: edit-friendly reconstructs its source latent to 1e-4
    and its N codes give N distinct edits; FlowEdit's seeds give distinct
    edits. The stored codes pass the code checks, edit again with new target
    prompts (edit-codes) and are refused by another model."""
    from pipeline.codes import CodeError, check_code_rows
    from pipeline.executor import run_job
    from pipeline.spec import load_spec

    monkeypatch.setenv("IMPRINT_CACHE", str(tmp_path / "cache"))
    common = [f"model.id={model}", "model.dtype=float32", "inversion.steps=4", "inversion.skip=1",
              "run.executor=inline", f'input.shards=["{small_shard}"]', "input.templates=[]", *TINY_SCORES]
    spec = load_spec(job, [*common, f'output.path="{tmp_path / "o"}"'])
    assert spec.inversion.methods == ["flowedit", "edit-friendly"]
    report = run_job(spec, progress=False)
    assert report.errors == 0 and report.images == 2 and report.edits == 2 * 2 * 2  # images x methods x seeds
    sources = _table(tmp_path / "o", "sources")
    assert len(sources) == 2 and all(s["status"] == "ok" for s in sources)
    assert all(s["recon_error_max"] is not None and s["recon_error_max"] < 1e-4 for s in sources)
    results = _table(tmp_path / "o", "results")
    assert all(r["clip_text"] is not None for r in results)  # scored
    by = {}
    for r in results:
        by.setdefault((r["method"], r["key"]), []).append(r["image"]["bytes"])
    assert {m for m, _ in by} == {"flowedit", "edit-friendly"}
    for k, images in by.items():
        assert len(images) == 2 and images[0] != images[1], k  # N = 2 seeds, two different edits

    noise = _table(tmp_path / "o", "noise")
    models = load_models(model, device="cpu")
    for method in ("flowedit", "edit-friendly"):
        mine = [r for r in noise if r["method"] == method]
        check_code_rows([r for r in mine if r["key"] == mine[0]["key"]], models)
    other = load_models("tiny-flux" if model == "tiny-sd3" else "tiny-sd3", device="cpu")
    with pytest.raises(ValueError, match="made with model"):
        check_code_rows([r for r in mine if r["key"] == mine[0]["key"]], other)
    bad = dict(mine[0], zs_shape=[mine[0]["zs_shape"][0] + 1, *mine[0]["zs_shape"][1:]])
    with pytest.raises(CodeError, match="noise maps"):
        check_code_rows([bad], models)

    again = load_spec(job, [*common, f'output.path="{tmp_path / "again"}"', 'input.templates=["{source}, at night"]'])
    again.input.shards, again.input.codes = [], str(tmp_path / "o")
    report = run_job(again, progress=False)
    assert report.errors == 0 and report.edits == 2 * 2 * 2  # every stored code: images x methods x seeds
    redone = _table(tmp_path / "again", "results")
    assert {r["method"] for r in redone} == {"flowedit", "edit-friendly"}
    assert {r["target_prompt"] for r in redone} == {s["source_prompt"] + ", at night" for s in sources}


@pytest.mark.parametrize("model,sets,field", [
    ("tiny-flux", ['inversion.method="edict"'], "inversion.method"),
    ("tiny-sd3", ['inversion.method="ddim"'], "inversion.method"),
    ("tiny", ['inversion.method="flowedit"'], "inversion.method"),
    ("tiny-sd3", ['edit.control="p2p"'], "edit.control"),
    ("tiny-flux", ["manipulate.strokes=true"], "manipulate.strokes"),
])
def test_validate_refuses_what_the_family_cannot_run(tmp_path, small_shard, model, sets, field):
    from pipeline.preflight import check_model
    from pipeline.spec import SpecError, load_spec

    spec = load_spec(raw={"input": {"shards": [small_shard]}, "model": {"id": model},
                          "inversion": {"method": "edit-friendly", "steps": 4, "skip": 1},
                          "output": {"path": str(tmp_path / "o")}}, overrides=sets)
    with pytest.raises(SpecError, match=rf"^{field}: "):
        check_model(spec)


def test_a_flux_model_without_guidance_embedding_refuses_guidance(tmp_path):
    """FLUX.1-schnell's configs (no guidance embedding), read from a local folder: cfg must be 1."""
    from pipeline.models import model_family
    from pipeline.models.flow import guidance_embedded
    from pipeline.preflight import check_family
    from pipeline.spec import SpecError, load_spec

    d = tmp_path / "schnell"
    (d / "transformer").mkdir(parents=True)
    (d / "vae").mkdir()
    (d / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (d / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": False}))
    (d / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    assert guidance_embedded(str(d)) is False and model_family(str(d)) == "flow"
    spec = load_spec("jobs/flux.toml", [f"model.id={d}"])
    with pytest.raises(SpecError, match="inversion.cfg_source: .*takes no guidance"):
        check_family(spec, "flow", guidance_embedded(str(d)))
    check_family(load_spec("jobs/flux.toml", [f"model.id={d}", "inversion.cfg_source=1", "edit.cfg_target=1"]),
                 "flow", False)
    assert guidance_embedded("tiny-flux") is True and guidance_embedded("tiny-sd3") is None


def test_editor_opens_tiny_flux_on_a_non_square_image():
    from PIL import Image

    from pipeline.editor import Editor

    ed = Editor.from_pretrained("tiny-flux", device="cpu")
    img = Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype("uint8"))
    for method in ("edit-friendly", "flowedit"):
        codes = ed.invert(img, "a photo", seeds=2, method=method, steps=6, skip=1, cfg_source=1.5)
        assert len(codes) == 2
        out = ed.edit(codes, ["a painting"], cfg_target=5.5)
        assert len(out) == 2 and out[0].size == out[1].size and out[0].size[0] > out[0].size[1]
        assert np.asarray(out[0]).tobytes() != np.asarray(out[1]).tobytes()


def test_bench_counts_transformer_evaluations_and_flops_per_edit():
    from pipeline.bench import BenchConfig, evals_flow, run_bench

    r = run_bench(BenchConfig(model="tiny-flux", method="flow", steps=4, skip=1, prompts=1, seeds=2, warmup=False),
                  log=lambda m: None)
    assert r["checks"]["counts_match_closed_form"]
    assert r["paths"]["flowedit"]["unet_image_evals"] == evals_flow("flowedit", 4, 1, 1, 2, halves=1) == 12
    assert r["paths"]["edit-friendly"]["unet_image_evals"] == evals_flow("edit-friendly", 4, 1, 1, 2, halves=1) == 15
    flops = r["unet_flops_per_image_eval"]
    assert flops and r["paths"]["flowedit"]["flops_per_edit"] == pytest.approx(flops * 6)
    assert r["checks"]["recon_error_max"]["flowedit"] == 0.0
    assert r["checks"]["recon_error_max"]["edit-friendly"] < 1e-4
    with pytest.raises(ValueError, match="flow model"):
        run_bench(BenchConfig(model="tiny", method="flow", steps=2, skip=0, prompts=1, seeds=1, warmup=False),
                  log=lambda m: None)


@pytest.mark.slow
@pytest.mark.ray
def test_flow_job_on_ray_workers_equals_inline(tmp_path, monkeypatch, small_shard):
    """The FLUX job through Ray actors (a local cluster the run starts) writes
    the same edits, byte for byte, as inline at the same torch thread count
    (Ray gives each actor one thread; the transformer's matmuls round by
    thread count)."""
    from pipeline.executor import run_job
    from pipeline.spec import load_spec

    monkeypatch.setenv("IMPRINT_CACHE", str(tmp_path / "cache"))
    common = ["model.id=tiny-flux", "model.dtype=float32", "inversion.steps=4", "inversion.skip=1", "run.threads=1",
              f'input.shards=["{small_shard}"]', "input.templates=[]", *TINY_SCORES]
    for executor in ("inline", "ray"):
        spec = load_spec("jobs/flux.toml", [*common, f"run.executor={executor}", f'output.path="{tmp_path / executor}"'])
        report = run_job(spec, progress=False)
        assert report.errors == 0 and report.edits == 8 and not report.failed, executor
    a, b = ({(r["method"], r["key"], r["seed_index"]): r["image"]["bytes"] for r in _table(tmp_path / x, "results")}
            for x in ("inline", "ray"))
    assert len(a) == 8 and a == b
