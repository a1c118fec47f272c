"""What every model family shares when loading: device and dtype rules, the
offline switch, the CLIP tokenizer built from open_clip's vocabulary, reading
a checkpoint's config files (local folder or hub cache) and the limits a job
spec must respect. Imports nothing else of imprint, so any module (scoring,
preflight, the families) may import it without a circle."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache

import torch


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (half precision is slow or unsupported there); bf16 on
    GPUs that support it (no fp16 overflow in the VAE), else fp16."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if name is None or name == "auto":
        return default_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: expected one of auto, {', '.join(DTYPES)}") from None



def vae_scale_factor(vae) -> int:
    # AutoencoderKL halves the size at every block but the last
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _clip_bpe_path() -> str:
    import open_clip

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {path} (open_clip_torch installation incomplete)")
    return path


@lru_cache(maxsize=1)
def clip_tokenizer():
    """The CLIP BPE tokenizer built offline from the vocabulary shipped in
    open_clip_torch. Written as vocab.json/merges.txt and loaded with
    `from_pretrained` (the direct constructor silently mis-tokenises under
    transformers 5)."""
    from transformers import CLIPTokenizer

    with gzip.open(_clip_bpe_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = _bytes_to_unicode()
    vocab = list(byte_chars) + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory(prefix="imprint-tok-") as d:
        with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as fh:
            json.dump({tok: i for i, tok in enumerate(vocab)}, fh)
        with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as fh:
            fh.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        return CLIPTokenizer.from_pretrained(
            d,
            model_max_length=77,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            pad_token="<|endoftext|>",
        )


def _bytes_to_unicode() -> list[str]:
    # The GPT-2/CLIP byte-to-printable-character table, in CLIP's vocab order.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]



def model_index(model_id: str, revision: str | None) -> dict:
    """A diffusers folder's model_index.json ({} when it has none)."""
    try:
        return json.loads(config_file(model_id, "model_index.json", revision))
    except FileNotFoundError:
        return {}


def index_has(index: dict, part: str) -> bool:
    """Whether the pipeline has a component: model_index.json lists it as
    [library, class], or [null, null] when it has none (the SDXL refiner's
    first text encoder). Without an index, assume it has."""
    if not index:
        return True
    entry = index.get(part)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


class LatentCodec:
    """Images <-> latents through a model's VAE, the same for every family:
    latents are (z - shift_factor) x scaling_factor of the posterior MEAN, in
    float32 (SD's VAEs have no shift; SD3's and FLUX's do). Needs `vae`,
    `device`, `dtype` and `vae_dtype` (the VAE's own dtype when it differs:
    SDXL's upcast VAE) on the class that uses it."""

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents, float32."""
        x = images.to(self.device, self.vae_dtype or self.dtype).contiguous()
        mean = self.vae.encode(x).latent_dist.mean.float()
        return ((mean - self.shift_factor) * self.scaling_factor).contiguous()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images [B, 3, H, W] in [-1, 1], float32, clamped."""
        z = latents.float() / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.device, self.vae_dtype or self.dtype)).sample.float().clamp(-1, 1)


@dataclass(frozen=True)
class ModelLimits:
    """What a job spec must respect for a model, known without its weights."""

    num_train_timesteps: int  # the scheduler's training steps: inversion.steps may not exceed them
    text_context: int  # the text encoder's context in tokens (incl. start/end markers)
    latent_multiple: int  # VAE factor x UNet downsampling: the smallest image side the model runs at
    resolution: int  # native image size in pixels
    family: str = "sd"  # "sd", "sdxl" or "flow": which methods and controls apply




HUB_PROBE_TIMEOUT = 1.5  # seconds: how long an unknown id may take to be refused


def hub_repo_cached(model_id: str) -> bool:
    """Whether the Hugging Face cache holds anything of the repository `model_id`."""
    from huggingface_hub import constants

    return os.path.isdir(os.path.join(constants.HF_HUB_CACHE, "models--" + model_id.replace("/", "--")))


# Whether a weights source answers: `preflight` asks `unreachable` about weights
# that are not cached while the hub is online (the workers would download them,
# and without a network the hub client's retries, about 70 s for a CLIP
# checkpoint, would stop every worker instead of the job at once); an unknown
# model id is refused with the same probe. `imprint pull` fetches them ahead.


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


def check_resolvable(model_id: str, builtin: list[str]) -> None:
    """Refuse, within about HUB_PROBE_TIMEOUT seconds, an id that is neither
    built in, a local folder, in the local cache, nor found on the hub: the
    message lists the built-in ids and says whether the hub answered (the
    hub client's own retries take half a minute without a network)."""
    if model_id in builtin or os.path.isdir(model_id) or hub_repo_cached(model_id):
        return
    known = ", ".join(builtin)
    looks_local = model_id.startswith((".", "/", "~")) or model_id.count("/") != 1
    if looks_local:
        raise ValueError(f"{model_id!r} is not a folder, a built-in model ({known}) or a hub id (owner/name)")
    if hub_offline():
        raise ValueError(f"{model_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
                         f"(built-in models: {known})")
    why = unreachable(hub_repo_url(model_id), "the Hugging Face hub")
    if why:
        raise ValueError(f"{model_id!r} is not in the local cache and {why}; built-in models: {known}")


def config_file(model_id: str, rel: str, revision: str | None) -> str:
    if os.path.isdir(model_id):
        path = os.path.join(model_id, rel)
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        with open(hf_hub_download(model_id, rel, revision=revision), encoding="utf-8") as fh:
            return fh.read()
    except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError in some versions)
        raise ValueError("not in the local cache and the hub cannot be reached (offline?)") from None
    except EntryNotFoundError:
        raise FileNotFoundError(rel) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:  # unknown repo, no access, malformed id
        raise ValueError(f"cannot resolve on the hub: {type(exc).__name__}: {exc}") from None


# Weight files diffusers/transformers load for a component (single or sharded).
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                 "pytorch_model.bin", "diffusion_pytorch_model.safetensors.index.json",
                 "model.safetensors.index.json")



def hub_offline() -> bool:
    """HF_HUB_OFFLINE: nothing may be downloaded, so weights must be cached."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def hub_weights_missing(model_id: str, parts: list[str], revision: str | None = None) -> str | None:
    """Why a hub model's weights for `parts` (component folders) would not
    be found while the hub is offline; None when cached, or when online
    (the worker downloads them)."""
    if not hub_offline():
        return None
    from huggingface_hub import try_to_load_from_cache

    for part in parts:
        if not any(isinstance(try_to_load_from_cache(model_id, f"{part}/{f}", revision=revision), str)
                   for f in WEIGHT_FILES):
            return (f"the {part} weights of model {model_id!r} are not in the Hugging Face cache "
                    f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}) and HF_HUB_OFFLINE is set; "
                    "download them once online (huggingface-cli download " + model_id + ")")
    return None


def folder_weights_missing(folder: str, model_id: str, parts: list[str], hint: str = "") -> str | None:
    """Why a local diffusers folder lacks weights for `parts`; None when every part has a weight file."""
    for part in parts:
        d = os.path.join(folder, part)
        if not any(os.path.isfile(os.path.join(d, f)) for f in WEIGHT_FILES):
            return f"model {model_id!r} has no weights in {d} (expected one of {', '.join(WEIGHT_FILES[:4])}){hint}"
    return None
