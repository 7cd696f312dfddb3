"""The SDXL base -> refiner handoff: generative-models' demo "finish denoising with refiner".

Specification: scripts/demo/sampling.py (its __main__ with "Load SDXL-refiner?" and "Finish denoising with
refiner.", apply_refiner) and streamlit_helpers.py do_img2img(skip_encode=True, add_noise=False). The base runs
its sampler on Txt2NoisyDiscretizationWrapper(strength, original_steps=steps) (ldm.pipeline.sample with
`handoff`) and stops at a noise level; its latent, undecoded and as the sampler left it, goes to the refiner
with the same generator (no reseeding), which:

- conditions on sizes of 8 x the latent's (apply_refiner hard-codes SDXL's VAE factor), crop 0, 0, the
  aesthetic scores 6.0 / 2.5 (or the caller's), the prompt and the negative prompt (never zeroed text);
- draws one randn_like of the latent and does NOT use it (add_noise=False);
- runs its sampler on Img2ImgDiscretizationWrapper(strength) of its own `steps`, from x = z / sqrt(1 + s0^2)
  (s0 the first of those levels; the sampler multiplies it back);
- and the result is decoded with the refiner's VAE.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ldm import pipeline

# apply_refiner's value_dict: the latent's size times 8, crop 0, the demo's aesthetic scores
LATENT_FACTOR = 8
DEFAULT_SCORES = {"aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}


def refiner_values(latents: torch.Tensor, value_dict: dict | None = None) -> dict:
    """apply_refiner's conditioning values for `latents`; only the aesthetic scores of `value_dict` apply."""
    height, width = (LATENT_FACTOR * n for n in latents.shape[2:])
    scores = {k: (value_dict or {}).get(k, v) for k, v in DEFAULT_SCORES.items()}
    return {**pipeline.size_values(height, width), "crop_coords_top": 0, "crop_coords_left": 0, **scores}


@torch.no_grad()
def refine(refiner, latents: torch.Tensor, prompts: Sequence[str], generator: torch.Generator, *,
           negative_prompt: str | Sequence[str] = "", strength: float = 0.15, steps: int = 50,
           sampler: str | None = None, schedule: str = "uniform", scale: float | None = None,
           options: dict | None = None, value_dict: dict | None = None, disable: bool = False) -> torch.Tensor:
    """The refiner's latents for a base run's stopped `latents` (see the module docstring)."""
    return pipeline.sample(refiner, list(prompts), negative_prompt=negative_prompt, sampler=sampler, steps=steps,
                           schedule=schedule, scale=scale, options=options, shape=tuple(latents.shape),
                           generator=generator, init_latent=latents, strength=strength, add_noise=False,
                           value_dict=refiner_values(latents, value_dict), disable=disable)
