"""`imprint validate` runs `run`'s whole preflight (the same function): the
spec against the model (image size included), weights at hand, the shards,
the output path; a run that stops before committing anything leaves the
output path free; `--set` lists that do not parse are errors; scorers
follow the model and name the weights they use."""

import json

import pytest
import tomli_w
from typer.testing import CliRunner

from helpers_data import good_samples, tiny_job as job, write
from pipeline.cli import app
from pipeline.preflight import LPIPS_MIN_SIDE, JobError, preflight
from pipeline.spec import SpecError, load_spec


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write(tmp_path_factory.mktemp("shards") / "s-000.tar", good_samples("p", 2))


def validate(tmp_path, raw, *args):
    path = tmp_path / "job.toml"
    path.write_text(tomli_w.dumps(raw))
    res = CliRunner().invoke(app, ["validate", str(path), *args])
    return res.exit_code, (res.stderr if res.exit_code else res.stdout)


def one_error(code, text, field):
    lines = text.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"imprint: error: {field}"), (code, text)
    return lines[0]


# -- image size (issue 22 item 5) -----------------------------------------------------


def test_lpips_min_sides_are_the_true_bounds():
    import lpips
    import torch

    from pipeline.scoring import lpips_features

    for net, side in LPIPS_MIN_SIDE.items():
        m = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        lpips_features(m, torch.zeros(1, 3, side, side))
        with pytest.raises(RuntimeError, match="too small"):
            lpips_features(m, torch.zeros(1, 3, side - 1, side - 1))


def test_too_small_resolution_is_refused_with_the_smallest_that_works(tmp_path, shard):
    scored = {"enabled": True, "clip_model": "imprint-tiny-clip", "clip_pretrained": "random", "lpips_pretrained": False}
    # the measured crash: 16 px on the tiny model passed validate, then LPIPS (alex) failed every shard
    raw = job(tmp_path, shard, image={"resolution": 16, "multiple": 16}, score=scored)
    line = one_error(*validate(tmp_path, raw), "image.resolution")
    assert "alex" in line and "image.resolution = 32" in line
    assert validate(tmp_path, job(tmp_path, shard, image={"resolution": 32, "multiple": 16}, score=scored))[0] == 0
    # squeeze pools down to 17 px: with multiple 8 the smallest is 24
    raw = job(tmp_path, shard, image={"resolution": 16, "multiple": 8}, score={**scored, "lpips_net": "squeeze"})
    assert "image.resolution = 24" in one_error(*validate(tmp_path, raw), "image.resolution")
    # without scores the UNet's downsampling is the bound: 16 runs on tiny, 32 does not on sd15-random (64)
    assert validate(tmp_path, job(tmp_path, shard, image={"resolution": 16, "multiple": 16}))[0] == 0
    raw = job(tmp_path, shard, model={"id": "sd15-random"}, image={"resolution": 32, "multiple": 32})
    line = one_error(*validate(tmp_path, raw), "image.resolution")
    assert "sd15-random" in line and "image.resolution = 64" in line


# -- input and output (issue 24 item 3) --------------------------------------------------


def test_validate_checks_the_shards_like_run(tmp_path, shard):
    empty = tmp_path / "empty"
    empty.mkdir()
    not_tar = tmp_path / "photo.tar"
    not_tar.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 600)
    for shards, expect in (([str(empty)], "is a folder without .tar shards"), ([str(tmp_path / "nope.tar")], "shard not found"),
                           ([str(not_tar)], "not a readable tar")):
        raw = job(tmp_path, shard, input={"shards": shards})
        assert expect in one_error(*validate(tmp_path, raw), "input.shards")
        res = CliRunner().invoke(app, ["run", str(tmp_path / "job.toml"), "--no-progress"])
        assert res.exit_code == 2 and expect in res.output
        assert not (tmp_path / "out").exists()  # nothing claimed


def test_list_override_that_does_not_parse_is_an_error(tmp_path, shard):
    raw = job(tmp_path, shard)
    line = one_error(*validate(tmp_path, raw, "--set", "input.shards=[a.tar]"), "--set")
    assert "'[a.tar]' is not a TOML value" in line and 'input.shards=["a.tar"' in line
    with pytest.raises(SpecError, match="not a TOML value"):
        load_spec(raw=raw, overrides=["input.templates=[{source}, x]"])
    # quoted lists, bare words and single strings still work
    spec = load_spec(raw=raw, overrides=[f'input.shards=["{shard}"]', "model.id=tiny"])
    assert spec.input.shards == [shard] and spec.model.id == "tiny"
    assert load_spec(raw=raw, overrides=[f"input.shards={shard}"]).input.shards == [shard]


class _CannotStart:
    def __init__(self, spec):
        raise RuntimeError("no GPU memory left")


def test_a_run_that_fails_before_committing_does_not_claim_the_output(tmp_path, shard):
    from pipeline.executor import WorkerStartError, run_job

    first = load_spec(raw=job(tmp_path, shard))
    with pytest.raises(WorkerStartError):
        run_job(first, progress=False, worker_cls=_CannotStart)
    assert (tmp_path / "out" / "job.json").is_file()  # `imprint status` keeps the stop reason
    fixed = load_spec(raw=job(tmp_path, shard, edit={"seeds": 2}))
    assert fixed.hash() != first.hash()
    assert preflight(fixed).shards == [shard]  # validate passes
    report = run_job(fixed, progress=False)
    assert report.done == 1 and not report.failed
    assert json.loads((tmp_path / "out" / "job.json").read_text())["spec_hash"] == fixed.hash()
    # now it holds results: another spec is refused by validate and run alike, nothing is touched
    code, text = validate(tmp_path, job(tmp_path, shard))
    assert "holds results of another job spec" in one_error(code, text, "output.path")
    with pytest.raises(JobError, match="another job spec"):
        run_job(first, progress=False)
    assert validate(tmp_path, job(tmp_path, shard), "--force")[0] == 0
    assert validate(tmp_path, job(tmp_path, shard, edit={"seeds": 2}))[0] == 0  # this spec: fine


def test_validate_accepts_edit_codes_jobs(tmp_path, shard):
    from pipeline.executor import run_job

    run_job(load_spec(raw=job(tmp_path, shard, output={"noise": True})), progress=False)
    raw = job(tmp_path, shard, output={"path": str(tmp_path / "out2")}, input={"templates": ["{source} at night"]})
    code, text = validate(tmp_path, raw, "--codes", str(tmp_path / "out"))
    assert code == 0 and "# 1 code file(s)" in text, text
    import tomllib

    resolved = tomllib.loads(text)["input"]
    assert resolved["codes"] == str(tmp_path / "out") and resolved["shards"] == []
    code, text = validate(tmp_path, raw, "--codes", str(tmp_path / "nothing-here"))
    assert "no noise/*.parquet" in one_error(code, text, "input.codes")


# -- weights at hand ------------------------------------------------------------------


def test_missing_model_weights_are_found_before_any_work(tmp_path, shard):
    from pipeline.models import build_tiny

    folder = tmp_path / "config-only"
    m = build_tiny()
    m.unet.save_config(folder / "unet")
    m.vae.save_config(folder / "vae")
    m.scheduler.save_config(folder / "scheduler")
    m.text_encoder.config.save_pretrained(folder / "text_encoder")
    m.tokenizer.save_pretrained(folder / "tokenizer")
    line = one_error(*validate(tmp_path, job(tmp_path, shard, model={"id": str(folder)})), "model.id")
    assert "has no weights in" in line and "unet" in line
    assert not (tmp_path / "out").exists()


def test_uncached_scorer_weights_are_found_offline(tmp_path, shard, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    raw = job(tmp_path, shard, score={"enabled": True, "clip_model": "imprint-tiny-clip", "clip_pretrained": "random",
                                      "lpips_pretrained": True})
    assert "LPIPS trunk weights" in one_error(*validate(tmp_path, raw), "score.lpips_pretrained")
    # the measured case: a ViT-L-14/openai scorer that is not cached (it stopped a run after 48 s of retries)
    raw = job(tmp_path, shard, score={"enabled": True, "clip_model": "ViT-L-14", "clip_pretrained": "openai",
                                      "lpips_pretrained": False})
    from pipeline.scoring import ScoreConfig, _clip_weights_cached

    if _clip_weights_cached("ViT-L-14", "openai")[0]:
        pytest.skip("ViT-L-14/openai is cached on this machine")
    line = one_error(*validate(tmp_path, raw), "score.clip_pretrained")
    assert "ViT-L-14/openai" in line and "not in the Hugging Face cache" in line
    assert ScoreConfig().pretrained_tag == "openai"


# -- scorers follow the model (issue 24 item 4) -----------------------------------------------


def test_scorer_follows_the_model(tmp_path, shard):
    toy = load_spec(raw=job(tmp_path, shard, model={"id": "toy"}, score={"enabled": True, "lpips_pretrained": False}))
    assert (toy.score.clip_model, toy.score.clip_pretrained) == ("toy-clip", "toy")
    other = load_spec(raw=job(tmp_path, shard, score={"enabled": True}))
    assert (other.score.clip_model, other.score.clip_pretrained) == ("ViT-L-14", "openai")
    # the default resolves to what an explicit spec says: same hash, so existing outputs still resume
    explicit = load_spec(raw=job(tmp_path, shard, score={"enabled": True, "clip_model": "ViT-L-14",
                                                         "clip_pretrained": "openai"}))
    assert explicit.hash() == other.hash()
    # toy-clip has no OpenAI weights: asking for them is an error, not a silent substitution
    with pytest.raises(SpecError, match="toy-clip's weights are the shipped ones"):
        load_spec(raw=job(tmp_path, shard, score={"enabled": True, "clip_model": "toy-clip", "clip_pretrained": "openai"}))


def test_scorer_description_names_the_weights_used():
    from pipeline.scoring import ScoreConfig, Scorers

    trained = Scorers.load(ScoreConfig(clip_model="toy-clip", lpips_pretrained=False), "cpu", "float32").description
    assert trained["clip_pretrained"] == "toy" and trained["clip_random_weights"] is False
    assert trained["lpips_trunk"] == "random"
    for name in ("random", "none"):
        d = Scorers.load(ScoreConfig(clip_model="toy-clip", clip_pretrained=name, lpips_pretrained=False),
                         "cpu", "float32").description
        assert d["clip_pretrained"] == "random" and d["clip_random_weights"] is True


def test_report_banner_names_the_random_scorer():
    from types import SimpleNamespace

    from pipeline.report import _warning

    scorers = json.dumps({"clip_model": "toy-clip", "clip_pretrained": "random", "clip_random_weights": True,
                          "lpips_net": "alex", "lpips_trunk": "imagenet"})
    toy = SimpleNamespace(meta={"model_id": "toy", "scorers": scorers}, label="demo", path="o",
                          random_model=False, random_scores=True)
    banner = _warning([toy])
    assert 'the CLIP scorer toy-clip (clip_pretrained = &quot;random&quot;)' in banner and "LPIPS" not in banner
    scorers = json.dumps({"clip_model": "toy-clip", "clip_pretrained": "toy", "lpips_net": "alex", "lpips_trunk": "random"})
    tiny = SimpleNamespace(meta={"model_id": "tiny", "scorers": scorers}, label="t", path="o",
                           random_model=True, random_scores=True)
    banner = _warning([tiny])
    assert "Warning: random weights" in banner and "the LPIPS alex trunk (lpips_pretrained = false)" in banner
    assert "CLIP scorer" not in banner


def test_shipped_jobs_score_with_trained_weights():
    for name in ("demo", "compare-methods", "p2p"):
        spec = load_spec(f"jobs/{name}.toml")
        assert spec.model.id == "toy" and (spec.score.clip_model, spec.score.clip_pretrained) == ("toy-clip", "toy"), name
        preflight(spec)


class _NoOpWorker:
    """Opens nothing and hashes nothing itself, so the counts below are the driver's."""

    def __init__(self, spec):
        self.placement, self.live = {"host": "here", "pid": 1, "node_id": None}, {}

    def process(self, url):
        return {"shard": url, "name": "s-000", "images": 0, "errors": 0, "edits": 0, "kept": 0, "unet_calls": 0,
                "seconds": 0.0}


def test_a_run_opens_its_output_once_and_hashes_its_spec_once(tmp_path, shard, monkeypatch):
    """Issue 31: preflight's findings are the plan `run` executes; one run
    opened the output three times and hashed the spec five times (the
    driver's share of that: twice and three times)."""
    from pipeline.executor import run_job
    from pipeline.spec import JobSpec
    from pipeline.store import OutputStore

    spec = load_spec(raw=job(tmp_path, shard))
    counts = {"open": 0, "hash": 0}
    real_open, real_hash = OutputStore.open.__func__, JobSpec.hash

    def open_(cls, path):
        counts["open"] += 1
        return real_open(cls, path)

    def hash_(self):
        counts["hash"] += 1
        return real_hash(self)

    monkeypatch.setattr(OutputStore, "open", classmethod(open_))
    monkeypatch.setattr(JobSpec, "hash", hash_)
    report = run_job(spec, executor="inline", progress=False, worker_cls=_NoOpWorker)
    assert report.done == 1
    assert counts == {"open": 1, "hash": 1}


# -- the device where the workers run (issue 33) ----------------------------------------------


def test_a_device_the_local_cluster_lacks_is_refused(tmp_path, shard, monkeypatch):
    """The measured case: model.device = "cuda" with the Ray executor on a
    machine without a GPU passed validate, then waited 30 minutes for a
    worker the local cluster (this machine's devices only) could never place."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    raw = job(tmp_path, shard, model={"device": "cuda"}, run={"executor": "ray"})
    line = one_error(*validate(tmp_path, raw), "model.device")
    assert "local Ray cluster" in line and "run.ray_address" in line
    raw = job(tmp_path, shard, run={"executor": "ray", "gpus_per_worker": 1})
    assert "has 0" in one_error(*validate(tmp_path, raw), "run.gpus_per_worker")
    # a job that joins an existing cluster may ask for GPUs the driver lacks: the workers' machines have them
    joined = job(tmp_path, shard, model={"device": "cuda"}, run={"executor": "ray", "ray_address": "head:6379"})
    assert validate(tmp_path, joined)[0] == 0
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")  # inside `ray job submit`
    assert validate(tmp_path, raw)[0] == 0


def _dead_endpoint() -> str:
    """An http address nothing listens on (connections are refused at once)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch caches, read as the scorers read them."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # read by the hub at import
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_default_scorers_without_their_weights_fail_validate_at_once(tmp_path, shard, empty_caches, monkeypatch):
    """Issue 33: a job with the default scorers (ViT-L-14/openai, LPIPS alex)
    passed validate with an empty cache and a hub that does not answer, then
    each worker spent 70 s in the hub client's retries and the job failed."""
    import time

    raw = job(tmp_path, shard, score={"enabled": True})  # clip_model/clip_pretrained "auto"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online, but the hub does not answer
    monkeypatch.setenv("HF_ENDPOINT", _dead_endpoint())
    start = time.monotonic()
    line = one_error(*validate(tmp_path, raw), "score.clip_pretrained")
    assert time.monotonic() - start < 5, "validate should refuse within the probe timeout"
    assert "ViT-L-14/openai" in line and "not in the Hugging Face cache" in line and "did not answer" in line
    assert "imprint pull" in line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: refused without asking the hub
    line = one_error(*validate(tmp_path, raw), "score.clip_pretrained")
    assert "ViT-L-14/openai" in line and "imprint pull" in line


def test_an_lpips_trunk_whose_source_does_not_answer_fails_validate(tmp_path, shard, empty_caches, monkeypatch):
    from pipeline import scoring

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(scoring, "lpips_trunk_url", lambda net: f"{_dead_endpoint()}/alexnet-owt-7be5be79.pth")
    raw = job(tmp_path, shard, score={"enabled": True, "clip_model": "imprint-tiny-clip", "clip_pretrained": "random"})
    line = one_error(*validate(tmp_path, raw), "score.lpips_pretrained")
    assert "did not answer" in line and str(tmp_path / "torch") in line
