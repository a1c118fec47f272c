"""Peak RSS of decoding one hostile image and mapping it to the model's
geometry: a 1,000,000 x 16 PNG (about 48 KB, 16 M pixels: under the default
image.max_pixels). Compares the geometry as it is now (only the cropped region
is resampled, straight to the output size) with the old order (resize the
whole image so its shorter side is the resolution, then crop).

    python tools/measure_decode_rss.py            # prints one line per case

Each case runs in a fresh process (ru_maxrss is a per-process peak)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CHILD = r'''
import resource, sys
import numpy as np
from PIL import Image
from pipeline.data import load_image, target_size, to_model_tensor
from pipeline.spec import ImageSpec

path, order, res = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = open(path, "rb").read()
spec = ImageSpec()
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
r0 = peak()
pil = load_image(data, spec)
r1 = peak()
if order == "resize-then-crop":
    w, h = pil.size
    (rw, rh), (cw, ch) = target_size(w, h, spec, res)
    img = pil.resize((rw, rh), Image.Resampling.LANCZOS)
    left, top = (rw - cw) // 2, (rh - ch) // 2
    shape = np.asarray(img.crop((left, top, left + cw, top + ch))).shape[:2]
else:
    shape = tuple(to_model_tensor(pil, spec, res).shape[1:])
r2 = peak()
print(f"{order:17s} resolution {res:4d}: output {shape[1]}x{shape[0]}, peak RSS {r0:.0f} MiB at start, "
      f"+{r1 - r0:.0f} MiB decoding, +{r2 - r1:.0f} MiB geometry")
'''


def main() -> None:
    from PIL import Image, ImageDraw

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "strip.png")
        img = Image.new("RGB", (1_000_000, 16), (30, 90, 200))
        draw = ImageDraw.Draw(img)
        for x in range(0, 1_000_000, 997):
            draw.line([(x, 0), (x, 15)], fill=(200, 40, 40))
        img.save(path, optimize=True)
        del img, draw
        print(f"1,000,000 x 16 PNG, {os.path.getsize(path)} bytes")
        # the old order at 512 would need about 49 GB (32 M x 512 x 3 bytes); not run
        for order, res in (("crop-then-resize", 64), ("crop-then-resize", 512), ("resize-then-crop", 64)):
            subprocess.run([sys.executable, "-c", CHILD, path, order, str(res)], check=True)


if __name__ == "__main__":
    main()
