"""The output directory: per-shard Parquet files committed atomically, a
success marker per shard written last, failure markers, and the resolved
job spec. Works on local paths and on any pyarrow filesystem URI
(s3://, gs://): files are written under a temporary name and moved into
place (a rename locally; on object stores each file is one complete object
and the marker is only written after all of a shard's files exist)."""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .tables import ROW_GROUP_ROWS, TABLES

DONE = "_done"
FAILED = "_failed"
STATS = "_stats"  # per-shard counts (samples, bad samples per error type, edits), written by the driver
SPEC_FILE = "job.resolved.toml"
META_FILE = "job.json"


class OutputError(RuntimeError):
    pass


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

    # -- job level ---------------------------------------------------------

    def prepare(self, spec_toml: str, spec_hash: str, force: bool = False) -> None:
        """Create the layout, prove it is writable, and refuse to mix jobs:
        an output path that holds another spec's shards is an error."""
        try:
            for d in ("", *TABLES, DONE, FAILED, STATS):
                self.fs.create_dir(self._p(d) if d else self.root, recursive=True)
            probe = self._p(f".write-test-{uuid.uuid4().hex}")
            with self.fs.open_output_stream(probe) as fh:
                fh.write(b"ok")
            self.fs.delete_file(probe)
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"output.path {self.root!r} is not writable: {exc}") from None
        meta = self.read_json(META_FILE)
        if meta and meta.get("spec_hash") != spec_hash and not force:
            raise OutputError(
                f"output.path {self.root!r} holds results of another job spec (hash {meta.get('spec_hash')}, "
                f"this one {spec_hash}); use a new output path, or --force to redo every shard under the new spec"
            )
        self.write_bytes(SPEC_FILE, spec_toml.encode())
        self.write_json(META_FILE, {"spec_hash": spec_hash, "updated": time.time()})

    # -- shards --------------------------------------------------------------

    def is_done(self, shard: str, spec_hash: str) -> bool:
        marker = self.read_json(f"{DONE}/{shard}.json")
        return bool(marker) and marker.get("spec_hash") == spec_hash

    def done_shards(self, spec_hash: str) -> set[str]:
        """Names of the shards done under `spec_hash`, from one listing of
        `_done/`. Placeholder until the markers carry the hash in their names:
        the listed markers are read concurrently to check their hash."""
        from concurrent.futures import ThreadPoolExecutor

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self._p(DONE), allow_not_found=True))
        except (OSError, pa.ArrowException):
            return set()
        names = [i.base_name[:-5] for i in infos if i.base_name.endswith(".json") and not i.base_name.startswith(".")]
        with ThreadPoolExecutor(16) as pool:
            hashes = pool.map(lambda n: (self.read_json(f"{DONE}/{n}.json") or {}).get("spec_hash"), names)
            return {n for n, h in zip(names, hashes) if h == spec_hash}

    def commit_shard(self, shard: str, tables: dict[str, pa.Table], marker: dict) -> None:
        """Write each table under a temporary name, move it into place, then
        write the success marker. A crash before the marker leaves a shard
        that counts as not done; rerunning rewrites its files."""
        for name, table in tables.items():
            final = self._p(name, f"{shard}.parquet")
            tmp = self._p(name, f".tmp-{shard}-{uuid.uuid4().hex}.parquet")
            with self.fs.open_output_stream(tmp) as fh:
                pq.write_table(table, fh, compression="zstd", row_group_size=ROW_GROUP_ROWS[name])
            self.fs.move(tmp, final)
        self.delete(f"{FAILED}/{shard}.json")
        self.write_json(f"{DONE}/{shard}.json", marker)

    def mark_failed(self, shard: str, info: dict) -> None:
        self.write_json(f"{FAILED}/{shard}.json", info)

    def markers(self, kind: str) -> dict[str, dict]:
        out = {}
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self._p(kind), allow_not_found=True))
        except (OSError, pa.ArrowException):
            return out
        for info in infos:
            if info.base_name.endswith(".json") and not info.base_name.startswith("."):
                out[info.base_name[:-5]] = self.read_json(f"{kind}/{info.base_name}") or {}
        return out

    def table_files(self, name: str) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self._p(name), allow_not_found=True))
        return sorted(i.path for i in infos if i.base_name.endswith(".parquet") and not i.base_name.startswith("."))

    def read_table(self, name: str) -> pa.Table:
        files = self.table_files(name)
        if not files:
            return TABLES[name].empty_table()
        return pa.concat_tables([pq.read_table(f, filesystem=self.fs) for f in files], promote_options="default")

    # -- small files ----------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        tmp = self._p(f".tmp-{uuid.uuid4().hex}")
        with self.fs.open_output_stream(tmp) as fh:
            fh.write(data)
        self.fs.move(tmp, self._p(rel))

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
        try:
            self.fs.delete_file(self._p(rel))
        except (FileNotFoundError, OSError, pa.ArrowException):
            pass
