"""What the SDXL family conditions on beyond text: the image's geometry
(micro-conditioning time ids: original size, crop corner, target size, or the
refiner's aesthetic score) and how many ids a UNet takes. `Models` (in
`sd`) serves SD 1.x/2.x and SDXL alike; these are its SDXL parts."""

from __future__ import annotations

from typing import NamedTuple


class ImageGeometry(NamedTuple):
    """How an image reached the model, in (height, width) order as SDXL's
    micro-conditioning reads it: its size as decoded, the top-left corner of
    the crop (in resized pixels) and the size the model sees."""

    orig_hw: tuple[int, int]
    crop_tl: tuple[int, int]
    target_hw: tuple[int, int]

    @classmethod
    def plain(cls, h: int, w: int) -> "ImageGeometry":
        """An image the model sees as it is (no resize, no crop)."""
        return cls((h, w), (0, 0), (h, w))


# The refiner's micro-conditioning ends with an aesthetic score instead of
# the target size; diffusers' defaults for the conditional and unconditional rows.
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5



def image_geometry(orig_wh: tuple[int, int], image_hw: tuple[int, int], spec_image, resolution: int) -> ImageGeometry:
    """The geometry of an image of decoded size `orig_wh` (width, height)
    that the pipeline's geometry rule (`data.target_size`, `image.resize`)
    turned into a model image of `image_hw`: where the crop started, in
    resized pixels. An unknown original size (0) counts as the model size."""
    from ..data import target_size

    w, h = (int(v) for v in orig_wh)
    th, tw = (int(v) for v in image_hw)
    if w <= 0 or h <= 0:
        return ImageGeometry.plain(th, tw)
    if spec_image.resize == "square":
        s = min(w, h)
        scale = resolution / s
        return ImageGeometry((h, w), (round((h - s) // 2 * scale), round((w - s) // 2 * scale)), (th, tw))
    (rw, rh), (cw, ch) = target_size(w, h, spec_image, resolution)
    return ImageGeometry((h, w), ((rh - ch) // 2, (rw - cw) // 2), (th, tw))



def time_ids_count(unet, pooled_dim: int) -> int:
    """How many micro-conditioning ids an SDXL UNet's added embedding takes:
    its input size is ids x addition_time_embed_dim + the pooled text
    embedding's `pooled_dim`, and the ids are 6 (orig size, crop, target
    size) or 5 (the refiner's orig size, crop, aesthetic score). 0 for a
    UNet without text_time conditioning. Raises ValueError otherwise."""
    cfg = unet.config
    if getattr(cfg, "addition_embed_type", None) != "text_time":
        return 0
    per_id = int(cfg.addition_time_embed_dim)
    got = int(unet.add_embedding.linear_1.in_features)
    for n in (6, 5):
        if got == n * per_id + pooled_dim:
            return n
    raise ValueError(
        f"the UNet's added embedding takes {got} inputs, which is neither 6 time ids (SDXL) nor 5 (the refiner's "
        f"aesthetic-score variant) x addition_time_embed_dim {per_id} + the second text encoder's pooled {pooled_dim}"
    )
