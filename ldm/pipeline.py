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
import math
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


# What a model family does differently from the originals' scripts (CompVis / Stability, "ldm"): generative-models
# (sgm, SDXL: ldm/models/sgm.py, `model.family`) defaults to its demo's sampler, scale and size, maps --sampler
# names onto its own samplers, and guides at every scale (VanillaCFG).
FAMILY_DEFAULTS = {"ldm": {"sampler": "ddim", "scale": 7.5, "size": 512},
                   "sgm": {"sampler": "euler", "scale": 5.0, "size": 1024}}


def family(model) -> str:
    return getattr(model, "family", "ldm")


def sampler_for(model, sampler: str | None) -> str:
    """The registry name of `sampler` for this model (its family's default when None): sgm models take the
    demo's names (euler, heun, euler_a, dpmpp_2s_a, dpmpp_2m, lms) for generative-models' samplers."""
    return samplers.resolve(sampler or FAMILY_DEFAULTS[family(model)]["sampler"], family(model))


def make_denoiser(model, prompts: list[str], negative_prompt: str | Sequence[str] = "",
                  scale: float = 7.5, text=None, controls: Sequence | None = None,
                  guess_mode: bool = False, value_dict: dict | None = None) -> CFGDenoiser:
    """The sampler's view of the model: eps/v wrapper around `model.apply_model`, with classifier-free guidance.

    As the original scripts, the unconditional branch is the encoding of "" (or of the negative prompt)
    for every sample, and scale 1 skips it (ddim.py calls the model once when the guidance scale is 1).
    The sampler works in float32 whatever the model's dtype; the UNet casts its inputs to its own.
    `text`: ldm.prompts.TextOptions (A1111 syntax, clip skip, embeddings); None is the original's encoding.
    Contexts of different lengths (A1111 chunks) run as two UNet calls (CFGDenoiser), as A1111 does.

    controls: ControlNets with their hints and scales (ldm.models.controlnet.Control, e.g. from `controls()`
    there), part of the conditioning of both branches, or in `guess_mode` of the conditional one only (the
    demos' un_cond with c_concat None). Then the branches run as two calls, conditional first, as
    ControlNet's cldm/ddim_hacked.py does (it calls apply_model once per branch), so that the batch sizes, and
    with them the kernels' rounding, are the original's.

    A model may bring its own parts (ldm/models/sgm.py): `denoiser` (sgm's DiscreteDenoiser), an
    `unconditional_conditioning` (sgm: zeroed text, the negative aesthetic score) and conditioning values
    (`value_dict`: sizes, crop, aesthetic score); sgm guides at scale 1 too (VanillaCFG).
    """
    always = family(model) == "sgm"
    negatives = _as_list(negative_prompt, len(prompts))
    if text is None or text.is_original:  # the original's calls, unchanged
        values = {} if value_dict is None else {"value_dict": value_dict}
        cond = model.conditioning(prompts, **values)
        uncond = None
        if scale != 1.0 or always:
            unconditional = getattr(model, "unconditional_conditioning", model.conditioning)
            uncond = unconditional(negatives, **values)
    else:  # A1111 computes the negative prompt's conditioning first (processing.py setup_conds)
        if always:
            raise ValueError("the A1111 prompt syntax, clip skip and embeddings are for SD 1.x / 2.x models")
        uncond = model.conditioning(negatives, text, negative=True) if scale != 1.0 else None
        cond = model.conditioning(prompts, text)
    if controls:
        cond = {**cond, "control": list(controls)}
        if uncond is not None and not guess_mode:
            uncond = {**uncond, "control": list(controls)}
    # timestep options (integer or fractional t) are the sampler registry's business (SamplerSpec.timing)
    denoiser = getattr(model, "denoiser", None)
    if denoiser is None:
        denoiser = Denoiser(model.apply_model, model.alphas_cumprod, model.parameterization)
    return CFGDenoiser(denoiser, scale, cond=cond, uncond=uncond, batched=not controls, skip_at_one=not always)


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


def check_sampling(model, *, scale: float, eta: float, shape: Sequence[int]) -> None:
    """The numbers of a sampling call, each error naming its argument: a NaN scale would give a black image."""
    for name, value in (("scale", scale), ("eta", eta)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    channels = model.config.unet.in_channels
    if len(shape) != 4 or shape[1] != channels:
        raise ValueError(f"shape must be (B, {channels}, h, w) latents for this model, got {tuple(shape)}")


@torch.no_grad()
def sample(model, prompts: str | Sequence[str], *, negative_prompt: str | Sequence[str] = "",
           sampler: str | None = None, steps: int = 50, schedule: str = "uniform", scale: float | None = None,
           eta: float = 0.0, options: dict | None = None, shape: Sequence[int], generator: Generators,
           x_T: torch.Tensor | None = None, init_latent: torch.Tensor | None = None,
           strength: float | None = None, callback: Callable | None = None,
           disable: bool = False, text=None, controls: Sequence | None = None, guess_mode: bool = False,
           value_dict: dict | None = None, handoff: float | None = None, add_noise: bool = True) -> torch.Tensor:
    """Latents for one batch; draws x_T (or the img2img forward noise) from `generator` unless given.
    `generator`: one for the batch, or one per image (ldm/noise.py; ldm/image_set.py). `options`: the sampler's
    own options (ldm.samplers.SamplerSpec.options). sampler / scale: the model family's defaults when None (ddim,
    7.5; SDXL: euler, 5.0). `text`: ldm.prompts.TextOptions; `controls`, `guess_mode`: ControlNets
    (make_denoiser). value_dict: an sgm model's conditioning values (ldm/models/sgm.py). handoff / add_noise: a
    run stopped early for a refiner and its finishing run (ldm.samplers.sample)."""
    if model.conditioning_key == "hybrid":
        raise ValueError("inpainting (hybrid) models need an image and a mask: use ldm.pipeline.inpaint "
                         "(txt2img/img2img do not run them)")
    device = model_device(model)
    scale = FAMILY_DEFAULTS[family(model)]["scale"] if scale is None else scale
    check_sampling(model, scale=scale, eta=eta, shape=shape)
    denoiser = make_denoiser(model, list(prompts), negative_prompt, scale, text, controls, guess_mode, value_dict)
    if x_T is None:
        x_T = randn(shape, generator, device)
    extra = {} if handoff is None and add_noise else {"handoff": handoff, "add_noise": add_noise}
    return samplers.sample(denoiser, x_T.to(device), sampler=sampler_for(model, sampler), steps=steps,
                           schedule=schedule, eta=eta, options=options, generator=generator, init_latent=init_latent,
                           strength=strength, callback=callback, disable=disable, **extra)


def size_values(height: int, width: int, value_dict: dict | None = None) -> dict:
    """An sgm model's conditioning values for an image of height x width (the demo's init_dict: original and
    target size the image's, crop 0, 0), under the caller's `value_dict`."""
    return {"orig_height": height, "orig_width": width, "target_height": height, "target_width": width,
            **(value_dict or {})}


def text_options(model, prompt_syntax: str = "plain", clip_skip: int = 1, embeddings: Sequence = ()):
    """ldm.prompts.TextOptions for `model` (embedding files read and checked against its text encoder), or
    None when everything is the original's."""
    from ldm.embeddings import load_embeddings
    from ldm.prompts import TextOptions

    database = load_embeddings(embeddings, model.cond_stage_model) if embeddings else None
    text = TextOptions(prompt_syntax, clip_skip, database)
    if clip_skip > 1 and model.cond_stage_model.convention == "open_clip":
        import warnings

        warnings.warn("clip skip is ignored for SD 2 (OpenCLIP text encoder), as A1111 ignores it", stacklevel=2)
        text = TextOptions(prompt_syntax, 1, database)
    return None if text.is_original else text


@contextlib.contextmanager
def networks(model, first_prompt: str, prompt_syntax: str = "plain", loras: Sequence = (), lora_dir=None):
    """The LoRAs of a batch (ldm.lora.for_prompt: the first prompt's <lora:...> tags with the a1111 syntax, then
    `loras`, ldm.lora.LoraSpec or "PATH[:SCALE]") merged into `model` while the block runs, then undone."""
    from ldm import lora

    specs = [lora.parse_lora_arg(x) if isinstance(x, str) else x for x in loras]
    wanted = lora.for_prompt(first_prompt, prompt_syntax, specs, lora_dir)
    if not wanted:
        yield []
        return
    previous = lora.active(model)
    plans = lora.activate(model, wanted)
    try:
        yield plans
    finally:
        lora.activate(model, previous)


def txt2img(model, prompts: str | Sequence[str], *, negative_prompt: str | Sequence[str] = "",
            sampler: str | None = None, steps: int = 50, schedule: str = "uniform", scale: float | None = None,
            eta: float = 0.0, options: dict | None = None, H: int | None = None, W: int | None = None, C: int = 4,
            f: int = 8, seed: int | None = None, generator: torch.Generator | None = None,
            n_samples: int | None = None, x_T: torch.Tensor | None = None, callback: Callable | None = None,
            disable: bool = False, loras: Sequence = (), embeddings: Sequence = (), prompt_syntax: str = "plain",
            lora_dir=None, clip_skip: int = 1, controls: Sequence | None = None, guess_mode: bool = False,
            value_dict: dict | None = None, refiner=None, refiner_strength: float = 0.15,
            refiner_steps: int | None = None) -> torch.Tensor:
    """Images for `prompts` (a list, or one string repeated n_samples times): (B, 3, H, W) in [0, 1].
    H, W: 512 (SDXL: 1024) when None. `loras` ("PATH[:SCALE]" or ldm.lora.LoraSpec), `embeddings` (paths),
    `prompt_syntax` ("plain" | "a1111"), `lora_dir` (for <lora:NAME> tags), `clip_skip` (A1111's numbering): as
    the command line's flags. `controls`, `guess_mode`: ControlNets with their hints (make_denoiser). SDXL:
    `value_dict` overrides the size / crop conditioning (default: H x W, crop 0, 0); `refiner` (an sgm model)
    finishes the last `refiner_strength` of the run in `refiner_steps` (default `steps`) as the demo's "finish
    denoising with refiner" (ldm/refiner.py) and decodes."""
    prompts = _as_list(prompts, n_samples)
    H = FAMILY_DEFAULTS[family(model)]["size"] if H is None else H
    W = FAMILY_DEFAULTS[family(model)]["size"] if W is None else W
    if H % f or W % f:
        raise ValueError(f"H and W must be multiples of f={f} (got {H}x{W})")
    generator = _generator(seed, generator)
    text = text_options(model, prompt_syntax, clip_skip, embeddings)
    sgm = {"value_dict": size_values(H, W, value_dict)} if family(model) == "sgm" else {}
    if refiner is not None:
        sgm["handoff"] = refiner_strength
    with networks(model, prompts[0], prompt_syntax, loras, lora_dir):
        latents = sample(model, prompts, negative_prompt=negative_prompt, sampler=sampler, steps=steps,
                         schedule=schedule, scale=scale, eta=eta, options=options,
                         shape=(len(prompts), C, H // f, W // f), generator=generator, x_T=x_T,
                         callback=callback, disable=disable, text=text, controls=controls, guess_mode=guess_mode,
                         **sgm)
    if refiner is not None:
        from ldm.refiner import refine

        latents = refine(refiner, latents, prompts, generator, negative_prompt=negative_prompt,
                         strength=refiner_strength, steps=refiner_steps or steps, sampler=sampler, schedule=schedule,
                         scale=scale, value_dict=value_dict, disable=disable)
    with torch.no_grad():
        return to_unit(decode(refiner or model, latents))


def img2img(model, init_image: torch.Tensor, prompts: str | Sequence[str], *, strength: float = 0.75,
            negative_prompt: str | Sequence[str] = "", sampler: str | None = None, steps: int = 50,
            schedule: str = "uniform", scale: float = 5.0, eta: float = 0.0, options: dict | None = None,
            seed: int | None = None,
            generator: torch.Generator | None = None, n_samples: int | None = None,
            callback: Callable | None = None, disable: bool = False, loras: Sequence = (),
            embeddings: Sequence = (), prompt_syntax: str = "plain", lora_dir=None,
            clip_skip: int = 1, controls: Sequence | None = None, guess_mode: bool = False,
            value_dict: dict | None = None) -> torch.Tensor:
    """Variations of `init_image` ((1 or B, 3, H, W) in [-1, 1]): (B, 3, H, W) images in [0, 1].
    LoRA, embedding, syntax and clip-skip arguments as txt2img.

    As the original img2img.py: the init image is repeated to the batch and encoded (one posterior sample
    per copy), noised to the level `strength` of the way through the schedule, then denoised from there.
    SDXL: the size conditioning defaults to the image's size (the demo's run_img2img).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if init_image.ndim != 4 or init_image.shape[1] != 3:
        raise ValueError(f"init_image must be (1 or B, 3, H, W) in [-1, 1], got {tuple(init_image.shape)}")
    prompts = _as_list(prompts, n_samples)
    generator = _generator(seed, generator)
    if init_image.shape[0] == 1:
        init_image = init_image.expand(len(prompts), -1, -1, -1)
    text = text_options(model, prompt_syntax, clip_skip, embeddings)
    sgm = {"value_dict": size_values(*init_image.shape[2:], value_dict)} if family(model) == "sgm" else {}
    with networks(model, prompts[0], prompt_syntax, loras, lora_dir):
        with torch.no_grad():
            init_latent = encode_image(model, init_image, generator)
        latents = sample(model, prompts, negative_prompt=negative_prompt, sampler=sampler, steps=steps,
                         schedule=schedule, scale=scale, eta=eta, options=options, shape=init_latent.shape,
                         generator=generator, init_latent=init_latent, strength=strength, callback=callback,
                         disable=disable, text=text, controls=controls, guess_mode=guess_mode, **sgm)
    with torch.no_grad():
        return to_unit(decode(model, latents))


def inpaint(model, image: torch.Tensor, mask: torch.Tensor, prompts: str | Sequence[str], **options) -> torch.Tensor:
    """Repaint where `mask` ((1, 1, H, W), >= 0.5) is white in `image` ((1, 3, H, W) in [-1, 1]): (B, 3, H, W)
    images in [0, 1]. Inpainting models as the demos they were released with, ordinary models as masked
    img2img; conventions, options and randomness in ldm/inpaint.py."""
    from ldm import inpaint as inpainting  # it builds on this module

    return inpainting.inpaint(model, image, mask, prompts, **options)


def batches(prompts: Sequence[str], n_samples: int) -> list[list[str]]:
    """Consecutive chunks of n_samples prompts (the originals' `chunk`); the last may be shorter."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    return [prompts[i:i + n_samples] for i in range(0, len(prompts), n_samples)]


def generate(model, prompts: Sequence[str], *, n_samples: int, latent_shape: Sequence[int], seed: int,
             n_iter: int = 1, fixed_code: bool = False, init_image: torch.Tensor | None = None,
             strength: float | None = None, autocast: torch.dtype | None = None, progress: bool = True,
             loras: Sequence = (), lora_dir=None, second_stage: Callable | None = None,
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
    scale, eta, options, negative_prompt, text, value_dict, handoff) and ControlNets (controls, guess_mode).
    `loras` / `lora_dir`: the LoRAs of every batch (`networks`: with the a1111 syntax, also the tags of the batch's
    first prompt, as A1111), merged while the batch samples. `second_stage(latents, prompts, generator)` runs on
    every batch's latents with the run's generator (the SDXL refiner, ldm/refiner.py).
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
                syntax = sampling["text"].syntax if sampling.get("text") is not None else "plain"
                with networks(model, padded[0], syntax, loras, lora_dir):
                    latents = sample(model, padded, shape=shape, generator=generator, x_T=start_code,
                                     init_latent=init_latent, strength=strength, disable=not progress, **sampling)
                if second_stage is not None:
                    latents = second_stage(latents, padded, generator)
                yield number, chunk, latents[:len(chunk)]
                number += 1
