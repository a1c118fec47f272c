"""`imprint shards`: one's own images to WebDataset shards in the input
contract (schemas/sample.md).

Sources (`find_source` decides from what SRC is):
- a folder of images with `.txt` captions and/or `.json` sidecars (same
  name, other extension), searched recursively;
- a Hugging Face `imagefolder` (a folder with `metadata.jsonl` or
  `metadata.csv`, `file_name` relative to that file's folder);
- a CSV, TSV, JSONL or Parquet file: an image column (local path, relative
  to the file's folder, or http(s) URL, or image bytes), a caption column
  and an optional target-prompts column; other columns go to the json;
- a Hugging Face dataset saved with `save_to_disk`, or Parquet files with an
  `Image` column (a file, or a folder of them as on the Hub); ClassLabel
  columns are written as their names (`label` = "cat", `label_id` = 3).

Lineage: a table's image path or URL stays in the json (`path` or `url` as
img2dataset writes them; `image_path` / `image_url` when the table has
another column of that name), and `key_col` names the table's own id column,
which then gives each sample its key (made safe for WebDataset, the value
itself kept in the json under the column's name); without it keys are row
numbers.

Every sample is checked before it is written (the image decodes, in JPEG,
PNG or WebP, else BMP, GIF or TIFF converted to PNG; the caption is text); a
bad one is skipped with its reason and counted, never raised. Records flow
one way: source rows -> `load_sample` (in a thread pool: files and URLs are
read in parallel, order kept, the bytes read ahead bounded by `ByteBudget`)
-> shards of `samples_per_shard`, each written by `data.write_shards` into a
staging folder in DEST and, for object stores, uploaded through pyarrow; the
run's shards replace DEST's only when the whole run succeeds.

A table is untrusted input unless the caller says otherwise (`Trust`): its
paths must resolve inside its own folder and name regular files; URLs are
fetched under a byte cap and one deadline per download, and only from public
addresses (checked on every connection, redirects included, after DNS); only
the image formats named here are decoded, each by its own PIL plugin.

Edit masks (the region an edit should change, measured by the PIE-Bench
metrics): a folder's `photos/cat.mask.png` beside `photos/cat.jpg`, or a
table's `--mask-col` naming a mask file (read under the same rules as an image
path) or holding its bytes. A mask must be a PNG of the image's size, else the
sample is skipped (`bad_mask`, `mask_size`); it is written as the sample's
`edit_mask.png` entry (white = the region to edit). `*.mask.png` files are
never images of a folder.
"""

from __future__ import annotations

import io
import ipaddress
import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import uuid
import warnings
from collections import Counter
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

from .data import (EDIT_MASK_KEY, IMAGE_FILE_EXTS, IMAGE_FORMATS, MAX_MEMBER_BYTES, is_local, local_path, object_store,
                   sniff_format, write_shards)
from .objects import stage

TABLE_EXTS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # Hugging Face imagefolder
# Column names tried, in order, when --image-col / --caption-col / --targets-col are not given.
IMAGE_COLS = ("image", "image_path", "file_name", "filename", "path", "filepath", "img", "url", "image_url")
CAPTION_COLS = ("source_prompt", "caption", "text", "prompt", "txt")
TARGETS_COLS = ("target_prompts", "targets", "target_prompt")
EXT_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
LOOKAHEAD = 64  # records loaded ahead in the thread pool (their bytes bounded by MAX_INFLIGHT_BYTES)
MAX_INFLIGHT_BYTES = 1 << 30  # image bytes read but not yet written to a shard, all loader threads together
# Formats re-encoded to PNG (the folder source lists their extensions), each
# opened by its own plugin only: EPS (Ghostscript), PSD, ... are never decoded.
CONVERTED_FORMATS = ("BMP", "GIF", "TIFF")
READ_CHUNK = 1 << 16
MAX_SIDECAR_BYTES = 16 * 2**20  # a .txt caption or .json sidecar
EXIF_ORIENTATION = 0x0112
MASK_SUFFIX = ".mask.png"  # a folder's edit mask beside its image: photos/cat.jpg + photos/cat.mask.png
STAGING_PREFIX = ".imprint-staging-"  # DEST/<this><id>/: a run's shards until the run succeeds (no job lists it)


@dataclass(frozen=True)
class Trust:
    """What an ingest may read. The defaults are for untrusted tables."""

    allow_outside: bool = False  # local paths anywhere on disk, not only inside the table's folder
    allow_private: bool = False  # URLs on loopback, link-local and private addresses
    max_image_bytes: int = MAX_MEMBER_BYTES  # per image, file or download
    timeout: float = 30.0  # seconds for one whole download (retries included), not per read


class IngestError(ValueError):
    """SRC or DEST cannot be used at all (nothing is written)."""


class Skip(Exception):
    """One bad record: skipped with this reason."""


@dataclass
class Record:
    key: str
    image: Any  # local path (str), URL (str), bytes, or a Hugging Face {"bytes", "path"} dict
    base: str  # folder that relative image paths are relative to
    fields: dict = field(default_factory=dict)  # caption, targets and other columns, not yet checked
    caption_from: str = ""  # column or entry holding the caption
    targets_from: str = ""
    where: str = ""  # for messages: file and row
    entries: dict = field(default_factory=dict)  # further sample entries as bytes, e.g. {"edit_mask.png": ...}
    mask: Any = None  # the edit mask still to read and check: a local path (str), bytes or an HF Image dict
    mask_from: str = ""  # the mask's column (for messages)


@dataclass
class Source:
    kind: str  # folder | imagefolder | csv | tsv | jsonl | parquet | hf-dataset
    records: Callable[[], Iterator[Record | Skip]]
    total: int | None
    columns: dict  # image / caption / targets column used


@dataclass
class IngestSummary:
    source: str
    kind: str
    columns: dict
    written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)
    converted: int = 0  # images re-encoded to PNG (formats outside the contract)
    uncaptioned: int = 0
    untargeted: int = 0  # samples written without target prompts (a job then needs input.templates)

    def reasons(self) -> Counter:
        return Counter(_reason_kind(r) for _, r in self.skipped)


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


# ---------------------------------------------------------------------------
# Finding the source
# ---------------------------------------------------------------------------


def find_source(src: str, *, image_col: str | None = None, caption_col: str | None = None,
                targets_col: str | None = None, key_col: str | None = None, mask_col: str | None = None) -> Source:
    if not is_local(src):
        raise IngestError(f"{src}: SRC must be a local file or folder (DEST may be an object store)")
    # resolved once: records carry absolute paths and absolute folders, so a relative
    # SRC ("photos/") is not joined to itself, and containment compares real paths
    p = Path(local_path(src)).resolve()
    if not p.exists():
        raise IngestError(f"{src}: no such file or folder")
    cols = dict(image_col=image_col, caption_col=caption_col, targets_col=targets_col, key_col=key_col,
                mask_col=mask_col)
    if p.is_file():
        kind = TABLE_EXTS.get(p.suffix.lower())
        if kind is None:
            raise IngestError(f"{src}: unsupported file type {p.suffix or '(none)'} (expected a folder, "
                              f"{', '.join(TABLE_EXTS)} or a Hugging Face dataset folder)")
        return _table_source([p], kind, **cols)
    if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
        return _hf_disk_source(p, **cols)
    metadata = sorted(m for name in METADATA_FILES for m in p.rglob(name))
    if metadata:
        return _table_source(metadata, "imagefolder", **cols)
    files = sorted(f for f in p.rglob("*") if f.is_file() and not _hidden(f, p))
    images = [f for f in files if f.suffix.lower().lstrip(".") in IMAGE_FILE_EXTS and not is_mask_file(f)]
    parquet = [f for f in files if f.suffix.lower() == ".parquet"]
    if parquet and not images:
        return _table_source(parquet, "parquet", **cols)
    if any(cols.values()):
        raise IngestError("--image-col, --caption-col, --targets-col, --key-col and --mask-col are for tables and datasets; a "
                          "folder of images takes captions from .txt, fields from .json and edit masks from .mask.png "
                          "files next to each image")
    return _folder_source(p, images)


def is_mask_file(f: Path) -> bool:
    """A folder's edit mask (`cat.mask.png`), never an image of its own."""
    return f.name.lower().endswith(MASK_SUFFIX)


def mask_beside(img: Path) -> Path:
    """photos/cat.jpg -> photos/cat.mask.png"""
    return img.with_name(img.stem + MASK_SUFFIX)


def _hidden(f: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in f.relative_to(root).parts)


def _folder_source(root: Path, images: list[Path]) -> Source:
    def records():
        for img in images:
            rel = img.relative_to(root).with_suffix("").as_posix()
            fields: dict = {}
            side_json, side_txt = img.with_suffix(".json"), img.with_suffix(".txt")
            caption_from = ""
            if side_json.is_file():
                try:
                    obj = _json_object(read_regular_file(side_json, root, MAX_SIDECAR_BYTES))
                except Skip as exc:
                    yield Skip(f"{exc} ({img.relative_to(root).as_posix()})")
                    continue
                if isinstance(obj, str):
                    yield Skip(f"bad_json: {side_json.relative_to(root)}: {obj}")
                    continue
                fields.update(obj)
                caption_from = "source_prompt" if "source_prompt" in obj else ""
            if side_txt.is_file() and not caption_from:
                try:
                    fields["source_prompt"] = read_regular_file(side_txt, root, MAX_SIDECAR_BYTES).decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield Skip(f"bad_caption: {side_txt.relative_to(root)} is not UTF-8 ({exc})")
                    continue
                except Skip as exc:
                    yield Skip(f"{exc} ({img.relative_to(root).as_posix()})")
                    continue
                caption_from = "source_prompt"
            mask = mask_beside(img)
            yield Record(key=rel, image=str(img), base=str(root), fields=fields, caption_from=caption_from,
                         targets_from="target_prompts" if "target_prompts" in fields else "",
                         where=img.relative_to(root).as_posix(),
                         mask=str(mask) if os.path.lexists(mask) else None, mask_from=mask.name)

    return Source("folder", records, len(images), {"image": "files", "caption": ".txt / .json source_prompt",
                                                    "targets": ".json target_prompts", "mask": MASK_SUFFIX + " files"})


def _pick(columns: list[str], given: str | None, candidates: tuple[str, ...], what: str, flag: str,
          required: bool) -> str:
    if given:
        if given not in columns:
            raise IngestError(f"{flag} {given!r}: no such column (columns: {', '.join(columns)})")
        return given
    found = next((c for c in candidates if c in columns), "")
    if required and not found:
        raise IngestError(f"no {what} column among {', '.join(columns)}; name it with {flag}")
    return found


def _table_source(files: list[Path], kind: str, *, image_col, caption_col, targets_col, key_col, mask_col) -> Source:
    readers = {"csv": _read_csv, "tsv": _read_csv, "imagefolder": None, "jsonl": _read_jsonl, "parquet": _read_parquet}
    columns: list[str] = []
    hf_images: list[str] = []
    total = 0
    for f in files:
        cols, n, images = _table_info(f, kind)
        columns += [c for c in cols if c not in columns]
        hf_images += [c for c in images if c not in hf_images]
        total = None if n is None or total is None else total + n
    image = image_col or (hf_images[0] if hf_images else "")
    image = _pick(columns, image, ("file_name",) + IMAGE_COLS if kind == "imagefolder" else IMAGE_COLS,
                  "image", "--image-col", True)
    caption = _pick(columns, caption_col, CAPTION_COLS, "caption", "--caption-col", False)
    targets = _pick(columns, targets_col, TARGETS_COLS, "target prompts", "--targets-col", False)
    mask = _pick(columns, mask_col, (), "mask", "--mask-col", False)
    key_of = _key_column(columns, key_col)

    def records():
        index = 0
        for f in files:
            reader = readers[kind] or readers[_file_kind(f)]
            for row in reader(f):
                if isinstance(row, Skip):
                    yield row
                    continue
                rowno, values = row
                where = f"{f.name} row {rowno}"
                try:
                    key = key_of(values) or _table_key(kind, values.get(image), index)
                except Skip as exc:
                    yield Skip(f"{exc} ({where})")
                    continue
                yield _record(values, image, caption, targets, base=str(f.parent), where=where, key=key, mask_col=mask)
                index += 1

    return Source(kind, records, total, _columns_used(image, caption, targets, key_col, mask))


def _columns_used(image: str, caption: str, targets: str, key_col: str | None, mask_col: str = "") -> dict:
    used = {"image": image, "caption": caption or "(none)", "targets": targets or "(none)"}
    if key_col:
        used["key"] = key_col
    if mask_col:
        used["mask"] = mask_col
    return used


def _key_column(columns: list[str], key_col: str | None) -> Callable[[dict], str | None]:
    """values -> the sample's key from the table's own id column (`--key-col`),
    or None when no such column was named; an empty id skips the row."""
    if not key_col:
        return lambda values: None
    _pick(columns, key_col, (), "key", "--key-col", True)

    def key_of(values: dict) -> str:
        v = values.get(key_col)
        if v is None or (isinstance(v, float) and math.isnan(v)) or isinstance(v, (dict, list)) or not str(v).strip():
            raise Skip(f"no_key: the key column {key_col!r} is empty or not a value")
        return str(v).strip()

    return key_of


def _file_kind(f: Path) -> str:
    return TABLE_EXTS.get(f.suffix.lower(), "csv")


def _table_key(kind: str, image: Any, index: int) -> str:
    """imagefolder: the file's name without extension (its folder too); tables: the number of the
    row among the readable rows, from 0 over all files."""
    if kind == "imagefolder" and isinstance(image, str):
        return os.path.splitext(image)[0]
    return f"{index:09d}"


def _record(values: dict, image_col: str, caption_col: str, targets_col: str, *, base: str, where: str,
            key: str, mask_col: str = "") -> Record:
    fields = {k: v for k, v in values.items() if k not in (image_col, caption_col, targets_col, mask_col)}
    fields.update(_lineage(values, image_col))
    if caption_col and values.get(caption_col) is not None:
        fields["source_prompt"] = values[caption_col]
    if targets_col and values.get(targets_col) is not None:
        fields["target_prompts"] = values[targets_col]
    return Record(key=key, image=values.get(image_col), base=base, fields=fields,
                  caption_from=caption_col, targets_from=targets_col, where=where,
                  mask=values.get(mask_col) if mask_col else None, mask_from=mask_col)


def _lineage(values: dict, image_col: str) -> dict:
    """Where the image came from, kept in the json: {"url": ...} for an
    http(s) URL, {"path": ...} for a path as the table wrote it (the
    img2dataset names; `image_url` / `image_path` when the table has another
    column of that name). Nothing for image bytes."""
    v = values.get(image_col)
    if isinstance(v, dict):  # Hugging Face Image: {"bytes": ..., "path": ...}
        v = v.get("path")
    if not isinstance(v, str) or not v.strip():
        return {}
    name = "url" if v.split("://", 1)[0].lower() in ("http", "https") and "://" in v else "path"
    if name in values and name != image_col:
        name = f"image_{name}"
    return {name: v}


def _table_info(f: Path, kind: str) -> tuple[list[str], int | None, list[str]]:
    """(columns, rows when cheap to know, Hugging Face Image columns)."""
    k = _file_kind(f) if kind == "imagefolder" else kind
    try:
        if k == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            features = _hf_features(pf.schema_arrow)
            images = [c for c, t in features.items() if isinstance(t, dict) and t.get("_type") == "Image"]
            images += [c.name for c in pf.schema_arrow if _is_image_struct(c.type) and c.name not in images]
            return pf.schema_arrow.names, pf.metadata.num_rows, images
        if k == "jsonl":
            cols: list[str] = []
            n = 0
            with open(f, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    n += 1
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(obj, dict):
                        cols += [c for c in obj if c not in cols]
            return cols, n, []
        import pyarrow.csv as pacsv

        with pacsv.open_csv(f, parse_options=_csv_parse(k, None)) as reader:
            return reader.schema.names, None, []
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors for unreadable files vary
        raise IngestError(f"{f}: cannot read as {k}: {type(exc).__name__}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _csv_parse(kind: str, bad_rows: list | None):
    import pyarrow.csv as pacsv

    def skip(row) -> str:  # pyarrow's invalid-row hook: a row with the wrong number of fields
        if bad_rows is not None:
            bad_rows.append(Skip(f"bad_row: line {row.number}: expected {row.expected_columns} fields, "
                                 f"got {row.actual_columns}: {row.text[:80]!r}"))
        return "skip"

    return pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",", newlines_in_values=True,
                              invalid_row_handler=skip)


def _read_csv(f: Path) -> Iterator[tuple[int, dict] | Skip]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    kind = "tsv" if f.suffix.lower() == ".tsv" else "csv"
    bad: list[Skip] = []
    # every column as text: a caption "1984" stays a caption, a label "007" keeps its zeros
    with pacsv.open_csv(f, parse_options=_csv_parse(kind, None)) as probe:
        names = probe.schema.names
    convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=True)
    rowno = 1  # the header
    try:
        with pacsv.open_csv(f, parse_options=_csv_parse(kind, bad), convert_options=convert) as reader:
            for batch in reader:
                yield from bad
                bad.clear()
                for row in batch.to_pylist():
                    rowno += 1
                    yield rowno, row
    except pa.ArrowInvalid as exc:
        yield Skip(f"bad_file: {f.name}: {_one_line(exc)} (rows after this point not read)")
    yield from bad


def _json_object(data: bytes) -> dict | str:
    """The JSON object in `data` (UTF-8), or why it is not one."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return f"not JSON ({type(exc).__name__}: {exc})"
    return obj if isinstance(obj, dict) else "not a JSON object"


def _read_jsonl(f: Path) -> Iterator[tuple[int, dict] | Skip]:
    with open(f, "rb") as fh:
        for rowno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            obj = _json_object(line)
            if isinstance(obj, str):
                yield Skip(f"bad_row: {f.name} line {rowno}: {obj}")
                continue
            yield rowno, obj


def _read_parquet(f: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    labels = _class_labels(_hf_features(pf.schema_arrow))
    rowno = 0
    for batch in pf.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            rowno += 1
            yield rowno, _name_labels(row, labels)


def _hf_features(schema) -> dict:
    """The `features` Hugging Face `datasets` stores in a Parquet file's metadata ({} when none)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        feats = json.loads(raw).get("info", {}).get("features", {})
    except (json.JSONDecodeError, AttributeError):
        return {}
    return feats if isinstance(feats, dict) else {}


def _class_labels(features: dict) -> dict[str, list[str]]:
    return {c: list(t["names"]) for c, t in features.items()
            if isinstance(t, dict) and t.get("_type") == "ClassLabel" and isinstance(t.get("names"), list)}


def _name_labels(row: dict, labels: dict[str, list[str]]) -> dict:
    """ClassLabel ids -> names (`label` = "cat"), the id kept as `label_id`."""
    for col, names in labels.items():
        v = row.get(col)
        if isinstance(v, int) and 0 <= v < len(names):
            row[f"{col}_id"], row[col] = v, names[v]
    return row


def _is_image_struct(t) -> bool:
    import pyarrow as pa

    return pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} >= {"bytes", "path"}


def _hf_disk_source(p: Path, *, image_col, caption_col, targets_col, key_col, mask_col) -> Source:
    try:
        import datasets
    except ImportError:
        raise IngestError(f"{p} is a Hugging Face dataset folder: reading it needs the `datasets` package "
                          "(pip install datasets)") from None
    try:
        loaded = datasets.load_from_disk(str(p))
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for a damaged folder
        raise IngestError(f"{p}: cannot load the dataset: {type(exc).__name__}: {_one_line(exc)}") from None
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"": loaded}
    first = next(iter(splits.values()))
    columns = list(first.column_names)
    hf_images = [c for c, t in first.features.items() if isinstance(t, datasets.Image)]
    image = _pick(columns, image_col or (hf_images[0] if hf_images else ""), IMAGE_COLS, "image", "--image-col", True)
    caption = _pick(columns, caption_col, CAPTION_COLS, "caption", "--caption-col", False)
    targets = _pick(columns, targets_col, TARGETS_COLS, "target prompts", "--targets-col", False)
    mask = _pick(columns, mask_col, (), "mask", "--mask-col", False)
    key_of = _key_column(columns, key_col)

    def records():
        for split, ds in splits.items():
            labels = {c: t.names for c, t in ds.features.items() if isinstance(t, datasets.ClassLabel)}
            for col in (image, mask):
                if col and isinstance(ds.features.get(col), datasets.Image):
                    ds = ds.cast_column(col, datasets.Image(decode=False))  # the stored bytes, not a decoded PIL image
            for i, row in enumerate(ds):
                row = _name_labels(row, labels)
                if split:
                    row.setdefault("split", split)
                where = f"{split or 'row'} {i}"
                try:
                    key = key_of(row) or (f"{split}-{i:09d}" if split else f"{i:09d}")
                except Skip as exc:
                    yield Skip(f"{exc} ({where})")
                    continue
                yield _record(row, image, caption, targets, base=str(p), where=where, key=key, mask_col=mask)

    total = sum(len(ds) for ds in splits.values())
    return Source("hf-dataset", records, total, _columns_used(image, caption, targets, key_col, mask))


# ---------------------------------------------------------------------------
# One record -> one sample
# ---------------------------------------------------------------------------


def load_sample(rec: Record, fetch: Callable[[str], bytes], max_pixels: int = 64_000_000, trust: Trust = Trust(),
                budget: ByteBudget | None = None) -> dict:
    """A WebDataset sample (`__key__`, image bytes under its extension,
    `json`) from a record; raises Skip with the reason when it is unusable."""
    data = _image_bytes(rec, fetch, trust, budget)
    ext, data, converted, size = _checked_image(data, max_pixels)
    obj = _json_fields(rec)
    sample = {"__key__": rec.key, ext: data, "json": obj, **rec.entries}
    mask = _mask_bytes(rec, trust, budget)
    if mask is not None:
        sample[EDIT_MASK_KEY] = _checked_mask(mask, size, rec.mask_from)
    if converted:
        sample["__converted__"] = True
    return sample


def _image_bytes(rec: Record, fetch, trust: Trust, budget: ByteBudget | None) -> bytes:
    v = rec.image
    if isinstance(v, dict):  # Hugging Face Image: {"bytes": ..., "path": ...}
        v = v.get("bytes") or v.get("path")
    if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
        raise Skip("no_image: the image column is empty")
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if not isinstance(v, str):
        raise Skip(f"no_image: the image column holds {type(v).__name__}, not a path, URL or bytes")
    scheme = v.split("://", 1)[0].lower() if "://" in v else ""
    if scheme in ("http", "https"):
        return fetch(v)
    if scheme and scheme != "file":
        raise Skip(f"bad_url: unsupported URL scheme {scheme!r} in {v[:80]!r} (local paths and http(s) URLs)")
    path = Path(local_path(v))
    if not path.is_absolute():
        path = Path(rec.base) / path
    return read_regular_file(path, None if trust.allow_outside else Path(rec.base), trust.max_image_bytes, budget)


def read_regular_file(path: Path, inside: Path | None, cap: int, budget: ByteBudget | None = None) -> bytes:
    """The bytes of `path` if it resolves (symbolic links followed) inside the
    folder `inside` (None: anywhere) and is a regular file of at most `cap`
    bytes; else Skip. A FIFO or device is refused after a non-blocking open,
    before any read (a named pipe would block, /dev/zero never ends)."""
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise Skip(f"missing_file: {path} not found") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop
        raise Skip(f"unreadable_file: {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if inside is not None and not real.is_relative_to(inside.resolve()):
        raise Skip(f"outside: {path} is outside the table's folder {inside} (--allow-outside reads a trusted "
                   "table's paths anywhere)")
    try:
        # O_NOFOLLOW: `real` has no links left; one put there since is not followed
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise Skip(f"missing_file: {path} not found") from None
    except OSError as exc:
        raise Skip(f"unreadable_file: {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb", buffering=0) as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Skip(f"not_a_file: {path} is {_file_kind_name(st.st_mode)}, not a regular file")
        if st.st_size > cap:
            raise Skip(f"too_large: {path} is {st.st_size} bytes (more than {cap})")
        buf = bytearray()
        while chunk := fh.read(min(READ_CHUNK * 16, cap + 1 - len(buf))):
            if budget is not None:
                budget.take(len(chunk))
            buf += chunk
            if len(buf) > cap:  # grew while read
                raise Skip(f"too_large: {path} is more than {cap} bytes")
        return bytes(buf)


def _file_kind_name(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def _mask_bytes(rec: Record, trust: Trust, budget: ByteBudget | None) -> bytes | None:
    """The record's edit-mask bytes (None: it has no mask), read as an image
    path is read: inside the record's folder unless trusted, a regular file."""
    v = rec.mask
    if isinstance(v, dict):  # Hugging Face Image: {"bytes": ..., "path": ...}
        v = v.get("bytes") or v.get("path")
    if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
        return None  # an empty cell: this sample has no mask
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if not isinstance(v, str):
        raise Skip(f"bad_mask: {rec.mask_from or 'the mask column'} holds {type(v).__name__}, not a path or bytes")
    if "://" in v and v.split("://", 1)[0].lower() != "file":
        raise Skip(f"bad_mask: {v[:80]!r}: a mask is a local file (a path relative to the table), not a URL")
    path = Path(local_path(v))
    if not path.is_absolute():
        path = Path(rec.base) / path
    return read_regular_file(path, None if trust.allow_outside else Path(rec.base), trust.max_image_bytes, budget)


def _checked_mask(data: bytes, image_size: tuple[int, int], where: str) -> bytes:
    """A mask's bytes as the sample's `edit_mask.png`: a PNG (lossless, so the
    region is exact) that decodes, of the image's size; else Skip."""
    fmt = sniff_format(data)
    if fmt != "PNG":
        raise Skip(f"bad_mask: {where or 'the mask'} must be a PNG (lossless), got {fmt or 'unrecognised bytes'}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            mask = Image.open(io.BytesIO(data), formats=["PNG"])
            size = mask.size
            if size != image_size:
                raise Skip(f"mask_size: {where or 'the mask'} is {size[0]}x{size[1]}, the image "
                           f"{image_size[0]}x{image_size[1]} (a mask has its image's size)")
            mask.load()
    except Skip:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever PIL raises on bad bytes
        raise Skip(f"bad_mask: {where or 'the mask'} is not a readable PNG ({type(exc).__name__}: {_one_line(exc)})") from None
    return data


def _checked_image(data: bytes, max_pixels: int) -> tuple[str, bytes, bool, tuple[int, int]]:
    """(extension, bytes, converted, (width, height)): JPEG/PNG/WebP bytes kept as they are
    once they decode; BMP, GIF and TIFF re-encoded to PNG; any other format
    refused before a decoder sees it (whatever the file's name says)."""
    if not data:
        raise Skip("decode: empty image")
    fmt = sniff_format(data)
    if fmt is not None and fmt not in IMAGE_FORMATS + CONVERTED_FORMATS:
        raise Skip(f"format_refused: {fmt} (imprint shards reads {', '.join(IMAGE_FORMATS + CONVERTED_FORMATS)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # decoded by its own plugin only (a camera's JPEG would open as MPO; no other plugin is tried)
            if fmt is None:
                raise Image.UnidentifiedImageError()
            img = Image.open(io.BytesIO(data), formats=[fmt])
            w, h = img.size
            if w * h > max_pixels:
                raise Skip(f"too_large: {w}x{h} pixels")
            img.load()
            # the size the job sees (data.load_image turns the image upright): a mask is drawn on that
            shown = (h, w) if img.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8) else (w, h)
    except Skip:
        raise
    except Image.UnidentifiedImageError:
        raise Skip("decode: not an image format PIL reads") from None
    except Exception as exc:  # noqa: BLE001 - whatever PIL raises on bad bytes
        raise Skip(f"decode: not a readable image ({type(exc).__name__}: {_one_line(exc)})") from None
    if fmt in IMAGE_FORMATS:
        return EXT_OF_FORMAT[fmt], data, False, shown
    buf = io.BytesIO()
    keep = img.mode if img.mode in ("RGB", "RGBA", "L", "LA", "I;16") else "RGBA" if "A" in img.getbands() else "RGB"
    (img if img.mode == keep else img.convert(keep)).save(buf, format="PNG")
    return "png", buf.getvalue(), True, (w, h)  # (PNG written without the EXIF: seen as stored)


def _json_fields(rec: Record) -> dict:
    """The sample's json: `source_prompt` (text), `target_prompts` (list of
    text) and the other fields that JSON can hold."""
    out: dict = {}
    for k, v in rec.fields.items():
        if k == "source_prompt":
            continue
        if k == "target_prompts":
            continue
        v = _jsonable(v)
        if v is not _DROP and v is not None:  # an empty cell is no field
            out[str(k)] = v
    cap = rec.fields.get("source_prompt")
    if cap is not None and not (isinstance(cap, float) and math.isnan(cap)):
        if not isinstance(cap, str):
            raise Skip(f"bad_caption: {rec.caption_from or 'caption'} holds {type(cap).__name__}, not text")
        if cap.strip():
            out["source_prompt"] = cap.strip()
    tg = rec.fields.get("target_prompts")
    if tg is not None and not (isinstance(tg, float) and math.isnan(tg)):
        if isinstance(tg, str):
            text = tg.strip()
            if text.startswith("["):
                try:
                    tg = json.loads(text)
                except json.JSONDecodeError:
                    raise Skip(f"bad_targets: {rec.targets_from} is not a JSON list: {text[:60]!r}") from None
            else:
                tg = [text] if text else []
        if not isinstance(tg, list) or not all(isinstance(t, str) and t.strip() for t in tg):
            raise Skip(f"bad_targets: {rec.targets_from or 'target_prompts'} must be a list of non-empty strings")
        if tg:
            out["target_prompts"] = [t.strip() for t in tg]
    return out


_DROP = object()


def add_targets(obj: dict, targets: tuple[str, ...] | list[str], templates: tuple[str, ...] | list[str]) -> None:
    """Give a sample's json (`obj`) the same target prompts as every other
    sample of the run: `targets` as they are and `templates` filled from the
    json's fields (`{source}` = the caption), after its own, without
    repeats. A template naming a field the sample lacks skips it
    (`template_field`)."""
    if not targets and not templates:
        return
    from .data import PROMPT_FIELDS, SampleError, TemplateFields, render_templates

    others = {k: v for k, v in obj.items() if k not in PROMPT_FIELDS}
    try:
        rendered = render_templates(list(templates), TemplateFields(others, obj.get("source_prompt")))
    except SampleError as exc:
        raise Skip(f"template_field: {exc} (--target-template)") from None
    new = [t.strip() for t in [*obj.get("target_prompts", []), *targets, *rendered] if t.strip()]
    if new:
        obj["target_prompts"] = list(dict.fromkeys(new))


def _jsonable(v: Any) -> Any:
    """A column value as JSON, or _DROP (bytes, NaN, objects JSON cannot hold)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else _DROP
    if isinstance(v, (list, tuple)):
        items = [_jsonable(x) for x in v]
        return _DROP if any(x is _DROP for x in items) else items
    if isinstance(v, dict):
        items = {str(k): _jsonable(x) for k, x in v.items()}
        return {k: x for k, x in items.items() if x is not _DROP}
    if hasattr(v, "isoformat"):  # dates and times
        return v.isoformat()
    return _DROP


_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(key: str) -> str:
    """A WebDataset key with no dots or folders: the key is the member name
    up to the first dot, so "a.b/c.jpg" would split wrongly."""
    return _KEY_CHARS.sub("_", key).strip("_") or "sample"


# ---------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------


class BlockedAddress(Exception):
    """A URL's host is on an address the trust rules refuse. Not an OSError,
    so urllib3 neither retries it nor tries the next address."""


def _is_public(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # an IPv6 scope ("fe80::1%eth0") is no part of the address
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


def _vetted_address(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to for `host`: every address DNS gives must be
    public (unless allowed), so a name cannot mix a public and a private one."""
    ips = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    if not allow_private:
        for ip in ips:
            if not _is_public(ip):
                raise BlockedAddress(f"{host} is {ip}, a loopback, link-local or private address "
                                     "(--allow-private fetches from such addresses)")
    return ips[0]


class _Download:
    """One download's deadline: at expiry every socket it opened is shut
    down, which ends a read blocked on a server that sends nothing, or one
    byte at a time, or that stalls mid-headers."""

    def __init__(self, seconds: float):
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self.expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Download":
        _current.download = self
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        _current.download = None

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


_current = threading.local()  # the download this thread runs (requests connects in the calling thread)


def _guarded_adapter(allow_private: bool, **kwargs):
    """A requests adapter whose every connection (the first and each
    redirect's) goes to an address `_vetted_address` allowed, resolved once
    and connected to as resolved (no second lookup a rebinding DNS could
    change), and is registered with the thread's download for its deadline."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
    from urllib3.util.connection import create_connection

    class Guarded:
        def _new_conn(self):
            try:
                ip = _vetted_address(self._dns_host, self.port, allow_private)
                sock = create_connection((ip, self.port), self.timeout, source_address=self.source_address,
                                         socket_options=self.socket_options)
            except socket.timeout as exc:
                raise ConnectTimeoutError(self, f"connecting to {self.host} timed out") from exc
            except OSError as exc:
                raise NewConnectionError(self, f"cannot connect to {self.host}: {exc}") from exc
            download = getattr(_current, "download", None)
            if download is not None:
                download.add(sock)
            return sock

    class Conn(Guarded, HTTPConnection):
        pass

    class SConn(Guarded, HTTPSConnection):
        pass

    class Pool(HTTPConnectionPool):
        ConnectionCls = Conn

    class SPool(HTTPSConnectionPool):
        ConnectionCls = SConn

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kw):
            super().init_poolmanager(*args, **kw)
            self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": SPool}

    return Adapter(**kwargs)


def url_fetcher(trust: Trust = Trust(), retries: int = 2, budget: ByteBudget | None = None) -> Callable[[str], bytes]:
    """GET with `requests`: retries with backoff on connection errors and
    429/5xx (urllib3's Retry), and the trust rules: public addresses only
    (every connection, redirects included), at most `trust.max_image_bytes`,
    and one deadline of `trust.timeout` seconds for the whole download."""
    import requests
    from urllib3.exceptions import HTTPError as Urllib3Error
    from urllib3.util.retry import Retry

    retry = Retry(total=retries, connect=retries, read=retries, backoff_factor=0.5,
                  status_forcelist=(429, 500, 502, 503, 504), allowed_methods=("GET",), raise_on_status=False)
    cap = trust.max_image_bytes

    def fetch(url: str) -> bytes:
        # a session per download: no connection is reused from another download, whose deadline it would escape
        with requests.Session() as session, _Download(trust.timeout) as download:
            session.trust_env = False  # no proxy (the address checked is the one connected to), no .netrc credentials
            session.max_redirects = 5
            adapter = _guarded_adapter(trust.allow_private, max_retries=retry)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = "imprint-shards"
            try:
                with session.get(url, timeout=(min(10.0, trust.timeout), trust.timeout), stream=True) as r:
                    if r.status_code != 200:
                        raise Skip(f"http_error: HTTP {r.status_code} for {url[:120]}")
                    length = r.headers.get("Content-Length", "")
                    if length.isdigit() and int(length) > cap:
                        raise Skip(f"too_large: {url[:120]} is {length} bytes (more than {cap})")
                    buf = bytearray()
                    for chunk in r.iter_content(READ_CHUNK):
                        if budget is not None:
                            budget.take(len(chunk))
                        buf += chunk
                        if len(buf) > cap:
                            raise Skip(f"too_large: {url[:120]} is more than {cap} bytes")
                    if download.expired:  # the shut-down socket may read as a clean end
                        raise Skip(f"timeout: {url[:120]} not downloaded within {trust.timeout:g} s")
                    return bytes(buf)
            except BlockedAddress as exc:
                raise Skip(f"blocked_address: {url[:120]}: {exc}") from None
            except (requests.RequestException, Urllib3Error, OSError) as exc:
                if isinstance(exc.__context__, BlockedAddress) or isinstance(getattr(exc, "reason", None), BlockedAddress):
                    raise Skip(f"blocked_address: {url[:120]}: {exc.__context__ or exc.reason}") from None
                if download.expired:
                    raise Skip(f"timeout: {url[:120]} not downloaded within {trust.timeout:g} s") from None
                raise Skip(f"http_error: {url[:120]}: {type(exc).__name__}: {_one_line(exc)[:160]}") from None

    return fetch


class ByteBudget:
    """Image bytes read but not yet written to a shard, all loader threads
    together. Records are numbered in source order and written in that
    order; a loader waits while its next read would pass the limit, except
    the loader of the record written next, which never waits: it finishes,
    its sample is written and its bytes given back, so the limit cannot
    deadlock (one image over the limit still goes through, alone)."""

    def __init__(self, limit: int):
        self.limit, self.used, self.peak = limit, 0, 0
        self._next = 0  # the record written next
        self._cond = threading.Condition()
        self._mine = threading.local()

    def begin(self, index: int) -> None:
        self._mine.index, self._mine.taken = index, 0

    def taken(self) -> int:
        return getattr(self._mine, "taken", 0)

    def take(self, n: int) -> None:
        index = getattr(self._mine, "index", None)
        with self._cond:
            while index is not None and index != self._next and self.used + n > self.limit:
                self._cond.wait()
            self.used += n
            self.peak = max(self.peak, self.used)
        self._mine.taken = self.taken() + n

    def written(self, index: int, n: int) -> None:
        """Record `index` is written (or skipped): its `n` bytes come back."""
        with self._cond:
            self.used -= n
            self._next = index + 1
            self._cond.notify_all()

    def close(self) -> None:
        """The run stops: no loader waits any more."""
        with self._cond:
            self.limit = float("inf")
            self._cond.notify_all()


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


class ShardSink:
    """Shards `{prefix}-000000.tar`, ... in a local folder or an object-store
    prefix. A run writes its shards into a staging folder in DEST
    (`.imprint-staging-<id>/`, which no job lists) and `commit` moves them to
    their names only once the whole run succeeded, then removes the old
    shards it did not replace: a failed or interrupted run leaves DEST as it
    was, `--overwrite` included. Each shard is complete before it is named:
    written by `data.write_shards` (renamed into place) locally, uploaded by
    `objects.stage` (aborted or deleted on an exception) to an object store."""

    def __init__(self, dest: str, prefix: str, overwrite: bool):
        self.dest, self.prefix = dest.rstrip("/"), prefix
        self.local = is_local(dest)
        if self.local:
            self.root = Path(local_path(dest))
            if self.root.exists() and not self.root.is_dir():
                raise IngestError(f"{dest}: DEST must be a folder")
            self.root.mkdir(parents=True, exist_ok=True)
            existing = sorted(str(f) for f in self.root.glob("*.tar"))
            self.base = str(self.root)
        else:
            import pyarrow.fs as pafs

            self.fs, self.base = object_store(self.dest)
            self.base = self.base.rstrip("/")
            self.fs.create_dir(self.base, recursive=True)  # a marker at most on object stores; needed elsewhere
            infos = self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))
            existing = sorted(i.path for i in infos if i.path.endswith(".tar"))
        mine = [e for e in existing if os.path.basename(e).startswith(f"{prefix}-")]
        if existing and not (overwrite and len(mine) == len(existing)):
            what = f"{len(existing)} .tar file(s), e.g. {existing[0]}"
            hint = ("--overwrite replaces only shards named "
                    f"{prefix}-*.tar" if overwrite else "pass --overwrite to replace them, or choose an empty DEST")
            raise IngestError(f"{dest} already holds {what}; a job reading this folder would read them too ({hint})")
        self.old = mine  # replaced or removed by `commit`, never before
        self.staging = f"{self.base}/{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        self.staged: list[str] = []
        if self.local:
            os.mkdir(self.staging)
        else:
            self.fs.create_dir(self.staging, recursive=True)

    def write(self, index: int, samples: Iterable[dict]) -> str:
        name = f"{self.prefix}-{index:06d}.tar"
        if self.local:
            write_shards(samples, f"{self.staging}/{name}")
        else:
            with tempfile.TemporaryDirectory(prefix="imprint-shards-") as tmp:
                local = write_shards(samples, os.path.join(tmp, name))
                with open(local, "rb") as src:
                    stage(self.fs, f"{self.staging}/{name}", lambda out: shutil.copyfileobj(src, out, 1 << 20))
        self.staged.append(name)
        return f"{self.dest}/{name}"

    def commit(self) -> None:
        """The run succeeded: its shards take their names (each move
        atomic locally; an object appears whole), then old shards beyond
        the new ones go."""
        new = set()
        for name in self.staged:
            final = f"{self.base}/{name}"
            if self.local:
                os.replace(f"{self.staging}/{name}", final)
            else:
                self.fs.move(f"{self.staging}/{name}", final)
            new.add(final)
        for old in self.old:
            if old not in new:
                os.remove(old) if self.local else self.fs.delete_file(old)
        self.discard()

    def discard(self) -> None:
        """Remove the staging folder (what a failed run wrote)."""
        try:
            if self.local:
                shutil.rmtree(self.staging, ignore_errors=True)
            else:
                self.fs.delete_dir(self.staging)
        except (OSError, FileNotFoundError):
            pass


def make_shards(src: str, dest: str, *, image_col: str | None = None, caption_col: str | None = None,
                targets_col: str | None = None, key_col: str | None = None, mask_col: str | None = None,
                samples_per_shard: int = 1000, prefix: str = "shard",
                overwrite: bool = False, timeout: float = 30.0, workers: int = 8, progress: bool = True,
                fetch: Callable[[str], bytes] | None = None, allow_outside: bool = False,
                allow_private: bool = False, max_image_bytes: int = MAX_MEMBER_BYTES,
                max_inflight_bytes: int = MAX_INFLIGHT_BYTES, targets: tuple[str, ...] | list[str] = (),
                target_templates: tuple[str, ...] | list[str] = (), source: Source | None = None) -> IngestSummary:
    """Write SRC's samples to DEST as WebDataset shards; see the module doc.
    Raises IngestError (nothing written) when SRC or DEST is unusable; on any
    exception DEST keeps what it held before."""
    if samples_per_shard < 1:
        raise IngestError("--samples-per-shard must be at least 1")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise IngestError(f"--prefix {prefix!r}: letters, digits, - and _ only")
    if not 0 < max_image_bytes <= MAX_MEMBER_BYTES:
        raise IngestError(f"--max-image-mb: more than 0 and at most {MAX_MEMBER_BYTES >> 20} (the input contract's cap)")
    if not timeout > 0:
        raise IngestError("--timeout must be more than 0 seconds")
    if any(not t.strip() for t in targets):
        raise IngestError("--targets: a target prompt must not be empty")
    from .spec import SpecError, check_template

    for t in target_templates:
        try:
            check_template(t, "--target-template")
        except SpecError as exc:
            raise IngestError(str(exc)) from None
    trust = Trust(allow_outside=allow_outside, allow_private=allow_private, max_image_bytes=max_image_bytes,
                  timeout=timeout)
    if source is None:  # (a benchmark's reader, e.g. pipeline.pie_bench, builds its own)
        source = find_source(src, image_col=image_col, caption_col=caption_col, targets_col=targets_col,
                             key_col=key_col, mask_col=mask_col)
    sink = ShardSink(dest, prefix, overwrite)
    summary = IngestSummary(source=src, kind=source.kind, columns=source.columns)
    budget = ByteBudget(max_inflight_bytes)
    fetch = fetch or url_fetcher(trust, budget=budget)
    used: set[str] = set()

    def load(index: int, item: Record | Skip) -> tuple[int, dict | Skip, int]:
        """(index, sample or Skip, bytes it holds of the budget)"""
        budget.begin(index)
        if isinstance(item, Skip):
            return index, item, 0
        try:
            out: dict | Skip = load_sample(item, fetch, trust=trust, budget=budget)
            add_targets(out["json"], targets, target_templates)
        except Skip as exc:
            out = Skip(f"{exc} ({item.where})")
        except Exception as exc:  # noqa: BLE001 - a record's data must not stop the others
            out = Skip(f"other: {type(exc).__name__}: {_one_line(exc)} ({item.where})")
        return index, out, budget.taken()

    def samples() -> Iterator[dict]:
        from tqdm import tqdm

        with ThreadPoolExecutor(max(1, workers)) as pool, \
                tqdm(total=source.total, unit="img", desc="imprint shards", disable=not progress) as bar:
            records = enumerate(source.records())
            window = deque(pool.submit(load, i, item) for i, item in islice(records, LOOKAHEAD))
            try:
                while window:
                    index, out, taken = window.popleft().result()
                    following = next(records, None)
                    if following is not None:
                        window.append(pool.submit(load, *following))
                    bar.update(1)
                    if isinstance(out, Skip):
                        summary.skipped.append((_where(str(out)), str(out)))
                    else:
                        out["__key__"] = _unique(safe_key(out["__key__"]), used)
                        summary.converted += bool(out.pop("__converted__", False))
                        summary.uncaptioned += "source_prompt" not in out["json"]
                        summary.untargeted += "target_prompts" not in out["json"]
                        yield out  # written to the tar when the generator resumes
                    budget.written(index, taken)
            finally:
                for f in window:
                    f.cancel()
                budget.close()  # loaders still waiting for bytes go on (and are dropped)

    def counted(items: Iterator[dict]) -> Iterator[dict]:
        for item in items:
            summary.written += 1
            yield item

    # streamed into each tar: memory holds the samples loading ahead, never a whole shard
    stream = samples()
    try:
        index = 0
        while (first := next(stream, None)) is not None:
            summary.shards.append(sink.write(index, counted(chain([first], islice(stream, samples_per_shard - 1)))))
            index += 1
    except BaseException:
        stream.close()
        sink.discard()
        raise
    if summary.written:
        sink.commit()
    else:  # nothing usable: the run failed, and DEST keeps its old shards
        sink.discard()
    return summary


def _where(reason: str) -> str:
    m = re.search(r"\(([^()]*)\)$", reason)
    return m.group(1) if m else ""


def _unique(key: str, used: set[str]) -> str:
    k, n = key, 1
    while k in used:
        n += 1
        k = f"{key}-{n}"
    used.add(k)
    return k


def summary_lines(s: IngestSummary, max_listed: int = 20) -> list[str]:
    cols = ", ".join(f"{k} from {v}" for k, v in s.columns.items())
    lines = [f"imprint: read {s.source} as {s.kind} ({cols})",
             f"imprint: wrote {s.written} samples to {len(s.shards)} shard(s)"
             + (f" in {os.path.dirname(s.shards[0])}" if s.shards else "")
             + (f"; {s.converted} image(s) converted to PNG" if s.converted else "")]
    if s.skipped:
        lines.append(f"imprint: skipped {len(s.skipped)}: " + ", ".join(f"{k} {n}" for k, n in s.reasons().most_common()))
        lines += [f"  skipped {reason}" for _, reason in s.skipped[:max_listed]]
        if len(s.skipped) > max_listed:
            lines.append(f"  ... and {len(s.skipped) - max_listed} more")
    if s.uncaptioned:
        lines.append(f"imprint: {s.uncaptioned} sample(s) have no caption: set input.source_prompt in the job "
                     "(\"\" for the empty prompt, or a template such as \"a photo of a {label}\")")
    if s.untargeted:
        lines.append(f"imprint: warning: {s.untargeted} of {s.written} sample(s) have no target prompts: each becomes "
                     "a bad sample (no_targets) unless the job sets input.templates; or give every sample targets "
                     "here with --target-template \"{source}, in the snow\" or --targets \"a photo in the snow\"")
    return lines
