"""PIE-Bench's metrics (pipeline/pie_metrics.py) per edit row: the
background metrics against an independent numpy/scipy computation written
here, the CLIP scores against the scorers' own embeddings, the structure
distance's defining properties, NaN without a mask, and the mask's geometry
(cropped and resized with its image, nearest)."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from pipeline import pie_metrics as pm
from pipeline.data import EDIT_MASK_KEY, decode_sample, to_model_tensor
from pipeline.scoring import FilterConfig, Scorers, ScoreConfig, select, threshold_field
from pipeline.spec import ImageSpec, InputSpec

# random weights throughout (labelled as such in the description); a tiny timm ViT for the structure distance
CFG = ScoreConfig(clip_model="imprint-tiny-clip", clip_pretrained="none", lpips_pretrained=False,
                  structure_model="vit_tiny_patch16_224", structure_pretrained=False, batch_size=4)


@pytest.fixture(scope="module")
def scorers():
    return Scorers.load(CFG, "cpu", torch.float32)


def _u8(seed, h=48, w=64):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _tensor(u8):  # [3, H, W] in [-1, 1], exactly on the 8-bit grid
    return torch.from_numpy(u8.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)


def _mask(h=48, w=64, box=(10, 20, 30, 44)):
    m = np.zeros((h, w), np.float32)
    m[box[0]:box[1], box[2]:box[3]] = 1
    return m


# -- the independent computation (PIE-Bench's evaluation, in numpy) ---------------------------------------------


def _np_background(src_u8, edit_u8, mask):
    keep = (1 - mask)[..., None]
    a, b = src_u8.astype(np.float64) / 255 * keep, edit_u8.astype(np.float64) / 255 * keep
    mse = np.mean((a - b) ** 2)
    psnr = 10 * np.log10(1 / mse)
    # SSIM as skimage's structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    # data_range=1), per channel: scipy's Gaussian (truncate 3.5 -> an 11-tap window), the border of 5 cropped
    ssims = []
    for c in range(3):
        x, y = a[..., c], b[..., c]
        f = lambda z: gaussian_filter(z, sigma=1.5, truncate=3.5)  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
        ssims.append(s[5:-5, 5:-5].mean())
    return mse, psnr, float(np.mean(ssims))


def test_background_metrics_match_an_independent_computation():
    src, edit = _u8(0), _u8(1)
    edit[:24] = src[:24]  # half the background unchanged: PSNR well above the noise floor
    mask = _mask()
    got_mse = pm.background_mse(pm.to_unit_8bit(_tensor(src)[None]), pm.to_unit_8bit(_tensor(edit)[None]),
                                torch.from_numpy(mask)[None, None])
    keep = torch.from_numpy(1 - mask)[None, None]
    got_ssim = pm.ssim(pm.to_unit_8bit(_tensor(src)[None]) * keep, pm.to_unit_8bit(_tensor(edit)[None]) * keep)
    mse, psnr, ssim = _np_background(src, edit, mask)
    assert float(got_mse[0]) == pytest.approx(mse, rel=1e-5)
    assert float(pm.psnr_from_mse(got_mse)[0]) == pytest.approx(psnr, rel=1e-5)
    assert float(got_ssim[0]) == pytest.approx(ssim, abs=1e-5)
    assert 0.0 < ssim < 1.0


def test_per_row_metrics_through_the_scorers(scorers):
    """Three sources (two masked), four edits: each row's background metrics
    agree with the numpy computation; an edit changed only inside its mask has
    a perfect background; CLIP scores are 100 * max(cos, 0) of the scorers'
    own embeddings (the edited one on the image times the mask)."""
    srcs = [_u8(10), _u8(11), _u8(12)]
    masks = [torch.from_numpy(_mask()), None, torch.from_numpy(_mask(box=(0, 48, 0, 16)))]
    inside_only = srcs[0].copy()
    inside_only[10:20, 30:44] = 255 - inside_only[10:20, 30:44]  # only the edit region changes
    edits = [_u8(20), inside_only, _u8(21), _u8(22)]
    edit_source = [0, 0, 1, 2]
    prompts = ["a red car", "a red car", "a cat", "a dog"]
    out = scorers.pie.score(torch.stack([_tensor(s) for s in srcs]), torch.stack([_tensor(e) for e in edits]),
                            edit_source, prompts, masks)
    assert set(out) == set(pm.PIE_METRICS)
    assert all(math.isnan(out[k][2]) for k in pm.PIE_METRICS)  # no mask, no PIE-Bench metrics
    for r in (0, 3):
        mse, psnr, ssim = _np_background(srcs[edit_source[r]], edits[r], masks[edit_source[r]].numpy())
        assert out["bg_mse"][r] == pytest.approx(mse, rel=1e-5)
        assert out["bg_psnr"][r] == pytest.approx(psnr, rel=1e-5)
        assert out["bg_ssim"][r] == pytest.approx(ssim, abs=1e-5)
        assert out["bg_lpips"][r] > 0 and out["structure_distance"][r] > 0
    assert out["bg_mse"][1] == 0 and out["bg_psnr"][1] == math.inf and out["bg_ssim"][1] == pytest.approx(1.0)
    assert out["bg_lpips"][1] == pytest.approx(0.0, abs=1e-6)
    assert out["structure_distance"][1] > 0  # the whole image changed where the mask is
    edit_t = torch.stack([_tensor(e) for e in edits])
    txt = scorers.embed_texts(prompts)
    whole = (scorers.embed_images(edit_t) * txt).sum(-1)
    m0 = masks[0][None].expand(3, -1, -1)
    cut = ((edit_t[0] + 1) / 2 * m0) * 2 - 1  # the 8-bit edit times the mask, black elsewhere
    edited0 = (scorers.embed_images(cut[None]) * txt[:1]).sum(-1)
    assert out["clip_whole"][0] == pytest.approx(100 * max(float(whole[0]), 0.0), abs=1e-3)
    assert out["clip_edited"][0] == pytest.approx(100 * max(float(edited0[0]), 0.0), abs=1e-3)
    # an identical edit: zero structure distance
    same = scorers.pie.score(_tensor(srcs[0])[None], _tensor(srcs[0])[None], [0], ["x"], [masks[0]])
    assert same["structure_distance"][0] == pytest.approx(0.0, abs=1e-7)
    assert scorers.random_weights and scorers.description["structure_weights"] == "random"


def test_mask_follows_the_image_geometry_with_nearest_sampling():
    """A 160x96 image (cropped and resized to the model's 64-pixel geometry)
    whose white rectangle is exactly its mask: after the geometry rule the mask
    is binary and covers the rectangle's pixels."""
    img = np.zeros((96, 160, 3), np.uint8)
    img[30:70, 40:100] = 255
    mask = np.zeros((96, 160), np.uint8)
    mask[30:70, 40:100] = 255
    buf, mbuf = io.BytesIO(), io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    Image.fromarray(mask).save(mbuf, "PNG")
    raw = {"__key__": "k", "png": buf.getvalue(), EDIT_MASK_KEY: mbuf.getvalue(),
           "json": b'{"source_prompt": "a box", "target_prompts": ["a ball"]}'}
    s = decode_sample(raw, "s", InputSpec(shards=["x"]), ImageSpec(), 64)
    assert not s.error, s.error
    assert s.edit_mask.shape == s.image.shape[1:] and set(s.edit_mask.unique().tolist()) == {0.0, 1.0}
    bright = s.image.mean(0) > 0.9
    dark = s.image.mean(0) < -0.9
    assert bool(s.edit_mask[bright].all()) and not bool(s.edit_mask[dark].any())
    # a mask that is not a PNG (lossy) makes the sample an error row
    jbuf = io.BytesIO()
    Image.fromarray(mask).save(jbuf, "JPEG")
    bad = decode_sample({**raw, EDIT_MASK_KEY: jbuf.getvalue()}, "s", InputSpec(shards=["x"]), ImageSpec(), 64)
    assert "edit mask must be a PNG" in bad.error and bad.image is not None
    assert to_model_tensor(Image.fromarray(img), ImageSpec(), 64).shape == s.image.shape


def test_filters_and_top_k_accept_the_pie_metrics():
    scores = {"bg_psnr": [30.0, 20.0, 26.0, float("nan"), 25.0], "clip_edited": [21.0, 29.0, 22.0, 30.0, 23.0]}
    groups = [0, 0, 0, 0, 0]
    cfg = FilterConfig(bg_psnr_min=24, keep_top_k=2, top_k_by="clip_edited")
    # bg_psnr >= 24 keeps rows 0, 2, 4 (NaN fails); the best 2 of them by clip_edited: rows 4 and 2
    assert select(scores, groups, cfg) == [False, False, True, False, True]
    assert threshold_field("bg_lpips") == "bg_lpips_max" and threshold_field("bg_ssim") == "bg_ssim_min"
    by_lpips = {"bg_lpips": [0.3, 0.1, 0.2]}
    assert select(by_lpips, [0, 0, 0], FilterConfig(keep_top_k=1, top_k_by="bg_lpips")) == [False, True, False]
    with pytest.raises(ValueError, match="filter.bg_mse_max"):
        FilterConfig(bg_mse_max="a lot").validate()


def test_spec_hash_of_specs_without_pie_settings_is_unchanged():
    # the hashes imprint gave these specs before the PIE-Bench fields existed (commit 81c13eb): outputs written
    # then still resume; a PIE-Bench setting changes the hash (it changes the rows)
    from pipeline.spec import JobSpec, load_spec

    assert JobSpec().hash() == "b87b6ff3c0ee69f5"
    raw = {"input": {"shards": ["x.tar"]}, "score": {"lpips_net": "squeeze"}, "filter": {"clip_text_min": 0.2}}
    assert load_spec(raw=raw).hash() == "41a089cb834485d1"
    assert load_spec(raw={**raw, "filter": {"clip_text_min": 0.2, "bg_psnr_min": 24}}).hash() != "41a089cb834485d1"
    assert load_spec(raw={**raw, "score": {"lpips_net": "squeeze", "structure_pretrained": False}}).hash() \
        != "41a089cb834485d1"
