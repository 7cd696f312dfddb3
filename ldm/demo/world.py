"""A procedural text-image world: one coloured shape on a coloured background, with a caption.

Generated on the fly from a seed (no files), small enough that a tiny latent diffusion model with a tiny
text encoder learns it on a CPU, and simple enough that a classical evaluator (ldm/demo/evaluate.py) can
read a generated image back. Every image shows

    a {colour} {shape} on a {background} background, {position}

with colour != background. The attribute vocabulary is deliberately small and visually unambiguous:
six well-separated colours, three silhouettes that stay distinguishable after blur (circle, square,
upward triangle), and five positions far apart (four anchors towards the corners and the image centre).

Composition is measured by keeping some (colour, shape) and (colour, background) pairs out of training:
each held-out colour, shape and background is seen in training, only the pairing is new.

Images are float tensors in [-1, 1], (3, H, W) or (N, 3, H, W), the range the VAE works in; `to_uint8`
gives the uint8 path. Nuisance variation (position jitter, size, small colour jitter) is uncaptioned.
"""

import functools
import random
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch

IMAGE_SIZE = 64

# Pure-ish RGB values, pairwise distance >= 185 (of 255*sqrt(3)) so blur and noise do not confuse them.
COLOURS = {
    "red": (230, 30, 30),
    "green": (40, 200, 60),
    "blue": (40, 60, 230),
    "yellow": (240, 220, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Shape centres as fractions of the image side (x, y); y grows downwards as in the image array.
POSITIONS = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}

# The five held-out pairs use five different shape colours so their groups do not overlap: 3 pairs * 25
# (background, position) + 2 pairs * 15 (shape, position) = 105 of the 450 combinations are held out.
# Every colour, shape, background and position still occurs in training, only these pairings do not.
HELD_OUT_COLOUR_SHAPE = (("blue", "triangle"), ("yellow", "circle"), ("white", "square"))
HELD_OUT_COLOUR_BACKGROUND = (("red", "white"), ("green", "blue"))

# Uncaptioned nuisance ranges, in pixels of a 64 image and 0..255 colour units. With the largest shape
# (28 px) and the largest jitter at a corner anchor (19.2 px from two borders) the shape still keeps 3 px from
# the border, which the evaluator reads as background.
#
# Why 20-28 px and the anchors at 0.3 / 0.7 (issue 21; they were 14-22 px at the quadrant centres 0.25 /
# 0.75): a circle and a square of the same box differ on (1 - pi/4) of it, 42 to 104 of the 4096 pixels at
# 14-22 px, 86 to 168 now; at the VAE's f = 4 the shape spans 5 to 7 latent pixels instead of 3.5 to 5.5.
# Trained with the same recipe (README, The demo model), the held-out colour-shape pairings went from mostly
# wrong to right: the shipped model at the old size drew "a white square" as a circle in 16 of 16 images.
# Vocabulary, captions and the held-out split are unchanged, so are the chance rates.
SIZE_RANGE = (20.0, 28.0)
POSITION_JITTER = 2.0
COLOUR_JITTER = 10.0
SUPERSAMPLE = 4  # antialiasing: render at 4x, box-downsample; deterministic and crisp

# Words are checked against the vocabulary by Attributes, which names the offending one.
_CAPTION = re.compile(r"^an? (\w+) (\w+) on an? (\w+) background, (\w+(?: \w+)?)$")


@dataclass(frozen=True, order=True)
class Attributes:
    """What a caption says about an image; validated so every instance is renderable."""

    colour: str
    shape: str
    background: str
    position: str

    def __post_init__(self):
        for name, value, vocabulary in (
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("background", self.background, COLOURS),
            ("position", self.position, POSITIONS),
        ):
            if value not in vocabulary:
                raise ValueError(f"unknown {name} {value!r}; expected one of {list(vocabulary)}")
        if self.colour == self.background:
            raise ValueError(f"shape colour equals background colour ({self.colour!r}): nothing to see")

    def caption(self, omit: tuple[str, ...] = ()) -> str:
        """The full caption, or with the attributes named in `omit` left unsaid (a training augmentation,
        scripts/train_demo.py --attr-dropout: "a circle on a blue background, top left", "a red shape on ...",
        "a red circle, top left", "a red circle on a blue background"). Only full captions parse back."""
        text = f"a {'' if 'colour' in omit else self.colour + ' '}{'shape' if 'shape' in omit else self.shape}"
        if "background" not in omit:
            text += f" on a {self.background} background"
        return text if "position" in omit else f"{text}, {self.position}"

    def as_dict(self) -> dict:
        return asdict(self)


ATTRIBUTE_NAMES = ("colour", "shape", "background", "position")


def parse_prompt(caption: str) -> Attributes:
    """Inverse of Attributes.caption(); raises ValueError for anything outside the world's grammar."""
    match = _CAPTION.match(" ".join(caption.lower().split()).rstrip("."))
    if match is None:
        expected = "'a COLOUR SHAPE on a COLOUR background, POSITION'"
        raise ValueError(f"cannot parse prompt {caption!r}; expected {expected}")
    return Attributes(*match.groups())


@functools.cache
def _all() -> tuple:
    return tuple(
        Attributes(colour, shape, background, position)
        for colour in COLOURS
        for shape in SHAPES
        for background in COLOURS
        if background != colour
        for position in POSITIONS
    )


def all_attributes() -> list:
    """All 6 * 3 * 5 * 5 = 450 combinations, in a fixed order."""
    return list(_all())


def is_held_out(attrs: Attributes) -> bool:
    pairs = (attrs.colour, attrs.shape), (attrs.colour, attrs.background)
    return pairs[0] in HELD_OUT_COLOUR_SHAPE or pairs[1] in HELD_OUT_COLOUR_BACKGROUND


def train_attributes() -> list:
    return [a for a in all_attributes() if not is_held_out(a)]


def heldout_attributes() -> list:
    return [a for a in all_attributes() if is_held_out(a)]


@functools.cache
def _split(split: str) -> tuple:
    if split == "train":
        return tuple(train_attributes())
    if split == "heldout":
        return tuple(heldout_attributes())
    if split == "all":
        return _all()
    raise ValueError(f"unknown split {split!r}; expected 'train', 'heldout' or 'all'")


def seen_prompts(n: int = 40) -> list:
    """A fixed evaluation set of training combinations (Python's seeded random: stable across versions)."""
    return [a.caption() for a in random.Random(1).sample(train_attributes(), n)]


def heldout_prompts(n: int = 40) -> list:
    """A fixed evaluation set of held-out combinations, drawn round-robin over the held-out pairs so
    every pair is measured equally often."""
    held = heldout_attributes()
    groups = [[a for a in held if (a.colour, a.shape) == pair] for pair in HELD_OUT_COLOUR_SHAPE]
    groups += [[a for a in held if (a.colour, a.background) == pair] for pair in HELD_OUT_COLOUR_BACKGROUND]
    most = len(groups) * min(len(group) for group in groups)
    if n > most:
        raise ValueError(f"at most {most} held-out prompts keep the held-out pairs balanced")
    rng = random.Random(2)
    for group in groups:
        rng.shuffle(group)
    picked = [groups[i % len(groups)][i // len(groups)] for i in range(n)]
    return [a.caption() for a in picked]


def shape_coverage(shape: str, cx: float, cy: float, s: float, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape (bounding box s x s centred at cx, cy), float64
    (size, size). Only the pixels around the box are supersampled: the rest is exactly 0. numpy, not
    torch: these are many tiny ops, and torch's thread pool costs more than the work on a busy machine."""
    half = s / 2
    r0, r1 = max(int(cy - half) - 1, 0), min(int(cy + half) + 2, size)  # pixel rows/cols touched by the box
    c0, c1 = max(int(cx - half) - 1, 0), min(int(cx + half) + 2, size)
    sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sub-pixel centres within a pixel
    y = (np.arange(r0, r1)[:, None] + sub).reshape(-1, 1)
    x = (np.arange(c0, c1)[:, None] + sub).reshape(1, -1)
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:  # upward triangle: apex at the top centre, base = bottom edge, half-width grows as (y - top) / 2
        top = cy - half
        inside = (y <= cy + half) & (np.abs(x - cx) <= (y - top) / 2)
    coverage = np.zeros((size, size))
    # (rows * S, cols * S) -> (rows, S, cols, S): average each S x S block back to one pixel
    coverage[r0:r1, c0:c1] = inside.reshape(r1 - r0, SUPERSAMPLE, c1 - c0, SUPERSAMPLE).mean(axis=(1, 3))
    return coverage


def render(attrs: Attributes, rng: np.random.Generator | None = None, size: int = IMAGE_SIZE) -> torch.Tensor:
    """The image for `attrs`, float32 (3, size, size) in [-1, 1]. Without `rng`: the canonical, unjittered
    image. With `rng` the nuisance draws are, in order: dx, dy, shape size, shape colour (3), background (3)."""
    if rng is None:
        dx = dy = 0.0
        s = sum(SIZE_RANGE) / 2
        fg_jitter = bg_jitter = np.zeros(3)
    else:
        dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, 2)
        s = rng.uniform(*SIZE_RANGE)
        fg_jitter = rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)
        bg_jitter = rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)
    scale = size / IMAGE_SIZE  # ranges are stated for 64 px; other sizes scale them
    fx, fy = POSITIONS[attrs.position]
    alpha = shape_coverage(attrs.shape, fx * size + dx * scale, fy * size + dy * scale, s * scale, size)
    fg = np.clip(np.array(COLOURS[attrs.colour]) + fg_jitter, 0, 255)
    bg = np.clip(np.array(COLOURS[attrs.background]) + bg_jitter, 0, 255)
    image = bg[:, None, None] * (1 - alpha) + fg[:, None, None] * alpha  # (3, size, size), 0..255
    return torch.from_numpy(image / 127.5 - 1).to(torch.float32)


def sample(index: int, seed: int = 0, split: str = "train", size: int = IMAGE_SIZE):
    """Sample `index` of the world with `seed`: (image (3, H, W) in [-1, 1], caption, Attributes).
    Deterministic in (seed, index) alone, so any subset can be regenerated without the others. numpy's
    SeedSequence mixes the pair into a 128-bit state (a torch CPU generator keeps only 32 seed bits,
    which would make (seed, index) pairs collide)."""
    rng = np.random.default_rng([seed, index])
    choices = _split(split)
    attrs = choices[int(rng.integers(len(choices)))]
    return render(attrs, rng, size), attrs.caption(), attrs


def batch(n: int, generator: torch.Generator, split: str = "train", size: int = IMAGE_SIZE):
    """n samples (images (n, 3, H, W), captions, attributes); consumes one draw from `generator` (the seed
    of the batch), so a training loop stays reproducible from its single torch generator."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    items = [sample(i, seed, split, size) for i in range(n)]
    return torch.stack([item[0] for item in items]), [item[1] for item in items], [item[2] for item in items]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 0..255, same layout (round to nearest, as when saving a PNG)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class TextImageWorld(torch.utils.data.IterableDataset):
    """Endless stream of (image, caption) for a DataLoader; worker w of k yields indices w, w + k, ...,
    so the stream is the same whatever the number of workers (up to interleaving)."""

    def __init__(self, seed: int = 0, split: str = "train", size: int = IMAGE_SIZE):
        super().__init__()
        _split(split)  # fail at construction, not in a worker
        self.seed, self.split, self.size = seed, split, size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        index, step = (0, 1) if info is None else (info.id, info.num_workers)
        while True:
            image, caption, _ = sample(index, self.seed, self.split, self.size)
            yield image, caption
            index += step
