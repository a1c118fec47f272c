"""`imprint report`: the HTML page of one run and of a comparison of runs,
built from real (tiny-model) outputs, checked element by element, and
rendered in headless Chromium."""

import base64
import io
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers_data import bad_samples, good_samples, image_bytes, write
from pipeline.executor import run_job
from pipeline.report import SCORES, build_report, write_report
from pipeline.spec import load_spec
from pipeline.store import OutputStore

SEEDS = 2
EVIL = '<script>alert("x")</script> & "quoted" <b>prompt</b>'
CHROMIUM = "/usr/bin/chromium"


def job(shards, out, **sections):
    raw = {
        "input": {"shards": [str(s) for s in shards], "templates": ["{source}, oil painting"]},
        "model": {"id": "tiny"},
        "inversion": {"steps": 3, "skip": 1},
        "edit": {"seeds": SEEDS},
        "batch": {"images": 2},
        "output": {"path": str(out), "image_format": "png"},
        "score": {"clip_model": "imprint-tiny-clip", "clip_pretrained": "none", "lpips_net": "squeeze",
                  "lpips_pretrained": False},
        "run": {"executor": "inline", "seed": 7, "threads": 2, "max_attempts": 1},
    }
    for sec, vals in sections.items():
        raw.setdefault(sec, {}).update(vals)
    return load_spec(raw=raw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run A: two methods with scores and a top-1 filter, over a shard with
    good and bad samples and a shard that is not a tar at all.
    Run B: one method without scores, over the same good shard and a second
    shard deleted after the run (its sources cannot be shown)."""
    d = tmp_path_factory.mktemp("report")
    g000 = good_samples("g", 1)[0]  # 128x128 on the tiny model, as is evil: one batch
    evil = {"__key__": "evil", "png": image_bytes(size=(96, 80), seed=5),
            "json": {"source_prompt": "a photo", "target_prompts": [EVIL]}}
    bad = bad_samples()
    good = write(d / "good-000.tar", [g000, bad["truncated"], evil, bad["not_image"]])
    broken = d / "broken-001.tar"
    broken.write_bytes(b"this is not a tar file" * 10)
    gone = write(d / "gone-002.tar", [g000])
    a = job([good, broken], d / "a", inversion={"method": ["edit-friendly", "ddim"]}, filter={"keep_top_k": 1})
    b = job([good, gone], d / "b", score={"enabled": False})
    report_a, report_b = run_job(a, progress=False), run_job(b, progress=False)
    os.remove(gone)
    assert list(report_a.failed) == [str(broken)] and not report_b.failed
    return d / "a", d / "b", good, str(broken), gone


class Page(HTMLParser):
    """Start tags with their attributes, and the text inside elements of a class."""

    def __init__(self, text_of=("target-prompt",)):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text_of, self.open, self.texts = set(text_of), [], {c: [] for c in text_of}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        cls = set((a.get("class") or "").split())
        hit = next(iter(cls & self.text_of), None)
        self.open.append((tag, hit))
        if hit:
            self.texts[hit].append("")

    def handle_endtag(self, tag):
        while self.open:
            t, _ = self.open.pop()
            if t == tag:
                break

    def handle_data(self, data):
        for _, hit in self.open:
            if hit:
                self.texts[hit][-1] += data

    def find(self, tag=None, cls=None, **attrs):
        out = []
        for t, a in self.tags:
            if tag and t != tag:
                continue
            if cls and cls not in (a.get("class") or "").split():
                continue
            if any(a.get(k.replace("_", "-")) != v for k, v in attrs.items()):
                continue
            out.append(a)
        return out

    def ids(self):
        return {a["id"] for _, a in self.tags if "id" in a}


def parse(text):
    p = Page()
    p.feed(text)
    p.close()
    return p


def table(out, name):
    return OutputStore.open(str(out)).read_table(name).to_pylist()


def test_report_of_one_run(runs):
    a, _, good, broken, _ = runs
    text = build_report([str(a)], read_inputs=True)
    page = parse(text)
    res = table(a, "results")
    ok_keys = {r["key"] for r in table(a, "sources") if r["status"] == "ok"}
    assert ok_keys == {"g000", "evil"}
    # sections and the random-weights banner (tiny model, random scorers)
    assert {"header", "summary", "samples", "histograms", "scatter", "errors", "failed-shards"} <= page.ids()
    assert len(page.find("div", "warning-banner")) == 1
    # every input shown; one grid row per (input, target, method); one cell per edit:
    # an image when kept, a placeholder when the top-1 filter rejected it (not written)
    assert len(page.find("div", "sample")) == 2 and len(page.find("div", "edit-grid")) == 2
    groups = {(r["key"], r["target_index"], r["method"]) for r in res}
    assert len(page.find("div", "edit-row")) == len(groups) == 2 * 2 * 2  # inputs x targets x methods
    kept = sum(r["status"] == "ok" for r in res)
    # top-1 kept per group; edit-friendly has SEEDS edits per group, ddim (deterministic) one
    assert kept == len(groups) and len(res) == len(groups) // 2 * (SEEDS + 1)
    assert len(page.find("img", "edit")) == kept
    assert len(page.find("div", "missing")) == len(res) - kept
    assert len(page.find("figure")) == len(res)
    assert {a["data-method"] for a in page.find("div", "edit-row")} == {"edit-friendly", "ddim"}
    # sources stored in the output or (--read-inputs) re-read from the shard, in the model's geometry; plots embedded
    sources = page.find("img", "source-image")
    assert len(sources) == 2
    for x in sources:
        img = Image.open(io.BytesIO(base64.b64decode(x["src"].split(",", 1)[1])))
        assert img.size == (128, 128) and np.asarray(img).std() > 10
    assert sorted(a["data-score"] for a in page.find("img", "histogram")) == sorted(SCORES)
    assert page.find("img", "scatter-plot", data_methods="2")
    # counts, bad samples, and the failed shard with its reason
    for name, value in (("inputs ok", 2), ("bad samples", 2), ("edits", len(res)), ("kept", kept), ("shards failed", 1)):
        assert f'<tr><td>{name}</td><td class="num">{value}</td></tr>' in text, name
    assert page.find("table", None, id="errors-table") and "truncated" in text and "not_image" in text
    assert page.find("table", None, id="failed-shards") and f"<td>{broken}</td>" in text and "cannot read shard" in text
    # self-contained and no script at all: the prompt with markup is text, not markup
    assert "<script" not in text.lower() and not page.find("script") and not page.find("link")
    assert all(x["src"].startswith("data:image/") for x in page.find("img"))
    assert EVIL in page.texts["target-prompt"]


def test_samples_limit(runs):
    a = runs[0]
    page = parse(build_report([str(a)], samples=1))
    assert len(page.find("div", "sample")) == 1
    key = page.find("div", "sample")[0]["data-key"]
    n = sum(r["key"] == key for r in table(a, "results"))
    assert len(page.find("figure")) == n
    with pytest.raises(ValueError, match="samples"):
        build_report([str(a)], samples=-1)
    with pytest.raises(FileNotFoundError, match="not an imprint output"):
        build_report([str(a / "results")])


def test_comparison_and_missing_scores(runs):
    a, b, good, _, gone = runs
    page = parse(build_report([str(b)], read_inputs=True))
    # scores disabled: no plots, and the page says why
    assert not page.find("img", "histogram") and not page.find("img", "scatter-plot")
    assert "score.enabled = false" in build_report([str(b)])
    # the shard deleted after the run: the sources come from the images the output stores, so all are shown
    assert not page.find("div", "source-missing") and len(page.find("img", "source-image")) == 3

    text = build_report([str(a), str(b)], read_inputs=True)
    page = parse(text)
    res_a, res_b = table(a, "results"), table(b, "results")
    # the same inputs of both runs side by side: the 2 of the shared shard, plus the one of the gone shard
    assert len(page.find("div", "sample")) == 3
    assert len(page.find("figure")) == len(res_a) + len(res_b)
    labels = {x["data-method"] for x in page.find("div", "edit-row")}
    assert labels == {"edit-friendly (run 1)", "ddim", "edit-friendly (run 2)"}
    run2_groups = {(r["shard"], r["key"], r["target_index"]) for r in res_b}
    assert len(page.find("div", "edit-row", data_method="edit-friendly (run 2)")) == len(run2_groups)
    # run B has no scores: the scatter shows run A's two methods only
    assert page.find("img", "scatter-plot", data_methods="2")
    assert page.find("p", None, id="unscored") and len(page.find("img", "histogram")) == len(SCORES)
    assert len(page.find("div", "run")) == 2


def test_cli(runs, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    a, b = runs[0], runs[1]
    out = tmp_path / "sub" / "r.html"
    res = CliRunner().invoke(app, ["report", str(a), str(b), "--out", str(out), "--samples", "2"])
    assert res.exit_code == 0, res.output
    assert out.is_file() and len(parse(out.read_text()).find("div", "sample")) == 2
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.html")])
    assert res.exit_code == 2 and "not an imprint output" in res.output and not (tmp_path / "x.html").exists()


def test_renders_in_chromium(runs, tmp_path):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing; CI must install it (apt-get install -y --no-install-recommends chromium)")
        pytest.skip(f"{CHROMIUM} not installed (Debian package `chromium`); the report is not rendered")
    page = write_report([str(runs[0])], tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    profile = tempfile.mkdtemp(dir=tmp_path)
    res = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1280,2000", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    shutil.rmtree(profile, ignore_errors=True)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert shot.stat().st_size > 20_000
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert img.shape[:2] == (2000, 1280)
    assert img.std() > 10  # text, tables, images: not a blank page
    # the warning banner's yellow (#fff3cd) is on screen near the top
    top = img[:600].reshape(-1, 3)
    assert (np.abs(top - [255, 243, 205]).max(axis=1) < 3).sum() > 1000


def stored_images(out) -> int:
    t = OutputStore.open(str(out)).read_table("sources")
    return 0 if "image" not in t.column_names else len(t) - t.column("image").null_count


def test_report_opens_no_input_by_default(runs, tmp_path, monkeypatch):
    """An output made by someone else may name any shard: `imprint report`
    shows what the output stores and opens nothing else unless asked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import pipeline.data

    a = runs[0]
    hostile = tmp_path / "hostile"
    shutil.copytree(a, hostile)
    flag = tmp_path / "FLAG"
    store = OutputStore.open(str(hostile))
    for f in store.table_files("sources"):
        t = pq.read_table(f)
        t = t.set_column(t.schema.get_field_index("shard"), "shard",
                         pa.array([f"pipe:touch {flag}; cat {s}" for s in t.column("shard").to_pylist()]))
        pq.write_table(t, f)
    for f in store.table_files("results"):
        t = pq.read_table(f)
        t = t.set_column(t.schema.get_field_index("shard"), "shard",
                         pa.array([f"pipe:touch {flag}; cat {s}" for s in t.column("shard").to_pylist()]))
        pq.write_table(t, f)
    # a consistent forgery: the done markers renamed to the rewritten files' digests, so the output reads as complete
    from pipeline.store import DONE, files_digest, marker_name, parse_marker_name

    files = store._listing().shard_files()
    for m in (hostile / DONE).glob("*.json"):
        shard, h, _ = parse_marker_name(m.name)
        m.rename(m.with_name(marker_name(shard, h, files_digest(files[shard]))))
    opened = []
    real_open = pipeline.data.open_shard
    monkeypatch.setattr(pipeline.data, "open_shard", lambda url, **k: opened.append(url) or real_open(url, **k))

    page = parse(build_report([str(hostile)]))
    assert not opened and not flag.exists()
    n = stored_images(hostile)
    assert len(page.find("img", "source-image")) == n
    assert len(page.find("div", "source-missing")) == 2 - n
    # --read-inputs applies the job's rules: the stored spec did not allow pipe: commands
    page = parse(build_report([str(hostile)], read_inputs=True))
    assert not flag.exists()
    if n < 2:
        assert "allow_pipe" in build_report([str(hostile)], read_inputs=True)
    from typer.testing import CliRunner

    from pipeline.cli import app

    res = CliRunner().invoke(app, ["report", str(hostile), "--out", str(tmp_path / "r.html"), "--read-inputs"])
    assert res.exit_code == 0, res.output
    assert not flag.exists() and not opened  # refused by the rule before anything was opened
