"""PIE-Bench (Ju et al., ICLR 2024) as shards: `imprint shards DIR DEST
--format pie-bench`.

DIR is the benchmark's folder as its authors distribute it (on request, see
cure-lab/PnPInversion; nothing of it ships with imprint): `mapping_file.json`
and `annotation_images/`. Each entry of the mapping becomes one sample:

- the image `annotation_images/<image_path>`;
- `edit_mask.png`: the entry's `mask`, run-length encoded as [start, length,
  ...] over the row-major 512x512 grid (1 = the edit region), decoded as
  PIE-Bench's evaluation decodes it, the one-pixel border set to 1 (its guard
  against annotation errors there), stored losslessly (white = edit region);
- json: `source_prompt` = `original_prompt` and `target_prompts` =
  [`editing_prompt`], the `[ ]` that mark the changed words removed;
  `edited_words` (the bracketed words of the editing prompt), `source_words`
  (those of the original prompt), `editing_instruction`, `editing_type_id`
  ("0".."9"), `editing_type` (its folder, e.g. "0_random_140"),
  `blended_word` and `pie_id` (the mapping's key) ride along in the results'
  `meta` column, where `imprint eval --by editing_type` finds them.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from .data import EDIT_MASK_KEY
from .ingest import IngestError, Record, Skip, Source

MASK_SHAPE = (512, 512)
_BRACKETED = re.compile(r"\[([^\[\]]*)\]")


def parse_prompt(text: str) -> tuple[str, list[str]]:
    """("a [red] car", ) -> ("a red car", ["red"]): the prompt with its edit
    brackets removed (spaces collapsed) and the bracketed words."""
    words = [w.strip() for w in _BRACKETED.findall(text) if w.strip()]
    plain = _BRACKETED.sub(lambda m: m.group(1), text)
    return " ".join(plain.split()), words


def decode_mask(rle: list, shape: tuple[int, int] = MASK_SHAPE) -> np.ndarray:
    """PIE-Bench's `mask_decode`: [start, length, ...] runs over the
    row-major grid set to 1 (a run past the end is cut there), then the
    one-pixel border set to 1. uint8 [H, W] of 0/1. Raises ValueError for
    an encoding that is not pairs of non-negative integers."""
    if not isinstance(rle, list) or len(rle) % 2 or not all(type(v) is int and v >= 0 for v in rle):
        raise ValueError("mask: expected [start, length, ...] pairs of non-negative integers")
    n = shape[0] * shape[1]
    flat = np.zeros(n, np.uint8)
    for start, length in zip(rle[0::2], rle[1::2]):
        if start >= n:
            raise ValueError(f"mask: run start {start} outside the {shape[0]}x{shape[1]} grid")
        flat[start:start + min(length, n - start)] = 1
    mask = flat.reshape(shape)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


def mask_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((mask > 0).astype(np.uint8) * 255, "L").save(buf, format="PNG")
    return buf.getvalue()


def _record(pie_id: str, entry: dict, images: Path) -> Record | Skip:
    where = f"mapping_file.json[{pie_id!r}]"
    try:
        if not isinstance(entry, dict):
            raise ValueError("entry is not an object")
        missing = [k for k in ("image_path", "original_prompt", "editing_prompt", "mask") if k not in entry]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        source, source_words = parse_prompt(str(entry["original_prompt"]))
        target, edited_words = parse_prompt(str(entry["editing_prompt"]))
        mask = decode_mask(entry["mask"])
    except ValueError as exc:
        return Skip(f"bad_entry: {exc} ({where})")
    image_path = str(entry["image_path"])
    fields = {
        "source_prompt": source, "target_prompts": [target], "pie_id": str(pie_id),
        "edited_words": edited_words, "source_words": source_words,
        "editing_instruction": entry.get("editing_instruction"),
        "editing_type_id": None if entry.get("editing_type_id") is None else str(entry["editing_type_id"]),
        "editing_type": Path(image_path).parts[0] if len(Path(image_path).parts) > 1 else None,
        "blended_word": entry.get("blended_word"),
    }
    return Record(key=str(pie_id), image=image_path, base=str(images), fields=fields,
                  caption_from="original_prompt", targets_from="editing_prompt", where=where,
                  entries={EDIT_MASK_KEY: mask_png(mask)})


def format_source(format: str, src: str) -> Source:
    """The Source of `imprint shards --format FORMAT` (pie-bench only)."""
    if format != "pie-bench":
        raise IngestError(f"--format {format!r}: the formats are: pie-bench (leave it out for folders and tables)")
    return source(src)


def source(src: str) -> Source:
    """The ingest Source of a PIE-Bench folder."""
    root = Path(src)
    mapping_file, images = root / "mapping_file.json", root / "annotation_images"
    if not mapping_file.is_file() or not images.is_dir():
        raise IngestError(f"{src}: not a PIE-Bench folder (expected mapping_file.json and annotation_images/; "
                          "the benchmark is distributed by its authors on request, see cure-lab/PnPInversion)")
    try:
        mapping = json.loads(mapping_file.read_text())
    except (OSError, ValueError) as exc:
        raise IngestError(f"{mapping_file}: cannot read it as JSON: {exc}") from None
    if not isinstance(mapping, dict):
        raise IngestError(f"{mapping_file}: expected an object mapping ids to entries")

    def records():
        for pie_id, entry in sorted(mapping.items()):
            yield _record(pie_id, entry, images)

    return Source(kind="pie-bench", records=records, total=len(mapping),
                  columns={"image": "image_path", "caption": "original_prompt", "targets": "editing_prompt"})
