"""Optional hint preprocessors for ControlNet, as lllyasviel/ControlNet's annotators compute them.

Only what a real library does in one call: `canny` is annotator/canny CannyDetector (cv2.Canny) with the
demos' thresholds 100 and 200, made three-channel as annotator/util.py HWC3 does. OpenCV is an optional extra
(`pip install 'ldm[control]'`, i.e. opencv-python-headless), imported only when a preprocessor runs; ldm never
needs it otherwise.
"""

from __future__ import annotations

import numpy as np

PREPROCESSORS = ("none", "canny")
CANNY_THRESHOLDS = (100, 200)  # gradio_canny2image.py's defaults (low_threshold, high_threshold)


def _cv2():
    try:
        import cv2
    except ImportError:
        raise RuntimeError("the canny preprocessor needs OpenCV: pip install opencv-python-headless "
                           "(or the extra: pip install 'ldm[control]')") from None
    return cv2


def canny(rgb: np.ndarray, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1]) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 edge map: cv2.Canny(img, low, high) (OpenCV takes the
    strongest gradient over the three channels), repeated over three channels (HWC3)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"canny needs an (H, W, 3) uint8 image, got {rgb.dtype} {rgb.shape}")
    edges = _cv2().Canny(rgb, low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)


def preprocess(name: str, rgb: np.ndarray) -> np.ndarray:
    """The hint `name` (PREPROCESSORS) computes from an (H, W, 3) uint8 RGB image."""
    if name == "none":
        return rgb
    if name == "canny":
        return canny(rgb)
    raise ValueError(f"unknown preprocessor {name!r}; valid: {', '.join(PREPROCESSORS)}")
