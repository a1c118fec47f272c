"""Where pretrained weights come from, and whether that source answers.

`preflight` asks `unreachable` about weights that are not cached while the
hub is online: the workers would download them, and without a network the
hub client's retries (about 70 s for a CLIP checkpoint, two file names of
five tries each) stop every worker instead of the job at once. `imprint
pull` (pipeline/pull.py) fetches the same weights ahead of time."""

from __future__ import annotations

import os

from .models.loading import HUB_PROBE_TIMEOUT


def hub_endpoint() -> str:
    """The Hugging Face endpoint the hub client uses (HF_ENDPOINT, read now,
    so a stand-in hub set after import counts)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_repo_url(repo_id: str) -> str:
    return f"{hub_endpoint()}/api/models/{repo_id}"


def unreachable(url: str, what: str) -> str | None:
    """Why `url` (the source of `what`) cannot serve it, within about
    HUB_PROBE_TIMEOUT seconds: no answer, or 401/404; None when it answers."""
    import requests

    try:
        status = requests.head(url, timeout=HUB_PROBE_TIMEOUT, allow_redirects=True).status_code
    except requests.RequestException as exc:
        return f"{what} did not answer within {HUB_PROBE_TIMEOUT:g} s ({type(exc).__name__}: {url})"
    if status in (401, 404):
        return f"{what} answered HTTP {status} for {url} (gone, gated or private)"
    return None
