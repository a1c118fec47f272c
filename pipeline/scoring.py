"""Per-edit quality scores and the filters built on them.

Every edit row gets the scores users of edited corpora filter by, computed in
the worker that made the edit, on the same device, right after decoding.

Scores (one value per edit row)
-------------------------------
``clip_text``       cos(E_img(edit), E_txt(target prompt)), in [-1, 1]. The
                    CLIP score of PIE-Bench and the paper's Table 1 (PIE-Bench
                    reports ``100 * max(cos, 0)``; here the raw cosine).
``clip_direction``  cos(E_img(edit) - E_img(source), E_txt(target) - E_txt(source prompt)),
                    in [-1, 1]: whether the image changed the way the text
                    changed (InstructPix2Pix). As there, the four embeddings
                    are L2-normalised before the differences are taken. It is 0
                    when the target prompt equals the source prompt or the edit
                    equals the source (a zero difference has no direction); for
                    an edit that is nearly its source it is dominated by
                    rounding, so pair a direction threshold with clip_image or
                    lpips.
``clip_image``      cos(E_img(edit), E_img(source)), in [-1, 1]; 1 for an
                    unchanged image.
``lpips``           LPIPS distance (Zhang et al. 2018, ``lpips`` package, v0.1,
                    ``alex`` trunk by default, ``vgg``/``squeeze`` selectable)
                    between edit and source, >= 0, 0 for identical images
                    (paper's Table 1: 0.29 for edit-friendly edits, 0.62 for
                    DDIM inversion).
``diversity``       for the N edits of one (image, target prompt) group, the
                    mean LPIPS over its N*(N-1)/2 pairs (paper's Table 1: 0.18
                    over the 28 pairs of 8 edits), repeated on every row of the
                    group; NaN when N = 1 (no pairs). A group is what the caller
                    says it is (``groups``): edits of one image with one target
                    prompt, possibly from different inversions of the image;
                    all rows of a group must be scored in one call.

Samples with an edit mask (the ``edit_mask.png`` entry) also get PIE-Bench's
seven metrics (``structure_distance``, ``bg_psnr``, ``bg_lpips``, ``bg_mse``,
``bg_ssim``, ``clip_whole``, ``clip_edited``; ``pipeline/pie_metrics.py``
says how each is computed), NaN on rows without a mask; ``Scorers.pie``
computes them, loading its models (DINO ViT-B/8, SqueezeNet LPIPS) on first use.

Resolution and preprocessing
----------------------------
CLIP sees what its own preprocessing would give it, done on the device in
torch: images in [-1, 1] are mapped to [0, 1], resized (bicubic, antialiased)
so the shorter side is the model's input size (224 for ViT-L-14), center
cropped, clamped to [0, 1] (as the 8-bit round trip of the PIL pipeline does)
and normalised with the model's mean/std (``model.visual.preprocess_cfg``).
LPIPS runs at the NATIVE size of the images (512x512 for SD 1.x, as PIE-Bench
measures it; no resizing), so sources and edits must have the same size.
LPIPS always runs in float32, whatever the worker's dtype: it costs a few
GFLOP per image, and in float16 ``lpips.normalize_tensor``'s eps (1e-10)
underflows, so an all-zero feature vector gives NaN. CLIP runs in the worker's
dtype (open_clip's mixed precision: half-precision weights, float32 layer
norms); cosines are taken in float32. LPIPS holds the features of up to
``batch_size`` edits (or one whole larger group) and their sources at once:
about 6 MB per 512-pixel image for ``alex``, 130 MB for ``vgg``.

Models and weights
------------------
Default CLIP is ``ViT-L-14`` with its own weights (``pretrained="auto"``:
OpenAI's for ViT-L-14, the model of PIE-Bench and of InstructPix2Pix's filter;
toy-clip's shipped ones for toy-clip; a job spec picks toy-clip for the toy
model, see ``spec.resolve_scorers``); any open_clip model name and
pretrained tag (or checkpoint file) can be chosen (QuickGELU is switched on
when the tag was trained with it, as OpenAI's were). Weights load through
open_clip's and lpips'/torchvision's own mechanisms, so their caches follow
HF_HOME (open_clip via the Hugging Face hub) and TORCH_HOME (torchvision
trunks; open_clip tags without a hub entry go to $TORCH_HOME/hub/open_clip).
When requested weights cannot be had (offline, not cached), loading raises
``WeightsUnavailableError`` naming the model; it never falls back to random
weights; with HF_HUB_OFFLINE=1 an uncached LPIPS trunk is reported at once
(torchvision itself ignores that switch and would try the network). Random
weights are asked for explicitly: ``clip_pretrained = "random"``
("none" and "" say the same: no pretrained weights) builds the architecture with ``pretrained=None``, and
``lpips_pretrained = false`` uses lpips' randomly initialised trunk
(``pnet_rand=True``; its calibrated linear heads ship inside the package, so
nothing is downloaded). Then ``Scorers.random_weights`` is True, the
description written into every output file names ``clip_pretrained = "random"``
(``clip_random_weights``) or ``lpips_trunk = "random"``, and the scores
are not meaningful (tests, demo, CI). Random initialisation is seeded, so every
worker builds the same random scorers. ``imprint-tiny-clip`` (a 64-pixel ViT
with 2 layers of width 64, shipped in ``pipeline/clip_configs``) keeps such runs
fast.

``toy-clip`` (``clip_model = "toy-clip"``) is a small CLIP trained
contrastively on the toy model's scenes and captions (``pipeline/toy``; its
recipe is ``make toy-model``), shipped inside the package: its only
pretrained weights are those, tagged ``toy`` (what ``auto`` means for it; it
has no ``openai`` weights), and its scores mean something on toy scenes only.

Filtering (``select``)
----------------------
A row passes when every configured threshold holds (``clip_text >= clip_text_min``,
``clip_direction >= clip_direction_min``, ``clip_image >= clip_image_min``,
``lpips <= lpips_max``; a NaN score fails its threshold). With ``keep_top_k > 0``,
the k best passing rows of each group are kept, ranked by ``top_k_by``
(descending for the CLIP scores, ascending for ``lpips``; ties and NaN resolved
by row order, NaN last). The InstructPix2Pix recipe (their generated corpus:
100 samples per prompt pair) is ``clip_text_min = 0.2``,
``clip_direction_min = 0.2``, ``clip_image_min = 0.7``, ``keep_top_k = 4`` by
``clip_direction`` (``FilterConfig.instructpix2pix()``); its thresholds assume
ViT-L/14 with OpenAI weights.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .models.loading import hub_offline
from .pie_metrics import HIGHER_IS_BETTER, PIE_METRICS, STRUCTURE_MODEL, PieScorer

SCORE_COLUMNS = ("clip_text", "clip_direction", "clip_image", "lpips", "diversity")
LPIPS_NETS = ("alex", "vgg", "squeeze")
# Columns top_k_by may name, and whether larger is better. Diversity is constant
# within a group, so it cannot rank a group's rows.
RANKABLE = {"clip_text": True, "clip_direction": True, "clip_image": True, "lpips": False, **HIGHER_IS_BETTER}
TINY_CLIP = "imprint-tiny-clip"
TOY_CLIP = "toy-clip"
TOY_CLIP_TAGS = ("toy",)  # toy-clip has only its shipped weights
TOY_CLIP_WEIGHTS = "open_clip_model.safetensors"
# The checkpoint files open_clip looks for in a hub repository named without a file, in its order.
CLIP_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CLIP_CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"
RANDOM_INIT_SEED = 0
RANDOM = "random"  # clip_pretrained for randomly initialised weights
NO_WEIGHTS = (RANDOM, "none", "")  # "none" (no pretrained weights) and "" say the same
AUTO = "auto"  # clip_pretrained: the model's own weights (toy-clip: its shipped ones; else OpenAI's, or its first tag)


class WeightsUnavailableError(RuntimeError):
    """Requested pretrained scorer weights could not be loaded (e.g. offline and not cached)."""


# ----------------------------------------------------------------------------- configs


@dataclass
class ScoreConfig:
    """The job spec's [score] section."""

    enabled: bool = True  # the worker's switch; Scorers ignores it
    clip_model: str = "ViT-L-14"
    clip_pretrained: str = AUTO  # tag or checkpoint file; "auto" = the model's own (`pretrained_tag`); "random" = random init
    lpips_net: str = "alex"
    lpips_pretrained: bool = True  # False = randomly initialised trunk (pnet_rand)
    batch_size: int = 16  # images (or image pairs) per forward pass
    recon_psnr: bool = False  # the worker's reconstruction check (uses psnr())
    structure_model: str = STRUCTURE_MODEL  # PIE-Bench structure distance: a timm ViT (DINO ViT-B/8)
    structure_pretrained: bool = True  # False = randomly initialised (structure distance not meaningful)

    @property
    def clip_random(self) -> bool:
        return self.clip_pretrained is None or self.clip_pretrained.strip().lower() in NO_WEIGHTS

    @property
    def pretrained_tag(self) -> str:
        """The weights CLIP loads, by name: "random", a tag, or a checkpoint file."""
        if self.clip_random:
            return RANDOM
        return default_pretrained(self.clip_model) if self.clip_pretrained == AUTO else self.clip_pretrained

    def validate(self) -> None:
        if self.lpips_net not in LPIPS_NETS:
            raise ValueError(f"score.lpips_net must be one of {', '.join(LPIPS_NETS)}, got {self.lpips_net!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"score.batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.clip_model, str) or not self.clip_model:
            raise ValueError(f"score.clip_model must be an open_clip model name, got {self.clip_model!r}")
        if self.clip_pretrained is not None and not isinstance(self.clip_pretrained, str):
            raise ValueError(f"score.clip_pretrained must be a string, got {self.clip_pretrained!r}")
        _check_clip_choice(self.clip_model, None if self.clip_random else self.pretrained_tag)
        if not isinstance(self.structure_model, str) or not self.structure_model:
            raise ValueError(f"score.structure_model must be a timm ViT name, got {self.structure_model!r}")


@dataclass
class FilterConfig:
    """The job spec's [filter] section."""

    clip_text_min: float | None = None
    clip_direction_min: float | None = None
    clip_image_min: float | None = None
    lpips_max: float | None = None
    # PIE-Bench's metrics (rows of samples with an edit mask; NaN elsewhere fails a threshold)
    structure_distance_max: float | None = None
    bg_psnr_min: float | None = None
    bg_lpips_max: float | None = None
    bg_mse_max: float | None = None
    bg_ssim_min: float | None = None
    clip_whole_min: float | None = None
    clip_edited_min: float | None = None
    keep_top_k: int = 0  # 0 = keep all passing rows
    top_k_by: str = "clip_direction"
    write_rejected: bool = False  # for the writer; select() only decides

    @classmethod
    def instructpix2pix(cls, keep_top_k: int = 4) -> FilterConfig:
        """InstructPix2Pix's recipe (for ViT-L/14 OpenAI CLIP)."""
        return cls(clip_text_min=0.2, clip_direction_min=0.2, clip_image_min=0.7, keep_top_k=keep_top_k)

    def thresholds(self) -> list[tuple[str, str, float]]:
        """The active thresholds as (column, ">=" or "<=", value)."""
        pairs = [("clip_text", ">=", self.clip_text_min), ("clip_direction", ">=", self.clip_direction_min),
                 ("clip_image", ">=", self.clip_image_min), ("lpips", "<=", self.lpips_max)]
        pairs += [(m, ">=" if up else "<=", getattr(self, threshold_field(m))) for m, up in HIGHER_IS_BETTER.items()]
        return [(col, op, float(v)) for col, op, v in pairs if v is not None]

    @property
    def active(self) -> bool:
        return bool(self.thresholds()) or self.keep_top_k > 0

    def validate(self) -> None:
        for name in ("clip_text_min", "clip_direction_min", "clip_image_min", "lpips_max",
                     *map(threshold_field, PIE_METRICS)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ValueError(f"filter.{name} must be a finite number or unset, got {v!r}")
        if isinstance(self.keep_top_k, bool) or not isinstance(self.keep_top_k, int) or self.keep_top_k < 0:
            raise ValueError("filter.keep_top_k must be an integer >= 0 (0 keeps all passing rows), "
                             f"got {self.keep_top_k!r}")
        if self.top_k_by not in RANKABLE:
            raise ValueError(f"filter.top_k_by must be one of {', '.join(RANKABLE)}, got {self.top_k_by!r}")


def threshold_field(metric: str) -> str:
    """The [filter] field of a PIE-Bench metric's threshold: <metric>_min
    where higher is better, else <metric>_max."""
    return f"{metric}_{'min' if HIGHER_IS_BETTER[metric] else 'max'}"


def validate_configs(score: ScoreConfig, filt: FilterConfig) -> None:
    """Both sections, and that filtering has scores to work on."""
    filt.validate()
    if score.enabled:
        score.validate()
    elif filt.active:
        raise ValueError("filter thresholds or filter.keep_top_k need score.enabled = true")


def _register_clip_configs() -> None:
    import open_clip

    if TINY_CLIP not in open_clip.list_models() or TOY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(CLIP_CONFIG_DIR)


def default_pretrained(model: str) -> str:
    """What clip_pretrained = "auto" loads for `model`: toy-clip's shipped
    weights, OpenAI's where the model has them (the CLIP of PIE-Bench and
    InstructPix2Pix's filter), else the model's first pretrained tag."""
    import open_clip

    if model == TOY_CLIP:
        return TOY_CLIP_TAGS[0]
    _register_clip_configs()
    tags = open_clip.list_pretrained_tags_by_model(model) if model in open_clip.list_models() else []
    if "openai" in tags or not tags:
        return "openai" if tags else AUTO  # no tags: _check_clip_choice names the problem
    return tags[0]


def _toy_clip_weights() -> Path:
    from .models.toy import TOY_CLIP_DIR

    return TOY_CLIP_DIR / TOY_CLIP_WEIGHTS


def _resolve_pretrained(model: str, pretrained: str) -> str:
    """The checkpoint `pretrained` names for `model`: toy-clip's tags mean its
    shipped weights file; anything else is open_clip's business."""
    if model == TOY_CLIP and pretrained in TOY_CLIP_TAGS:
        path = _toy_clip_weights()
        if not path.is_file():
            raise WeightsUnavailableError(f"toy-clip weights missing at {path} (incomplete installation?); "
                                          "`make toy-model` trains them")
        return str(path)
    return pretrained


def toy_clip_create():
    """A randomly initialised toy-clip and its tokenizer (for training)."""
    import open_clip

    _register_clip_configs()
    return open_clip.create_model(TOY_CLIP, pretrained=None), open_clip.get_tokenizer(TOY_CLIP)


def toy_clip_save(model: Any, folder: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
    """Write toy-clip weights as open_clip loads them (safetensors state dict)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().to(dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, TOY_CLIP_WEIGHTS))


def _check_clip_choice(model: str, pretrained: str | None) -> None:
    import open_clip

    _register_clip_configs()
    if model.startswith("hf-hub:"):
        # Such ids always load their hub weights, which "random" could not honour.
        raise ValueError(f"score.clip_model {model!r}: hf-hub ids are not supported; name an open_clip "
                         "architecture (open_clip.list_models()) and its pretrained tag")
    if model not in open_clip.list_models():
        raise ValueError(f"score.clip_model {model!r} is not an open_clip model (see open_clip.list_models())")
    if model == TOY_CLIP:
        if pretrained is None or pretrained in TOY_CLIP_TAGS or os.path.isfile(pretrained):
            return
        raise ValueError(f"score.clip_pretrained {pretrained!r}: toy-clip's weights are the shipped ones "
                         f"(tag \"toy\"), a checkpoint file, or \"random\" for random weights")
    known = pretrained is None or open_clip.get_pretrained_cfg(model, pretrained) or os.path.isfile(pretrained)
    if not known:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise ValueError(f"score.clip_pretrained {pretrained!r} is neither a pretrained tag of {model} "
                         f"(tags: {tags}) nor a checkpoint file; use \"random\" for random weights")


PULL_HINT = "`imprint pull MODEL --scorers` fetches them"


def missing_weights(cfg: ScoreConfig) -> tuple[str, str] | None:
    """(field, reason) when pretrained weights the scorers will load are not
    at hand: a shipped file missing, or not cached and either the hub is
    offline or their source does not answer now (the worker would spend
    minutes in download retries). Random weights need none; uncached
    weights whose source answers are downloaded when the worker starts.
    Reads caches and probes sources only (no weights are loaded)."""
    if not cfg.enabled:
        return None
    if not cfg.clip_random:
        _register_clip_configs()
        tag = cfg.pretrained_tag
        where = _clip_weights_cached(cfg.clip_model, tag)
        if where is not None and not where[0]:
            why = None
            if not (hub_offline() or where[1].startswith("missing")):
                why = _source_unreachable(clip_weights_source(cfg.clip_model, tag), "the CLIP weights' source")
            if hub_offline() or where[1].startswith("missing") or why:
                because = f" and {why}" if why else ""
                return ("score.clip_pretrained", f"CLIP weights {cfg.clip_model}/{tag} are {where[1]}{because}; "
                        f"{PULL_HINT}, or set score.clip_pretrained = \"random\" (scores then not meaningful)")
    if cfg.lpips_pretrained:
        cached = _lpips_trunk_checkpoint(cfg.lpips_net)
        if not os.path.exists(cached):
            from .models.loading import unreachable

            why = "HF_HUB_OFFLINE is set" if hub_offline() else \
                unreachable(lpips_trunk_url(cfg.lpips_net), "the LPIPS trunk's source")
            if why:
                return ("score.lpips_pretrained", f"LPIPS trunk weights for net {cfg.lpips_net!r} are not cached at "
                        f"{cached} and {why}; {PULL_HINT} (TORCH_HOME decides the folder), or set "
                        "score.lpips_pretrained = false (scores then not meaningful)")
    return None


def clip_weights_source(model: str, pretrained: str) -> tuple[str, str, tuple[str, ...]] | None:
    """Where open_clip downloads a tag's weights from: ("hf_hub", repo id,
    the file names it tries in its order: the safetensors alternative first)
    or ("url", address, ()); None for a file, a shipped tag or an unknown tag."""
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
    if tag_cfg.get("hf_hub"):
        # open_clip's form: "org/name/" (its default file) or "org/name/file.bin"
        repo_id, filename = os.path.split(tag_cfg["hf_hub"])
        if not filename:
            return "hf_hub", repo_id, CLIP_HUB_FILES
        if filename.endswith((".bin", ".pth")):
            return "hf_hub", repo_id, (filename[:-4] + ".safetensors", filename)
        return "hf_hub", repo_id, (filename,)
    if tag_cfg.get("url"):
        return "url", tag_cfg["url"], ()
    return None


def _source_unreachable(source: tuple[str, str, tuple[str, ...]] | None, what: str) -> str | None:
    from .models.loading import hub_repo_url, unreachable

    if source is None:
        return None
    kind, where, _ = source
    return unreachable(hub_repo_url(where) if kind == "hf_hub" else where, what)


def lpips_trunk_url(net: str) -> str:
    """The torchvision ImageNet weights lpips loads for its trunk."""
    return _lpips_trunk_weights(net).url


def _lpips_trunk_weights(net: str):
    from torchvision import models

    return {"alex": models.AlexNet_Weights, "vgg": models.VGG16_Weights,
            "squeeze": models.SqueezeNet1_1_Weights}[net].IMAGENET1K_V1


def _clip_weights_cached(model: str, pretrained: str) -> tuple[bool, str] | None:
    """(whether the weights are at hand, where they were looked for); None
    when that cannot be told without loading (open_clip's own resolution)."""
    try:
        path = _resolve_pretrained(model, pretrained)
    except WeightsUnavailableError as exc:
        return False, f"missing ({exc})"
    if os.path.isfile(path):
        return True, path
    source = clip_weights_source(model, path)
    if source is None:
        return None
    kind, where, names = source
    if kind == "hf_hub":
        from huggingface_hub import try_to_load_from_cache

        for name in names:
            found = try_to_load_from_cache(where, name)
            if isinstance(found, str):
                return True, found
        return False, f"not in the Hugging Face cache (hub repo {where}, HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')})"
    cached = clip_url_cache_path(where)
    return (True, cached) if os.path.isfile(cached) else (False, f"not cached at {cached}")



def clip_url_cache_path(url: str) -> str:
    """Where a URL-only CLIP tag's checkpoint is kept (`_load_clip`'s cache_dir)."""
    return os.path.join(torch.hub.get_dir(), "open_clip", os.path.basename(url))


# ----------------------------------------------------------------------------- math


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity in float32; 0 where a row is zero."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)


def directional_similarity(img_src: torch.Tensor, img_edit: torch.Tensor,
                           txt_src: torch.Tensor, txt_edit: torch.Tensor) -> torch.Tensor:
    """InstructPix2Pix's CLIP directional similarity of L2-normalised embeddings [B, D]."""
    return cosine(img_edit - img_src, txt_edit - txt_src)


def pairwise_mean(dist: torch.Tensor) -> float:
    """Mean of d(i, j) over the N*(N-1)/2 pairs i < j of a square [N, N]
    distance matrix (upper triangle); NaN when N < 2."""
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"dist must be a square matrix, got shape {tuple(dist.shape)}")
    n = dist.shape[0]
    if n < 2:
        return float("nan")
    i, j = torch.triu_indices(n, n, offset=1)
    return float(dist[i, j].double().mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of [B, C, H, W] images in [-1, 1] (data range 2):
    10 log10(4 / MSE), float32; inf for identical images."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"psnr needs two [B, C, H, W] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.float() - b.float()).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(4.0 / mse)


def clip_pixels(images: torch.Tensor, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                resize_mode: str = "shortest", interpolation: str = "bicubic", fill: float = 0.0) -> torch.Tensor:
    """open_clip's eval preprocessing on a [B, 3, H, W] batch in [-1, 1], in
    torch on the batch's device: resize (antialiased), crop or pad to `size`,
    clamp to [0, 1], normalise. Returns float32."""
    th, tw = (size, size) if isinstance(size, int) else tuple(size)
    x = (images.float() + 1) / 2
    h, w = x.shape[-2:]
    if resize_mode == "squash":
        nh, nw = th, tw
    elif resize_mode == "shortest" and th == tw:
        # torchvision Resize(int): shorter side to size, longer side truncated.
        nh, nw = (th, int(th * w / h)) if h <= w else (int(th * h / w), th)
    elif resize_mode in ("shortest", "longest"):
        # open_clip ResizeKeepRatio: one scale for both sides, rounded.
        ratio = max(h / th, w / tw) if resize_mode == "longest" else min(h / th, w / tw)
        nh, nw = round(h / ratio), round(w / ratio)
    else:
        raise ValueError(f"unsupported open_clip resize_mode {resize_mode!r}")
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode=interpolation, align_corners=False, antialias=True)
    if (nh, nw) != (th, tw):
        # torchvision center_crop / open_clip CenterCropOrPad: pad with fill, then crop
        ph, pw = max(th - nh, 0), max(tw - nw, 0)
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)
            nh, nw = x.shape[-2:]
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        x = x[..., top:top + th, left:left + tw]
    x = x.clamp(0, 1)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def lpips_features(net: Any, images: torch.Tensor) -> list[torch.Tensor]:
    """The unit-normalised trunk activations LPIPS compares, for images in
    [-1, 1] (float32). Computed once per image, so a source shared by many
    edits and the edits of a group compared pairwise are each run once."""
    import lpips as lpips_pkg

    outs = net.net.forward(net.scaling_layer(images.float()))
    return [lpips_pkg.normalize_tensor(o) for o in outs]


def lpips_distance(net: Any, fa: Sequence[torch.Tensor], fb: Sequence[torch.Tensor]) -> torch.Tensor:
    """LPIPS between aligned rows of two feature lists: the sum over layers of
    the spatial mean of the calibrated linear head on squared differences
    (what ``lpips.LPIPS.forward`` computes). Returns [B] float32."""
    total = 0.0
    for lin, a, b in zip(net.lins, fa, fb):
        total = total + lin((a - b).square()).mean(dim=(1, 2, 3))
    return total


# ----------------------------------------------------------------------------- scorers


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def group_members(groups: Sequence[int], rows: Sequence[int] | None = None) -> dict[int, list[int]]:
    """{group id: its positions in `rows` (default: all rows)}, ids in order of first appearance."""
    members: dict[int, list[int]] = {}
    for pos, r in enumerate(range(len(groups)) if rows is None else rows):
        members.setdefault(groups[r], []).append(pos)
    return members


def _group_chunks(groups: Sequence[int], size: int) -> list[list[int]]:
    """Row indices packed into chunks of whole groups (first-appearance order),
    at most `size` rows per chunk unless a single group is larger."""
    chunks: list[list[int]] = []
    current: list[int] = []
    for rows in group_members(groups).values():
        if current and len(current) + len(rows) > size:
            chunks.append(current)
            current = []
        current = current + rows
    if current:
        chunks.append(current)
    return chunks


def _load_clip(cfg: ScoreConfig, device: torch.device, dtype: torch.dtype):
    import open_clip

    precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)
    if precision is None:
        raise ValueError(f"scoring dtype must be float32, float16 or bfloat16, got {dtype}")
    kwargs: dict[str, Any] = {"precision": precision, "device": device}
    if cfg.clip_random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(cfg.clip_model, pretrained=None, **kwargs)
    else:
        _register_clip_configs()
        pretrained = _resolve_pretrained(cfg.clip_model, cfg.pretrained_tag)
        tag_cfg = open_clip.get_pretrained_cfg(cfg.clip_model, pretrained)  # {} for a checkpoint file
        # OpenAI weights were trained with QuickGELU; the plain config uses GELU.
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        if tag_cfg and not tag_cfg.get("hf_hub"):
            # URL-only tags would go to ~/.cache/clip; keep them under TORCH_HOME.
            kwargs["cache_dir"] = os.path.dirname(clip_url_cache_path(tag_cfg["url"]))
        try:
            model = open_clip.create_model(cfg.clip_model, pretrained=pretrained, require_pretrained=True, **kwargs)
        except Exception as exc:
            raise WeightsUnavailableError(
                f"CLIP weights for model {cfg.clip_model!r} (pretrained={cfg.clip_pretrained!r}) could not be loaded "
                f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}, torch hub dir {torch.hub.get_dir()}): "
                f"{exc}; put the weights in the cache, or set score.clip_pretrained = \"random\" for random weights "
                f"(scores then not meaningful)") from exc
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(cfg.clip_model)
    return model, tokenizer


def _lpips_trunk_checkpoint(net: str) -> str:
    """Where torchvision keeps the ImageNet trunk lpips asks for (its `pretrained=True` weights)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(lpips_trunk_url(net)))


def _load_lpips(cfg: ScoreConfig, device: torch.device):
    import lpips as lpips_pkg

    with warnings.catch_warnings():
        # lpips builds its trunk with torchvision's deprecated `pretrained=` flag.
        warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", message="Arguments other than a weight enum", category=UserWarning)
        if cfg.lpips_pretrained:
            cached = _lpips_trunk_checkpoint(cfg.lpips_net)
            hint = (f"LPIPS trunk weights for net {cfg.lpips_net!r} (torchvision ImageNet weights, expected at "
                    f"{cached}) could not be loaded")
            fix = ("put them there (TORCH_HOME decides the folder), or set score.lpips_pretrained = false for a "
                   "random trunk (scores then not meaningful)")
            if not os.path.exists(cached) and hub_offline():
                # torchvision ignores the offline switch and would try the network.
                raise WeightsUnavailableError(f"{hint}: not cached and HF_HUB_OFFLINE is set; {fix}")
            try:
                net = lpips_pkg.LPIPS(net=cfg.lpips_net, pnet_rand=False, verbose=False)
            except Exception as exc:
                raise WeightsUnavailableError(f"{hint}: {exc}; {fix}") from exc
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                net = lpips_pkg.LPIPS(net=cfg.lpips_net, pnet_rand=True, verbose=False)
    return net.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


class Scorers:
    """CLIP and LPIPS, loaded once per worker. Holds weights only; `score` is
    a pure function of its arguments."""

    def __init__(self, cfg: ScoreConfig, clip: Any, tokenizer: Any, lpips_net: Any,
                 device: torch.device, dtype: torch.dtype):
        self.cfg = cfg
        self.clip = clip
        self.tokenizer = tokenizer
        self.lpips_net = lpips_net
        self.device = device
        self.dtype = dtype
        pp = clip.visual.preprocess_cfg
        self.clip_size = pp["size"]
        self.random_weights = cfg.clip_random or not cfg.lpips_pretrained or not cfg.structure_pretrained
        self.pie = PieScorer(self)  # PIE-Bench's metrics, for samples with an edit mask
        import lpips as lpips_pkg
        import open_clip

        self.description = {
            "clip_model": cfg.clip_model,
            "clip_pretrained": cfg.pretrained_tag,  # the weights used ("random" for random ones)
            "clip_random_weights": cfg.clip_random,
            "clip_image_size": list(self.clip_size) if isinstance(self.clip_size, (tuple, list)) else self.clip_size,
            "clip_dtype": str(dtype).removeprefix("torch."),
            "lpips_net": cfg.lpips_net,
            "lpips_trunk": "imagenet" if cfg.lpips_pretrained else "random",
            "lpips_version": "0.1",
            "lpips_resolution": "native",
            # PIE-Bench's metrics (loaded only when a sample has an edit mask): LPIPS squeeze with the trunk
            # above (imagenet / random), DINO's structure distance with these weights
            "pie_lpips_net": "squeeze",
            "structure_model": cfg.structure_model,
            "structure_weights": "pretrained" if cfg.structure_pretrained else "random",
            "random_weights": self.random_weights,
            "open_clip_version": open_clip.__version__,
            "lpips_package_version": getattr(lpips_pkg, "__version__", "unknown"),
        }

    def structure_model(self) -> Any:
        """The ViT of PIE-Bench's structure distance (score.structure_model; random when not pretrained)."""
        return load_structure_model(self.cfg.structure_model, self.cfg.structure_pretrained, self.device)

    def lpips_model(self, net: str) -> Any:
        """An LPIPS model with trunk `net` under this config's pretrained rule (PIE-Bench scores with squeeze)."""
        from dataclasses import replace

        return _load_lpips(replace(self.cfg, lpips_net=net), self.device)

    @classmethod
    def load(cls, cfg: ScoreConfig, device: torch.device | str, dtype: torch.dtype | str) -> Scorers:
        from .models.loading import parse_dtype

        cfg.validate()
        device = torch.device(device)
        dtype = parse_dtype(dtype, device)
        clip, tokenizer = _load_clip(cfg, device, dtype)
        return cls(cfg, clip, tokenizer, _load_lpips(cfg, device), device, dtype)

    # -- embeddings

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP image embeddings [B, D] float32 of images in [-1, 1]."""
        pp = self.clip.visual.preprocess_cfg
        out = []
        for sl in _batches(images.shape[0], self.cfg.batch_size):
            x = clip_pixels(images[sl].to(self.device), pp["size"], pp["mean"], pp["std"],
                            pp.get("resize_mode", "shortest"), pp.get("interpolation", "bicubic"),
                            pp.get("fill_color", 0) / 255.0)
            out.append(F.normalize(self.clip.encode_image(x.to(self.dtype)).float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0, 0, device=self.device)

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised CLIP text embeddings [len(prompts), D] float32."""
        out = []
        for sl in _batches(len(prompts), self.cfg.batch_size):
            tokens = self.tokenizer(list(prompts[sl])).to(self.device)
            out.append(F.normalize(self.clip.encode_text(tokens).float(), dim=-1))
        return torch.cat(out) if out else torch.empty(0, 0, device=self.device)

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        parts = [lpips_features(self.lpips_net, images[sl].to(self.device))
                 for sl in _batches(images.shape[0], self.cfg.batch_size)]
        return [torch.cat(layer) for layer in zip(*parts)]

    def _distances(self, fa: list[torch.Tensor], ia: torch.Tensor,
                   fb: list[torch.Tensor], ib: torch.Tensor) -> torch.Tensor:
        """LPIPS between rows fa[ia[k]] and fb[ib[k]], batched."""
        out = [lpips_distance(self.lpips_net, [f[ia[sl]] for f in fa], [f[ib[sl]] for f in fb])
               for sl in _batches(len(ia), self.cfg.batch_size)]
        return torch.cat(out) if out else torch.empty(0, device=self.device)

    # -- scores

    @torch.inference_mode()
    def score(self, sources: torch.Tensor, source_prompts: Sequence[str], edits: torch.Tensor,
              edit_source: Sequence[int], target_prompts: Sequence[str],
              groups: Sequence[int]) -> dict[str, list[float]]:
        """Scores of M edits against their sources.

        sources [S, 3, H, W] and edits [M, 3, H, W] in [-1, 1], same H, W;
        source_prompts (S); edit_source (M) indexes sources; target_prompts (M);
        groups (M): equal ids mark edits of one image with one target prompt
        (the diversity groups). Returns the SCORE_COLUMNS as lists of M floats.
        Results do not depend on how rows are split into calls or batches,
        except that a group must be scored within one call for its diversity.
        """
        m = _check_score_inputs(sources, source_prompts, edits, edit_source, target_prompts, groups)
        if m == 0:
            return {c: [] for c in SCORE_COLUMNS}
        src_idx = torch.as_tensor(list(edit_source), dtype=torch.long, device=self.device)

        # CLIP: each source image and each distinct prompt is embedded once.
        prompts = list(dict.fromkeys([*source_prompts, *target_prompts]))
        row = {p: i for i, p in enumerate(prompts)}
        txt = self.embed_texts(prompts)
        txt_src = txt[torch.as_tensor([row[source_prompts[k]] for k in edit_source], device=self.device)]
        txt_tgt = txt[torch.as_tensor([row[p] for p in target_prompts], device=self.device)]
        img_src = self.embed_images(sources)[src_idx]
        img_edit = self.embed_images(edits)
        clip_text = cosine(img_edit, txt_tgt)
        clip_image = cosine(img_edit, img_src)
        clip_direction = directional_similarity(img_src, img_edit, txt_src, txt_tgt)

        # LPIPS: whole groups at a time, so the features of a group's edits
        # (and of the sources they need) are computed once and memory stays
        # bounded by batch_size rows (or the largest group).
        lp = torch.empty(m, dtype=torch.float64)
        div = torch.full((m,), float("nan"), dtype=torch.float64)
        for chunk in _group_chunks(groups, self.cfg.batch_size):
            needed = sorted({edit_source[r] for r in chunk})
            local_src = torch.as_tensor([needed.index(edit_source[r]) for r in chunk], device=self.device)
            f_edit = self._features(edits[chunk])
            f_src = self._features(sources[needed])
            own = torch.arange(len(chunk), device=self.device)
            lp[chunk] = self._distances(f_edit, own, f_src, local_src).cpu().double()
            # all pairs i < j within each group of the chunk, in one batched pass
            members = group_members(groups, chunk)
            tri = {g: torch.triu_indices(len(loc), len(loc), offset=1) for g, loc in members.items()}
            ia = torch.cat([torch.as_tensor(loc)[tri[g][0]] for g, loc in members.items()]).to(self.device)
            ib = torch.cat([torch.as_tensor(loc)[tri[g][1]] for g, loc in members.items()]).to(self.device)
            d = self._distances(f_edit, ia, f_edit, ib).cpu().double().split([tri[g].shape[1] for g in members])
            for (g, loc), dg in zip(members.items(), d):
                dist = torch.zeros(len(loc), len(loc), dtype=torch.float64)
                dist[tri[g][0], tri[g][1]] = dg
                div[[chunk[a] for a in loc]] = pairwise_mean(dist + dist.T)
        return {
            "clip_text": clip_text.cpu().tolist(),
            "clip_direction": clip_direction.cpu().tolist(),
            "clip_image": clip_image.cpu().tolist(),
            "lpips": lp.tolist(),
            "diversity": div.tolist(),
        }


def _check_score_inputs(sources, source_prompts, edits, edit_source, target_prompts, groups) -> int:
    if sources.ndim != 4 or sources.shape[1] != 3:
        raise ValueError(f"sources must be [S, 3, H, W], got {tuple(sources.shape)}")
    if edits.ndim != 4 or edits.shape[1] != 3:
        raise ValueError(f"edits must be [M, 3, H, W], got {tuple(edits.shape)}")
    s, m = sources.shape[0], edits.shape[0]
    if m and sources.shape[-2:] != edits.shape[-2:]:
        raise ValueError(f"edits {tuple(edits.shape[-2:])} and sources {tuple(sources.shape[-2:])} must have one size "
                         "(LPIPS compares them at native size)")
    if len(source_prompts) != s:
        raise ValueError(f"source_prompts has {len(source_prompts)} entries for {s} sources")
    for name, seq in (("edit_source", edit_source), ("target_prompts", target_prompts), ("groups", groups)):
        if len(seq) != m:
            raise ValueError(f"{name} has {len(seq)} entries for {m} edits")
    bad = [k for k in edit_source if not 0 <= k < s]
    if bad:
        raise ValueError(f"edit_source entries {bad[:5]} are out of range for {s} sources")
    prompt_of: dict[int, str] = {}
    for g, p in zip(groups, target_prompts):
        if prompt_of.setdefault(g, p) != p:
            raise ValueError(f"group {g} mixes target prompts {prompt_of[g]!r} and {p!r}; a group is one image "
                             "with one target prompt")
    return m


# ----------------------------------------------------------------------------- filtering


def select(scores: dict[str, Sequence[float]], groups: Sequence[int], cfg: FilterConfig) -> list[bool]:
    """Keep flags per row: a row failing a threshold is rejected; among the
    passing rows of each group the `keep_top_k` best by `top_k_by` are kept
    (all of them when keep_top_k = 0). Ties go to the earlier row; NaN ranks last."""
    cfg.validate()
    n = len(groups)
    needed = [col for col, _, _ in cfg.thresholds()] + ([cfg.top_k_by] if cfg.keep_top_k > 0 else [])
    for col in needed:
        if col not in scores:
            raise ValueError(f"filtering needs the {col!r} score, which was not computed")
        if len(scores[col]) != n:
            raise ValueError(f"score {col!r} has {len(scores[col])} values for {n} rows")
    def value(col: str, r: int) -> float:
        v = scores[col][r]
        return float("nan") if v is None else float(v)

    keep = [True] * n
    for col, op, limit in cfg.thresholds():
        for r in range(n):
            v = value(col, r)
            if not (v >= limit if op == ">=" else v <= limit):  # NaN fails either way
                keep[r] = False
    if cfg.keep_top_k > 0:
        sign = 1.0 if RANKABLE[cfg.top_k_by] else -1.0

        def rank(r: int) -> tuple[bool, float, int]:
            v = value(cfg.top_k_by, r)
            return (math.isnan(v), 0.0 if math.isnan(v) else -sign * v, r)

        passing = [r for r in range(n) if keep[r]]
        for positions in group_members(groups, passing).values():
            for r in sorted((passing[p] for p in positions), key=rank)[cfg.keep_top_k:]:
                keep[r] = False
    return keep


def load_structure_model(name: str, pretrained: bool, device) -> Any:
    """The timm ViT of the structure distance: its hub weights, or (pretrained
    False) a seeded random initialisation."""
    import timm

    if pretrained:
        try:
            model = timm.create_model(name, pretrained=True, dynamic_img_size=True)
        except Exception as exc:
            raise WeightsUnavailableError(
                f"structure-distance weights {name!r} could not be loaded "
                f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}): {exc}; put them in the cache, or set "
                "score.structure_pretrained = false for random weights (structure distance then not meaningful)"
            ) from exc
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(name, pretrained=False, dynamic_img_size=True)
    return model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
