"""Reading the images a user names (init images, masks, ControlNet hints), the same way everywhere.

8-bit images are read as the originals read them (PIL's convert to "RGB" or "L"). Others are never silently
clipped: 16-bit greyscale (PIL modes I;16*, and I within 0..65535) is scaled by its real range, 1/65535, and
samples of unknown range (float, 32-bit integers beyond 16 bits) are refused. An image beyond PIL's
decompression-bomb limit is refused before it is decoded, and every failure is one line naming the file.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from ldm.cli.flags import CLIError

# PIL modes whose samples are not 8-bit: the full scale of their samples
_WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0}


@contextlib.contextmanager
def opened(path: str, what: str) -> Iterator[Image.Image]:
    """The decoded image at `path`; CLIError (one line) for a missing, foreign, truncated or oversized file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                yield image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CLIError(f"{what} {path} is too large to decode: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise CLIError(f"cannot read {what} {path}: {e}") from None


def _wide_scale(image: Image.Image, path: str, what: str) -> float | None:
    """The full scale of a non-8-bit image's samples (None for 8-bit modes); CLIError when unknown."""
    if image.mode == "F":
        raise CLIError(f"{what} {path} has floating-point samples (PIL mode F) whose range is not known; save it "
                       "with 8 or 16 bits per sample")
    if image.mode == "I":  # 32-bit integers: Pillow's mode for 16-bit PNG/TIFF greyscale on some versions
        low, high = image.getextrema()
        if low < 0 or high > 65535:
            raise CLIError(f"{what} {path} has 32-bit integer samples ({low}..{high}) whose range is not known; "
                           "save it with 8 or 16 bits per sample")
        return 65535.0
    return _WIDE_MODES.get(image.mode)


def unit_rgb(image: Image.Image, path: str, what: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1], resized to `size` (w, h) with LANCZOS: 8-bit modes as img2img.py
    (convert("RGB"), resize, / 255), 16-bit ones by their real range (resized as floats)."""
    scale = _wide_scale(image, path, what)
    if scale is None:
        rgb = image.convert("RGB")
        if size is not None:
            rgb = rgb.resize(size, resample=Image.LANCZOS)
        return np.asarray(rgb).astype(np.float32) / 255.0
    grey = Image.fromarray(np.asarray(image, dtype=np.float32) / scale, mode="F")
    if size is not None:
        grey = grey.resize(size, resample=Image.LANCZOS)
    return np.repeat(np.clip(np.asarray(grey), 0.0, 1.0)[:, :, None], 3, axis=2)


def read_uint8(path: str, what: str, mode: str = "RGB") -> np.ndarray:
    """The image at `path` as uint8 (H, W, 3) for mode "RGB" or (H, W) for "L", as the originals' np.array(
    Image.open(path).convert(mode)); a 16-bit image is rounded to 8 bits from its real range (not clipped)."""
    with opened(path, what) as image:
        scale = _wide_scale(image, path, what)
        if scale is None:
            return np.asarray(image.convert(mode))
        grey = np.rint(np.clip(np.asarray(image, dtype=np.float64) / scale, 0.0, 1.0) * 255.0).astype(np.uint8)
    return grey if mode == "L" else np.repeat(grey[:, :, None], 3, axis=2)
