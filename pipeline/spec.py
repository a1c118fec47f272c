"""The job spec: a TOML file (schema in schemas/job.schema.json), validated
before any work with one message naming the bad field, overridable from the
command line (`--set edit.seeds=8`), and hashed so that resume only skips
shards finished under the same output-relevant settings."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPEC_VERSION = 1
IMAGE_FORMATS = ("webp", "png", "jpeg")
RESIZE_RULES = ("shorter", "square")
EXECUTORS = ("ray", "inline")


class SpecError(ValueError):
    """A bad job spec. The message names the field."""


@dataclass
class InputSpec:
    shards: list[str] = field(default_factory=list)  # paths/URLs, brace expansion allowed; "demo" = built-in sample
    codes: str = ""  # edit from stored codes: a job output folder or its noise/ folder (instead of shards)
    allow_pipe: bool = False  # allow `pipe:` shell-command URLs
    templates: list[str] = field(default_factory=list)  # job-level targets: "{source}" = the source prompt, "{label}" = a json field
    # unset: each sample's caption (json source_prompt or txt); "" = invert with the empty prompt (as LEDITS++ does);
    # a template such as "a photo of a {label}" = filled from the sample's json fields ("{source}" = its caption)
    source_prompt: str | None = None
    max_prompt_tokens: int = 77  # CLIP's context incl. start/end markers
    # true (diffusers' behaviour): a prompt over max_prompt_tokens is cut by the text encoder to its context and
    # the rows say meta.truncated_prompt = true; false: such a sample is an error row (prompt_too_long)
    truncate_prompts: bool = True


@dataclass
class ImageSpec:
    resolution: int = 0  # shorter side in pixels; 0 = the model's native resolution
    resize: str = "shorter"  # "shorter": shorter side to resolution, center crop to multiples of `multiple`;
    #                           "square": center square crop, resized to resolution x resolution
    multiple: int = 64
    max_aspect: float = 2.0  # longer side is cropped to at most max_aspect * resolution
    max_pixels: int = 64_000_000  # decoded pixels above this are refused (decompression bombs)
    min_side: int = 16  # images smaller than this on either side are refused


@dataclass
class ModelSpec:
    id: str = "tiny"
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    revision: str = ""
    compile: bool = False  # torch.compile the UNet (pays off on long jobs; see `imprint bench --compile`)


@dataclass
class InversionSpec:
    method: str | list[str] = "edit-friendly"  # one method, or several to compare on the same inputs
    steps: int = 100
    skip: int = 36
    cfg_source: float = 3.5
    params: dict = field(default_factory=dict)  # method-specific (edit-friendly: eta)
    # per-method overrides when several methods run: {name = {skip, cfg_source, cfg_target, params}}
    per_method: dict = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)


@dataclass
class EditSpec:
    cfg_target: float = 15.0
    seeds: int = 1  # N diverse codes (and edits) per target prompt
    params: dict = field(default_factory=dict)  # method-specific edit parameters
    # attention control: "none", "p2p" (Prompt-to-Prompt), or a list to compare them in one table
    control: str | list[str] = "none"
    # p2p: fractions of the full `steps` (not steps - skip), counted from the edit's first step, during which
    # cross- / self-attention is injected, as the reference code counts (p2p.injected_steps)
    cross_until: float = 0.6
    self_until: float = 0.2
    # p2p: "auto" (replace when source and target have the same number of words, else refine) |
    # "replace" (same number of words) | "refine" (any prompts, token alignment)
    mode: str = "auto"
    reweight: dict = field(default_factory=dict)  # p2p: {target word = attention factor}

    @property
    def controls(self) -> list[str]:
        return [self.control] if isinstance(self.control, str) else list(self.control)

    def p2p(self):
        from .p2p import P2PConfig

        return P2PConfig(cross_until=self.cross_until, self_until=self.self_until, mode=self.mode,
                         reweight=dict(self.reweight))


@dataclass
class ManipulateSpec:
    """Edits in the noise space, applied to every code before editing."""

    shift_x: int = 0  # latent pixels, + = right
    shift_y: int = 0  # latent pixels, + = down
    flip: str = ""  # "" | "horizontal" | "vertical"
    strokes: bool = False  # color strokes (Eq. 7): per sample from `mask.png` + `stroke.png`, or the job's files
    strokes_mask: str = ""  # job-level binary mask image (white = stroke region)
    strokes_image: str = ""  # job-level colored image
    strokes_strength: float = 0.05
    strokes_t1: int = 20  # of 100 steps (scaled to inversion.steps)
    strokes_t2: int = 70


@dataclass
class BatchSpec:
    images: int = 4  # images inverted together
    max_unet_batch: int = 64  # rows per UNet call (CFG doubles rows); lower it on small GPUs
    # rows per VAE encode/decode call: a 512x512 decode holds ~0.4 GiB of activations per row, so 8 fits a 24 GB GPU
    max_decode_batch: int = 8
    # pad each UNet call's rows to a multiple of this (copies, dropped after) so a compiled UNet sees few batch
    # shapes and does not recompile; 0 = 8 when model.compile is on, else no padding
    pad_rows: int = 0
    prefetch: int = 8  # decoded samples buffered ahead of the model


@dataclass
class OutputSpec:
    path: str = "out/job"
    noise: bool = False  # write noise codes to noise/
    noise_dtype: str = "float16"
    image_format: str = "webp"
    quality: int = 90
    reconstruction_check: bool = True  # reconstruct one code per image alongside the edits (sources.recon_*)


@dataclass
class ScoreSpec:
    enabled: bool = True
    # "auto": the scorer that fits the model: toy-clip for model "toy", else ViT-L-14
    clip_model: str = "auto"
    # "auto": the CLIP model's own weights (toy-clip: its shipped ones; ViT-L-14: OpenAI's);
    # "random": randomly initialised (scores not meaningful; "none" says the same)
    clip_pretrained: str = "auto"
    lpips_net: str = "alex"
    lpips_pretrained: bool = True
    batch_size: int = 16
    recon_psnr: bool = False
    # PIE-Bench's structure distance (samples with an edit mask): a timm ViT, DINO ViT-B/8 as published;
    # structure_pretrained = false: randomly initialised (not meaningful; tests, offline)
    structure_model: str = "vit_base_patch8_224.dino"
    structure_pretrained: bool = True


@dataclass
class FilterSpec:
    clip_text_min: float | None = None
    clip_direction_min: float | None = None
    clip_image_min: float | None = None
    lpips_max: float | None = None
    # PIE-Bench's metrics (rows of samples with an edit mask)
    structure_distance_max: float | None = None
    bg_psnr_min: float | None = None
    bg_lpips_max: float | None = None
    bg_mse_max: float | None = None
    bg_ssim_min: float | None = None
    clip_whole_min: float | None = None
    clip_edited_min: float | None = None
    keep_top_k: int = 0
    top_k_by: str = "clip_direction"
    write_rejected: bool = False


# Fields added with PIE-Bench's metrics; left out of JobSpec.hash at their defaults, so that outputs written
# before them keep their hash (and resume)
_PIE_FIELDS = {"score": ("structure_model", "structure_pretrained"),
               "filter": ("structure_distance_max", "bg_psnr_min", "bg_lpips_max", "bg_mse_max", "bg_ssim_min",
                          "clip_whole_min", "clip_edited_min")}


@dataclass
class RunSpec:
    seed: int = 0
    executor: str = "ray"
    # "" = $RAY_ADDRESS (set inside `ray job submit` jobs) if set, else start a
    # local cluster; "auto", host:port or ray://... joins that cluster.
    ray_address: str = ""
    # Workers (Ray actors) at most; 0 = one per GPU slot the cluster has or its
    # autoscaler can add (1 worker on a cluster without GPUs), never more than
    # the shards left.
    max_workers: int = 0
    # GPUs each worker asks Ray for; unset = 1 when the model runs on CUDA
    # (model.device cuda, or auto on a cluster that has or can add GPUs), else 0.
    # Fractions (0.5, 0.25) pack several workers onto one GPU.
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 0.5  # fractional: leaves room for Ray's own tasks
    shard_timeout_s: float = 14400.0  # one shard's deadline; its worker is replaced after it
    # With shards left and no worker placed on any node for this long (the
    # cluster has no room and adds none), the job stops and says what it waited for.
    placement_timeout_s: float = 1800.0
    # A worker placed on a node but not ready (model download and load) within
    # this long is stopped as a start failure (a hung download).
    start_timeout_s: float = 1800.0
    max_attempts: int = 3
    threads: int = 0  # torch threads per worker; 0 = leave torch's default


@dataclass
class JobSpec:
    input: InputSpec = field(default_factory=InputSpec)
    image: ImageSpec = field(default_factory=ImageSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    inversion: InversionSpec = field(default_factory=InversionSpec)
    edit: EditSpec = field(default_factory=EditSpec)
    manipulate: ManipulateSpec = field(default_factory=ManipulateSpec)
    batch: BatchSpec = field(default_factory=BatchSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    score: ScoreSpec = field(default_factory=ScoreSpec)
    filter: FilterSpec = field(default_factory=FilterSpec)
    run: RunSpec = field(default_factory=RunSpec)
    version: int = SPEC_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Hash of what changes an output row: model (id, revision, dtype),
        method parameters, seeds, prompts and templates, image geometry,
        manipulations, scorer and filter settings, output format. Left out,
        so that they can change between runs of one output: which shards
        (`input.shards`/`input.codes`: adding shards to a finished output
        processes only the new ones), batching, `model.compile`, the device,
        the scorer's batch size, every execution setting (`[run]` except the
        seed) and the output path."""
        d = self.to_dict()
        for k in ("shards", "codes", "allow_pipe"):
            d["input"].pop(k, None)
        if d["input"]["source_prompt"] is None:  # unset: the hash of specs written before the field existed
            d["input"].pop("source_prompt")
        if d["input"].get("truncate_prompts") is True:  # the default: the hash of specs written before the field existed
            d["input"].pop("truncate_prompts")
        d.pop("batch")
        for k in ("compile", "device"):
            d["model"].pop(k, None)
        d["score"].pop("batch_size", None)
        defaults = dataclasses.asdict(JobSpec())
        for section, names in _PIE_FIELDS.items():  # at their defaults: the hash of specs written before them
            for k in names:
                if d[section][k] == defaults[section][k]:
                    d[section].pop(k)
        d["run"] = {"seed": d["run"]["seed"]}
        d["output"].pop("path")
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def variants(self) -> list["Variant"]:
        """The (method, settings) combinations this job runs on every image."""
        inv, out = self.inversion, []
        for name in inv.methods:
            over = inv.per_method.get(name, {})
            for control in self.edit.controls:
                out.append(Variant(
                    method=name, steps=inv.steps, skip=int(over.get("skip", inv.skip)),
                    cfg_source=float(over.get("cfg_source", inv.cfg_source)),
                    cfg_target=float(over.get("cfg_target", self.edit.cfg_target)),
                    params=dict(over.get("params", inv.params if len(inv.methods) == 1 else {})),
                    control=control,
                    p2p=self.edit.p2p() if control == "p2p" else None,
                ))
        return out


@dataclass(frozen=True)
class Variant:
    method: str
    steps: int
    skip: int
    cfg_source: float
    cfg_target: float
    params: dict
    control: str = "none"  # attention control of the edit chain: "none" | "p2p"
    p2p: Any = None  # P2PConfig when control == "p2p"

    @property
    def label(self) -> str:
        """The `method` column: the inversion method, plus the control when
        there is one ("edit-friendly+p2p"), so one table compares both."""
        return self.method if self.control == "none" else f"{self.method}+{self.control}"

    def inversion_key(self) -> tuple:
        """Variants with equal keys share one inversion (they differ only in how they edit)."""
        return (self.method, self.steps, self.skip, self.cfg_source, json.dumps(self.params, sort_keys=True))

    def row_params(self, edit_params: dict | None = None) -> dict:
        """Every parameter that defines an edit, for the output rows."""
        from .inversion import get_method

        defaults = dict(getattr(get_method(self.method), "DEFAULTS", {}))
        return {
            "method": self.label, "num_steps": self.steps, "skip": self.skip,
            "cfg_source": self.cfg_source, "cfg_target": self.cfg_target,
            **{**defaults, **self.params}, **({"edit": edit_params} if edit_params else {}),
            **({"inversion_method": self.method, **self.p2p.as_params()} if self.p2p is not None else {}),
        }


SECTIONS = {f.name: f.type for f in dataclasses.fields(JobSpec) if f.name != "version"}


def _section_cls(name: str):
    return {f.name: f.default_factory for f in dataclasses.fields(JobSpec) if f.name != "version"}[name]


def _coerce(path: str, value: Any, default: Any, annotation: str) -> Any:
    """Check a value against its field's type; ints are accepted for floats."""
    ann = str(annotation)
    if ann == "str | list[str]":
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            return value
        raise SpecError(f"{path}: expected a string or a non-empty list of strings, got {value!r}")
    if "dict" in ann:
        if not isinstance(value, dict):
            raise SpecError(f"{path}: expected a table, got {value!r}")
        return value
    if "list" in ann:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SpecError(f"{path}: expected a list of strings, got {value!r}")
        return value
    if ann.startswith("float") or ann == "float":
        if value is None and "None" in ann:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):  # TOML has inf and nan; no setting of a job means either
            raise SpecError(f"{path}: must be a finite number, got {value!r}")
        return float(value)
    if ann == "bool":
        if not isinstance(value, bool):
            raise SpecError(f"{path}: expected true or false, got {value!r}")
        return value
    if ann == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{path}: expected an integer, got {value!r}")
        return value
    if ann in ("str", "str | None"):
        if value is None and ann == "str | None":  # a spec's own to_dict(); TOML has no null
            return None
        if not isinstance(value, str):
            raise SpecError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _build(raw: dict) -> JobSpec:
    spec = JobSpec()
    unknown = set(raw) - set(SECTIONS) - {"version"}
    if unknown:
        raise SpecError(f"{sorted(unknown)[0]}: unknown section (expected one of {', '.join(SECTIONS)})")
    if "version" in raw and raw["version"] != SPEC_VERSION:
        raise SpecError(f"version: this imprint reads job spec version {SPEC_VERSION}, got {raw['version']!r}")
    for sec_name, values in raw.items():
        if sec_name == "version":
            continue
        if not isinstance(values, dict):
            raise SpecError(f"{sec_name}: expected a table ([{sec_name}])")
        section = getattr(spec, sec_name)
        fields = {f.name: f for f in dataclasses.fields(section)}
        for key, value in values.items():
            if key not in fields:
                raise SpecError(f"{sec_name}.{key}: unknown field (expected one of {', '.join(fields)})")
            f = fields[key]
            setattr(section, key, _coerce(f"{sec_name}.{key}", value, None, f.type))
    return spec


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. edit.seeds=8")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise SpecError(f"--set {item!r}: KEY must be section.field, e.g. edit.seeds")
    text = text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if text[:1] in "[{\"'":  # meant as a list, table or quoted string: never a bare word
            raise SpecError(f"--set {item!r}: {text!r} is not a TOML value; quote the strings inside, "
                            f"e.g. {key.strip()}=[\"a.tar\", \"b.tar\"] (in a shell: '{key.strip()}=[\"a.tar\"]')") from None
        value = text  # bare words are strings: --set model.id=tiny
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        parts, value = _parse_override(item)
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {item!r}: {p} is not a table")
        node[parts[-1]] = value
    return raw


def validate(spec: JobSpec) -> JobSpec:
    """Range and consistency checks; raises SpecError naming the field."""
    from .inversion import get_method, method_names

    def need(cond: bool, path: str, msg: str) -> None:
        if not cond:
            raise SpecError(f"{path}: {msg}")

    resolve_scorers(spec)
    need(len(spec.input.shards) > 0 or bool(spec.input.codes), "input.shards", "at least one shard path or URL is required (or input.codes)")
    need(not (spec.input.shards and spec.input.codes), "input.codes", "give input.shards or input.codes, not both")
    for s in spec.input.shards:
        need(bool(s.strip()), "input.shards", "empty shard name")
    _check_shard_urls(spec)
    for t in spec.input.templates:
        need(bool(t.strip()), "input.templates", "empty template")
        check_template(t)
    if spec.input.source_prompt:
        need(bool(spec.input.source_prompt.strip()), "input.source_prompt",
             "only blanks: give \"\" for the empty prompt, a template or a fixed prompt")
        check_template(spec.input.source_prompt, "input.source_prompt")
    need(spec.input.max_prompt_tokens >= 3, "input.max_prompt_tokens", "must be >= 3")
    im = spec.image
    need(im.resolution == 0 or im.resolution >= im.multiple, "image.resolution", f"must be 0 (model default) or >= image.multiple ({im.multiple})")
    need(im.resolution % im.multiple == 0, "image.resolution", f"must be a multiple of image.multiple ({im.multiple})")
    need(im.resize in RESIZE_RULES, "image.resize", f"must be one of {', '.join(RESIZE_RULES)}")
    need(im.multiple >= 8 and im.multiple % 8 == 0, "image.multiple", "must be a positive multiple of 8 (the VAE factor)")
    need(im.max_aspect >= 1.0, "image.max_aspect", "must be >= 1")
    need(im.max_pixels > 0, "image.max_pixels", "must be positive")
    need(im.min_side >= 1, "image.min_side", "must be >= 1")
    need(bool(spec.model.id), "model.id", "a model id or path is required")
    need(spec.model.dtype in ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16"), "model.dtype",
         "must be auto, float32, float16 or bfloat16")
    inv = spec.inversion
    for name in inv.methods:
        need(name in method_names(), "inversion.method", f"unknown method {name!r}; expected one of {', '.join(method_names())}")
    need(len(set(inv.methods)) == len(inv.methods), "inversion.method", "a method is listed twice")
    need(inv.steps >= 1, "inversion.steps", "must be >= 1")
    need(0 <= inv.skip < inv.steps, "inversion.skip", f"must be in [0, inversion.steps) = [0, {inv.steps})")
    need(inv.cfg_source >= 0, "inversion.cfg_source", "must be >= 0")
    need(not inv.params or len(inv.methods) == 1, "inversion.params",
         "with several methods, give parameters per method in [inversion.per_method.<name>] params")
    for name, over in inv.per_method.items():
        path = f"inversion.per_method.{name}"
        need(name in inv.methods, path, f"{name!r} is not one of the job's methods ({', '.join(inv.methods)})")
        need(isinstance(over, dict), path, "expected a table")
        for k, value in over.items():
            need(k in ("skip", "cfg_source", "cfg_target", "params"), f"{path}.{k}", "unknown field (expected skip, cfg_source, cfg_target, params)")
            if k == "skip":
                need(isinstance(value, int) and not isinstance(value, bool), f"{path}.skip", f"expected an integer, got {value!r}")
            elif k == "params":
                need(isinstance(value, dict), f"{path}.params", f"expected a table, got {value!r}")
            else:
                need(_is_number(value), f"{path}.{k}", f"expected a finite number, got {value!r}")
    for v in spec.variants():
        path = f"inversion.per_method.{v.method}" if v.method in inv.per_method else "inversion"
        need(isinstance(v.skip, int) and 0 <= v.skip < v.steps, f"{path}.skip" if path != "inversion" else "inversion.skip",
             f"must be in [0, inversion.steps) = [0, {v.steps})")
        need(v.cfg_source >= 0, f"{path}.cfg_source", "must be >= 0")
        need(v.cfg_target >= 0, f"{path}.cfg_target" if path != "inversion" else "edit.cfg_target", "must be >= 0")
        _check_method_params(v.method, v.params, f"{path}.params")
        module = get_method(v.method)
        if not getattr(module, "GUIDANCE", True):
            for name in ("cfg_source", "cfg_target"):
                value = getattr(v, name)
                field_path = f"{path}.{name}" if path != "inversion" else ("edit.cfg_target" if name == "cfg_target" else "inversion.cfg_source")
                need(value == 1.0, field_path, f"method {v.method!r} runs without classifier-free guidance: set it to 1 "
                     f"(its pseudo-guidance is edit.params.w), got {value!r}")
        if hasattr(module, "check_params"):
            try:
                module.check_params(v.params, v.steps)
            except ValueError as exc:
                raise SpecError(f"{path}.params: {exc}") from None
    mp = spec.manipulate
    need(mp.flip in ("", "horizontal", "vertical"), "manipulate.flip", "must be \"\", \"horizontal\" or \"vertical\"")
    need(0 <= mp.strokes_t1 <= mp.strokes_t2 <= 100, "manipulate.strokes_t1", "need 0 <= strokes_t1 <= strokes_t2 <= 100")
    need(mp.strokes_strength >= 0, "manipulate.strokes_strength", "must be >= 0")
    need(bool(mp.strokes_mask) == bool(mp.strokes_image), "manipulate.strokes_mask",
         "strokes_mask and strokes_image are given together (or neither, for per-sample mask.png/stroke.png)")
    if mp.strokes:
        for name in inv.methods:
            need(name in ("edit-friendly", "cycle"), "manipulate.strokes",
                 f"color strokes act on DDPM noise maps; method {name!r} has none (use edit-friendly or cycle)")
        for f in (mp.strokes_mask, mp.strokes_image):
            need(not f or Path(f).is_file(), "manipulate.strokes_mask" if f == mp.strokes_mask else "manipulate.strokes_image",
                 f"file not found: {f}")
    need(spec.edit.cfg_target >= 0, "edit.cfg_target", "must be >= 0")
    _check_edit_params(inv.methods, spec.edit.params)
    _check_device_name(spec.model.device)
    _validate_control(spec)
    need(1 <= spec.edit.seeds <= 1024, "edit.seeds", "must be in [1, 1024]")
    need(spec.batch.images >= 1, "batch.images", "must be >= 1")
    need(spec.batch.max_unet_batch >= 1, "batch.max_unet_batch", "must be >= 1")
    need(spec.batch.max_decode_batch >= 1, "batch.max_decode_batch", "must be >= 1")
    need(spec.batch.pad_rows >= 0, "batch.pad_rows", "must be >= 0 (0 = automatic)")
    need(spec.batch.prefetch >= 1, "batch.prefetch", "must be >= 1")
    out = spec.output
    need(bool(out.path), "output.path", "an output path is required")
    need(out.image_format in IMAGE_FORMATS, "output.image_format", f"must be one of {', '.join(IMAGE_FORMATS)}")
    need(1 <= out.quality <= 100, "output.quality", "must be in [1, 100]")
    need(out.noise_dtype in ("float16", "float32"), "output.noise_dtype", "must be float16 or float32")
    need(spec.run.executor in EXECUTORS, "run.executor", f"must be one of {', '.join(EXECUTORS)}")
    need(spec.run.max_workers >= 0, "run.max_workers", "must be >= 0 (0 = one per GPU)")
    need(spec.run.gpus_per_worker is None or 0 <= spec.run.gpus_per_worker <= 64, "run.gpus_per_worker",
         "must be in [0, 64] (fractions pack several workers onto one GPU)")
    need(spec.run.gpus_per_worker is None or spec.run.gpus_per_worker <= 1 or spec.run.gpus_per_worker.is_integer(),
         "run.gpus_per_worker", "above 1 must be a whole number of GPUs")
    need(spec.run.cpus_per_worker > 0, "run.cpus_per_worker", "must be > 0")
    need(spec.run.shard_timeout_s > 0, "run.shard_timeout_s", "must be > 0 seconds")
    need(spec.run.placement_timeout_s > 0, "run.placement_timeout_s", "must be > 0 seconds")
    need(spec.run.start_timeout_s > 0, "run.start_timeout_s", "must be > 0 seconds")
    need(spec.run.max_attempts >= 1, "run.max_attempts", "must be >= 1")
    need(spec.run.threads >= 0, "run.threads", "must be >= 0")
    need(0 <= spec.run.seed < 2**63, "run.seed", "must be in [0, 2^63)")
    _validate_scoring(spec)
    return spec


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Ranges of method parameters by name, wherever they are given (inversion or
# edit params, per method): the samplers divide by sigma = eta * sqrt(var).
_PARAM_RULES = {
    "eta": (lambda v: v > 0, "must be > 0 (sigma_t = eta * sqrt(var) divides); use method 'ddim' for eta = 0"),
    "mix": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "forward_steps": (lambda v: v is None or (isinstance(v, int) and v >= 1), "must be an integer >= 1"),
    "noise_shift": (lambda v: isinstance(v, int) and v >= 0, "must be an integer >= 0 (training timesteps)"),
    "max_norm": (lambda v: all(x >= 0 for x in (v if isinstance(v, list) else [v])),
                 "must be >= 0 (0 = no clipping), or one such number per step"),
    "noise_levels": (lambda v: all(x >= 0 for x in v), "must be training timesteps >= 0 (0 = the clean latent)"),
    "timesteps": (lambda v: all(x >= 0 for x in v), "must be training timesteps >= 0"),
}

# Parameters given as lists, with the type of their entries (turbo-edit's per-step settings).
_LIST_PARAMS = {"noise_levels": int, "timesteps": int, "max_norm": float}


# An edit only multiplies by sigma: eta = 0 there is DDIM sampling with the code's x_start.
_EDIT_PARAM_RULES = {**_PARAM_RULES, "eta": (lambda v: v >= 0, "must be >= 0")}


def _check_param_value(path: str, name: str, value: Any, default: Any, rules: dict = _PARAM_RULES) -> None:
    entry = _LIST_PARAMS.get(name)
    if entry is not None and (isinstance(value, list) or default is None):
        ok = isinstance(value, list) and bool(value) and all(
            _is_number(x) and (entry is float or isinstance(x, int)) for x in value)
        if not ok:
            kind = "integers" if entry is int else "numbers"
            raise SpecError(f"{path}: expected a non-empty list of {kind} (one per step), got {value!r}")
    elif default is None or (isinstance(default, (int, float)) and not isinstance(default, bool)):
        if not _is_number(value):
            raise SpecError(f"{path}: expected a finite number, got {value!r}")
    elif isinstance(default, bool) and not isinstance(value, bool):
        raise SpecError(f"{path}: expected true or false, got {value!r}")
    rule = rules.get(name)
    if rule and not rule[0](value):
        raise SpecError(f"{path}: {rule[1]}, got {value!r}")
def _validate_control(spec: JobSpec) -> None:
    from .p2p import CONTROLS

    ed = spec.edit
    for c in ed.controls:
        if c not in CONTROLS:
            raise SpecError(f"edit.control: unknown control {c!r}; expected one of {', '.join(CONTROLS)}")
    if len(set(ed.controls)) != len(ed.controls):
        raise SpecError("edit.control: a control is listed twice")
    if spec.input.codes and len(ed.controls) > 1:
        raise SpecError("edit.control: editing stored codes takes one control; run edit-codes once per control")
    if "p2p" not in ed.controls:
        return
    for name in ("cross_until", "self_until"):
        v = getattr(ed, name)
        if not 0.0 <= v <= 1.0:
            raise SpecError(f"edit.{name}: must be a fraction of the edit's steps in [0, 1], got {v!r}")
    try:
        ed.p2p().check()
    except ValueError as exc:
        field_name = "edit.reweight" if "reweight" in str(exc) else "edit.mode"
        raise SpecError(f"{field_name}: {exc}") from None
    if ed.mode == "replace":
        # a template that changes every source's word count can never be aligned word for word
        from .p2p import template_word_change

        for t in spec.input.templates:
            change = template_word_change(t)
            if change:
                raise SpecError(f"edit.mode: 'replace' needs target prompts with the source's number of words, and "
                                f"template {t!r} {'adds' if change > 0 else 'removes'} {abs(change)}; "
                                "use mode 'auto' (the default) or 'refine'")
    if spec.model.compile:
        raise SpecError("model.compile: p2p attention control runs the eager UNet; set model.compile = false")
    if spec.batch.pad_rows > 1:
        raise SpecError("batch.pad_rows: p2p needs each chain's rows unpadded in its UNet calls; leave pad_rows at 0")
    if spec.manipulate.strokes:
        raise SpecError("edit.control: p2p cannot be combined with manipulate.strokes (both steer the same chain)")
    if ed.mode == "replace" and spec.input.source_prompt == "":
        raise SpecError("edit.mode: 'replace' swaps the source prompt's words for the target's one for one; with "
                        "input.source_prompt = \"\" there are none: use mode = \"refine\"")


def _check_method_params(method: str, params: dict, path: str) -> None:
    from .inversion import get_method

    defaults = getattr(get_method(method), "DEFAULTS", {})
    for k, v in params.items():
        if k not in defaults:
            allowed = ", ".join(defaults) or "none"
            raise SpecError(f"{path}.{k}: not a parameter of method {method!r} (its parameters: {allowed})")
        _check_param_value(f"{path}.{k}", k, v, defaults[k])


# Keyword arguments of a method's `edit` that the engine sets itself.
_ENGINE_EDIT_ARGS = {"cfg_scale", "max_batch", "on_step", "source", "reconstruct"}


def edit_param_names(method: str) -> dict[str, Any]:
    """The edit parameters a method takes (name -> default), read from its
    `edit` signature: what `edit.params` may set."""
    import inspect

    from .inversion import get_method

    sig = inspect.signature(get_method(method).edit)
    return {n: (None if p.default is inspect.Parameter.empty else p.default) for n, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in _ENGINE_EDIT_ARGS}


def _check_edit_params(methods: list[str], params: dict) -> None:
    """edit.params go to every method's edit: each key must be taken by all of them."""
    for k, v in params.items():
        for m in methods:
            names = edit_param_names(m)
            if k not in names:
                raise SpecError(f"edit.params.{k}: not an edit parameter of method {m!r} "
                                f"(its edit parameters: {', '.join(names) or 'none'})")
            _check_param_value(f"edit.params.{k}", k, v, names[k] if names[k] is not None else 0.0, _EDIT_PARAM_RULES)


def _check_device_name(device: str) -> None:
    """Syntax only; whether the device exists is checked by `preflight`."""
    import re

    if device != "auto" and not re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", device):
        raise SpecError(f"model.device: {device!r} is not a device name (expected auto, cpu, cuda, cuda:N, mps or xpu)")


def check_template(template: str, path: str = "input.templates") -> None:
    """A template may name fields (`{source}`, `{label}`: plain names, which
    `data.render_templates` fills from the sample's json) and hold literal
    braces (`{{`, `}}`), nothing else: no positional fields, attribute or
    index access, conversions or format specs (templates are Python format
    strings, and those reach object internals)."""
    problem = ""
    try:
        for _, name, fmt_spec, conversion in string.Formatter().parse(template):
            if name in ("source_prompt", "target_prompts"):
                problem = f"{{{name}}} is not a template field: {{source}} is the source prompt"
                break
            if name is not None and (not name.isidentifier() or fmt_spec or conversion):
                shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{fmt_spec}" if fmt_spec else "") + "}"
                problem = f"{shown} is not allowed"
                break
    except ValueError as exc:  # unbalanced braces
        problem = str(exc)
    if problem:
        raise SpecError(f"{path}: {template!r} is not a valid template ({problem}; use field names of the samples' "
                        "json such as {source} or {label}, and {{ }} for literal braces)")


def _check_shard_urls(spec: "JobSpec") -> None:
    """The pipe rule and the URL schemes on every brace-expanded shard URL
    (globs and folders are listed when the job is planned)."""
    from .data import brace_urls

    try:
        for _ in brace_urls(spec.input.shards, allow_pipe=spec.input.allow_pipe):
            pass
    except ValueError as exc:
        raise SpecError(f"input.shards: {exc}") from None


def resolve_scorers(spec: JobSpec) -> None:
    """Replace "auto" in [score] by what it means for this job's model, so
    that the resolved spec (`imprint validate`, job.resolved.toml) names the
    scorer and the weights actually used: the toy model scores with its
    trained toy-clip, every other model with ViT-L-14 and OpenAI's weights."""
    sc = spec.score
    if sc.clip_model == "auto":
        from .models.toy import TOY, TOY_CLIP

        sc.clip_model = TOY_CLIP if spec.model.id == TOY else "ViT-L-14"
    if sc.clip_pretrained == "auto" and isinstance(sc.clip_model, str):
        try:
            from .scoring import default_pretrained
        except ImportError:  # scoring not installed in this build
            return
        sc.clip_pretrained = default_pretrained(sc.clip_model)


def _validate_scoring(spec: JobSpec) -> None:
    try:
        from . import scoring
    except ImportError:  # scoring not installed in this build
        return
    check = getattr(scoring, "validate_configs", None)
    if check is not None:
        try:
            check(score_config(spec), filter_config(spec))
        except ValueError as exc:
            raise SpecError(str(exc)) from None


def score_config(spec: JobSpec):
    from .scoring import ScoreConfig

    return ScoreConfig(**dataclasses.asdict(spec.score))


def filter_config(spec: JobSpec):
    from .scoring import FilterConfig

    return FilterConfig(**dataclasses.asdict(spec.filter))


def load_raw(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        raise SpecError(f"job spec {str(p)!r} is a folder, not a job file (TOML): to edit its images, make shards "
                        f"first (`imprint shards {p} shards/{p.resolve().name}/`), then run a job whose input.shards "
                        "names them (README \"Your own data\"; jobs/photos.toml)")
    if not p.is_file():
        raise SpecError(f"job spec {str(p)!r}: file not found")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"job spec {str(p)!r}: invalid TOML: {exc}") from None


def load_spec(path: str | Path | None = None, overrides: list[str] | None = None, raw: dict | None = None) -> JobSpec:
    """Load, override, build and validate a job spec."""
    data = load_raw(path) if path is not None else (raw or {})
    data = apply_overrides(data, overrides or [])
    spec = _build(data)
    _check_default_skip(spec, data)
    return validate(spec)


def _check_default_skip(spec: JobSpec, data: dict) -> None:
    """A job that lowers inversion.steps without setting inversion.skip would
    fail on a skip it never set: say which default it is and what keeps the
    paper's ratio (skip 36 of 100 steps)."""
    inv, given = spec.inversion, data.get("inversion") or {}
    if "skip" in given or inv.skip < inv.steps:
        return
    default = InversionSpec().skip
    ratio = round(default / InversionSpec().steps * inv.steps)
    raise SpecError(f"inversion.skip: the default {default} (the paper's, for {InversionSpec().steps} steps) does not fit "
                    f"inversion.steps = {inv.steps}; set inversion.skip (e.g. {ratio} keeps the paper's ratio)")


# What an edit-codes job takes from each stored code, not from its spec.
CODE_OWN_FIELDS = ("method", "steps", "skip", "cfg_source", "params", "per_method")


def to_toml(spec: JobSpec) -> str:
    """The resolved spec as TOML. An edit-codes job's inversion settings are
    each stored code's own (its rows carry them): they are left out, with a
    comment saying so, instead of the job's unused defaults."""
    import tomli_w

    def strip_none(d):
        return {k: strip_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

    data = strip_none(spec.to_dict())
    if not spec.input.codes:
        return tomli_w.dumps(data)
    inv = data.get("inversion", {})
    for k in CODE_OWN_FIELDS:
        inv.pop(k, None)
    if not inv:
        data.pop("inversion", None)
    return ("# edit-codes: inversion.method, steps, skip, cfg_source and params are each stored code's own\n"
            "# (the result rows carry them), not set by this spec\n" + tomli_w.dumps(data))


def job_json_schema() -> dict:
    """JSON Schema of the job spec, generated from the dataclasses above
    (checked in as schemas/job.schema.json; validate a TOML file by loading
    it to a dict first)."""

    def prop(annotation: str, default) -> dict:
        ann = str(annotation)
        if ann == "str | list[str]":
            return {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}
        if "dict" in ann:
            return {"type": "object"}
        if "list" in ann:
            return {"type": "array", "items": {"type": "string"}}
        if ann.startswith("float"):
            return {"type": "number"}
        if ann == "str | None":
            return {"type": "string"}
        return {"bool": {"type": "boolean"}, "int": {"type": "integer"}, "str": {"type": "string"}}.get(ann, {})

    sections = {}
    for f in dataclasses.fields(JobSpec):
        if f.name == "version":
            continue
        sec = f.default_factory()
        props = {}
        for sf in dataclasses.fields(sec):
            p = prop(sf.type, getattr(sec, sf.name))
            default = getattr(sec, sf.name)
            if default is not None:
                p["default"] = default
            props[sf.name] = p
        sections[f.name] = {"type": "object", "additionalProperties": False, "properties": props}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "imprint job spec",
        "description": "TOML job file for `imprint run`; every field optional except input.shards (or input.codes). "
        "Range checks beyond types are done by `imprint validate`.",
        "type": "object",
        "additionalProperties": False,
        "properties": {"version": {"const": SPEC_VERSION}, **sections},
    }
