"""`imprint shards` on an untrusted table (issue 31): paths outside the
table's folder, FIFOs and devices, loopback and private URLs (also behind a
redirect), a server that drips, formats outside the contract; `--overwrite`
that keeps the old shards until the run succeeds; relative SRC and DEST; the
bytes read ahead bounded.

What was opened and connected to is recorded with an audit hook
(`sys.addaudithook`: every `open` and `socket.connect` of the process), so
"nothing read or fetched outside what is allowed" is observed, not assumed."""

import http.server
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers_data import image_bytes
from pipeline import ingest
from pipeline.cli import app
from pipeline.data import read_raw_samples
from pipeline.ingest import make_shards

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\nshowpage\n"
PNG = image_bytes(seed=7)

_events: list | None = None


def _audit(event, args):
    if _events is not None and event in ("open", "socket.connect"):
        _events.append((event, args[1] if event == "socket.connect" else args[0]))


sys.addaudithook(_audit)  # a hook cannot be removed; it records only inside `audited()`


class audited:
    def __enter__(self):
        global _events
        _events = []
        return _events

    def __exit__(self, *exc):
        global _events
        _events = None


def opened(events) -> set[str]:
    return {os.path.realpath(str(a)) for e, a in events if e == "open" and isinstance(a, (str, bytes, os.PathLike))}


def connected(events) -> set[tuple]:
    return {tuple(a[:2]) for e, a in events if e == "socket.connect" and isinstance(a, tuple)}


class Web(http.server.ThreadingHTTPServer):
    daemon_threads = True


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path == "/ok.png":
            return self._send(PNG)
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.server.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/drip":  # one byte at a time: every read is quick, the download never ends
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            try:
                for i in range(len(PNG)):
                    self.wfile.write(PNG[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.02)
            except OSError:
                pass
            return
        if self.path == "/big":
            return self._send(PNG + b"\0" * 5000)
        if self.path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(64):  # 64 KiB, no length announced
                self.wfile.write(b"400\r\n" + b"\0" * 0x400 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_error(404)

    def _send(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def web():
    """start(host) -> a server on that loopback address, recording its requests."""
    servers = []

    def start(host="127.0.0.1"):
        srv = Web((host, 0), Handler)
        srv.requests, srv.redirect_to = [], ""
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def url(srv, path):
    return f"http://{srv.server_address[0]}:{srv.server_address[1]}{path}"


def in_thread(fn, fifo: Path, timeout=60):
    """fn() in a thread with a time limit: a read blocked on `fifo` fails the
    test (after unblocking the reader) instead of hanging it."""
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("out", fn()), daemon=True)
    t.start()
    t.join(timeout)
    if "out" not in box:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the blocked reader gets an end of file
        pytest.fail(f"still running after {timeout} s (blocked on the FIFO?)")
    return box["out"]


def run_cli(args, fifo: Path):
    return in_thread(lambda: CliRunner().invoke(app, args), fifo)


def test_a_hostile_table_ends_in_skip_rows_naming_each_cause(tmp_path, web, monkeypatch):
    """The issue's "done when": a table with paths outside its folder, a FIFO,
    /dev/zero, a loopback URL, a redirect to loopback, a slow drip and an EPS
    ends with one skip row per bad row naming its cause; nothing outside the
    table's folder is opened and the loopback server is never connected to."""
    # 127.0.0.2 stands in for a public host (only it is "public" here); 127.0.0.1 is the private target
    monkeypatch.setattr(ingest, "_is_public", lambda ip: ip == "127.0.0.2")
    private, public = web("127.0.0.1"), web("127.0.0.2")
    public.redirect_to = url(private, "/ok.png")
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG)
    table = tmp_path / "table"
    table.mkdir()
    (table / "good.png").write_bytes(PNG)
    (table / "photo.gif").write_bytes(EPS)
    (table / "link.png").symlink_to(secret)
    os.mkfifo(table / "pipe.png")
    rows = {
        "good.png": "",
        "../secret.png": "outside", str(secret): "outside", f"file://{secret}": "outside", "link.png": "outside",
        "/dev/zero": "outside", "pipe.png": "not_a_file",
        url(private, "/ok.png"): "blocked_address", url(public, "/redirect"): "blocked_address",
        url(public, "/drip"): "timeout",
        "photo.gif": "format_refused",
    }
    (table / "t.jsonl").write_text("".join(json.dumps({"image": k, "caption": f"row {i}"}) + "\n"
                                           for i, k in enumerate(rows)))
    monkeypatch.chdir(tmp_path)
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: pytest.fail("EPS plugin opened"))
    started = time.monotonic()
    with audited() as events:
        res = run_cli(["shards", "table/t.jsonl", "out", "--timeout", "1", "--workers", "4", "--no-progress"],
                      fifo=table / "pipe.png")
    elapsed = time.monotonic() - started
    assert res.exit_code == 0, res.output
    assert "wrote 1 samples" in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("  skipped ")]
    for i, (image, cause) in enumerate(rows.items()):
        if not cause:
            continue
        row = [ln for ln in lines if ln.endswith(f"t.jsonl row {i + 1})")]
        assert len(row) == 1 and row[0].startswith(f"  skipped {cause}: "), (image, cause, row, res.output)
    assert "/dev/zero" not in opened(events) and str(secret) not in opened(events)
    assert not private.requests and ("127.0.0.1", private.server_address[1]) not in connected(events)
    assert public.requests.count("/redirect") >= 1 and "/drip" in public.requests
    assert elapsed < 15, elapsed  # the drip ends at its deadline (its body takes ~3 s more)


def test_fifo_and_devices_are_refused_without_reading_them(tmp_path):
    (tmp_path / "t").mkdir()
    os.mkfifo(tmp_path / "t" / "pipe.png")
    (tmp_path / "t" / "t.csv").write_text("image,caption\npipe.png,a\n/dev/zero,b\n")
    s = in_thread(lambda: make_shards(str(tmp_path / "t" / "t.csv"), str(tmp_path / "out"), progress=False,
                                      allow_outside=True), tmp_path / "t" / "pipe.png", timeout=30)
    assert [r.split(":")[0] for _, r in s.skipped] == ["not_a_file", "not_a_file"], s.skipped
    assert "named pipe" in s.skipped[0][1] and "character device" in s.skipped[1][1]


def test_allow_outside_reads_a_trusted_tables_paths_anywhere(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(PNG)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "t.csv").write_text(f"image,caption\n../imgs/a.png,a\n{tmp_path / 'imgs' / 'a.png'},b\n")
    s = make_shards(str(tmp_path / "t" / "t.csv"), str(tmp_path / "o1"), progress=False)
    assert s.written == 0 and dict(s.reasons()) == {"outside": 2}
    s = make_shards(str(tmp_path / "t" / "t.csv"), str(tmp_path / "o2"), progress=False, allow_outside=True)
    assert s.written == 2 and not s.skipped


@pytest.mark.parametrize("ip,public", [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False),
    ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("::1", False),
    ("fe80::1%eth0", False), ("fc00::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False),
    ("224.0.0.1", False)])
def test_which_addresses_count_as_public(ip, public):
    assert ingest._is_public(ip) is public


def test_private_addresses_are_refused_after_dns_unless_allowed(tmp_path, web):
    srv = web("127.0.0.1")
    port = srv.server_address[1]
    (tmp_path / "t.csv").write_text(f"image,caption\nhttp://localhost:{port}/ok.png,a\n")
    s = make_shards(str(tmp_path / "t.csv"), str(tmp_path / "o1"), progress=False)
    assert s.written == 0 and dict(s.reasons()) == {"blocked_address": 1} and "--allow-private" in s.skipped[0][1]
    assert not srv.requests
    s = make_shards(str(tmp_path / "t.csv"), str(tmp_path / "o2"), progress=False, allow_private=True)
    assert s.written == 1 and srv.requests == ["/ok.png"]


def test_download_byte_cap_with_and_without_a_length(tmp_path, web):
    srv = web()
    (tmp_path / "t.csv").write_text(f"image,caption\n{url(srv, '/big')},a\n{url(srv, '/big-chunked')},b\n"
                                    f"{url(srv, '/ok.png')},c\n")
    s = make_shards(str(tmp_path / "t.csv"), str(tmp_path / "o"), progress=False, allow_private=True,
                    max_image_bytes=len(PNG) + 100)
    assert s.written == 1 and dict(s.reasons()) == {"too_large": 2}, s.skipped


def test_one_deadline_per_download_not_per_read(tmp_path, web):
    srv = web()
    (tmp_path / "t.csv").write_text(f"image,caption\n{url(srv, '/drip')},a\n")
    started = time.monotonic()
    s = make_shards(str(tmp_path / "t.csv"), str(tmp_path / "o"), progress=False, allow_private=True, timeout=0.5)
    assert dict(s.reasons()) == {"timeout": 1}, s.skipped
    assert time.monotonic() - started < 2.5  # the drip alone takes len(PNG) * 0.02 s
    assert len(PNG) * 0.02 > 3


def test_eps_named_gif_never_reaches_ghostscript(tmp_path, monkeypatch):
    """In `imprint shards` (a folder) and in the worker's decoding alike."""
    from PIL import EpsImagePlugin

    from pipeline.data import decode_sample
    from pipeline.spec import ImageSpec, InputSpec

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: pytest.fail("EPS plugin opened"))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript started"))
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.gif").write_bytes(EPS)
    (tmp_path / "f" / "b.gif").write_bytes(image_bytes(fmt="GIF"))
    s = make_shards(str(tmp_path / "f"), str(tmp_path / "o"), progress=False)
    assert s.written == 1 and s.converted == 1 and dict(s.reasons()) == {"format_refused": 1}
    assert "EPS" in s.skipped[0][1]
    for ext in ("png", "jpg"):
        raw = {"__key__": "k", ext: EPS, "json": b'{"source_prompt": "a cat"}'}
        assert decode_sample(raw, "s", InputSpec(templates=["x"]), ImageSpec(), 64).error_type == "format_refused"


def _folder(path: Path, n: int, seed: int = 0) -> Path:
    path.mkdir(parents=True)
    for i in range(n):
        (path / f"{i}.png").write_bytes(image_bytes(seed=seed + i))
        (path / f"{i}.txt").write_text(f"run {seed} image {i}")
    return path


def _captions(dest: Path) -> dict[str, list[str]]:
    return {p.name: [raw["txt"].decode() if "txt" in raw else json.loads(raw["json"])["source_prompt"]
                     for raw in read_raw_samples(str(p))] for p in sorted(dest.glob("*.tar"))}


def test_overwrite_keeps_the_old_shards_until_the_run_succeeds(tmp_path, monkeypatch):
    dest = tmp_path / "shards"
    make_shards(str(_folder(tmp_path / "old", 3, seed=0)), str(dest), samples_per_shard=1, progress=False)
    before = _captions(dest)
    assert len(before) == 3
    new_src = _folder(tmp_path / "new", 2, seed=10)
    real_write, calls = ingest.write_shards, []

    def failing_write(samples, path):
        calls.append(path)
        assert _captions(dest) == before  # while the run writes, DEST still holds the old shards, unchanged
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(samples, path)

    monkeypatch.setattr(ingest, "write_shards", failing_write)
    with pytest.raises(OSError, match="disk full"):
        make_shards(str(new_src), str(dest), samples_per_shard=1, overwrite=True, progress=False)
    assert _captions(dest) == before and sorted(os.listdir(dest)) == sorted(before)  # no staging folder left
    monkeypatch.setattr(ingest, "write_shards", real_write)
    s = make_shards(str(new_src), str(dest), samples_per_shard=1, overwrite=True, progress=False)
    assert s.written == 2
    assert _captions(dest) == {"shard-000000.tar": ["run 10 image 0"], "shard-000001.tar": ["run 10 image 1"]}
    assert sorted(os.listdir(dest)) == ["shard-000000.tar", "shard-000001.tar"]  # the third old shard is gone


def test_overwrite_with_no_usable_sample_keeps_the_old_shards(tmp_path):
    dest = tmp_path / "shards"
    make_shards(str(_folder(tmp_path / "old", 2)), str(dest), progress=False)
    before = _captions(dest)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    res = CliRunner().invoke(app, ["shards", str(tmp_path / "bad"), str(dest), "--overwrite", "--no-progress"])
    assert res.exit_code == 2 and "no samples written" in res.output
    assert _captions(dest) == before


def test_relative_folder_and_table_from_another_working_directory(tmp_path, monkeypatch):
    """The README's quickstart, `imprint shards photos/ shards/photos/`, run
    from the folder holding photos/; and a table given by a relative path."""
    _folder(tmp_path / "work" / "photos", 3)
    (tmp_path / "work" / "tables" / "imgs").mkdir(parents=True)
    (tmp_path / "work" / "tables" / "imgs" / "a.png").write_bytes(PNG)
    (tmp_path / "work" / "tables" / "u.csv").write_text("image,caption\nimgs/a.png,a\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path / "work")
    res = CliRunner().invoke(app, ["shards", "photos/", "shards/photos/", "--no-progress"])
    assert res.exit_code == 0 and "wrote 3 samples" in res.output, res.output
    assert len(_captions(tmp_path / "work" / "shards" / "photos")["shard-000000.tar"]) == 3
    res = CliRunner().invoke(app, ["shards", "tables/u.csv", "shards/u", "--no-progress"])
    assert res.exit_code == 0 and "wrote 1 samples" in res.output, res.output
    monkeypatch.chdir(elsewhere)
    res = CliRunner().invoke(app, ["shards", "../work/photos", "../work/shards/again", "--no-progress"])
    assert res.exit_code == 0 and "wrote 3 samples" in res.output, res.output
    res = CliRunner().invoke(app, ["shards", str(tmp_path / "work" / "photos"), str(tmp_path / "abs"), "--no-progress"])
    assert res.exit_code == 0 and "wrote 3 samples" in res.output, res.output


def test_bytes_read_ahead_are_bounded(tmp_path, monkeypatch):
    """64 records load ahead; their image bytes together stay under the
    limit (plus the one record written next, which never waits)."""
    src = tmp_path / "f"
    src.mkdir()
    for i in range(24):  # ~200 KiB each: incompressible noise
        (src / f"{i:02d}.png").write_bytes(image_bytes(size=(256, 256), seed=i))
    size = max(p.stat().st_size for p in src.glob("*.png"))
    held, peak, lock = [0], [0], threading.Lock()
    real_load = ingest.load_sample

    def load(rec, *a, **k):
        out = real_load(rec, *a, **k)
        with lock:
            held[0] += len(out["png"])
            peak[0] = max(peak[0], held[0])
        return out

    def written(samples):
        for s in samples:
            yield s
            time.sleep(0.02)  # a slow writer: unbounded loaders would run the whole window ahead of it
            with lock:
                held[0] -= len(s["png"])

    real_write = ingest.write_shards
    monkeypatch.setattr(ingest, "load_sample", load)
    monkeypatch.setattr(ingest, "write_shards", lambda samples, path: real_write(written(samples), path))
    limit = 4 * size
    s = make_shards(str(src), str(tmp_path / "o"), progress=False, workers=8, max_inflight_bytes=limit,
                    samples_per_shard=100)
    assert s.written == 24
    assert peak[0] <= limit + size, (peak[0], limit, size)
