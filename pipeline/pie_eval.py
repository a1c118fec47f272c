"""`imprint eval`: PIE-Bench's table from job outputs.

Reads only the `results/` tables of the given outputs (committed rows, see
`store.read_table`), averages each of PIE-Bench's seven metrics per method
(the `method` column: e.g. "edit-friendly", "edit-friendly+p2p") over the
rows that have it (rows of samples with an edit mask; NaN and infinite
values, e.g. the PSNR of an untouched background, are left out and counted),
optionally per value of a field of the input's json (`meta`, e.g.
`editing_type`), and reports the means in the published units: structure
distance x10^3, background LPIPS x10^3, MSE x10^4, SSIM x10^2, PSNR and CLIP
as they are.
"""

from __future__ import annotations

import json
import math
from typing import Iterable

from .tables import PIE_METRICS

PUBLISHED_SCALE = {"structure_distance": 1e3, "bg_psnr": 1.0, "bg_lpips": 1e3, "bg_mse": 1e4, "bg_ssim": 1e2,
                   "clip_whole": 1.0, "clip_edited": 1.0}
HEADERS = {"structure_distance": "Dist x1e3", "bg_psnr": "PSNR", "bg_lpips": "LPIPS x1e3", "bg_mse": "MSE x1e4",
           "bg_ssim": "SSIM x1e2", "clip_whole": "CLIP whole", "clip_edited": "CLIP edited"}
# Published PIE-Bench rows, in PIE_METRICS order (None: not reported): PIE-Bench's own DDIM+P2P and Direct
# Inversion+P2P rows, and the rows reported for edit-friendly (SD 1.4, 50 steps) without and with P2P.
PUBLISHED = {
    "DDIM+P2P (published)": (69.43, 17.87, 208.80, 219.88, 71.14, 25.01, 22.44),
    "Direct Inversion+P2P (published)": (11.65, 27.22, 54.55, 32.86, 84.76, 25.02, 22.10),
    "edit-friendly, SD 1.4, 50 steps (published)": (12.9, 25.87, 60.9, None, 83.7, 25.4, None),
    "edit-friendly + P2P (published)": (15.1, 26.30, 57.0, None, 84.0, 25.5, None),
}


def _mean(values: Iterable) -> tuple[float | None, int, int]:
    """(mean of the finite values, how many, how many non-finite left out)."""
    finite, dropped = [], 0
    for v in values:
        if v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            finite.append(v)
        elif not math.isnan(v):
            dropped += 1  # +-inf: a PSNR of an unchanged background
    return (sum(finite) / len(finite) if finite else None), len(finite), dropped


def summarize(rows: list[dict]) -> dict:
    """{method: {metric: mean in published units or None}} and the counts, for
    rows with `method` and the PIE_METRICS columns."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    means, counts = {}, {}
    for method, rs in sorted(by_method.items()):
        means[method], counts[method] = {}, {}
        for m in PIE_METRICS:
            mean, n, dropped = _mean(r.get(m) for r in rs)
            means[method][m] = None if mean is None else mean * PUBLISHED_SCALE[m]
            counts[method][m] = {"rows": n, "non_finite": dropped}
    return {"methods": means, "counts": counts}


def load_rows(outs: list[str], by: str | None = None) -> list[dict]:
    """The results rows of every output, with the method name (made unique per
    output when two outputs hold the same method) and, with `by`, the value
    of that field of the input json (`meta`) as `group`."""
    import pyarrow as pa

    from .store import read_table

    tables = []
    for out in outs:
        try:
            t = read_table(out, "results", columns=["method", "meta", *PIE_METRICS])
        except (pa.ArrowInvalid, KeyError) as exc:  # a results table without the metric columns
            raise ValueError(f"{out}: its results/ tables have no PIE-Bench metric columns (written by an imprint "
                             f"that did not measure them?): {exc}") from None
        tables.append((out, t.to_pylist()))
    names: dict[str, set] = {}
    for out, rows in tables:
        for r in rows:
            names.setdefault(r["method"], set()).add(out)
    rows_all = []
    for out, rows in tables:
        for r in rows:
            if len(names[r["method"]]) > 1:
                r["method"] = f"{r['method']} ({out})"
            if by:
                meta = json.loads(r.get("meta") or "{}")
                r["group"] = str(meta.get(by, "(none)"))
            rows_all.append(r)
    return rows_all


def random_weight_outputs(outs: list[str]) -> list[str]:
    """The outputs whose results were scored with randomly initialised
    weights (the `imprint.scores_random_weights` metadata of their files):
    their numbers mean nothing."""
    import pyarrow.parquet as pq

    from .store import OutputStore

    flagged = []
    for out in outs:
        store = OutputStore.open(out)
        for f in store.table_files("results"):
            meta = pq.read_schema(f, filesystem=store.fs).metadata or {}
            if meta.get(b"imprint.scores_random_weights") == b"true":
                flagged.append(out)
                break
    return flagged


def evaluate(outs: list[str], by: str | None = None) -> dict:
    """The JSON `imprint eval` writes: {"units": ..., "methods": {method:
    {metric: mean}}, "counts": ..., and with `by` "by": {value: {"methods":
    ..., "counts": ...}}}."""
    rows = load_rows(outs, by)
    if not any(any(r.get(m) is not None and not _isnan(r.get(m)) for m in PIE_METRICS) for r in rows):
        raise ValueError("no result row has PIE-Bench metrics: were the samples given edit masks "
                         "(edit_mask.png entries) and the job run with scoring on?")
    report = {"units": {m: f"x{PUBLISHED_SCALE[m]:g}" for m in PIE_METRICS},
              "random_weights": random_weight_outputs(outs), **summarize(rows)}
    if by:
        groups: dict[str, list[dict]] = {}
        for r in rows:
            groups.setdefault(r["group"], []).append(r)
        report["by"] = {"field": by, "groups": {g: summarize(rs) for g, rs in sorted(groups.items())}}
    return report


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def format_table(methods: dict[str, dict], published: bool = False) -> str:
    """A plain-text table: one row per method (and the published rows)."""
    rows = [(name, [vals.get(m) for m in PIE_METRICS]) for name, vals in methods.items()]
    if published:
        rows += [(name, list(vals)) for name, vals in PUBLISHED.items()]
    name_w = max([len("method")] + [len(n) for n, _ in rows])
    widths = [max(len(HEADERS[m]), 8) for m in PIE_METRICS]
    cell = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["  ".join(["method".ljust(name_w), *(HEADERS[m].rjust(w) for m, w in zip(PIE_METRICS, widths))])]
    for name, vals in rows:
        lines.append("  ".join([name.ljust(name_w), *(cell(v).rjust(w) for v, w in zip(vals, widths))]))
    return "\n".join(lines)


def format_report(report: dict, published: bool = False) -> str:
    parts = [f"Warning: {out} was scored with random weights: its numbers are not meaningful"
             for out in report.get("random_weights", [])]
    parts.append(format_table(report["methods"], published))
    for group, sub in report.get("by", {}).get("groups", {}).items():
        parts.append(f"\n{report['by']['field']} = {group}")
        parts.append(format_table(sub["methods"]))
    return "\n".join(parts)
