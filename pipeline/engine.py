"""The engine: one batch of decoded samples (or of stored codes) in, edits
and codes out.

Per group of same-sized images: VAE-encode together, then for each method
variant of the job invert all images x N seeds in one batched call chain
(images x 1 for seed-independent methods: DDIM, EDICT and ddim-forward are
deterministic, so their N seeds would be N copies of one edit; they give one
edit per (image, target), seed index 0, whatever edit.seeds), apply the job's noise-space manipulations, and run every
(image, target prompt, seed) edit plus one reconstruction row per image (of
the unmanipulated code) in one batched edit chain (chunked by the max UNet
batch), then decode in chunks of the max decode batch. Scoring and writing
happen downstream in the worker. Nothing here touches files.

Everything the chains read (latents, codes, embeddings, guidance scales,
timesteps) is on the model's device before the step loops start: the loops
make no host-device copy and no host sync.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .batching import unit_shape
from .data import Sample, load_image, to_model_tensor
from .inversion import get_method
from .inversion.common import Conditioning, NoiseCode
from .models import ImageGeometry, Models, image_geometry
from .spec import JobSpec, Variant

STROKE_KEYS = ("mask", "stroke")
# a stored code's params entry with the image geometry its SDXL micro-conditioning was built from
GEOMETRY_PARAM = "image_geometry"


def derive_seed(job_seed: int, key: str, seed_index: int) -> int:
    """Seed of one code: a function of (job seed, sample key, seed index)
    only, so outputs do not depend on sharding, worker count or order."""
    h = hashlib.blake2b(f"{job_seed}\x00{key}\x00{seed_index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


class CallCounter:
    """Counts UNet calls (batched forward passes) and rows; with `timed`,
    also the seconds spent inside the calls (CUDA events on a GPU, read once
    at the end with `busy_seconds()`, so timing adds no sync per call)."""

    def __init__(self, net, timed: bool = False):
        self.net = net
        self.dtype = getattr(net, "dtype", None)
        self.guidance_embeds = getattr(net, "guidance_embeds", False)  # (a flow net's: FLUX-dev's embedded guidance)
        self.calls = 0
        self.rows = 0
        self.timed = timed
        self._cpu_seconds = 0.0
        self._events: list = []

    def __call__(self, x, t, emb, **kwargs):
        self.calls += 1
        self.rows += int(x.shape[0])
        if not self.timed:
            return self.net(x, t, emb, **kwargs)
        if x.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.net(x, t, emb, **kwargs)
            end.record()
            self._events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = self.net(x, t, emb, **kwargs)
        self._cpu_seconds += time.perf_counter() - t0
        return out

    def busy_seconds(self) -> float:
        """Seconds inside UNet calls so far (waits for queued GPU work)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._cpu_seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
            self._events = []
        return self._cpu_seconds


class PaddedNet:
    """Pads every call's rows up to a multiple of `multiple` (copies of the
    last row) and drops the pads from the output: a compiled UNet then sees
    a few batch shapes and does not recompile for every new row count.
    Rows do not interact in a UNet, so the real rows' values are those of a
    call of the padded size."""

    def __init__(self, net, multiple: int):
        self.net = net
        self.multiple = multiple
        self.dtype = getattr(net, "dtype", None)
        self.guidance_embeds = getattr(net, "guidance_embeds", False)

    def __call__(self, x, t, emb, added_cond_kwargs=None, **kwargs):
        n = x.shape[0]
        pad = (-n) % self.multiple
        if added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = added_cond_kwargs
        if pad == 0:
            return self.net(x, t, emb, **kwargs)

        def padded(v):
            return torch.cat([v, v[-1:].expand(pad, *v.shape[1:])])

        if torch.is_tensor(t) and t.dim() == 1 and t.numel() == n:  # one timestep per row (turbo-edit's inversion)
            t = padded(t)
        x, emb = padded(x), padded(emb)
        if added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = {k: padded(v) for k, v in added_cond_kwargs.items()}
        out = self.net(x, t, emb, **kwargs)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out[:n]


@dataclass
class EditOut:
    variant: int
    target_index: int
    target_prompt: str
    seed_index: int
    seed: int
    image: torch.Tensor  # [3, H, W] in [-1, 1], on CPU


@dataclass
class SampleOut:
    sample: Sample
    edits: list[EditOut] = field(default_factory=list)
    codes: dict[int, NoiseCode] = field(default_factory=dict)  # variant -> the sample's N codes (noise output)
    seeds: list[int] = field(default_factory=list)
    recon_errors: dict[int, tuple[float, float]] = field(default_factory=dict)  # variant -> (max, mean)
    recon_image: torch.Tensor | None = None  # decoded reconstruction of the first variant (when asked)
    recon_psnr: float | None = None
    variant_params: dict | None = None  # stored codes: the parameters read from the code

    @property
    def recon_error_max(self) -> float | None:
        return next(iter(self.recon_errors.values()), (None, None))[0]

    @property
    def recon_error_mean(self) -> float | None:
        return next(iter(self.recon_errors.values()), (None, None))[1]


@dataclass
class CodeItem:
    """A stored code to edit again: the sample it came from (no image) and
    its N codes, all of one method and schedule."""

    sample: Sample
    code: NoiseCode
    seeds: list[int]
    latent_hw: tuple[int, int]


class Engine:
    def __init__(self, models: Models, spec: JobSpec, *, timed: bool = False):
        self.models = models
        self.spec = spec
        self.variants: list[Variant] = spec.variants()
        unet = models.unet
        if spec.model.compile:
            unet = torch.compile(unet)
        pad = spec.batch.pad_rows or (8 if spec.model.compile else 1)
        if pad > 1:
            unet = PaddedNet(unet, pad)
        self.unet = CallCounter(unet, timed=timed)
        self._sync = models.device.type == "cuda"
        self.timings: dict[str, float] = defaultdict(float)
        # what the model's family cannot run is refused here, before any work (preflight checked the
        # same from configs); each variant's method module is the family's (edit-friendly differs)
        from .preflight import check_family

        check_family(spec, models.family, getattr(models, "guidance_embeds", None))
        self.methods = {v.method: get_method(v.method, models.family) for v in self.variants}
        self._job_strokes = None

    def _method(self, name: str):
        """The module of method `name` for this model's family (stored codes may name a method the job does not)."""
        if name not in self.methods:
            self.methods[name] = get_method(name, self.models.family)
        return self.methods[name]

    @property
    def unet_calls(self) -> int:
        return self.unet.calls

    def params(self, variant: int = 0) -> dict:
        return self.variants[variant].row_params(self.spec.edit.params)

    def _timed(self, stage: str, t0: float) -> float:
        if self._sync:  # GPU work is asynchronous: wait for it so the stage gets its own time
            torch.cuda.synchronize(self.models.device)
        now = time.perf_counter()
        self.timings[stage] += now - t0
        return now

    # -- from images ---------------------------------------------------------

    @torch.inference_mode()
    def run(self, samples: list[Sample], *, decode_recon: bool = False) -> list[SampleOut]:
        by_shape: dict[tuple, list[Sample]] = defaultdict(list)
        for s in samples:
            by_shape[unit_shape(s)].append(s)
        out: dict[int, SampleOut] = {}
        for group in by_shape.values():
            for s, o in zip(group, self._run_group(group, decode_recon)):
                out[id(s)] = o
        return [out[id(s)] for s in samples]

    def _run_group(self, group: list[Sample], decode_recon: bool) -> list[SampleOut]:
        x0, strokes, texts, outs = self._prepare(group)
        codes: dict[tuple, NoiseCode] = {}  # variants that differ only in their edit control share an inversion
        for vi, v in enumerate(self.variants):
            method = self._method(v.method)
            key = v.inversion_key()
            first_use = key not in codes
            if first_use:
                codes[key] = self._invert(group, x0, texts, outs, v)
            raw = codes[key]
            self._edit_and_decode(outs, self._manipulate(raw), vi, v, texts, x0, strokes, decode_recon and vi == 0,
                                  n_per=[len(raw) // len(group)] * len(group), recon_code=raw,
                                  recon_apart=method.SEED_INDEPENDENT, keep_codes=first_use)
        return outs

    def _prepare(self, group: list[Sample]):
        """VAE-encode a group of same-sized images (and their strokes), embed
        its prompts, and derive every image's N seeds."""
        spec, m = self.spec, self.models
        vb = spec.batch.max_decode_batch
        t0 = time.perf_counter()
        images = torch.stack([s.image for s in group])
        x0 = torch.cat([m.encode_images(images[i : i + vb]) for i in range(0, len(group), vb)])
        strokes = self._strokes(group, x0.shape[-2:]) if spec.manipulate.strokes else None
        self._timed("vae_encode", t0)
        texts = self._texts(group)  # counted in the invert stage
        outs = [SampleOut(sample=s, seeds=[derive_seed(spec.run.seed, s.key, n) for n in range(spec.edit.seeds)])
                for s in group]
        return x0, strokes, texts, outs

    def _invert(self, group: list[Sample], x0: torch.Tensor, texts: "_Texts", outs: list[SampleOut], v: Variant) -> NoiseCode:
        """The codes of one variant for a group: N per image (images x seeds,
        image-major), or one per image for a seed-independent method (it gives
        the same code for every seed, so it is inverted and edited once)."""
        t0 = time.perf_counter()
        method = self._method(v.method)
        per_image = 1 if method.SEED_INDEPENDENT else self.spec.edit.seeds
        x0_rep = x0.repeat_interleave(per_image, dim=0)
        # each row's prompt and its image's conditioning (an SDXL image's size and crop)
        src, uncond = texts.rows([texts.row[s.source_prompt] for s in group for _ in range(per_image)],
                                 [g for g in range(len(group)) for _ in range(per_image)])
        gens = [torch.Generator("cpu").manual_seed(sd) for o in outs for sd in o.seeds[:per_image]]
        code = method.invert(
            self.unet, self.models.scheduler, x0_rep, src, uncond,
            num_steps=v.steps, skip=v.skip, cfg_scale=v.cfg_source,
            generator=gens, max_batch=self.spec.batch.max_unet_batch, **v.params,
        )
        self._timed("invert", t0)
        return code

    @torch.inference_mode()
    def invert(self, samples: list[Sample], variant: int = 0) -> list[CodeItem]:
        """Invert only (no edit): per sample, a `CodeItem` with its codes of
        the job's variant `variant` (N, or one for a seed-independent method)
        on the CPU; `run_codes` edits them. The Python API's first half."""
        v = self.variants[variant]
        by_shape: dict[tuple, list[Sample]] = defaultdict(list)
        for s in samples:
            by_shape[unit_shape(s)].append(s)
        out: dict[int, CodeItem] = {}
        for group in by_shape.values():
            x0, _, texts, outs = self._prepare(group)
            code = self._invert(group, x0, texts, outs, v).to("cpu")
            per = len(code) // len(group)
            for g, (s, o) in enumerate(zip(group, outs)):
                kept = code[list(range(g * per, (g + 1) * per))]
                if self.models.n_time_ids:  # an SDXL code reconstructs only under its image's micro-conditioning
                    kept.params = {**kept.params, GEOMETRY_PARAM: [list(x) for x in texts.geometry[g]]}
                out[id(s)] = CodeItem(sample=s, code=kept, seeds=o.seeds[:per], latent_hw=tuple(x0.shape[-2:]))
        return [out[id(s)] for s in samples]

    # -- from stored codes ---------------------------------------------------

    @torch.inference_mode()
    def run_codes(self, items: list[CodeItem], *, reconstruct: bool = True) -> list[SampleOut]:
        """Edit stored codes with the job's target prompts, without inverting.
        The reconstruction row is run and decoded (unless `reconstruct` is
        false: the Python API's `Editor.edit`): it stands in for the source
        image in the scores (the code reproduces the VAE's view of the source
        exactly)."""
        by_kind: dict[tuple, list[CodeItem]] = defaultdict(list)
        for it in items:
            by_kind[unit_shape(it)].append(it)
        out: dict[int, SampleOut] = {}
        for group in by_kind.values():
            first = group[0].code
            params = {k: v for k, v in first.params.items() if k not in ("cfg_source", "manipulations", GEOMETRY_PARAM)}
            over = self.spec.inversion.per_method.get(first.method, {})
            control = self.spec.edit.controls[0]  # validation allows one control when editing stored codes
            variant = Variant(first.method, first.num_steps, first.skip, float(first.params.get("cfg_source", 1.0)),
                              float(over.get("cfg_target", self.spec.edit.cfg_target)), params, control=control,
                              p2p=self.spec.edit.p2p() if control == "p2p" else None)
            outs = [SampleOut(sample=it.sample, seeds=it.seeds) for it in group]
            # stored codes are read on the CPU; the chain runs where the model is
            raw = NoiseCode.cat([it.code for it in group]).to(self.models.device)
            f = self.models.vae_scale_factor
            # the geometry an SDXL code was inverted under (stored with it), else the model image's own
            texts = self._texts([it.sample for it in group],
                                [ImageGeometry(*(tuple(v) for v in it.code.params[GEOMETRY_PARAM]))
                                 if GEOMETRY_PARAM in it.code.params
                                 else ImageGeometry.plain(it.latent_hw[0] * f, it.latent_hw[1] * f) for it in group])
            self._edit_and_decode(outs, self._manipulate(raw), 0, variant, texts, None, None, reconstruct,
                                  n_per=[len(it.code) for it in group], recon_code=raw)
            for o in outs:
                o.sample.image = o.recon_image
                o.variant_params = {**variant.row_params(self.spec.edit.params), "from_codes": True}
            for it, o in zip(group, outs):
                out[id(it)] = o
        return [out[id(it)] for it in items]

    # -- shared ---------------------------------------------------------------

    def _texts(self, samples: list[Sample], geometry: list[ImageGeometry] | None = None) -> "_Texts":
        """The samples' prompts encoded once, with each image's geometry
        (by default the geometry rule's, from its decoded size and image)."""
        if geometry is None:
            res = self.spec.image.resolution or self.models.resolution
            geometry = [image_geometry(s.orig_size, tuple(s.image.shape[1:]), self.spec.image, res) for s in samples]
        prompts = list(dict.fromkeys([""] + [s.source_prompt for s in samples] + [p for s in samples for p in s.target_prompts]))
        emb = self.models.encode_text(prompts)
        return _Texts(emb, {p: i for i, p in enumerate(prompts)}, self.models.unconditional(emb[0:1]), geometry, self.models)

    def _manipulate(self, code: NoiseCode) -> NoiseCode:
        from . import noise_space

        mp = self.spec.manipulate
        if mp.shift_x or mp.shift_y:
            code = noise_space.shift(code, dx=mp.shift_x, dy=mp.shift_y)
        if mp.flip:
            code = noise_space.flip(code, horizontal=mp.flip == "horizontal")
        return code

    def _edit_and_decode(self, outs, code, vi, v: Variant, texts, x0, strokes, decode_recon, n_per,
                         recon_code: NoiseCode, recon_apart: bool = False, keep_codes: bool = True) -> None:
        """One edit chain for all (image, target, code) rows plus, per image,
        one reconstruction row (its first code before any manipulation, the
        source prompt, cfg_source); then decode the edits (and the
        reconstructions when asked). `n_per[g]` codes of image g are in
        `code` (one for a seed-independent method), each edited once per
        target. `recon_apart`:
        run the reconstruction rows in their own chain (one row per image, as
        a seed-independent method's inversion ran) instead of riding along
        with the edits. Under P2P control every (image, code) has a source
        row (the code with the source prompt at cfg_source) whose attention
        its target rows receive; the first doubles as the reconstruction row
        when it reads the unmanipulated code. `keep_codes`: hand the codes to
        the noise output (once per inversion, not once per control)."""
        spec, m, mb = self.spec, self.models, self.spec.batch.max_unet_batch
        starts = [sum(n_per[:g]) for g in range(len(outs))]
        # the reconstruction rows read the unmanipulated code: a shifted or
        # flipped code does not reproduce the source latent it is compared with
        recon_rows = starts  # row of image g's reconstruction code
        if recon_code is not code:  # append each image's first unmanipulated code; edit rows keep their indices
            recon_rows = [len(code) + g for g in range(len(outs))]
            code = NoiseCode.cat([code, recon_code[starts]])
        t0 = time.perf_counter()
        code_idx, cond_idx, cfgs, plan = [], [], [], []

        def add(kind, g, k, n, code_row, prompt, cfg):
            code_idx.append(code_row)
            cond_idx.append(texts.row[prompt])
            cfgs.append(cfg)
            plan.append((kind, g, k, n))

        want_recon = spec.output.reconstruction_check or decode_recon
        for g, o in enumerate(outs):
            if v.control == "p2p":
                for n in range(n_per[g]):
                    first_is_recon = n == 0 and want_recon and recon_rows[g] == starts[g]
                    add("recon" if first_is_recon else "source", g, 0, n, starts[g] + n, o.sample.source_prompt, v.cfg_source)
                    for k, tp in enumerate(o.sample.target_prompts):
                        add("edit", g, k, n, starts[g] + n, tp, v.cfg_target)
                if want_recon and recon_rows[g] != starts[g]:  # a manipulated code: reconstruct from the original
                    add("recon", g, 0, 0, recon_rows[g], o.sample.source_prompt, v.cfg_source)
                continue
            for k, tp in enumerate(o.sample.target_prompts):
                for n in range(n_per[g]):
                    add("edit", g, k, n, starts[g] + n, tp, v.cfg_target)
            if want_recon:
                add("recon", g, 0, 0, recon_rows[g], o.sample.source_prompt, v.cfg_source)
        device = code.x_start.device
        scale = cfgs[0] if len(set(cfgs)) == 1 else torch.tensor(cfgs, device=device)
        rows = code[code_idx]
        cond, uncond = texts.rows(cond_idx, [p[1] for p in plan])
        row_args = self._row_args(self._method(v.method), texts, plan, outs)
        if v.control == "p2p":
            latents = self._p2p_chain(v, rows, cond, uncond, plan, outs, torch.tensor(cfgs, device=device), row_args)
        elif strokes is not None:
            from .noise_space import edit_with_strokes

            mask, stroke = strokes
            rmask = torch.stack([mask[g] if kind == "edit" else torch.zeros_like(mask[g]) for kind, g, _, _ in plan])
            rstroke = torch.stack([stroke[g] for _, g, _, _ in plan])
            mp = spec.manipulate
            latents = edit_with_strokes(self.unet, m.scheduler, rows, cond, uncond, mask=rmask, stroke_latent=rstroke,
                                        strength=mp.strokes_strength, t_range=(mp.strokes_t1, mp.strokes_t2),
                                        cfg_scale=scale, max_batch=mb)
        elif recon_apart and any(p[0] == "recon" for p in plan):
            # The reconstruction rows in a chain of their own, with the same
            # rows, prompts and scale as the inversion: every UNet call has
            # the inversion's shape and inputs, so float rounding is the same
            # and an exact method (EDICT) reconstructs to the last bit.
            method = self._method(v.method)
            kinds = torch.tensor([p[0] == "edit" for p in plan])
            edit_at, recon_at = kinds.nonzero().flatten(), (~kinds).nonzero().flatten()
            edits = method.edit(self.unet, m.scheduler, rows[edit_at], cond[edit_at], _rows_of(uncond, edit_at),
                                cfg_scale=v.cfg_target, max_batch=mb, **spec.edit.params)
            recons = method.edit(self.unet, m.scheduler, rows[recon_at], cond[recon_at], _rows_of(uncond, recon_at),
                                 cfg_scale=v.cfg_source, max_batch=mb, **spec.edit.params)
            latents = edits.new_empty((len(plan), *edits.shape[1:]))
            latents[edit_at.to(latents.device)] = edits
            latents[recon_at.to(latents.device)] = recons.to(latents.dtype)
        else:
            latents = self._method(v.method).edit(self.unet, m.scheduler, rows, cond, uncond,
                                                cfg_scale=scale, max_batch=mb, **spec.edit.params, **row_args)
        t0 = self._timed("edit", t0)

        # Edits and reconstructions are decoded in separate calls so an edit's
        # decode batch (and so its bytes) does not depend on whether
        # reconstructions are decoded too.
        decoded = {}
        vb = spec.batch.max_decode_batch
        for kind in ("edit", "recon"):
            rows_k = [i for i, p in enumerate(plan) if p[0] == kind and (kind == "edit" or decode_recon)]
            for c in range(0, len(rows_k), vb):
                idx = rows_k[c : c + vb]
                decoded.update(zip(idx, m.decode_latents(latents[idx].float()).cpu()))
        self._timed("vae_decode", t0)

        recon_plan_rows = [i for i, p in enumerate(plan) if p[0] == "recon"]
        recon_err = {}
        if x0 is not None and recon_plan_rows:
            # all images' errors in one device op and one transfer
            err = (latents[recon_plan_rows].float() - x0[[plan[i][1] for i in recon_plan_rows]]).abs().flatten(1)
            recon_err = dict(zip(recon_plan_rows, torch.stack([err.amax(1), err.mean(1)], 1).tolist()))
        for i, (kind, g, k, n) in enumerate(plan):
            o = outs[g]
            if kind == "edit":
                # a seed-independent method's one code gives one edit (seed index 0), whatever edit.seeds:
                # its N edits would be N copies of one image
                o.edits.append(EditOut(vi, k, o.sample.target_prompts[k], n, o.seeds[n], decoded[i]))
                continue
            if kind == "source":  # a P2P source branch that is not the reconstruction row: nothing to report
                continue
            if i in recon_err:
                o.recon_errors[vi] = tuple(recon_err[i])
            if decode_recon:
                o.recon_image = decoded[i]
        if spec.output.noise and keep_codes:
            for g, o in enumerate(outs):
                kept = code[list(range(starts[g], starts[g] + n_per[g]))].to("cpu")
                if m.n_time_ids:  # the code reconstructs only under its image's micro-conditioning: keep it with the code
                    kept.params = {**kept.params, GEOMETRY_PARAM: [list(v) for v in texts.geometry[g]]}
                o.codes[vi] = kept

    @staticmethod
    def _row_args(method, texts, plan, outs) -> dict:
        """Per-row edit arguments of methods that edit against the source
        prompt (turbo-edit, flowedit): each row's source conditioning, and,
        where the method's edit takes it, which rows are reconstructions
        (turbo-edit edits those with the source prompt, unclipped)."""
        if not getattr(method, "EDIT_NEEDS_SOURCE", False):
            return {}
        source, _ = texts.rows([texts.row[outs[g].sample.source_prompt] for _, g, _, _ in plan], [p[1] for p in plan])
        args = {"source": source}
        if "reconstruct" in inspect.signature(method.edit).parameters:
            args["reconstruct"] = torch.tensor([kind != "edit" for kind, _, _, _ in plan])
        return args

    def _p2p_chain(self, v: Variant, rows: NoiseCode, cond, uncond, plan, outs, cfgs: torch.Tensor,
                   row_args: dict | None = None) -> torch.Tensor:
        """The edit chain under Prompt-to-Prompt control. Each (image, seed)
        group (its source row, then its target rows) must share UNet calls
        with its source, so rows run as whole groups, as many groups per
        chain as fit batch.max_unet_batch (halved: guidance doubles rows)."""
        from . import p2p

        row_prompts, source_of, group_starts = [], [], []
        for r, (kind, g, k, _) in enumerate(plan):
            if kind != "edit":
                group_starts.append(r)
            row_prompts.append(outs[g].sample.target_prompts[k] if kind == "edit" else outs[g].sample.source_prompt)
            source_of.append(group_starts[-1])
        ends = group_starts[1:] + [len(plan)]
        cap = max(1, self.spec.batch.max_unet_batch // 2)
        method = self._method(v.method)
        chunks, a = [], 0
        for e in ends:  # pack whole groups up to the cap (a group larger than the cap runs alone)
            if chunks and chunks[-1][1] == a and e - chunks[-1][0] <= cap:
                chunks[-1] = (chunks[-1][0], e)
            else:
                chunks.append((a, e))
            a = e
        parts = []
        for a, b in chunks:
            idx = list(range(a, b))
            parts.append(p2p.edit(method, self.unet, self.models.scheduler, rows[idx], cond[idx], _rows_of(uncond, idx),
                                  prompts=[row_prompts[i] for i in idx], source_of=[source_of[i] - a for i in idx],
                                  tokenizer=self.models.tokenizer, config=v.p2p, cfg_scale=cfgs[idx],
                                  **self.spec.edit.params, **{k: a[idx] for k, a in (row_args or {}).items()}))
        return torch.cat(parts)

    def _strokes(self, group: list[Sample], latent_hw) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (mask [1, h, w] on the latent grid, stroke latent [C, h, w])
        from the sample's mask/stroke entries or the job's files, put through
        the same geometry rule as the image."""
        from .noise_space import mask_to_latent

        spec, m = self.spec, self.models
        res = spec.image.resolution or m.resolution
        masks, strokes = [], []
        for s in group:
            raw = stroke_inputs(s, spec)
            h, w = s.image.shape[1:]
            imgs = []
            for data in raw:
                t = to_model_tensor(load_image(data, spec.image), spec.image, res)
                if tuple(t.shape[1:]) != (h, w):
                    raise ValueError(f"stroke mask/image of {s.key!r} must have the source image's size")
                imgs.append(t)
            mask_img, stroke_img = imgs
            masks.append(mask_to_latent((mask_img.mean(0) > 0).float(), tuple(latent_hw))[0])
            strokes.append(m.encode_images(stroke_img[None])[0])
        return torch.stack(masks), torch.stack(strokes)


def stroke_inputs(sample: Sample, spec: JobSpec) -> tuple[bytes, bytes]:
    """(mask bytes, colored image bytes) for a sample: its own `mask.*` and
    `stroke.*` entries, else the job's files. Raises ValueError when neither."""
    mp = spec.manipulate
    own = [next((v for k, v in sample.extras.items() if k.split(".")[0] == name), None) for name in STROKE_KEYS]
    if all(own):
        return own[0], own[1]
    if mp.strokes_mask and mp.strokes_image:
        with open(mp.strokes_mask, "rb") as a, open(mp.strokes_image, "rb") as b:
            return a.read(), b.read()
    raise ValueError("manipulate.strokes is on but the sample has no mask.png/stroke.png entries and the job names no files")


@dataclass
class _Texts:
    """The prompts of a group, encoded once, and what the model conditions
    on about each image of the group (SDXL's micro-conditioning)."""

    emb: Conditioning  # one row per prompt
    row: dict[str, int]  # prompt -> its row
    uncond: Conditioning  # the unconditional row
    geometry: list[ImageGeometry]  # per image of the group
    models: Models

    def rows(self, prompt_rows: list[int], images: list[int]) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond) for chain rows: row r has prompt row prompt_rows[r]
        and is an edit of image images[r]. uncond stays one shared row for a
        model without per-image conditioning."""
        geo = [self.geometry[g] for g in images]
        cond = self.emb[torch.tensor(prompt_rows, device=self.emb.device)]
        return self.models.for_images(cond, geo), self.models.for_images(self.uncond, geo, unconditional=True)


def _rows_of(c: Conditioning, idx) -> Conditioning:
    """Rows idx of a per-row conditioning; a shared 1-row one as it is."""
    return c if len(c) == 1 else c[idx]
