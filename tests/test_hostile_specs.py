"""Job specs that used to pass validation and fail later (or run and give
NaN scores): each is refused by `imprint validate` and `imprint run` with one
`imprint: error: <field>: ...` line and exit 2, before any model is loaded."""

import threading

import pytest
import tomli_w
from typer.testing import CliRunner

from helpers_data import good_samples, tiny_job as base_job, write
from pipeline.cli import app

INF = float("inf")

# (overrides of the base job, the field the one error line must name)
BAD_SPECS = [
    ({"edit": {"cfg_target": INF}}, "edit.cfg_target"),
    ({"inversion": {"cfg_source": INF}}, "inversion.cfg_source"),
    ({"inversion": {"params": {"eta": 0}}}, "inversion.params.eta"),
    ({"inversion": {"params": {"eta": -1}}}, "inversion.params.eta"),
    ({"inversion": {"params": {"eta": INF}}}, "inversion.params.eta"),
    ({"inversion": {"method": "cycle", "params": {"eta": 0}}}, "inversion.params.eta"),
    ({"inversion": {"steps": 1001, "skip": 10}}, "inversion.steps"),
    ({"image": {"max_aspect": INF}}, "image.max_aspect"),
    ({"input": {"templates": ["{source.__class__}"]}}, "input.templates"),
    ({"input": {"templates": ["{source.foo}"]}}, "input.templates"),
    ({"input": {"templates": ["{0}"]}}, "input.templates"),
    ({"input": {"templates": ["{label[0]}"]}}, "input.templates"),
    ({"input": {"templates": ["{label:>10}"]}}, "input.templates"),
    ({"input": {"source_prompt": "a photo of a {label.__class__}"}}, "input.source_prompt"),
    ({"input": {"source_prompt": "a photo of a {label"}}, "input.source_prompt"),
    ({"input": {"source_prompt": "   "}}, "input.source_prompt"),
    ({"input": {"source_prompt": ""}, "edit": {"control": "p2p", "mode": "replace"}}, "edit.mode"),
    ({"input": {"templates": ["{source!r}"]}}, "input.templates"),
    ({"inversion": {"method": ["edit-friendly", "ddim"], "per_method": {"ddim": {"skip": "2"}}}}, "inversion.per_method.ddim.skip"),
    ({"inversion": {"method": ["edit-friendly", "ddim"], "per_method": {"ddim": {"cfg_target": "high"}}}},
     "inversion.per_method.ddim.cfg_target"),
    ({"inversion": {"method": ["edit-friendly", "ddim"], "per_method": {"edit-friendly": {"params": 1}}}},
     "inversion.per_method.edit-friendly.params"),
    ({"inversion": {"method": ["edit-friendly", "ddim"], "per_method": {"edit-friendly": {"params": {"eta": 0}}}}},
     "inversion.per_method.edit-friendly.params.eta"),
    ({"edit": {"params": {"gamma": 1.0}}}, "edit.params.gamma"),
    ({"edit": {"params": {"eta": -1}}}, "edit.params.eta"),
    ({"edit": {"params": {"eta": INF}}}, "edit.params.eta"),
    ({"inversion": {"method": ["edit-friendly", "ddim"]}, "edit": {"params": {"eta": 0.5}}}, "edit.params.eta"),
    ({"model": {"device": "gpu0"}}, "model.device"),
    ({"model": {"device": "cuda:64"}}, "model.device"),
    ({"model": {"id": "sd15-random"}, "image": {"resolution": 32, "multiple": 32}}, "image.resolution"),
    ({"input": {"max_prompt_tokens": 200}}, "input.max_prompt_tokens"),
    ({"model": {"id": "nobody/no-such-model-imprint"}}, "model.id"),
]


def merged(base, over):
    out = {k: dict(v) for k, v in base.items()}
    for sec, vals in over.items():
        out.setdefault(sec, {}).update(vals)
    return out


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write(tmp_path_factory.mktemp("s") / "a.tar", good_samples(n=1))


@pytest.fixture
def no_model_loading(monkeypatch):
    import pipeline.models

    def refuse(*a, **k):
        raise AssertionError("a model was loaded for a spec that should have been refused")

    monkeypatch.setattr(pipeline.models, "load_models", refuse)
    monkeypatch.setattr(pipeline.models, "build_random", refuse)


@pytest.mark.parametrize("over,field", BAD_SPECS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_SPECS)])
def test_bad_spec_is_refused_by_validate_and_run(tmp_path, shard, no_model_loading, over, field):
    path = tmp_path / "job.toml"
    path.write_text(tomli_w.dumps(merged(base_job(tmp_path, shard), over)))
    for cmd in (["validate", str(path)], ["run", str(path), "--no-progress"]):
        res = CliRunner().invoke(app, cmd)
        lines = res.stderr.strip().splitlines() if hasattr(res, "stderr") and res.stderr else res.output.strip().splitlines()
        assert res.exit_code == 2, (cmd, res.output)
        assert len(lines) == 1 and lines[0].startswith(f"imprint: error: {field}: "), (cmd, lines)
    assert not (tmp_path / "out").exists()  # nothing was started


def test_good_spec_passes_validate_with_preflight(tmp_path, shard, no_model_loading):
    path = tmp_path / "job.toml"
    ok = merged(base_job(tmp_path, shard), {"input": {"templates": ["{{literal}} {source}"]}, "model": {"device": "cpu"},
                                            "edit": {"params": {"eta": 0.0}}})  # eta 0 is fine for an edit (DDIM)
    path.write_text(tomli_w.dumps(ok))
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 0, res.output


def test_model_limits_are_generic():
    from pipeline.models import RANDOM_MODELS, model_limits

    for name in RANDOM_MODELS:
        lim = model_limits(name)
        assert lim.num_train_timesteps == 1000 and lim.text_context == 77
    assert model_limits("tiny").latent_multiple == 16 and model_limits("sd15-random").latent_multiple == 64


def test_model_limits_of_a_local_folder_read_configs_only(tmp_path):
    import json

    from pipeline.models import model_limits

    for part, cfg in {"scheduler/scheduler_config.json": {"num_train_timesteps": 500},
                      "text_encoder/config.json": {"max_position_embeddings": 64},
                      "unet/config.json": {"block_out_channels": [8, 16, 32], "sample_size": 32},
                      "vae/config.json": {"block_out_channels": [8, 8, 8, 8]}}.items():
        (tmp_path / part).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / part).write_text(json.dumps(cfg))
    lim = model_limits(str(tmp_path))
    assert (lim.num_train_timesteps, lim.text_context, lim.latent_multiple, lim.resolution) == (500, 64, 32, 256)


def test_tokenizer_is_safe_across_threads(tiny):
    """The reader thread counts tokens while the main thread encodes prompts
    with the same tokenizer: every count must be right."""
    long = "word " * 100
    expect = tiny.count_tokens(long)
    assert expect == 102
    wrong, errors, done = [], [], threading.Event()

    def count():
        try:
            for _ in range(1500):
                n = tiny.count_tokens(long)
                if n != expect:
                    wrong.append(n)
        except Exception as exc:  # noqa: BLE001 - the bug raised ValueError here
            errors.append(repr(exc))
        finally:
            done.set()

    t = threading.Thread(target=count)
    t.start()
    encodes = 0
    while not done.is_set() or encodes < 20:  # (the lock may let the counter run ahead)
        try:
            tiny.encode_text([long, "a cat"])
            encodes += 1
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))
    t.join()
    assert not errors and not wrong, (len(wrong), errors[:2])


def test_lowering_steps_names_the_default_skip_it_would_fail_on(tmp_path, shard):
    """`--set inversion.steps=20` alone: the error says the skip is the default
    (36, for 100 steps) and which skip keeps the paper's ratio; a job that
    sets its own skip gets the plain range check."""
    from pipeline.spec import SpecError, load_spec

    raw = base_job(tmp_path, shard)
    raw["inversion"] = {}
    with pytest.raises(SpecError, match=r"^inversion.skip: the default 36 .*inversion.steps = 20.*e\.g\. 7 keeps"):
        load_spec(raw=raw, overrides=["inversion.steps=20"])
    with pytest.raises(SpecError, match=r"^inversion.skip: must be in \[0, inversion.steps\)"):
        load_spec(raw=raw, overrides=["inversion.steps=20", "inversion.skip=30"])
    assert load_spec(raw=raw, overrides=["inversion.steps=20", "inversion.skip=7"]).inversion.skip == 7
