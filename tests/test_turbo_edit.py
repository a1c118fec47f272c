"""turbo-edit (TurboEdit, Deutch et al.): its timesteps and noise levels,
additive residuals, one batched inversion call, exact reconstruction,
diversity, clipping, errors, and parity with the reference implementation
(GiilDe/turbo-edit) for the same noise.

The parity oracle below is a minimal transcription of the reference's math
(its `utils.py`: create_xts, deterministic_ddpm_step, normalize,
step_save_latents, step_use_latents; and the loop `main.py` runs through
StableDiffusionXLImg2ImgPipeline with guidance 0), with its state in local
variables instead of on the scheduler. It is test code only.

Parity runs on both the SD-shaped `tiny` and `tiny-sdxl` (the SDXL adapter's
model: two text encoders, pooled text embeddings and time ids on every call).
"""

from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from pipeline.inversion import get_method, method_names
from pipeline.inversion import turbo_edit as te
from pipeline.inversion.common import Conditioning
from pipeline.models import TINY_SDXL, ImageGeometry, load_models, sd_scheduler_config

SRC, TGT = "a photo of a cat", "a photo of a dog"


def _latents(b, seed=0, h=8, w=8):
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))


def _scheduler():
    # SDXL-Turbo's scheduler family: scaled_linear betas, trailing spacing
    return DDIMScheduler(**{**sd_scheduler_config(), "timestep_spacing": "trailing"})


def _texts(m, hw=(8, 8)):
    """Source and target conditioning (SDXL: with the time ids of an image of latent size hw)."""
    geo = [ImageGeometry.plain(hw[0] * m.vae_scale_factor, hw[1] * m.vae_scale_factor)]
    return tuple(m.for_images(m.encode_text([p]), geo) for p in (SRC, TGT))


@pytest.fixture(scope="module", params=["tiny", "tiny-sdxl"])
def family(request, tiny):
    return tiny if request.param == "tiny" else load_models(TINY_SDXL, device="cpu", dtype="float32")


# ---------------------------------------------------------------------------
# The reference, transcribed (oracle)
# ---------------------------------------------------------------------------


def _ref_ddpm_step(model_output, t, sample, sch):
    """GiilDe/turbo-edit utils.py `deterministic_ddpm_step` (epsilon branch)."""
    prev_t = sch.previous_timestep(t)
    alpha_prod_t = sch.alphas_cumprod[t]
    alpha_prod_t_prev = sch.alphas_cumprod[prev_t] if prev_t >= 0 else sch.one
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    pred_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
    if sch.config.clip_sample:
        pred_original_sample = pred_original_sample.clamp(-sch.config.clip_sample_range, sch.config.clip_sample_range)
    pred_original_sample_coeff = (alpha_prod_t_prev ** 0.5 * current_beta_t) / beta_prod_t
    current_sample_coeff = current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t
    return pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample


def _ref_normalize(z_t, i, max_norm_zs):
    """utils.py `normalize`."""
    max_norm = max_norm_zs[i]
    if max_norm < 0:
        return z_t, 1
    norm = torch.norm(z_t)
    if norm < max_norm:
        return z_t, 1
    coeff = max_norm / norm
    return z_t * coeff, coeff


def _ref_create_xts(noise_shift_delta, noise_timesteps, noise, sch, timesteps, x_0):
    """utils.py `create_xts`, with the draw `torch.randn(..., generator)` passed in as `noise`."""
    if noise_timesteps is None:
        noising_delta = noise_shift_delta * (timesteps[0] - timesteps[1])
        noise_timesteps = [timestep - int(noising_delta) for timestep in timesteps]
    first_x_0_idx = len(noise_timesteps)
    for i in range(len(noise_timesteps)):
        if noise_timesteps[i] <= 0:
            first_x_0_idx = i
            break
    noise_timesteps = noise_timesteps[:first_x_0_idx]
    x_0_expanded = x_0.expand(len(noise_timesteps), -1, -1, -1)
    assert noise.shape == x_0_expanded.shape
    x_ts = sch.add_noise(x_0_expanded, noise, torch.IntTensor(noise_timesteps))
    x_ts = [t.unsqueeze(dim=0) for t in list(x_ts)]
    x_ts += [x_0] * (len(timesteps) - first_x_0_idx)
    x_ts += [x_0]
    return x_ts


# stabilityai/sdxl-turbo scheduler/scheduler_config.json, the keys DDPMScheduler reads: SD's betas, trailing
# spacing, and clip_sample false (so the reference runs without the x0 clamp)
SDXL_TURBO_SCHEDULER = {**sd_scheduler_config(), "timestep_spacing": "trailing", "clip_sample": False}


def _reference_edit(unet, timesteps, x_0, noise, src, tgt, *, w1=1.5, max_norm_zs=(-1, -1, -1, 15.5),
                    noise_shift_delta=1, noise_timesteps=None, clip_sample=None):
    """main.py `run` for one image: rows [src on x_t, src on x_hat, tgt on x_hat],
    each step through step_save_latents (row 0) and step_use_latents (rows 1:).
    Returns (edited latent = row 2, the saved residuals z_t). clip_sample:
    None = as the reference runs (SDXL-Turbo's config: false)."""
    # DDPMScheduler from the model's scheduler config, as main.py `load_pipe` (unknown keys are ignored)
    config = SDXL_TURBO_SCHEDULER if clip_sample is None else {**SDXL_TURBO_SCHEDULER, "clip_sample": clip_sample}
    sch = DDPMScheduler.from_config(config)
    sch.set_timesteps(timesteps=list(timesteps))
    x_ts = _ref_create_xts(noise_shift_delta, noise_timesteps, noise, sch, list(timesteps), x_0)
    latents_saved = [x_ts[0]]
    x_ts_c_predicted = [None]
    sample = x_ts[0].expand(3, -1, -1, -1)
    emb = Conditioning.cat([src, src, tgt])  # tokens, plus SDXL's added conditioning when the model has it
    for timestep_index, t in enumerate(timesteps):
        with torch.no_grad():
            model_output = unet(sample, torch.tensor(t), emb.tokens, **emb.unet_kwargs()).sample
        next_i = timestep_index + 1
        # step_save_latents (row 0)
        u_hat_t = _ref_ddpm_step(model_output[:1], t, sample[:1], sch)
        z_t = x_ts[next_i] - u_hat_t
        x_ts_c_predicted.append(u_hat_t)
        latents_saved.append(z_t)
        z_t, _ = _ref_normalize(z_t, timestep_index, max_norm_zs)
        row0 = u_hat_t + z_t
        # step_use_latents (rows 1, 2)
        _, k = _ref_normalize(latents_saved[next_i], timestep_index, max_norm_zs)
        x_t_hat_c_hat = _ref_ddpm_step(model_output[1:], t, sample[1:], sch)
        exact = x_ts[next_i].expand_as(x_t_hat_c_hat)
        x_t_c = x_ts_c_predicted[next_i][0].expand_as(x_t_hat_c_hat)
        x_t_hat_c = torch.zeros_like(x_t_hat_c_hat)
        x_t_hat_c[1:2] = x_t_hat_c_hat[0:1]
        cross_prompt_term = x_t_hat_c_hat - x_t_hat_c
        cross_trajectory_term = x_t_hat_c - k * x_t_c
        x_hat = k * exact + cross_trajectory_term + w1 * cross_prompt_term
        x_hat[0:1] = x_hat[1:2]
        sample = torch.cat([row0, x_hat])
    return sample[2:3], torch.cat(latents_saved[1:])


# ---------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("steps,noise_timesteps,max_norm_zs,clip", [
    (4, None, (-1, -1, -1, 15.5), None),  # run_configs/noise_shift_steps_4.yaml; both sides' defaults (no x0 clamp)
    (3, [599, 299, 0], (-1, -1, 15.5), None),  # run_configs/noise_shift_steps_3.yaml
    (4, None, (-1, -1, -1, 15.5), True),  # the x0 clamp as an option, on both sides
    (4, None, (-1, -1, -1, 1.0), False),  # a clip that bites, no x0 clamp
])
def test_equal_to_reference_for_the_same_noise(family, steps, noise_timesteps, max_norm_zs, clip):
    tiny = family  # the SD-shaped tiny model, then tiny-sdxl (two text encoders, added conditioning)
    sch = _scheduler()
    x0 = _latents(1, seed=11) * 1.5  # some values beyond the clamp range
    src, tgt = _texts(tiny)
    ts = te.model_timesteps(1000, steps)
    noisy = sum(1 for v in (noise_timesteps or [t - 200 for t in ts]) if v > 0)
    noise = torch.randn((noisy, *x0.shape[1:]), generator=torch.Generator().manual_seed(2))  # the reference's draw
    ref_edit, ref_res = _reference_edit(tiny.unet, ts, x0, noise, src, tgt, max_norm_zs=max_norm_zs,
                                        noise_timesteps=noise_timesteps, clip_sample=clip)
    max_norm = [v if v > 0 else 0.0 for v in max_norm_zs]
    clip_arg = {} if clip is None else {"clip_sample": clip}  # None: imprint's default
    code = te.invert(tiny.unet, sch, x0, src, None, num_steps=steps, noise=noise[:, None], max_norm=max_norm,
                     noise_levels=noise_timesteps, **clip_arg)
    assert torch.allclose(code.zs[:, 0], ref_res, atol=2e-5, rtol=1e-5), (code.zs[:, 0] - ref_res).abs().max()
    out = te.edit(tiny.unet, sch, code, tgt, None, source=src, w=1.5)
    assert (ref_edit - x0).abs().max() > 0.01  # the edit moved (a random tiny model moves little)
    assert torch.allclose(out, ref_edit, atol=5e-5, rtol=1e-5), (out - ref_edit).abs().max()


def test_default_has_no_x0_clamp_and_the_clamp_is_an_option(tiny):
    # the reference runs unclamped (SDXL-Turbo's scheduler config); latents beyond [-1, 1] show the difference
    assert te.DEFAULTS["clip_sample"] is False
    x0 = _latents(1, seed=11) * 1.5
    src, tgt = _texts(tiny)
    noise = torch.randn((3, *x0.shape[1:]), generator=torch.Generator().manual_seed(2))
    default = te.invert(tiny.unet, _scheduler(), x0, src, None, noise=noise[:, None])
    clamped = te.invert(tiny.unet, _scheduler(), x0, src, None, noise=noise[:, None], clip_sample=True)
    assert default.params["clip_sample"] is False and clamped.params["clip_sample"] is True
    assert (default.zs - clamped.zs).abs().max() > 1e-2
    # a stored code that records no clip_sample edits with the default
    bare = replace(default, params={k: v for k, v in default.params.items() if k != "clip_sample"})
    torch.testing.assert_close(te.edit(tiny.unet, _scheduler(), bare, tgt, None, source=src),
                               te.edit(tiny.unet, _scheduler(), default, tgt, None, source=src))


def test_same_seed_draws_the_references_noise(tiny):
    # one CPU generator per image draws torch.randn((K, C, H, W)), as the reference does
    x0 = _latents(1, seed=1)
    src, _ = _texts(tiny)
    code = te.invert(tiny.unet, _scheduler(), x0, src, None, generator=[torch.Generator().manual_seed(2)])
    noise = torch.randn((3, *x0.shape[1:]), generator=torch.Generator().manual_seed(2))
    ab = float(_scheduler().alphas_cumprod[599])
    assert torch.allclose(code.x_start, ab ** 0.5 * x0 + (1 - ab) ** 0.5 * noise[0:1], atol=1e-6)


# ---------------------------------------------------------------------------
# Schedule, levels, residuals
# ---------------------------------------------------------------------------


def test_timesteps_and_levels():
    assert te.model_timesteps(1000, 4) == [799, 599, 399, 199]
    assert te.model_timesteps(1000, 3) == [799, 499, 199]
    assert te.noise_levels_for([799, 599, 399, 199], 200, None) == [599, 399, 199, 0]
    assert te.noise_levels_for([799, 499, 199], 200, None) == [599, 299, 0]
    assert te.noise_levels_for([799, 599], 0, [500, -3]) == [500, 0]
    with pytest.raises(ValueError, match="must not increase"):
        te.noise_levels_for([799, 599], 0, [100, 300])
    assert te.max_norms(15.5, 4) == [0, 0, 0, 15.5] and te.max_norms([1, -1], 2) == [1, 0]
    s = te.turbo_schedule(_scheduler(), 4)
    assert s.timesteps.tolist() == [799, 599, 399, 199] and float(s.ab_prev[-1]) == 1.0


def test_residuals_are_additive_and_the_last_is_nonzero(tiny):
    x0 = _latents(2, seed=3)
    src, _ = _texts(tiny)
    code = te.invert(tiny.unet, _scheduler(), x0, src, None, generator=[torch.Generator().manual_seed(k) for k in (0, 1)])
    assert code.zs_kind == "residual" and code.zs.shape == (4, 2, 4, 8, 8) and code.method == "turbo-edit"
    assert code.zs[-1].abs().max() > 1e-3  # sigma = 0 at the last step, the residual is not
    assert code.params["noise_levels"] == [599, 399, 199, 0] and code.params["max_norm"] == [0, 0, 0, 15.5]


def test_inversion_is_one_unet_call_and_an_edit_one_call_per_step(tiny, counting):
    x0 = _latents(3, seed=4)
    src, tgt = _texts(tiny)
    net = counting(tiny.unet)
    code = te.invert(net, _scheduler(), x0, src, None, generator=[torch.Generator().manual_seed(k) for k in range(3)])
    assert (net.calls, net.rows) == (1, 4 * 3)
    net.calls = net.rows = 0
    te.edit(net, _scheduler(), code, tgt, None, source=src, reconstruct=[False, False, True])
    # per step: 3 rows with the source prompt, 2 edit rows with the target (the reconstruction row needs none)
    assert (net.calls, net.rows) == (4, 4 * 5)


def test_reconstruction_is_exact_without_clipping(tiny):
    x0 = _latents(2, seed=5) * 2  # large latents: the x0 clamp and the last-step clip both act on edits
    src, tgt = _texts(tiny)
    sch = _scheduler()
    code = te.invert(tiny.unet, sch, x0, src, None, generator=[torch.Generator().manual_seed(k) for k in (0, 1)],
                     max_norm=1.0)
    rec = te.edit(tiny.unet, sch, code, src, None, source=src, reconstruct=[True, True])
    assert (rec - x0).abs().max() < 1e-4
    # the same rows as edits (with the source prompt) are clipped on the last step and do not reconstruct
    clipped = te.edit(tiny.unet, sch, code, src, None, source=src)
    assert (clipped - x0).abs().max() > 1e-2
    # w = 0 ignores the target: that edit is the source-prompt edit
    w0 = te.edit(tiny.unet, sch, code, tgt, None, source=src, w=0.0)
    assert torch.allclose(w0, clipped, atol=1e-5)


def test_seeds_give_different_codes_and_edits_one_code_serves_every_target(tiny):
    x0 = _latents(1, seed=6).repeat(2, 1, 1, 1)
    src, tgt = _texts(tiny)
    sch = _scheduler()
    code = te.invert(tiny.unet, sch, x0, src, None, generator=[torch.Generator().manual_seed(k) for k in (7, 8)])
    assert (code.zs[:, 0] - code.zs[:, 1]).abs().max() > 0.1
    out = te.edit(tiny.unet, sch, code, tgt, None, source=src)
    assert (out[0] - out[1]).abs().max() > 1e-2
    # one code, two targets (rows indexed like every method's codes)
    other = tiny.encode_text(["a painting of a horse"])
    both = te.edit(tiny.unet, sch, code[[0, 0]], torch.cat([tgt, other]), None, source=src)
    assert torch.allclose(both[0], out[0], atol=1e-5) and (both[1] - both[0]).abs().max() > 1e-2


def test_explicit_timesteps_and_skip(tiny):
    x0 = _latents(1, seed=9)
    src, _ = _texts(tiny)
    sch = _scheduler()
    code = te.invert(tiny.unet, sch, x0, src, None, num_steps=3, skip=1, timesteps=[900, 500, 100],
                     generator=torch.Generator().manual_seed(0))
    assert code.timesteps.tolist() == [500, 100] and code.zs.shape[0] == 2
    assert code.params["noise_levels"] == [700, 300, 0]
    rec = te.edit(tiny.unet, sch, code, src, None, source=src, reconstruct=[True])
    assert (rec - x0).abs().max() < 1e-4


def test_errors(tiny):
    x0 = _latents(1)
    src, tgt = _texts(tiny)
    sch = _scheduler()
    with pytest.raises(ValueError, match="without classifier-free guidance"):
        te.invert(tiny.unet, sch, x0, src, None, cfg_scale=3.5)
    code = te.invert(tiny.unet, sch, x0, src, None)
    with pytest.raises(ValueError, match="source prompt"):
        te.edit(tiny.unet, sch, code, tgt, None)
    with pytest.raises(ValueError, match="without classifier-free guidance"):
        te.edit(tiny.unet, sch, code, tgt, None, source=src, cfg_scale=7.5)
    with pytest.raises(ValueError, match="holds residuals"):
        te.edit(tiny.unet, sch, replace(code, zs_kind="noise"), tgt, None, source=src)
    with pytest.raises(ValueError, match="residual maps"):
        get_method("edit-friendly").edit(tiny.unet, sch, code, tgt, None)
    with pytest.raises(ValueError, match="timesteps lists"):
        te.invert(tiny.unet, sch, x0, src, None, num_steps=4, timesteps=[700, 300])
    assert "turbo-edit" in method_names()
