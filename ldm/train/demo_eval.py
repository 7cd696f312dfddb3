"""Prompt adherence of a model on the demo world, generated through the txt2img pipeline (ldm/pipeline.py).

Used by scripts/train_demo.py (final scores), scripts/score_table.py (the README table), scripts/demo.py
and tests/test_demo_model.py, so all of them measure the same thing: images from `pipeline.txt2img` with
the model's own latent size, read back by the classical evaluator of ldm/demo/evaluate.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ldm import pipeline
from ldm.demo import evaluate
from ldm.demo.world import IMAGE_SIZE

DEMO_SCALE = 2.0  # classifier-free guidance scale of the demo (best of 1, 2, 4 on 20 seen prompts at step 300)


def downsampling_factor(model) -> int:
    return 2 ** (len(model.config.first_stage.ddconfig.ch_mult) - 1)


def generate(model, prompts: Sequence[str], seed: int, *, sampler: str = "ddim", steps: int = 25,
             scale: float = DEMO_SCALE, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(N, 3, size, size) images in [0, 1] for `prompts`, one batch, seeded as the CLI (--seed)."""
    return pipeline.txt2img(model, list(prompts), sampler=sampler, steps=steps, scale=scale, H=size, W=size,
                            C=model.config.unet.in_channels, f=downsampling_factor(model), seed=seed,
                            disable=True)


def score_model(model, prompts: Sequence[str], *, sampler: str = "ddim", steps: int = 25,
                scale: float = DEMO_SCALE, seeds: Sequence[int] = (0,), batch_size: int = 40) -> dict:
    """evaluate.score over every prompt x seed; images are uint8-rounded as a saved PNG would be."""
    images, used = [], []
    for seed in seeds:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            batch = generate(model, chunk, seed + start, sampler=sampler, steps=steps, scale=scale)
            images.extend(torch.from_numpy(pipeline.to_uint8(batch)))  # (H, W, 3) uint8 each
            used.extend(chunk)
    return evaluate.score(images, used)
