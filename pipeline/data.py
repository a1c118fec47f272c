"""Input side: shard lists, reading WebDataset tars, decoding and checking
samples, and the geometry rule that maps any image to the model's grid.

A bad sample never raises out of here: it becomes a `Sample` with `error`
(and a short `error_type`) set, and the worker writes it as an error row.
Only a shard that cannot be opened or is not a tar at all raises (the driver
retries it and, after the last attempt, marks it failed).

Nothing here runs a shell command unless the job allows `pipe:` URLs, and
that is checked on every expanded URL, both when the shard list is built and
again when a shard is opened.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import io
import json
import logging
import os
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

from .tables import EDIT_MASK_KEY  # noqa: F401 (the sample's edit-mask entry: the contracts' module is its home)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# The only decoders PIL may use on sample bytes (the input contract,
# schemas/sample.md). Whatever the member's name says, TIFF, EPS (Ghostscript),
# PSD, ... bytes are refused before any other plugin sees them.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
DEMO = "demo"
# Object stores read through pyarrow's filesystems; http(s) through requests
# (`HttpShardStream`: read to its end or failed). Any other scheme is refused.
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "hdfs")
REMOTE_SCHEMES = ("http", "https", *OBJECT_STORE_SCHEMES)
# A tar member larger than this is not read into memory; its sample becomes an
# error row (no legitimate image, caption or mask of this contract is that big).
MAX_MEMBER_BYTES = 256 * 1024 * 1024
TOY_DEMO = "toy-demo"
TOY_PIE = "toy-pie"  # toy scenes with edit masks and edit types: PIE-Bench's protocol offline (pipeline.toy.demo)
OBJECT_READ_BUFFER = 8 * 2**20  # bytes per request when reading a shard from an object store  # the toy model's scenes (pipeline.toy.demo)


@dataclass
class Sample:
    key: str
    shard: str
    source_prompt: str = ""
    target_prompts: list[str] = field(default_factory=list)
    image: torch.Tensor | None = None  # [3, H, W] float32 in [-1, 1], already at model geometry
    orig_size: tuple[int, int] = (0, 0)  # (width, height) as decoded
    error: str = ""
    error_type: str = ""  # short snake_case kind of `error` (ERROR_TYPES), "" when ok
    extras: dict = field(default_factory=dict)  # other entries of the sample (bytes), e.g. masks
    # the `edit_mask.png` entry at the model geometry of `image`: [H, W] float32, 1 = the edit region
    # (PIE-Bench's masks; the background metrics measure outside it); None when the sample has none
    edit_mask: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)  # the sample json's other fields (not source/target prompts)


# The kinds of bad sample this module produces (Sample.error_type).
ERROR_TYPES = ("decode", "format_refused", "too_large", "too_small", "no_image", "prompt_missing", "prompt_invalid",
               "prompt_too_long", "no_targets", "bad_json", "duplicate_key", "tar_damaged", "no_key", "no_strokes",
               "bad_code", "p2p_unaligned", "template_field", "other")


class ShardReadError(OSError):
    """Reading a shard's bytes failed (a refused or failed request, a
    connection reset, an I/O error): nothing says the shard is bad, so the
    attempt fails and the driver retries the shard. Only bytes that were read
    and are not a valid tar are damage (a `tar_damaged` error row)."""


class SampleError(ValueError):
    """A bad sample: `kind` is its Sample.error_type."""

    def __init__(self, message: str, kind: str = "other"):
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------


def url_scheme(url: str) -> str:
    """"pipe" for pipe: commands, the scheme of a URL, "" for a local path
    (file:// counts as local)."""
    if url.startswith("pipe:"):
        return "pipe"
    if "://" in url:
        scheme = url.split("://", 1)[0].lower()
        return "" if scheme == "file" else scheme
    return ""


def check_url_allowed(url: str, *, allow_pipe: bool, allow_remote: bool = True) -> None:
    """Raise ValueError unless `url` may be opened under these rules. Called
    on every expanded URL when the shard list is built and again right
    before a shard is opened."""
    scheme = url_scheme(url)
    if scheme == "pipe":
        if not allow_pipe:
            raise ValueError(f"{url!r} is a pipe: shell command; set input.allow_pipe = true to allow it")
    elif scheme and scheme not in REMOTE_SCHEMES:
        raise ValueError(f"{url!r}: unsupported URL scheme {scheme!r} (local paths, file://, {', '.join(REMOTE_SCHEMES)}"
                         + (", pipe:)" if allow_pipe else ")"))
    elif scheme and not allow_remote:
        raise ValueError(f"{url!r} is a remote URL; not opened without an explicit flag")


def brace_urls(patterns: Iterable[str], *, allow_pipe: bool) -> Iterator[str]:
    """Brace-expand each pattern (the name `demo` stays as is) and check
    every resulting URL against the pipe rule: `{pipe:cmd,a.tar}` expands to
    a pipe command even though the pattern does not start with `pipe:`."""
    from braceexpand import braceexpand

    for pat in patterns:
        if pat in (DEMO, TOY_DEMO, TOY_PIE):
            yield pat
            continue
        # a pipe command is a shell line: its braces belong to the shell
        for url in [pat] if pat.startswith("pipe:") or "{" not in pat else braceexpand(pat):
            check_url_allowed(url, allow_pipe=allow_pipe)
            yield url


def expand_shards(patterns: list[str], *, allow_pipe: bool = False) -> list[str]:
    """The shard URLs of the job's patterns, in order, without duplicates:
    brace expansion, globs (`data/*.tar`, local or on an object store), a
    directory (every `.tar` in it, sorted) and `demo`. Raises ValueError on a
    URL the rules refuse (see `check_url_allowed`), on a local folder without
    .tar files and on image, caption or table files (`check_is_shard_name`),
    saying to run `imprint shards` on them."""
    out: list[str] = []
    seen: set[str] = set()
    try:
        for url in brace_urls(patterns, allow_pipe=allow_pipe):
            for s in _resolve(url):
                check_is_shard_name(s)
                if s not in seen:
                    seen.add(s)
                    out.append(s)
    except ValueError as exc:
        raise ValueError(f"input.shards: {exc}") from None
    return out


def _resolve(url: str) -> list[str]:
    """One brace-expanded URL -> the shard URLs it names."""
    if url == DEMO:
        return demo_shards()
    if url == TOY_DEMO:
        from .toy.demo import TOY_DEMO_SCENES, toy_demo_samples

        return builtin_shards(TOY_DEMO, 2, toy_demo_samples, [TOY_DEMO_SCENES])
    if url == TOY_PIE:
        from .toy.demo import TOY_PIE_SCENES, toy_pie_samples

        return builtin_shards(TOY_PIE, 1, toy_pie_samples, [TOY_PIE_SCENES])
    scheme = url_scheme(url)
    if scheme in ("pipe", "http", "https"):
        return [url]
    if scheme:  # object store: globs and "folder/" are listed through pyarrow
        if globlib.has_magic(url.split("://", 1)[1]) or url.endswith("/"):
            return _list_remote(url)
        return [url]
    path = local_path(url)
    if globlib.has_magic(path) and not os.path.exists(path):
        prefix = url[: len(url) - len(path)]  # keep file:// when given
        return [prefix + p for p in sorted(globlib.glob(path)) if os.path.isfile(p)]
    if not path.endswith(".tar") and os.path.isdir(path):  # (no stat per shard for plain .tar names)
        prefix = url[: len(url) - len(path)]
        names = sorted(os.listdir(path))
        shards = [prefix + os.path.join(path, n) for n in names if n.endswith(".tar") and os.path.isfile(os.path.join(path, n))]
        if not shards:
            raise ValueError(f"{url!r} is a folder without .tar shards ({_folder_contents(path, names)}); "
                             f"{MAKE_SHARDS_HINT.format(src=url)}")
        return shards
    return [url]


# Files that are inputs to `imprint shards`, never shards themselves.
IMAGE_FILE_EXTS = (*IMAGE_EXTS, "bmp", "gif", "tif", "tiff")
NOT_SHARD_EXTS = (*IMAGE_FILE_EXTS, "txt", "json", "jsonl", "csv", "tsv", "parquet")
MAKE_SHARDS_HINT = "make WebDataset shards from it with `imprint shards {src} SHARDS_FOLDER` and point input.shards there"


def _folder_contents(path: str, names: list[str]) -> str:
    if not names:
        return "it is empty"
    images = sum(1 for n in names if n.rsplit(".", 1)[-1].lower() in IMAGE_FILE_EXTS)
    return f"it holds {len(names)} entries, {images} of them images" if images else f"it holds {len(names)} entries, none a .tar"


def check_is_shard_name(url: str) -> None:
    """Refuse a URL whose name says image, caption or table file (a glob such
    as `photos/*.png`): those go through `imprint shards` first. Names only,
    no I/O; a shard with any other name is opened as a tar."""
    name = os.path.basename(url.rstrip("/")).lower()
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    if ext in NOT_SHARD_EXTS and not url.startswith("pipe:"):
        # a table is imprint shards' SRC itself; an image or sidecar's SRC is its folder
        src = url if ext in ("jsonl", "csv", "tsv", "parquet") else os.path.dirname(url) or "."
        raise ValueError(f"{url!r} is a .{ext} file, not a WebDataset shard (.tar); {MAKE_SHARDS_HINT.format(src=src)}")


def _list_remote(url: str) -> list[str]:
    """`s3://bucket/data/*.tar` or `s3://bucket/data/` -> the matching object URLs, sorted."""
    import pyarrow.fs as pafs

    scheme, rest = url.split("://", 1)
    pattern = rest + "*.tar" if rest.endswith("/") else rest
    # list from the longest folder without glob characters, recursively only when the pattern needs it
    parts = pattern.split("/")
    fixed = []
    for p in parts[:-1]:
        if globlib.has_magic(p):
            break
        fixed.append(p)
    base = "/".join(fixed)
    fs, base_path = object_store(f"{scheme}://{base}")
    recursive = len(fixed) < len(parts) - 1 or "**" in pattern
    infos = fs.get_file_info(pafs.FileSelector(base_path, recursive=recursive, allow_not_found=True))
    # match against the pattern rewritten relative to what the filesystem returns
    rel = pattern[len(base):].lstrip("/")
    full = (base_path.rstrip("/") + "/" + rel) if base_path else rel
    depth = None if "**" in full else full.count("/")  # fnmatch's * also matches "/": keep glob levels apart
    return sorted(f"{scheme}://{i.path}" for i in infos
                  if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, full)
                  and (depth is None or i.path.count("/") == depth))


def object_store(url: str):
    """(pyarrow filesystem, path) of an object-store URL."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(url)


def is_local(url: str) -> bool:
    return url_scheme(url) == ""


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def count_samples(url: str) -> int | None:
    """Samples in a local tar shard, from its member headers alone (no data
    read): WebDataset's grouping, members that share a key (the path up to
    the first dot of the file name) in a row are one sample. None for a
    remote or unreadable shard (its size is then estimated)."""
    if not is_local(url):
        return None
    n, last = 0, None
    try:
        with tarfile.open(local_path(url), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                key = (folder, name.split(".", 1)[0])
                if key != last:
                    n, last = n + 1, key
    except (OSError, tarfile.TarError):
        return None
    return n


def missing_shards(shards: list[str]) -> list[str]:
    """Local shards that do not exist (remote ones are checked when opened)."""
    return [s for s in shards if is_local(s) and not os.path.isfile(local_path(s))]


def shard_name(url: str) -> str:
    """A stable, filesystem-safe name for a shard's output files: its stem
    plus a short hash of the full URL (two shards may share a basename)."""
    import hashlib

    stem = os.path.basename(url.rstrip("/")).split(".tar")[0] or "shard"
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80]
    return f"{stem}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's rule: key = name up to the first dot of the basename


def split_member_name(name: str) -> tuple[str | None, str | None]:
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def read_raw_samples(url: str, *, allow_pipe: bool = False, allow_remote: bool = True) -> Iterator[dict]:
    """Yield raw WebDataset samples (dicts of extension -> bytes, plus
    __key__) from one shard, reading the tar members in stream mode.

    - A sample is yielded as soon as the next key starts, so damage later in
      the tar never costs an earlier, complete sample.
    - A key seen before in this shard (e.g. the same sample written twice in
      a row) gives a sample with `__error__` (`duplicate_key`) and reading goes on.
    - Damage (truncation mid-member or mid-header, a corrupt header, a
      broken compressed stream) ends the shard with one sample carrying
      `__error__` (`tar_damaged`): the sample being read when it happened,
      whose members may be incomplete.
    - A stream that is not a tar at all raises OSError (the shard fails).
    - A read that fails (any OSError from the stream: a refused request,
      a reset connection) raises ShardReadError: the attempt fails and the
      shard is retried, never committed with the samples read so far."""
    check_url_allowed(url, allow_pipe=allow_pipe, allow_remote=allow_remote)
    try:
        stream = _ReadGuard(open_shard(url, allow_pipe=allow_pipe, allow_remote=allow_remote), url)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ShardReadError(f"cannot open shard {url}: {type(exc).__name__}: {exc}") from exc
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_TrackedTarInfo)
        except ShardReadError:
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise OSError(f"cannot read shard {url}: not a readable tar ({type(exc).__name__}: {exc})") from exc
        yield from _group_members(tar, url)
    finally:
        stream.close()


class _ReadGuard(io.RawIOBase):
    """The shard's stream, with every failed read turned into ShardReadError,
    so the tar reader below cannot mistake an I/O error for damage."""

    def __init__(self, stream, url: str):
        self.stream, self.url, self.offset = stream, url, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.stream.read(n) if n is not None and n >= 0 else self.stream.read()
        except OSError as exc:
            raise ShardReadError(f"reading shard {self.url} failed at byte {self.offset}: "
                                 f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
        self.offset += len(data)
        return bytes(data)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self.stream.close()
        except OSError:
            pass
        super().close()


class _TrackedTarInfo(tarfile.TarInfo):
    """Records why tarfile stopped: in stream mode it treats a corrupt or
    truncated header after the first member as a normal end of archive."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise  # zero block: the archive's proper end
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError, tarfile.EmptyHeaderError) as exc:
            tar._imprint_damage = f"{type(exc).__name__}: {exc or 'archive ends without its end-of-archive blocks'}"
            raise


def _group_members(tar: tarfile.TarFile, url: str) -> Iterator[dict]:
    seen: set[str] = set()
    current: dict | None = None
    damage = ""
    try:
        while True:
            try:
                member = tar.next()
            except ShardReadError:
                raise
            except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
                damage = f"{type(exc).__name__}: {exc}"
                break
            tar.members.clear()  # stream mode would keep every member header in memory
            if member is None:
                damage = getattr(tar, "_imprint_damage", "")
                break
            if not member.isfile():
                continue
            # "./a.jpg" (`tar cf x.tar -C folder .`) is the sample "a", as "a.jpg" is
            key, ext = split_member_name(member.name[2:] if member.name.startswith("./") else member.name)
            if key is None or os.path.basename(member.name).startswith("__"):
                continue  # no extension, or WebDataset metadata: not part of a sample
            if current is not None and (key != current["__key__"] or ext in current):
                yield current  # complete: the next member starts another sample
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
                if key in seen:
                    current["__error__"] = (f"duplicate key {key!r} in shard (a sample with this key came earlier; "
                                            "a sample's files must be next to each other in the tar: "
                                            "`tar --sort=name` or `imprint shards`)")
                    current["__error_type__"] = "duplicate_key"
                seen.add(key)
            if member.size > MAX_MEMBER_BYTES:
                current.setdefault("__error__", f"tar member {member.name!r} is {member.size} bytes "
                                                f"(more than {MAX_MEMBER_BYTES}); not read")
                current.setdefault("__error_type__", "too_large")
                current[ext] = b""
                continue  # tarfile skips the unread data when asked for the next member
            try:
                current[ext] = tar.extractfile(member).read()
            except ShardReadError:
                raise
            except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
                damage = f"member {member.name!r}: {type(exc).__name__}: {exc}"
                break
    finally:
        if damage:
            bad = current or {"__key__": f"__damaged_after_{len(seen)}_samples__", "__url__": url}
            bad["__error__"] = f"tar damaged while reading this sample ({damage}); the rest of the shard is unreadable"
            bad["__error_type__"] = "tar_damaged"
            current = bad
    if current is not None:
        yield current


def open_shard(url: str, *, allow_pipe: bool = False, allow_remote: bool = True):
    """A binary stream for a shard: object stores through pyarrow's
    filesystems (s3://, gs://, hdfs://), local files, http(s) through
    `HttpShardStream` and, only when allowed, pipe: commands."""
    check_url_allowed(url, allow_pipe=allow_pipe, allow_remote=allow_remote)
    scheme = url_scheme(url)
    if scheme in OBJECT_STORE_SCHEMES:
        # Read ahead in large blocks: the tar reader asks for 512 B-10 KiB at a
        # time, and unbuffered each ask is one ranged GET.
        fs, path = object_store(url)
        return fs.open_input_stream(path, buffer_size=OBJECT_READ_BUFFER)
    if scheme == "":
        return open(local_path(url), "rb")
    if scheme in ("http", "https"):
        return HttpShardStream(url)
    from webdataset import gopen

    return gopen(url, "rb")


HTTP_SHARD_TIMEOUT = (30.0, 120.0)  # seconds to connect, and with no byte received, before the attempt fails


class HttpShardStream(io.RawIOBase):
    """An http(s) shard read to its end or not at all. A failed request, a
    status other than 200, a connection that breaks, a body shorter than its
    Content-Length or a cut chunked body raise OSError from `read`, and the
    end of the body is reported only once its length is checked: the tar
    reader never sees a clean end of a broken transfer (which it would take
    for a damaged tar and commit). A body with neither a length nor chunked
    framing cannot be told complete from cut, so it is refused. The bytes are
    the body as sent (no Content-Encoding decoding: the length counts those;
    tarfile reads gzip itself)."""

    def __init__(self, url: str, timeout: tuple[float, float] = HTTP_SHARD_TIMEOUT):
        import requests

        self.url, self.received = url, 0
        self._session = requests.Session()
        try:
            self._resp = self._session.get(url, stream=True, timeout=timeout, headers={"User-Agent": "imprint"})
        except requests.RequestException as exc:
            self._session.close()
            raise OSError(f"GET {url}: {type(exc).__name__}: {exc}") from exc
        try:
            if self._resp.status_code != 200:
                raise OSError(f"GET {url}: HTTP {self._resp.status_code}")
            length = self._resp.headers.get("Content-Length", "")
            self.length = int(length) if length.isdigit() else None
            chunked = "chunked" in self._resp.headers.get("Transfer-Encoding", "").lower()
            if self.length is None and not chunked:
                raise OSError(f"GET {url}: the server sent neither a Content-Length nor a chunked body, so a cut "
                              "transfer could not be told from a complete one")
        except BaseException:
            self.close()
            raise

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        from urllib3.exceptions import HTTPError as Urllib3Error

        try:
            data = self._resp.raw.read(n if n is not None and n >= 0 else None, decode_content=False)
        except (Urllib3Error, OSError) as exc:
            raise OSError(f"GET {self.url}: transfer broke after {self.received} bytes: {type(exc).__name__}: {exc}") from exc
        self.received += len(data)
        if self.length is not None and self.received > self.length:
            raise OSError(f"GET {self.url}: more bytes than the Content-Length ({self.length})")
        if not data and n != 0 and self.length is not None and self.received != self.length:
            raise OSError(f"GET {self.url}: transfer ended after {self.received} of {self.length} bytes")
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                if hasattr(self, "_resp"):
                    self._resp.close()
            finally:
                self._session.close()
        super().close()


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


def decode_sample(raw: dict, shard: str, spec_input, spec_image, resolution: int, count_tokens=None) -> Sample:
    """Turn a raw WebDataset sample into a checked `Sample` (never raises)."""
    key = str(raw.get("__key__", ""))
    sample = Sample(key=key, shard=shard)
    try:
        if "__error__" in raw:
            raise SampleError(raw["__error__"], raw.get("__error_type__", "other"))
        if not key:
            raise SampleError("sample has no __key__", "no_key")
        sample.source_prompt, sample.target_prompts, sample.meta = _prompts(raw, spec_input, count_tokens)
        img_ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if img_ext is None:
            raise SampleError(f"no image entry (expected one of {', '.join(IMAGE_EXTS)}; found {', '.join(_exts(raw)) or 'none'})",
                              "no_image")
        pil = load_image(raw[img_ext], spec_image)
        sample.orig_size = pil.size
        sample.image = to_model_tensor(pil, spec_image, resolution)
        sample.extras = {k: v for k, v in raw.items() if not k.startswith("__") and k not in (img_ext, "json", "txt")}
        if EDIT_MASK_KEY in raw:
            sample.edit_mask = edit_mask_tensor(raw[EDIT_MASK_KEY], pil.size, spec_image, resolution)
    except SampleError as exc:
        sample.error, sample.error_type = str(exc), exc.kind
    except Exception as exc:  # anything else the decoders throw is still the sample's fault
        sample.error, sample.error_type = f"{type(exc).__name__}: {exc}", "other"
    return sample


def _exts(raw: dict) -> list[str]:
    return [k for k in raw if not k.startswith("__")]


PROMPT_FIELDS = ("source_prompt", "target_prompts")


def _prompts(raw: dict, spec_input, count_tokens) -> tuple[str, list[str], dict]:
    """(source prompt, target prompts, the json's other fields).

    The source prompt is the sample's caption (json `source_prompt`, else the
    `txt` entry) unless the job sets `input.source_prompt`: "" inverts every
    image with the empty prompt, a template (`"a photo of a {label}"`) is
    filled from the sample's json fields (`{source}` = its caption)."""
    meta: dict = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8") if isinstance(raw["json"], bytes) else raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise SampleError(f"unreadable json: {type(exc).__name__}: {exc}", "bad_json") from None
        if not isinstance(meta, dict):
            raise SampleError("json must be an object with source_prompt and optional target_prompts", "bad_json")
    caption = meta.get("source_prompt")
    if caption is None and "txt" in raw:
        try:
            caption = raw["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SampleError(f"txt caption is not UTF-8: {exc}", "prompt_invalid") from None
    if caption is not None and not isinstance(caption, str):
        raise SampleError("json source_prompt must be a string", "prompt_invalid")
    caption = (caption or "").strip()
    others = {k: v for k, v in meta.items() if k not in PROMPT_FIELDS}
    template = getattr(spec_input, "source_prompt", None)
    if template is None:
        if not caption:
            raise SampleError("missing or empty source prompt (json source_prompt or txt caption; for uncaptioned "
                              "data set input.source_prompt: \"\" or a template such as \"a photo of a {label}\")",
                              "prompt_missing")
        source = caption
    else:
        source = render_templates([template], TemplateFields(others, caption or None))[0].strip() if template else ""
        if template and not source:
            raise SampleError(f"input.source_prompt {template!r} renders empty for this sample", "prompt_missing")
    targets = meta.get("target_prompts", [])
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise SampleError("target_prompts must be a list of strings", "prompt_invalid")
    targets = [t.strip() for t in targets]
    if any(not t for t in targets):
        raise SampleError("empty target prompt in target_prompts", "prompt_invalid")
    rendered = [t.strip() for t in render_templates(spec_input.templates, TemplateFields(others, source))]
    if any(not t for t in rendered):
        raise SampleError("a target template of input.templates renders empty for this sample", "prompt_invalid")
    targets = list(dict.fromkeys(targets + rendered))  # same target twice would only duplicate work
    if not targets:
        raise SampleError("no target prompts (none in the sample and no input.templates in the job)", "no_targets")
    if count_tokens is not None:
        for p in [source, *targets]:
            n = count_tokens(p)
            if n <= spec_input.max_prompt_tokens:
                continue
            if not getattr(spec_input, "truncate_prompts", True):
                raise SampleError(
                    f"prompt too long: {n} tokens > {spec_input.max_prompt_tokens} (input.max_prompt_tokens; "
                    f"input.truncate_prompts = false): {p[:60]!r}...", "prompt_too_long")
            # the text encoder keeps the first tokens of its context, as diffusers does; the rows say so
            others = {**others, "truncated_prompt": True}
    return source, targets, others


class _QuietLengthWarning(logging.Filter):
    """Counting a long prompt's tokens (untruncated, to tell it is long) makes
    transformers warn that running it "will result in indexing errors": it
    never runs untruncated here (see `_prompts`), so the warning misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "indexing errors" not in record.getMessage()


logging.getLogger("transformers.tokenization_utils_base").addFilter(_QuietLengthWarning())


class TemplateFields(dict):
    """What a template may name: the sample json's fields (strings and
    numbers) and `source`. Naming anything else makes the sample an error
    row that names the field."""

    def __init__(self, fields: dict, source: str | None):
        super().__init__({k: v for k, v in fields.items() if k != "source"})
        self.source = source

    def __missing__(self, name: str):
        if name in PROMPT_FIELDS:
            raise SampleError(f"template field {{{name}}}: the prompts are not template fields; {{source}} is the "
                              "source prompt (the caption in input.source_prompt)", "template_field")
        if name == "source":
            if self.source is None:
                raise SampleError("template field {source}: the sample has no caption (json source_prompt or txt)",
                                  "template_field")
            return self.source
        raise SampleError(f"template field {{{name}}}: the sample's json has no field {name!r}", "template_field")

    def __getitem__(self, name: str):
        if name == "source" and self.source is not None:
            if not self.source:  # input.source_prompt = "": "{source} in the snow" would lose its subject
                raise SampleError("template field {source}: the source prompt is empty (input.source_prompt = \"\"), "
                                  "so the target would lose its subject; name a json field ({label}) or leave "
                                  "{source} out", "template_field")
            return self.source
        value = super().__getitem__(name)  # __missing__ when absent
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            kind = "null" if value is None else f"a {type(value).__name__}"
            raise SampleError(f"template field {{{name}}}: the sample's json field {name!r} is {kind}, "
                              "not a string or number", "template_field")
        return value


def render_templates(templates: list[str], fields) -> list[str]:
    """Fill templates from `fields` (a `TemplateFields`, or a plain source
    prompt string for `{source}`). `spec.check_template` allowed only plain
    field names in them (no attribute or index access, conversions or format
    specs), so `str.format_map` reaches nothing but those values; a missing
    field raises SampleError ("template_field") naming it."""
    if isinstance(fields, str):
        fields = TemplateFields({}, fields)
    return [t.format_map(fields) for t in templates]


def load_image(data: bytes, spec_image) -> Image.Image:
    """Decode image bytes to RGB, refusing other formats than the input
    contract's, bombs and degenerate sizes. Handles L, LA, P, RGBA
    (composited on white), CMYK, I;16 and I modes and the EXIF orientation."""
    if not data:
        raise SampleError("empty image bytes", "decode")
    fmt = sniff_format(data)
    if fmt is not None and fmt not in IMAGE_FORMATS:
        raise SampleError(f"image format refused: {fmt} (the input contract accepts {', '.join(IMAGE_FORMATS)})",
                          "format_refused")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = spec_image.max_pixels
            try:
                img = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
                w, h = img.size
                if w * h > spec_image.max_pixels:
                    raise SampleError(f"image too large: {w}x{h} = {w * h} pixels > image.max_pixels ({spec_image.max_pixels})",
                                      "too_large")
                img.load()
            finally:
                Image.MAX_IMAGE_PIXELS = old
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SampleError(f"image refused as a decompression bomb: {exc}", "too_large") from None
    except Exception as exc:
        raise SampleError(f"cannot decode image: {type(exc).__name__}: {exc}", "decode") from None
    w, h = img.size
    if min(w, h) < spec_image.min_side:
        raise SampleError(f"image too small: {w}x{h} (image.min_side = {spec_image.min_side})", "too_small")
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def sniff_format(data: bytes) -> str | None:
    """The PIL format whose signature `data` starts with, without opening it
    with that plugin (only the plugins' prefix checks run); None when no
    plugin claims it."""
    Image.init()
    prefix = data[:16]
    for fmt in IMAGE_FORMATS:  # ours first: some signatures overlap
        if _accepts(fmt, prefix):
            return fmt
    for fmt in Image.OPEN:
        if fmt not in IMAGE_FORMATS and _accepts(fmt, prefix):
            return fmt
    return None


def _accepts(fmt: str, prefix: bytes) -> bool:
    accept = Image.OPEN[fmt][1]
    try:
        return bool(accept(prefix)) if accept else False
    except Exception:  # noqa: BLE001 - a plugin's signature check must not fail the sample
        return False


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float32)  # exact for 16-bit values, half float64's memory
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img)
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def target_size(w: int, h: int, spec_image, resolution: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The geometry rule. Returns ((resize_w, resize_h), (crop_w, crop_h)).

    "shorter" (default): scale so the shorter side is `resolution`, then
    center-crop the longer side down to a multiple of `multiple` (and to at
    most max_aspect * resolution). Non-square outputs are kept.
    "square": center-crop the largest square, resize to resolution^2."""
    m = spec_image.multiple
    if spec_image.resize == "square":
        return (resolution, resolution), (resolution, resolution)
    scale = resolution / min(w, h)
    rw, rh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    cap = int(spec_image.max_aspect * resolution)
    cw, ch = min(rw, cap) // m * m, min(rh, cap) // m * m
    return (rw, rh), (cw, ch)


def _geometry_box(w: int, h: int, spec_image, resolution: int) -> tuple[tuple[float, ...], tuple[int, int]]:
    """The region of a w x h image that survives the geometry rule's crop (in
    its own pixels) and the output size it is resampled to."""
    x0, y0 = 0, 0
    if spec_image.resize == "square":
        s = min(w, h)
        x0, y0, w, h = (w - s) // 2, (h - s) // 2, s, s
    (rw, rh), (cw, ch) = target_size(w, h, spec_image, resolution)
    left, top = (rw - cw) // 2, (rh - ch) // 2  # the crop, in resized coordinates
    sx, sy = w / rw, h / rh
    return (x0 + left * sx, y0 + top * sy, x0 + (left + cw) * sx, y0 + (top + ch) * sy), (cw, ch)


def to_model_tensor(img: Image.Image, spec_image, resolution: int) -> torch.Tensor:
    """Apply the geometry rule (`target_size`) to a decoded image. Only the
    region that survives the crop is resampled, straight to the output size,
    so the work and memory per image are bounded by the output size however
    long the image is (a 1,000,000 x 16 strip is not first scaled up whole)."""
    box, (cw, ch) = _geometry_box(*img.size, spec_image, resolution)
    # reducing_gap: a large downscale first reduces by an integer factor (box
    # filter), then Lanczos-resamples: work tracks the output, not the source
    img = img.resize((cw, ch), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def edit_mask_tensor(data: bytes, image_size: tuple[int, int], spec_image, resolution: int) -> torch.Tensor:
    """A sample's edit-region mask (PNG: lossless, so the region is exact) at
    the model geometry of its image: scaled to the image's size if it differs,
    then cropped and resized as the image is, with nearest-neighbour sampling.
    [H, W] float32, 1 = the edit region (pixels >= 128)."""
    if sniff_format(data) != "PNG":
        raise SampleError(f"{EDIT_MASK_KEY}: the edit mask must be a PNG (lossless), got "
                          f"{sniff_format(data) or 'unrecognised bytes'}", "decode")
    mask = load_image(data, spec_image).convert("L")
    if mask.size != image_size:
        mask = mask.resize(image_size, Image.Resampling.NEAREST)
    box, (cw, ch) = _geometry_box(*image_size, spec_image, resolution)
    mask = mask.resize((cw, ch), Image.Resampling.NEAREST, box=box)
    return torch.from_numpy((np.asarray(mask) >= 128).astype(np.float32))


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> PIL RGB (round to nearest)."""
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB")


def encode_image(image: torch.Tensor, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    pil = to_pil(image)
    if fmt == "png":
        pil.save(buf, format="PNG")
    elif fmt == "jpeg":
        pil.save(buf, format="JPEG", quality=quality)
    else:
        pil.save(buf, format="WEBP", quality=quality, method=4)
    return buf.getvalue()


# ---------------------------------------------------------------------------
# The built-in demo sample
# ---------------------------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get("IMPRINT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "imprint"))


def builtin_shards(name: str, version: int, make_samples, per_shard: list[int]) -> list[str]:
    """Shards `{name}-000000.tar`, ... of a built-in sample, written once
    under the imprint cache (a new `version` for new content) and then
    reused. `per_shard[i]` samples of `make_samples()` go to shard i."""
    d = cache_root() / f"{name}-shards-v{version}"
    names = [str(d / f"{name}-{i:06d}.tar") for i in range(len(per_shard))]
    if not all(os.path.isfile(n) for n in names):
        d.mkdir(parents=True, exist_ok=True)
        samples, start = make_samples(), 0
        for n, count in zip(names, per_shard):
            write_shards(samples[start:start + count], n)
            start += count
    return names


def demo_shards() -> list[str]:
    """Two small shards built on first use from images that ship with
    matplotlib and procedurally drawn scenes; nothing is downloaded."""
    return builtin_shards(DEMO, 2, _demo_samples, [3, 2])


def _demo_samples() -> list[dict]:
    from PIL import ImageDraw

    samples = []
    mpl_sample = None
    try:
        import matplotlib

        mpl_sample = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    except ImportError:
        pass
    if mpl_sample is not None and mpl_sample.is_file():
        samples.append({"__key__": "grace_hopper", "jpg": mpl_sample.read_bytes(),
                        "json": {"source_prompt": "a portrait of a woman in uniform",
                                 "target_prompts": ["a portrait of a woman in uniform, smiling"], "domain": "photo"}})
    scenes = [
        ("red_circle", (30, 60, 160), (220, 40, 40), "ellipse", "a red ball on a blue floor", "a green ball on a blue floor"),
        ("yellow_square", (40, 120, 40), (240, 220, 30), "rectangle", "a yellow box on the grass", "a wooden box on the grass"),
        ("white_house", (130, 180, 230), (245, 245, 245), "house", "a white house under a blue sky", "a red house under a blue sky"),
        ("dark_tree", (230, 200, 150), (40, 90, 30), "tree", "a tree in the desert", "a tree in the snow"),
    ]
    for key, bg, fg, shape, src, tgt in scenes:
        w, h = (192, 128) if key in ("white_house", "dark_tree") else (160, 160)
        img = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(img)
        for y in range(h // 2, h):  # a ground gradient so the images are not flat
            shade = tuple(max(0, c - (y - h // 2)) for c in bg)
            draw.line([(0, y), (w, y)], fill=shade)
        box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
        if shape == "ellipse":
            draw.ellipse(box, fill=fg)
        elif shape == "rectangle":
            draw.rectangle(box, fill=fg)
        elif shape == "house":
            draw.rectangle((w // 3, h // 2, 2 * w // 3, 7 * h // 8), fill=fg)
            draw.polygon([(w // 3 - 10, h // 2), (w // 2, h // 4), (2 * w // 3 + 10, h // 2)], fill=(120, 60, 40))
        else:
            draw.rectangle((w // 2 - 6, h // 2, w // 2 + 6, 7 * h // 8), fill=(90, 60, 30))
            draw.ellipse((w // 3, h // 6, 2 * w // 3, 9 * h // 16), fill=fg)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        samples.append({"__key__": key, "png": buf.getvalue(), "json": {"source_prompt": src, "target_prompts": [tgt], "domain": "drawing"}})
    return samples


def write_shards(samples: Iterable[dict], path: str) -> str:
    """Write samples (extension -> bytes/str/dict, and `__key__`) as one
    WebDataset tar, complete or not at all (written beside it, then renamed).
    The samples are streamed: any iterable, held one at a time."""
    import tarfile

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with tarfile.open(tmp, "w") as tar:
            for s in samples:
                key = s["__key__"]
                for ext, value in s.items():
                    if ext.startswith("__"):
                        continue
                    if isinstance(value, (dict, list)):
                        value = json.dumps(value).encode()
                    elif isinstance(value, str):
                        value = value.encode()
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(value)
                    info.mtime = 0  # reproducible archives
                    tar.addfile(info, io.BytesIO(value))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
