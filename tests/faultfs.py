"""A fault-injecting wrapper around a pyarrow file system, for testing the
output store's commit protocol: any call (open, read, write, close, list,
delete, move, create_dir, stat) can fail, transiently (this call only) or
permanently (every later call of that kind on that path, until `heal`),
before or after the real operation ran (an error reported for an operation
that did happen: a write that landed, a delete that was done). Everything is
drawn from one seeded random generator, so a failing seed replays exactly."""

from __future__ import annotations

import random

import pyarrow.fs as pafs

OPS = ("open_in", "read", "open_out", "write", "close", "list", "stat", "delete", "move", "mkdir")


class InjectedFault(OSError):
    pass


class FaultFS:
    def __init__(self, fs: pafs.FileSystem, seed: int, rate: float = 0.05, permanent_rate: float = 0.005):
        self.fs, self.rng = fs, random.Random(seed)
        self.rate, self.permanent_rate = rate, permanent_rate
        self.permanent: set[tuple[str, str]] = set()  # (op, path)
        self.active = True
        self.calls = self.faults = 0

    @property
    def type_name(self) -> str:
        return self.fs.type_name

    def heal(self) -> None:
        self.active, self.permanent = False, set()

    def _fault(self, op: str, path: str) -> str | None:
        """None, or when to fail: "before" or "after" the real operation."""
        self.calls += 1
        if not self.active:
            return None
        if (op, path) in self.permanent:
            self.faults += 1
            return "before"
        r = self.rng.random()
        if r < self.permanent_rate:
            self.permanent.add((op, path))
        if r < self.rate:
            self.faults += 1
            return self.rng.choice(("before", "after"))
        return None

    def _do(self, op: str, path: str, fn):
        when = self._fault(op, path)
        if when == "before":
            raise InjectedFault(f"injected {op} failure before: {path}")
        out = fn()
        if when == "after":
            raise InjectedFault(f"injected {op} failure after: {path}")
        return out

    # -- the FileSystem calls the store makes ---------------------------------

    def get_file_info(self, what):
        if isinstance(what, pafs.FileSelector):
            return self._do("list", what.base_dir, lambda: self.fs.get_file_info(what))
        return self._do("stat", what, lambda: self.fs.get_file_info(what))

    def create_dir(self, path, recursive=True):
        return self._do("mkdir", path, lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_file(self, path):
        return self._do("delete", path, lambda: self.fs.delete_file(path))

    def move(self, src, dest):
        return self._do("move", dest, lambda: self.fs.move(src, dest))

    def open_input_stream(self, path, **kw):
        return _In(self, path, self._do("open_in", path, lambda: self.fs.open_input_stream(path, **kw)))

    def open_output_stream(self, path, **kw):
        # the real stream opens at close: an unfinished write never appears on an object store
        return _Out(self, path, self._do("open_out", path, lambda: lambda: self.fs.open_output_stream(path, **kw)))


class _In:
    def __init__(self, ffs: FaultFS, path: str, stream):
        self.ffs, self.path, self.stream = ffs, path, stream

    def read(self, *a):
        return self.ffs._do("read", self.path, lambda: self.stream.read(*a))

    def close(self):
        self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _Out:
    """Buffers what is written and writes it through at close, so a fault can
    hit before anything exists (an object-store upload never appears; a local
    file is left half written, as a crash mid-write leaves it), or after the
    file is complete (an error reported for a write that landed)."""

    def __init__(self, ffs: FaultFS, path: str, opener):
        self.ffs, self.path, self.opener = ffs, path, opener
        self.chunks: list[bytes] = []
        self.closed = False

    def write(self, data):
        self.ffs._do("write", self.path, lambda: None)
        self.chunks.append(bytes(memoryview(data)))
        return len(self.chunks[-1])

    def _half(self):
        if self.ffs.type_name == "local":
            with self.opener() as real:
                blob = b"".join(self.chunks)
                real.write(blob[: len(blob) // 2])

    def close(self):
        if self.closed:
            return
        self.closed = True
        when = self.ffs._fault("close", self.path)
        if when == "before":
            self._half()
            raise InjectedFault(f"injected close failure before: {self.path}")
        with self.opener() as real:
            real.write(b"".join(self.chunks))
        if when == "after":
            raise InjectedFault(f"injected close failure after: {self.path}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        elif not self.closed:
            self.closed = True
            self._half()
        return False
