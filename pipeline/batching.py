"""Shape bucketing: group the work units of a stream by the shape they run
at, across the whole stream, so each engine batch holds one shape.

Without it a batch of `batch.images` mixed-shape images splits inside the
engine into one chain per shape, each at a fraction of the rows (up to 17
shapes at 512 px with the default geometry), and every new row count makes
a compiled UNet recompile. With it, a batch is released when its bucket is
full (or the stream ends), so UNet calls stay as large as the batch size
allows and the set of shapes stays small.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable


def unit_shape(unit: Any) -> Hashable:
    """The key a unit runs under: an image sample's tensor shape, or for a
    stored code its latent size, method and schedule (what the engine
    cannot put in one chain otherwise)."""
    code = getattr(unit, "code", None)
    if code is not None:
        return ("code", tuple(unit.latent_hw), code.method, code.num_steps, code.skip, tuple(code.timesteps.tolist()),
                repr(sorted(code.params.items())))
    return ("image", tuple(unit.image.shape))


class ShapeBuckets:
    """Accumulates units per shape key and releases full batches.

    size: units per released batch. max_pending: when more units than this
    wait in all buckets together (many shapes, few of each), the fullest
    bucket is released early, so memory held by decoded images stays
    bounded. Order within a bucket is arrival order.
    """

    def __init__(self, size: int, key: Callable[[Any], Hashable] = unit_shape, max_pending: int | None = None):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.key = key
        self.max_pending = max(size, max_pending or 4 * size)
        self._buckets: dict[Hashable, list] = {}

    @property
    def pending(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def add(self, unit: Any) -> list[list]:
        """Add a unit; return the batches that are ready (usually none or one)."""
        k = self.key(unit)
        bucket = self._buckets.setdefault(k, [])
        bucket.append(unit)
        ready = []
        if len(bucket) >= self.size:
            ready.append(self._buckets.pop(k))
        if self.pending > self.max_pending:
            fullest = max(self._buckets, key=lambda b: len(self._buckets[b]))
            ready.append(self._buckets.pop(fullest))
        return ready

    def flush(self) -> list[list]:
        """Every remaining bucket as a batch, fullest first; empties the buckets."""
        out = sorted(self._buckets.values(), key=len, reverse=True)
        self._buckets = {}
        return out
