"""The Python API at the level of images: PIL images in, PIL images out.

    from pipeline import Editor
    editor = Editor.from_pretrained("toy")
    edits = editor(image, "a red circle on a white background", ["a blue circle on a white background"], seeds=3)

`Editor.invert` turns images into codes (one per image and seed),
`Editor.edit` turns codes and target prompts into images; calling the editor
does both. Both run the job engine's own code paths (`Engine.invert`,
`Engine.run_codes`) under a job spec built from the call's arguments, so an
argument left out takes the job spec's default (`pipeline/spec.py`) and the
API and `imprint run` give the same edits for the same settings. Images go
through the job's geometry rule (`image.*`: shorter side to the model's
resolution, center crop to a multiple of 64) and are batched by shape with
the job's shape buckets.

The editor holds only the loaded model: every call builds its own spec and
engine, so one editor serves several threads at once. Prompt-to-Prompt
control (`control="p2p"`) installs attention processors on the shared UNet
for the length of its chain, so a p2p edit waits for the running calls and
runs alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import uuid
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageOps

from .batching import ShapeBuckets
from .codes import check_made_with, scheduler_config_json
from .data import Sample, to_model_tensor, to_pil, to_rgb
from .engine import CodeItem, Engine
from .inversion import get_method
from .inversion.common import NoiseCode
from .models import Models, load_models
from .spec import EditSpec, load_spec

# edit(**params) names that are fields of the job's [edit] section (Prompt-to-Prompt settings); the
# others are the method's edit parameters (edit.params)
_EDIT_FIELDS = {f.name for f in dataclasses.fields(EditSpec)} - {"cfg_target", "seeds", "params", "control"}


@dataclass(frozen=True)
class Code:
    """One image inverted under one seed: what `Editor.edit` reads.

    code: the method's `NoiseCode` (a batch of one, on the CPU).
    image_id: which image of which `invert` call it came from; `edit` treats
    consecutive codes with one image_id as the N codes of one image.
    seed: the seed its noise was drawn from (derived from the `seed`
    argument, the image's pixels and seed_index, as a job derives it from
    run.seed, the sample key and the seed index)."""

    code: NoiseCode
    source_prompt: str
    image_id: str
    seed_index: int
    seed: int
    size: tuple[int, int]  # (width, height) of the image as the model saw it
    # the model and schedule it was inverted with: `edit` refuses a code made by another (as `edit-codes` does)
    model_id: str = ""
    scheduler_config: str = ""

    @property
    def method(self) -> str:
        return self.code.method


class Editor:
    """Inversion and editing of PIL images with one loaded model."""

    def __init__(self, models: Models, *, truncate_prompts: bool = True):
        """truncate_prompts: as a job's `input.truncate_prompts` (default, as
        diffusers): a prompt longer than the text encoder's context is cut by
        the encoder; False refuses it with a ValueError instead."""
        self.models = models
        self.truncate_prompts = truncate_prompts
        self._p2p = _SharedExclusive()

    @classmethod
    def from_pretrained(cls, model_id: str, device=None, dtype=None, revision: str | None = None, *,
                        truncate_prompts: bool = True) -> "Editor":
        """Load a model ("toy", "tiny", a hub id or a diffusers folder; see
        `pipeline.models.load_models`). device/dtype: None = CUDA in bf16/fp16
        when there is one, else CPU in float32."""
        return cls(load_models(model_id, device=device, dtype=dtype, revision=revision),
                   truncate_prompts=truncate_prompts)

    # -- invert ----------------------------------------------------------------

    def invert(self, images: Image.Image | Sequence[Image.Image], source_prompts: str | Sequence[str], *,
               seeds: int = 1, method: str = "edit-friendly", steps: int | None = None, skip: int | None = None,
               cfg_source: float | None = None, seed: int = 0, **params) -> list[Code]:
        """Invert images into codes: `seeds` codes per image, image-major.

        source_prompts: one prompt for all images or one per image; "" is
        allowed (the unconditional prompt, as LEDITS++ defaults to).
        method: any name of `pipeline.inversion.method_names()`; params: its
        parameters (e.g. eta=1.0). steps, skip, cfg_source: None = the job
        spec's defaults (cfg_source 1 for a guidance-free method: turbo-edit). A seed-independent method (ddim, edict: deterministic)
        gives one code per image whatever `seeds`, as a job writes one edit
        per (image, target) for it. Bad arguments raise `SpecError` (a
        ValueError) naming the job field they set."""
        images = [images] if isinstance(images, Image.Image) else _sequence("images", images, "a PIL image or a list of them")
        prompts = ([source_prompts] * len(images) if isinstance(source_prompts, str) else
                   _sequence("source_prompts", source_prompts, 'a prompt or one per image ("" for none)'))
        if len(prompts) != len(images):
            raise ValueError(f"source_prompts: {len(prompts)} prompts for {len(images)} images (give one, or one per image)")
        inversion = {"method": method, "params": params}
        if cfg_source is None and not _guided(method):
            cfg_source = 1.0  # a guidance-free method (turbo-edit) runs at 1, not the job default's 3.5
        for name, value in (("steps", steps), ("skip", skip), ("cfg_source", cfg_source)):
            if value is not None:
                inversion[name] = value
        edit = {"seeds": seeds} if _guided(method) else {"seeds": seeds, "cfg_target": 1.0}
        spec = self._spec(inversion=inversion, edit=edit, run={"seed": seed})
        self._check_prompts(prompts, spec)
        samples = self._samples(images, prompts, spec)
        batches, buckets = [], ShapeBuckets(spec.batch.images)
        for s in samples:
            batches.extend(buckets.add(s))
        batches.extend(buckets.flush())
        items: dict[int, CodeItem] = {}
        with self._p2p.shared():
            engine = Engine(self.models, spec)
            for batch in batches:
                items.update(zip(map(id, batch), engine.invert(batch)))
        call = uuid.uuid4().hex[:8]
        made_with = dict(model_id=self.models.model_id, scheduler_config=scheduler_config_json(self.models.scheduler))
        codes = []
        for i, s in enumerate(samples):
            it = items[id(s)]
            size = (int(s.image.shape[2]), int(s.image.shape[1]))
            codes.extend(Code(it.code[n], s.source_prompt, f"{call}-{i}", n, it.seeds[n], size, **made_with)
                         for n in range(len(it.code)))
        return codes

    # -- edit ------------------------------------------------------------------

    def edit(self, codes: Code | Sequence[Code], target_prompts: str | Sequence[str] | Sequence[Sequence[str]], *,
             cfg_target: float | None = None, control: str | None = None, **params) -> list[Image.Image]:
        """Edit codes with target prompts; returns PIL images ordered by image,
        then target prompt, then seed.

        target_prompts: one prompt or a list for every image, or one list per
        image (images: runs of consecutive codes with one image_id).
        cfg_target: None = the job spec's default (1 for turbo-edit codes). control: None or "p2p"
        (Prompt-to-Prompt; params cross_until, self_until, mode, reweight
        as in the job's [edit] section). Other params are the method's edit
        parameters (edit.params, e.g. eta)."""
        codes = [codes] if isinstance(codes, Code) else list(codes)
        if not codes or not all(isinstance(c, Code) for c in codes):
            raise ValueError("codes: expected the Code objects Editor.invert returns")
        for c in codes:
            check_made_with(c.image_id, c.model_id, c.scheduler_config, self.models)
        groups: list[list[Code]] = []
        for c in codes:
            if groups and groups[-1][0].image_id == c.image_id:
                groups[-1].append(c)
            else:
                groups.append([c])
        targets = self._targets(target_prompts, len(groups))
        edit = {k: v for k, v in params.items() if k in _EDIT_FIELDS}
        edit["params"] = {k: v for k, v in params.items() if k not in _EDIT_FIELDS}
        edit["control"] = control or "none"
        inversion = {"method": sorted({c.method for c in codes})}
        if not any(_guided(c.method) for c in codes):
            # guidance-free codes (turbo-edit): its pseudo-guidance is the edit parameter w
            inversion["cfg_source"] = 1.0
            cfg_target = 1.0 if cfg_target is None else cfg_target
        if cfg_target is not None:
            edit["cfg_target"] = cfg_target
        spec = self._spec(inversion=inversion, edit=edit)
        self._check_prompts([p for t in targets for p in t], spec)
        items = [CodeItem(sample=Sample(key=g[0].image_id, shard="", source_prompt=g[0].source_prompt, target_prompts=t),
                          code=NoiseCode.cat([c.code for c in g]), seeds=[c.seed for c in g],
                          latent_hw=tuple(g[0].code.x_start.shape[-2:]))
                 for g, t in zip(groups, targets)]
        lock = self._p2p.exclusive() if spec.edit.control == "p2p" else self._p2p.shared()
        with lock:
            outs = Engine(self.models, spec).run_codes(items, reconstruct=False)
        return [to_pil(e.image) for o in outs for e in sorted(o.edits, key=lambda e: (e.target_index, e.seed_index))]

    # -- both ------------------------------------------------------------------

    def __call__(self, image: Image.Image | Sequence[Image.Image], source_prompt: str | Sequence[str],
                 target_prompts: str | Sequence[str] | Sequence[Sequence[str]], *, seeds: int = 1,
                 method: str = "edit-friendly", steps: int | None = None, skip: int | None = None,
                 cfg_source: float | None = None, cfg_target: float | None = None, control: str | None = None,
                 seed: int = 0, **params) -> list[Image.Image]:
        """Invert and edit: `invert(...)` then `edit(...)`. params that are
        the method's inversion parameters go to the inversion, the others to
        the edit."""
        names = getattr(get_method(method), "DEFAULTS", {})
        codes = self.invert(image, source_prompt, seeds=seeds, method=method, steps=steps, skip=skip,
                            cfg_source=cfg_source, seed=seed, **{k: v for k, v in params.items() if k in names})
        return self.edit(codes, target_prompts, cfg_target=cfg_target, control=control,
                         **{k: v for k, v in params.items() if k not in names})

    # -- helpers -----------------------------------------------------------------

    def _spec(self, **sections):
        """The job spec of one call: defaults, the model, the call's settings.
        The API writes nothing and scores nothing; `input.shards` names no
        real shard (images come as arguments) and only satisfies validation."""
        raw = {"input": {"shards": ["python-api"]}, "model": {"id": self.models.model_id},
               "output": {"reconstruction_check": False, "noise": False}, "score": {"enabled": False},
               "run": {"executor": "inline"}}
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        return load_spec(raw=raw)

    def _samples(self, images: list, prompts: list[str], spec) -> list[Sample]:
        res = spec.image.resolution or self.models.resolution
        out = []
        for i, (img, prompt) in enumerate(zip(images, prompts)):
            if not isinstance(img, Image.Image):
                raise TypeError(f"images[{i}]: expected a PIL image, got {type(img).__name__}")
            w, h = img.size
            if min(w, h) < spec.image.min_side or w * h > spec.image.max_pixels:
                raise ValueError(f"images[{i}]: {w}x{h} is outside image.min_side = {spec.image.min_side} / "
                                 f"image.max_pixels = {spec.image.max_pixels}")
            tensor = to_model_tensor(to_rgb(ImageOps.exif_transpose(img)), spec.image, res)
            # the sample key seeds the noise: the image's pixels, so an image gets the same codes wherever it is passed
            key = hashlib.blake2b(tensor.numpy().tobytes(), digest_size=8).hexdigest()
            out.append(Sample(key=key, shard="", source_prompt=prompt, image=tensor, orig_size=(w, h)))
        return out

    def _check_prompts(self, prompts: list[str], spec) -> None:
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {p!r}")
            n = self.models.count_tokens(p)
            if n > spec.input.max_prompt_tokens and not self.truncate_prompts:
                raise ValueError(f"prompt too long: {n} tokens > {spec.input.max_prompt_tokens} "
                                 f"(the text encoder's context; truncate_prompts=False): {p[:60]!r}...")

    @staticmethod
    def _targets(target_prompts, n_images: int) -> list[list[str]]:
        if isinstance(target_prompts, str):
            return [[target_prompts]] * n_images
        tp = list(target_prompts)
        if tp and all(isinstance(t, str) for t in tp):
            return [tp] * n_images
        if len(tp) != n_images or not all(isinstance(t, (list, tuple)) and t and all(isinstance(p, str) for p in t) for t in tp):
            raise ValueError(f"target_prompts: expected a prompt, a list of prompts, or one non-empty list per image "
                             f"({n_images} images)")
        return [list(t) for t in tp]


def _sequence(name: str, value, expected: str) -> list:
    """A list argument as a list, or a ValueError naming the argument (not
    the bare TypeError of list(None))."""
    if value is None or isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name}: expected {expected}, got {_type_name(value)}")
    return list(value)


def _type_name(value) -> str:
    return "None" if value is None else type(value).__name__


def _guided(method: str) -> bool:
    """Whether a method runs classifier-free guidance (an unknown name is
    left to the spec's validation, which names the field)."""
    try:
        return getattr(get_method(method), "GUIDANCE", True)
    except ValueError:
        return True


class _SharedExclusive:
    """Many shared holders at once, or one exclusive holder: plain calls
    share the model; a p2p edit (which installs attention processors on it)
    runs alone."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    class _Hold:
        def __init__(self, enter, leave):
            self._enter, self._leave = enter, leave

        def __enter__(self):
            self._enter()

        def __exit__(self, *exc):
            self._leave()

    def shared(self):
        def enter():
            with self._cond:
                self._cond.wait_for(lambda: not self._exclusive)
                self._shared += 1

        def leave():
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

        return self._Hold(enter, leave)

    def exclusive(self):
        def enter():
            with self._cond:
                self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
                self._exclusive = True

        def leave():
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()

        return self._Hold(enter, leave)
