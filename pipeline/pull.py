"""`imprint pull`: fetch a model's weights and its scorers' into the caches
the workers read (or a model into a folder), once and ahead of a job, with
their sizes first.

What is fetched is what the loaders read, no more:
- a hub model: model_index.json and the component folders the families
  load (`LOADED_PARTS`: sd.load and flow.load), each with its configs and
  tokenizer files and one set of weights: the safetensors without a
  variant suffix, else the .bin (what from_pretrained picks); no fp16/ema
  variants, no single-file checkpoints, no safety checker;
- the scorers (`--scorers`): the CLIP checkpoint open_clip loads for the
  tag (from the hub into HF_HOME, or a URL into $TORCH_HOME/hub/open_clip)
  and the LPIPS trunk torchvision loads ($TORCH_HOME/hub/checkpoints).
Built-in models and shipped or random scorer weights need nothing."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# Component folders the model families load (sd.load, flow.load); others
# in a repository (safety_checker, feature_extractor, image_encoder) are not read.
LOADED_PARTS = ("scheduler", "unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                "tokenizer", "tokenizer_2", "tokenizer_3")
# Weights without a variant ("fp16", "non_ema"), single or sharded: what from_pretrained loads by default.
_WEIGHTS = re.compile(r"(diffusion_pytorch_model|model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)")
_SMALL_FILES = (".json", ".txt", ".model")  # configs, tokenizer vocabularies, sentencepiece models


class PullError(RuntimeError):
    """Something could not be fetched; the message says what and why."""


def model_files(paths: Iterable[str]) -> list[str]:
    """The files of a diffusers repository (its listing) that imprint's
    loaders read: model_index.json, and in each loaded component folder its
    configs and tokenizer files and its default weights (safetensors when
    the folder has them, else .bin)."""
    paths = sorted(paths)
    chosen = [p for p in paths if p == "model_index.json"]
    for part in LOADED_PARTS:
        inside = [p for p in paths if p.startswith(part + "/") and "/" not in p[len(part) + 1:]]
        names = {p: p[len(part) + 1:] for p in inside}
        chosen += [p for p in inside if names[p].endswith(_SMALL_FILES)]
        weights = [p for p in inside if _WEIGHTS.fullmatch(names[p])]
        safe = [p for p in weights if p.endswith(".safetensors")]
        chosen += safe or weights
    return chosen


def human(n: int | None) -> str:
    if n is None:
        return "size unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def builtin_model(model_id: str) -> str | None:
    """Why a model id needs no download (built in, shipped, a local folder); None for a hub id."""
    from .models import builtin_ids
    from .models.toy import TOY

    if model_id == TOY:
        return "the toy model ships in the package"
    if model_id in builtin_ids():
        return "built in (random weights, made on the machine)"
    if os.path.isdir(model_id):
        return "a local folder"
    return None


def _require_online() -> None:
    from .models.loading import hub_offline

    if hub_offline():
        raise PullError("HF_HUB_OFFLINE is set: pulling needs the hub (unset it for this command)")


def pull_model(model_id: str, revision: str | None, to: Path | None, echo: Callable[[str], None]) -> None:
    """Fetch a hub model's loaded files into the Hugging Face cache, or into
    the folder `to` (a diffusers folder that model.id may name)."""
    why = builtin_model(model_id)
    if why:
        echo(f"model {model_id}: {why}; nothing to fetch")
        return
    _require_online()
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    from .models.loading import hub_endpoint

    try:
        listing = {f.path: getattr(f, "size", None)
                   for f in HfApi(endpoint=hub_endpoint()).list_repo_tree(model_id, recursive=True, revision=revision)
                   if hasattr(f, "size")}
        files = model_files(listing)
        if "model_index.json" not in files:
            raise PullError(f"model {model_id!r}: the repository has no model_index.json (not a diffusers "
                            "pipeline; imprint loads diffusers-format SD, SDXL, SD3 and FLUX repositories)")
        kw = {"revision": revision, "allow_patterns": files, "local_dir": str(to) if to else None, "endpoint": hub_endpoint()}
        plan = _quietly(lambda: snapshot_download(model_id, dry_run=True, **kw))  # its bar would show no download
        total = sum(f.file_size or 0 for f in plan)
        fetch = sum(f.file_size or 0 for f in plan if f.will_download)
        where = to or "the Hugging Face cache (HF_HOME=" + os.environ.get("HF_HOME", "~/.cache/huggingface") + ")"
        echo(f"model {model_id}: {len(plan)} files, {human(total)} ({human(fetch)} to fetch) into {where}")
        for part in sorted({f.filename.split("/")[0] for f in plan}):
            size = sum(f.file_size or 0 for f in plan if f.filename.split("/")[0] == part)
            echo(f"  {part:<16} {human(size):>10}")
        path = snapshot_download(model_id, **kw)
    except PullError:
        raise
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise PullError(f"model {model_id!r}: {type(exc).__name__}: {exc}") from None
    echo(f"model {model_id}: ready in {path}")


def _quietly(call):
    """call() without the hub's progress bars, which are left as they were."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    if are_progress_bars_disabled():
        return call()
    disable_progress_bars()
    try:
        return call()
    finally:
        enable_progress_bars()


@dataclass(frozen=True)
class ScorerFile:
    """One scorer checkpoint to fetch: from a hub repository (repo, names)
    into the Hugging Face cache, or from a URL into `dest`."""

    label: str
    repo: str | None = None
    names: tuple[str, ...] = ()  # in a hub repo: the file names open_clip tries, in its order (the first present is loaded)
    url: str | None = None
    dest: str | None = None


def scorer_files(cfg) -> tuple[list[ScorerFile], list[str]]:
    """What the scorers of a [score] config (resolved: no "auto") load from
    the network, and notes on what needs nothing."""
    from . import scoring

    files: list[ScorerFile] = []
    notes: list[str] = []
    if not cfg.enabled:
        return files, ["scoring is disabled (score.enabled = false)"]
    tag = cfg.pretrained_tag
    source = None if cfg.clip_random else scoring.clip_weights_source(cfg.clip_model, tag)
    if cfg.clip_random:
        notes.append(f"CLIP {cfg.clip_model}: random weights; nothing to fetch")
    elif source is None:
        notes.append(f"CLIP {cfg.clip_model}/{tag}: shipped or a local file; nothing to fetch")
    elif source[0] == "hf_hub":
        files.append(ScorerFile(f"CLIP {cfg.clip_model}/{tag}", repo=source[1], names=source[2]))
    else:
        files.append(ScorerFile(f"CLIP {cfg.clip_model}/{tag}", url=source[1], dest=scoring.clip_url_cache_path(source[1])))
    if cfg.lpips_pretrained:
        files.append(ScorerFile(f"LPIPS {cfg.lpips_net} trunk", url=scoring.lpips_trunk_url(cfg.lpips_net),
                                dest=scoring._lpips_trunk_checkpoint(cfg.lpips_net)))
    else:
        notes.append(f"LPIPS {cfg.lpips_net}: random trunk; nothing to fetch")
    return files, notes


def pull_scorers(cfg, echo: Callable[[str], None]) -> None:
    """Fetch the scorer checkpoints of a resolved [score] config where the
    scorers read them (HF_HOME, TORCH_HOME)."""
    files, notes = scorer_files(cfg)
    for note in notes:
        echo(note)
    if not files:
        return
    _require_online()
    import requests
    import torch
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    from .models.loading import hub_endpoint

    for f in files:
        try:
            if f.repo:
                sizes = {e.path: getattr(e, "size", None) for e in HfApi(endpoint=hub_endpoint()).list_repo_tree(f.repo)}
                name = next((n for n in f.names if n in sizes), None)
                if name is None:
                    raise PullError(f"{f.label}: hub repo {f.repo} has none of {', '.join(f.names)}")
                echo(f"{f.label}: {human(sizes[name])} from hub repo {f.repo} into the Hugging Face cache")
                path = hf_hub_download(f.repo, name, endpoint=hub_endpoint())
            else:
                if os.path.isfile(f.dest):
                    echo(f"{f.label}: cached at {f.dest}")
                    continue
                head = requests.head(f.url, timeout=30, allow_redirects=True)
                head.raise_for_status()
                size = int(head.headers["Content-Length"]) if "Content-Length" in head.headers else None
                echo(f"{f.label}: {human(size)} from {f.url} into {f.dest}")
                os.makedirs(os.path.dirname(f.dest), exist_ok=True)
                torch.hub.download_url_to_file(f.url, f.dest, progress=True)
                path = f.dest
        except PullError:
            raise
        except (HfHubHTTPError, requests.RequestException, OSError, ValueError) as exc:
            raise PullError(f"{f.label}: {type(exc).__name__}: {exc}") from None
        echo(f"{f.label}: ready in {path}")


def job_scorers(model_id: str, job: Path | None):
    """The [score] config a job would use (its spec's), or the defaults for `model_id`, resolved."""
    from .spec import JobSpec, load_spec, resolve_scorers, score_config

    if job is not None:
        return score_config(load_spec(job))
    spec = JobSpec()
    spec.model.id = model_id
    resolve_scorers(spec)
    return score_config(spec)
