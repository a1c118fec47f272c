"""Prompt-to-Prompt attention control: token alignment, injection at the
processor level, and chains on the tiny model (control off = today's
edits; full injection with the source prompt = the reconstruction; nothing
left installed on the model)."""

import json

import pytest
import torch

from pipeline import p2p
from pipeline.inversion import get_method

SRC = "a red circle on a white background"


@pytest.fixture(scope="module")
def tok():
    from pipeline.models import clip_tokenizer

    return clip_tokenizer()


def _ids(tok, text):
    return tok(text).input_ids


# -- token alignment ----------------------------------------------------------


def test_replace_same_words_is_token_identity_with_swapped_word_in_place(tok):
    tm = p2p.replace_map(tok, SRC, "a green circle on a white background")
    n = len(_ids(tok, SRC))
    assert torch.equal(tm.weights[:n, :n], torch.eye(n))
    # end token and padding map to the source's end token and padding
    assert torch.equal(tm.weights[n:, n:], torch.eye(77 - n))
    assert torch.all(tm.alpha == 1) and torch.all(tm.equalizer == 1)


def test_replace_spreads_a_word_of_another_token_count(tok):
    # find a target word with two tokens where the source word has one
    src, tgt = "a red circle", "a chartreuse circle"
    nt = len(tok("chartreuse", add_special_tokens=False).input_ids)
    assert nt == 3 and len(tok("red", add_special_tokens=False).input_ids) == 1
    tm = p2p.replace_map(tok, src, tgt)
    # "chartreuse" tokens (positions 2..2+nt) each draw fully on "red" (position 2)
    assert torch.equal(tm.weights[2 : 2 + nt, 2], torch.ones(nt))
    assert tm.weights[2 : 2 + nt].sum().item() == nt
    # "circle" moves from source position 3 to target position 2 + nt; end tokens follow
    assert tm.weights[2 + nt, 3] == 1 and tm.weights[3 + nt, 4] == 1
    # every row of the map is a distribution over source tokens
    assert torch.allclose(tm.weights.sum(1), torch.ones(77))


def test_replace_refuses_prompts_with_different_word_counts(tok):
    with pytest.raises(ValueError, match="refine"):
        p2p.replace_map(tok, SRC, "a big red circle on a white background")


def test_refine_aligns_tokens_and_frees_new_ones(tok):
    tgt = "a big red circle on a white background"
    tm = p2p.refine_map(tok, SRC, tgt)
    s, t = _ids(tok, SRC), _ids(tok, tgt)
    big = t.index(tok("big", add_special_tokens=False).input_ids[0])
    assert tm.alpha[big] == 0 and tm.weights[big].sum() == 0  # a new word keeps its own attention
    for j, tid in enumerate(t):
        if j == big:
            continue
        (i,) = tm.weights[j].nonzero().flatten().tolist()
        assert s[i] == tid  # every other target token reads the same token of the source
    assert tm.weights[len(t), len(s)] == 1  # padding aligned from the ends


def test_align_tokens_global_alignment():
    assert p2p.align_tokens([1, 2, 3], [1, 9, 2, 3]) == [0, -1, 1, 2]
    assert p2p.align_tokens([1, 2, 3], [1, 3]) == [0, 2]
    assert p2p.align_tokens([5, 6], [7, 8]) == [-1, -1]


def test_reweight_scales_the_words_tokens(tok):
    cfg = p2p.P2PConfig(reweight={"green": 2.5})
    tm = p2p.token_map(cfg, tok, SRC, "a green circle on a white background")
    pos = _ids(tok, "a green circle").index(tok("green", add_special_tokens=False).input_ids[0])
    assert tm.equalizer[pos] == 2.5 and (tm.equalizer == 1).sum() == 76
    with pytest.raises(ValueError, match="not in the target prompt"):
        p2p.token_map(p2p.P2PConfig(reweight={"blue": 2.0}), tok, SRC, "a green circle on a white background")


@pytest.mark.parametrize("bad", [dict(cross_until=1.5), dict(self_until=-0.1), dict(mode="swap"),
                                 dict(reweight={"two words": 2.0}), dict(reweight={"x": float("inf")})])
def test_config_errors(bad):
    with pytest.raises(ValueError):
        p2p.P2PConfig(**bad).check()


# -- the processor --------------------------------------------------------------


def _attention(cross: bool):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12 if cross else None, heads=2, dim_head=8).eval()
    attn.set_processor(AttnProcessor2_0())
    return attn


def _plan(rows_src, weights=None, alpha=None, eq=None, size=5):
    src = torch.tensor(rows_src)
    n_t = int((src != torch.arange(len(rows_src))).sum())
    eye = torch.eye(size).expand(n_t, size, size)
    return p2p.P2PPlan(src, eye if weights is None else weights, torch.ones(n_t, size) if alpha is None else alpha,
                       torch.ones(n_t, size) if eq is None else eq, {10: 0, 5: 1}, cross_steps=1, self_steps=1,
                       self_max_tokens=64)


@torch.no_grad()
def test_cross_injection_uses_source_probabilities_with_target_values():
    attn = _attention(cross=True)
    x = torch.randn(2, 6, 16)
    ctx = torch.randn(2, 5, 12)
    swap = torch.zeros(1, 5, 5)
    swap[0, torch.arange(5), torch.tensor([0, 2, 1, 3, 4])] = 1  # target token 1 reads source token 2 and back
    plan = _plan([0, 0], weights=swap)
    state = p2p._State(plan)
    proc = p2p.P2PAttnProcessor(state, attn.processor, cross=True)
    state.step = 0
    out = proc(attn, x, ctx)
    # by hand: source row's probabilities, columns permuted, times the target row's values
    q = attn.head_to_batch_dim(attn.to_q(x))
    k, v = attn.head_to_batch_dim(attn.to_k(ctx)), attn.head_to_batch_dim(attn.to_v(ctx))
    probs = attn.get_attention_scores(q, k).view(2, 2, 6, 5)
    want_probs = probs[0][..., [0, 2, 1, 3, 4]]
    vt = v.view(2, 2, 5, 8)[1]
    want = attn.to_out[0](attn.batch_to_head_dim(torch.bmm(want_probs, vt)))
    assert torch.allclose(out[1], want[0], atol=1e-6)
    # the source row is untouched: same as the layer's own processor
    assert torch.allclose(out[0], attn.processor(attn, x, ctx)[0], atol=1e-6)
    # past the window the layer's own processor runs, bit for bit
    state.step = 1
    assert torch.equal(proc(attn, x, ctx), attn.processor(attn, x, ctx))


@torch.no_grad()
def test_self_injection_copies_maps_and_only_at_small_maps():
    attn = _attention(cross=False)
    x = torch.randn(4, 6, 16)  # a guided call: [uncond (2 rows); cond (2 rows)]
    plan = _plan([0, 0])
    state = p2p._State(plan)
    state.step = 0
    proc = p2p.P2PAttnProcessor(state, attn.processor, cross=False)
    out = proc(attn, x)
    own = attn.processor(attn, x)
    assert torch.allclose(out[:3], own[:3], atol=1e-6)  # uncond half and the source row unchanged
    assert not torch.allclose(out[3], own[3], atol=1e-3)
    plan.self_max_tokens = 5  # 6 positions > 5: not injected
    assert torch.equal(proc(attn, x), own)


def test_a_call_with_other_rows_is_refused():
    attn = _attention(cross=False)
    state = p2p._State(_plan([0, 0]))
    state.step = 0
    with pytest.raises(ValueError, match="max_unet_batch"):
        p2p.P2PAttnProcessor(state, attn.processor, cross=False)(attn, torch.randn(3, 6, 16))


# -- chains on the tiny model -----------------------------------------------------


@pytest.fixture(scope="module")
def setup(tiny):
    m = tiny
    torch.manual_seed(3)
    x0 = m.encode_images(torch.rand(3, 3, 64, 64) * 2 - 1)
    prompts = ["a red circle on a white background", "a blue square on a black background", "a green triangle on a gray background"]
    emb = m.encode_text(prompts + ["a yellow circle on a white background", ""])
    gens = [torch.Generator().manual_seed(s) for s in range(6)]
    ef = get_method("edit-friendly")
    code = ef.invert(m.unet, m.scheduler, x0.repeat_interleave(2, 0), emb[[0, 0, 1, 1, 2, 2]], emb[-1:],
                     num_steps=6, skip=1, cfg_scale=3.5, generator=gens)
    return m, prompts, emb, code


def test_injection_windows_count_the_full_steps_from_the_edits_first_step(tiny, monkeypatch):
    # the paper's code builds P2P's controller with all 100 steps while the edit runs 100 - 36 = 64 of them:
    # cross 0.6 and self 0.2 inject the first 60 and 20 edit steps (not 0.6 * 64 = 38 and 12). A stand-in
    # method steps the installed control through the code's timesteps as the UNet's pre-hook does (fast:
    # no UNet evaluations) and records when an injection is due.
    from pipeline.inversion.common import NoiseCode, Schedule

    m = tiny
    steps, skip = 100, 36
    timesteps = Schedule.from_scheduler(m.scheduler, steps).timesteps[skip:]
    code = NoiseCode(x_start=torch.zeros(2, 4, 4, 4), zs=torch.zeros(steps - skip, 2, 4, 4, 4), timesteps=timesteps,
                     num_steps=steps, skip=skip, method="edit-friendly", params={"eta": 1.0})
    states = []
    init = p2p._State.__init__
    monkeypatch.setattr(p2p._State, "__init__", lambda self, plan: (init(self, plan), states.append(self))[0])
    seen = {True: [], False: []}

    class SteppingMethod:
        @staticmethod
        def edit(unet, scheduler, code, cond, uncond, **_):
            for t in code.timesteps.tolist():
                states[-1].on_call(unet, (None, t), {})
                for cross in (True, False):
                    if states[-1].active(cross):
                        seen[cross].append(states[-1].step)

    emb = m.encode_text(["a red circle", "a blue circle", ""])
    p2p.edit(SteppingMethod, m.unet, m.scheduler, code, emb[:2], emb[-1:], prompts=["a red circle", "a blue circle"],
             source_of=[0, 0], tokenizer=m.tokenizer, config=p2p.P2PConfig(), cfg_scale=1.0)
    assert seen[True] == list(range(60)) and seen[False] == list(range(20))
    assert p2p.injected_steps(p2p.P2PConfig(cross_until=0.4, self_until=0.6), 50) == (20, 30)  # PIE-Bench's runner


def _unet_state(unet):
    return {k: type(v) for k, v in unet.attn_processors.items()}, dict(unet._forward_pre_hooks)


def test_control_with_empty_windows_equals_plain_edit_and_leaves_nothing_installed(setup):
    m, prompts, emb, code = setup
    ef = get_method("edit-friendly")
    before = _unet_state(m.unet)
    rows = [0, 2, 4, 0, 2, 4]
    src_rows = code[rows]
    cond = emb[[0, 1, 2, 3, 1, 2]]
    plain = ef.edit(m.unet, m.scheduler, src_rows, cond, emb[-1:], cfg_scale=7.0)
    cfg = p2p.P2PConfig(cross_until=0.0, self_until=0.0, mode="refine")
    text = prompts + [prompts[0].replace("red", "yellow"), prompts[1], prompts[2]]
    ctl = p2p.edit(ef, m.unet, m.scheduler, src_rows, cond, emb[-1:], prompts=text, source_of=[0, 1, 2, 0, 1, 2],
                   tokenizer=m.tokenizer, config=cfg, cfg_scale=7.0)
    assert torch.equal(plain, ctl)
    assert _unet_state(m.unet) == before


def test_full_injection_with_the_source_prompt_reproduces_the_reconstruction(setup):
    m, prompts, emb, code = setup
    ef = get_method("edit-friendly")
    # rows: 6 sources (3 images x 2 seeds) then their targets, shuffled, with the source prompt as target
    order = [5, 0, 3, 1, 4, 2]
    rows = list(range(6)) + order
    text = [prompts[r // 2] for r in rows]
    cond = emb[[r // 2 for r in rows]]
    cfg = p2p.P2PConfig(cross_until=1.0, self_until=1.0, self_max_tokens=10_000)
    out = p2p.edit(ef, m.unet, m.scheduler, code[rows], cond, emb[-1:], prompts=text,
                   source_of=list(range(6)) + order, tokenizer=m.tokenizer, config=cfg, cfg_scale=3.5)
    recon = out[:6]
    assert torch.allclose(out[6:], recon[order], atol=1e-5)


def test_injection_changes_edits_and_the_pairing_matters(setup):
    m, prompts, emb, code = setup
    ef = get_method("edit-friendly")
    # targets differ from sources; with the control on, the edit moves toward the reconstruction
    rows = [0, 2, 0, 2]
    text = [prompts[0], prompts[1], "a yellow circle on a white background", prompts[1].replace("blue", "yellow")]
    cond = m.encode_text(text)
    plain = ef.edit(m.unet, m.scheduler, code[rows], cond, emb[-1:], cfg_scale=9.0)
    cfg = p2p.P2PConfig(cross_until=1.0, self_until=1.0, self_max_tokens=10_000)
    ctl = p2p.edit(ef, m.unet, m.scheduler, code[rows], cond, emb[-1:], prompts=text, source_of=[0, 1, 0, 1],
                   tokenizer=m.tokenizer, config=cfg, cfg_scale=9.0)
    # source rows are not controlled (explicit attention instead of SDPA: equal to rounding)
    assert torch.allclose(ctl[:2], plain[:2], atol=1e-4)
    assert not torch.allclose(ctl[2:], plain[2:], atol=1e-3)  # the injected maps change the edits
    crossed = p2p.edit(ef, m.unet, m.scheduler, code[rows], cond, emb[-1:], prompts=text, source_of=[0, 1, 1, 0],
                       tokenizer=m.tokenizer, config=cfg, cfg_scale=9.0)
    assert not torch.allclose(crossed[2:], ctl[2:], atol=1e-4)  # the pairing matters


def test_works_with_every_methods_codes(setup, tiny):
    m, prompts, emb, _ = setup
    torch.manual_seed(1)
    x0 = m.encode_images(torch.rand(1, 3, 64, 64) * 2 - 1)
    text = [prompts[0], prompts[0].replace("red", "yellow")]
    cond = m.encode_text(text)
    cfg = p2p.P2PConfig(cross_until=0.5, self_until=0.25)
    for name in ("edit-friendly", "ddim", "edict", "ddim-forward", "cycle"):
        meth = get_method(name)
        code = meth.invert(m.unet, m.scheduler, x0, cond[:1], emb[-1:], num_steps=4, skip=1, cfg_scale=2.0,
                           generator=[torch.Generator().manual_seed(0)])
        out = p2p.edit(meth, m.unet, m.scheduler, code[[0, 0]], cond, emb[-1:], prompts=text, source_of=[0, 0],
                       tokenizer=m.tokenizer, config=cfg, cfg_scale=2.0)
        assert out.shape == (2, *x0.shape[1:]) and torch.isfinite(out).all(), name
        assert (out[0].float() - x0[0]).abs().max() < 1e-3 or name in ("ddim", "ddim-forward"), name


def test_compiled_or_foreign_unets_are_refused():
    with pytest.raises(ValueError, match="diffusers UNet"):
        p2p.raw_unet(lambda x, t, e: x)


# -- jobs ------------------------------------------------------------------------


def test_job_compares_none_and_p2p_in_one_table(tmp_path):
    import json

    from helpers_data import good_samples, write

    samples = good_samples("p", 2)
    shard = write(tmp_path / "p-000.tar", samples)
    store, res = _run_two_control_job(tmp_path, shard, "{source} outdoors", {"steps": 5, "skip": 1},
                                      {"cross_until": 0.8, "self_until": 0.4})
    by = {}
    for r in res:
        by.setdefault(r["method"], []).append(r)
    n_targets = sum(len(s.get("json", {}).get("target_prompts", [])) + 1 for s in samples)
    assert {k: len(v) for k, v in by.items()} == {"edit-friendly": n_targets * 2, "edit-friendly+p2p": n_targets * 2}
    p = json.loads(by["edit-friendly+p2p"][0]["params"])
    assert p["control"] == "p2p" and p["cross_until"] == 0.8 and p["mode"] == "refine"
    assert p["inversion_method"] == "edit-friendly"
    assert "control" not in json.loads(by["edit-friendly"][0]["params"])
    # one inversion serves both controls: one code per (image, seed) is stored, not two
    assert store.read_table("noise").num_rows == len(samples) * 2
    src = store.read_table("sources").to_pylist()
    errs = json.loads(src[0]["recon_errors"])
    assert set(errs) == {"edit-friendly", "edit-friendly+p2p"} and max(errs.values()) < 1e-3
    # same image, prompt and seed: the p2p edit differs from the plain one
    key = lambda r: (r["key"], r["target_prompt"], r["seed_index"])  # noqa: E731
    plain = {key(r): r["image"] for r in by["edit-friendly"]}
    assert sum(plain[key(r)] != r["image"] for r in by["edit-friendly+p2p"]) > 0


@pytest.mark.parametrize("field,value,msg", [
    ("control", "p2p-ish", "edit.control"), ("cross_until", 1.5, "edit.cross_until"),
    ("mode", "swap", "edit.mode"), ("reweight", {"two words": 2.0}, "edit.reweight"),
])
def test_spec_errors_name_the_field(field, value, msg, tmp_path):
    from pipeline.spec import SpecError, load_spec

    raw = {"input": {"shards": ["x.tar"]}, "edit": {"control": "p2p", field: value}}
    with pytest.raises(SpecError, match=msg):
        load_spec(raw=raw)


def test_readme_p2p_example_runs_after_the_api_example():
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    api = next(b for b in blocks if "ef.invert" in b).replace("num_steps=100, skip=36", "num_steps=6, skip=2")
    example = next(b for b in blocks if "p2p.edit" in b)
    scope: dict = {}
    exec(compile(api + example, "README.md", "exec"), scope)
    assert scope["lat"].shape == (6, *scope["x0"].shape[1:]) and torch.isfinite(scope["lat"]).all()


def test_shipped_p2p_job_is_valid():
    from pipeline.spec import load_spec

    spec = load_spec("jobs/p2p.toml")
    assert [v.label for v in spec.variants()] == ["edit-friendly", "edit-friendly+p2p"]
    assert spec.inversion.skip == 12 and spec.edit.cfg_target == 9.0
    assert p2p.injected_steps(spec.edit.p2p(), spec.inversion.steps) == (60, 20)  # the paper's 60 and 20 of 100


def test_p2p_with_seed_independent_methods_manipulations_and_stored_codes(tmp_path):
    """P2P rows next to a deterministic method (one code per image, one edit
    per (image, target) whatever edit.seeds), a shifted code (the
    reconstruction reads the original), and `edit-codes` from the stored codes."""
    import json

    from helpers_data import good_samples, write
    from pipeline.executor import run_job
    from pipeline.spec import load_spec
    from pipeline.store import OutputStore

    shard = write(tmp_path / "q-000.tar", good_samples("q", 2))
    store, res = _run_two_control_job(tmp_path, shard, "{source} at night",
                                      {"method": ["edit-friendly", "ddim"], "steps": 4, "skip": 1}, {},
                                      manipulate={"shift_x": 1})
    counts = {}
    for r in res:
        counts[r["method"]] = counts.get(r["method"], 0) + 1
    assert set(counts) == {"edit-friendly", "edit-friendly+p2p", "ddim", "ddim+p2p"}
    n_pairs = len({(r["key"], r["target_prompt"]) for r in res})
    # edit-friendly: every (image, target, seed) row; ddim: deterministic, one row per (image, target)
    assert counts["edit-friendly"] == counts["edit-friendly+p2p"] == 2 * n_pairs
    assert counts["ddim"] == counts["ddim+p2p"] == n_pairs
    assert {r["seed_index"] for r in res if r["method"].startswith("ddim")} == {0}
    for s in store.read_table("sources").to_pylist():
        if s["status"] == "ok":
            errs = json.loads(s["recon_errors"])
            assert errs["edit-friendly+p2p"] < 1e-3, errs  # from the unshifted code, not the shifted one
    # one code per (image, seed, method), not per control; ddim one per image
    assert store.read_table("noise").num_rows == 2 * 2 + 2 * 1
    # edit-codes under p2p
    raw2 = {
        "input": {"codes": str(tmp_path / "out"), "templates": ["{source} in the rain"]},
        "edit": {"control": "p2p", "mode": "refine"},
        "output": {"path": str(tmp_path / "out2"), "image_format": "png"},
        "score": {"enabled": False},
        "run": {"executor": "inline", "threads": 2},
    }
    report = run_job(load_spec(raw=raw2), progress=False)
    assert not report.failed and report.edits > 0
    res2 = OutputStore.open(str(tmp_path / "out2")).read_table("results").to_pylist()
    assert {r["method"] for r in res2} == {"edit-friendly+p2p", "ddim+p2p"}


def _run_two_control_job(tmp_path, shard, template, inversion, edit, **sections):
    """One inline job with controls none and p2p (refine) on one shard; returns
    the output store and its results rows."""
    from pipeline.executor import run_job
    from pipeline.spec import load_spec
    from pipeline.store import OutputStore

    raw = {
        "input": {"shards": [str(shard)], "templates": [template]},
        "inversion": inversion,
        "edit": {"seeds": 2, "control": ["none", "p2p"], "mode": "refine", **edit},
        "output": {"path": str(tmp_path / "out"), "noise": True, "noise_dtype": "float32", "image_format": "png"},
        "score": {"enabled": False},
        "run": {"executor": "inline", "threads": 2},
        **sections,
    }
    report = run_job(load_spec(raw=raw), progress=False)
    assert report.done == 1 and not report.failed
    store = OutputStore.open(str(tmp_path / "out"))
    return store, store.read_table("results").to_pylist()


# -- mode auto and prompts that cannot be aligned (issue 22 item 4) -------------------------


def test_auto_mode_is_replace_for_same_word_counts_else_refine(tok):
    cfg = p2p.P2PConfig()
    assert cfg.mode == "auto"
    same, longer = "a green circle on a white background", SRC + ", oil painting"
    for target, mode in ((same, "replace"), (longer, "refine")):
        assert p2p.pair_mode("auto", SRC, target) == mode
        want = (p2p.replace_map if mode == "replace" else p2p.refine_map)(tok, SRC, target)
        got = p2p.token_map(cfg, tok, SRC, target)
        assert torch.equal(got.weights, want.weights) and torch.equal(got.alpha, want.alpha)
    assert p2p.pair_mode("replace", SRC, longer) == "replace"  # an explicit mode is kept


def test_template_word_change():
    assert p2p.template_word_change("{source}, oil painting") == 2
    assert p2p.template_word_change("{source}s") == 0
    assert p2p.template_word_change("{{literal}} {source}") == 1
    assert p2p.template_word_change("a fixed prompt") is None
    assert p2p.template_word_change("{source} and {source}") is None


def test_check_prompts_names_the_target_and_the_reason(tok):
    cfg = p2p.P2PConfig(reweight={"sketch": 2.0})
    p2p.check_prompts(cfg, tok, SRC, [SRC + " sketch", "a blue sketch"])
    with pytest.raises(ValueError, match=r"'a blue circle'.*reweight word 'sketch' is not in the target"):
        p2p.check_prompts(cfg, tok, SRC, [SRC + " sketch", "a blue circle"])
    with pytest.raises(ValueError, match="same number of words"):
        p2p.check_prompts(p2p.P2PConfig(mode="replace"), tok, SRC, ["a blue circle"])


def test_replace_with_a_word_changing_template_is_refused_at_validation(tmp_path):
    from pipeline.spec import SpecError, load_spec

    raw = {"input": {"shards": ["x.tar"], "templates": ["{source}, oil painting"]}, "edit": {"control": "p2p"}}
    assert load_spec(raw=raw).edit.mode == "auto"  # the README's template works with the default
    with pytest.raises(SpecError, match=r"^edit.mode: 'replace' .*'\{source\}, oil painting' adds 2"):
        load_spec(raw={**raw, "edit": {"control": "p2p", "mode": "replace"}})
    ok = {**raw, "input": {"shards": ["x.tar"], "templates": ["{source}s", "a fixed prompt"]}}
    assert load_spec(raw={**ok, "edit": {"control": "p2p", "mode": "replace"}}).edit.mode == "replace"


def test_unalignable_prompts_are_error_rows_and_the_shard_goes_on(tmp_path):
    """A reweight word missing from one sample's target: that sample is an
    error row with the reason, the others are edited (auto: one by replace,
    one by refine), the shard is done in one attempt."""
    from helpers_data import image_bytes, write
    from pipeline.executor import run_job
    from pipeline.spec import load_spec
    from pipeline.store import OutputStore

    samples = [
        {"__key__": "swap", "png": image_bytes(seed=1),
         "json": {"source_prompt": "a red circle", "target_prompts": ["a sketch circle"]}},
        {"__key__": "missing", "png": image_bytes(seed=2),
         "json": {"source_prompt": "a red circle", "target_prompts": ["a blue circle"]}},
        {"__key__": "longer", "png": image_bytes(seed=3),
         "json": {"source_prompt": "a red circle", "target_prompts": ["a red circle, pencil sketch"]}},
    ]
    shard = write(tmp_path / "p-000.tar", samples)
    raw = {
        "input": {"shards": [shard]},
        "inversion": {"steps": 4, "skip": 1},
        "edit": {"control": "p2p", "reweight": {"sketch": 2.0}},
        "output": {"path": str(tmp_path / "out"), "image_format": "png"},
        "score": {"enabled": False},
        "run": {"executor": "inline", "max_attempts": 3},
    }
    report = run_job(load_spec(raw=raw), progress=False)
    assert report.done == 1 and not report.failed and report.errors == 1
    assert dict(report.error_types) == {"p2p_unaligned": 1}
    store = OutputStore.open(str(tmp_path / "out"))
    sources = {r["key"]: r for r in store.read_table("sources").to_pylist()}
    assert sources["missing"]["status"] == "error"
    assert "'a blue circle'" in sources["missing"]["error"] and "reweight word 'sketch'" in sources["missing"]["error"]
    assert sources["swap"]["status"] == sources["longer"]["status"] == "ok"
    res = store.read_table("results").to_pylist()
    assert sorted(r["key"] for r in res) == ["longer", "swap"]
    assert all(json.loads(r["params"])["mode"] == "auto" for r in res)
