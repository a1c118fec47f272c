"""`imprint report OUT [OUT2 ...] --out report.html`: one self-contained
HTML page about one or more runs (several runs make a methods comparison;
the `method` column tells them apart).

Sections (stable ids for tools and tests): `header` (paths, spec hash,
model, method, parameters, the resolved spec), a `warning-banner` when the
model or the scorers had random weights, `summary` (images, bad samples,
edits kept/rejected, failed shards with reasons, throughput from the shard
markers), `samples` (per input: the source image and, per target prompt and
run, an `edit-grid` row of the N edits with their scores), `histograms`
(one PNG per score column), `scatter` (CLIP text vs LPIPS, one colour per
method) and `errors` (the bad samples and why).

Choices:
- The source image is the one stored in the output (`sources.image`: the
  image exactly as the model saw it). A report never opens the input
  shards named in the output on its own: an output may come from someone
  else, and its `shard` column could name a `pipe:` command or any URL.
  Only with `--read-inputs` are the shards re-read (and shown in the
  model's geometry), under the same rules as a job: `pipe:` only when the
  stored job spec set input.allow_pipe. Without a stored image (outputs of
  older versions) and without the flag the page says "source not available".
- The reconstruction is not re-decoded: that needs the model and the noise
  codes, too heavy for a report. The page shows the reconstruction error the
  run recorded instead (`recon_error_max`/`recon_error_mean` in latent
  space, `recon_psnr` when score.recon_psnr was on).
- Results are read without their image column; images are fetched only
  for the inputs shown, so the report stays cheap on large runs.
- Everything is embedded (images and plots as base64 data: URIs, inline
  CSS, no script): the file opens offline. All text is escaped, prompts are
  user data.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import typer

SCORES = ("clip_text", "clip_direction", "clip_image", "lpips", "diversity")  # = tables.SCORES (kept light to import)
MIME = {"webp": "image/webp", "png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg"}
SCATTER_MAX_POINTS = 20_000
ERRORS_MAX_ROWS = 500
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_LIGHT_COLUMNS = ("key", "shard", "target_prompt", "target_index", "seed_index", "method", *SCORES, "kept", "status")


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# ---------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------


@dataclass
class Run:
    path: str
    store: object  # OutputStore
    spec_hash: str
    spec_text: str
    spec: dict
    meta: dict  # imprint.* parquet metadata of the first file, random-weight flags OR-ed over all files
    results: object  # pyarrow.Table without images, plus `_file` (index into result_files)
    result_files: list
    sources: object  # pyarrow.Table without images, plus `_file` (index into source_files)
    source_files: list = field(default_factory=list)
    has_source_images: bool = False  # the sources files have an `image` column
    done: dict = field(default_factory=dict)  # shard name -> marker
    failed: dict = field(default_factory=dict)  # shard name -> failure marker
    label: str = ""

    @property
    def methods(self) -> list[str]:
        """The methods of this run, in the job's order (one run may compare several)."""
        seen = [m for m in self.meta.get("method", "").split(",") if m]
        for m in self.results.column("method").to_pylist():
            if m and m not in seen:
                seen.append(m)
        return seen or ["?"]

    @property
    def random_model(self) -> bool:
        return self.meta.get("model_random_weights") == "true"

    @property
    def random_scores(self) -> bool:
        return self.meta.get("scores_random_weights") == "true"


def load_run(path: str) -> Run:
    """Read one output directory (local or a pyarrow filesystem URI)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .store import FAILED, META_FILE, SPEC_FILE, OutputStore
    from .tables import RESULTS, SOURCES

    store = OutputStore.open(path)
    job = store.read_json(META_FILE)
    if job is None:
        raise FileNotFoundError(f"{path!r} is not an imprint output (no {META_FILE})")
    spec_text = store.read_text(SPEC_FILE) or ""
    try:
        spec = tomllib.loads(spec_text)
    except tomllib.TOMLDecodeError:
        spec = {}
    meta: dict[str, str] = {}

    has_image = []

    def read(name: str, schema: pa.Schema, columns: tuple[str, ...] | None, exclude: tuple[str, ...] = ()):
        files = store.table_files(name)
        parts = []
        for i, f in enumerate(files):
            have = pq.read_schema(f, filesystem=store.fs)
            if name == "sources":
                has_image.append("image" in have.names)
            for k, v in (have.metadata or {}).items():
                k, v = k.decode(), v.decode()
                if not k.startswith("imprint."):
                    continue
                k = k[len("imprint."):]
                if k.endswith("random_weights"):
                    meta[k] = "true" if v == "true" or meta.get(k) == "true" else "false"
                else:
                    meta.setdefault(k, v)
            cols = [c for c in (columns or have.names) if c in have.names and c not in exclude]
            t = pq.read_table(f, filesystem=store.fs, columns=cols).replace_schema_metadata(None)
            parts.append(t.append_column("_file", pa.array([i] * len(t), pa.int32())))
        if not parts:
            empty = schema.empty_table()
            cols = [c for c in (columns or schema.names) if c not in exclude]
            return empty.select(cols).append_column("_file", pa.array([], pa.int32())), files
        table = pa.concat_tables(parts, promote_options="default")
        for f in schema:  # outputs of older versions may lack columns: add them as nulls
            if (columns is None or f.name in columns) and f.name not in exclude and f.name not in table.column_names:
                table = table.append_column(f.name, pa.nulls(len(table), f.type))
        return table, files

    results, result_files = read("results", RESULTS, _LIGHT_COLUMNS)
    sources, source_files = read("sources", SOURCES, None, exclude=("image", "recon_image"))
    done = store.done_markers(job.get("spec_hash"))
    failed = {k: v for k, v in store.markers(FAILED).items() if k not in done}
    return Run(path=path, store=store, spec_hash=str(job.get("spec_hash", "")), spec_text=spec_text, spec=spec,
               meta=meta, results=results, result_files=result_files, sources=sources, source_files=source_files,
               has_source_images=any(has_image), done=done, failed=failed)


@dataclass
class Series:
    """The edits of one method in one run: a row of the sample grids, a colour in the plots."""
    run: Run
    method: str
    label: str
    results: object  # the run's light results of this method


def series_of(runs: list[Run]) -> list[Series]:
    """One series per (run, method). A method is called by its name; when
    several runs share a method, by its name and the run's number."""
    import pyarrow.compute as pc

    for i, run in enumerate(runs):
        run.label = f"run {i + 1}" if len(runs) > 1 else "run"
    pairs = [(run, m) for run in runs for m in run.methods]
    out = []
    for run, m in pairs:
        shared = sum(1 for _, m2 in pairs if m2 == m) > 1
        t = run.results
        t = t.filter(pc.equal(t.column("method"), m)) if len(t) else t
        out.append(Series(run, m, f"{m} ({run.label})" if shared else m, t))
    return out


# ---------------------------------------------------------------------------
# Images and plots
# ---------------------------------------------------------------------------


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return data_uri(buf.getvalue(), "image/png")


def _figure(w: float = 4.6, h: float = 3.2):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(w, h))
    return fig, fig.subplots()


def _values(table, column: str):
    import numpy as np

    return np.asarray(table.column(column).to_numpy(zero_copy_only=False), dtype=np.float64)


def histogram_png(column: str, by_series: dict) -> str | None:
    """One histogram of a score column, the series overlaid; None without values."""
    import numpy as np

    series = {m: v[np.isfinite(v)] for m, t in by_series.items() for v in [_values(t, column)]}
    series = {m: v for m, v in series.items() if len(v)}
    if not series:
        return None
    lo = min(v.min() for v in series.values())
    hi = max(v.max() for v in series.values())
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 31)
    fig, ax = _figure()
    for i, (m, v) in enumerate(series.items()):
        ax.hist(v, bins=bins, alpha=0.6 if len(series) > 1 else 0.9, color=_COLORS[i % len(_COLORS)],
                label=f"{m} (n={len(v)})")
    ax.set_xlabel(column)
    ax.set_ylabel("edits")
    ax.tick_params(labelsize=8)
    ax.set_title(column)
    ax.legend(fontsize=7)
    return _png(fig)


def scatter_png(by_series: dict) -> tuple[str | None, int]:
    """CLIP text similarity (y) against LPIPS to the source (x), one colour
    per method; large runs are subsampled (fixed seed) to keep the PNG readable."""
    import numpy as np

    points = {}
    for m, t in by_series.items():
        x, y = _values(t, "lpips"), _values(t, "clip_text")
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.any():
            points[m] = (x[ok], y[ok])
    if not points:
        return None, 0
    rng = np.random.default_rng(0)
    fig, ax = _figure(5.5, 4.0)
    for i, (m, (x, y)) in enumerate(points.items()):
        n = len(x)
        if n > SCATTER_MAX_POINTS:
            pick = rng.choice(n, SCATTER_MAX_POINTS, replace=False)
            x, y = x[pick], y[pick]
        ax.scatter(x, y, s=10, alpha=0.6, color=_COLORS[i % len(_COLORS)], label=f"{m} (n={n})")
    ax.set_xlabel("LPIPS to source (lower = more faithful)")
    ax.set_ylabel("CLIP text similarity (higher = closer to target)")
    ax.set_title("CLIP text vs LPIPS" + (f" per method ({len(points)} methods)" if len(points) > 1 else f": {next(iter(points))}"))
    ax.legend(fontsize=7)
    return _png(fig), len(points)


NO_SOURCE = ("source not available: not stored in this output "
             "(`imprint report --read-inputs` re-reads the input shards)")


def stored_images(run: Run, keys: list[tuple[str, str]], column: str = "image") -> dict[tuple[str, str], str]:
    """(shard, key) -> data URI of an image column of the run's `sources`
    table (`image`: the source; `recon_image`: its decoded reconstruction),
    read only from the files that hold the shown inputs."""
    import pyarrow.parquet as pq

    from .tables import image_bytes

    if column == "image" and not run.has_source_images:
        return {}
    rows = rows_of(run.sources.select(["key", "shard", "_file"]), keys)
    wanted = set(keys)
    out = {}
    for i in sorted({r["_file"] for r in rows}):
        f = run.source_files[i]
        have = pq.read_schema(f, filesystem=run.store.fs).names
        if column not in have:
            continue
        names = sorted({r["key"] for r in rows if r["_file"] == i})
        cols = [c for c in ("key", "shard", column, "image_format") if c in have]
        for r in pq.read_table(f, filesystem=run.store.fs, columns=cols, filters=[("key", "in", names)]).to_pylist():
            data = image_bytes(r.get(column))
            if data and (r["shard"], r["key"]) in wanted:
                out[(r["shard"], r["key"])] = data_uri(data, MIME.get(r.get("image_format") or "png", "image/png"))
    return out


def source_images(keys: list[tuple[str, str]], spec: dict, sizes: dict) -> dict[tuple[str, str], str]:
    """(shard, key) -> PNG data URI of the input image re-read from its shard
    in the model's geometry, or a reason string starting with "source not
    available". Only for `--read-inputs`: shards are opened under the job's
    rules (a `pipe:` shard only when the stored spec set input.allow_pipe)."""
    from contextlib import closing

    from .data import IMAGE_EXTS, load_image, read_raw_samples, to_model_tensor, to_pil
    from .spec import ImageSpec

    fields = ImageSpec.__dataclass_fields__
    image_spec = ImageSpec(**{k: v for k, v in spec.get("image", {}).items() if k in fields})
    allow_pipe = spec.get("input", {}).get("allow_pipe", False) is True
    out: dict[tuple[str, str], str] = {}
    by_shard: dict[str, set[str]] = {}
    for shard, key in keys:
        by_shard.setdefault(shard, set()).add(key)
    for shard, wanted in by_shard.items():
        left = set(wanted)
        try:
            with closing(read_raw_samples(shard, allow_pipe=allow_pipe)) as samples:
                for raw in samples:
                    key = str(raw.get("__key__", ""))
                    if key not in left:
                        continue
                    left.discard(key)
                    ext = next((e for e in IMAGE_EXTS if e in raw), None)
                    try:
                        if ext is None:
                            raise ValueError("no image entry in the sample")
                        pil = load_image(raw[ext], image_spec)
                        w, h = sizes.get((shard, key)) or pil.size
                        resolution = image_spec.resolution or min(w, h)
                        buf = io.BytesIO()
                        to_pil(to_model_tensor(pil, image_spec, resolution)).save(buf, format="PNG")
                        out[(shard, key)] = data_uri(buf.getvalue(), "image/png")
                    except Exception as exc:  # noqa: BLE001 - a report shows what it can
                        out[(shard, key)] = f"source not available: {type(exc).__name__}: {exc}"
                    if not left:
                        break
        except Exception as exc:  # noqa: BLE001
            reason = f"source not available: cannot read shard: {type(exc).__name__}: {exc}"
            for key in left:
                out[(shard, key)] = reason
            left = set()
        for key in left:
            out[(shard, key)] = "source not available: key not found in shard"
    return out


def rows_of(table, keys: list[tuple[str, str]]) -> list[dict]:
    """The rows of a table for the given (shard, key) inputs (filtered in Arrow
    first: results tables can be large)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not keys or not len(table):
        return []
    wanted = set(keys)
    near = table.filter(pc.is_in(table.column("key"), value_set=pa.array(sorted({k for _, k in keys}), pa.string())))
    return [r for r in near.to_pylist() if (r["shard"], r["key"]) in wanted]


def edit_images(run: Run, keys: list[tuple[str, str]]) -> dict[tuple, tuple[bytes, str]]:
    """(shard, key, target_index, seed_index, method) -> (image bytes, format), read
    only from the result files that hold the shown inputs."""
    import pyarrow.parquet as pq

    from .tables import image_bytes

    rows = rows_of(run.results.select(["key", "shard", "_file"]), keys)
    out = {}
    for i in sorted({r["_file"] for r in rows}):
        names = sorted({r["key"] for r in rows if r["_file"] == i})
        t = pq.read_table(run.result_files[i], filesystem=run.store.fs,
                          columns=["key", "shard", "target_index", "seed_index", "method", "image", "image_format"],
                          filters=[("key", "in", names)])
        for r in t.to_pylist():
            if r["image"] is not None:
                out[(r["shard"], r["key"], r["target_index"], r["seed_index"], r["method"])] = (image_bytes(r["image"]), r["image_format"] or "png")
    return out


# ---------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------

CSS = """
body{font-family:DejaVu Sans,Arial,sans-serif;margin:20px;color:#222;font-size:14px}
h1{font-size:22px} h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:28px}
h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;margin:6px 0} td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2} td.num{text-align:right;font-variant-numeric:tabular-nums}
.warning-banner{background:#fff3cd;border:2px solid #e0a800;color:#5c4400;padding:10px 14px;margin:12px 0;font-weight:bold}
.outside-domain{background:#fde2e1;color:#8a1f11;font-size:0.8em;padding:1px 6px;margin-left:6px;border-radius:3px}
.note{color:#666;font-style:italic}
.sample{border:1px solid #ddd;padding:10px;margin:12px 0}
.source{display:flex;gap:14px;align-items:flex-start}
.source img{width:192px;border:1px solid #999;image-rendering:pixelated}
.missing{box-sizing:border-box;width:192px;min-height:96px;background:#eee;color:#666;font-size:11px;display:flex;align-items:center;justify-content:center;text-align:center;border:1px dashed #aaa;padding:4px}
.edit-grid{margin-top:8px}
.edit-row{margin:8px 0}
.edit-row .prompt{font-weight:bold;margin-bottom:4px}
.edits{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:192px}
figure img.edit{width:192px;border:1px solid #999;image-rendering:pixelated}
figure.rejected img.edit{opacity:.55;border-color:#c00}
figcaption{font-size:10px;line-height:1.3}
.plots{display:flex;flex-wrap:wrap;gap:12px}
pre{background:#f7f7f7;padding:8px;font-size:11px;overflow:auto;max-height:400px}
"""


def _num(x, fmt: str = ".3f") -> str:
    if x is None or x != x:
        return "–"
    return format(x, fmt)


def _table(header: list[str], rows: list[list], num_cols: set[int] = frozenset(), attrs: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{esc(c)}</td>' if j in num_cols else f"<td>{esc(c)}</td>" for j, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _header(runs: list[Run]) -> str:
    parts = ['<section id="header">']
    for run in runs:
        try:
            variants = json.loads(run.meta.get("params", ""))
            variants = variants if isinstance(variants, list) else [variants]
            params = "\n".join(json.dumps(v, sort_keys=True) for v in variants)
        except (ValueError, TypeError):
            params = run.meta.get("params", "")
        scorers = run.meta.get("scorers", "")
        if not _scores_enabled(run) or scorers in ("", "{}"):
            scorers = "none (score.enabled = false)" if not _scores_enabled(run) else scorers
        rows = [
            ["output", run.path],
            ["spec hash", run.spec_hash],
            ["model", run.meta.get("model_id", run.spec.get("model", {}).get("id", "?"))],
            ["method(s)", ", ".join(run.methods)],
            ["parameters", params],
            ["scorers", scorers],
        ]
        parts.append(f'<div class="run" data-run="{esc(run.label)}"><h3>{esc(run.label)}: {esc(run.path)}</h3>'
                     + _table(["", ""], rows, attrs=' class="run-info"')
                     + (f"<details><summary>resolved job spec</summary><pre>{esc(run.spec_text)}</pre></details>" if run.spec_text else "")
                     + "</div>")
    parts.append("</section>")
    return "".join(parts)


def _scores_enabled(run: Run) -> bool:
    return bool(run.spec.get("score", {}).get("enabled", True))


def _random_scorers(run) -> str:
    """Which of a run's scorers had random weights, by name and setting (from
    the scorer description written into its files); "the scorers" when the
    files predate that description."""
    try:
        d = json.loads(run.meta.get("scorers") or "{}")
    except ValueError:
        d = {}
    names = []
    if d.get("clip_random_weights") or d.get("clip_pretrained") in ("random", "none", ""):
        names.append(f'the CLIP scorer {d.get("clip_model", "?")} (clip_pretrained = "random")')
    if d.get("lpips_trunk") == "random":
        names.append(f'the LPIPS {d.get("lpips_net", "?")} trunk (lpips_pretrained = false)')
    return " and ".join(names) or "the scorers"


def _warning(runs: list[Run]) -> str:
    from .models.toy import TOY, TOY_NOTE

    if runs and all(run.meta.get("model_id") == TOY for run in runs):
        # The shipped toy model is trained (not random): say what it knows instead.
        random_scores = [f"{esc(run.label)}: {esc(_random_scorers(run))}" for run in runs if run.random_scores]
        return ('<div class="warning-banner" role="note">' + esc(TOY_NOTE[0].upper() + TOY_NOTE[1:]) + "; "
                "it knows only toy scenes (one coloured circle, square or triangle on a plain background): "
                "photos and other inputs not marked [toy scene] are outside its domain."
                + (f"<br>Randomly initialised scorer weights ({'; '.join(random_scores)}): those scores are not "
                   "meaningful." if random_scores else "") + "</div>")
    lines = []
    for run in runs:
        what = [w for w, flag in (("the model", run.random_model), (_random_scorers(run), run.random_scores)) if flag]
        if what:
            note = run.meta.get("note", "")
            lines.append(f"{esc(run.label)} ({esc(run.path)}): {' and '.join(what)} had randomly initialised weights"
                         + (f" ({esc(note)})" if note else "") + ".")
    if not lines:
        return ""
    return ('<div class="warning-banner" role="alert">Warning: random weights. Images and scores in this report are not meaningful.<br>'
            + "<br>".join(lines) + "</div>")


def _count(column, value) -> int:
    import pyarrow.compute as pc

    return pc.sum(pc.equal(column, value)).as_py() or 0


def _summary(runs: list[Run], series: list[Series]) -> str:
    stats: dict[str, list] = {k: [] for k in (
        "inputs ok", "bad samples", "edits", "kept", "rejected", "shards done", "shards failed",
        "shard-seconds", "images/s per worker", "edits/s per worker", "wall span (s)", "images/s overall",
        "edits/s overall", "UNet calls (batched)", "UNet calls per edit")}
    stage_rows: dict[str, list] = {}
    for i, run in enumerate(runs):
        stats["inputs ok"].append(_count(run.sources.column("status"), "ok"))
        stats["bad samples"].append(_count(run.sources.column("status"), "error"))
        stats["edits"].append(len(run.results))
        stats["kept"].append(_count(run.results.column("status"), "ok"))
        stats["rejected"].append(_count(run.results.column("status"), "rejected"))
        stats["shards done"].append(len(run.done))
        stats["shards failed"].append(len(run.failed))
        m = list(run.done.values())
        images, edits = sum(x.get("images", 0) for x in m), sum(x.get("edits", 0) for x in m)
        secs, calls = sum(x.get("seconds", 0.0) for x in m), sum(x.get("unet_calls", 0) for x in m)
        starts = [x["finished"] - x.get("seconds", 0.0) for x in m if "finished" in x]
        span = max(x["finished"] for x in m if "finished" in x) - min(starts) if starts else 0.0
        stats["shard-seconds"].append(_num(secs, ".1f"))
        stats["images/s per worker"].append(_num(images / secs if secs else None, ".3g"))
        stats["edits/s per worker"].append(_num(edits / secs if secs else None, ".3g"))
        stats["wall span (s)"].append(_num(span, ".1f"))
        stats["images/s overall"].append(_num(images / span if span else None, ".3g"))
        stats["edits/s overall"].append(_num(edits / span if span else None, ".3g"))
        stats["UNet calls (batched)"].append(calls)
        stats["UNet calls per edit"].append(_num(calls / edits if edits else None, ".3g"))
        for x in m:
            for stage, t in (x.get("timings") or {}).items():
                stage_rows.setdefault(stage, [0.0] * len(runs))[i] += t
    header = ["", *[r.label for r in runs]]
    num = set(range(1, len(runs) + 1))
    out = ['<section id="summary"><h2>Summary</h2>', _table(header, [[k, *v] for k, v in stats.items()], num, ' id="summary-table"'),
           '<p class="note">Per-worker rates divide by the sum of the shards\' processing seconds; overall rates by the span '
           "from the first shard's start to the last shard's finish (misleading across resumed runs).</p>"]
    rows = []
    for se in series:
        t = se.results
        means = []
        for col in SCORES:
            v = _values(t, col)
            v = v[v == v]
            means.append(_num(float(v.mean()) if len(v) else None))
        rows.append([se.label, len(t), _count(t.column("status"), "ok"), _count(t.column("status"), "rejected"), *means])
    out.append("<h3>Per method</h3>")
    out.append(_table(["method", "edits", "kept", "rejected", *[f"mean {c}" for c in SCORES]], rows,
                      set(range(1, 4 + len(SCORES))), ' id="methods-table"'))
    if stage_rows:
        out.append("<h3>Seconds by stage (sum over shards)</h3>")
        out.append(_table(["stage", *[r.label for r in runs]],
                          [[s, *[_num(v, ".2f") for v in vals]] for s, vals in stage_rows.items()], num, ' id="stages"'))
    failed = [[r.label, v.get("shard", k), v.get("attempts", ""), v.get("error", "")] for r in runs for k, v in sorted(r.failed.items())]
    out.append("<h3>Failed shards</h3>")
    out.append(_table(["run", "shard", "attempts", "reason"], failed, attrs=' id="failed-shards"') if failed
               else '<p class="note" id="failed-shards">No failed shards.</p>')
    out.append("</section>")
    return "".join(out)


def _pick_samples(runs: list[Run], n: int) -> list[tuple[str, str]]:
    """The first n successfully processed inputs by (shard, key), first run first
    (few shards to re-read, and the same inputs in every run of a comparison);
    on the toy model, inputs outside its domain come after the toy scenes."""
    import pyarrow.compute as pc

    picked: list[tuple[str, str]] = []
    for run in runs:
        t = run.sources.filter(pc.equal(run.sources.column("status"), "ok"))
        rows = t.select([c for c in ("shard", "key", "meta") if c in t.column_names]).to_pylist()
        rows.sort(key=lambda r: (_outside_domain(run, r), r["shard"], r["key"]))
        for k in ((r["shard"], r["key"]) for r in rows[:n]):
            if len(picked) >= n:
                return picked
            if k not in picked:
                picked.append(k)
    return picked


def _outside_domain(run: Run, source_row: dict) -> bool:
    """Whether an input lies outside what the run's model knows (the toy
    model knows toy scenes only; other models: nothing is outside)."""
    from .models.toy import TOY, TOY_DOMAIN

    return run.meta.get("model_id") == TOY and _domain(source_row) != TOY_DOMAIN


def _domain(source_row: dict) -> str | None:
    """The input's `domain` field (its sample json), e.g. "toy scene" in the toy demo."""
    try:
        meta = json.loads(source_row.get("meta") or "{}")
    except ValueError:
        return None
    return str(meta["domain"]) if isinstance(meta, dict) and meta.get("domain") else None


def _caption(r: dict) -> str:
    bits = [f"seed {r['seed_index']}"]
    bits += [f"{s} {_num(r[s])}" for s in SCORES if r.get(s) is not None]
    bits.append("kept" if r["status"] == "ok" else (r["status"] or "?"))
    return " · ".join(esc(b) for b in bits)


def _recon(se: Series, r: dict) -> list:
    """Reconstruction error of this series' method for one source row: a run of
    several methods records each method's max error in `recon_errors`."""
    per_method = None
    if r.get("recon_errors"):
        try:
            per_method = json.loads(r["recon_errors"])
        except ValueError:
            per_method = None
    if per_method is not None:
        return [se.label, _num(per_method.get(se.method), ".3g"), "–", "–"]
    return [se.label, _num(r.get("recon_error_max"), ".3g"), _num(r.get("recon_error_mean"), ".3g"), _num(r.get("recon_psnr"), ".2f")]


def _samples(runs: list[Run], series: list[Series], n: int, read_inputs: bool = False) -> str:
    keys = _pick_samples(runs, n)
    out = ['<section id="samples"><h2>Samples</h2>']
    if not keys:
        out.append('<p class="note">No successfully processed inputs.</p></section>')
        return "".join(out)
    out.append(f'<p class="note">{len(keys)} input(s). The source is the image stored in the output'
               + (" or, without one, re-read from its shard" if read_inputs else "")
               + " and shown in the model's geometry. Beside it, the decoded reconstruction (the code edited with the source "
               "prompt) where the run stored one (score.recon_psnr = true), and the reconstruction error the run recorded "
               "(latent max/mean |difference|, PSNR when computed).</p>")
    src_rows: dict[tuple, dict] = {}  # (shard, key) -> run label -> sources row
    for run in runs:
        for r in rows_of(run.sources, keys):
            if r["status"] == "ok":
                src_rows.setdefault((r["shard"], r["key"]), {})[run.label] = r
    sizes = {k: (next(iter(v.values()))["width"], next(iter(v.values()))["height"]) for k, v in src_rows.items()}
    spec = next((r.spec for r in runs if r.spec), {})
    sources: dict[tuple[str, str], str] = {}
    for run in runs:
        for k, uri in stored_images(run, [k for k in keys if k not in sources]).items():
            sources.setdefault(k, uri)
    recons = {run.label: stored_images(run, keys, "recon_image") for run in runs}
    missing = [k for k in keys if k not in sources]
    if missing and read_inputs:
        sources.update(source_images(missing, spec, sizes))
    images = {run.label: edit_images(run, keys) for run in runs}
    edits: dict[tuple, list] = {}  # (series index, shard, key, target index) -> rows
    for i, se in enumerate(series):
        for r in rows_of(se.results.drop_columns(["_file"]), keys):
            edits.setdefault((i, r["shard"], r["key"], r["target_index"]), []).append(r)
    for shard, key in keys:
        srow = src_rows.get((shard, key), {})
        first = next(iter(srow.values()), {})
        src = sources.get((shard, key), NO_SOURCE)
        src_html = (f'<img class="source-image" alt="source {esc(key)}" src="{src}">' if src.startswith("data:")
                    else f'<div class="missing source-missing">{esc(src)}</div>')
        recon = [_recon(se, srow[se.run.label]) for se in series if se.run.label in srow]
        for label, by_key in recons.items():
            if (shard, key) in by_key:
                src_html += (f'<figure class="recon-cell"><img class="recon-image" alt="reconstruction {esc(key)}" '
                             f'src="{by_key[(shard, key)]}"><figcaption>reconstruction'
                             + (f" ({esc(label)})" if len(runs) > 1 else "") + "</figcaption></figure>")
        domain = _domain(first)
        outside = any(_outside_domain(run, r) for run in runs for r in srow.values())
        out.append(f'<div class="sample" data-key="{esc(key)}"><h3>{esc(key)} <span class="note">({esc(shard)})</span>'
                   + (f' <span class="domain">[{esc(domain)}]</span>' if domain else "")
                   + (' <span class="outside-domain">outside the model\'s domain</span>' if outside else "") + "</h3>")
        out.append(f'<div class="source">{src_html}<div><div>source prompt: <q class="source-prompt">{esc(first.get("source_prompt"))}</q></div>'
                   f"<div>size {esc(first.get('orig_width'))}×{esc(first.get('orig_height'))} → {esc(first.get('width'))}×{esc(first.get('height'))}</div>"
                   + _table(["method", "recon max |Δ| (latent)", "recon mean |Δ|", "recon PSNR (dB)"], recon, {1, 2, 3}, ' class="recon"')
                   + "</div></div>")
        out.append(f'<div class="edit-grid" data-key="{esc(key)}">')
        for ti, target in enumerate(first.get("target_prompts") or []):
            for i, se in enumerate(series):
                rows = sorted(edits.get((i, shard, key, ti), []), key=lambda r: r["seed_index"])
                if not rows:
                    continue
                cells = []
                for r in rows:
                    img = images[se.run.label].get((shard, key, ti, r["seed_index"], se.method))
                    cls = "edit-cell" + ("" if r["status"] == "ok" else " rejected")
                    if img is not None:
                        body = f'<img class="edit" alt="edit seed {esc(r["seed_index"])}" src="{data_uri(img[0], MIME.get(img[1], "image/png"))}">'
                    else:
                        body = '<div class="edit missing">rejected by the filters; image not written (filter.write_rejected = false)</div>'
                    cells.append(f'<figure class="{cls}">{body}<figcaption>{_caption(r)}</figcaption></figure>')
                out.append(f'<div class="edit-row" data-method="{esc(se.label)}" data-target-index="{ti}">'
                           f'<div class="prompt">→ <q class="target-prompt">{esc(target)}</q> <span class="method">[{esc(se.label)}]</span>'
                           f'</div><div class="edits">{"".join(cells)}</div></div>')
        out.append("</div></div>")
    out.append("</section>")
    return "".join(out)


def _plots(runs: list[Run], series: list[Series]) -> str:
    by_series = {se.label: se.results for se in series}
    no_scores = [r.label for r in runs if not _scores_enabled(r)]
    why = f" (score.enabled = false in {', '.join(no_scores)})" if no_scores else ""
    unscored = [se.label for se in series if all(se.results.column(c).null_count == len(se.results) for c in SCORES)]
    out = ['<section id="histograms"><h2>Score histograms</h2>']
    if unscored and len(unscored) < len(series):
        out.append(f'<p class="note" id="unscored">Without scores, not in the plots: {esc(", ".join(unscored))}{esc(why)}.</p>')
    out.append('<div class="plots">')
    missing = []
    for col in SCORES:
        png = histogram_png(col, by_series)
        if png is None:
            missing.append(col)
        else:
            out.append(f'<img class="histogram" data-score="{col}" alt="histogram of {col}" src="{png}">')
    out.append("</div>")
    if missing:
        out.append(f'<p class="note" id="scores-missing">No values for {esc(", ".join(missing))}{esc(why)}: plots omitted.</p>')
    out.append("</section>")
    png, n = scatter_png(by_series)
    out.append('<section id="scatter"><h2>CLIP text vs LPIPS' + (f" per method ({n} methods)" if n > 1 else "") + "</h2>")
    if png is None:
        out.append(f'<p class="note">No edits with both clip_text and lpips scores{esc(why)}: plot omitted.</p>')
    else:
        out.append(f'<img class="scatter-plot" data-methods="{n}" alt="CLIP text vs LPIPS" src="{png}">')
    out.append("</section>")
    return "".join(out)


def _errors(runs: list[Run]) -> str:
    import pyarrow.compute as pc

    rows, total = [], 0
    for run in runs:
        t = run.sources.filter(pc.equal(run.sources.column("status"), "error"))
        total += len(t)
        for r in t.select(["key", "shard", "error"]).slice(0, ERRORS_MAX_ROWS - len(rows)).to_pylist():
            rows.append([run.label, r["key"], r["shard"], r["error"]])
    out = [f'<section id="errors"><h2>Bad samples ({total})</h2>']
    if not rows:
        out.append('<p class="note">None.</p>')
    else:
        out.append(_table(["run", "key", "shard", "error"], rows, attrs=' id="errors-table"'))
        if total > len(rows):
            out.append(f'<p class="note">... and {total - len(rows)} more.</p>')
    out.append("</section>")
    return "".join(out)


def build_report(outputs: list[str], samples: int = 8, read_inputs: bool = False) -> str:
    """The HTML page for one or more output directories. Nothing is executed
    and no input shard is opened unless `read_inputs` (see the module notes)."""
    if not outputs:
        raise ValueError("outputs: at least one output directory is required")
    if samples < 0:
        raise ValueError(f"samples: must be >= 0, got {samples}")
    runs = [load_run(p) for p in outputs]
    series = series_of(runs)
    title = "imprint report: " + ", ".join(se.label for se in series)
    body = ["<h1>imprint report</h1>", _warning(runs), _header(runs), _summary(runs, series), _samples(runs, series, samples, read_inputs),
            _plots(runs, series), _errors(runs)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(outputs: list[str], out: str | Path, samples: int = 8, read_inputs: bool = False) -> Path:
    """Build the report and write it atomically to `out`."""
    text = build_report(outputs, samples, read_inputs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


def report(
    outputs: list[str] = typer.Argument(..., help="Output path(s) of imprint run; several compare methods."),
    out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write."),
    samples: int = typer.Option(8, "--samples", help="How many inputs to show with their edits."),
    read_inputs: bool = typer.Option(
        False, "--read-inputs",
        help="Re-read source images the output does not store from the input shards it names (local or remote; "
             "pipe: commands only when the stored job spec allowed them). Off: the report opens nothing but the outputs."),
) -> None:
    """Write a self-contained HTML report of one or more runs (several runs compare methods)."""
    from .console import die

    try:
        path = write_report(list(outputs), out, samples, read_inputs)
    except (FileNotFoundError, ValueError) as exc:
        die(str(exc))
    typer.echo(f"imprint: report written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
