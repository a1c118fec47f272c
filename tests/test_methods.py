"""The other inversion methods (DDIM, EDICT, DDIM with a forward start,
CycleDiffusion): their defining properties, call accounting, a uniform API
across all five methods, and errors."""

import copy
import math
from dataclasses import replace

import pytest
import torch
from helpers import gaussian_2d

from pipeline.inversion import edit_friendly as ef
from pipeline.inversion import get_method, method_names
from pipeline.inversion import cycle, ddim, ddim_forward, edict
from pipeline.inversion.common import Conditioning

ALL = ["edit-friendly", "ddim", "edict", "ddim-forward", "cycle"]


def _latents(b, h=8, w=8, seed=0):
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))


def _gens(n, base=0):
    return [torch.Generator().manual_seed(base + k) for k in range(n)]


# ---------------------------------------------------------------------------
# EDICT
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("steps,skip", [(7, 0), (8, 0), (11, 4), (12, 5)])
def test_edict_exact_in_float64_for_any_step_count(tiny, steps, skip):
    # Odd and even step counts, odd and even numbers of steps run: the
    # leapfrog parity follows the generative index. The UNet runs in float32; its inputs round to the same
    # float32 values in both directions, so the same eps comes back.
    x0 = _latents(1, seed=steps)
    cond, uncond = tiny.encode_text(["a photo of a cat"]), tiny.encode_text([""])
    code = edict.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=steps, skip=skip, cfg_scale=3.0)
    assert code.x_start.dtype == torch.float64 and code.extra["y"].shape == x0.shape
    assert code.zs.shape == (0, 1, 4, 8, 8)
    assert (code.x_start - x0).abs().max() > 0.1  # it did move
    rec = edict.edit(tiny.unet, tiny.scheduler, code, cond, uncond, cfg_scale=3.0)
    assert (rec - x0.double()).abs().max().item() <= 1e-10


def test_edict_exact_with_float64_unet(tiny):
    unet64 = copy.deepcopy(tiny.unet).to(torch.float64)
    x0 = _latents(1, seed=3)
    cond, uncond = tiny.encode_text(["a dog"]), tiny.encode_text([""])
    code = edict.invert(unet64, tiny.scheduler, x0, cond, uncond, num_steps=7, skip=4, cfg_scale=3.0)
    rec = edict.edit(unet64, tiny.scheduler, code, cond, uncond, cfg_scale=3.0)
    assert (rec - x0.double()).abs().max().item() <= 1e-10


def test_edict_float32_is_close_and_differs_from_float64(tiny):
    x0 = _latents(1, seed=4)
    cond, uncond = tiny.encode_text(["a dog"]), tiny.encode_text([""])
    code = edict.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=5, skip=2, cfg_scale=3.0, float64=False)
    assert code.x_start.dtype == torch.float32 and code.params["float64"] is False
    rec = edict.edit(tiny.unet, tiny.scheduler, code, cond, uncond, cfg_scale=3.0)
    assert rec.dtype == torch.float32
    assert (rec - x0).abs().max().item() <= 1e-3


# ---------------------------------------------------------------------------
# DDIM and DDIM with a forward start, on the exact 2-D Gaussian model
# ---------------------------------------------------------------------------


def _ddim_error(net, sch, x0, emb, steps):
    code = ddim.invert(net, sch, x0, emb, None, num_steps=steps, cfg_scale=1.0)
    return (ddim.edit(net, sch, code, emb, None, cfg_scale=1.0) - x0).abs().mean().item()


def test_ddim_inversion_drifts_first_order_and_converges():
    sch, net, mean, emb = gaussian_2d()
    x0 = mean + torch.randn(500, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    err = {s: _ddim_error(net, sch, x0, emb, s) for s in (10, 100, 200, 500)}
    # eps is taken at the current point, not the destination: an O(1/steps)
    # error even with the exact denoiser.
    assert err[10] > 2.0 and err[10] > 20 * err[500]
    assert 0.4 < err[200] / err[100] < 0.6
    assert err[500] < 0.1  # |x0| is about 14


def test_ddim_forward_jump_lands_where_k_ddim_steps_do(counting):
    sch, net, mean, emb = gaussian_2d()
    steps, k = 100, 3
    assert ddim_forward.default_forward_steps(steps) == k and ddim_forward.jump_index(steps, k) == steps - k
    assert [ddim_forward.default_forward_steps(s) for s in (10, 20, 50, 200)] == [1, 1, 2, 6]
    x0 = torch.tensor([8.0, 11.0]).view(1, 2, 1, 1).expand(4000, -1, -1, -1)
    # K DDIM-inversion steps reach schedule index steps - k with K evaluations ...
    counted = counting(net)
    walked = ddim.invert(counted, sch, x0, emb, None, num_steps=steps, skip=steps - k, cfg_scale=1.0)
    assert counted.calls == k
    # ... the jump reaches the same index with none
    counted.calls = 0
    jumped = ddim_forward.invert(counted, sch, x0, emb, None, num_steps=steps, skip=steps - k, forward_steps=k,
                                 generator=torch.Generator().manual_seed(0))
    assert counted.calls == 0
    assert torch.equal(jumped.timesteps, walked.timesteps) and jumped.params["forward_steps"] == k
    # and is a draw from q(x_tK | x0)
    ab = float(sch.alphas_cumprod[int(jumped.timesteps[0])])
    xs = jumped.x_start.flatten(1)
    torch.testing.assert_close(xs.mean(0), math.sqrt(ab) * x0[0].flatten(), atol=0.01, rtol=0)
    torch.testing.assert_close(xs.std(0), torch.full((2,), math.sqrt(1 - ab)), atol=0, rtol=0.05)
    # the walk lands near the centre of that distribution
    assert (walked.x_start[0].flatten() - xs.mean(0)).abs().max() < 3 * math.sqrt(1 - ab)


def test_ddim_forward_codes_differ_and_reconstruct_at_ddim_level(counting):
    sch, net, mean, emb = gaussian_2d()
    steps = 100
    x0 = mean + torch.randn(500, 2, 1, 1, generator=torch.Generator().manual_seed(1))
    counted = counting(net)
    codes = [ddim_forward.invert(counted, sch, x0, emb, None, num_steps=steps, skip=10, cfg_scale=1.0,
                                 generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert counted.calls == 2 * (steps - 3 - 10)
    assert (codes[0].x_start - codes[1].x_start).abs().mean() > 1e-3
    ref = ddim.invert(net, sch, x0, emb, None, num_steps=steps, skip=10, cfg_scale=1.0)
    ref_err = (ddim.edit(net, sch, ref, emb, None, cfg_scale=1.0) - x0).abs().mean()
    for code in codes:
        err = (ddim_forward.edit(net, sch, code, emb, None, cfg_scale=1.0) - x0).abs().mean()
        assert err < 1.2 * ref_err


def test_ddim_forward_per_sample_generators_do_not_depend_on_batching(tiny):
    x0 = _latents(2, seed=5)
    cond, uncond = tiny.encode_text(["a"]), tiny.encode_text([""])
    kw = dict(num_steps=10, skip=8, forward_steps=2, cfg_scale=1.0)  # jump only: no UNet calls
    both = ddim_forward.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, generator=_gens(2, 7), **kw)
    one = ddim_forward.invert(tiny.unet, tiny.scheduler, x0[1:], cond, uncond, generator=_gens(2, 7)[1:], **kw)
    torch.testing.assert_close(one.x_start[0], both.x_start[1])


# ---------------------------------------------------------------------------
# CycleDiffusion
# ---------------------------------------------------------------------------


def _step_stats(zs):
    """Per-step std and correlation of consecutive z's over the batch."""
    v = zs.flatten(1)
    a, b = v[:-1] - v[:-1].mean(1, keepdim=True), v[1:] - v[1:].mean(1, keepdim=True)
    return v.std(1), (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_cycle_codes_have_native_statistics_unlike_edit_friendly():
    sch, net, mean, emb = gaussian_2d()
    steps = 40
    x0 = mean + torch.randn(4000, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    cyc = cycle.invert(net, sch, x0, emb, None, num_steps=steps, cfg_scale=1.0, generator=torch.Generator().manual_seed(1))
    efc = ef.invert(net, sch, x0, emb, None, num_steps=steps, cfg_scale=1.0, generator=torch.Generator().manual_seed(1))
    # At high noise (the first quarter, t > 750) CycleDiffusion's chain gives
    # z ~ iid N(0, I) (std 1, no correlation) while edit-friendly's independent
    # x_t's give large, anti-correlated z's. Lower down, cycle's z's grow and
    # correlate positively with the default small eta (sigma_t = 0.1 sqrt(var)
    # is small there next to the model's posterior error), so only that part
    # is native.
    high = steps // 4
    c_std, c_corr = _step_stats(cyc.zs[:high])
    e_std, e_corr = _step_stats(efc.zs[:high])
    assert (c_std - 1).abs().max() < 0.08 and c_corr.abs().max() < 0.1
    assert e_std.min() > 1.8 and e_corr.max() < -0.4
    # exact reconstruction with the source prompt, by construction
    rec = cycle.edit(net, sch, cyc, emb, None, cfg_scale=1.0)
    assert (rec - x0).abs().max() <= 1e-3


def test_cycle_reconstructs_exactly_and_codes_differ(tiny):
    x0 = _latents(1, 8, 16).expand(2, -1, -1, -1)
    cond, uncond = tiny.encode_text(["a photo of a cat"]), tiny.encode_text([""])
    code = cycle.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=8, skip=4, cfg_scale=3.5,
                        generator=_gens(2))
    assert code.zs.shape == (4, 2, 4, 8, 16) and code.params == {"eta": 0.1, "cfg_source": 3.5}
    assert (code.zs[:, 0] - code.zs[:, 1]).abs().mean() > 0.1
    rec = cycle.edit(tiny.unet, tiny.scheduler, code, cond, uncond, cfg_scale=3.5)
    assert (rec - x0).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------
# All methods through the registry: one API, call accounting, pairing
# ---------------------------------------------------------------------------


def test_registry_lists_all_methods():
    assert set(ALL) <= set(method_names())
    for name in ALL:
        m = get_method(name)
        assert m.METHOD == name and isinstance(m.DEFAULTS, dict)


# (inversion calls, edit calls) per step run, with guidance on [uncond; cond]
CALLS_PER_STEP = {"edit-friendly": (1, 1), "ddim": (1, 1), "edict": (2, 2), "ddim-forward": (1, 1), "cycle": (1, 1)}
EXACT = {"edit-friendly", "edict", "cycle"}


@pytest.mark.parametrize("name", ALL)
def test_uniform_api_call_accounting_and_pairing(tiny, counting, name):
    method = get_method(name)
    steps, skip, n = 6, 3, 2
    x0 = _latents(n, 8, 16, seed=11)
    src, uncond = tiny.encode_text(["a photo of a cat"]), tiny.encode_text([""])
    net = counting(tiny.unet)
    code = method.invert(net, tiny.scheduler, x0, src, uncond, num_steps=steps, skip=skip, cfg_scale=2.0,
                         generator=_gens(n), **method.DEFAULTS)
    per_inv, per_edit = CALLS_PER_STEP[name]
    run = steps - skip - (code.params["forward_steps"] if name == "ddim-forward" else 0)
    assert net.calls == per_inv * run and net.rows == 2 * n * net.calls
    assert code.method == name and code.skip == skip and code.num_steps == steps
    assert code.x_start.shape == x0.shape and code.zs.shape[1:] == x0.shape
    assert code.params["cfg_source"] == 2.0 and set(method.DEFAULTS) <= set(code.params)

    # K = 2 prompts x N = 2 codes in one batched chain: rows (code k % N, prompt k // N)
    paired = code[[0, 1] * 2]
    rows = Conditioning.cat([src, src, tiny.encode_text(["a dog", "a dog"])])
    net.calls = net.rows = 0
    out = method.edit(net, tiny.scheduler, paired, rows, uncond, cfg_scale=2.0)
    assert out.shape == (2 * n, *x0.shape[1:])
    assert net.calls == per_edit * (steps - skip) and net.rows == 2 * 2 * n * net.calls
    # the source-prompt rows are the codes' own reconstructions
    if name in EXACT:
        assert (out[:n].float() - x0).abs().max() <= 1e-4
    else:
        alone = method.edit(tiny.unet, tiny.scheduler, code, src, uncond, cfg_scale=2.0)
        torch.testing.assert_close(out[:n], alone, atol=1e-4, rtol=1e-4)
    assert (out[n:].float() - out[:n].float()).abs().mean() > 1e-4  # the target prompt changed something


def test_guidance_off_evaluates_the_conditional_half_only(tiny, counting):
    x0 = _latents(2)
    cond = tiny.encode_text(["a"])
    for name in ("ddim", "edict"):
        net = counting(tiny.unet)
        get_method(name).invert(net, tiny.scheduler, x0, cond, None, num_steps=4, cfg_scale=1.0)
        assert net.rows == 2 * net.calls == 2 * CALLS_PER_STEP[name][0] * 4


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_errors(tiny):
    x0 = _latents(1)
    cond, uncond = tiny.encode_text(["a"]), tiny.encode_text([""])
    kw = dict(num_steps=4, cfg_scale=1.0)
    with pytest.raises(ValueError, match="unknown inversion method 'dim'"):
        get_method("dim")
    with pytest.raises(TypeError, match="eta"):
        ddim.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, eta=0.5, **kw)
    with pytest.raises(TypeError, match="mix"):
        get_method("cycle").invert(tiny.unet, tiny.scheduler, x0, cond, uncond, mix=0.9, **kw)
    with pytest.raises(ValueError, match="mix"):
        edict.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, mix=0.0, **kw)
    with pytest.raises(ValueError, match="forward_steps"):
        ddim_forward.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, skip=2, forward_steps=3, **kw)
    with pytest.raises(ValueError, match="forward_steps"):
        ddim_forward.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, forward_steps=0, **kw)
    with pytest.raises(ValueError, match="eta"):
        cycle.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, eta=0.0, **kw)
    with pytest.raises(ValueError, match="skip"):
        ddim.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, skip=4, **kw)
    # a code read by the wrong method's edit
    code = ddim.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, skip=3, **kw)
    with pytest.raises(ValueError, match="method 'ddim'"):
        edict.edit(tiny.unet, tiny.scheduler, code, cond, uncond)
    with pytest.raises(ValueError, match="method 'ddim'"):
        cycle.edit(tiny.unet, tiny.scheduler, code, cond, uncond)
    with pytest.raises(ValueError, match="inverted with"):
        ddim.edit(tiny.unet, tiny.scheduler, replace(code, num_steps=5), cond, uncond)
