"""The SDXL family on `tiny-sdxl`: two text encoders and the pooled
embedding, micro-conditioning (time ids) in (height, width) order, the
refiner's 5-value variant, zero unconditional embeddings, the fp32 VAE,
every inversion method, and jobs end to end (P2P and stored codes included)."""

import json

import pytest
import torch

from pipeline.inversion import get_method
from pipeline.inversion.common import Conditioning
from pipeline.models import (TINY_SDXL, ImageGeometry, build_random, image_geometry, load_models, model_limits,
                             time_ids_count)
from pipeline.spec import ImageSpec

METHODS = ["edit-friendly", "ddim", "edict", "ddim-forward", "cycle"]


@pytest.fixture(scope="module")
def xl():
    return load_models(TINY_SDXL, device="cpu", dtype="float32")


class Recording:
    """A UNet wrapper that records the added conditioning of every call."""

    def __init__(self, net):
        self.net, self.dtype, self.added = net, net.dtype, []

    def __call__(self, x, t, emb, **kwargs):
        self.added.append(kwargs.get("added_cond_kwargs"))
        return self.net(x, t, emb, **kwargs)


def test_text_encoding_concatenates_penultimate_states_and_pools_the_second_encoder(xl):
    prompts = ["a photo of a cat", "a dog"]
    c = xl.encode_text(prompts)
    assert isinstance(c, Conditioning) and c.tokens.shape == (2, 77, 64) and c.added["text_embeds"].shape == (2, 32)
    ids = xl.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    h1 = xl.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    out2 = xl.text_encoder_2(ids, output_hidden_states=True)
    assert torch.equal(c.tokens, torch.cat([h1, out2.hidden_states[-2]], -1))
    assert torch.equal(c.added["text_embeds"], out2.text_embeds)
    assert not torch.equal(h1, xl.text_encoder(ids)[0])  # the penultimate layer, not the last
    assert xl.family == "sdxl" and xl.n_time_ids == 6 and xl.resolution == 128
    assert xl.count_tokens("a b c") == 5 and model_limits(TINY_SDXL).text_context == 77


def test_prompt_tokens_are_counted_against_both_tokenizers(xl):
    class Longer:
        def __init__(self, tok):
            self.tok = tok

        def __call__(self, text, **kw):
            out = self.tok(text, **kw)
            out["input_ids"] = list(out["input_ids"]) + [0, 0]
            return out

    from dataclasses import replace

    m = replace(xl, tokenizer_2=Longer(xl.tokenizer_2))
    assert m.count_tokens("a b c") == 7


def test_time_ids_are_height_width_from_the_real_image_size(xl):
    spec = ImageSpec()  # shorter side to the resolution, centre crop
    # a 300 x 100 (w x h) image: scaled to 384 x 128, cropped to a multiple of image.multiple
    g = image_geometry((300, 100), (128, 256), spec, 128)
    (rw, rh), (cw, ch) = (384, 128), (256, 128)
    assert g == ImageGeometry((100, 300), ((rh - ch) // 2, (rw - cw) // 2), (128, 256))
    ids = xl.time_ids([g])
    assert ids.tolist() == [[100.0, 300.0, 0.0, 64.0, 128.0, 256.0]]
    # "square": the largest centred square, then resized
    sq = image_geometry((300, 100), (128, 128), ImageSpec(resize="square"), 128)
    assert sq == ImageGeometry((100, 300), (0, round(100 * 128 / 100)), (128, 128))
    # every UNet call of an inversion and an edit gets the rows' time ids and pooled embeddings, doubled for CFG
    x0 = xl.encode_images(torch.rand(1, 3, 128, 256) * 2 - 1)
    cond = xl.for_images(xl.encode_text(["a cat"]), [g])
    uncond = xl.for_images(xl.unconditional(), [g], unconditional=True)
    net = Recording(xl.unet)
    ef = get_method("edit-friendly")
    code = ef.invert(net, xl.scheduler, x0, cond, uncond, num_steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    ef.edit(net, xl.scheduler, code, cond, uncond, cfg_scale=2.0)
    assert len(net.added) == 6
    for a in net.added:
        assert a["time_ids"].tolist() == [[100.0, 300.0, 0.0, 64.0, 128.0, 256.0]] * 2
        assert torch.equal(a["text_embeds"][0], torch.zeros(32)) and torch.equal(a["text_embeds"][1], cond.added["text_embeds"][0])


def test_refiner_variant_and_a_mismatched_added_embedding(xl):
    from diffusers import UNet2DConditionModel

    from pipeline.models import RANDOM_MODELS

    cfg = dict(RANDOM_MODELS[TINY_SDXL]["unet"])
    assert time_ids_count(xl.unet, 32) == 6 and xl.unet.add_embedding.linear_1.in_features == 6 * 8 + 32
    refiner = UNet2DConditionModel(sample_size=16, **{**cfg, "projection_class_embeddings_input_dim": 5 * 8 + 32})
    assert time_ids_count(refiner, 32) == 5
    from dataclasses import replace

    m = replace(xl, unet=refiner, n_time_ids=5)
    g = ImageGeometry((100, 300), (0, 64), (128, 256))
    assert m.time_ids([g]).tolist() == [[100.0, 300.0, 0.0, 64.0, 6.0]]
    assert m.time_ids([g], unconditional=True).tolist() == [[100.0, 300.0, 0.0, 64.0, 2.5]]
    bad = UNet2DConditionModel(sample_size=16, **{**cfg, "projection_class_embeddings_input_dim": 7 * 8 + 32})
    with pytest.raises(ValueError, match="neither 6 time ids .* nor 5"):
        time_ids_count(bad, 32)


def test_unconditional_rows_are_zeros_when_the_model_says_so(xl):
    from dataclasses import replace

    u = xl.unconditional()
    assert xl.force_zeros_uncond
    assert torch.equal(u.tokens, torch.zeros(1, 77, 64)) and torch.equal(u.added["text_embeds"], torch.zeros(1, 32))
    empty = xl.encode_text([""])
    assert empty.tokens.abs().sum() > 0
    kept = replace(xl, force_zeros_uncond=False).unconditional()
    assert torch.equal(kept.tokens, empty.tokens) and torch.equal(kept.added["text_embeds"], empty.added["text_embeds"])


def test_vae_runs_in_fp32_under_a_half_precision_unet(xl):
    half = build_random(TINY_SDXL, "cpu", torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and half.text_encoder_2.dtype == torch.bfloat16
    assert half.vae.dtype == torch.float32 and half.vae_dtype == torch.float32 and half.vae.config.force_upcast
    img = torch.rand(1, 3, 128, 128) * 2 - 1
    lat = half.encode_images(img)
    assert torch.equal(lat, xl.encode_images(img))  # the same fp32 VAE as the fp32 model's
    assert half.scaling_factor == 0.13025
    assert torch.equal(half.decode_latents(lat), xl.decode_latents(lat))
    # the half-precision UNet runs under the conditioning's cast
    cond = half.for_images(half.encode_text(["a cat"]), [ImageGeometry.plain(128, 128)])
    code = get_method("ddim").invert(half.unet, half.scheduler, lat, cond, None, num_steps=2, cfg_scale=1.0)
    assert torch.isfinite(code.x_start).all()


@pytest.mark.parametrize("name", METHODS)
def test_every_method_reconstructs_and_edits_on_sdxl(xl, name):
    method = get_method(name)
    x0 = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(1))  # a non-square image's latents
    geo = [ImageGeometry((96, 150), (0, 3), (128, 192)), ImageGeometry((128, 192), (0, 0), (128, 192))]
    src = xl.for_images(xl.encode_text(["a photo of a cat"]), geo)
    tgt = xl.for_images(xl.encode_text(["a photo of a dog"]), geo)
    uncond = xl.for_images(xl.unconditional(), geo, unconditional=True)
    gens = [torch.Generator().manual_seed(k) for k in range(2)]
    code = method.invert(xl.unet, xl.scheduler, x0, src, uncond, num_steps=8, skip=2, cfg_scale=3.0,
                         generator=gens, **method.DEFAULTS)
    rec = method.edit(xl.unet, xl.scheduler, code, src, uncond, cfg_scale=3.0).float()
    err = (rec - x0).abs().max().item()
    bound = {"edit-friendly": 1e-4, "edict": 1e-4, "cycle": 1e-4}.get(name)
    if bound is not None:  # the exact methods
        assert err < bound, err
    else:  # DDIM inversion is approximate (and far off on random weights); it runs and returns latents
        assert rec.shape == x0.shape and torch.isfinite(rec).all()
    edited = method.edit(xl.unet, xl.scheduler, code, tgt, uncond, cfg_scale=3.0).float()
    assert torch.isfinite(edited).all() and (edited - rec).abs().max() > 1e-3


def test_edit_friendly_reconstruction_error_in_fp32(xl):
    x0 = xl.encode_images(torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2)) * 2 - 1)
    geo = [ImageGeometry.plain(128, 128)]
    src, uncond = xl.for_images(xl.encode_text(["a cat"]), geo), xl.for_images(xl.unconditional(), geo, unconditional=True)
    ef = get_method("edit-friendly")
    code = ef.invert(xl.unet, xl.scheduler, x0, src, uncond, num_steps=10, cfg_scale=3.5,
                     generator=torch.Generator().manual_seed(0))
    err = (ef.edit(xl.unet, xl.scheduler, code, src, uncond, cfg_scale=3.5) - x0).abs().max().item()
    assert err < 1e-4, err


def test_loads_from_a_saved_diffusers_folder(xl, tmp_path):
    from pipeline.models import save_pipeline

    save_pipeline(xl, tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True and "text_encoder_2" in index
    m = load_models(str(tmp_path / "m"), device="cpu", dtype="float32")
    assert m.family == "sdxl" and m.n_time_ids == 6 and m.force_zeros_uncond and m.resolution == 128
    assert model_limits(str(tmp_path / "m")) == model_limits(TINY_SDXL)
    a, b = m.encode_text(["a cat"]), xl.encode_text(["a cat"])
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.added["text_embeds"], b.added["text_embeds"])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    c = xl.for_images(b, [ImageGeometry.plain(128, 128)])
    t = torch.tensor(500)
    assert torch.equal(m.unet(x, t, c.tokens, **c.unet_kwargs()).sample, xl.unet(x, t, c.tokens, **c.unet_kwargs()).sample)


def test_job_end_to_end_with_p2p_and_stored_codes(tmp_path):
    from helpers_data import good_samples, write
    from pipeline.executor import run_job
    from pipeline.spec import load_spec
    from pipeline.store import OutputStore

    shard = write(tmp_path / "x-000.tar", good_samples("x", 2))  # 96x80 and 112x80: non-square after resizing
    raw = {
        "input": {"shards": [str(shard)], "templates": ["{source} at night"]},
        "model": {"id": TINY_SDXL},
        "inversion": {"method": ["edit-friendly", "ddim"], "steps": 4, "skip": 1},
        "edit": {"seeds": 2, "control": ["none", "p2p"], "mode": "refine"},
        "output": {"path": str(tmp_path / "out"), "noise": True, "noise_dtype": "float32", "image_format": "png"},
        "score": {"clip_model": "imprint-tiny-clip", "clip_pretrained": "none", "lpips_net": "squeeze",
                  "lpips_pretrained": False},
        "run": {"executor": "inline", "threads": 2},
    }
    report = run_job(load_spec(raw=raw), progress=False)
    assert report.done == 1 and not report.failed
    store = OutputStore.open(str(tmp_path / "out"))
    res = store.read_table("results").to_pylist()
    assert {r["method"] for r in res} == {"edit-friendly", "edit-friendly+p2p", "ddim", "ddim+p2p"}
    # per method x control: targets (x000: json + template, x001: template) x seeds; ddim is
    # deterministic: one edit per (image, target)
    assert len(res) == 2 * (2 + 1) * 2 + 2 * (2 + 1) * 1
    assert all(r["clip_text"] is not None for r in res)
    for s in store.read_table("sources").to_pylist():
        errs = json.loads(s["recon_errors"])
        assert errs["edit-friendly"] < 1e-3 and errs["edit-friendly+p2p"] < 1e-3, errs
    # each stored code keeps the micro-conditioning geometry it was inverted under (edit-codes reuses it)
    noise = store.read_table("noise").to_pylist()
    geo = {r["key"]: json.loads(r["params"])["image_geometry"] for r in noise}
    assert geo["x000"][0] == [80, 96] and geo["x001"][0] == [80, 112]  # (h, w) as decoded
    assert all(geo[r["key"]][2] == [r["height"], r["width"]] for r in noise)  # the model image's (h, w)
    raw2 = {
        "input": {"codes": str(tmp_path / "out"), "templates": ["{source} in the rain"]},
        "model": {"id": TINY_SDXL},
        "edit": {"control": "p2p", "mode": "refine"},
        "output": {"path": str(tmp_path / "out2"), "image_format": "png"},
        "score": {"enabled": False},
        "run": {"executor": "inline", "threads": 2},
    }
    report = run_job(load_spec(raw=raw2), progress=False)
    assert not report.failed and report.edits > 0


def test_bench_counts_flops_of_an_sdxl_unet(xl):
    from pipeline.bench import unet_flops_per_eval

    small, large = unet_flops_per_eval(xl.unet, (16, 16)), unet_flops_per_eval(xl.unet, (16, 32))
    assert 0 < small < large
