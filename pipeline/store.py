"""The output directory and its commit protocol.

Layout under the output root:

    results/<shard>.<attempt>.<part>.parquet   one or more parts per shard, table
    sources/<shard>.<attempt>.<part>.parquet   and attempt (`attempt` = 12 random
    noise/<shard>.<attempt>.<part>.parquet      hex digits, `part` = 00000, 00001, ...)
    _done/<shard>.<spec hash>.<digest>.json   success marker, written last
    _failed/<shard>.json             why a shard failed (one line)
    _lease.json                      which driver writes this output now
    _index.json                      counts of committed shards (for `imprint status`)
    _tmp/                            staging of local writes (renamed into place)
    _replaced/<spec hash>/           outputs moved aside by `--force`
    job.json, job.resolved.toml

Rules that make it safe on local disks and object stores alike:
- Every part is a complete Parquet file before anything names it: locally it
  is written under `_tmp/` and renamed into place (atomic); on object stores
  it is uploaded in one request (an object appears only when complete).
  Nothing relies on a server-side copy (S3 caps CopyObject at 5 GiB).
- A part holds at most PART_BYTES of rows, so a worker's memory does not grow
  with the shard, and every object stays far below any copy or upload cap.
- Every attempt of a shard writes under its own attempt id, so no attempt
  overwrites or deletes another's files (a timed-out attempt that still
  runs, a retry, a second driver).
- The `_done` marker lists the attempt's files with sizes and SHA-256 and is
  written after all of them. Its name carries the spec hash and a digest of
  the (file, size) list, so which shards are complete is decided from
  directory listings, without opening any marker: a missing, truncated or
  extra part changes the digest and the shard is redone. (Parts named
  `<shard>.<part>.parquet` by earlier versions form one attempt and stay
  committed where their marker lists them.)
- Fail closed: a `job.json`, lease or marker that exists but cannot be read
  or parsed stops a run with one message before anything is deleted.
- One driver writes an output at a time: it holds `_lease.json` (host, pid,
  start time, random id) and refreshes its heartbeat while the job runs; a
  second driver is refused with the holder's identity until the lease is
  LEASE_TTL_S old.
- `sweep` (at the start and the end of a run, under the lease) deletes only
  what is provably a leftover of this spec's failed attempts: staged files,
  parts that no valid marker of any spec lists, and this spec's markers
  whose files are gone or damaged (read first: an unreadable one stops it).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .tables import ROW_GROUP_ROWS, TABLES, table_from_rows

DONE = "_done"
FAILED = "_failed"
STAGING = "_tmp"
REPLACED = "_replaced"
STATS = "_stats"  # per-shard counts (samples, bad samples per error type, edits), written by the driver
SPEC_FILE = "job.resolved.toml"
META_FILE = "job.json"
LEASE_FILE = "_lease.json"
INDEX_FILE = "_index.json"
# A lease not refreshed for this long belongs to a driver that is gone; the
# holder refreshes it every LEASE_TTL_S / 4.
LEASE_TTL_S = float(os.environ.get("IMPRINT_LEASE_TTL_S", "120"))
LEASE_SETTLE_S = 0.2  # between writing the lease and reading it back (see Lease)
PART_BYTES = 64 * 2**20  # rows buffered (all tables together, Arrow bytes) before a part is written
ATTEMPT_HEX = 12
# `<shard>.<attempt>.<part>.parquet`; earlier versions wrote `<shard>.<part>.parquet` (attempt "")
_PART = re.compile(r"^(?P<shard>.+?)(?:\.(?P<attempt>[0-9a-f]{%d}))?\.(?P<part>\d{5})\.parquet$" % ATTEMPT_HEX)


class OutputError(RuntimeError):
    """The output itself is unusable (not writable, another job's); the job stops."""


class OutputUnreadable(OutputError):
    """A file the protocol relies on (job.json, the lease, a marker) exists
    but cannot be read or parsed: nothing is decided from it, nothing deleted."""


class LeaseHeld(OutputError):
    """Another driver holds the output's lease."""


class LeaseLost(OutputError):
    """The lease this writer works under is no longer the output's (another
    run took the output over, e.g. while this driver was stopped past the
    lease's TTL): it must make nothing more visible."""


class OutputWriteError(OSError):
    """Writing one file failed (disk full, permission lost, object-store error);
    the shard being written fails with this one-line reason."""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def part_name(shard: str, part: int, attempt: str = "") -> str:
    return f"{shard}.{attempt}.{part:05d}.parquet" if attempt else f"{shard}.{part:05d}.parquet"


def new_attempt_id() -> str:
    return uuid.uuid4().hex[:ATTEMPT_HEX]


def files_digest(files: list[tuple[str, int]]) -> str:
    """Digest of a shard's (relative path, size) list: the same in the done
    marker's name and when recomputed from a directory listing."""
    blob = json.dumps(sorted([p, int(s)] for p, s in files)).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def marker_name(shard: str, spec_hash: str, digest: str) -> str:
    return f"{shard}.{spec_hash}.{digest}.json"


def parse_marker_name(name: str) -> tuple[str, str, str] | None:
    """(shard, spec hash, digest) of a done marker's file name."""
    parts = name.rsplit(".", 3)
    if len(parts) != 4 or parts[3] != "json":
        return None
    return parts[0], parts[1], parts[2]


@dataclass
class OutputStore:
    fs: pafs.FileSystem
    root: str
    lease: "Lease | None" = None  # held while this process runs a job on the output
    # The id of the lease a job's writes of committed data run under (the
    # driver's, handed to its workers): `check_fence` refuses them once
    # `_lease.json` names another. None: unfenced (tools, tests).
    fence: str | None = None

    @classmethod
    def open(cls, path: str) -> "OutputStore":
        """Local paths, pyarrow's own URIs (s3://, gs://, hdfs://, file://),
        and any other fsspec URL (through pyarrow's fsspec adapter)."""
        if "://" not in path:
            return cls(pafs.LocalFileSystem(), os.path.abspath(path).rstrip("/"))
        try:
            fs, root = pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, ValueError):
            import fsspec

            ffs, root = fsspec.core.url_to_fs(path)
            fs = pafs.PyFileSystem(pafs.FSSpecHandler(ffs))
        return cls(fs, root.rstrip("/") or "/")

    def _p(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url(self, rel: str) -> str:
        """A path or URL readers outside pyarrow (DuckDB, polars) can open."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            return self._p(rel)
        return f"{self.fs.type_name}://{self._p(rel)}" if self.fs.type_name in ("s3", "gcs", "hdfs") else self._p(rel)

    @property
    def renames_atomically(self) -> bool:
        """Local disks (and HDFS) rename atomically: stage, then rename. Object
        stores have no rename (a move is copy + delete); their uploads are
        atomic instead, so files go straight to their final key."""
        return self.fs.type_name in ("local", "hdfs")

    # -- job level ---------------------------------------------------------

    def prepare(self, spec_toml: str, spec_hash: str, force: bool = False) -> None:
        """Create the layout, prove it is writable, take the output's lease,
        refuse to mix specs (or, with `force`, move the previous spec's
        outputs aside), and sweep what failed attempts left behind. Refuses
        (OutputUnreadable) before deleting anything when job.json, the lease
        or a marker it would act on exists but cannot be read."""
        try:
            if self.renames_atomically:  # object stores need no folders (pyarrow would add marker objects)
                for d in ("", *TABLES, DONE, FAILED, STATS):
                    self.fs.create_dir(self._p(d) if d else self.root, recursive=True)
            self.check_writable()
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"output.path {self.root!r} is not writable: {one_line(exc)}") from None
        old_hash = self.current_hash()  # OutputUnreadable when job.json is there but unreadable
        try:
            if old_hash is None:
                # no job.json: valid markers of another spec still make this another job's output
                others = sorted({h for (_, h) in self._valid_markers(self._listing()) if h != spec_hash})
                old_hash = others[0] if others else None
            if old_hash and old_hash != spec_hash and not force:
                raise OutputError(
                    f"output.path {self.root!r} holds results of another job spec (hash {old_hash}, "
                    f"this one {spec_hash}); use a new output path, or --force to move them aside and redo every shard")
            self.prepare_lease()
            if force:
                self.move_aside(old_hash or spec_hash)
            self.sweep(spec_hash)
            self.write_bytes(SPEC_FILE, spec_toml.encode())
            self.write_json(META_FILE, {"spec_hash": spec_hash, "updated": time.time()})
        except OutputError:
            self.release()
            raise
        except (OSError, pa.ArrowException) as exc:
            self.release()
            raise OutputError(f"output.path {self.root!r}: {one_line(exc)}") from None

    def prepare_lease(self) -> None:
        """Take the output's lease (LeaseHeld when another driver holds it)."""
        if self.lease is None:
            lease = Lease(self)
            lease.acquire()
            self.lease = lease
            self.fence = lease.id  # this store's commits run under it (see check_fence)

    def release(self) -> None:
        """Stop the lease's heartbeat and give the lease up."""
        if self.lease is not None:
            if self.fence == self.lease.id:
                self.fence = None
            self.lease.release()
            self.lease = None

    def finish(self, spec_hash: str) -> dict[str, int] | None:
        """End of a job: remove the parts of shards without a valid marker
        (so the table folders hold committed rows only) and refresh the
        counts index. Only while this driver still holds the lease; None
        when it does not (nothing deleted)."""
        if self.lease is None or not self.lease.still_ours():
            return None
        swept = self.sweep(spec_hash)
        self.update_index(spec_hash)
        return swept

    def check_fence(self) -> None:
        """Before making a shard's data visible (a part, its marker, the
        driver's accounting of it): LeaseLost when the output's lease is no
        longer `fence`. A lease that cannot be read is no proof either way:
        OutputWriteError, so that attempt fails like any failed write and
        is retried. There is no conditional write on object stores, so a
        takeover between this read and the write can still land one file;
        the check makes a driver resumed after losing its lease stop at its
        next part instead of committing its shards."""
        if self.fence is None:
            return
        try:
            rec = self.load_json(LEASE_FILE)
        except OutputUnreadable as exc:
            raise OutputWriteError(f"cannot check the output's lease: {exc}") from None
        if rec is None or rec.get("id") != self.fence:
            who = f"host {rec.get('host')} pid {rec.get('pid')}, lease {rec.get('id')}" if rec else "nobody"
            raise LeaseLost(f"output.path {self.root!r}: this run's lease {self.fence} is no longer the output's "
                            f"(now held by {who}); another run took the output over, so this one commits nothing more")

    def check_writable(self) -> None:
        # Locally under _tmp/ (swept); on an object store at the root: pyarrow
        # leaves an empty folder marker where it deletes a folder's last object.
        probe = f"{STAGING + '/' if self.renames_atomically else '.'}write-test-{uuid.uuid4().hex}"
        self.write_bytes(probe, b"ok")
        self.delete(probe)

    def move_aside(self, old_hash: str) -> str | None:
        """`--force`: every table file and marker goes under
        `_replaced/<old hash>/` (a second time: `<old hash>.2`, ...), so the
        tables never mix specs. Parts are capped at PART_BYTES, so an object
        store's copy-based move stays far below its copy limit."""
        # markers first: from the first move on, no shard of the old spec counts as done
        entries = [(d, i) for d in (DONE, FAILED, *TABLES) for i in self._list(d, strict=True)]
        if not entries:
            return None
        dest, n = f"{REPLACED}/{old_hash}", 1
        while self._list(dest, recursive=True, strict=True):
            n += 1
            dest = f"{REPLACED}/{old_hash}.{n}"
        for d, info in entries:
            if self.renames_atomically:
                self.fs.create_dir(self._p(dest, d), recursive=True)
            self.fs.move(info.path, self._p(dest, d, info.base_name))
        return dest

    def sweep(self, spec_hash: str) -> dict[str, int]:
        """Remove what failed attempts of this spec left: staged files, this
        spec's markers whose files are gone or damaged (or a second commit of
        a shard), and parts that no valid marker of any spec lists. Every
        marker it would delete is read first: one that cannot be read stops
        the sweep (OutputUnreadable) before anything is deleted. Call it only
        while holding the lease: then no attempt is writing."""
        swept = {"staged": 0, "parts": 0, "markers": 0}
        listing = self._listing()
        valid = self._valid_markers(listing)  # (shard, spec) -> [(marker, attempt)], sorted
        keep = {key: found[0] for key, found in valid.items()}
        drop = [info for info in listing.markers if (lambda p: p[1] == spec_hash and
                keep.get((p[0], p[1]), ("",))[0] != info.base_name)(parse_marker_name(info.base_name))]
        for info in drop:  # proof first: each is a marker of this spec, readable
            rec = self.load_json(f"{DONE}/{info.base_name}")
            if rec is None:
                continue  # gone meanwhile
            if rec.get("spec_hash") != spec_hash:
                raise OutputUnreadable(f"output.path {self.root!r}: marker {DONE}/{info.base_name} names spec "
                                       f"{spec_hash} but holds {rec.get('spec_hash')!r}; nothing was deleted")
        for info in self._list(STAGING, recursive=True, strict=True):
            if info.type == pafs.FileType.File:
                self.delete_path(info.path, strict=True)
                swept["staged"] += 1
        for info in drop:
            self.delete_path(info.path, strict=True)
            swept["markers"] += 1
        committed = {rel for (shard, _), (_, attempt) in keep.items()
                     for rel, _ in listing.groups().get(shard, {}).get(attempt, [])}
        for name, infos in listing.tables.items():
            for info in infos:
                if info.base_name.startswith(".tmp-") or (_PART.match(info.base_name)
                                                          and f"{name}/{info.base_name}" not in committed):
                    self.delete_path(info.path, strict=True)
                    swept["parts"] += 1
        return swept

    # -- which shards are done ------------------------------------------------

    def done_shards(self, spec_hash: str) -> set[str]:
        """Shard names complete under `spec_hash`, decided from one listing of
        `_done/` and one of each table folder (no marker is opened)."""
        return set(self._valid(self._listing(), spec_hash))

    def _listing(self) -> "_Listing":
        """Listings of `_done/` and the table folders. Raises OutputUnreadable
        when a listing fails or `_done/` holds something that is not a marker
        (a folder, a name that does not parse): nothing is decided from half
        a picture."""
        markers = self._list(DONE, strict=True, files_only=False)
        for info in markers:
            if info.type != pafs.FileType.File or parse_marker_name(info.base_name) is None:
                raise OutputUnreadable(f"output.path {self.root!r}: {DONE}/{info.base_name} is not a done marker "
                                       f"(a file named <shard>.<spec hash>.<digest>.json); move it away")
        return _Listing(markers=markers, tables={name: self._list(name, strict=True) for name in TABLES})

    def _valid_markers(self, listing: "_Listing") -> dict[tuple[str, str], list[tuple[str, str]]]:
        """(shard, spec hash) -> [(marker name, attempt)] of the markers whose
        digest matches one attempt's files as listed, oldest first (the first
        one counts when two attempts committed: a commit reported as failed
        after it landed, then retried)."""
        digests = {shard: {files_digest(files): attempt for attempt, files in attempts.items()}
                   for shard, attempts in listing.groups().items()}
        out: dict[tuple[str, str], list[tuple[int, str, str]]] = {}
        for info in listing.markers:
            shard, h, digest = parse_marker_name(info.base_name)
            attempt = digests.get(shard, {}).get(digest)
            if attempt is not None:
                out.setdefault((shard, h), []).append((info.mtime_ns or 0, info.base_name, attempt))
        # the earliest commit counts: a reader that saw it keeps seeing it
        return {k: [(name, attempt) for _, name, attempt in sorted(v)] for k, v in out.items()}

    def _valid(self, listing: "_Listing", spec_hash: str) -> dict[str, str]:
        """shard -> its valid marker's file name."""
        return {shard: found[0][0] for (shard, h), found in self._valid_markers(listing).items() if h == spec_hash}

    def _committed_files(self, listing: "_Listing", spec_hash: str) -> dict[str, list[tuple[str, int]]]:
        """shard -> the (rel path, size) list its valid marker commits."""
        groups = listing.groups()
        return {shard: groups[shard][found[0][1]] for (shard, h), found in self._valid_markers(listing).items()
                if h == spec_hash}

    def is_done(self, shard: str, spec_hash: str) -> bool:
        return shard in self.done_shards(spec_hash)

    def current_hash(self) -> str | None:
        """The spec hash in job.json; None when there is no job.json;
        OutputUnreadable when there is one that cannot be read or parsed."""
        meta = self.load_json(META_FILE)
        if meta is None:
            return None
        if not isinstance(meta.get("spec_hash"), str) or not meta["spec_hash"]:
            raise OutputUnreadable(f"output.path {self.root!r}: {META_FILE} has no spec_hash; nothing was "
                                   "changed (restore it, or use a new output path)")
        return meta["spec_hash"]

    def done_markers(self, spec_hash: str | None = None) -> dict[str, dict]:
        """shard -> marker contents, for the valid markers under `spec_hash`
        (default: the output's current spec). Opens every marker."""
        spec_hash = spec_hash or self.current_hash()
        if not spec_hash:
            return {}
        valid = self._valid(self._listing(), spec_hash)
        return {shard: self.read_json(f"{DONE}/{name}") or {} for shard, name in valid.items()}

    # -- counts without opening every marker ------------------------------------

    def update_index(self, spec_hash: str) -> dict[str, dict]:
        """Refresh `_index.json` (valid marker name -> its counts): only the
        markers committed since the last refresh are opened. Best effort."""
        counts = self.shard_counts(spec_hash)
        try:
            self.write_json(INDEX_FILE, {"spec_hash": spec_hash, "markers": {v["marker"]: v for v in counts.values()}})
        except OutputWriteError:
            pass
        return counts

    def shard_counts(self, spec_hash: str) -> dict[str, dict]:
        """shard -> {marker, images, errors, edits, kept, error_types} of the
        valid markers: from listings and the index; a marker the index does
        not hold yet is opened (one committed after the last run ended)."""
        index = self.read_json(INDEX_FILE) or {}
        known = index.get("markers", {}) if index.get("spec_hash") == spec_hash else {}
        out = {}
        for shard, name in self._valid(self._listing(), spec_hash).items():
            rec = known.get(name)
            if rec is None:
                m = self.read_json(f"{DONE}/{name}")
                if m is None:
                    rec = {"unreadable": True}
                else:
                    rec = {k: m.get(k, 0) for k in ("images", "errors", "edits", "kept")}
                    rec["error_types"] = m.get("error_types") or {}
            out[shard] = {**rec, "marker": name}
        return out

    # -- verify ---------------------------------------------------------------

    def verify(self, spec_hash: str) -> dict[str, str]:
        """Read every committed file back and check it against the size and
        SHA-256 its marker recorded; also report this spec's markers whose
        files changed since the commit (already redone by the next run).
        Returns shard -> what is wrong, for the bad ones."""
        listing = self._listing()
        valid = self._valid(listing, spec_hash)
        sizes = {f"{name}/{i.base_name}": i.size for name, infos in listing.tables.items() for i in infos}
        bad: dict[str, str] = {}
        for info in listing.markers:
            shard, h, _ = parse_marker_name(info.base_name)
            if h != spec_hash or (shard in valid and valid[shard] != info.base_name):
                continue
            try:
                rec = self.load_json(f"{DONE}/{info.base_name}")
            except OutputUnreadable as exc:
                bad[shard] = f"marker unreadable: {exc}"
                continue
            files = (rec or {}).get("files")
            if not isinstance(files, list) or not files:
                bad[shard] = f"marker {DONE}/{info.base_name} lists no files"
                continue
            problems = []
            for f in files:
                path, size, sha = f.get("path"), f.get("size"), f.get("sha256")
                if path not in sizes:
                    problems.append(f"{path}: missing")
                    continue
                if sizes[path] != size:
                    problems.append(f"{path}: {sizes[path]} bytes, committed {size} (truncated or replaced)")
                    continue
                try:
                    digest = self.sha256(path)
                except (OSError, pa.ArrowException) as exc:
                    problems.append(f"{path}: unreadable ({one_line(exc)})")
                    continue
                if sha is None:
                    continue  # committed by a version that recorded no checksum: size checked only
                if digest != sha:
                    problems.append(f"{path}: SHA-256 {digest[:12]}..., committed {sha[:12]}... (bit flip)")
            if problems:
                bad[shard] = "; ".join(problems)
        return bad

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(self._p(rel), buffer_size=READ_BUFFER) as fh:
            while chunk := fh.read(READ_BUFFER):
                h.update(chunk)
        return h.hexdigest()

    def mark_for_rerun(self, bad: dict[str, str], spec_hash: str) -> None:
        """Bad shards found by `verify`: their marker goes (a `_failed/`
        record says why), so the next run redoes them and its sweep removes
        their parts. Needs the lease."""
        listing = self._listing()
        for info in listing.markers:
            shard, h, _ = parse_marker_name(info.base_name)
            if h == spec_hash and shard in bad:
                self.mark_failed(shard, {"shard": shard, "error": f"imprint verify: {bad[shard]}", "time": time.time()})
                self.delete_path(info.path, strict=True)

    # -- writing a shard -------------------------------------------------------

    def shard_writer(self, shard: str, tables: list[str], metadata: dict[str, str]) -> "ShardWriter":
        return ShardWriter(self, shard, tables, metadata)

    def mark_failed(self, shard: str, info: dict) -> bool:
        """Record a failed shard (one-line reason). False when even that
        cannot be written: the output itself is unusable."""
        info = {**info, "error": one_line(info.get("error", ""))}
        try:
            self.write_json(f"{FAILED}/{shard}.json", info)
            return True
        except (OSError, pa.ArrowException):
            return False

    def markers(self, kind: str) -> dict[str, dict]:
        """shard -> contents of every marker of a kind (`_done` markers of any
        spec and validity; see `done_markers` for the valid ones)."""
        out = {}
        for info in self._list(kind):
            name = info.base_name
            if not name.endswith(".json") or name.startswith("."):
                continue
            shard = (parse_marker_name(name) or (name[:-5],))[0] if kind == DONE else name[:-5]
            out[shard] = self.read_json(f"{kind}/{name}") or {}
        return out

    # -- reading ---------------------------------------------------------------

    def all_table_files(self, name: str) -> list[str]:
        """Every complete part file of a table, committed or not."""
        return sorted(i.path for i in self._list(name) if _PART.match(i.base_name) or (
            i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_"))))

    def table_files(self, name: str) -> list[str]:
        """Part files of committed shards only (what a reader should use while
        a job may still be running). A folder that is not an imprint output
        (no job.json) gives all its Parquet files."""
        spec_hash = self.current_hash()
        if not spec_hash:
            return self.all_table_files(name)
        committed = self._committed_files(self._listing(), spec_hash)
        prefix = f"{name}/"
        return sorted(self._p(rel) for shard in sorted(committed) for rel, _ in committed[shard]
                      if rel.startswith(prefix))

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """The committed rows of a table (shards with a valid marker)."""
        files = self.table_files(name)
        if not files:
            schema = TABLES[name]
            return schema.empty_table() if columns is None else pa.schema([schema.field(c) for c in columns]).empty_table()
        return pa.concat_tables([pq.read_table(f, filesystem=self.fs, columns=columns) for f in files],
                                promote_options="default")

    # -- small files ----------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes | pa.Buffer) -> None:
        """Write one complete file: staged and renamed where renames are
        atomic, uploaded in one request on object stores."""
        from .objects import write_whole  # whole or not at all: staged under _tmp/ (swept), or an aborted upload

        final = self._p(rel)
        try:
            if self.renames_atomically:
                self.fs.create_dir(self._p(STAGING), recursive=True)
                self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
            write_whole(self.fs, final, lambda fh: fh.write(data), tmp=self._p(STAGING, uuid.uuid4().hex))
        except (OSError, pa.ArrowException) as exc:
            raise OutputWriteError(f"cannot write {final}: {one_line(exc)}") from exc

    def write_json(self, rel: str, obj: dict) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def read_text(self, rel: str) -> str | None:
        """Lenient: None when absent or unreadable (reports, status details)."""
        try:
            with self.fs.open_input_stream(self._p(rel)) as fh:
                return fh.read().decode()
        except (FileNotFoundError, OSError, pa.ArrowException, UnicodeDecodeError):
            return None

    def read_json(self, rel: str) -> dict | None:
        """Lenient: None when absent, unreadable or not JSON."""
        text = self.read_text(rel)
        try:
            obj = json.loads(text) if text is not None else None
        except json.JSONDecodeError:
            return None
        return obj if isinstance(obj, dict) else None

    def load_json(self, rel: str) -> dict | None:
        """Strict: None only when the file does not exist; OutputUnreadable
        when it exists but cannot be read or is not a JSON object."""
        what = f"output.path {self.root!r}: {rel} exists but cannot be read"
        try:
            info = self.fs.get_file_info(self._p(rel))
            if info.type == pafs.FileType.NotFound:
                return None
            if info.type != pafs.FileType.File:
                raise OutputUnreadable(f"{what} (it is not a file); nothing was changed")
            with self.fs.open_input_stream(self._p(rel)) as fh:
                obj = json.loads(fh.read().decode())
        except OutputUnreadable:
            raise
        except (OSError, pa.ArrowException, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise OutputUnreadable(f"{what} ({type(exc).__name__}: {one_line(exc)}); nothing was changed") from None
        if not isinstance(obj, dict):
            raise OutputUnreadable(f"{what} (not a JSON object); nothing was changed")
        return obj

    def delete(self, rel: str) -> None:
        self.delete_path(self._p(rel))

    def delete_path(self, path: str, strict: bool = False) -> None:
        """Lenient by default (best-effort cleanup); `strict` raises on
        anything but "already gone"."""
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass
        except (OSError, pa.ArrowException):
            if strict:
                raise

    def exists(self, rel: str) -> bool:
        try:
            return self.fs.get_file_info(self._p(rel)).type == pafs.FileType.File
        except (OSError, pa.ArrowException):
            return False

    def _list(self, rel: str, recursive: bool = False, strict: bool = False,
              files_only: bool = True) -> list[pafs.FileInfo]:
        """A folder's entries. Lenient (empty on errors) unless `strict`,
        where a failed listing raises OutputUnreadable."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self._p(rel), allow_not_found=True, recursive=recursive))
        except (OSError, pa.ArrowException) as exc:
            if strict:
                raise OutputUnreadable(f"output.path {self.root!r}: cannot list {rel or '.'}/ "
                                       f"({one_line(exc)}); nothing was changed") from None
            return []
        return [i for i in infos if i.type == pafs.FileType.File or recursive or not files_only]


READ_BUFFER = 8 * 2**20  # read-ahead of committed files and of object-store input shards


@dataclass
class Lease:
    """Which driver writes an output: `_lease.json` holds its identity (host,
    pid, start time, a random id) and a heartbeat that a thread refreshes
    every ttl/4 while the job runs. Object stores (as pyarrow reaches them)
    have no create-if-absent, so `acquire` writes, waits, and reads back: of
    two drivers racing, the one whose write landed last keeps the lease, and
    the other's heartbeat finds the lease taken (it then deletes nothing).
    A lease of a process on this host that no longer exists is taken over
    at once."""

    store: OutputStore
    ttl_s: float = field(default_factory=lambda: LEASE_TTL_S)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started: float = field(default_factory=time.time)
    lost: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def record(self) -> dict:
        return {"id": self.id, "host": self.host, "pid": self.pid, "started": self.started,
                "heartbeat": time.time(), "ttl_s": self.ttl_s}

    def holder(self) -> dict | None:
        rec = self.store.load_json(LEASE_FILE)
        if rec is not None and not (isinstance(rec.get("id"), str) and isinstance(rec.get("heartbeat"), (int, float))):
            raise OutputUnreadable(f"output.path {self.store.root!r}: {LEASE_FILE} is not a lease "
                                   "(no id or heartbeat); nothing was changed")
        return rec

    def acquire(self, settle_s: float | None = None) -> None:
        settle_s = LEASE_SETTLE_S if settle_s is None else settle_s
        rec = self.holder()
        if rec is not None and rec["id"] != self.id:
            age = time.time() - rec["heartbeat"]
            ttl = float(rec.get("ttl_s") or LEASE_TTL_S)
            if age < ttl and not _gone(rec):
                raise LeaseHeld(self._held_message(rec, age, ttl))
        try:
            self.store.write_json(LEASE_FILE, self.record())
            if settle_s:
                time.sleep(settle_s + random.random() * settle_s)
            rec = self.holder()
        except BaseException:
            self.release()  # ours, if the write landed and it can be read back
            raise
        if rec is None or rec["id"] != self.id:
            raise LeaseHeld(self._held_message(rec or {}, 0.0, self.ttl_s))
        self._thread = threading.Thread(target=self._beat, daemon=True, name="imprint-lease")
        self._thread.start()

    def _held_message(self, rec: dict, age: float, ttl: float) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(rec.get("started") or 0))
        return (f"output.path {self.store.root!r} is being written by another driver (host {rec.get('host')}, "
                f"pid {rec.get('pid')}, started {since}, lease {rec.get('id')}; last heartbeat {age:.0f} s ago). "
                f"Stop that job, or wait: the lease is taken over {max(0.0, ttl - age):.0f} s after its last "
                "heartbeat if it is not refreshed")

    def _beat(self) -> None:
        """Refresh the heartbeat every ttl/4. A failed read or write (a
        transient object-store error) is logged and retried at the next beat:
        the lease only lapses after four failed beats in a row."""
        while not self._stop.wait(self.ttl_s / 4):
            try:
                rec = self.holder()
            except OutputError as exc:
                self._log_failed_beat(exc)
                continue
            if rec is None or rec["id"] != self.id:
                self.lost = f"lease taken over by host {(rec or {}).get('host')} pid {(rec or {}).get('pid')}"
                return
            try:
                self.store.write_json(LEASE_FILE, self.record())
            except OutputWriteError as exc:
                self._log_failed_beat(exc)

    def _log_failed_beat(self, exc: Exception) -> None:
        import sys

        print(f"[imprint] could not refresh the output's lease ({one_line(exc)}); trying again in "
              f"{self.ttl_s / 4:.0f} s", file=sys.stderr, flush=True)

    def still_ours(self) -> bool:
        if self.lost:
            return False
        try:
            rec = self.holder()
        except OutputError:
            return False
        return rec is not None and rec["id"] == self.id

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.still_ours():
            self.store.delete(LEASE_FILE)


def _gone(rec: dict) -> bool:
    """A lease of a driver on this host whose process has exited (a crash,
    a kill -9): taken over at once instead of after its TTL."""
    if rec.get("host") != socket.gethostname() or not isinstance(rec.get("pid"), int):
        return False
    try:
        os.kill(rec["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


@dataclass
class _Listing:
    markers: list[pafs.FileInfo]
    tables: dict[str, list[pafs.FileInfo]]

    def shard_files(self) -> dict[str, list[tuple[str, int]]]:
        """shard -> every part listed for it, all attempts together."""
        return {shard: [f for files in attempts.values() for f in files] for shard, attempts in self.groups().items()}

    def groups(self) -> dict[str, dict[str, list[tuple[str, int]]]]:
        """shard -> attempt -> its (rel path, size) list across the tables."""
        out: dict[str, dict[str, list[tuple[str, int]]]] = {}
        for name, infos in self.tables.items():
            for info in infos:
                m = _PART.match(info.base_name)
                if m:
                    out.setdefault(m["shard"], {}).setdefault(m["attempt"] or "", []).append(
                        (f"{name}/{info.base_name}", info.size))
        return out


def encode_part(table: str, batches: list[pa.Table], metadata: dict[str, str]) -> pa.Buffer:
    """One part file's bytes: the batches as one zstd Parquet file (an empty
    one with the table's schema when there are none)."""
    data = pa.concat_tables(batches) if batches else table_from_rows(table, [], metadata)
    sink = pa.BufferOutputStream()
    pq.write_table(data, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS[table])
    return sink.getvalue()  # a pyarrow Buffer: no second copy of the part


@dataclass
class ShardWriter:
    """Streams one attempt's rows into part files as they come: rows are
    buffered per table as Arrow batches and written as a complete part when
    PART_BYTES is reached, and `commit` writes the rest and then the marker.
    Every file name carries the attempt id, so another attempt of the same
    shard can neither overwrite nor delete them. Used from one thread (the
    worker's writer thread)."""

    store: OutputStore
    shard: str
    tables: list[str]
    metadata: dict[str, str]
    part_bytes: int = PART_BYTES
    attempt: str = field(default_factory=new_attempt_id)
    files: list[dict] = field(default_factory=list)  # {path, size, sha256} written so far
    _buffers: dict = field(default_factory=dict)
    _parts: dict = field(default_factory=dict)

    def add(self, table: str, rows: list[dict]) -> None:
        if not rows:
            return
        self._buffers.setdefault(table, []).append(table_from_rows(table, rows, self.metadata))
        # One budget for all tables: the worker holds at most PART_BYTES of rows.
        while sum(b.nbytes for bufs in self._buffers.values() for b in bufs) >= self.part_bytes:
            self.flush(max(self._buffers, key=lambda t: sum(b.nbytes for b in self._buffers[t])))

    def flush(self, table: str) -> None:
        blob = encode_part(table, self._buffers.pop(table, []), self.metadata)
        part = self._parts.get(table, 0)
        rel = f"{table}/{part_name(self.shard, part, self.attempt)}"
        self.store.check_fence()
        self._parts[table] = part + 1
        # listed before the write: a write that fails after its bytes landed is still ours to delete
        self.files.append({"path": rel, "size": blob.size, "sha256": hashlib.sha256(blob).hexdigest()})
        self.store.write_bytes(rel, blob)

    def commit(self, marker: dict, spec_hash: str) -> str:
        """Write the buffered rows (an empty part for a table with no rows,
        so every shard has each table), then the marker: last. Returns the
        marker's name."""
        for table in self.tables:
            if table in self._buffers or table not in self._parts:
                self.flush(table)
        digest = files_digest([(f["path"], f["size"]) for f in self.files])
        self.store.check_fence()  # the marker makes the shard count: only under this run's lease
        self.store.delete(f"{FAILED}/{self.shard}.json")
        name = marker_name(self.shard, spec_hash, digest)
        try:
            self.store.write_json(f"{DONE}/{name}",
                                  {**marker, "spec_hash": spec_hash, "attempt": self.attempt, "files": self.files})
        except OutputWriteError:
            if not self.store.exists(f"{DONE}/{name}"):  # an error after the marker landed is a commit
                raise
        return name

    def abort(self) -> None:
        """A failed attempt: forget buffered rows and delete the parts it
        wrote (its own names only), so it leaves nothing under the tables."""
        self._buffers.clear()
        for f in self.files:
            self.store.delete(f["path"])
        self.files.clear()


def read_table(out: str, table: str = "results", columns: list[str] | None = None) -> pa.Table:
    """The committed rows of one table of a job's output (local path or
    URL), safe to call while the job is still running."""
    return OutputStore.open(out).read_table(table, columns=columns)


def committed_files(out: str, table: str = "results") -> list[str]:
    """Paths/URLs of the committed part files of a table, for DuckDB or
    polars: `duckdb.read_parquet(committed_files(out))`."""
    store = OutputStore.open(out)
    return [store.url(p[len(store.root) + 1:]) for p in store.table_files(table)]
