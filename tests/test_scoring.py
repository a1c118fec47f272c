import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline import scoring
from pipeline.scoring import (
    SCORE_COLUMNS,
    FilterConfig,
    Scorers,
    ScoreConfig,
    WeightsUnavailableError,
    clip_pixels,
    cosine,
    directional_similarity,
    pairwise_mean,
    psnr,
    select,
    validate_configs,
)

TINY_CFG = ScoreConfig(clip_model="imprint-tiny-clip", clip_pretrained="none", lpips_net="alex",
                       lpips_pretrained=False, batch_size=16)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def scorers():
    return Scorers.load(TINY_CFG, "cpu", torch.float32)


def rand_images(n, h=48, w=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g) * 2 - 1


def smooth_image(h=80, w=100):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([0.5 + 0.4 * torch.sin(9 * xx + 5 * yy * yy + c) for c in range(3)])[None]
    return (img * 255).round() / 255  # exactly representable in 8 bits


# ----------------------------------------------------------------------------- math


def test_cosine_and_direction_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0], [1.0, 0.0]])
    assert cosine(a, b).tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-7)

    s2 = math.sqrt(0.5)
    img_src, img_edit = torch.tensor([[1.0, 0.0]]), torch.tensor([[s2, s2]])
    txt_src, txt_edit = torch.tensor([[0.0, 1.0]]), torch.tensor([[s2, s2]])
    # image moved by (s2 - 1, s2), text by (s2, s2 - 1): cos = 2 s2 (s2 - 1) / |.|^2
    u, v = np.array([s2 - 1, s2]), np.array([s2, s2 - 1])
    expected = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    assert directional_similarity(img_src, img_edit, txt_src, txt_edit).item() == pytest.approx(expected, abs=1e-6)
    # the same move in image and text space
    assert directional_similarity(img_src, img_edit, img_src, img_edit).item() == pytest.approx(1.0, abs=1e-6)
    # identical prompts: no text direction, score 0 rather than NaN
    assert directional_similarity(img_src, img_edit, txt_src, txt_src).item() == 0.0


def test_pairwise_mean_by_hand():
    d = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 6.0], [2.0, 6.0, 0.0]])
    assert pairwise_mean(d) == pytest.approx(3.0)
    # only the upper triangle counts (3 pairs for N = 3)
    d[2, 0] = 100.0
    assert pairwise_mean(d) == pytest.approx(3.0)
    assert math.isnan(pairwise_mean(torch.zeros(1, 1)))
    with pytest.raises(ValueError, match="square"):
        pairwise_mean(torch.zeros(2, 3))


def test_psnr_by_hand():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.zeros(2, 3, 4, 4)
    b[0] += 0.2  # MSE 0.04, data range 2: 10 log10(4 / 0.04) = 20 dB
    b[1, :, :2] = 2.0  # half the pixels off by 2: MSE 2, 10 log10(2) dB
    assert psnr(a, b).tolist() == pytest.approx([20.0, 10 * math.log10(2.0)], abs=1e-4)
    assert psnr(a, a).tolist() == [math.inf, math.inf]
    with pytest.raises(ValueError, match="psnr"):
        psnr(a, b[:, :, :2])


def test_clip_pixels_matches_open_clip_transform():
    from open_clip.transform import image_transform

    img = smooth_image()
    # the tensor path of open_clip's own eval transform (square size): exact
    ref = image_transform(64, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)(img[0])[None]
    torch.testing.assert_close(clip_pixels(img * 2 - 1, 64, OPENAI_MEAN, OPENAI_STD), ref, atol=1e-5, rtol=0)

    # every resize mode and a non-square size against the PIL path, up to 8-bit
    # rounding (a one-pixel crop offset would be ~0.13 off on this pattern)
    from PIL import Image

    pil = Image.fromarray((img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    for size in (64, (48, 64), (64, 48)):
        for mode in ("shortest", "longest", "squash"):
            ref = image_transform(size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD, resize_mode=mode)(pil)[None]
            mine = clip_pixels(img * 2 - 1, size, OPENAI_MEAN, OPENAI_STD, mode)
            torch.testing.assert_close(mine, ref, atol=0.03, rtol=0, msg=f"{size} {mode}")


def test_lpips_features_match_lpips_forward(scorers):
    a, b = rand_images(3, seed=1), rand_images(3, seed=2)
    net = scorers.lpips_net
    mine = scoring.lpips_distance(net, scoring.lpips_features(net, a), scoring.lpips_features(net, b))
    with torch.inference_mode():
        ref = net(a, b).flatten()
    torch.testing.assert_close(mine, ref, atol=1e-6, rtol=1e-5)
    assert (ref > 0).all()


# ----------------------------------------------------------------------------- scorers


def test_offline_scorers_are_random_and_deterministic(scorers):
    assert scorers.random_weights is True
    d = scorers.description
    assert d["clip_model"] == "imprint-tiny-clip" and d["clip_pretrained"] == "random" and d["clip_random_weights"] is True
    assert d["lpips_trunk"] == "random" and d["random_weights"] is True and d["clip_image_size"] == [64, 64]
    # seeded random init: every worker builds the same scorers (global RNG untouched)
    state = torch.random.get_rng_state()
    again = Scorers.load(dataclasses.replace(TINY_CFG), "cpu", "float32")
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(scorers.clip.state_dict().values(), again.clip.state_dict().values()):
        assert torch.equal(p, q)
    for p, q in zip(scorers.lpips_net.state_dict().values(), again.lpips_net.state_dict().values()):
        assert torch.equal(p, q)


def test_identical_images(scorers):
    src = rand_images(2)
    out = scorers.score(src, ["a cat", "a dog"], src[[0, 1, 1]], [0, 1, 1], ["a tiger", "a wolf", "a wolf"], [0, 1, 1])
    assert out["lpips"] == pytest.approx([0.0, 0.0, 0.0], abs=1e-7)
    assert out["clip_image"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    assert out["clip_direction"] == pytest.approx([0.0, 0.0, 0.0], abs=1e-3)  # no image change: no direction
    # group 1 holds two identical edits: diversity 0; group 0 has one edit: NaN
    assert math.isnan(out["diversity"][0])
    assert out["diversity"][1:] == pytest.approx([0.0, 0.0], abs=1e-7)


def example_batch():
    sources = rand_images(3, seed=10)
    edits = rand_images(7, seed=11)
    edit_source = [0, 0, 0, 1, 1, 2, 0]
    targets = ["a tiger", "a tiger", "a tiger", "a wolf", "a wolf", "a red car", "a lion"]
    groups = [5, 5, 5, 7, 7, 9, 3]
    return sources, ["a cat", "a dog", "a car"], edits, edit_source, targets, groups


def test_scores_against_hand_computation(scorers):
    sources, src_prompts, edits, edit_source, targets, groups = example_batch()
    out = scorers.score(sources, src_prompts, edits, edit_source, targets, groups)
    assert set(out) == set(SCORE_COLUMNS) and all(len(v) == 7 for v in out.values())

    with torch.inference_mode():
        e_img = scorers.embed_images(edits).numpy()
        s_img = scorers.embed_images(sources).numpy()[edit_source]
        t_tgt = scorers.embed_texts(targets).numpy()
        t_src = scorers.embed_texts(src_prompts).numpy()[edit_source]
        lp = scorers.lpips_net(edits, sources[edit_source]).flatten().numpy()
        pair = {(i, j): scorers.lpips_net(edits[i:i + 1], edits[j:j + 1]).item()
                for i, j in [(0, 1), (0, 2), (1, 2), (3, 4)]}

    def cos(u, v):
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    for r in range(7):
        assert np.linalg.norm(e_img[r]) == pytest.approx(1.0, abs=1e-5)
        assert out["clip_text"][r] == pytest.approx(cos(e_img[r], t_tgt[r]), abs=1e-5)
        assert out["clip_image"][r] == pytest.approx(cos(e_img[r], s_img[r]), abs=1e-5)
        assert out["clip_direction"][r] == pytest.approx(cos(e_img[r] - s_img[r], t_tgt[r] - t_src[r]), abs=1e-5)
    assert out["lpips"] == pytest.approx(lp.tolist(), abs=1e-5)
    div_5 = (pair[0, 1] + pair[0, 2] + pair[1, 2]) / 3
    assert out["diversity"][:3] == pytest.approx([div_5] * 3, abs=1e-5)
    assert out["diversity"][3:5] == pytest.approx([pair[3, 4]] * 2, abs=1e-5)
    assert math.isnan(out["diversity"][5]) and math.isnan(out["diversity"][6])


def test_scores_invariant_to_batch_composition(scorers):
    sources, src_prompts, edits, edit_source, targets, groups = example_batch()
    whole = scorers.score(sources, src_prompts, edits, edit_source, targets, groups)

    small = Scorers(dataclasses.replace(TINY_CFG, batch_size=2), scorers.clip, scorers.tokenizer,
                    scorers.lpips_net, scorers.device, scorers.dtype)
    # different batch size (group 5 of 3 rows larger than a batch), rows permuted
    perm = [6, 3, 0, 5, 4, 2, 1]
    permuted = small.score(sources, src_prompts, edits[perm], [edit_source[i] for i in perm],
                           [targets[i] for i in perm], [groups[i] for i in perm])
    # in two calls, each holding whole groups and only the sources it needs
    first = scorers.score(sources[:1], src_prompts[:1], edits[[0, 1, 2, 6]], [0, 0, 0, 0],
                          [targets[i] for i in (0, 1, 2, 6)], [5, 5, 5, 3])
    second = small.score(sources[1:], src_prompts[1:], edits[3:6], [0, 0, 1], targets[3:6], groups[3:6])
    for col in SCORE_COLUMNS:
        np.testing.assert_allclose([permuted[col][perm.index(r)] for r in range(7)], whole[col], atol=1e-5)
        np.testing.assert_allclose(first[col][:3] + second[col] + first[col][3:], whole[col], atol=1e-5)


def test_prompts_encoded_once(scorers):
    seen = []

    def tokenizer(prompts):
        seen.extend(prompts)
        return scorers.tokenizer(prompts)

    counting = Scorers(dataclasses.replace(TINY_CFG, batch_size=2), scorers.clip, tokenizer,
                       scorers.lpips_net, scorers.device, scorers.dtype)
    sources, src_prompts, edits, edit_source, targets, groups = example_batch()
    counting.score(sources, ["a cat", "a tiger", "a cat"], edits, edit_source, targets, groups)
    assert sorted(seen) == sorted({"a cat", "a tiger", "a wolf", "a red car", "a lion"})


def test_score_input_errors(scorers):
    sources, src_prompts, edits, edit_source, targets, groups = example_batch()
    with pytest.raises(ValueError, match="mixes target prompts"):
        scorers.score(sources, src_prompts, edits, edit_source, targets, [5] * 7)
    with pytest.raises(ValueError, match="edit_source entries"):
        scorers.score(sources, src_prompts, edits, [3] * 7, targets, groups)
    with pytest.raises(ValueError, match="target_prompts has 6"):
        scorers.score(sources, src_prompts, edits, edit_source, targets[:6], groups)
    with pytest.raises(ValueError, match="one size"):
        scorers.score(sources[..., :32], src_prompts, edits, edit_source, targets, groups)
    empty = scorers.score(sources, src_prompts, edits[:0], [], [], [])
    assert empty == {c: [] for c in SCORE_COLUMNS}


def test_pretrained_weights_offline_raise(monkeypatch, tmp_path):
    # conftest sets HF_HUB_OFFLINE=1; nothing may be downloaded, nothing falls back to random
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="'ViT-B-32'"):
        Scorers.load(ScoreConfig(clip_model="ViT-B-32", clip_pretrained="openai", lpips_pretrained=False),
                     "cpu", "float32")
    with pytest.raises(WeightsUnavailableError, match="net 'squeeze'.*HF_HUB_OFFLINE"):
        Scorers.load(dataclasses.replace(TINY_CFG, lpips_net="squeeze", lpips_pretrained=True), "cpu", "float32")
    assert not any(tmp_path.rglob("*.pth"))


# ----------------------------------------------------------------------------- filtering


SCORES = {
    #                 rows: 0     1     2     3     4     5     6     7
    "clip_text":      [0.30, 0.25, 0.10, 0.30, 0.30, 0.30, 0.30, 0.30],
    "clip_direction": [0.40, 0.20, 0.50, 0.30, 0.30, 0.60, float("nan"), 0.19],
    "clip_image":     [0.80, 0.90, 0.90, 0.69, 0.75, 0.71, 0.80, 0.80],
    "lpips":          [0.30, 0.10, 0.20, 0.40, 0.50, 0.20, 0.10, 0.60],
    "diversity":      [0.2] * 8,
}
GROUPS = [1, 1, 1, 2, 2, 2, 3, 3]


def test_select_thresholds():
    keep = select(SCORES, GROUPS, FilterConfig.instructpix2pix(keep_top_k=0))
    # row 2 fails clip_text, 3 fails clip_image, 6 has NaN direction, 7 direction 0.19 < 0.2; 1 sits on 0.2 (kept)
    assert keep == [True, True, False, False, True, True, False, False]
    assert select(SCORES, GROUPS, FilterConfig(lpips_max=0.3)) == [True, True, True, False, False, True, True, False]
    assert select(SCORES, GROUPS, FilterConfig()) == [True] * 8


def test_select_top_k_per_group():
    keep = select(SCORES, GROUPS, FilterConfig.instructpix2pix(keep_top_k=1))
    assert keep == [True, False, False, False, False, True, False, False]  # best passing by direction per group
    keep = select(SCORES, GROUPS, FilterConfig(keep_top_k=2))
    assert keep == [True, False, True, True, False, True, True, True]  # rows 3 and 4 tie: the earlier wins
    keep = select(SCORES, GROUPS, FilterConfig(keep_top_k=1))
    assert keep == [False, False, True, False, False, True, False, True]  # NaN ranks last in group 3
    # lpips ranks ascending (closest to the source first)
    keep = select(SCORES, GROUPS, FilterConfig(keep_top_k=1, top_k_by="lpips"))
    assert keep == [False, True, False, False, False, True, True, False]
    assert select(SCORES, GROUPS, FilterConfig(keep_top_k=5)) == [True] * 8


def test_select_ties_are_deterministic():
    scores = {"clip_direction": [0.3, 0.5, 0.3, 0.5, 0.3]}
    assert select(scores, [0] * 5, FilterConfig(keep_top_k=1)) == [False, True, False, False, False]
    assert select(scores, [0] * 5, FilterConfig(keep_top_k=3)) == [True, True, False, True, False]
    # group ids need not be contiguous
    assert select(scores, [4, 9, 4, 9, 4], FilterConfig(keep_top_k=1)) == [True, True, False, False, False]


def test_select_errors():
    with pytest.raises(ValueError, match="'clip_image' score"):
        select({"clip_direction": [0.1]}, [0], FilterConfig(clip_image_min=0.7))
    with pytest.raises(ValueError, match="has 2 values for 1 rows"):
        select({"clip_direction": [0.1, 0.2]}, [0], FilterConfig(keep_top_k=1))


@pytest.mark.parametrize(
    "score, filt, message",
    [
        (dict(lpips_net="resnet"), {}, "score.lpips_net must be one of alex, vgg, squeeze"),
        (dict(batch_size=0), {}, "score.batch_size must be a positive integer"),
        (dict(clip_model="ViT-Q-99"), {}, "score.clip_model 'ViT-Q-99' is not an open_clip model"),
        (dict(clip_model="hf-hub:someone/clip"), {}, "hf-hub ids are not supported"),
        (dict(clip_pretrained="laion9000"), {}, "score.clip_pretrained 'laion9000' is neither a pretrained tag of"),
        ({}, dict(keep_top_k=-1), "filter.keep_top_k must be an integer >= 0"),
        ({}, dict(top_k_by="clip_score"), "filter.top_k_by must be one of clip_text, clip_direction, clip_image"),
        ({}, dict(top_k_by="diversity"), "filter.top_k_by must be one of"),
        ({}, dict(clip_image_min=float("nan")), "filter.clip_image_min must be a finite number"),
        (dict(enabled=False), dict(clip_text_min=0.2), "need score.enabled = true"),
    ],
)
def test_config_errors(score, filt, message):
    with pytest.raises(ValueError, match=message):
        validate_configs(ScoreConfig(**score), FilterConfig(**filt))


def test_valid_configs_pass():
    validate_configs(ScoreConfig(), FilterConfig.instructpix2pix())
    validate_configs(TINY_CFG, FilterConfig(lpips_max=0.5, keep_top_k=2, top_k_by="lpips"))
    validate_configs(ScoreConfig(enabled=False, lpips_net="bogus"), FilterConfig())  # unused section not checked
