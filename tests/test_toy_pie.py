"""The built-in `toy-pie` input: toy scenes with their exact edit regions as
`edit_mask.png`, one colour or shape edit each and its `editing_type`, so
PIE-Bench's protocol (`imprint eval --by editing_type`) runs offline; and
jobs/toy-pie.toml, which runs it."""

import numpy as np

from pipeline.data import TOY_PIE, decode_sample, expand_shards, read_raw_samples
from pipeline.models.toy import RESOLUTION
from pipeline.spec import ImageSpec, InputSpec, load_spec
from pipeline.toy.scenes import COLORS, SHAPES


def test_toy_pie_decodes_into_samples_with_exact_masks_and_edit_types(tmp_path, monkeypatch):
    monkeypatch.setenv("IMPRINT_CACHE", str(tmp_path / "cache"))
    shards = expand_shards([TOY_PIE])
    assert len(shards) == 1 and shards[0].startswith(str(tmp_path / "cache"))
    samples = [decode_sample(raw, shards[0], InputSpec(), ImageSpec(), RESOLUTION) for raw in read_raw_samples(shards[0])]
    assert len(samples) >= 8 and all(not s.error for s in samples), [s.error for s in samples]
    kinds = {s.meta["editing_type"] for s in samples}
    shape_edits = []
    assert kinds == {"change_color", "change_object"}
    for s in samples:
        assert s.edit_mask is not None and s.edit_mask.shape == (RESOLUTION, RESOLUTION)
        (target,) = s.target_prompts
        src_words, tgt_words = s.source_prompt.split(), target.split()
        changed = [(a, b) for a, b in zip(src_words, tgt_words) if a != b]
        assert len(src_words) == len(tgt_words) and changed == [(s.meta["source_words"][0], s.meta["edited_words"][0])]
        old, new = changed[0]
        vocab = COLORS if s.meta["editing_type"] == "change_color" else SHAPES
        assert old in vocab and new in vocab
        # the mask is the edit region: the shape's own pixels (a uniform background outside it), drawn exactly
        image = s.image.numpy()
        inside = s.edit_mask.numpy() > 0
        background = image[:, ~inside].reshape(3, -1)
        assert np.allclose(background, background[:, :1], atol=1e-6), s.key
        shape_pixels = image[:, inside].reshape(3, -1)
        colour_share = np.mean(np.all(np.abs(shape_pixels - background[:, :1]) > 1e-6, axis=0))
        if s.meta["editing_type"] == "change_color":
            assert colour_share == 1.0  # exactly the shape
        else:
            shape_edits.append(colour_share)
    # a shape edit's region is the old shape and the new one together: more than the old shape where the new
    # one reaches out of it (a square for a circle), the old shape alone where it does not (a circle for a square)
    assert shape_edits and min(shape_edits) < 0.95 and max(shape_edits) <= 1.0
    # written once, then reused
    assert expand_shards([TOY_PIE]) == shards


def test_the_toy_pie_job_runs_every_method_with_p2p_variants_on_toy_pie():
    spec = load_spec("jobs/toy-pie.toml")
    assert spec.input.shards == [TOY_PIE] and spec.model.id == "toy"
    labels = {v.label for v in spec.variants()}
    assert {"edit-friendly", "ddim", "edict", "cycle", "ddim-forward", "edit-friendly+p2p"} <= labels
    assert spec.score.clip_model in ("auto", "toy-clip") and not spec.score.structure_pretrained
    assert not spec.score.lpips_pretrained
