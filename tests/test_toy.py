"""The toy model that ships with imprint, and the paper's claims checked on
it end to end through the plain Python API, judged by the scene oracle (the
exact masks and colours of each drawn scene), not by a learned scorer.

Cheap checks run in `make test`; the sweeps (trade-off curve, shifts,
strokes, noise statistics) are `slow`. Figures measured on the shipped
weights are in the README ("The toy model")."""

import pickle

import numpy as np
import pytest
import torch

from pipeline.models import load_models
from pipeline.spec import load_spec
from pipeline.toy import oracle
from pipeline.toy import evaluate as ev
from pipeline.models.toy import FACTOR, LATENT_CHANNELS, PREDICTION_TYPE, TOY_CLIP_DIR, TOY_DIR
from pipeline.toy.scenes import BACKGROUNDS, COLORS, SHAPES, Scene, caption, random_batch, scene_batch


@pytest.fixture(scope="module")
def toy():
    return load_models("toy", device="cpu")


@pytest.fixture(autouse=True)
def one_thread():
    # These tests run many small UNet calls; on a shared 2-core machine one
    # thread is several times faster than two (no spinning on a descheduled
    # partner thread).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the toy world


def test_scene_vocabulary_and_captions():
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    assert {"red", "green", "blue", "yellow", "purple", "orange"} <= set(COLORS)
    assert {"white", "black", "gray"} <= set(BACKGROUNDS)
    assert caption("red", "circle", "white") == "a red circle on a white background"
    images, masks, captions, scenes = random_batch(np.random.default_rng(0), 32)
    assert images.shape == (32, 3, 64, 64) and masks.shape == (32, 64, 64) and masks.dtype == torch.bool
    assert images.min() >= -1 and images.max() <= 1
    for s, c, m in zip(scenes, captions, masks):
        assert c == f"a {s.color} {s.shape} on a {s.background} background"
        assert 0.03 < m.float().mean() < 0.6  # a visible shape, not the whole image
    # the generator is a pure function of its seed
    again = random_batch(np.random.default_rng(0), 32)
    assert torch.equal(again[0], images) and again[2] == captions


def test_oracle_reads_clean_scenes_exactly():
    scenes = [Scene(sh, co, bg, 30.0, 34.0, 12.0) for sh in SHAPES for co in COLORS for bg in BACKGROUNDS]
    images, masks, _ = scene_batch(scenes)
    assert oracle.region_color(images, masks) == [s.color for s in scenes]
    assert torch.allclose(oracle.iou(oracle.segment(images, [s.background for s in scenes]), masks), torch.ones(len(scenes)))
    moved = scene_batch([s.shifted(4, 0) for s in scenes])[1]
    d = oracle.centroid(moved) - oracle.centroid(masks)
    assert torch.allclose(d, torch.tensor([4.0, 0.0]).expand_as(d), atol=0.3)
    with pytest.raises(ValueError, match="unknown shape"):
        Scene("hexagon", "red", "white", 30, 30, 10).mask()


# ----------------------------------------------------------------------------- the shipped model


def test_toy_weights_ship_small_in_the_package():
    files = [p for d in (TOY_DIR, TOY_CLIP_DIR) for p in d.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20


def test_toy_loads_offline_through_load_models(toy):
    assert toy.model_id == "toy" and not toy.random_weights
    assert toy.resolution == 64 and toy.vae_scale_factor == FACTOR and toy.prediction_type == PREDICTION_TYPE
    images, _, captions = scene_batch([Scene("circle", "red", "white", 30, 30, 10)])
    assert toy.encode_text(captions).shape == (1, 77, 32)
    assert toy.count_tokens(captions[0]) == 9


def test_toy_autoencoder_round_trips_scenes_with_unit_variance_latents(toy):
    # the trained AutoencoderKL: scaled latents of about unit spread (the
    # scaling factor is measured at training), decoded back to the scene
    # within a few 8-bit levels on average, the shape where it was
    images, masks, _, scenes = random_batch(np.random.default_rng(11), 32)
    lat = toy.encode_images(images)
    assert lat.shape == (32, LATENT_CHANNELS, 16, 16)
    assert 0.7 < float(lat.std()) < 1.4
    rec = toy.decode_latents(lat)
    assert float((rec - images).abs().mean()) * 127.5 < 4.0
    ious = oracle.iou(oracle.segment(rec, [s.background for s in scenes]), masks)
    assert float(ious.mean()) > 0.8  # edges blur by about a pixel (0.88 measured on 8 scenes)
    assert oracle.region_color(rec, masks) == [s.color for s in scenes]


def test_edit_friendly_reconstructs_toy_scenes_exactly(toy):
    # exact in latent space: the decoded reconstruction is the autoencoder's own round trip
    scenes, _ = ev.colour_edit_scenes(4, seed=3)
    code = ev.invert_scenes(toy, scenes, setting=ev.Setting(steps=20, skip=5))
    images, _, captions = scene_batch(scenes)
    rec = ev.edit_code(toy, code, captions, cfg_target=3.5)
    assert (rec - toy.decode_latents(toy.encode_images(images))).abs().max() < 1e-3


# ----------------------------------------------------------------------------- the paper's claims


# Claims the shipped weights do not meet are marked xfail with the figures
# measured on them; strict, so a better-trained model that meets a claim turns
# its marker into a failure to remove. Thresholds are the issue's, unchanged.
NOT_MET = "not met by the shipped toy weights (README 'The toy model'): "


@pytest.mark.slow  # 43 s for a claim the weights do not meet; make test keeps the demo setting's check
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=NOT_MET + "19/20 edits reach the target colour (95%) with mask IoU "
                   "0.61 on average, but only 11/20 keep the outline (IoU >= 0.6): at guidance 9 shapes swell; the "
                   "demo's guidance 3 meets it (test_colour_edit_at_the_demo_setting)")
def test_colour_edit_at_the_papers_setting(toy):
    """`a red circle ...` -> `a green circle ...` at 100 steps, skip 36,
    guidance 3.5 / 9: the edited shape has the target colour in >= 85% of
    edits and keeps its place and outline (mask IoU with the source >= 0.6)."""
    r = ev.colour_edits(toy, 20)
    assert r["success"] >= 0.85, r
    assert r["iou_mean"] >= 0.6, r
    assert r["structure_kept"] >= 0.85, r


def test_colour_edit_at_the_demo_setting(toy):
    """The setting jobs/demo.toml ships (evaluate.DEMO, chosen by the sweep):
    on 16 scenes the edited shape has the target colour in >= 85% of edits,
    keeps its outline (mask IoU with the source >= 0.6 on average, and in
    >= 85% of edits) and the background away from it changes by <= 10/255."""
    torch.set_num_threads(1)
    r = ev.colour_edits(toy, 16, setting=ev.DEMO)
    assert ev.meets_targets(r), r
    assert r["structure_kept"] >= 0.85, r


def test_demo_job_uses_the_demo_setting():
    spec = load_spec("jobs/demo.toml")
    inv = spec.inversion
    assert (inv.steps, inv.skip, inv.cfg_source, spec.edit.cfg_target) == (
        ev.DEMO.steps, ev.DEMO.skip, ev.DEMO.cfg_source, ev.DEMO.cfg_target)


@pytest.fixture(scope="module")
def diversity(toy):
    torch.set_num_threads(1)
    return ev.diversity(toy, n_scenes=2, n_codes=3, methods=("edit-friendly", "ddim", "edict"), setting=ev.DEMO)


def test_diversity_ddim_and_edict_codes_give_identical_edits(diversity):
    r = diversity
    assert r["ddim"]["max_abs_diff"] == 0.0 and r["edict"]["max_abs_diff"] == 0.0, r
    assert r["edit-friendly"]["max_abs_diff"] > 0.05, r  # N edit-friendly codes give different images


@pytest.mark.slow
def test_diversity_edit_friendly_gives_visibly_different_edits(toy):
    """At the demo's setting two edit-friendly codes of each of 12 scenes give
    visibly different edits (the sweep's measure: mean absolute pixel
    difference; it varies from scene to scene: 0.008 on the first 4 scenes
    against 0.018 on 12), and both are edits."""
    torch.set_num_threads(1)
    r = ev.diversity(toy, 12, 2, methods=("edit-friendly",), setting=ev.DEMO)["edit-friendly"]
    assert r["mean_abs_diff"] >= ev.TARGET_DIVERSITY, r  # visibly different
    assert r["success"] >= ev.TARGET_SUCCESS, r  # ... and all of them edits


def assert_structure_kept_at_equal_success(r: dict) -> None:
    """Against every other method, at each of its points, edit-friendly's best
    outline at equal or higher success is no worse (gap >= -0.02)."""
    for method, gaps in r["dominance"].items():
        comparable = [g for g in gaps if not np.isnan(g)]
        assert comparable and min(comparable) >= -0.02, (method, r)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=NOT_MET + "at skip 36 DDIM inversion's lightest edit (cfg_target 3, IoU "
                   "0.84, success 12/12) keeps the outline better than any edit-friendly point (best 0.81): gap -0.03; "
                   "from cfg_target 5 up edit-friendly is ahead (+0.00 to +0.10), and ahead of CycleDiffusion throughout")
def test_tradeoff_edit_friendly_keeps_structure_at_equal_success(toy):
    r = ev.tradeoff(toy, 12, cfg_targets=(3.0, 5.0, 9.0, 15.0))
    assert max(p["success"] for p in r["curves"]["edit-friendly"]) >= 0.5, r  # a curve to compare
    assert_structure_kept_at_equal_success(r)


@pytest.mark.slow
def test_tradeoff_edit_friendly_keeps_structure_at_equal_success_at_skip_64(toy):
    """The same comparison with the edit starting later (skip 64): at every
    target guidance from 3 to 15, edit-friendly's best outline at equal or
    higher success beats DDIM inversion's and CycleDiffusion's."""
    torch.set_num_threads(1)
    r = ev.tradeoff(toy, 8, cfg_targets=(3.0, 5.0, 9.0, 15.0), setting=ev.Setting(skip=64))
    assert max(p["success"] for p in r["curves"]["edit-friendly"]) >= 0.85, r
    assert_structure_kept_at_equal_success(r)


@pytest.mark.slow
def test_shifting_the_code_moves_the_shape_and_beats_native_noise(toy):
    """The paper's Fig. 11 on toy scenes: shifting edit-friendly noise maps by
    d latent pixels moves the generated shape by d x the autoencoder's factor
    (within 1 image pixel on average), and shifted edit-friendly codes stay
    closer to the shifted source than native noise shifted the same way."""
    r = ev.shift_check(toy, 6, shifts=(1, 2))
    for d, m in r["moves"].items():
        assert m["err_mean_px"] <= 1.0, (d, r)
    for d, mse in r["fig11_mse"].items():
        assert mse["edit-friendly"] < mse["native"], (d, r)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=NOT_MET + "at the paper's s = 0.05, T1..T2 = 20..70, 0 of 8 stroked "
                   "halves take the stroke colour (the unstroked halves keep theirs in 8 of 8)")
def test_colour_stroke_recolours_the_stroked_region(toy):
    r = ev.stroke_check(toy, 8)
    assert r["stroked_recoloured"] >= 0.75, r
    assert r["rest_kept"] >= 0.75, r


@pytest.fixture(scope="module")
def noise_stats_result(toy):
    torch.set_num_threads(1)
    return ev.noise_statistics_check(toy, 6)


@pytest.mark.slow
def test_edit_friendly_noise_statistics_on_the_trained_model(noise_stats_result):
    r = noise_stats_result
    ef, nat = r["edit-friendly"], r["native"]
    assert ef["std_mean"] > nat["std_mean"] + 0.05, r  # higher per-step variance than native
    assert ef["corr_mean"] < -0.05, r  # consecutive maps negatively correlated


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError, reason=NOT_MET + "CycleDiffusion codes have std 1.19 and consecutive "
                   "correlation +0.04 (native: 1.00, 0.00): the denoiser is not yet the posterior mean")
def test_cycle_noise_statistics_are_close_to_native(noise_stats_result):
    r = noise_stats_result
    cyc, nat = r["cycle"], r["native"]
    assert abs(cyc["std_mean"] - nat["std_mean"]) < 0.1 and abs(cyc["corr_mean"]) < 0.05, r


@pytest.mark.slow
def test_p2p_over_edit_friendly_keeps_structure_better_than_plain_edits(toy):
    """The paper's Table 1 comparison at its P2P setting (100 steps, skip 12,
    target guidance 9, cross-attention for 60% and self-attention for 20% of
    the steps): the same edit-friendly codes edited with and without P2P
    control reach the target colour as often, and P2P keeps the source's
    outline better (mask IoU with the source), scene by scene and on average."""
    r = ev.p2p_versus_plain(toy, 8)
    plain, ctl = r["plain"], r["p2p"]
    assert ctl["success"] >= plain["success"] - 1 / 8 and ctl["success"] >= 0.5, r
    assert ctl["iou_mean"] > plain["iou_mean"], r
    better = sum(a > b for a, b in zip(ctl["ious"], plain["ious"]))
    assert better >= 6, r  # of 8 scenes


# ----------------------------------------------------------------------------- toy-clip


def test_toy_clip_scores_mean_something_on_toy_scenes():
    # through the scorer API (Scorers.load with score.clip_model = "toy-clip")
    r = ev.toy_clip_check(48)
    assert r["beats_wrong_colour"] >= 0.9 and r["beats_wrong_shape"] >= 0.8, r
    assert r["retrieval_top1"] >= 0.6, r  # among all captions of the vocabulary (chance: 1/54)


def test_toy_clip_pretrained_choices():
    from pipeline.scoring import ScoreConfig

    ScoreConfig(clip_model="toy-clip").validate()
    ScoreConfig(clip_model="toy-clip", clip_pretrained="toy").validate()
    ScoreConfig(clip_model="toy-clip", clip_pretrained="none").validate()
    with pytest.raises(ValueError, match="toy-clip's weights are the shipped ones"):
        ScoreConfig(clip_model="toy-clip", clip_pretrained="laion2b").validate()


# ----------------------------------------------------------------------------- demo and report


def test_report_banner_names_the_toy_model_instead_of_random_weights():
    from types import SimpleNamespace

    from pipeline.report import _warning

    toy_run = SimpleNamespace(meta={"model_id": "toy"}, label="demo", path="out/demo", random_model=False,
                              random_scores=True)
    banner = _warning([toy_run])
    assert "Toy model trained on synthetic shapes" in banner and "outside its domain" in banner
    assert "undertrained" not in banner
    assert "random weights. Images" not in banner
    tiny_run = SimpleNamespace(meta={"model_id": "tiny"}, label="t", path="o", random_model=True, random_scores=True)
    assert "Warning: random weights" in _warning([tiny_run])


def test_toy_demo_shard_holds_captioned_toy_scenes(tmp_path, monkeypatch):
    import json
    import tarfile

    from pipeline.data import expand_shards

    monkeypatch.setenv("IMPRINT_CACHE", str(tmp_path))
    (shard,) = expand_shards(["toy-demo"])
    with tarfile.open(shard) as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(metas) == 8
    for m in metas:
        assert m["source_prompt"].startswith("a ") and m["source_prompt"].endswith(" background")
        assert len(m["target_prompts"]) == 2 and m["source_prompt"] not in m["target_prompts"]


def test_training_recipe_runs_and_writes_a_loadable_pipeline(tmp_path):
    # the recipe of `make toy-model`, at 2 steps: writes both models where load_models and Scorers read them
    import json

    from pipeline.toy.train import main

    args = ["--out", str(tmp_path), "--ae-steps", "2", "--ae-batch", "4", "--steps", "4", "--batch", "4",
            "--warmup", "1", "--clip-steps", "2", "--clip-batch", "8", "--log-every", "1"]
    main(args + ["--stop-at", "2"])  # cut off at step 2 of 4 ...
    assert torch.load(tmp_path / "checkpoints" / "unet.pt", weights_only=True)["step"] == 2
    assert (tmp_path / "checkpoints" / "latest" / "step.txt").read_text().strip() == "2"
    main(args + ["--only", "unet"])  # ... and resumed: steps 3 and 4 only
    record = json.loads((tmp_path / "training-unet.json").read_text())
    assert record["unet"]["stopped_at"] == 4 and [e["step"] for e in record["unet"]["log"]] == [1, 2, 3, 4]
    first = json.loads((tmp_path / "training.json").read_text())
    assert first["ae"]["steps"] == 2 and first["clip"]["steps"] == 2 and first["ae"]["scaling_factor"] > 0
    m = load_models(str(tmp_path / "toy"), device="cpu")
    assert m.resolution == 64 and m.vae_scale_factor == FACTOR and not m.random_weights
    assert m.scaling_factor == pytest.approx(first["ae"]["scaling_factor"], rel=1e-4)
    assert (tmp_path / "toy-clip" / "open_clip_model.safetensors").is_file()


class _RunsOnUnpickle:
    """A pickled object that runs code when loaded: what a full (weights_only=False) unpickle allows."""

    ran = []

    def __reduce__(self):
        return (_RunsOnUnpickle.ran.append, ("code ran",))


def test_training_resume_loads_checkpoints_weights_only(tmp_path):
    # a resumed stage reads its checkpoint with torch.load(weights_only=True): tensors, state dicts and plain
    # data load (the recipe test above resumes through it); a pickled object that would run code is refused
    from pipeline.toy.train import _Resumable

    ckpt = _Resumable(tmp_path, "unet", minutes=0)
    ckpt.save({"step": 3, "payload": _RunsOnUnpickle()})
    _RunsOnUnpickle.ran.clear()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ckpt.load()
    assert _RunsOnUnpickle.ran == []


def test_demo_job_runs_on_the_toy_model_and_its_report_shows_reconstructions(tmp_path, monkeypatch, toy):
    """jobs/demo.toml as shipped (at 6 steps, inline): the toy model on toy
    scenes plus the photo sample, each source stored with its decoded
    reconstruction, and a report that shows both and labels each input's domain."""
    import io
    import json

    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.executor import run_job
    from pipeline.report import build_report
    from pipeline.spec import load_spec
    from pipeline.tables import image_bytes

    monkeypatch.setenv("IMPRINT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    spec = load_spec("jobs/demo.toml", ["inversion.steps=6", "inversion.skip=2", "edit.seeds=1",
                                        "run.executor=inline", f'output.path="{out}"'])
    assert spec.model.id == "toy" and spec.input.shards == ["toy-demo", "demo"] and spec.score.clip_model == "toy-clip"
    report = run_job(spec, progress=False)
    assert report.errors == 0 and report.images == 8 + 5
    rows = pq.read_table(out / "sources").to_pylist()
    toy_rows = [r for r in rows if r["key"].startswith("toy_")]
    assert len(toy_rows) == 8 and all(json.loads(r["meta"])["domain"] == "toy scene" for r in toy_rows)
    assert {json.loads(r["meta"])["domain"] for r in rows} == {"toy scene", "photo", "drawing"}
    for r in toy_rows:
        src = np.asarray(Image.open(io.BytesIO(image_bytes(r["image"]))), dtype=np.float32)
        rec = np.asarray(Image.open(io.BytesIO(image_bytes(r["recon_image"]))), dtype=np.float32)
        assert src.shape == rec.shape == (64, 64, 3)
        # the inversion is exact: the reconstruction is the autoencoder's own
        # round trip of the source (up to 8-bit rounding), a few levels off it
        with torch.no_grad():
            x = torch.from_numpy(src / 127.5 - 1).permute(2, 0, 1)[None]
            trip = toy.decode_latents(toy.encode_images(x))[0].permute(1, 2, 0).numpy()
        trip = np.clip(np.round((trip + 1) * 127.5), 0, 255)
        assert np.abs(trip - rec).max() <= 3, np.abs(trip - rec).max()
        assert np.abs(src - rec).mean() < 6.0
        trip_psnr = 10 * np.log10(255.0**2 / float(((trip - src) ** 2).mean()))
        assert abs(r["recon_psnr"] - trip_psnr) < 1.0 and r["recon_psnr"] > 20, (r["recon_psnr"], trip_psnr)
    page = build_report([str(out)], samples=13)
    assert page.count('class="recon-image"') == 13 and page.count('class="source-image"') == 13
    assert page.count('class="domain">[toy scene]') == 8 and 'class="domain">[photo]' in page
    # toy scenes first, then the inputs outside the model's domain, labelled as such
    toy_at = [page.find(f'<div class="sample" data-key="{r["key"]}"') for r in toy_rows]
    other_at = [page.find(f'<div class="sample" data-key="{r["key"]}"') for r in rows if r not in toy_rows]
    assert min(toy_at) >= 0 and min(other_at) >= 0 and max(toy_at) < min(other_at), (toy_at, other_at)
    assert page.count("outside the model's domain</span>") == 5
    assert "Toy model trained on synthetic shapes" in page and "Warning: random weights" not in page
