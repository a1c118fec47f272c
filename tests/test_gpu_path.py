"""The GPU path, proven on the CPU: device placement (the `meta` device
stands in for a GPU), no host sync inside the step loops, noise drawn only
where used (bit-identical), the VAE's own batch size, seed-independent
methods run once, shape bucketing, padded UNet calls, zero-terminal-SNR
schedules, EDICT's leapfrog parity, and the reconstruction row."""

import math
from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler

from pipeline.batching import ShapeBuckets, unit_shape
from pipeline.data import Sample
from pipeline.engine import CodeItem, Engine, PaddedNet
from pipeline.inversion import edict, get_method, method_names
from pipeline.inversion import edit_friendly as ef
from pipeline.inversion.common import Conditioning, Schedule, as_eps_model, ddim_mean, draw_noise, guided_eps, q_sample
from pipeline.models import build_random, sd_scheduler_config
from pipeline.spec import load_spec
from pipeline.syncs import count_host_syncs, gate_net

STEPS, SKIP = 6, 2


def _spec(**sections):
    raw = {
        "input": {"shards": ["x"], "templates": ["{source}, oil painting", "{source}, sketch"]},
        "model": {"id": "tiny"},
        "inversion": {"steps": STEPS, "skip": SKIP},
        "edit": {"seeds": 2},
        "score": {"enabled": False},
    }
    for sec, vals in sections.items():
        raw.setdefault(sec, {}).update(vals)
    return load_spec(raw=raw)


def _sample(key="a", seed=0, hw=(128, 128)):
    img = torch.rand(3, *hw, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return Sample(key=key, shard="s", source_prompt=f"a photo {key}",
                  target_prompts=[f"a photo {key}, oil painting", f"a photo {key}, sketch"], image=img, orig_size=hw[::-1])


@pytest.fixture(scope="module")
def meta_models():
    """The tiny pipeline on the `meta` device: shapes and devices only, no
    values, so a device mismatch or a host read raises as on a GPU."""
    return build_random("tiny", "meta", torch.float32)


# ---------------------------------------------------------------------------
# Devices and host syncs
# ---------------------------------------------------------------------------


def test_step_loops_make_no_host_sync(meta_models):
    """Every method's invert and edit, with per-row guidance scales: from the
    first UNet call to the end, no host read of a device tensor and no
    host-device copy (the timesteps and scales go to the device once)."""
    m = meta_models
    cond = m.encode_text(["a cat", "a dog"])
    x0 = torch.zeros(2, 4, 16, 16, device="meta")
    for name in method_names("sd"):
        method = get_method(name)
        guided = getattr(method, "GUIDANCE", True)  # turbo-edit: no guidance, edits against the source prompt
        with count_host_syncs("meta", started=False) as c:
            code = method.invert(gate_net(m.unet, c), m.scheduler, x0, cond, cond[:1], num_steps=4, skip=1,
                                 cfg_scale=3.0 if guided else 1.0,
                                 generator=[torch.Generator().manual_seed(k) for k in range(2)])
        assert c.count == 0, (name, "invert", c.events)
        row_args = {} if guided else {"source": cond[:1], "reconstruct": torch.tensor([False, True])}
        with count_host_syncs("meta", started=False) as c:
            out = method.edit(gate_net(m.unet, c), m.scheduler, code, cond, cond[:1],
                              cfg_scale=torch.tensor([2.0, 3.0]) if guided else 1.0, **row_args)
        assert c.count == 0, (name, "edit", c.events)
        assert out.device.type == "meta"


def test_sync_counter_sees_per_step_copies(meta_models):
    """The counter is not blind: the per-call timestep copy that a legacy
    `EpsModel(x, t, emb)` call makes is counted."""
    m = meta_models
    s = Schedule.from_scheduler(m.scheduler, 4)
    model = as_eps_model(m.unet, s)
    x, emb = torch.zeros(1, 4, 16, 16, device="meta"), m.encode_text(["a"])
    with count_host_syncs("meta") as c:
        model(x, int(s.timesteps[0]), emb)
        float(x.sum())
    assert c.count == 2, c.events


def test_edit_codes_run_on_the_models_device(meta_models):
    """Stored codes are read on the CPU; the engine moves them to the
    model's device (the bug: a device error on every shard on a GPU)."""
    m = replace(meta_models)  # own copy: its decoder is replaced below
    seen = []

    class DeviceAsserting:
        dtype = torch.float32

        def __call__(self, x, t, emb):
            seen.append((x.device.type, t.device.type, emb.device.type))
            assert x.device.type == t.device.type == emb.device.type == "meta"
            return meta_models.unet(x, t, emb)

    m.unet = DeviceAsserting()
    m.decode_latents = lambda lat: torch.zeros(lat.shape[0], 3, lat.shape[-2] * 8, lat.shape[-1] * 8)
    spec = _spec(output={"reconstruction_check": True})
    x0 = torch.randn(2, 4, 16, 16)
    code = ef.invert(build_random_cpu_unet(), m.scheduler, x0, torch.zeros(1, 77, 32), None, num_steps=STEPS, skip=SKIP,
                     cfg_scale=1.0, generator=[torch.Generator().manual_seed(k) for k in range(2)])
    assert code.x_start.device.type == "cpu"
    item = CodeItem(Sample(key="k", shard="s", source_prompt="a cat", target_prompts=["a dog"]), code, [1, 2], (16, 16))
    outs = Engine(m, spec).run_codes([item])
    assert len(outs[0].edits) == 2 and seen and all(d == ("meta",) * 3 for d in seen)


def build_random_cpu_unet():
    return lambda x, t, emb: x * 0.1  # any epsilon model: only the code's device matters here


# ---------------------------------------------------------------------------
# Noise: only what is used, bit-identical
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(10, 4, 16, 16), (10, 4, 17, 17), (40, 2, 1, 1), (7, 4, 5, 7), (3, 1, 1, 1)])
def test_leading_noise_is_the_full_draws_prefix(shape):
    for lead in range(shape[0] + 1):
        full = draw_noise((shape[0], 2, *shape[1:]), [torch.Generator().manual_seed(k) for k in (3, 9)], batch_dim=1)
        part = draw_noise((shape[0], 2, *shape[1:]), [torch.Generator().manual_seed(k) for k in (3, 9)], batch_dim=1,
                          leading=lead)
        assert torch.equal(full[:lead], part), (shape, lead)


def _old_edit_friendly(unet, scheduler, x0, cond, uncond, steps, skip, cfg, noise, cfg_edit, target):
    """The edit-friendly inversion and edit as HEAD computed them before the
    (x0, eps) adapter: guidance on eps from per-timestep calls, x0 from eps
    in `ddim_mean`, the full noise draw."""
    s = Schedule.from_scheduler(scheduler, steps)
    model = as_eps_model(unet, s)
    ts = s.timesteps.tolist()

    def guided(x, i, c, scale):
        both = model(torch.cat([x, x]), ts[i], Conditioning.cat([uncond.expand(x.shape[0], -1, -1), c.expand(x.shape[0], -1, -1)]))
        eps_u, eps_c = both[: x.shape[0]], both[x.shape[0] :]
        return eps_u + scale * (eps_c - eps_u)

    def x_at(i):
        return q_sample(x0, float(s.ab[i]), noise[steps - 1 - i])

    x_t, zs = x_at(skip), []
    x_start = x_t
    for i in range(skip, steps):
        sigma = s.sigma(i, 1.0)
        x_prev = x_at(i + 1) if i + 1 < steps else x0
        mu = ddim_mean(x_t, guided(x_t, i, cond, cfg), float(s.ab[i]), float(s.ab_prev[i]), sigma)
        z = (x_prev - mu) / sigma
        zs.append(z)
        x_t = mu + sigma * z
    x = x_start
    for j, i in enumerate(range(skip, steps)):
        sigma = s.sigma(i, 1.0)
        x = ddim_mean(x, guided(x, i, target, cfg_edit), float(s.ab[i]), float(s.ab_prev[i]), sigma) + sigma * zs[j]
    return torch.stack(zs), x


def test_edit_friendly_results_identical_to_before(tiny):
    """Drawing only the used maps and the (x0, eps) adapter change no bit
    for an epsilon model: codes and edits equal the previous math exactly."""
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    cond, uncond, target = tiny.encode_text(["a cat"]), tiny.encode_text([""]), tiny.encode_text(["a dog"])
    full = draw_noise((STEPS, 2, 4, 16, 16), [torch.Generator().manual_seed(k) for k in (5, 6)], batch_dim=1)
    zs_old, edit_old = _old_edit_friendly(tiny.unet, tiny.scheduler, x0, cond, uncond, STEPS, SKIP, 3.5, full, 15.0, target)
    code = ef.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=STEPS, skip=SKIP, cfg_scale=3.5,
                     generator=[torch.Generator().manual_seed(k) for k in (5, 6)])
    assert torch.equal(code.zs, zs_old)
    assert torch.equal(ef.edit(tiny.unet, tiny.scheduler, code, target, uncond, cfg_scale=15.0), edit_old)


# ---------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------


def test_reconstruction_row_reads_the_unmanipulated_code(tiny):
    samples = [_sample("a", 1)]
    plain = Engine(tiny, _spec()).run(samples)[0]
    for manip in ({"shift_x": 2}, {"flip": "horizontal"}, {"shift_y": -1, "flip": "vertical"}):
        out = Engine(tiny, _spec(manipulate=manip)).run(samples)[0]
        assert out.recon_error_max < 1e-4, (manip, out.recon_error_max)
        assert out.recon_error_max == pytest.approx(plain.recon_error_max, abs=1e-5)
        # and the edits do use the manipulated code
        assert not torch.equal(out.edits[0].image, plain.edits[0].image)


def test_vae_decode_has_its_own_batch_size(tiny):
    calls = []
    m = replace(tiny)
    m.decode_latents = lambda lat: (calls.append(lat.shape[0]), tiny.decode_latents(lat))[1]
    spec = _spec(batch={"max_decode_batch": 3, "max_unet_batch": 64}, edit={"seeds": 2})
    out = Engine(m, spec).run([_sample("a", 1)], decode_recon=True)[0]
    assert len(out.edits) == 4 and calls == [3, 1, 1]  # 4 edits in chunks of 3, then the reconstruction
    with pytest.raises(Exception, match="max_decode_batch"):
        _spec(batch={"max_decode_batch": 0})


@pytest.mark.parametrize("method", ["ddim", "edict"])
def test_seed_independent_methods_run_once_per_image(tiny, method):
    assert get_method(method).SEED_INDEPENDENT
    assert not any(get_method(m).SEED_INDEPENDENT for m in ("edit-friendly", "cycle", "ddim-forward"))
    n, k = 3, 2
    spec = _spec(inversion={"method": method, "steps": 4, "skip": 1}, edit={"seeds": n}, output={"noise": True})
    engine = Engine(tiny, spec)
    samples = [_sample("a", 1), _sample("b", 2)]
    outs = engine.run(samples)
    s = 3  # steps run
    # invert: 2 images x 1 row; edit: 2 images x (K + 1 recon) rows; x2 halves (edict: 2 evals per step)
    per_eval = 2 if method == "edict" else 1
    assert engine.unet.rows == per_eval * s * 2 * (2 + 2 * (k + 1))
    for o in outs:
        # deterministic: N seeds would be N copies of one edit, so one edit per (image, target), seed index 0
        assert [(e.target_index, e.seed_index) for e in o.edits] == [(t, 0) for t in range(k)]
        assert [e.seed for e in o.edits] == [o.seeds[0]] * k
        assert len(o.codes[0]) == 1
        assert math.isfinite(o.recon_error_max) and (method != "edict" or o.recon_error_max < 1e-6)
    # the edits equal running the method on each image alone (what N copies computed)
    m, v = get_method(method), engine.variants[0]
    texts = engine._texts(samples)
    x0 = tiny.encode_images(torch.stack([s.image for s in samples]))
    code = m.invert(tiny.unet, tiny.scheduler, x0[:1], texts.emb[[texts.row[samples[0].source_prompt]]], texts.uncond,
                    num_steps=4, skip=1, cfg_scale=v.cfg_source, **v.params)
    lat = m.edit(tiny.unet, tiny.scheduler, code, texts.emb[[texts.row[samples[0].target_prompts[1]]]], texts.uncond,
                 cfg_scale=v.cfg_target)
    torch.testing.assert_close(tiny.decode_latents(lat.float())[0], outs[0].edits[1].image, atol=2e-3, rtol=0)


def test_shape_buckets_release_one_shape_per_batch():
    b = ShapeBuckets(2, key=lambda u: u[0], max_pending=4)
    out = []
    for u in [("A", 1), ("B", 2), ("A", 3), ("C", 4), ("D", 5), ("B", 6), ("E", 7)]:
        out += b.add(u)
    # A fills first; B fills; then 3 singletons are pending (C, D, E): under the cap
    assert out == [[("A", 1), ("A", 3)], [("B", 2), ("B", 6)]]
    rest = b.flush()
    assert sorted(rest) == [[("C", 4)], [("D", 5)], [("E", 7)]] and b.pending == 0
    # the cap releases the fullest bucket early
    b = ShapeBuckets(3, key=lambda u: u[0], max_pending=3)
    got = []
    for u in [("A", 1), ("A", 2), ("B", 3), ("C", 4)]:
        got += b.add(u)
    assert got == [[("A", 1), ("A", 2)]]
    assert unit_shape(_sample("x", 0, (64, 128))) == ("image", (3, 64, 128))
    with pytest.raises(ValueError):
        ShapeBuckets(0)


def test_padded_net_pads_to_a_multiple_and_keeps_rows(tiny):
    sizes = []

    def net(x, t, emb):
        sizes.append(x.shape[0])
        return tiny.unet(x, t, emb)

    padded = PaddedNet(net, 8)
    x = torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    emb = tiny.encode_text(["a", "b", "c", "d", "e"]).tokens
    t = torch.tensor(500)
    out = padded(x, t, emb)
    assert sizes == [8] and out.shape == x.shape
    torch.testing.assert_close(out, tiny.unet(x, t, emb).sample, atol=1e-5, rtol=1e-5)
    spec = _spec(model={"compile": False}, batch={"pad_rows": 8})
    engine = Engine(tiny, spec)
    sizes.clear()
    engine.unet.net.net = net
    engine.run([_sample("a", 1)])
    assert sizes and all(s % 8 == 0 for s in sizes), sizes
    assert engine.unet.rows == (STEPS - SKIP) * 2 * (2 + 2 * 2 + 1)  # real rows only


# ---------------------------------------------------------------------------
# Zero terminal SNR, EDICT parity
# ---------------------------------------------------------------------------


def _zero_snr(prediction_type="v_prediction"):
    return DDIMScheduler(**{**sd_scheduler_config(), "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                            "prediction_type": prediction_type})


def test_zero_terminal_snr_is_finite_at_skip_0(tiny):
    sch = _zero_snr()
    assert float(Schedule.from_scheduler(sch, 5).ab[0]) == 0.0
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    cond, uncond = tiny.encode_text(["a cat"]), tiny.encode_text([""])
    gens = lambda: [torch.Generator().manual_seed(k) for k in range(2)]  # noqa: E731
    code = ef.invert(tiny.unet, sch, x0, cond, uncond, num_steps=5, skip=0, cfg_scale=3.5, generator=gens())
    assert torch.isfinite(code.zs).all() and torch.isfinite(code.x_start).all()
    rec = ef.edit(tiny.unet, sch, code, cond, uncond, cfg_scale=3.5)
    assert (rec - x0).abs().max() < 1e-4
    assert torch.isfinite(ef.edit(tiny.unet, sch, code, tiny.encode_text(["a dog"]), uncond, cfg_scale=15.0)).all()
    for name in ("ddim", "cycle", "ddim-forward"):
        m = get_method(name)
        c = m.invert(tiny.unet, sch, x0, cond, uncond, num_steps=5, skip=0, cfg_scale=2.0, generator=gens())
        assert torch.isfinite(m.edit(tiny.unet, sch, c, cond, uncond, cfg_scale=2.0)).all(), name
    with pytest.raises(ValueError, match="zero signal"):
        edict.invert(tiny.unet, sch, x0, cond, uncond, num_steps=5, skip=0)
    c = edict.invert(tiny.unet, sch, x0, cond, uncond, num_steps=5, skip=1)
    assert (edict.edit(tiny.unet, sch, c, cond, uncond) - x0.double()).abs().max() < 1e-10
    with pytest.raises(ValueError, match="epsilon-prediction"):
        ef.invert(tiny.unet, _zero_snr("epsilon"), x0, cond, uncond, num_steps=5, skip=0, generator=gens())


def test_sample_prediction_type(tiny):
    """A model predicting x0 ('sample'): reconstruction stays exact."""
    sch = DDIMScheduler(**{**sd_scheduler_config(), "prediction_type": "sample"})
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    cond = tiny.encode_text(["a cat"])
    code = ef.invert(tiny.unet, sch, x0, cond, None, num_steps=5, skip=1, cfg_scale=1.0,
                     generator=torch.Generator().manual_seed(0))
    assert (ef.edit(tiny.unet, sch, code, cond, None, cfg_scale=1.0) - x0).abs().max() < 1e-4


@pytest.mark.parametrize("steps,skip", [(5, 1), (6, 3), (6, 2)])
def test_edict_parity_counts_from_the_first_step_run(tiny, steps, skip):
    """As salesforce/EDICT and the diffusers community pipeline: the first
    step run updates x first whatever `skip` is; still exact."""
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(steps))
    cond, uncond = tiny.encode_text(["a cat"]), tiny.encode_text([""])
    code = edict.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=steps, skip=skip, cfg_scale=3.0)
    assert (edict.edit(tiny.unet, tiny.scheduler, code, cond, uncond, cfg_scale=3.0) - x0.double()).abs().max() < 1e-10
    # the generative loop written out with j counted from the first step run
    s = Schedule.from_scheduler(tiny.scheduler, steps)
    model = as_eps_model(tiny.unet, s)
    target = tiny.encode_text(["a dog"])

    def eps(v, i):
        return guided_eps(model, v, i, target, uncond, 3.0).to(v.dtype)

    x, y, mix = code.x_start, code.extra["y"], 0.93
    for j, i in enumerate(range(skip, steps)):
        a = math.sqrt(float(s.ab_prev[i]) / float(s.ab[i]))
        b = math.sqrt(1 - float(s.ab_prev[i])) - a * math.sqrt(1 - float(s.ab[i]))
        if j % 2 == 0:
            x = a * x + b * eps(y, i)
            y = a * y + b * eps(x, i)
        else:
            y = a * y + b * eps(x, i)
            x = a * x + b * eps(y, i)
        x = mix * x + (1.0 - mix) * y
        y = mix * y + (1.0 - mix) * x
    assert torch.equal(edict.edit(tiny.unet, tiny.scheduler, code, target, uncond, cfg_scale=3.0), x)


def test_reconstruction_error_bound_across_batch_compositions(tiny):
    """In float32 a row's UNet output depends (by rounding) on the batch it
    runs in, so the reconstruction error depends on the edit chain's rows.
    README states the bound measured here (tiny model, 10 steps)."""
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    cond, uncond = tiny.encode_text(["a cat"]), tiny.encode_text([""])
    code = ef.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=10, cfg_scale=3.5,
                     generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for rows in (1, 3, 17, 34):
        batch = code[[0] * rows]
        rec = ef.edit(tiny.unet, tiny.scheduler, batch, cond, uncond, cfg_scale=3.5)[0]
        worst = max(worst, float((rec - x0[0]).abs().max()))
    assert worst < 1e-4, worst


# Saved outputs of HEAD before these changes (tools: the engine on the tiny
# model, one 128x128 image, 6 steps, skip 2, K = 2, N = 2): per edit
# (target, seed, pixel sum, pixel |sum|), the reconstruction error, the
# codes' x_start sum, with 1 torch thread. On the machine that saved them
# they are reproduced bit for bit; the tolerance only allows another CPU's
# (or thread count's) rounding, a few 1e-6 relative.
HEAD_EDIT_FRIENDLY = {
    "edits": [[0, 0, -4982.599782150472, 10571.229773514206], [0, 1, -4739.447962275706, 10652.256505521946],
              [1, 0, -5307.161770407343, 10625.348501197295], [1, 1, -5086.546418482205, 10588.85778137925]],
    "code_sum": -35.84680968383327,
}


def test_engine_edit_friendly_outputs_equal_head(tiny):
    spec = load_spec(raw={"input": {"shards": ["x"]}, "model": {"id": "tiny"},
                          "inversion": {"method": "edit-friendly", "steps": 6, "skip": 2}, "edit": {"seeds": 2},
                          "score": {"enabled": False}, "output": {"noise": True}})
    img = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
    s = Sample(key="a", shard="s", source_prompt="a photo", target_prompts=["a photo, oil painting", "a sketch"], image=img)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        o = Engine(tiny, spec).run([s])[0]
    finally:
        torch.set_num_threads(threads)
    got = [[e.target_index, e.seed_index, float(e.image.double().sum()), float(e.image.double().abs().sum())] for e in o.edits]
    for g, h in zip(got, HEAD_EDIT_FRIENDLY["edits"], strict=True):
        assert g[:2] == h[:2] and g[2:] == pytest.approx(h[2:], rel=2e-5)
    assert float(o.codes[0].x_start.double().sum()) == pytest.approx(HEAD_EDIT_FRIENDLY["code_sum"], rel=1e-6)
    assert o.recon_error_max < 1e-4


def test_seed_independent_reconstruction_is_bit_exact(tiny):
    """EDICT's reconstruction row runs apart, in the inversion's batch shape:
    exact to the last bit (in the edit chain, batch-dependent rounding of
    the float32 UNet left 1.8e-4 here)."""
    spec = _spec(inversion={"method": "edict", "steps": 6, "skip": 2}, edit={"seeds": 2})
    out = Engine(tiny, spec).run([_sample("a", 1)])[0]
    assert out.recon_error_max == 0.0
