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

Every sample is checked before it is written (the image decodes, in JPEG,
PNG or WebP, else converted to PNG; the caption is text); a bad one is
skipped with its reason and counted, never raised. Records flow one way:
source rows -> `load_sample` (in a thread pool: files and URLs are read in
parallel, order kept) -> shards of `samples_per_shard`, each written by
`data.write_shards` and, for object stores, uploaded through pyarrow.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

from .data import IMAGE_FILE_EXTS, IMAGE_FORMATS, MAX_MEMBER_BYTES, is_local, local_path, object_store, sniff_format, write_shards

TABLE_EXTS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # Hugging Face imagefolder
# Column names tried, in order, when --image-col / --caption-col / --targets-col are not given.
IMAGE_COLS = ("image", "image_path", "file_name", "filename", "path", "filepath", "img", "url", "image_url")
CAPTION_COLS = ("source_prompt", "caption", "text", "prompt", "txt")
TARGETS_COLS = ("target_prompts", "targets", "target_prompt")
EXT_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
LOOKAHEAD = 64  # records loaded ahead in the thread pool


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

    def reasons(self) -> Counter:
        return Counter(_reason_kind(r) for _, r in self.skipped)


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


# ---------------------------------------------------------------------------
# Finding the source
# ---------------------------------------------------------------------------


def find_source(src: str, *, image_col: str | None = None, caption_col: str | None = None,
                targets_col: str | None = None) -> Source:
    p = Path(local_path(src))
    if not is_local(src):
        raise IngestError(f"{src}: SRC must be a local file or folder (DEST may be an object store)")
    if not p.exists():
        raise IngestError(f"{src}: no such file or folder")
    cols = dict(image_col=image_col, caption_col=caption_col, targets_col=targets_col)
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
    images = [f for f in files if f.suffix.lower().lstrip(".") in IMAGE_FILE_EXTS]
    parquet = [f for f in files if f.suffix.lower() == ".parquet"]
    if parquet and not images:
        return _table_source(parquet, "parquet", **cols)
    if any(cols.values()):
        raise IngestError("--image-col, --caption-col and --targets-col are for tables and datasets; a folder of images "
                          "takes captions from .txt and fields from .json files next to each image")
    return _folder_source(p, images)


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
                obj = _json_object(side_json.read_bytes())
                if isinstance(obj, str):
                    yield Skip(f"bad_json: {side_json.relative_to(root)}: {obj}")
                    continue
                fields.update(obj)
                caption_from = "source_prompt" if "source_prompt" in obj else ""
            if side_txt.is_file() and not caption_from:
                try:
                    fields["source_prompt"] = side_txt.read_text(encoding="utf-8")
                except UnicodeDecodeError as exc:
                    yield Skip(f"bad_caption: {side_txt.relative_to(root)} is not UTF-8 ({exc})")
                    continue
                caption_from = "source_prompt"
            yield Record(key=rel, image=str(img), base=str(root), fields=fields, caption_from=caption_from,
                         targets_from="target_prompts" if "target_prompts" in fields else "",
                         where=img.relative_to(root).as_posix())

    return Source("folder", records, len(images), {"image": "files", "caption": ".txt / .json source_prompt",
                                                    "targets": ".json target_prompts"})


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


def _table_source(files: list[Path], kind: str, *, image_col, caption_col, targets_col) -> Source:
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
                yield _record(values, image, caption, targets, base=str(f.parent), where=where,
                              key=_table_key(kind, values.get(image), index))
                index += 1

    return Source(kind, records, total, {"image": image, "caption": caption or "(none)", "targets": targets or "(none)"})


def _file_kind(f: Path) -> str:
    return TABLE_EXTS.get(f.suffix.lower(), "csv")


def _table_key(kind: str, image: Any, index: int) -> str:
    """imagefolder: the file's name without extension (its folder too); tables: the number of the
    row among the readable rows, from 0 over all files."""
    if kind == "imagefolder" and isinstance(image, str):
        return os.path.splitext(image)[0]
    return f"{index:09d}"


def _record(values: dict, image_col: str, caption_col: str, targets_col: str, *, base: str, where: str,
            key: str) -> Record:
    fields = {k: v for k, v in values.items() if k not in (image_col, caption_col, targets_col)}
    if caption_col and values.get(caption_col) is not None:
        fields["source_prompt"] = values[caption_col]
    if targets_col and values.get(targets_col) is not None:
        fields["target_prompts"] = values[targets_col]
    return Record(key=key, image=values.get(image_col), base=base, fields=fields,
                  caption_from=caption_col, targets_from=targets_col, where=where)


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


def _hf_disk_source(p: Path, *, image_col, caption_col, targets_col) -> Source:
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

    def records():
        for split, ds in splits.items():
            labels = {c: t.names for c, t in ds.features.items() if isinstance(t, datasets.ClassLabel)}
            if isinstance(ds.features.get(image), datasets.Image):
                ds = ds.cast_column(image, datasets.Image(decode=False))  # the stored bytes, not a decoded PIL image
            for i, row in enumerate(ds):
                row = _name_labels(row, labels)
                if split:
                    row.setdefault("split", split)
                yield _record(row, image, caption, targets, base=str(p), where=f"{split or 'row'} {i}",
                              key=f"{split}-{i:09d}" if split else f"{i:09d}")

    total = sum(len(ds) for ds in splits.values())
    return Source("hf-dataset", records, total, {"image": image, "caption": caption or "(none)", "targets": targets or "(none)"})


# ---------------------------------------------------------------------------
# One record -> one sample
# ---------------------------------------------------------------------------


def load_sample(rec: Record, fetch: Callable[[str], bytes], max_pixels: int = 64_000_000) -> dict:
    """A WebDataset sample (`__key__`, image bytes under its extension,
    `json`) from a record; raises Skip with the reason when it is unusable."""
    data = _image_bytes(rec, fetch)
    ext, data, converted = _checked_image(data, max_pixels)
    obj = _json_fields(rec)
    sample = {"__key__": rec.key, ext: data, "json": obj, **rec.entries}
    if converted:
        sample["__converted__"] = True
    return sample


def _image_bytes(rec: Record, fetch) -> bytes:
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
    try:
        size = path.stat().st_size
        if size > MAX_MEMBER_BYTES:
            raise Skip(f"too_large: {path} is {size} bytes")
        return path.read_bytes()
    except FileNotFoundError:
        raise Skip(f"missing_file: {path} not found") from None
    except OSError as exc:
        raise Skip(f"unreadable_file: {path}: {exc.strerror or exc}") from None


def _checked_image(data: bytes, max_pixels: int) -> tuple[str, bytes, bool]:
    """(extension, bytes, converted): JPEG/PNG/WebP bytes kept as they are
    once they decode; any other format PIL reads is re-encoded to PNG."""
    if not data:
        raise Skip("decode: empty image")
    fmt = sniff_format(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # a contract format is decoded by its own plugin only (a camera's JPEG would open as MPO)
            img = Image.open(io.BytesIO(data), formats=[fmt] if fmt in IMAGE_FORMATS else None)
            w, h = img.size
            if w * h > max_pixels:
                raise Skip(f"too_large: {w}x{h} pixels")
            img.load()
    except Skip:
        raise
    except Image.UnidentifiedImageError:
        raise Skip("decode: not an image format PIL reads") from None
    except Exception as exc:  # noqa: BLE001 - whatever PIL raises on bad bytes
        raise Skip(f"decode: not a readable image ({type(exc).__name__}: {_one_line(exc)})") from None
    if fmt in IMAGE_FORMATS:
        return EXT_OF_FORMAT[fmt], data, False
    buf = io.BytesIO()
    keep = img.mode if img.mode in ("RGB", "RGBA", "L", "LA", "I;16") else "RGBA" if "A" in img.getbands() else "RGB"
    (img if img.mode == keep else img.convert(keep)).save(buf, format="PNG")
    return "png", buf.getvalue(), True


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


def url_fetcher(timeout: float = 30.0, retries: int = 2) -> Callable[[str], bytes]:
    """GET with `requests`: connect/read timeouts, retries with backoff on
    connection errors and 429/5xx (urllib3's Retry), and a size cap."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    retry = Retry(total=retries, connect=retries, read=retries, backoff_factor=0.5,
                  status_forcelist=(429, 500, 502, 503, 504), allowed_methods=("GET",), raise_on_status=False)
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=32)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "imprint-shards"

    def fetch(url: str) -> bytes:
        try:
            with session.get(url, timeout=(min(10.0, timeout), timeout), stream=True) as r:
                if r.status_code != 200:
                    raise Skip(f"http_error: HTTP {r.status_code} for {url[:120]}")
                buf = bytearray()
                for chunk in r.iter_content(1 << 16):
                    buf += chunk
                    if len(buf) > MAX_MEMBER_BYTES:
                        raise Skip(f"too_large: {url[:120]} is over {MAX_MEMBER_BYTES} bytes")
                return bytes(buf)
        except requests.RequestException as exc:
            raise Skip(f"http_error: {url[:120]}: {type(exc).__name__}: {_one_line(exc)[:160]}") from None

    return fetch


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


class ShardSink:
    """Shards `{prefix}-000000.tar`, ... in a local folder or an object-store
    prefix. Each is written complete to a local file by `data.write_shards`
    (renamed into place locally, uploaded in one request to an object store)."""

    def __init__(self, dest: str, prefix: str, overwrite: bool):
        self.dest, self.prefix = dest.rstrip("/"), prefix
        self.local = is_local(dest)
        if self.local:
            self.root = Path(local_path(dest))
            if self.root.exists() and not self.root.is_dir():
                raise IngestError(f"{dest}: DEST must be a folder")
            self.root.mkdir(parents=True, exist_ok=True)
            existing = sorted(str(f) for f in self.root.glob("*.tar"))
        else:
            import pyarrow.fs as pafs

            self.fs, self.base = object_store(self.dest)
            self.fs.create_dir(self.base, recursive=True)  # a marker at most on object stores; needed elsewhere
            infos = self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))
            existing = sorted(i.path for i in infos if i.path.endswith(".tar"))
        mine = [e for e in existing if os.path.basename(e).startswith(f"{prefix}-")]
        if existing and not (overwrite and len(mine) == len(existing)):
            what = f"{len(existing)} .tar file(s), e.g. {existing[0]}"
            hint = ("--overwrite replaces only shards named "
                    f"{prefix}-*.tar" if overwrite else "pass --overwrite to replace them, or choose an empty DEST")
            raise IngestError(f"{dest} already holds {what}; a job reading this folder would read them too ({hint})")
        for e in mine:
            if self.local:
                os.remove(e)
            else:
                self.fs.delete_file(e)

    def write(self, index: int, samples: Iterable[dict]) -> str:
        name = f"{self.prefix}-{index:06d}.tar"
        if self.local:
            return write_shards(samples, str(self.root / name))
        with tempfile.TemporaryDirectory(prefix="imprint-shards-") as tmp:
            local = write_shards(samples, os.path.join(tmp, name))
            with open(local, "rb") as src, self.fs.open_output_stream(f"{self.base.rstrip('/')}/{name}") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        return f"{self.dest}/{name}"


def make_shards(src: str, dest: str, *, image_col: str | None = None, caption_col: str | None = None,
                targets_col: str | None = None, samples_per_shard: int = 1000, prefix: str = "shard",
                overwrite: bool = False, timeout: float = 30.0, workers: int = 8, progress: bool = True,
                fetch: Callable[[str], bytes] | None = None, format: str | None = None) -> IngestSummary:
    """Write SRC's samples to DEST as WebDataset shards; see the module doc.
    Raises IngestError (nothing written) when SRC or DEST is unusable."""
    if samples_per_shard < 1:
        raise IngestError("--samples-per-shard must be at least 1")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise IngestError(f"--prefix {prefix!r}: letters, digits, - and _ only")
    if format is not None:  # a benchmark's own layout: its reader in pipeline/pie_bench.py
        from .pie_bench import format_source
        source = format_source(format, src)
    else:
        source = find_source(src, image_col=image_col, caption_col=caption_col, targets_col=targets_col)
    sink = ShardSink(dest, prefix, overwrite)
    summary = IngestSummary(source=src, kind=source.kind, columns=source.columns)
    fetch = fetch or url_fetcher(timeout)
    used: set[str] = set()

    def load(item: Record | Skip):
        if isinstance(item, Skip):
            return item
        try:
            return load_sample(item, fetch)
        except Skip as exc:
            return Skip(f"{exc} ({item.where})")
        except Exception as exc:  # noqa: BLE001 - a record's data must not stop the others
            return Skip(f"other: {type(exc).__name__}: {_one_line(exc)} ({item.where})")

    def samples() -> Iterator[dict]:
        from tqdm import tqdm

        with ThreadPoolExecutor(max(1, workers)) as pool, \
                tqdm(total=source.total, unit="img", desc="imprint shards", disable=not progress) as bar:
            records = source.records()
            while True:
                chunk = list(islice(records, LOOKAHEAD))
                if not chunk:
                    return
                for out in pool.map(load, chunk):
                    bar.update(1)
                    if isinstance(out, Skip):
                        summary.skipped.append((_where(str(out)), str(out)))
                        continue
                    out["__key__"] = _unique(safe_key(out["__key__"]), used)
                    summary.converted += bool(out.pop("__converted__", False))
                    summary.uncaptioned += "source_prompt" not in out["json"]
                    yield out

    def counted(items: Iterator[dict]) -> Iterator[dict]:
        for item in items:
            summary.written += 1
            yield item

    # streamed into each tar: memory holds the samples loading ahead, never a whole shard
    stream = samples()
    index = 0
    while (first := next(stream, None)) is not None:
        summary.shards.append(sink.write(index, counted(chain([first], islice(stream, samples_per_shard - 1)))))
        index += 1
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
    return lines
