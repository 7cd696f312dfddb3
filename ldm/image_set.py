"""Image sets (FID / CLIP-score sized) with one generator per image, for any batch size, rank and world size.

The convention (README, "Image sets"): image i of a set is the k-th image of prompt p = i // K (K images per
prompt, k = i % K) and has the seed S + i (S the base seed; a prompt row may give its own seed s, then its
images have s + k). Its x_T and every noise draw of its sampler come from its own CPU generator seeded with
that seed (ldm/noise.py draws row k of a batch from generator k), so x_T is the one txt2img draws for
`--seed S+i --n_samples 1`, and an image depends only on its index and the settings, never on the batch it
lands in, the rank or the world size. The original scripts (and txt2img here) draw a whole run from ONE
generator instead, so there an image depends on everything drawn before it.

Batches are consecutive runs of n_samples indices, the last one padded with copies of its last image (their
results are dropped), so every batch has the same size; with n_samples 1 an image is computed exactly as
txt2img computes `--seed S+i --n_samples 1`. Batch j belongs to rank j % world_size: each batch holds the
same images in the same rows whatever the world size, which is what makes image sets bit-identical on the
CPU across world sizes (kernels can round differently for another batch size, README "Image sets").
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ldm import pipeline


@dataclass(frozen=True)
class Prompt:
    """One row of a prompt list: the text, its negative prompt (None: the run's) and its seed (None: S + i)."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Item:
    """Image `index` of a set: its prompt, negative prompt and seed."""

    index: int
    prompt: str
    negative_prompt: str
    seed: int


def plan(prompts: Sequence[Prompt], images_per_prompt: int, seed: int, negative_prompt: str = "") -> list[Item]:
    """Every image of the set, index order: image i = p * K + k is the k-th image of prompts[p]."""
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be at least 1, got {images_per_prompt}")
    items = []
    for p, row in enumerate(prompts):
        for k in range(images_per_prompt):
            i = p * images_per_prompt + k
            items.append(Item(i, row.prompt, negative_prompt if row.negative_prompt is None else row.negative_prompt,
                              seed + i if row.seed is None else row.seed + k))
    return items


def batches(items: Sequence[Item], n_samples: int) -> list[list[Item]]:
    """Consecutive chunks of n_samples images (batch j holds indices j * n_samples, ...); the last may be short."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    return [list(items[j:j + n_samples]) for j in range(0, len(items), n_samples)]


def shard(n_batches: int, rank: int, world_size: int) -> list[int]:
    """The batch numbers rank `rank` computes: j = rank, rank + world_size, ..."""
    return list(range(rank, n_batches, world_size))


def generators(items: Sequence[Item]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with its seed (the txt2img generator of `--seed <seed>`)."""
    return [torch.Generator(device="cpu").manual_seed(item.seed) for item in items]


@torch.no_grad()
def sample_images(model, items: Sequence[Item], *, n_samples: int, latent_shape: Sequence[int],
                  autocast: torch.dtype | None = None, **sampling) -> torch.Tensor:
    """Images (len(items), 3, H, W) in [0, 1] on the CPU for one batch of at most n_samples images.

    The batch is padded to n_samples with copies of its last image, sampled (ldm.pipeline.sample with one
    generator per row) and decoded whole, as txt2img samples and decodes a batch. `autocast`: run under
    torch.autocast of the model's device type with that dtype. `sampling`: sampler, steps, schedule, scale,
    eta, options (the negative prompts are the items').
    """
    items = list(items)
    if not 1 <= len(items) <= n_samples:
        raise ValueError(f"a batch holds 1 to {n_samples} images, got {len(items)}")
    padded = items + items[-1:] * (n_samples - len(items))
    device = pipeline.model_device(model)
    scope = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with scope:
        latents = pipeline.sample(model, [item.prompt for item in padded],
                                  negative_prompt=[item.negative_prompt for item in padded],
                                  shape=(n_samples, *latent_shape), generator=generators(padded), disable=True,
                                  **sampling)
        images = pipeline.to_unit(pipeline.decode(model, latents))
    return images[:len(items)]
