"""The edit-friendly core: exact reconstruction, skip-awareness, batching,
call accounting and the paper's 2-D illustration."""

import math

import pytest
import torch
from diffusers import DDIMScheduler
from helpers import GaussianDenoiser

from pipeline.inversion import edit_friendly as ef
from pipeline.inversion.common import NoiseCode
from pipeline.models import sd_scheduler_config


def _emb(tiny, prompts):
    return tiny.encode_text(prompts)


def _latents(b, h=16, w=16, seed=0):
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("b,h,w,steps,skip", [(1, 16, 16, 12, 0), (3, 16, 16, 12, 5), (2, 8, 24, 10, 3), (1, 24, 8, 20, 7)])
def test_exact_reconstruction(tiny, b, h, w, steps, skip):
    x0 = _latents(b, h, w)
    cond, uncond = _emb(tiny, ["a photo of a cat"] * b), _emb(tiny, [""])
    code = ef.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=steps, skip=skip, cfg_scale=3.5,
                     generator=torch.Generator().manual_seed(1))
    assert code.zs.shape == (steps - skip, b, 4, h, w)
    assert code.x_start.shape == x0.shape
    rec = ef.edit(tiny.unet, tiny.scheduler, code, cond, uncond, cfg_scale=3.5)
    assert (rec - x0).abs().max().item() <= 1e-4


def test_reconstruction_is_exact_only_because_z1_is_kept(tiny):
    x0 = _latents(1)
    cond, uncond = _emb(tiny, ["a dog"]), _emb(tiny, [""])
    code = ef.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=10, generator=torch.Generator().manual_seed(0))
    code.zs[-1].zero_()  # what the reference implementation does
    rec = ef.edit(tiny.unet, tiny.scheduler, code, cond, uncond, cfg_scale=3.5)
    assert (rec - x0).abs().max().item() > 1e-3


def test_edit_friendly_codes_are_not_gaussian_like(tiny):
    # Eq. 6's independent x_t's make z's large (std > 1) at most steps.
    x0 = _latents(2)
    cond, uncond = _emb(tiny, ["x"]), _emb(tiny, [""])
    code = ef.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=20, generator=torch.Generator().manual_seed(0))
    stds = code.zs.flatten(1).std(dim=1)
    assert (stds > 1).float().mean() > 0.5


def test_skip_aware_equals_truncated_full_inversion(tiny):
    steps, skip = 12, 5
    x0 = _latents(2, seed=3)
    noise = torch.randn(steps, 2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    cond, uncond = _emb(tiny, ["a tree"]), _emb(tiny, [""])
    full = ef.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=steps, skip=0, noise=noise)
    part = ef.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=steps, skip=skip, noise=noise)
    torch.testing.assert_close(part.zs, full.zs[skip:], atol=1e-4, rtol=1e-4)
    assert torch.equal(part.timesteps, full.timesteps[skip:])
    # x_start is the Eq. 6 draw at T[skip]
    ab = float(tiny.scheduler.alphas_cumprod[int(part.timesteps[0])])
    torch.testing.assert_close(part.x_start, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise[steps - 1 - skip])


def test_generator_draws_match_explicit_noise_convention(tiny):
    # index 0 of `noise` belongs to t = 1: a generator-drawn code equals one
    # given the same tensor explicitly.
    steps = 8
    x0 = _latents(1)
    cond, uncond = _emb(tiny, ["a"]), _emb(tiny, [""])
    noise = torch.randn(steps, 1, 4, 16, 16, generator=torch.Generator().manual_seed(9))
    a = ef.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=steps, noise=noise)
    b = ef.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=steps, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a.zs, b.zs)


def test_batched_equals_one_by_one(tiny):
    steps, skip = 10, 3
    x0 = _latents(3, seed=7)
    prompts = ["a red car", "a blue house", "a cat"]
    cond, uncond = _emb(tiny, prompts), _emb(tiny, [""])
    gens = lambda: [torch.Generator().manual_seed(100 + k) for k in range(3)]  # noqa: E731
    batched = ef.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=steps, skip=skip, generator=gens())
    for k in range(3):
        one = ef.invert(tiny.unet, tiny.scheduler, x0[k : k + 1], cond[k : k + 1], uncond, num_steps=steps, skip=skip,
                        generator=[gens()[k]])
        torch.testing.assert_close(one.zs[:, 0], batched.zs[:, k], atol=1e-4, rtol=1e-4)
    targets = _emb(tiny, ["a green car", "a snowy house", "a dog"])
    eb = ef.edit(tiny.unet, tiny.scheduler, batched, targets, uncond, cfg_scale=15.0)
    for k in range(3):
        e1 = ef.edit(tiny.unet, tiny.scheduler, batched[k], targets[k : k + 1], uncond, cfg_scale=15.0)
        torch.testing.assert_close(e1[0], eb[k], atol=1e-4, rtol=1e-4)


def test_diverse_codes_reconstruct_and_differ(tiny):
    x0 = _latents(1).expand(3, -1, -1, -1)
    cond, uncond = _emb(tiny, ["a"]), _emb(tiny, [""])
    code = ef.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=10, skip=2,
                     generator=[torch.Generator().manual_seed(s) for s in range(3)])
    rec = ef.edit(tiny.unet, tiny.scheduler, code, cond, uncond, cfg_scale=3.5)
    assert (rec - x0).abs().max() <= 1e-4
    assert (code.zs[:, 0] - code.zs[:, 1]).abs().mean() > 0.1
    edits = ef.edit(tiny.unet, tiny.scheduler, code, _emb(tiny, ["b"]), uncond, cfg_scale=15.0)
    assert (edits[0] - edits[1]).abs().mean() > 1e-3


def test_call_accounting(tiny, counting):
    steps, skip, n, k = 12, 5, 3, 2
    net = counting(tiny.unet)
    x0 = _latents(1).expand(n, -1, -1, -1)
    cond, uncond = _emb(tiny, ["src"]), _emb(tiny, [""])
    code = ef.invert(net, tiny.scheduler, x0, cond, uncond, num_steps=steps, skip=skip, cfg_scale=3.5,
                     generator=[torch.Generator().manual_seed(s) for s in range(n)])
    assert net.calls == steps - skip and net.rows == (steps - skip) * 2 * n  # one call on [uncond; cond]
    net.calls = net.rows = 0
    ef.invert(net, tiny.scheduler, x0, cond, uncond, num_steps=steps, skip=skip, cfg_scale=1.0)
    assert net.calls == steps - skip and net.rows == (steps - skip) * n  # conditional half only
    # K prompts x N codes in one batched chain
    net.calls = net.rows = 0
    targets = _emb(tiny, ["t1", "t2"])
    paired = code[list(range(n)) * k]
    cond_rows = targets.repeat_interleave(n, dim=0)
    out = ef.edit(net, tiny.scheduler, paired, cond_rows, uncond, cfg_scale=15.0)
    assert out.shape[0] == n * k
    assert net.calls == steps - skip
    # chunked by max batch size
    net.calls = 0
    chunked = ef.edit(net, tiny.scheduler, paired, cond_rows, uncond, cfg_scale=15.0, max_batch=4)
    assert net.calls == (steps - skip) * math.ceil(2 * n * k / 4)
    torch.testing.assert_close(chunked, out, atol=1e-4, rtol=1e-4)


def test_code_indexing_and_cat():
    code = NoiseCode(torch.arange(3.0).view(3, 1, 1, 1), torch.arange(6.0).view(2, 3, 1, 1, 1), torch.tensor([11, 1]), 4, 2)
    sub = code[[2, 0, 2]]
    assert sub.x_start.flatten().tolist() == [2, 0, 2]
    assert sub.zs[:, :, 0, 0, 0].tolist() == [[2, 0, 2], [5, 3, 5]]
    assert len(NoiseCode.cat([code, sub])) == 6
    assert code[torch.tensor([1])].zs.shape == (2, 1, 1, 1, 1)


def test_errors(tiny):
    x0 = _latents(2)
    cond, uncond = _emb(tiny, ["a"]), _emb(tiny, [""])
    with pytest.raises(ValueError, match="skip"):
        ef.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=10, skip=10)
    with pytest.raises(ValueError, match="eta"):
        ef.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=10, eta=0.0)
    with pytest.raises(ValueError, match="noise must have shape"):
        ef.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=10, noise=torch.zeros(9, 2, 4, 16, 16))
    with pytest.raises(ValueError, match="rows"):
        ef.invert(tiny.unet, tiny.scheduler, x0, _emb(tiny, ["a", "b", "c"]), uncond, num_steps=10)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        ef.invert(tiny.unet, tiny.scheduler, x0[0], cond, uncond, num_steps=10)
    zero_var = DDIMScheduler(**{**sd_scheduler_config(), "steps_offset": 0})
    with pytest.raises(ValueError, match="zero posterior variance"):
        ef.invert(tiny.unet, zero_var, x0, cond, uncond, num_steps=10)
    code = ef.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=10, skip=2)
    other = DDIMScheduler(**{**sd_scheduler_config(), "timestep_spacing": "trailing"})
    with pytest.raises(ValueError, match="inverted with"):
        ef.edit(tiny.unet, other, code, cond, uncond)


# ---------------------------------------------------------------------------
# The paper's 2-D illustration (Sec. 5, Fig. 5): data N((10, 10), I), 40 steps,
# exact closed-form denoiser eps(x_t) = sqrt(1 - ab) (x_t - sqrt(ab) m).
# ---------------------------------------------------------------------------


def _consecutive_angles(zs):
    # zs [S, B, 2, 1, 1] -> angles (degrees) between z_t and z_{t-1}
    v = zs.flatten(2)
    cos = torch.nn.functional.cosine_similarity(v[:-1], v[1:], dim=-1)
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1))).flatten()


def test_2d_gaussian_edit_friendly_vs_native():
    sch = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=False, steps_offset=1)
    mean = torch.tensor([10.0, 10.0]).view(1, 2, 1, 1)
    net = GaussianDenoiser(sch.alphas_cumprod, mean)
    emb = torch.zeros(1, 1, 1)
    g = torch.Generator().manual_seed(0)
    x0 = mean + torch.randn(4000, 2, 1, 1, generator=g)
    code = ef.invert(net, sch, x0, emb, None, num_steps=40, cfg_scale=1.0, generator=g)
    rec = ef.edit(net, sch, code, emb, None, cfg_scale=1.0)
    assert (rec - x0).abs().max() <= 1e-3

    x_T = torch.randn(4000, 2, 1, 1, generator=g)
    _, native = ef.sample(net, sch, x_T, emb, None, num_steps=40, cfg_scale=1.0, generator=g)

    ef_std = code.zs[:-1].flatten(1).std(dim=1)  # per step
    nat_std = native.zs[:-1].flatten(1).std(dim=1)
    assert ef_std.mean() > 1.2 and (ef_std > 1).float().mean() > 0.9
    assert abs(nat_std.mean() - 1.0) < 0.05

    def corr(zs):
        a, b = zs[:-2].flatten(1), zs[1:-1].flatten(1)
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean()

    assert corr(code.zs) < -0.2
    assert abs(corr(native.zs)) < 0.05

    ef_angles, nat_angles = _consecutive_angles(code.zs), _consecutive_angles(native.zs)
    ef_hist = torch.histc(ef_angles, bins=6, min=0, max=180)
    nat_hist = torch.histc(nat_angles, bins=6, min=0, max=180)
    assert int(ef_hist.argmax()) == 5  # peaks in [150, 180]
    assert ef_hist[5] > 2 * ef_hist[0]
    # native: uniform angles -> every bin within 20 % of the mean
    assert (nat_hist / nat_hist.mean() - 1).abs().max() < 0.2
