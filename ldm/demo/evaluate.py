"""Prompt adherence: read a generated image back and decide, deterministically, which prompt attributes hold.

Classical image analysis, no neural network, so the score cannot share a failure mode with the model it
judges. For an image of the world in ldm/demo/world.py:

1. background: per-channel median of a thin border frame (shapes keep >= 3 px off the border), nearest
   palette colour. The median ignores the few border pixels a blurry shape may bleed into.
2. shape colour: among the pixels clearly unlike the background, the palette colour c whose mixing
   segment background -> c they lie closest to. Blur mixes the two colours, so "nearest colour of the
   pixels" would call black blurred into yellow (olive) green.
3. coverage: each pixel's position along that segment (alpha, 0 = background, 1 = shape), restricted
   to a window around the largest 8-connected blob of alpha > 0.5 (specks of noise are other blobs).
4. position: the coverage centroid, nearest of the five position anchors. Blur keeps the centroid.
5. shape: the silhouette (circle, square, upward triangle) with the measured area (blur keeps the sum of
   coverage) and centroid that, blurred at the best of a few levels, fits the coverage with the least
   squared error. Fitting the blur keeps a blurred square from passing as a circle.

An image where nothing differs from the background fails colour, shape and position; an off-palette
colour or a silhouette that fits none of the three fails that attribute (MAX_COLOUR_RESIDUAL, MAX_FIT_ERROR).
Measured on 300 ground-truth images, sharp, blurred (sigma up to 3 px) plus noise (std 0.1 in [-1, 1]), or
reduced to a 16 x 16 grid and upsampled: every attribute correct (tests/test_demo_world.py checks these).
"""

import math

import numpy as np
import torch

from .world import ATTRIBUTE_NAMES, COLOURS, POSITIONS, SHAPES, Attributes, parse_prompt, shape_coverage

# In 0..255 RGB units. The closest palette colours (green, black) are 185 apart: a pixel 80 away from the
# background is shape, not background noise (noise of std 13 per channel is 80 away with p < 1e-6).
COARSE_DISTANCE = 80.0
MIN_PIXELS = 12  # fewer foreground pixels than a 4 x 3 blob: no shape was drawn
WINDOW_MARGIN = 6  # px (of 64) around the shape: holds the tails of a blur up to sigma 2 within 3 sigma
BLURS = (0.0, 1.0, 2.0, 3.0)  # template blur levels (px of 64): from a sharp render to a very blurry decoder
# Rejection thresholds, set from measurements on 300 world images and a few out-of-world ones
# (tests/test_demo_world.py checks both sides).
# Foreground RMS distance (0..255) from the best mixing segment: world images <= 15 sharp, <= 23 under
# blur sigma 3 + noise 0.1; off-palette hues (purple, orange, cyan, pink on blue, black or white) 59..140.
# Template misfit per unit area: world images <= 0.03 under blur sigma 3 + noise 0.1, <= 0.05 after 8x
# downsampling; sharp 2:1 ellipse or rectangle, bar, ring, two overlapping discs, cross, downward
# triangle 0.25..0.75 (blurred, some of these do pass as a blurred circle).
# Measured again after issue 21 made the shapes larger (20-28 px, 300 images of world.sample(i, seed=7,
# split="all")): residual <= 14 sharp, <= 23 under blur 3 + noise 0.1; misfit <= 0.024 under blur 3 + noise,
# <= 0.036 after 8x downsampling; every prompt right except 9 of 300 after 8x downsampling (a 8 x 8 grid).
# The thresholds were kept.
MAX_COLOUR_RESIDUAL = 45.0
MAX_FIT_ERROR = 0.15

# All the analysis is numpy: per image it is ~100 tiny array ops, where torch's thread pool costs more
# than the work (10x slower with two threads on a busy machine).
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)
_PALETTE_NAMES = list(COLOURS)
_ANCHORS = np.array(list(POSITIONS.values()), dtype=np.float64)
_ANCHOR_NAMES = list(POSITIONS)


def _as_rgb255(image) -> np.ndarray:
    """Any single image (uint8 0..255 or float -1..1; CHW or HWC; torch or numpy) -> float64 (3, H, W)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    x = np.asarray(image)
    if x.ndim != 3 or 3 not in (x.shape[0], x.shape[-1]):
        raise ValueError(f"expected one RGB image (3, H, W) or (H, W, 3), got shape {x.shape}")
    if x.shape[0] != 3:
        x = x.transpose(2, 0, 1)
    if x.dtype == np.uint8:
        return x.astype(np.float64)
    # float images are in the VAE's range [-1, 1] (what model.vae.decode returns, unclamped)
    return (np.clip(x.astype(np.float64), -1, 1) + 1) * 127.5


def _nearest_colour(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(((_PALETTE - rgb) ** 2).sum(1).argmin())]


def _mixing_colour(pixels: np.ndarray, bg: np.ndarray, bg_name: str) -> tuple:
    """The palette colour c whose mixing segment bg -> c passes closest to the (n, 3) foreground pixels,
    and the RMS distance of the pixels from it. Blur mixes shape and background, so edge pixels (and the
    whole of a small blurred shape) lie on that segment, not near c itself; the nearest colour to a
    mixture can be a third colour (black blurred into yellow is olive, nearest to green)."""
    best, best_error = None, math.inf
    for name, c in zip(_PALETTE_NAMES, _PALETTE):
        if name == bg_name:
            continue
        d = c - bg
        a = np.clip((pixels - bg) @ d / (d @ d), 0, 1)
        error = float(((pixels - bg - a[:, None] * d) ** 2).sum(axis=1).mean())
        if error < best_error:
            best, best_error = name, error
    return best, math.sqrt(best_error)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of a bool (H, W) mask: every pixel takes the largest label in its
    3x3 neighbourhood until nothing changes, so each component ends up labelled by its largest index."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return mask
    top, left = ys.min(), xs.min()
    crop = mask[top : ys.max() + 1, left : xs.max() + 1]  # components never leave the mask's box
    h, w = crop.shape
    labels = np.arange(1, h * w + 1).reshape(h, w) * crop
    padded = np.zeros((h + 2, w + 2), dtype=labels.dtype)  # zero border: nothing spreads in from outside
    while True:
        padded[1:-1, 1:-1] = labels
        spread = labels.copy()
        for i in range(3):
            for j in range(3):
                np.maximum(spread, padded[i : i + h, j : j + w], out=spread)
        spread *= crop
        if np.array_equal(spread, labels):
            break
        labels = spread
    counts = np.bincount(labels.ravel())
    counts[0] = 0  # background label
    largest = np.zeros_like(mask)
    largest[top : top + h, left : left + w] = labels == counts.argmax()
    return largest


def _blur_matrices(n: int, scale: float) -> np.ndarray:
    """(len(BLURS), n, n): multiplying by one blurs a length-n signal with a Gaussian of that level
    (truncated at 3 sigma), zero outside, as the templates lie inside the window."""
    offset = np.arange(n)[:, None] - np.arange(n)[None, :]
    mats = []
    for sigma in BLURS:
        if sigma == 0:
            mats.append(np.eye(n))
            continue
        sigma *= scale
        radius = math.ceil(3 * sigma)
        full = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2)).sum()
        mats.append(np.exp(-(offset**2) / (2 * sigma**2)) * (np.abs(offset) <= radius) / full)
    return np.stack(mats)


def _template(shape: str, area: float, cx: float, cy: float, size: int) -> np.ndarray:
    """The world's shape with the given area whose area centroid is (cx, cy)."""
    if shape == "square":
        s, box_cy = math.sqrt(area), cy
    elif shape == "circle":
        s, box_cy = 2 * math.sqrt(area / math.pi), cy
    else:  # a triangle's centroid lies 2/3 of the way from apex to base, i.e. s/6 below the box centre
        s = math.sqrt(2 * area)
        box_cy = cy - s / 6
    return shape_coverage(shape, cx, box_cy, s, size)


def describe_image(image) -> dict:
    """What the image shows: predicted colour, shape, background, position (None when no shape is found)
    and the measurements behind them (area in pixels, centroid as fractions, per-shape template errors)."""
    x = _as_rgb255(image)
    _, h, w = x.shape
    if h != w:
        raise ValueError(f"the world's images are square, got {h} x {w}")
    frame = max(2, h // 32)
    border = np.ones((h, w), dtype=bool)
    border[frame:-frame, frame:-frame] = False
    bg = np.median(x[:, border], axis=1)
    out = {"background": _nearest_colour(bg), "colour": None, "shape": None, "position": None, "area": 0.0}

    offset = x - bg[:, None, None]
    coarse = (offset**2).sum(axis=0) > COARSE_DISTANCE**2
    if coarse.sum() < MIN_PIXELS:
        return out
    colour, colour_residual = _mixing_colour(x[:, coarse].T, bg, out["background"])
    direction = _PALETTE[_PALETTE_NAMES.index(colour)] - bg
    alpha = np.einsum("chw,c->hw", offset, direction) / (direction @ direction)
    mask = _largest_component(alpha > 0.5)
    if mask.sum() < MIN_PIXELS:
        return out  # only a faint haze or specks differ from the background: no shape
    # an off-palette hue (purple, orange) is no palette colour, rather than the least wrong one
    out["colour"] = colour if colour_residual <= MAX_COLOUR_RESIDUAL else None

    # Measure on soft coverage inside a window around the component: blur moves coverage across the edge
    # but keeps its sum and centroid, and the margin keeps the blurred tails inside the window.
    ys, xs = np.nonzero(mask)
    margin = round(WINDOW_MARGIN * h / 64)
    top, bottom = max(ys.min() - margin, 0), min(ys.max() + margin + 1, h)
    left, right = max(xs.min() - margin, 0), min(xs.max() + margin + 1, w)
    coverage = alpha[top:bottom, left:right]
    area = float(coverage.sum())
    if area < MIN_PIXELS:
        return out
    cy = float((coverage.sum(axis=1) * (np.arange(top, bottom) + 0.5)).sum()) / area  # pixel centres at +0.5
    cx = float((coverage.sum(axis=0) * (np.arange(left, right) + 0.5)).sum()) / area
    centroid = np.array([cx / w, cy / h])
    out["position"] = _ANCHOR_NAMES[int(((_ANCHORS - centroid) ** 2).sum(1).argmin())]

    # Which silhouette, at this area and centroid and at the best of a few blur levels, explains the coverage
    # with the least squared error. Fitting the blur keeps a blurred square from passing as a circle.
    sharp = np.stack([_template(shape, area, cx, cy, h)[top:bottom, left:right] for shape in SHAPES])
    rows, cols = _blur_matrices(bottom - top, h / 64), _blur_matrices(right - left, h / 64)
    blurred = rows @ sharp[:, None] @ cols.transpose(0, 2, 1)  # (shape, blur level, rows, cols)
    squared = ((blurred - coverage) ** 2).sum(axis=(2, 3))
    errors = dict(zip(SHAPES, squared.min(axis=1).tolist()))
    best = min(errors, key=errors.get)
    fit_error = errors[best] / area
    # a bar, a ring or two blobs is none of the three shapes, rather than the least wrong one
    out["shape"] = best if fit_error <= MAX_FIT_ERROR else None
    out.update(area=area, centroid=(cx / w, cy / h), errors=errors, fit_error=fit_error,
               colour_residual=colour_residual)
    return out


def judge(description: dict, prompt) -> dict:
    """{attribute: holds} for a describe_image result and a prompt (a caption string or Attributes);
    split from evaluate_image so one description can be judged against many prompts."""
    attrs = prompt if isinstance(prompt, Attributes) else parse_prompt(prompt)
    return {name: description[name] == getattr(attrs, name) for name in ATTRIBUTE_NAMES}


def evaluate_image(image, prompt) -> dict:
    """{attribute: holds} for one image and its prompt (a caption string or Attributes)."""
    return judge(describe_image(image), prompt)


def score(images, prompts) -> dict:
    """Fraction of attributes and of whole prompts satisfied; images (N, 3, H, W) or a sequence of images,
    prompts N captions or Attributes. Per-attribute accuracies are under the attribute names."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if len(prompts) == 0:
        raise ValueError("nothing to score")
    results = [evaluate_image(image, prompt) for image, prompt in zip(images, prompts)]
    table = np.array([[r[name] for name in ATTRIBUTE_NAMES] for r in results], dtype=np.float64)
    out = {
        "attribute_accuracy": float(table.mean()),
        "prompt_accuracy": float(table.all(axis=1).mean()),
        "n": len(results),
    }
    out.update({name: float(table[:, i].mean()) for i, name in enumerate(ATTRIBUTE_NAMES)})
    return out


def evaluate_generator(generate, prompts, seeds) -> dict:
    """Score a text-to-image function over a fixed prompt set and seed range: `generate(prompts, seed)`
    returns one image per caption (the caller fixes sampler, step count and guidance scale inside it).
    Every prompt is generated once per seed and all images are scored together."""
    prompts = [p if isinstance(p, str) else p.caption() for p in prompts]
    images, used = [], []
    for seed in seeds:
        batch = generate(list(prompts), seed)
        if len(batch) != len(prompts):
            raise ValueError(f"generate returned {len(batch)} images for {len(prompts)} prompts")
        images.extend(batch)
        used.extend(prompts)
    return score(images, used)


def chance_rates(attributes) -> dict:
    """Expected score when the captions of `attributes` are randomly permuted against their images and the
    evaluator is exact: P(match) = sum_v p_v^2 over the empirical distribution of each attribute (of the
    whole tuple, for prompt_accuracy). The reference point for "the score is near chance"."""
    attributes = [a if isinstance(a, Attributes) else parse_prompt(a) for a in attributes]
    n = len(attributes)

    def collision(keys):
        _, counts = np.unique(np.array(keys), axis=0, return_counts=True)
        return float(((counts / n) ** 2).sum())

    out = {name: collision([[getattr(a, name)] for a in attributes]) for name in ATTRIBUTE_NAMES}
    out["attribute_accuracy"] = sum(out[name] for name in ATTRIBUTE_NAMES) / len(ATTRIBUTE_NAMES)
    out["prompt_accuracy"] = collision([[getattr(a, name) for name in ATTRIBUTE_NAMES] for a in attributes])
    return out
