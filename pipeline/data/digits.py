"""The embedded dataset: scikit-learn's 1,797 real 8x8 handwritten digits as PNG files.

Writes them in an ImageFolder layout (``<dst>/<class>/<id>.png``), the same kind of
input a user has, so the demo exercises the real listing/reading/decoding path.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline import storage


def write_digits(dst: str, limit: int | None = None) -> int:
    """Write the digits as 8-bit grayscale PNGs under ``dst``; returns the count.

    Pixel values 0..16 are scaled to 0..255 (white ink on black, as stored).
    ``limit`` keeps the first N per class (tests use small sets).
    """
    # deferred: scikit-learn takes ~2.7 s to import; only the demo and tests write digits
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[int, int] = {}
    written = 0
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        if limit is not None and counts.get(label, 0) >= limit:
            continue
        counts[label] = counts.get(label, 0) + 1
        pixels = np.clip(np.rint(img * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="PNG")
        storage.write_bytes(storage.join(dst, str(label), f"{i:04d}.png"), buf.getvalue())
        written += 1
    return written
