"""The shard worker: reader thread -> batcher -> engine -> scorers -> rows ->
atomic per-shard commit. The same class runs inline and inside a Ray actor
(the executor is a thin layer around it). It loads the model and the
scorers once and keeps them for every shard it is given."""

from __future__ import annotations

import functools
import json
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from .batching import ShapeBuckets, unit_shape
from .console import quiet_libraries
from .data import Sample, decode_sample, encode_image, read_raw_samples, render_templates, shard_name
from .engine import CodeItem, Engine, SampleOut, stroke_inputs
from .inversion.common import NoiseCode
from .models import load_models
from .models.toy import TOY, TOY_NOTE
from .spec import JobSpec, filter_config, score_config
from .store import OutputStore
from .tables import STAGES

_END = object()


@dataclass
class ShardSummary:
    shard: str
    name: str
    images: int = 0
    errors: int = 0
    edits: int = 0
    kept: int = 0
    unet_calls: int = 0
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)
    error_types: dict = field(default_factory=dict)  # Sample.error_type -> bad samples of that kind

    def to_dict(self) -> dict:
        return self.__dict__.copy()


class ShardWorker:
    def __init__(self, spec: JobSpec):
        self.spec = spec
        if spec.run.threads:
            torch.set_num_threads(spec.run.threads)
        device = None if spec.model.device == "auto" else spec.model.device
        quiet_libraries()  # also on a cluster whose workers did not inherit the driver's environment
        self.models = load_models(spec.model.id, device=device, dtype=spec.model.dtype, revision=spec.model.revision or None)
        self.engine = Engine(self.models, spec)
        self.scorers = None
        if spec.score.enabled:
            from .scoring import Scorers

            self.scorers = Scorers.load(score_config(spec), self.models.device, self.models.dtype)
        self.store = OutputStore.open(spec.output.path)
        self.resolution = spec.image.resolution or self.models.resolution
        self.placement = placement()
        # Progress inside the running shard, read from another thread (the Ray
        # actor's monitor group, the inline progress line): replaced whole,
        # never mutated, so a reader always sees one consistent state.
        self.live = {"shard": "", "samples": 0, "edits": 0, "started": 0.0}

    # -- metadata written into every Parquet file --------------------------

    def metadata(self) -> dict:
        scorers = self.scorers
        return {
            "spec_hash": self.spec.hash(),
            "model_id": self.models.model_id,
            "model_random_weights": str(self.models.random_weights).lower(),
            "scores_random_weights": str(bool(scorers and scorers.random_weights)).lower(),
            "scorers": json.dumps(getattr(scorers, "description", {}) if scorers else {}),
            "method": ",".join(v.label for v in self.engine.variants),
            "params": json.dumps([self.engine.params(i) for i in range(len(self.engine.variants))], sort_keys=True),
            "note": (TOY_NOTE if self.models.model_id == TOY else
                     "made with randomly initialised weights: images and scores are not meaningful"
                     if self.models.random_weights or (scorers and scorers.random_weights) else ""),
        }

    # -- reading -------------------------------------------------------------

    def _reader(self, url: str, q: queue.Queue, stop: threading.Event) -> None:
        """Read and decode in a thread so decoding overlaps model work."""
        try:
            items = self._code_items(url) if self.spec.input.codes else self._samples(url)
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(_END)
        except BaseException as exc:  # the shard itself could not be opened
            q.put(exc)

    def _samples(self, url: str):
        for raw in read_raw_samples(url, allow_pipe=self.spec.input.allow_pipe):
            t0 = time.perf_counter()
            s = decode_sample(raw, url, self.spec.input, self.spec.image, self.resolution, self.models.count_tokens)
            if not s.error and self.spec.manipulate.strokes:
                try:
                    stroke_inputs(s, self.spec)
                except ValueError as exc:
                    s.error, s.error_type = str(exc), "no_strokes"
            if not s.error:
                self._check_p2p(s)
            yield s, time.perf_counter() - t0

    def _check_p2p(self, sample: Sample) -> None:
        """Under P2P control, a sample whose target prompts cannot be aligned
        with its source prompt (a reweight word missing from a target, words
        that do not match their tokens) becomes an error row with the reason,
        before any work: the batch it would have joined, and the shard, go on."""
        if "p2p" not in self.spec.edit.controls:
            return
        from . import p2p

        tok = self.models.tokenizer
        try:
            with self.models.tokenizer_lock:  # this runs in the reader thread (see Models.count_tokens)
                p2p.check_prompts(self.spec.edit.p2p(), tok, sample.source_prompt, sample.target_prompts,
                                  p2p.context_length(tok))
        except ValueError as exc:
            sample.error, sample.error_type = str(exc), "p2p_unaligned"

    def _code_items(self, url: str):
        """Stored codes of one noise/ file, one item per sample and method
        (its N seeds; a job that compared methods stored a code of each).
        The file is untrusted: a code that fails its checks becomes an error
        row for its sample, and the other samples of the file go on."""
        from .codes import check_code_rows, read_code_rows, row_to_code

        by_key: dict[tuple, list[dict]] = {}
        for row in read_code_rows(url):
            by_key.setdefault((str(row.get("key") or ""), str(row.get("method")), str(row.get("params"))), []).append(row)
        for (key, _, _), rows in by_key.items():
            t0 = time.perf_counter()
            first = rows[0]
            sample = Sample(key=key, shard=str(first.get("shard") or url),
                            source_prompt=first.get("source_prompt") if isinstance(first.get("source_prompt"), str) else "")
            try:
                check_code_rows(rows, self.models)
                rows.sort(key=lambda r: r["seed_index"])
                sample.orig_size = (first["width"], first["height"])
                sample.target_prompts = list(dict.fromkeys(render_templates(self.spec.input.templates, sample.source_prompt)))
                if not sample.target_prompts:
                    raise ValueError("editing stored codes needs target prompts: set input.templates")
                code = NoiseCode.cat([row_to_code(r) for r in rows])
                self._check_p2p(sample)
                if sample.error:
                    yield sample, time.perf_counter() - t0
                    continue
            except Exception as exc:  # noqa: BLE001 - whatever a bad row raises is that sample's error
                sample.error, sample.error_type = (str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"), "bad_code"
                yield sample, time.perf_counter() - t0
                continue
            f = self.models.vae_scale_factor
            item = CodeItem(sample, code, [int(r["seed"]) for r in rows], (first["height"] // f, first["width"] // f))
            yield item, time.perf_counter() - t0

    # -- the shard -----------------------------------------------------------

    def process(self, url: str) -> dict:
        """Run one shard: the model thread reads batches and runs the engine
        and scorers; a writer thread encodes images, builds rows and streams
        them into part files, so the next batch's UNet work never waits for
        WebP encoding or uploads. Memory stays bounded: rows leave the worker
        per part (PART_BYTES) instead of at the end of the shard."""
        spec = self.spec
        name = shard_name(url)
        summary = ShardSummary(shard=url, name=name)
        t_start = time.perf_counter()
        calls0 = self.engine.unet_calls
        timings0 = dict(self.engine.timings)
        tables = ["results", "sources"] + (["noise"] if spec.output.noise else [])
        out = self.store.shard_writer(name, tables, self.metadata())
        writer = BackgroundWriter(maxsize=2)
        q: queue.Queue = queue.Queue(maxsize=spec.batch.prefetch)
        stop = threading.Event()
        reader = threading.Thread(target=self._reader, args=(url, q, stop), daemon=True)
        reader.start()
        # batches of one shape each, across the whole shard (see batching.py)
        buckets = ShapeBuckets(spec.batch.images, key=lambda unit_read: unit_shape(unit_read[0]))
        seen_keys: set[str] = set()
        self.live = {"shard": url, "samples": 0, "edits": 0, "started": time.time()}
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                ready = []
                if item is not _END:
                    unit, t_read = item
                    sample = unit.sample if isinstance(unit, CodeItem) else unit
                    # stored codes: one item per sample and method, so the method is part of the identity
                    ident = (sample.key, unit.code.method, repr(unit.code.params)) if isinstance(unit, CodeItem) else sample.key
                    if ident in seen_keys and not sample.error:
                        sample.error, sample.error_type = f"duplicate key {sample.key!r} in shard", "duplicate_key"
                    seen_keys.add(ident)
                    if sample.error:
                        writer.submit(out.add, "sources", [self._error_row(sample, t_read)])
                        summary.errors += 1
                        kind = getattr(sample, "error_type", "") or "other"
                        summary.error_types[kind] = summary.error_types.get(kind, 0) + 1
                        self._publish_live(url, summary)
                    else:
                        ready = buckets.add((unit, t_read))
                for batch in buckets.flush() if item is _END else ready:
                    self._run_batch(batch, out, writer, summary)
                    self._publish_live(url, summary)
                if item is _END:
                    break
            writer.close()  # every row is in a part or in the writer's buffers
            t0 = time.perf_counter()
            summary.unet_calls = self.engine.unet_calls - calls0
            summary.seconds = time.perf_counter() - t_start
            summary.timings = {k: v - timings0.get(k, 0.0) for k, v in self.engine.timings.items()}
            marker = {**summary.to_dict(), "finished": time.time(), **self.placement}
            out.commit(marker, spec.hash())
            summary.timings["write"] = time.perf_counter() - t0
        except BaseException:
            writer.abort()
            out.abort()  # a failed attempt leaves no parts under the table folders
            raise
        finally:
            # Unblock a reader waiting on a full queue so it sees `stop` and
            # exits (a long-lived actor must not keep one thread per failed shard).
            stop.set()
            deadline = time.monotonic() + 10
            while reader.is_alive() and time.monotonic() < deadline:
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass
        return summary.to_dict()

    def _publish_live(self, url: str, summary: ShardSummary) -> None:
        self.live = {"shard": url, "samples": summary.images + summary.errors, "edits": summary.edits,
                     "started": self.live["started"]}

    def _run_batch(self, batch, out, writer: "BackgroundWriter", summary: ShardSummary) -> None:
        """Model work for one batch on this thread; the rest goes to the writer."""
        spec = self.spec
        units = [u for u, _ in batch]
        before = dict(self.engine.timings)
        if spec.input.codes:
            outs = self.engine.run_codes(units)
            units = [u.sample for u in units]
        else:
            outs = self.engine.run(units, decode_recon=bool(spec.score.recon_psnr and self.scorers))
        read_time = {id(s): t for s, (_, t) in zip(units, batch)}
        scores, keep, t_score = self._score(outs)
        stage = {k: self.engine.timings[k] - before.get(k, 0.0) for k in self.engine.timings}
        stage["score"] = t_score
        row_i = 0
        for o in outs:
            kept_here = sum(bool(k) for k in keep[row_i: row_i + len(o.edits)])
            row_i += len(o.edits)
            summary.images += 1
            summary.edits += len(o.edits)
            summary.kept += kept_here
        writer.submit(self._write_batch, out, outs, scores, keep, stage, read_time)

    def _write_batch(self, out, outs: list[SampleOut], scores: dict, keep: list, stage: dict, read_time: dict) -> None:
        """The CPU stages after the model (writer thread): encode the images,
        build the rows, hand them to the shard's part writer."""
        spec = self.spec
        n_rows = max(1, sum(len(o.edits) for o in outs))
        t0 = time.perf_counter()
        results, sources, noise = [], [], []
        row_i = 0
        for o in outs:
            s = o.sample
            meta = _meta_json(s)
            kept_here = 0
            for e in o.edits:
                sc = {k: v[row_i] for k, v in scores.items()}
                kept = keep[row_i]
                row_i += 1
                write_image = kept or spec.filter.write_rejected
                kept_here += kept
                params = o.variant_params or self.engine.params(e.variant)
                params_json = json.dumps(params, sort_keys=True)
                results.append({
                    "key": s.key, "shard": s.shard, "source_prompt": s.source_prompt,
                    "target_prompt": e.target_prompt, "target_index": e.target_index,
                    "seed_index": e.seed_index, "seed": e.seed, "method": params["method"],
                    "num_steps": params["num_steps"], "skip": params["skip"],
                    "cfg_source": params["cfg_source"], "cfg_target": params["cfg_target"],
                    "params": params_json, "model_id": self.models.model_id,
                    "image": encode_image(e.image, spec.output.image_format, spec.output.quality) if write_image else None,
                    "image_format": spec.output.image_format,
                    "width": int(e.image.shape[2]), "height": int(e.image.shape[1]),
                    **sc, "kept": bool(kept), "status": "ok" if kept else "rejected",
                    **{f"time_{k}_s": stage.get(k, 0.0) / n_rows for k in STAGES if k not in ("read", "encode", "write")},
                    "time_read_s": read_time[id(s)], "meta": meta,
                })
            sources.append(self._source_row(o, kept_here, read_time[id(s)], stage, n_rows))
            for code in o.codes.values():
                noise.extend(self._noise_rows(o, code))
        t_enc = time.perf_counter() - t0
        for r in results:
            r["time_encode_s"] = t_enc / n_rows
        out.add("results", results)
        out.add("sources", sources)
        if spec.output.noise:
            out.add("noise", noise)

    def _score(self, outs: list[SampleOut]):
        n = sum(len(o.edits) for o in outs)
        if not self.scorers or n == 0:
            return {}, [True] * n, 0.0
        from .scoring import psnr, select

        t0 = time.perf_counter()
        scores, groups = score_outs(self.scorers, outs, self.models.device)
        keep = select(scores, groups, filter_config(self.spec))
        if self.spec.score.recon_psnr:
            for o in outs:
                if o.recon_image is not None:
                    o.recon_psnr = float(psnr(o.recon_image[None], o.sample.image[None])[0])
        return scores, keep, time.perf_counter() - t0

    def _source_row(self, o: SampleOut, kept: int, t_read: float, stage: dict, n_rows: int) -> dict:
        s = o.sample
        per_img = max(1, len(o.edits))
        return {
            "key": s.key, "shard": s.shard, "source_prompt": s.source_prompt, "target_prompts": s.target_prompts,
            "orig_width": s.orig_size[0], "orig_height": s.orig_size[1],
            "width": int(s.image.shape[2]), "height": int(s.image.shape[1]),
            "num_edits": len(o.edits), "num_kept": kept,
            "recon_error_max": o.recon_error_max, "recon_error_mean": o.recon_error_mean,
            "recon_errors": json.dumps({self.engine.variants[v].label: e[0] for v, e in o.recon_errors.items()})
            if len(self.engine.variants) > 1 else None,
            "recon_psnr": o.recon_psnr,
            "status": "ok", "error": None,
            "time_read_s": t_read,
            **{f"time_{k}_s": v * per_img / n_rows for k, v in stage.items()},
            "image": encode_image(s.image, self.spec.output.image_format, self.spec.output.quality),
            "image_format": self.spec.output.image_format, "meta": _meta_json(s),
            "recon_image": None if o.recon_image is None
            else encode_image(o.recon_image, self.spec.output.image_format, self.spec.output.quality),
        }

    def _error_row(self, s: Sample, t_read: float) -> dict:
        return {
            "key": s.key, "shard": s.shard, "source_prompt": s.source_prompt or None,
            "target_prompts": s.target_prompts or None,
            "orig_width": s.orig_size[0] or None, "orig_height": s.orig_size[1] or None,
            "num_edits": 0, "num_kept": 0, "status": "error", "error": s.error, "time_read_s": t_read,
            "meta": _meta_json(s),
        }

    def _noise_rows(self, o: SampleOut, code: NoiseCode) -> list[dict]:
        from .codes import code_to_rows

        return code_to_rows(code, o.sample, o.seeds, self.models, self.spec.output.noise_dtype)


def _meta_json(sample: Sample) -> str:
    """The input json's extra fields (url, license, ...) as a JSON object."""
    return json.dumps(getattr(sample, "meta", None) or {}, sort_keys=True, ensure_ascii=False, default=str)


class BackgroundWriter:
    """One thread that runs submitted calls in order (a shard's CPU stages
    after the model). The queue is bounded, so the model runs at most
    `maxsize` batches ahead of the writes and memory stays bounded; the first
    error is re-raised in the submitting thread (and fails the shard)."""

    def __init__(self, maxsize: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self._error: BaseException | None = None
        self._aborted = False
        self._thread = threading.Thread(target=self._loop, name="imprint-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            call = self._q.get()
            if call is _END:
                return
            if self._error is not None or self._aborted:
                continue  # drain without running
            try:
                call()
            except BaseException as exc:
                self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, fn, *args) -> None:
        self._check()
        call = functools.partial(fn, *args)
        while True:
            try:
                self._q.put(call, timeout=0.1)
                return
            except queue.Full:
                self._check()

    def close(self) -> None:
        """Wait for every submitted call; raise the first error."""
        self._q.put(_END)
        self._thread.join()
        self._check()

    def abort(self) -> None:
        self._aborted = True
        self._q.put(_END)  # the loop drains without running, so this never blocks for long
        self._thread.join(timeout=60)


def placement() -> dict:
    """Where this worker runs, for the shard markers: host, process, and the
    Ray node and actor when it runs inside Ray (None inline)."""
    info = {"host": socket.gethostname(), "pid": os.getpid(), "node_id": None, "actor_id": None}
    ray = sys.modules.get("ray")  # only when Ray is already loaded: inline runs never import it
    if ray is not None and ray.is_initialized():
        ctx = ray.get_runtime_context()
        info["node_id"] = ctx.get_node_id()
        info["actor_id"] = ctx.get_actor_id()
    return info


def score_outs(scorers, outs: list[SampleOut], device) -> tuple[dict[str, list[float]], list[int]]:
    """Scores of every edit of `outs`, in row order, and the row's group id
    (one group per image, method and target prompt). One scoring call per
    image size: LPIPS compares an edit with its own source only."""
    group_ids: dict[tuple, int] = {}
    groups = [group_ids.setdefault((g, e.variant, e.target_index), len(group_ids)) for g, o in enumerate(outs) for e in o.edits]
    by_size: dict[tuple, list[int]] = {}
    for g, o in enumerate(outs):
        by_size.setdefault(tuple(o.sample.image.shape), []).append(g)
    scores: dict[str, list[float]] = {}
    order = []
    for members in by_size.values():
        sub = [outs[g] for g in members]
        sources = torch.stack([o.sample.image for o in sub]).to(device)
        edits = torch.stack([e.image for o in sub for e in o.edits]).to(device)
        edit_source = [j for j, o in enumerate(sub) for _ in o.edits]
        targets = [e.target_prompt for o in sub for e in o.edits]
        sub_groups = [group_ids[(g, e.variant, e.target_index)] for g in members for e in outs[g].edits]
        part = scorers.score(sources, [o.sample.source_prompt for o in sub], edits, edit_source, targets, sub_groups)
        # PIE-Bench's metrics for the samples with an edit mask (NaN for the others)
        part.update(scorers.pie.score(sources, edits, edit_source, targets, [o.sample.edit_mask for o in sub]))
        for k, v in part.items():
            scores.setdefault(k, []).extend(v)
        order += [(g, i) for g in members for i in range(len(outs[g].edits))]
    pos = {gi: n for n, gi in enumerate(order)}  # back to the row order of `outs`
    flat = [(g, i) for g, o in enumerate(outs) for i in range(len(o.edits))]
    return {k: [v[pos[gi]] for gi in flat] for k, v in scores.items()}, groups
