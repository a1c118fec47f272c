"""Manipulations in the edit-friendly noise space (shift, flip, color
strokes) and the noise statistics that compare codes with native noise."""

import json

import pytest
import torch
from helpers import gaussian_2d

from pipeline import noise_space as ns
from pipeline.inversion import edit_friendly as ef
from pipeline.inversion.common import NoiseCode
from pipeline.noise_stats import native_statistics, noise_statistics, plot_statistics


def _code(b=2, h=8, w=16, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return NoiseCode(
        x_start=torch.randn(b, 4, h, w, generator=g),
        zs=torch.randn(steps, b, 4, h, w, generator=g),
        timesteps=torch.tensor([21, 11, 1][:steps]),
        num_steps=steps + 1,
        skip=1,
        params={"eta": 1.0},
        extra={"y": torch.randn(b, 4, h, w, generator=g), "scale": torch.randn(b, 3, generator=g)},
    )


def _maps(code):
    return [code.x_start, code.zs, code.extra["y"]]


# ---------------------------------------------------------------------------
# shift / flip
# ---------------------------------------------------------------------------


def test_fill_block_follows_the_paper():
    assert ns.fill_start(64, 5) == 50  # App. A: columns 50..50+d-1 of a 64-wide map
    assert ns.fill_start(64, -5) == 50
    assert ns.fill_start(64, 20) == 44  # moved left so the block stays inside the map
    assert ns.fill_start(16, 2) == 13  # round(12.5) half up


@pytest.mark.parametrize("dx", [3, -3])
def test_shift_horizontal_moves_values_and_fills_border(dx):
    code = _code()
    before = [m.clone() for m in _maps(code)]
    out = ns.shift(code, dx=dx)
    s, k = 13, abs(dx)  # fill_start(16, 3) = round(50/64 * 16) = 13
    for src, dst in zip(_maps(code), _maps(out)):
        if dx > 0:
            assert torch.equal(dst[..., k:], src[..., :-k])
            assert torch.equal(dst[..., :k], src[..., s : s + k])
        else:
            assert torch.equal(dst[..., :-k], src[..., k:])
            assert torch.equal(dst[..., -k:], src[..., s : s + k])
    # nothing modified in place; off-grid extras, schedule and method carried over
    assert all(torch.equal(a, b) for a, b in zip(_maps(code), before))
    assert torch.equal(out.extra["scale"], code.extra["scale"]) and out.extra["scale"] is not code.extra["scale"]
    assert torch.equal(out.timesteps, code.timesteps) and (out.num_steps, out.skip) == (code.num_steps, code.skip)
    assert out.params["manipulations"] == [{"op": "shift", "dx": dx, "dy": 0}]
    assert "manipulations" not in code.params


def test_shift_vertical_and_both_axes():
    code = _code()  # H = 8: fill block starts at round(50/64 * 8) = 6
    down = ns.shift(code, dy=2)
    assert torch.equal(down.zs[..., 2:, :], code.zs[..., :-2, :])
    assert torch.equal(down.zs[..., :2, :], code.zs[..., 6:8, :])
    up = ns.shift(code, dy=-2)
    assert torch.equal(up.x_start[..., :-2, :], code.x_start[..., 2:, :])
    assert torch.equal(up.x_start[..., -2:, :], code.x_start[..., 6:8, :])
    both = ns.shift(code, dx=3, dy=-2)
    chained = ns.shift(ns.shift(code, dx=3), dy=-2)
    for a, b in zip(_maps(both), _maps(chained)):
        assert torch.equal(a, b)
    assert [m["op"] for m in chained.params["manipulations"]] == ["shift", "shift"]


def test_shifts_compose():
    code = _code()
    twice = ns.shift(ns.shift(code, dx=2), dx=3)
    once = ns.shift(code, dx=5)
    # the moved content agrees; only the filled border depends on the route
    for a, b in zip(_maps(twice), _maps(once)):
        assert torch.equal(a[..., 5:], b[..., 5:])
    back = ns.shift(ns.shift(code, dx=4), dx=-4)
    for a, b in zip(_maps(back), _maps(code)):
        assert torch.equal(a[..., :-4], b[..., :-4])
        assert not torch.equal(a, b)
    assert torch.equal(ns.shift(code).zs, code.zs)


def test_flip_twice_is_identity_and_flips_each_map():
    code = _code(b=3)
    for horizontal, dim in ((True, -1), (False, -2)):
        once = ns.flip(code, horizontal=horizontal)
        for a, b in zip(_maps(once), _maps(code)):
            assert torch.equal(a, torch.flip(b, dims=[dim]))
        twice = ns.flip(once, horizontal=horizontal)
        for a, b in zip(_maps(twice), _maps(code)):
            assert torch.equal(a, b)
    # per-code indexing commutes with the manipulation
    assert torch.equal(ns.flip(code)[1].zs, ns.flip(code[1]).zs)


def test_empty_zs_of_deterministic_codes_pass_through():
    code = _code()
    det = NoiseCode(code.x_start, code.x_start.new_empty((0, *code.x_start.shape)), code.timesteps, 4, 1, "ddim")
    out = ns.shift(det, dx=1)
    assert out.zs.shape == det.zs.shape
    assert torch.equal(out.x_start[..., 1:], det.x_start[..., :-1])


def test_shift_errors():
    code = _code()  # 8 x 16
    with pytest.raises(ValueError, match=r"dx=16 must satisfy \|dx\| < 16"):
        ns.shift(code, dx=16)
    with pytest.raises(ValueError, match=r"dy=-8 must satisfy \|dy\| < 8"):
        ns.shift(code, dy=-8)
    with pytest.raises(ValueError, match="dx must be an integer"):
        ns.shift(code, dx=1.5)
    with pytest.raises(ValueError, match="NoiseCode"):
        ns.flip(code.zs)
    ns.shift(code, dx=-15, dy=7)  # the largest shifts are allowed


# ---------------------------------------------------------------------------
# color strokes
# ---------------------------------------------------------------------------


def test_mask_to_latent():
    mask = torch.zeros(128, 128, dtype=torch.bool)
    mask[40:80, 17] = True  # a one-pixel vertical line in latent column 2
    lat = ns.mask_to_latent(mask, (16, 16))
    assert lat.shape == (1, 1, 16, 16) and lat.dtype == torch.float32
    assert set(lat.unique().tolist()) == {0.0, 1.0}
    assert lat[0, 0, :, 2].tolist() == [0.0] * 5 + [1.0] * 5 + [0.0] * 6
    assert lat.sum() == 5
    # nearest looks at each cell's centre pixel (8 i + 4): the thin line is lost
    assert ns.mask_to_latent(mask, (16, 16), mode="nearest").sum() == 0
    block = torch.zeros(2, 1, 128, 128, dtype=torch.uint8)
    block[1, :, 32:64, 64:128] = 255
    lat = ns.mask_to_latent(block, (16, 16), mode="nearest")
    assert lat.shape == (2, 1, 16, 16) and lat[0].sum() == 0
    assert torch.equal(lat[1, 0].nonzero().unique(dim=0), ns.mask_to_latent(block, (16, 16))[1, 0].nonzero())
    assert lat[1].sum() == 4 * 8
    with pytest.raises(ValueError, match="mask must be"):
        ns.mask_to_latent(torch.zeros(3, 128, 128), (16, 16))
    with pytest.raises(ValueError, match="mode"):
        ns.mask_to_latent(mask, (16, 16), mode="bilinear")
    with pytest.raises(ValueError, match="latent_hw"):
        ns.mask_to_latent(mask, (16,))


def test_stroke_steps():
    assert ns.stroke_steps(100) == range(30, 81)  # t = 70 .. 20 of 100
    assert ns.stroke_steps(50) == range(15, 41)  # T1, T2 -> 10, 35
    assert ns.stroke_steps(10) == range(3, 9)
    assert ns.stroke_steps(10, 1, 1) == range(9, 10)  # t1 rounds to 0 -> at least the last step
    assert ns.stroke_steps(100, 1, 100) == range(0, 100)
    for bad in [(0, 70), (70, 20), (20, 101)]:
        with pytest.raises(ValueError, match="t1"):
            ns.stroke_steps(100, *bad)
    with pytest.raises(ValueError, match="num_steps"):
        ns.stroke_steps(0)


class RecordingNet:
    """Records the latent the sampler feeds the net at each step."""

    def __init__(self, net, batch):
        self.net, self.batch, self.inputs = net, batch, []
        self.dtype = getattr(net, "dtype", None)

    def __call__(self, x, t, emb):
        self.inputs.append(x[: self.batch].clone())
        return self.net(x, t, emb)


@pytest.fixture(scope="module")
def stroke_setup(tiny):
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond, uncond = tiny.encode_text(["a cat"]), tiny.encode_text([""])
    code = ef.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=10,
                     generator=torch.Generator().manual_seed(1))
    target = tiny.encode_text(["a dog"])
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 2:8] = 1
    stroke = (2 * torch.randn(1, 4, 1, 1, generator=torch.Generator().manual_seed(5))).expand(1, 4, 16, 16)
    plain = ef.edit(tiny.unet, tiny.scheduler, code, target, uncond, cfg_scale=15.0)
    return code, target, uncond, mask, stroke, plain


def _strokes(net, tiny, code, target, uncond, mask, stroke, **kw):
    return ns.edit_with_strokes(net, tiny.scheduler, code, target, uncond, mask=mask, stroke_latent=stroke, **kw)


def test_strokes_without_effect_equal_plain_edit(tiny, stroke_setup):
    code, target, uncond, mask, stroke, plain = stroke_setup
    zs = code.zs.clone()
    for m, s in ((mask, 0.0), (torch.zeros_like(mask), 0.05)):
        assert torch.equal(_strokes(tiny.unet, tiny, code, target, uncond, m, stroke, strength=s), plain)
    # steps outside [T1, T2] are untouched: a code whose edit starts after the
    # last stroke step (index 8 of 10) edits exactly as without strokes
    late = ef.invert(tiny.unet, tiny.scheduler, plain, target, uncond, num_steps=10, skip=9,
                     generator=torch.Generator().manual_seed(2))
    out = _strokes(tiny.unet, tiny, late, target, uncond, mask, stroke, strength=1.0)
    assert torch.equal(out, ef.edit(tiny.unet, tiny.scheduler, late, target, uncond))
    assert torch.equal(code.zs, zs)  # the code is never modified


def test_strokes_pull_masked_region_toward_stroke(tiny, stroke_setup):
    code, target, uncond, mask, stroke, plain = stroke_setup
    inside = mask.bool().expand_as(plain)
    dist_plain = (plain - stroke).abs()[inside].mean()
    changes = []
    for s in (0.05, 0.2):
        out = _strokes(tiny.unet, tiny, code, target, uncond, mask, stroke, strength=s)
        dist = (out - stroke).abs()[inside].mean()
        assert dist < 0.95 * dist_plain
        change_in, change_out = (out - plain).abs()[inside].mean(), (out - plain).abs()[~inside].mean()
        assert change_out < 0.25 * change_in  # outside moves only through the net's spatial mixing
        changes.append(change_in)
    assert changes[1] > 2 * changes[0]  # stronger strokes move further


def test_strokes_touch_exactly_steps_t1_to_t2(tiny, stroke_setup):
    # 10 steps: (T1, T2) = (20, 70) -> schedule indices 3..8. The latent fed
    # to the net at step i reflects the noise maps of steps < i only.
    code, target, uncond, mask, stroke, _ = stroke_setup
    runs = {}
    for key, strength, t_range in (("plain", 0.0, (20, 70)), ("20-70", 0.5, (20, 70)), ("30-70", 0.5, (30, 70))):
        net = RecordingNet(tiny.unet, len(code))
        _strokes(net, tiny, code, target, uncond, mask, stroke, strength=strength, t_range=t_range)
        runs[key] = net.inputs
    assert len(runs["plain"]) == 10
    same = [torch.equal(a, b) for a, b in zip(runs["plain"], runs["20-70"])]
    assert same == [True] * 4 + [False] * 6  # first stroked step is index 3
    same = [torch.equal(a, b) for a, b in zip(runs["20-70"], runs["30-70"])]
    assert same == [True] * 9 + [False]  # T1 = 20 strokes index 8, T1 = 30 stops at 7


def test_stroke_errors(tiny, stroke_setup):
    code, target, uncond, mask, stroke, _ = stroke_setup
    def run(**kw):
        return _strokes(tiny.unet, tiny, code, target, uncond, kw.pop("mask", mask), kw.pop("stroke", stroke), **kw)

    with pytest.raises(ValueError, match="mask must have shape"):
        run(mask=torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="stroke_latent must have shape"):
        run(stroke=torch.ones(3, 4, 16, 16))
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 1\]"):
        run(mask=2 * mask)
    with pytest.raises(ValueError, match="eta > 0"):
        run(eta=0.0)
    with pytest.raises(ValueError, match="t1"):
        run(t_range=(70, 20))


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------


def test_statistics_2d_gaussian_example():
    # The paper's Fig. 5: data N((10, 10), I), 40 steps, exact denoiser.
    sch, net, mean, emb = gaussian_2d()
    g = torch.Generator().manual_seed(0)
    x0 = mean + torch.randn(2000, 2, 1, 1, generator=g)
    code = ef.invert(net, sch, x0, emb, None, num_steps=40, cfg_scale=1.0, generator=g)
    stats = noise_statistics(code, bins=6)
    native = native_statistics(code.zs.shape, seed=1, bins=6)
    assert stats["label"] == "edit-friendly" and stats["timesteps"] == code.timesteps.tolist()
    assert len(stats["std"]) == 40 and len(stats["corr"]) == 39 and len(stats["angle_edges"]) == 7
    assert min(stats["std"]) > 1.5 and stats["std_mean"] > 2
    assert max(stats["corr"][:-1]) < -0.3 and stats["corr_mean"] < -0.3
    assert all(abs(v - 1) < 0.1 for v in native["std"]) and abs(native["std_mean"] - 1) < 0.02
    assert all(abs(v) < 0.1 for v in native["corr"]) and abs(native["corr_mean"]) < 0.02
    # angles: uniform for native 2-D noise, piled up near 180 degrees for codes
    assert sum(stats["angle_hist"]) == pytest.approx(1.0) and sum(native["angle_hist"]) == pytest.approx(1.0)
    assert max(abs(v * 6 - 1) for v in native["angle_hist"]) < 0.1 and abs(native["angle_mean"] - 90) < 2
    assert stats["angle_hist"][5] == max(stats["angle_hist"]) and stats["angle_hist"][5] > 3 * stats["angle_hist"][0]
    assert stats["angle_mean"] > 110
    # a bare [S, B, ...] tensor gives the same numbers, without timesteps
    bare = noise_statistics(code.zs, bins=6)
    assert bare["timesteps"] is None and bare["std"] == pytest.approx(stats["std"])


def test_statistics_tiny_model_and_plot(tiny, tmp_path):
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond, uncond = tiny.encode_text(["a cat"]), tiny.encode_text([""])
    code = ef.invert(tiny.unet, tiny.scheduler, x0, cond, uncond, num_steps=10, skip=2,
                     generator=torch.Generator().manual_seed(1))
    stats, native = noise_statistics(code), native_statistics(code.zs.shape)
    assert stats["num_codes"] == 2 and stats["num_steps"] == 8 and stats["map_size"] == 4 * 16 * 16
    assert stats["std_mean"] > 1.5 and (torch.tensor(stats["std"]) > 1).all()
    assert stats["corr_mean"] < -0.2
    assert abs(native["std_mean"] - 1) < 0.02 and abs(native["corr_mean"]) < 0.02
    # 1024-dim vectors: native angles concentrate at 90, code angles well beyond
    assert abs(native["angle_mean"] - 90) < 2 and stats["angle_mean"] > 100
    assert native_statistics(code.zs.shape) == native  # seeded
    assert native_statistics(code.zs.shape, seed=1)["std"] != native["std"]
    json.dumps({"code": stats, "native": native}, allow_nan=False)
    path = plot_statistics(stats, native, tmp_path / "stats.png")
    data = (tmp_path / "stats.png").read_bytes()
    assert path == tmp_path / "stats.png" and len(data) > 10_000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_statistics_errors(tmp_path):
    with pytest.raises(ValueError, match="at least 2 steps"):
        noise_statistics(torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\[S, B, \.\.\.\]"):
        noise_statistics(torch.zeros(3, 2))
    det = NoiseCode(torch.zeros(1, 4, 2, 2), torch.zeros(0, 1, 4, 2, 2), torch.tensor([1]), 1, 0, "ddim")
    with pytest.raises(ValueError, match="deterministic"):
        noise_statistics(det)
    with pytest.raises(ValueError, match="bins"):
        native_statistics((3, 1, 4), bins=0)
    with pytest.raises(ValueError, match="shape"):
        native_statistics((1, 1, 4))
    with pytest.raises(ValueError, match="lacks"):
        plot_statistics({"std": [1.0]}, native_statistics((3, 1, 4)), tmp_path / "x.png")
