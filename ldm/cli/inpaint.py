"""What scripts/inpaint.py adds to the shared command line (flags, inputs, run, record, rerun): reading the init
image and the mask as the demos' make_batch_sd does, the checks of image, mask and model, and the run's batches
(ldm/inpaint.py generate). Outputs, PNG parameters (with the mask's hash) and rerun are the shared ones."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ldm import inpaint, png_info, samplers, schedules
from ldm.cli import images
from ldm.cli.flags import CLIError
from ldm.samplers import SAMPLERS


def read_inputs(opts: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(image (1, 3, H, W) in [-1, 1], mask (1, 1, H, W) in {0, 1}) as make_batch_sd: RGB / 127.5 - 1, and
    L / 255 >= 0.5; not resized (the output has the init image's size). Sets opts.H, opts.W."""
    image = images.read_uint8(opts.init_img, "init image", "RGB")
    mask = images.read_uint8(opts.mask, "mask", "L")
    if mask.shape != image.shape[:2]:
        raise CLIError(f"the mask {opts.mask} is {mask.shape[1]}x{mask.shape[0]} but the init image "
                       f"{opts.init_img} is {image.shape[1]}x{image.shape[0]}: they must have the same size")
    if not (mask >= 128).any():  # L / 255 >= 0.5 exactly when L >= 128
        raise CLIError(f"the mask {opts.mask} is all black: nothing to repaint (white = repaint)")
    opts.H, opts.W = image.shape[:2]
    return inpaint.image_from_uint8(image), inpaint.mask_from_uint8(mask)


def check_run(opts: argparse.Namespace, model, mask: torch.Tensor) -> None:
    """The run against the loaded model: image size, strength, sampler and step count."""
    f = inpaint.latent_factor(model)
    # the VAE divides by f, the UNet halves the latent len(channel_mult) - 1 times and concatenates skips
    multiple = f * 2 ** (len(model.config.unet.channel_mult) - 1)
    if opts.H % multiple or opts.W % multiple:
        raise CLIError(f"the init image is {opts.W}x{opts.H}; this model needs a multiple of {multiple} on both "
                       f"sides (the demos resize to a multiple of 64)")
    if inpaint.is_inpainting_model(model):
        if opts.strength != 1.0:
            raise CLIError(f"--strength {opts.strength}: an inpainting model starts from noise (--strength 1.0, "
                           f"as the original demos); masked img2img at lower strengths needs a 4-channel model")
    elif not SAMPLERS[opts.sampler].stepwise:
        valid = ", ".join(name for name, spec in SAMPLERS.items() if spec.stepwise)
        raise CLIError(f"--sampler {opts.sampler} cannot blend the kept region before every step (it carries "
                       f"state across steps); masked img2img with a 4-channel model takes: {valid}")
    expected = 4 + 1 + 4 if inpaint.is_inpainting_model(model) else 4
    if model.config.unet.in_channels != expected:
        raise CLIError(f"the UNet takes {model.config.unet.in_channels} input channels: neither an inpainting "
                       f"model (9) nor an ordinary one (4)")
    try:  # some step counts select timesteps outside the schedule (the original's IndexError)
        samplers.sigma_list(SAMPLERS[opts.sampler], schedules.discrete_sigmas(model.alphas_cumprod.cpu()),
                            opts.ddim_steps, opts.schedule)
    except ValueError as e:
        raise CLIError(f"--ddim_steps {opts.ddim_steps}: {e}") from None
    latent_mask = F.interpolate(mask, size=(opts.H // f, opts.W // f))
    if not latent_mask.any():
        print(f"warning: the mask's white area holds none of the pixels the {opts.W // f}x{opts.H // f} latent mask "
              f"samples (the top-left pixel of each {f}x{f} block): the latent mask is empty", file=sys.stderr)


def file_hashes(opts: argparse.Namespace) -> dict[str, str]:
    """The init image's and the mask's names and hashes, for the PNG parameters (rerun checks the hashes)."""
    return {"Init image": opts.init_img, "Init image hash": png_info.file_hash(opts.init_img),
            "Mask": opts.mask, "Mask hash": png_info.file_hash(opts.mask)}


def generate(opts: argparse.Namespace, model, prompts: list[str], image: torch.Tensor, mask: torch.Tensor,
             autocast: torch.dtype | None = None) -> Iterator[tuple[int, list[str], torch.Tensor]]:
    """(batch number, prompts, latents) for every batch of the run (ldm.inpaint.generate with the flags)."""
    return inpaint.generate(
        model, prompts, image, mask, n_samples=opts.n_samples, seed=opts.seed, n_iter=opts.n_iter,
        fixed_code=opts.fixed_code, strength=opts.strength, autocast=autocast, sampler=opts.sampler,
        steps=opts.ddim_steps, schedule=opts.schedule, scale=opts.scale, eta=opts.ddim_eta,
        negative_prompt=opts.negative_prompt, text=opts.text, loras=opts.lora, lora_dir=opts.lora_dir)
