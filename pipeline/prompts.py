"""What a job's prompts will be, told before it runs: `targets_preview`
reads the first input shard's json and txt entries (no image is decoded) and
counts the samples that will have target prompts under the job's
`input.source_prompt` and `input.templates`, with the reasons of those that
will not (`imprint validate` prints it)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

PREVIEW_SAMPLES = 1000  # samples read from the first shard (a shard is 1000 by default)


@dataclass
class TargetsPreview:
    shard: str
    samples: int = 0  # samples read
    with_targets: int = 0
    reasons: Counter = field(default_factory=Counter)  # error kind -> samples without targets

    def line(self) -> str:
        text = (f"# first shard: {self.with_targets} of {self.samples} sample(s) will have target prompts "
                f"({self.shard})")
        if self.reasons:
            text += "; without: " + ", ".join(f"{k} {n}" for k, n in self.reasons.most_common())
        return text


def targets_preview(spec, shard: str, limit: int = PREVIEW_SAMPLES) -> TargetsPreview | None:
    """Count the first `limit` samples of `shard` that will get target
    prompts under `spec` (the decoder's own prompt rule, tokens not counted).
    None for a shard only workers read (http, pipe:), as preflight does."""
    from .data import OBJECT_STORE_SCHEMES, SampleError, _prompts, read_raw_samples, url_scheme

    if url_scheme(shard) not in ("", *OBJECT_STORE_SCHEMES):
        return None
    preview = TargetsPreview(shard)
    for raw in read_raw_samples(shard, allow_pipe=spec.input.allow_pipe):
        if preview.samples >= limit:
            break
        preview.samples += 1
        if "__error__" in raw:
            preview.reasons[raw.get("__error_type__", "other")] += 1
            continue
        try:
            _prompts(raw, spec.input, None)
        except SampleError as exc:
            preview.reasons[exc.kind] += 1
            continue
        preview.with_targets += 1
    return preview
