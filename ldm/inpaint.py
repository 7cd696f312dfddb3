"""Inpainting in library form: repaint the masked part of an image, with either kind of model.

A. Inpainting models (`LatentInpaintDiffusion`, conditioning_key "hybrid", a 9-channel UNet input), as the
   demos they were released with (runwayml/stable-diffusion scripts/inpaint_st.py for sd-v1-5-inpainting,
   Stability-AI/stablediffusion scripts/streamlit/inpainting.py for 512-inpainting-ema; gradio/inpainting.py
   is the same code with eta fixed to 1): the UNet sees [x_t, mask, masked-image latent], the last two as
   `c_concat` through the one conditioning route (model.apply_model), identical in both CFG branches.
B. Ordinary 4-channel models: masked img2img, composed of the original pieces: the DDIMSampler's own
   `mask`/`x0` blend (CompVis ddim.py ddim_sampling) before every step, at strength 1 from x_T, below 1 after
   scripts/img2img.py's stochastic_encode (ldm/samplers `before_step`).

Conventions (make_batch_sd): the image is uint8 RGB -> float32 / 127.5 - 1; the mask is L / 255 thresholded at
0.5 (>= 0.5 repaints: 127 keeps, 128 repaints), 1 = repaint; the masked image is image * (mask < 0.5), so the
hole is 0, not -1; the latent mask is torch.nn.functional.interpolate(mask, latent size), nearest (the top-left
pixel of each f x f block). Image, mask and masked image are repeated to the batch.

Randomness. A torch CPU generator seeded with `seed` draws first the posterior SAMPLE of the repeated masked
image (A) or init image (B), one per copy, times scale_factor; then the sampler's noise. A's start code is the
EXCEPTION to the noise convention (README, "Noise convention"): both demos draw it with numpy,
np.random.RandomState(seed).randn(n, 4, H/f, W/f) cast to float32, and so does ldm. B draws x_T (strength 1) or
img2img's forward noise (strength < 1) second, then before every step the blend's noise and after it the
step's own (ddim draws it even at eta 0, as the original). Nothing is pasted back: outside the mask the
decoded image is the model's, as the originals'.

The demos hard-code the latent factor 8 (`h // 8`); ldm takes the model's (tiny test models have f = 2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ldm import pipeline, samplers
from ldm.denoisers import CFGDenoiser
from ldm.noise import randn, randn_like


def is_inpainting_model(model) -> bool:
    """Whether `model` is an inpainting model (hybrid conditioning: extra UNet input channels)."""
    return model.conditioning_key == "hybrid"


def latent_factor(model) -> int:
    """The VAE's downsampling factor f (one halving per level but the last)."""
    return 2 ** (len(model.config.first_stage.ddconfig.ch_mult) - 1)


def image_from_uint8(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float32 in [-1, 1], as make_batch_sd: x / 127.5 - 1 (which rounds
    differently from img2img.py's 2 * (x / 255) - 1)."""
    image = np.asarray(array)[None].transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(image)).to(dtype=torch.float32) / 127.5 - 1.0


def mask_from_uint8(array: np.ndarray) -> torch.Tensor:
    """(H, W) uint8 L values -> (1, 1, H, W) float32 in {0, 1}, 1 = repaint: L / 255 >= 0.5, as make_batch_sd."""
    mask = np.asarray(array).astype(np.float32) / 255.0
    return binarize_mask(torch.from_numpy(mask)[None, None])


def binarize_mask(mask: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] -> {0, 1}: >= 0.5 repaints (make_batch_sd's `mask[mask >= 0.5] = 1`)."""
    return (mask >= 0.5).to(torch.float32)


def check_inputs(image: torch.Tensor, mask: torch.Tensor, f: int) -> None:
    """ValueError for an image and mask the run cannot use: other sizes, an all-black mask, a size the
    latent grid does not divide."""
    if image.ndim != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"image must be (1, 3, H, W), got {tuple(image.shape)}")
    if mask.ndim != 4 or mask.shape[:2] != (1, 1):
        raise ValueError(f"mask must be (1, 1, H, W), got {tuple(mask.shape)}")
    if mask.shape[2:] != image.shape[2:]:
        raise ValueError(f"the mask is {mask.shape[3]}x{mask.shape[2]} but the image {image.shape[3]}x"
                         f"{image.shape[2]}: they must have the same size")
    if image.shape[2] % f or image.shape[3] % f:
        raise ValueError(f"image size {image.shape[3]}x{image.shape[2]} is not a multiple of the latent factor {f}")
    if not (mask >= 0.5).any():
        raise ValueError("the mask is all black: nothing to repaint (white = repaint)")


def numpy_start_code(random_state: np.random.RandomState, shape: Sequence[int]) -> torch.Tensor:
    """The demos' start code: random_state.randn(*shape) (float64) cast to float32, on the CPU."""
    return torch.from_numpy(random_state.randn(*shape)).to(dtype=torch.float32)


def mask_blend(x0: torch.Tensor, keep: torch.Tensor, generator: torch.Generator | None) -> Callable:
    """The DDIMSampler's mask/x0 blend as a `before_step` hook: before the step at level sigma,
    x = q_sample(x0, t) * keep + (1 - keep) * x with fresh noise (ddim.py ddim_sampling). In VE space q_sample
    is x0 + sigma * noise (VP sqrt(a) x0 + sqrt(1 - a) noise, divided by sqrt(a))."""
    def before_step(x: torch.Tensor, i: int, sigma: torch.Tensor) -> torch.Tensor:
        noised = x0 + sigma * randn_like(x0, generator)
        return noised * keep + (1.0 - keep) * x
    return before_step


def _concat_denoiser(model, prompts, negative_prompt, scale, c_concat, text=None) -> CFGDenoiser:
    """make_denoiser's CFG denoiser with the inpainting channels in both branches (the demos' uc_full)."""
    guided = pipeline.make_denoiser(model, prompts, negative_prompt, scale, text)
    if c_concat is None:
        return guided
    with_concat = lambda cond: None if cond is None else {**cond, "c_concat": [c_concat]}  # noqa: E731
    return CFGDenoiser(guided.denoiser, guided.scale, cond=with_concat(guided.cond),
                       uncond=with_concat(guided.uncond), batched=guided.batched)


def generate(model, prompts: Sequence[str], image: torch.Tensor, mask: torch.Tensor, *, n_samples: int,
             seed: int, n_iter: int = 1, fixed_code: bool = False, strength: float = 1.0,
             autocast: torch.dtype | None = None, progress: bool = True, sampler: str = "ddim", steps: int = 50,
             schedule: str = "uniform", scale: float = 7.5, eta: float = 0.0, options: dict | None = None,
             negative_prompt: str | Sequence[str] = "", callback: Callable | None = None, text=None,
             loras: Sequence = (), lora_dir=None) -> Iterator[tuple[int, list[str], torch.Tensor]]:
    """(batch number, prompts, latents) for every batch of an inpainting run, as ldm.pipeline.generate (`text`,
    `loras`, `lora_dir`: A1111 prompt syntax, clip skip, embeddings and LoRAs, as there).

    image: (1, 3, H, W) in [-1, 1]; mask: (1, 1, H, W), >= 0.5 repaints. All batches draw, in turn, from one
    torch generator seeded with `seed` (after the posterior sample drawn once for the run) and, for inpainting
    models, one np.random.RandomState(seed) for the start codes; `fixed_code` reuses the first start code. A
    short last batch is padded to n_samples as in pipeline.generate."""
    f = latent_factor(model)
    check_inputs(image, mask, f)
    hybrid = is_inpainting_model(model)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if hybrid and strength != 1.0:
        raise ValueError(f"inpainting models start from pure noise (strength 1.0, as the original demos); "
                         f"got strength {strength}: use an ordinary model for masked img2img")
    device = pipeline.model_device(model)
    mask = binarize_mask(mask)
    height, width = image.shape[2] // f, image.shape[3] // f
    shape = (n_samples, model.config.first_stage.embed_dim, height, width)
    mask_small = F.interpolate(mask, size=(height, width)).expand(n_samples, -1, -1, -1).to(device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    scope = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    from tqdm import tqdm, trange

    with torch.no_grad(), scope:
        if hybrid:  # A: the demos' c_concat; numpy start codes
            masked = (image * (mask < 0.5)).expand(n_samples, -1, -1, -1)
            c_concat = torch.cat([mask_small, pipeline.encode_image(model, masked, generator)], dim=1)
            random_state = np.random.RandomState(seed)
            draw = lambda: numpy_start_code(random_state, shape).to(device)  # noqa: E731
            hook, init_latent = None, None
        else:  # B: masked img2img with the DDIMSampler blend
            c_concat = None
            x0 = pipeline.encode_image(model, image.expand(n_samples, -1, -1, -1), generator)
            hook = mask_blend(x0, 1.0 - mask_small, generator)
            draw = lambda: randn(shape, generator, device)  # noqa: E731
            init_latent = x0 if strength < 1.0 else None
        start_code = draw() if fixed_code else None
        number = 0
        for _ in trange(n_iter, desc="Sampling", disable=not progress):
            for chunk in tqdm(pipeline.batches(prompts, n_samples), desc="data", disable=not progress):
                padded = chunk + chunk[-1:] * (n_samples - len(chunk))
                syntax = text.syntax if text is not None else "plain"
                with pipeline.networks(model, padded[0], syntax, loras, lora_dir):
                    denoiser = _concat_denoiser(model, padded, negative_prompt, scale, c_concat, text)
                    x_T = start_code
                    if x_T is None and init_latent is None:
                        x_T = draw()
                    latents = samplers.sample(
                        denoiser, x_T, sampler=sampler, steps=steps, schedule=schedule, eta=eta, options=options,
                        generator=generator, init_latent=init_latent, strength=strength if init_latent is not None
                        else None, callback=callback, disable=not progress, before_step=hook)
                yield number, chunk, latents[:len(chunk)]
                number += 1


def inpaint(model, image: torch.Tensor, mask: torch.Tensor, prompts: str | Sequence[str], *,
            negative_prompt: str | Sequence[str] = "", sampler: str = "ddim", steps: int = 50,
            schedule: str = "uniform", scale: float = 7.5, eta: float = 0.0, options: dict | None = None,
            strength: float = 1.0, seed: int | None = None, n_samples: int | None = None,
            callback: Callable | None = None, disable: bool = False) -> torch.Tensor:
    """Repaint where `mask` is white: (B, 3, H, W) images in [0, 1] (H, W the image's).

    image: (1, 3, H, W) in [-1, 1] (`image_from_uint8` converts as the demos); mask: (1, 1, H, W) in [0, 1],
    >= 0.5 repaints (`mask_from_uint8`). prompts: a list, or one string repeated n_samples times. An inpainting
    model runs the demos' inpaint() (strength must be 1.0); an ordinary model runs masked img2img at `strength`.
    seed: the torch generator's and, for inpainting models, numpy's start-code seed (None: a fresh one)."""
    prompts = pipeline._as_list(prompts, n_samples)
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0] >> 1)
    runs = generate(model, prompts, image, mask, n_samples=len(prompts), seed=seed, strength=strength,
                    progress=not disable, sampler=sampler, steps=steps, schedule=schedule, scale=scale, eta=eta,
                    options=options, negative_prompt=negative_prompt, callback=callback)
    (_, _, latents), = runs
    with torch.no_grad():
        return pipeline.to_unit(pipeline.decode(model, latents))
