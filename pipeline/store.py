"""The output directory and its commit protocol.

Layout under the output root:

    results/<shard>.<part>.parquet   one or more parts per shard and table
    sources/<shard>.<part>.parquet   (`part` = 00000, 00001, ...: deterministic,
    noise/<shard>.<part>.parquet      so a rerun overwrites instead of duplicating)
    _done/<shard>.<spec hash>.<digest>.json   success marker, written last
    _failed/<shard>.json             why a shard failed (one line)
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
- The `_done` marker lists the shard's files with sizes and SHA-256 and is
  written after all of them. Its name carries the spec hash and a digest of
  the (file, size) list, so `done_shards` decides which shards are complete
  from three or four directory listings, without opening any marker: a
  missing, truncated or extra part changes the digest and the shard is redone.
- `prepare` sweeps what crashed attempts left: staged files, parts of shards
  without a valid marker, markers whose files are gone or damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
PART_BYTES = 64 * 2**20  # rows buffered (all tables together, Arrow bytes) before a part is written
_PART = re.compile(r"^(?P<shard>.+)\.(?P<part>\d{5})\.parquet$")


class OutputError(RuntimeError):
    """The output itself is unusable (not writable, another job's); the job stops."""


class OutputWriteError(OSError):
    """Writing one file failed (disk full, permission lost, object-store error);
    the shard being written fails with this one-line reason."""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def part_name(shard: str, part: int) -> str:
    return f"{shard}.{part:05d}.parquet"


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
        """Create the layout, prove it is writable, refuse to mix specs (or,
        with `force`, move the previous spec's outputs aside), and sweep what
        crashed attempts left behind."""
        try:
            if self.renames_atomically:  # object stores need no folders (pyarrow would add marker objects)
                for d in ("", *TABLES, DONE, FAILED, STATS):
                    self.fs.create_dir(self._p(d) if d else self.root, recursive=True)
            self.check_writable()
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"output.path {self.root!r} is not writable: {one_line(exc)}") from None
        meta = self.read_json(META_FILE)
        old_hash = (meta or {}).get("spec_hash")
        if old_hash and old_hash != spec_hash and not force:
            raise OutputError(
                f"output.path {self.root!r} holds results of another job spec (hash {old_hash}, "
                f"this one {spec_hash}); use a new output path, or --force to move them aside and redo every shard"
            )
        try:
            if force:
                self.move_aside(old_hash or spec_hash)
            self.sweep(spec_hash)
            self.write_bytes(SPEC_FILE, spec_toml.encode())
            self.write_json(META_FILE, {"spec_hash": spec_hash, "updated": time.time()})
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"output.path {self.root!r}: {one_line(exc)}") from None

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
        entries = [(d, i) for d in (DONE, FAILED, *TABLES) for i in self._list(d)]
        if not entries:
            return None
        dest, n = f"{REPLACED}/{old_hash}", 1
        while self._list(dest, recursive=True):
            n += 1
            dest = f"{REPLACED}/{old_hash}.{n}"
        for d, info in entries:
            if self.renames_atomically:
                self.fs.create_dir(self._p(dest, d), recursive=True)
            self.fs.move(info.path, self._p(dest, d, info.base_name))
        return dest

    def sweep(self, spec_hash: str) -> dict[str, int]:
        """Remove what crashed or failed attempts left: staged files, parts
        of shards that have no valid marker, and invalid markers."""
        swept = {"staged": 0, "parts": 0, "markers": 0}
        for info in self._list(STAGING, recursive=True):
            if info.type == pafs.FileType.File:
                self.delete_path(info.path)
                swept["staged"] += 1
        listing = self._listing()
        done = self._valid(listing, spec_hash)
        for name, infos in listing.tables.items():
            for info in infos:
                m = _PART.match(info.base_name)
                if info.base_name.startswith(".tmp-") or (m and m["shard"] not in done):
                    self.delete_path(info.path)
                    swept["parts"] += 1
        for info in listing.markers:
            parsed = parse_marker_name(info.base_name)
            if parsed and done.get(parsed[0]) != info.base_name:
                self.delete_path(info.path)
                swept["markers"] += 1
        return swept

    # -- which shards are done ------------------------------------------------

    def done_shards(self, spec_hash: str) -> set[str]:
        """Shard names complete under `spec_hash`, decided from one listing of
        `_done/` and one of each table folder (no marker is opened)."""
        return set(self._valid(self._listing(), spec_hash))

    def _listing(self) -> "_Listing":
        return _Listing(markers=self._list(DONE), tables={name: self._list(name) for name in TABLES})

    def _valid(self, listing: "_Listing", spec_hash: str) -> dict[str, str]:
        """shard -> its valid marker's file name."""
        files = listing.shard_files()
        valid = {}
        for info in listing.markers:
            parsed = parse_marker_name(info.base_name)
            if parsed is None:
                continue
            shard, h, digest = parsed
            if h == spec_hash and shard in files and files_digest(files[shard]) == digest:
                valid[shard] = info.base_name
        return valid

    def is_done(self, shard: str, spec_hash: str) -> bool:
        return shard in self.done_shards(spec_hash)

    def current_hash(self) -> str | None:
        return (self.read_json(META_FILE) or {}).get("spec_hash")

    def done_markers(self, spec_hash: str | None = None) -> dict[str, dict]:
        """shard -> marker contents, for the valid markers under `spec_hash`
        (default: the output's current spec)."""
        spec_hash = spec_hash or self.current_hash()
        if not spec_hash:
            return {}
        valid = self._valid(self._listing(), spec_hash)
        return {shard: self.read_json(f"{DONE}/{name}") or {} for shard, name in valid.items()}

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
        listing = self._listing()
        done = self._valid(listing, spec_hash)
        prefix = f"{name}/"
        return sorted(self._p(rel) for shard in sorted(done) for rel, _ in listing.shard_files()[shard]
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
        final = self._p(rel)
        try:
            if self.renames_atomically:
                tmp = self._p(STAGING, uuid.uuid4().hex)
                self.fs.create_dir(self._p(STAGING), recursive=True)
                self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
                try:
                    with self.fs.open_output_stream(tmp) as fh:
                        fh.write(data)
                    self.fs.move(tmp, final)
                except BaseException:
                    self.delete_path(tmp)
                    raise
            else:
                with self.fs.open_output_stream(final) as fh:
                    fh.write(data)
        except (OSError, pa.ArrowException) as exc:
            raise OutputWriteError(f"cannot write {final}: {one_line(exc)}") from exc

    def write_json(self, rel: str, obj: dict) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def read_text(self, rel: str) -> str | None:
        try:
            with self.fs.open_input_stream(self._p(rel)) as fh:
                return fh.read().decode()
        except (FileNotFoundError, OSError, pa.ArrowException, UnicodeDecodeError):
            return None

    def read_json(self, rel: str) -> dict | None:
        text = self.read_text(rel)
        try:
            return json.loads(text) if text is not None else None
        except json.JSONDecodeError:
            return None

    def delete(self, rel: str) -> None:
        self.delete_path(self._p(rel))

    def delete_path(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except (FileNotFoundError, OSError, pa.ArrowException):
            pass

    def exists(self, rel: str) -> bool:
        try:
            return self.fs.get_file_info(self._p(rel)).type == pafs.FileType.File
        except (OSError, pa.ArrowException):
            return False

    def _list(self, rel: str, recursive: bool = False) -> list[pafs.FileInfo]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self._p(rel), allow_not_found=True, recursive=recursive))
        except (OSError, pa.ArrowException):
            return []
        return [i for i in infos if i.type == pafs.FileType.File or recursive]


@dataclass
class _Listing:
    markers: list[pafs.FileInfo]
    tables: dict[str, list[pafs.FileInfo]]

    def shard_files(self) -> dict[str, list[tuple[str, int]]]:
        out: dict[str, list[tuple[str, int]]] = {}
        for name, infos in self.tables.items():
            for info in infos:
                m = _PART.match(info.base_name)
                if m:
                    out.setdefault(m["shard"], []).append((f"{name}/{info.base_name}", info.size))
        return out


@dataclass
class ShardWriter:
    """Streams one shard's rows into part files as they come: rows are
    buffered per table as Arrow batches and written as a complete part when
    PART_BYTES is reached, and `commit` writes the rest and then the marker.
    Used from one thread (the worker's writer thread)."""

    store: OutputStore
    shard: str
    tables: list[str]
    metadata: dict[str, str]
    part_bytes: int = PART_BYTES
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
        batches = self._buffers.pop(table, [])
        data = pa.concat_tables(batches) if batches else table_from_rows(table, [], self.metadata)
        sink = pa.BufferOutputStream()
        pq.write_table(data, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS[table])
        del data, batches
        blob = sink.getvalue()  # a pyarrow Buffer: no second copy of the part
        part = self._parts.get(table, 0)
        rel = f"{table}/{part_name(self.shard, part)}"
        self.store.write_bytes(rel, blob)
        self._parts[table] = part + 1
        self.files.append({"path": rel, "size": blob.size, "sha256": hashlib.sha256(blob).hexdigest()})

    def commit(self, marker: dict, spec_hash: str) -> None:
        """Write the buffered rows (an empty part for a table with no rows,
        so every shard has each table), drop stale parts a previous attempt
        numbered beyond ours, then the marker: last."""
        for table in self.tables:
            if table in self._buffers or table not in self._parts:
                self.flush(table)
            n = self._parts[table]
            while self.store.exists(f"{table}/{part_name(self.shard, n)}"):
                self.store.delete(f"{table}/{part_name(self.shard, n)}")
                n += 1
        digest = files_digest([(f["path"], f["size"]) for f in self.files])
        self.store.delete(f"{FAILED}/{self.shard}.json")
        self.store.write_json(f"{DONE}/{marker_name(self.shard, spec_hash, digest)}",
                              {**marker, "spec_hash": spec_hash, "files": self.files})

    def abort(self) -> None:
        """A failed attempt: forget buffered rows and delete the parts written,
        so a failed shard leaves nothing under the table folders."""
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
