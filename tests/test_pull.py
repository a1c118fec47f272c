"""`imprint pull` (issue 33): a model and its scorers' weights fetched from the
hub into the caches the workers read, sizes shown first, only the files the
loaders read; then `validate` finds them offline. Against a local stand-in
of the hub (tests/hub_standin.py: the endpoints the hub client calls), so
nothing leaves the machine."""

import os

import pytest
import tomli_w
from helpers_data import good_samples, tiny_job, write
from hub_standin import StandInHub
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.pull import model_files

REPO = "acme/tiny-sd"
CLIP_REPO = "timm/vit_large_patch14_clip_224.openai"  # what the default scorer (ViT-L-14, openai) loads
TRUNK = "alexnet-owt-7be5be79.pth"  # LPIPS alex's torchvision weights


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> dict[str, bytes]:
    """The tiny SD model as a diffusers repository, plus files the loaders
    never read: a variant, a .bin beside the safetensors, a safety checker,
    a single-file checkpoint."""
    from pipeline.models import build_tiny, save_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    save_pipeline(build_tiny(), folder)
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    files.update({"unet/diffusion_pytorch_model.fp16.safetensors": b"variant", "unet/diffusion_pytorch_model.bin": b"bin",
                  "safety_checker/model.safetensors": b"checker", "safety_checker/config.json": b"{}",
                  "tiny-sd.ckpt": b"single file", "README.md": b"readme"})
    return files


@pytest.fixture(autouse=True)
def progress_bars_as_they_were(monkeypatch):
    """`imprint pull` turns the hub's progress bars on for its process: give
    the tests after these the switch and the bars as they found them."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", was) if was is not None else \
        monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    disabled = are_progress_bars_disabled()
    yield
    (disable_progress_bars if disabled else enable_progress_bars)()


def set_hub(monkeypatch, tmp_path, endpoint: str | None, offline: bool) -> None:
    """The environment a fresh `imprint` process would see, applied to the
    hub client's import-time constants too (this process imported it long ago)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    if endpoint:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)


def invoke(*args):
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stdout + (res.stderr or "")


def test_model_files_are_what_the_loaders_read(tiny_repo):
    chosen = model_files(tiny_repo)
    assert "model_index.json" in chosen and "unet/diffusion_pytorch_model.safetensors" in chosen
    assert "text_encoder/model.safetensors" in chosen and "tokenizer/tokenizer.json" in chosen
    assert "scheduler/scheduler_config.json" in chosen
    for never in ("unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
                  "safety_checker/model.safetensors", "tiny-sd.ckpt", "README.md"):
        assert never not in chosen
    # .bin only where a folder has no safetensors; sharded weights keep every shard and the index
    assert model_files(["vae/diffusion_pytorch_model.bin", "vae/config.json"]) == ["vae/config.json",
                                                                                  "vae/diffusion_pytorch_model.bin"]
    shards = ["transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
              "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
              "transformer/diffusion_pytorch_model.safetensors.index.json",
              "transformer/diffusion_pytorch_model.fp16-00001-of-00002.safetensors"]
    assert sorted(model_files(shards)) == sorted(shards[:3])


def test_pull_fills_the_caches_validate_reads(tmp_path, tiny_repo, monkeypatch):
    from pipeline import scoring

    shard = write(tmp_path / "s-000.tar", good_samples("p", 1))
    job = tmp_path / "job.toml"
    job.write_text(tomli_w.dumps(tiny_job(tmp_path, shard, model={"id": REPO}, score={"enabled": True})))
    repos = {REPO: tiny_repo, CLIP_REPO: {"open_clip_model.safetensors": b"c" * 3000, "open_clip_config.json": b"{}"}}
    with StandInHub(repos, {TRUNK: b"t" * 2000}) as hub:
        monkeypatch.setattr(scoring, "lpips_trunk_url", lambda net: f"{hub.url}/files/{TRUNK}")
        set_hub(monkeypatch, tmp_path, hub.url, offline=True)
        code, out = invoke("validate", str(job))
        assert code == 2 and "model.id" in out, out  # nothing cached yet
        set_hub(monkeypatch, tmp_path, hub.url, offline=False)
        code, out = invoke("pull", "--job", str(job), "--scorers")
        assert code == 0, out
        fetched = hub.fetched()
        set_hub(monkeypatch, tmp_path, hub.url, offline=True)
        code, validated = invoke("validate", str(job))
    assert code == 0, validated
    # sizes before the download: the model's, per component folder, and each scorer file's
    assert f"model {REPO}: {len(model_files(tiny_repo))} files" in out and "  unet " in out
    assert "CLIP ViT-L-14/openai: 3.0 KB" in out and "LPIPS alex trunk: 2.0 KB" in out
    wanted = {f"/{REPO}/resolve/{'0123456789abcdef0123456789abcdef01234567'}/{p}" for p in model_files(tiny_repo)}
    model_gets = {p for p in fetched if p.startswith(f"/{REPO}/")}
    assert model_gets == wanted, sorted(model_gets ^ wanted)
    assert f"/files/{TRUNK}" in fetched and any(p.endswith("/open_clip_model.safetensors") for p in fetched)
    assert (tmp_path / "torch" / "hub" / "checkpoints" / TRUNK).read_bytes() == b"t" * 2000
    # pulling again fetches nothing more
    with StandInHub(repos, {TRUNK: b"t" * 2000}) as hub:
        monkeypatch.setattr(scoring, "lpips_trunk_url", lambda net: f"{hub.url}/files/{TRUNK}")
        set_hub(monkeypatch, tmp_path, hub.url, offline=False)
        code, out = invoke("pull", REPO, "--scorers")
        assert code == 0 and hub.fetched() == [], (out, hub.fetched())
    assert "(0 B to fetch)" in out and "cached at" in out


def test_pull_into_a_folder_gives_a_model_id(tmp_path, tiny_repo, monkeypatch):
    from pipeline.models import missing_model_weights

    with StandInHub({REPO: tiny_repo}) as hub:
        set_hub(monkeypatch, tmp_path, hub.url, offline=False)
        code, out = invoke("pull", REPO, "--to", str(tmp_path / "tiny-sd"))
    assert code == 0, out
    folder = tmp_path / "tiny-sd"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                  and ".cache" not in p.parts) == sorted(model_files(tiny_repo))
    assert missing_model_weights(str(folder)) is None


def test_builtin_models_and_random_scorers_need_nothing(tmp_path, monkeypatch):
    set_hub(monkeypatch, tmp_path, "http://127.0.0.1:9", offline=True)  # neither offline nor a dead hub matters
    job = tmp_path / "job.toml"
    job.write_text(tomli_w.dumps({"input": {"shards": ["x.tar"]}, "model": {"id": "tiny-flux"},
                                  "score": {"clip_model": "imprint-tiny-clip", "clip_pretrained": "random",
                                            "lpips_pretrained": False}}))
    code, out = invoke("pull", "--job", str(job), "--scorers")
    assert code == 0, out
    assert "tiny-flux: built in" in out and "nothing to fetch" in out and "random trunk" in out
    code, out = invoke("pull", "toy", "--scorers")  # toy-clip ships; its LPIPS trunk does not
    assert code == 2 and "toy model ships" in out and "HF_HUB_OFFLINE is set" in out


def test_pull_names_a_missing_repository(tmp_path, monkeypatch):
    with StandInHub({}) as hub:
        set_hub(monkeypatch, tmp_path, hub.url, offline=False)
        code, out = invoke("pull", "acme/no-such-model")
    assert code == 2 and "acme/no-such-model" in out and "RepositoryNotFound" in out, out


def test_clip_sources_name_the_files_open_clip_tries():
    from pipeline.scoring import CLIP_HUB_FILES, clip_weights_source

    assert clip_weights_source("ViT-L-14", "openai") == ("hf_hub", CLIP_REPO, CLIP_HUB_FILES)
    # open_clip's other hub form names the file: its safetensors alternative is tried first
    assert clip_weights_source("ViTamin-S", "datacomp1b") == (
        "hf_hub", "jienengchen/ViTamin-S", ("pytorch_model.safetensors", "pytorch_model.bin"))
    assert clip_weights_source("toy-clip", "toy") is None
