"""Writing whole files through pyarrow filesystems: a file is under its
final name complete or not at all, on local disks and object stores alike.

`with fs.open_output_stream(path)` is not enough on an object store: leaving
the block on an exception closes the stream, and closing an S3 or GCS upload
completes it, so an interrupted write leaves a truncated object under its
final name. Here an exception aborts the upload where the stream can abort
(`abort()`, which pyarrow does not expose in every version); otherwise the
bytes go to a temporary name, which is deleted on an exception and moved to
the final name only once it is closed (on object stores a move is a
server-side copy, which S3 caps at 5 GiB per object).
"""

from __future__ import annotations

from typing import Callable


def stage(fs, tmp: str, write: Callable) -> None:
    """Write `tmp` through `write(stream)`; on any exception (interrupts
    included) the upload is aborted or `tmp` deleted, and the exception goes on."""
    out = fs.open_output_stream(tmp)
    try:
        write(out)
    except BaseException:
        _discard(fs, out, tmp)
        raise
    out.close()  # a failure here is the store's: the upload did not complete


def write_whole(fs, path: str, write: Callable, *, tmp: str) -> None:
    """Write `path` through `write(stream)` so that it appears complete or not
    at all: straight to `path` where the stream can abort, else staged at
    `tmp` (a name nothing reads as a result) and moved into place."""
    if _can_abort(fs):
        stage(fs, path, write)
        return
    stage(fs, tmp, write)
    try:
        fs.move(tmp, path)
    except BaseException:
        _delete_quietly(fs, tmp)
        raise


def _can_abort(fs) -> bool:
    return fs.type_name in ("s3", "gcs") and _ABORTABLE


def _discard(fs, out, path: str) -> None:
    abort = getattr(out, "abort", None)
    if abort is not None:
        try:
            abort()
            return
        except Exception:  # noqa: BLE001 - fall back to closing and deleting
            pass
    try:
        out.close()
    except Exception:  # noqa: BLE001 - the write already failed; its error is the one raised
        pass
    _delete_quietly(fs, path)


def _delete_quietly(fs, path: str) -> None:
    try:
        fs.delete_file(path)
    except Exception:  # noqa: BLE001 - already absent, or the store is down: the caller's error is raised
        pass


def _abortable() -> bool:
    import pyarrow as pa

    return hasattr(pa.NativeFile, "abort")


_ABORTABLE = _abortable()
