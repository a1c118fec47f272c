"""The PIL-level Python API (`pipeline.Editor`): images in, images out, through
the job engine's code paths, on the tiny and toy models."""

import dataclasses
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline
from pipeline.data import target_size, to_pil
from pipeline.inversion import get_method, method_names
from pipeline.spec import JobSpec, SpecError

FAST = dict(steps=4, skip=1)


@pytest.fixture(scope="module")
def tiny_editor():
    return pipeline.Editor.from_pretrained("tiny", device="cpu")


@pytest.fixture(scope="module")
def toy_editor():
    return pipeline.Editor.from_pretrained("toy", device="cpu")


def _photo(w, h, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8), "RGB")


def _diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def test_codes_per_image_and_seed_with_the_job_geometry(tiny_editor):
    wide, tall = _photo(300, 150), _photo(90, 200, seed=1)
    codes = tiny_editor.invert([wide, tall], ["a photo", "a drawing"], seeds=3, **FAST)
    assert len(codes) == 6
    assert [c.image_id for c in codes][::3] != [codes[0].image_id] * 2  # two images
    assert [c.seed_index for c in codes] == [0, 1, 2] * 2
    assert [c.source_prompt for c in codes] == ["a photo"] * 3 + ["a drawing"] * 3
    assert len({c.seed for c in codes}) == 6
    spec = JobSpec()
    for img, c in ((wide, codes[0]), (tall, codes[3])):
        assert c.size == target_size(*img.size, spec.image, tiny_editor.models.resolution)[1]  # the job's rule
        assert tuple(c.code.x_start.shape[-2:]) == (c.size[1] // 8, c.size[0] // 8)
    edits = tiny_editor.edit(codes, ["a painting", "a sketch"])
    assert len(edits) == 2 * 2 * 3 and all(isinstance(e, Image.Image) for e in edits)
    assert [e.size for e in edits] == [codes[0].size] * 6 + [codes[3].size] * 6


def test_codes_and_edits_are_the_tensor_level_methods(tiny_editor):
    """A code is edit_friendly.invert with the code's seed; an edit is
    edit_friendly.edit of it, decoded: the API adds no math of its own."""
    m = tiny_editor.models
    img = _photo(128, 128)
    code = tiny_editor.invert(img, "a photo", seeds=2, **FAST)[1]
    ef = get_method("edit-friendly")
    x0 = m.encode_images(torch.from_numpy(np.asarray(img, np.float32) / 127.5 - 1).permute(2, 0, 1)[None])
    emb, uncond = m.encode_text(["a photo"]), m.encode_text([""])
    ref = ef.invert(m.unet, m.scheduler, x0, emb, uncond, num_steps=4, skip=1, cfg_scale=JobSpec().inversion.cfg_source,
                    generator=[torch.Generator().manual_seed(code.seed)])
    torch.testing.assert_close(code.code.x_start, ref.x_start, atol=1e-5, rtol=0)
    torch.testing.assert_close(code.code.zs, ref.zs, atol=1e-4, rtol=1e-4)
    out = tiny_editor.edit(code, "a painting", cfg_target=7.5)
    lat = ef.edit(m.unet, m.scheduler, ref, m.encode_text(["a painting"]), uncond, cfg_scale=7.5)
    assert _diff(out[0], to_pil(m.decode_latents(lat)[0])) <= 1
    # the same image gives the same codes wherever it is passed (seeds come from its pixels and the seed argument)
    again = tiny_editor.invert([_photo(64, 64, 5), img], "a photo", seeds=2, **FAST)[3]
    assert again.seed == code.seed  # (rows batched differently round differently in the last bits)
    torch.testing.assert_close(again.code.x_start, code.code.x_start, atol=1e-5, rtol=0)
    torch.testing.assert_close(again.code.zs, code.code.zs, atol=1e-3, rtol=1e-3)
    assert tiny_editor.invert(img, "a photo", seeds=2, seed=1, **FAST)[1].seed != code.seed


def test_defaults_are_the_job_specs(tiny_editor):
    spec = JobSpec()
    c = tiny_editor.invert(_photo(128, 128), "a photo")[0]
    assert (c.code.num_steps, c.code.skip, c.method) == (spec.inversion.steps, spec.inversion.skip, spec.inversion.method)
    assert c.code.params["cfg_source"] == spec.inversion.cfg_source
    assert c.code.params["eta"] == get_method("edit-friendly").DEFAULTS["eta"]


@pytest.mark.parametrize("method", method_names("sd"))
def test_every_method(tiny_editor, method):
    img = _photo(160, 128)
    n = 1 if get_method(method).SEED_INDEPENDENT else 2
    codes = tiny_editor.invert(img, "a photo", seeds=2, method=method, **FAST)
    assert len(codes) == n and all(c.method == method for c in codes)
    out = tiny_editor(img, "a photo", ["a painting", "a sketch"], seeds=2, method=method, **FAST)
    assert len(out) == 2 * n and all(o.size == codes[0].size for o in out)
    # edits come ordered by image, target, seed
    by_target = [tiny_editor.edit(codes, t) for t in ("a painting", "a sketch")]
    assert all(_diff(a, b) <= 2 for a, b in zip(out, by_target[0] + by_target[1]))


def test_order_image_target_seed(tiny_editor):
    a, b = _photo(128, 128), _photo(128, 192, seed=3)
    codes = tiny_editor.invert([a, b], ["a photo", "a drawing"], seeds=2, **FAST)
    both = tiny_editor.edit(codes, [["a painting", "a sketch"], ["a statue"]])
    assert len(both) == 2 * 2 + 1 * 2
    alone = (tiny_editor.edit(codes[0], "a painting") + tiny_editor.edit(codes[1], "a painting")
             + tiny_editor.edit(codes[:2], "a sketch") + tiny_editor.edit(codes[2:], "a statue"))
    assert [o.size for o in both] == [o.size for o in alone]
    assert all(_diff(x, y) <= 2 for x, y in zip(both, alone))
    assert _diff(both[0], both[1]) > 10  # two seeds, two different edits


def test_bad_arguments_name_the_field(tiny_editor):
    img = _photo(128, 128)
    with pytest.raises(SpecError, match="inversion.skip"):
        tiny_editor.invert(img, "a photo", steps=4, skip=4)
    with pytest.raises(SpecError, match="inversion.method"):
        tiny_editor.invert(img, "a photo", method="nope")
    with pytest.raises(SpecError, match="inversion.params.nope"):
        tiny_editor.invert(img, "a photo", nope=1, **FAST)
    with pytest.raises(SpecError, match="edit.seeds"):
        tiny_editor.invert(img, "a photo", seeds=0, **FAST)
    with pytest.raises(ValueError, match="source_prompts"):
        tiny_editor.invert([img, img], ["a", "b", "c"], **FAST)
    with pytest.raises(TypeError, match="PIL"):
        tiny_editor.invert(np.zeros((64, 64, 3)), "a photo", **FAST)
    with pytest.raises(ValueError, match="min_side"):
        tiny_editor.invert(_photo(8, 64), "a photo", **FAST)
    codes = tiny_editor.invert(img, "a photo", **FAST)
    with pytest.raises(ValueError, match="target_prompts"):
        tiny_editor.edit(codes, [["a"], ["b"]])
    with pytest.raises(SpecError, match="edit.params.nope"):
        tiny_editor.edit(codes, "a", nope=1.0)
    # over-long prompts are cut by the text encoder, as a job's input.truncate_prompts does by default
    assert len(tiny_editor.edit(codes, "word " * 100)) == 1
    strict = pipeline.Editor(tiny_editor.models, truncate_prompts=False)
    with pytest.raises(ValueError, match="too long"):
        strict.edit(codes, "word " * 100)


def test_edit_refuses_codes_of_another_model(tiny_editor, toy_editor):
    # as `imprint edit-codes` refuses a stored code of another model (codes.check_compatible), with its message
    toy_codes = toy_editor.invert(_photo(64, 64), "a red circle on a white background", **FAST)
    with pytest.raises(ValueError, match=r"was made with model 'toy', not 'tiny'"):
        tiny_editor.edit(toy_codes, "a painting")
    tiny_codes = tiny_editor.invert(_photo(128, 128), "a photo", **FAST)
    with pytest.raises(ValueError, match=r"was made with model 'tiny', not 'toy'"):
        toy_editor.edit(tiny_codes, "a blue circle on a white background")
    # the same model with another schedule: the scheduler configuration's differing keys are named
    other = dataclasses.replace(tiny_codes[0], scheduler_config=tiny_codes[0].scheduler_config.replace(
        '"prediction_type": "epsilon"', '"prediction_type": "v_prediction"'))
    assert other.scheduler_config != tiny_codes[0].scheduler_config
    with pytest.raises(ValueError, match="another scheduler configuration .differs in prediction_type"):
        tiny_editor.edit(other, "a painting")


def test_invert_without_prompts_or_images_names_the_argument(tiny_editor):
    img = _photo(128, 128)
    with pytest.raises(ValueError, match="source_prompts: expected a prompt or one per image.*got None"):
        tiny_editor.invert(img, None, **FAST)
    with pytest.raises(ValueError, match="source_prompts: .*got int"):
        tiny_editor.invert(img, 3, **FAST)
    with pytest.raises(ValueError, match="images: expected a PIL image or a list of them, got None"):
        tiny_editor.invert(None, "a photo", **FAST)


def test_one_editor_serves_threads(tiny_editor):
    """Concurrent calls (plain edits and a p2p edit, which installs attention
    processors on the shared UNet and so runs alone) give what each gives alone."""
    images = [_photo(128, 128, seed=i) for i in range(3)]
    jobs = [dict(image=images[0], target="a painting"), dict(image=images[1], target="a sketch", method="ddim"),
            dict(image=images[2], target="a photo of a dog", control="p2p", mode="refine"),
            dict(image=images[0], target="a statue", method="cycle")]

    def call(j):
        kw = {k: v for k, v in j.items() if k not in ("image", "target")}
        return tiny_editor(j["image"], "a photo", [j["target"]], seeds=2, **FAST, **kw)

    alone = [call(j) for j in jobs]
    results: dict[int, list] = {}
    errors = []

    def run(i):
        try:
            for _ in range(2):
                results.setdefault(i, []).append(call(jobs[i]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, outs in results.items():
        assert len(outs) == 2
        for out in outs:
            assert len(out) == len(alone[i]) and all(_diff(a, b) <= 2 for a, b in zip(out, alone[i]))


def test_toy_reconstruction_and_diversity(toy_editor):
    """On the trained toy model: editing a code with its own source prompt at
    cfg_source gives the image back up to the toy autoencoder's own round-trip
    error (every code decodes to the same image); N codes give N different
    edits; a deterministic method gives one."""
    from pipeline.toy.scenes import Scene

    scene = Scene("circle", "red", "white", 30.0, 34.0, 12.0)
    img = to_pil(torch.from_numpy(scene.image()))
    steps = dict(steps=12, skip=4)
    codes = toy_editor.invert(img, scene.caption, seeds=2, **steps)
    recon = toy_editor.edit(codes, scene.caption, cfg_target=JobSpec().inversion.cfg_source)
    assert _diff(recon[0], recon[1]) <= 2  # exact in latent space: both codes give the same latent back
    assert all(np.abs(np.asarray(r, np.float32) - np.asarray(img, np.float32)).mean() < 4.0 for r in recon)
    edits = toy_editor.edit(codes, scene.with_color("blue").caption, cfg_target=3)
    assert _diff(edits[0], edits[1]) > 10
    assert _diff(edits[0], img) > 30
    assert len(toy_editor(img, scene.caption, [scene.with_color("blue").caption], seeds=3, method="edict", **steps)) == 1
