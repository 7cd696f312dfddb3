"""The demo world (ldm/demo/world.py) and its prompt-adherence evaluator (ldm/demo/evaluate.py).

The evaluator is checked on images whose truth is known: ground-truth renders must score ~100%, the same
renders under shuffled captions must score what random matching predicts, and blurred, noisy or
downsampled renders (what a small latent diffusion model produces) must still score >= 95%.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm.demo import evaluate, world
from ldm.demo.world import ATTRIBUTE_NAMES, Attributes

N = 240  # a few hundred samples; the evaluator takes a few ms per image


@pytest.fixture(scope="module")
def samples():
    items = [world.sample(i, seed=7, split="all") for i in range(N)]
    images = torch.stack([item[0] for item in items])
    return images, [item[1] for item in items], [item[2] for item in items]


@pytest.fixture(scope="module")
def descriptions(samples):
    return [evaluate.describe_image(image) for image in samples[0]]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).repeat(3, 1, 1, 1)  # (3, 1, 1, K): one kernel per channel
    x = F.pad(x, (radius,) * 4, mode="replicate")
    x = F.conv2d(x, k, groups=3)
    return F.conv2d(x, k.transpose(2, 3), groups=3)


# ---------------------------------------------------------------- world


def test_sample_is_deterministic_and_well_formed():
    image, caption, attrs = world.sample(5, seed=3)
    again = world.sample(5, seed=3)
    assert torch.equal(image, again[0]) and caption == again[1] and attrs == again[2]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    assert caption == attrs.caption()
    # (seed, index) pairs that a 32-bit seed hash would merge stay distinct
    assert not torch.equal(world.sample(5, seed=3 + 2**32)[0], image)
    assert not torch.equal(world.sample(6, seed=3)[0], image)

    a = world.batch(4, torch.Generator().manual_seed(0))
    b = world.batch(4, torch.Generator().manual_seed(0))
    assert a[0].shape == (4, 3, 64, 64) and torch.equal(a[0], b[0]) and a[1] == b[1]

    stream = iter(world.TextImageWorld(seed=3))
    for index in range(3):
        image, caption = next(stream)
        expected = world.sample(index, seed=3)
        assert torch.equal(image, expected[0]) and caption == expected[1]


def test_render_geometry_and_colours():
    """The renderer against closed-form geometry, independent of the evaluator."""
    s, size = 18.0, 64
    areas = {"circle": math.pi * s**2 / 4, "square": s**2, "triangle": s**2 / 2}
    for shape, area in areas.items():
        coverage = world.shape_coverage(shape, 32.3, 31.8, s, size)
        # 4x4 supersampling: each boundary pixel is off by at most 1/16 of its area, and on average
        # much less; ~4 s boundary pixels -> well under 2% of the area.
        assert coverage.sum().item() == pytest.approx(area, rel=0.02)
    attrs = Attributes("red", "square", "blue", "top left")
    image = world.to_uint8(world.render(attrs)).permute(1, 2, 0).int()  # canonical: no jitter
    assert image[0, 0].tolist() == list(world.COLOURS["blue"])
    assert image[19, 19].tolist() == list(world.COLOURS["red"])  # the top-left anchor is at 0.3, 0.3 (19.2 px)
    # the canonical square's box (24 px: the middle of SIZE_RANGE) spans 7.2..31.2: pixel 6 is outside, 8 inside
    assert image[6, 19].tolist() == list(world.COLOURS["blue"]) and image[8, 19].tolist() == list(world.COLOURS["red"])
    assert image[48, 48].tolist() == list(world.COLOURS["blue"])


def test_captions_parse_back_and_bad_prompts_fail():
    for attrs in world.all_attributes():
        assert world.parse_prompt(attrs.caption()) == attrs
    assert world.parse_prompt("  A Red circle on a blue background,  TOP LEFT. ") == Attributes(
        "red", "circle", "blue", "top left"
    )
    for bad in (
        "a purple circle on a blue background, top left",  # colour outside the palette
        "a red hexagon on a blue background, top left",
        "a red circle on a blue background, middle left",
        "a red circle on a red background, center",  # nothing would be visible
        "a red circle",
        "",
    ):
        with pytest.raises(ValueError):
            world.parse_prompt(bad)


def test_held_out_split():
    everything, train, held = world.all_attributes(), world.train_attributes(), world.heldout_attributes()
    assert len(everything) == 6 * 3 * 5 * 5 == len(set(everything))
    assert set(train) | set(held) == set(everything) and not set(train) & set(held)
    assert len(held) == 3 * 25 + 2 * 15  # see HELD_OUT_* in world.py
    # composition is only testable if every single attribute value is seen in training
    for name, vocabulary in zip(ATTRIBUTE_NAMES, (world.COLOURS, world.SHAPES, world.COLOURS, world.POSITIONS)):
        assert {getattr(a, name) for a in train} == set(vocabulary)
    for colour, shape in world.HELD_OUT_COLOUR_SHAPE:
        assert not any((a.colour, a.shape) == (colour, shape) for a in train)
    for colour, background in world.HELD_OUT_COLOUR_BACKGROUND:
        assert not any((a.colour, a.background) == (colour, background) for a in train)
    assert not any(world.is_held_out(world.sample(i, seed=1)[2]) for i in range(200))
    assert all(world.is_held_out(world.sample(i, seed=1, split="heldout")[2]) for i in range(50))

    seen, heldout = world.seen_prompts(), world.heldout_prompts()
    assert seen == world.seen_prompts() and heldout == world.heldout_prompts()  # a fixed prompt set
    assert len(seen) == len(set(seen)) == 40 and len(heldout) == len(set(heldout)) == 40
    assert not any(world.is_held_out(world.parse_prompt(p)) for p in seen)
    assert all(world.is_held_out(world.parse_prompt(p)) for p in heldout)
    # round-robin: each of the 5 held-out pairs has 8 prompts
    parsed = [world.parse_prompt(p) for p in heldout]
    for colour, shape in world.HELD_OUT_COLOUR_SHAPE:
        assert sum((a.colour, a.shape) == (colour, shape) for a in parsed) == 8
    with pytest.raises(ValueError):
        world.sample(0, split="test")


# ---------------------------------------------------------------- evaluator


def test_ground_truth_scores_near_100(samples, descriptions):
    images, captions, attrs = samples
    verdicts = [evaluate.judge(d, a) for d, a in zip(descriptions, attrs)]
    attribute = sum(sum(v.values()) for v in verdicts) / (4 * N)
    prompt = sum(all(v.values()) for v in verdicts) / N
    assert attribute >= 0.99 and prompt >= 0.97, (attribute, prompt)
    # score() on the same images, through the uint8 HWC path a saved PNG takes
    subset = slice(0, 40)
    as_png = world.to_uint8(images[subset]).permute(0, 2, 3, 1).numpy()
    result = evaluate.score(list(as_png), captions[subset])
    assert result["n"] == 40 and result["prompt_accuracy"] >= 0.97
    assert set(result) >= {"attribute_accuracy", "prompt_accuracy", *ATTRIBUTE_NAMES}


def test_chance_rates_closed_form():
    # uniform over all 450 combinations: shape colour and background are each uniform over 6 colours
    # (the "colour != background" constraint is symmetric), so sum_v p_v^2 = 1/6, 1/3, 1/6, 1/5
    rates = evaluate.chance_rates(world.all_attributes())
    expected = {"colour": 1 / 6, "shape": 1 / 3, "background": 1 / 6, "position": 1 / 5}
    for name, value in expected.items():
        assert rates[name] == pytest.approx(value, abs=1e-12)
    assert rates["prompt_accuracy"] == pytest.approx(1 / 450, abs=1e-12)


def test_shuffled_captions_score_near_chance(samples, descriptions):
    _, _, attrs = samples
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = [attrs[j] for j in perm]
    verdicts = [evaluate.judge(d, a) for d, a in zip(descriptions, shuffled)]
    chance = evaluate.chance_rates(attrs)
    for name in ATTRIBUTE_NAMES:
        measured = sum(v[name] for v in verdicts) / N
        # matches under a random permutation are ~binomial(N, p): 4 standard deviations
        band = 4 * math.sqrt(chance[name] * (1 - chance[name]) / N)
        assert abs(measured - chance[name]) <= band, (name, measured, chance[name])
        # stronger: the evaluator says "holds" exactly when the true attributes coincide
        truth = [getattr(a, name) == getattr(s, name) for a, s in zip(attrs, shuffled)]
        agreement = sum(v[name] == t for v, t in zip(verdicts, truth)) / N
        assert agreement >= 0.99, (name, agreement)
    prompt = sum(all(v.values()) for v in verdicts) / N
    assert prompt <= chance["prompt_accuracy"] + 4 * math.sqrt(chance["prompt_accuracy"] / N) + 1 / N


@pytest.mark.parametrize("degrade", ["blur2+noise", "downsample4"])
def test_degraded_ground_truth_still_scores(samples, degrade):
    """A generated image is blurry and noisy: blur sigma 2 px plus noise std 0.1 (5% of the range), or
    the detail of a 16 x 16 grid (an f=4 latent) upsampled bilinearly."""
    images, captions, _ = samples
    images, captions = images[:120], captions[:120]
    if degrade == "blur2+noise":
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
        degraded = _gaussian_blur(images, 2.0) + 0.1 * noise
    else:
        degraded = F.interpolate(F.avg_pool2d(images, 4), scale_factor=4, mode="bilinear")
    result = evaluate.score(degraded, captions)
    assert result["attribute_accuracy"] >= 0.95 and result["prompt_accuracy"] >= 0.9, result


def test_blank_image_and_generator_scoring():
    blank = world.render(Attributes("red", "circle", "blue", "center"))
    blank = torch.full_like(blank, -1.0)  # all black: no shape anywhere
    description = evaluate.describe_image(blank)
    assert description["background"] == "black"
    assert description["colour"] is description["shape"] is description["position"] is None
    assert evaluate.evaluate_image(blank, "a red circle on a black background, center") == {
        "colour": False, "shape": False, "background": True, "position": False
    }

    prompts = world.heldout_prompts(10)

    def perfect(batch, seed):  # a jittered render of each prompt, one jitter per seed
        rng = np.random.default_rng(seed)
        return torch.stack([world.render(world.parse_prompt(p), rng) for p in batch])

    def wrong_shape(batch, seed):
        swapped = []
        for p in batch:
            a = world.parse_prompt(p)
            other = "square" if a.shape != "square" else "circle"
            swapped.append(world.render(Attributes(a.colour, other, a.background, a.position)))
        return swapped

    result = evaluate.evaluate_generator(perfect, prompts, seeds=range(2))
    assert result["n"] == 20 and result["prompt_accuracy"] == 1.0
    result = evaluate.evaluate_generator(wrong_shape, prompts, seeds=[0])
    assert result["shape"] == 0.0 and result["colour"] == result["position"] == result["background"] == 1.0
    with pytest.raises(ValueError):
        evaluate.score(torch.zeros(2, 3, 64, 64), ["a red circle on a blue background, center"])


def test_out_of_world_images_are_rejected():
    """Thresholds MAX_COLOUR_RESIDUAL and MAX_FIT_ERROR (see evaluate.py for the measurements): an
    off-palette colour or a silhouette that is none of the three fails, rather than counting as the
    least wrong palette entry."""
    yy, xx = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    r2 = (xx - 32) ** 2 + (yy - 32) ** 2

    def picture(mask, fg, bg=(40, 60, 230)):
        a = mask.float()
        rgb = torch.tensor(bg).view(3, 1, 1) * (1 - a) + torch.tensor(fg).view(3, 1, 1) * a
        return rgb / 127.5 - 1

    disc = r2 <= 81
    assert evaluate.describe_image(picture(disc, (230, 30, 30)))["colour"] == "red"  # control
    for off_palette in ((150, 40, 200), (240, 140, 30), (240, 150, 150)):  # purple, orange, pink
        assert evaluate.describe_image(picture(disc, off_palette))["colour"] is None, off_palette
    not_shapes = {
        "bar": ((xx - 32).abs() <= 14) & ((yy - 32).abs() <= 3),
        "ring": (r2 <= 100) & (r2 >= 36),
        "two discs": ((xx - 26) ** 2 + (yy - 32) ** 2 <= 49) | ((xx - 38) ** 2 + (yy - 32) ** 2 <= 49),
    }
    for name, mask in not_shapes.items():
        description = evaluate.describe_image(picture(mask, (230, 30, 30)))
        assert description["shape"] is None and description["colour"] == "red", name


def test_captions_with_attributes_left_unsaid():
    # scripts/train_demo.py --attr-dropout: each omitted attribute disappears from the caption, nothing else
    attrs = Attributes("red", "circle", "blue", "top left")
    assert attrs.caption(()) == attrs.caption()
    assert attrs.caption(("colour",)) == "a circle on a blue background, top left"
    assert attrs.caption(("shape",)) == "a red shape on a blue background, top left"
    assert attrs.caption(("background",)) == "a red circle, top left"
    assert attrs.caption(("position",)) == "a red circle on a blue background"
    assert attrs.caption(world.ATTRIBUTE_NAMES) == "a shape"
    for omit in (("colour",), ("shape",), ("background",), ("position",)):
        with pytest.raises(ValueError):  # the evaluator's grammar stays the full caption
            world.parse_prompt(attrs.caption(omit))
