"""txt2img and img2img in library form: text -> conditioning -> noise -> sampler -> VAE decode.

As scripts/txt2img.py and scripts/img2img.py of CompVis/stable-diffusion, without file handling (that is
ldm/cli/). Noise convention (README): every random number comes from one CPU `torch.Generator`, drawn in
float32 on the CPU and then moved to the model's device, so a seed gives the same image on any device.

- txt2img: x_T = randn([n, C, H/f, W/f]) is drawn first, then the sampler draws its per-step noise (the
  k-family starts from x_T * sigmas[0]).
- img2img: the VAE posterior sample of the init image is drawn first (`encode_image`), then the
  forward-noising noise, then the sampler's per-step noise.

Images come back as float32 (B, 3, H, W) tensors in [0, 1] on the CPU: clamp((x + 1) / 2, 0, 1) as the
original scripts; `to_uint8` then truncates 255 * x as they do (`x.astype(np.uint8)`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from ldm import samplers
from ldm.denoisers import CFGDenoiser, Denoiser
from ldm.noise import Generators, randn


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8, truncating 255 * x as the original scripts."""
    array = 255.0 * images.detach().to(device="cpu", dtype=torch.float32).permute(0, 2, 3, 1).numpy()
    return array.astype(np.uint8)


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """torchvision.utils.make_grid (the originals' grid): `nrow` images per row, `padding` px of `pad_value`
    around and between them. As there, a single image comes back unpadded."""
    if images.shape[0] == 1:
        return images[0]
    n, channels, height, width = images.shape
    columns = min(nrow, n)
    rows = -(-n // columns)
    cell_h, cell_w = height + padding, width + padding
    grid = images.new_full((channels, rows * cell_h + padding, columns * cell_w + padding), pad_value)
    for k in range(n):
        y, x = divmod(k, columns)
        grid[:, y * cell_h + padding:(y + 1) * cell_h, x * cell_w + padding:(x + 1) * cell_w] = images[k]
    return grid


def _as_list(prompts: str | Sequence[str], n_samples: int | None) -> list[str]:
    if isinstance(prompts, str):
        return [prompts] * (n_samples or 1)
    prompts = list(prompts)
    if n_samples is not None and n_samples != len(prompts):
        raise ValueError(f"{len(prompts)} prompts given for n_samples={n_samples}")
    return prompts


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        if seed is not None:
            raise ValueError("give either seed or generator, not both")
        return generator
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()  # a fresh nondeterministic seed (torch.Generator() alone has a fixed default)
    else:
        generator.manual_seed(seed)
    return generator


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.unet.parameters()).dtype


def make_denoiser(model, prompts: list[str], negative_prompt: str | Sequence[str] = "",
                  scale: float = 7.5) -> CFGDenoiser:
    """The sampler's view of the model: eps/v wrapper around `model.apply_model`, with classifier-free guidance.

    As the original scripts, the unconditional branch is the encoding of "" (or of the negative prompt)
    for every sample, and scale 1 skips it (ddim.py calls the model once when the guidance scale is 1).
    The sampler works in float32 whatever the model's dtype; the UNet casts its inputs to its own.
    """
    cond = model.conditioning(prompts)
    uncond = None
    if scale != 1.0:
        uncond = model.conditioning(_as_list(negative_prompt, len(prompts)))
    # timestep options (integer or fractional t) are the sampler registry's business (SamplerSpec.timing)
    denoiser = Denoiser(model.apply_model, model.alphas_cumprod, model.parameterization)
    return CFGDenoiser(denoiser, scale, cond=cond, uncond=uncond)


def decode(model, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode of sampler latents -> float32 images in [-1, 1] (not clamped), as decode_first_stage.

    Half-precision VAE decoders are known to overflow to NaN on some latents (the SD v1/v2 VAEs in fp16);
    then the decode is repeated in float32 with autocast off.
    """
    images = model.decode_first_stage(latents).float()
    if torch.isfinite(images).all():
        return images
    vae = model.vae
    autocast_on = torch.is_autocast_enabled(latents.device.type)
    if next(vae.parameters()).dtype == torch.float32 and not autocast_on:
        return images
    vae32 = vae if next(vae.parameters()).dtype == torch.float32 else copy.deepcopy(vae).float()
    with torch.autocast(latents.device.type, enabled=False) if autocast_on else contextlib.nullcontext():
        return model.decode_first_stage(latents.float(), vae=vae32).float()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] decoder output -> [0, 1] on the CPU, as the original scripts' clamp((x + 1) / 2)."""
    return torch.clamp((images.float() + 1.0) / 2.0, min=0.0, max=1.0).cpu()


def encode_image(model, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scaled latent of (B, 3, H, W) images in [-1, 1]: a posterior SAMPLE (as the original img2img's
    get_first_stage_encoding), drawn from `generator`, times scale_factor."""
    posterior = model.vae.encode(image.to(device=model_device(model), dtype=model_dtype(model)))
    return model.get_first_stage_encoding(posterior, generator).float()


@torch.no_grad()
def sample(model, prompts: str | Sequence[str], *, negative_prompt: str | Sequence[str] = "",
           sampler: str = "ddim", steps: int = 50, schedule: str = "uniform", scale: float = 7.5,
           eta: float = 0.0, options: dict | None = None, shape: Sequence[int], generator: Generators,
           x_T: torch.Tensor | None = None, init_latent: torch.Tensor | None = None,
           strength: float | None = None, callback: Callable | None = None,
           disable: bool = False) -> torch.Tensor:
    """Latents for one batch; draws x_T (or the img2img forward noise) from `generator` unless given.
    `generator`: one for the batch, or one per image (ldm/noise.py; ldm/image_set.py). `options`: the
    sampler's own options (ldm.samplers.SamplerSpec.options)."""
    if model.conditioning_key == "hybrid":
        raise ValueError("inpainting (hybrid) models need a mask and a masked image; txt2img/img2img "
                         "do not support them")
    device = model_device(model)
    denoiser = make_denoiser(model, list(prompts), negative_prompt, scale)
    if x_T is None:
        x_T = randn(shape, generator, device)
    return samplers.sample(denoiser, x_T.to(device), sampler=sampler, steps=steps, schedule=schedule,
                           eta=eta, options=options, generator=generator, init_latent=init_latent,
                           strength=strength, callback=callback, disable=disable)


def txt2img(model, prompts: str | Sequence[str], *, negative_prompt: str | Sequence[str] = "",
            sampler: str = "ddim", steps: int = 50, schedule: str = "uniform", scale: float = 7.5,
            eta: float = 0.0, options: dict | None = None, H: int = 512, W: int = 512, C: int = 4, f: int = 8,
            seed: int | None = None, generator: torch.Generator | None = None, n_samples: int | None = None,
            x_T: torch.Tensor | None = None, callback: Callable | None = None,
            disable: bool = False) -> torch.Tensor:
    """Images for `prompts` (a list, or one string repeated n_samples times): (B, 3, H, W) in [0, 1]."""
    prompts = _as_list(prompts, n_samples)
    if H % f or W % f:
        raise ValueError(f"H and W must be multiples of f={f} (got {H}x{W})")
    generator = _generator(seed, generator)
    latents = sample(model, prompts, negative_prompt=negative_prompt, sampler=sampler, steps=steps,
                     schedule=schedule, scale=scale, eta=eta, options=options,
                     shape=(len(prompts), C, H // f, W // f),
                     generator=generator, x_T=x_T, callback=callback, disable=disable)
    with torch.no_grad():
        return to_unit(decode(model, latents))


def img2img(model, init_image: torch.Tensor, prompts: str | Sequence[str], *, strength: float = 0.75,
            negative_prompt: str | Sequence[str] = "", sampler: str = "ddim", steps: int = 50,
            schedule: str = "uniform", scale: float = 5.0, eta: float = 0.0, options: dict | None = None,
            seed: int | None = None,
            generator: torch.Generator | None = None, n_samples: int | None = None,
            callback: Callable | None = None, disable: bool = False) -> torch.Tensor:
    """Variations of `init_image` ((1 or B, 3, H, W) in [-1, 1]): (B, 3, H, W) images in [0, 1].

    As the original img2img.py: the init image is repeated to the batch and encoded (one posterior sample
    per copy), noised to the level `strength` of the way through the schedule, then denoised from there.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    prompts = _as_list(prompts, n_samples)
    generator = _generator(seed, generator)
    if init_image.shape[0] == 1:
        init_image = init_image.expand(len(prompts), -1, -1, -1)
    with torch.no_grad():
        init_latent = encode_image(model, init_image, generator)
    latents = sample(model, prompts, negative_prompt=negative_prompt, sampler=sampler, steps=steps,
                     schedule=schedule, scale=scale, eta=eta, options=options, shape=init_latent.shape,
                     generator=generator,
                     init_latent=init_latent, strength=strength, callback=callback, disable=disable)
    with torch.no_grad():
        return to_unit(decode(model, latents))


def batches(prompts: Sequence[str], n_samples: int) -> list[list[str]]:
    """Consecutive chunks of n_samples prompts (the originals' `chunk`); the last may be shorter."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    return [prompts[i:i + n_samples] for i in range(0, len(prompts), n_samples)]


def generate(model, prompts: Sequence[str], *, n_samples: int, latent_shape: Sequence[int], seed: int,
             n_iter: int = 1, fixed_code: bool = False, init_image: torch.Tensor | None = None,
             strength: float | None = None, autocast: torch.dtype | None = None, progress: bool = True,
             **sampling) -> Iterator[tuple[int, list[str], torch.Tensor]]:
    """(batch number, prompts, latents) for every batch of a run: `n_iter` passes over `prompts` in
    batches of n_samples, as the original scripts/txt2img.py and img2img.py loop.

    Randomness (README, "Noise convention"): one CPU generator seeded with `seed` before anything is drawn.
    img2img (`init_image`, 1 x 3 x H x W in [-1, 1]): the image is repeated to n_samples and encoded first (one
    posterior sample per copy). `fixed_code` draws one start code and reuses it for every batch (as
    --fixed_code); otherwise every batch draws fresh noise from the same generator in turn. A short last
    batch is padded with its last prompt to n_samples (the original fails on it), so that every batch draws
    the same amount of noise; the padding's latents are dropped. `autocast`: run under torch.autocast of the
    model's device type with that dtype. `sampling`: sample()'s sampler options (sampler, steps, schedule,
    scale, eta, options, negative_prompt).
    """
    device = model_device(model)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    chunks = batches(prompts, n_samples)
    shape = (n_samples, *latent_shape)
    scope = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    from tqdm import tqdm, trange  # progress bars belong to whole runs, not to the library's single calls

    with torch.no_grad(), scope:
        init_latent = None
        if init_image is not None:
            init_latent = encode_image(model, init_image.expand(n_samples, -1, -1, -1), generator)
            shape = tuple(init_latent.shape)
        start_code = randn(shape, generator, device) if fixed_code else None
        number = 0
        for _ in trange(n_iter, desc="Sampling", disable=not progress):
            for chunk in tqdm(chunks, desc="data", disable=not progress):
                padded = chunk + chunk[-1:] * (n_samples - len(chunk))
                latents = sample(model, padded, shape=shape, generator=generator, x_T=start_code,
                                 init_latent=init_latent, strength=strength, disable=not progress, **sampling)
                yield number, chunk, latents[:len(chunk)]
                number += 1
