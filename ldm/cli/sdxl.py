"""The command line for SDXL (generative-models / sgm configs): its flags, their defaults and checks, the init
image as the demo reads it, and the refiner.

For an sgm config (model.target sgm.models.diffusion.DiffusionEngine) --sampler takes the demo's samplers
(euler = EulerEDMSampler, the default; heun, euler_a, dpmpp_2s_a, dpmpp_2m, lms) and refuses the others, --schedule
uniform (LegacyDDPMDiscretization) or karras (EDMDiscretization(sigmas[0], sigmas[-1], 7)), --scale defaults to
5.0 and --H/--W to 1024. The size / crop / aesthetic conditioning defaults as the demo's: original and target
size the image's (txt2img: --H/--W; img2img: the init image's), crop 0, 0, aesthetic scores 6.0 / 2.5.
txt2img with --refiner_ckpt hands the last --refiner_strength of the run to the refiner (ldm/refiner.py).
"""

from __future__ import annotations

import argparse
import functools
import os

import numpy as np
import torch
from PIL import Image

from ldm import schedules
from ldm.cli import images
from ldm.cli.flags import CLIError, FamilyDefault
from ldm.pipeline import FAMILY_DEFAULTS

# (flag, option, type, default when the model reads it: None = from the image size)
SIZE_FLAGS = (("--orig_height", "orig_height", int), ("--orig_width", "orig_width", int),
              ("--crop_top", "crop_top", int), ("--crop_left", "crop_left", int),
              ("--target_height", "target_height", int), ("--target_width", "target_width", int))
SCORE_FLAGS = (("--aesthetic_score", "aesthetic_score", float, 6.0),
               ("--negative_aesthetic_score", "negative_aesthetic_score", float, 2.5))
REFINER_FLAGS = ("refiner_config", "refiner_ckpt", "refiner_strength", "refiner_steps")
# option -> the demo's value_dict key
VALUE_KEYS = {"orig_height": "orig_height", "orig_width": "orig_width", "crop_top": "crop_coords_top",
              "crop_left": "crop_coords_left", "target_height": "target_height", "target_width": "target_width",
              "aesthetic_score": "aesthetic_score", "negative_aesthetic_score": "negative_aesthetic_score"}


def add_flags(p: argparse.ArgumentParser, img2img: bool, refiner: bool | None = None) -> None:
    """The SDXL flags; `refiner` (default: txt2img's, not img2img's) adds the base-to-refiner handoff."""
    g = p.add_argument_group("SDXL (generative-models configs; see README, SDXL)")
    size = "the init image's" if img2img else "--H/--W"
    g.add_argument("--orig_height", type=int, default=None, help=f"original-size conditioning (default: {size})")
    g.add_argument("--orig_width", type=int, default=None, help=f"original-size conditioning (default: {size})")
    g.add_argument("--crop_top", type=int, default=None, help="crop conditioning, top (default 0)")
    g.add_argument("--crop_left", type=int, default=None, help="crop conditioning, left (default 0)")
    g.add_argument("--target_height", type=int, default=None, help=f"target-size conditioning (default: {size})")
    g.add_argument("--target_width", type=int, default=None, help=f"target-size conditioning (default: {size})")
    g.add_argument("--aesthetic_score", type=float, default=None,
                   help="aesthetic-score conditioning of the refiner (default 6.0)")
    g.add_argument("--negative_aesthetic_score", type=float, default=None,
                   help="aesthetic score of the refiner's unconditional branch (default 2.5)")
    if not img2img if refiner is None else refiner:
        g.add_argument("--refiner_config", type=str, default=None, help="config of the SDXL refiner")
        g.add_argument("--refiner_ckpt", type=str, default=None,
                       help="the refiner's checkpoint: the base stops early and the refiner finishes the image")
        g.add_argument("--refiner_strength", type=float, default=None,
                       help="the share of the denoising the refiner does (default 0.15)")
        g.add_argument("--refiner_steps", type=int, default=None, help="the refiner's steps (default: --ddim_steps)")


@functools.lru_cache(maxsize=8)
def _config(path: str, mtime: float):
    from ldm.config import load_config

    return load_config(path)


def config_of(path: str | None):
    """The parsed config at `path`, or None when there is no such file or it does not read (both reported where
    the model is loaded, after the flags' own checks)."""
    from ldm.config import ConfigError

    if not path or not os.path.isfile(path):
        return None
    try:
        return _config(os.path.abspath(path), os.path.getmtime(path))
    except ConfigError:
        return None


def is_sgm(cfg) -> bool:
    from ldm.config_sgm import DiffusionEngineConfig

    return isinstance(cfg, DiffusionEngineConfig)


def input_keys(cfg) -> set[str]:
    return {e.input_key for e in cfg.conditioner}


def resolve(opts: argparse.Namespace, mode: str) -> None:
    """Family defaults (--H/--W, --scale) and the SDXL flags' checks; runs first in inputs.validate."""
    cfg = config_of(opts.config)
    opts.sgm = cfg is not None and is_sgm(cfg)
    if opts.sgm:  # flags left at the original scripts' defaults take the family's
        defaults = FAMILY_DEFAULTS["sgm"]
        for name, value in (("scale", defaults["scale"]), ("H", defaults["size"]), ("W", defaults["size"])):
            if isinstance(getattr(opts, name), FamilyDefault):
                setattr(opts, name, value)
    given = [name for _, name, *_ in SIZE_FLAGS + SCORE_FLAGS if getattr(opts, name) is not None]
    given += [name for name in REFINER_FLAGS if getattr(opts, name, None) is not None]
    if not opts.sgm:
        if given and cfg is not None:
            raise CLIError(f"--{given[0]} applies to SDXL (generative-models) configs only")
        return
    refiner = any(getattr(opts, name, None) is not None for name in REFINER_FLAGS)
    if refiner:
        _check_refiner(opts)
    keys = input_keys(cfg) | (input_keys(config_of(opts.refiner_config)) if refiner else set())
    for flag, name, kind, default in SCORE_FLAGS:
        if "aesthetic_score" in keys:
            setattr(opts, name, default if getattr(opts, name) is None else getattr(opts, name))
        elif getattr(opts, name) is not None:
            raise CLIError(f"{flag} applies to a model conditioned on it (the SDXL refiner)")
    for name in ("crop_top", "crop_left"):
        if getattr(opts, name) is None:
            setattr(opts, name, 0)


def _check_refiner(opts: argparse.Namespace) -> None:
    if opts.refiner_ckpt is None or opts.refiner_config is None:
        raise CLIError("a refiner needs both --refiner_config and --refiner_ckpt")
    for path, what in ((opts.refiner_config, "refiner config"), (opts.refiner_ckpt, "refiner checkpoint")):
        if not os.path.isfile(path):
            raise CLIError(f"{what} not found: {path}")
    from ldm.config import load_config

    if not is_sgm(load_config(opts.refiner_config)):  # a config that does not read says why
        raise CLIError(f"--refiner_config {opts.refiner_config} is not a generative-models (SDXL) config")
    if opts.refiner_strength is None:
        opts.refiner_strength = 0.15
    if not 0.0 <= opts.refiner_strength <= 1.0:
        raise CLIError(f"--refiner_strength must be in [0, 1] (got {opts.refiner_strength})")
    if opts.refiner_steps is None:
        opts.refiner_steps = opts.ddim_steps
    if opts.refiner_steps < 1:
        raise CLIError(f"--refiner_steps must be at least 1 (got {opts.refiner_steps})")


def resolve_sizes(opts: argparse.Namespace) -> None:
    """Original and target size default to the image's (--H/--W, or the init image's once it is read)."""
    if not opts.sgm:
        return
    for name, default in (("orig_height", opts.H), ("orig_width", opts.W), ("target_height", opts.H),
                          ("target_width", opts.W)):
        if getattr(opts, name) is None:
            setattr(opts, name, default)


def value_dict(opts: argparse.Namespace) -> dict | None:
    """The demo's value_dict of the run (None for other configs)."""
    if not opts.sgm:
        return None
    return {key: getattr(opts, name) for name, key in VALUE_KEYS.items() if getattr(opts, name) is not None}


def load_init_image(path: str, width: int | None = None, height: int | None = None) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] as the demo's load_img: RGB, resized (PIL's default filter, bicubic) to the
    size rounded down to a multiple of 64 (or the given size), then x / 127.5 - 1."""
    image = Image.fromarray(images.read_uint8(path, "init image", "RGB"))  # 16-bit: by its real range
    w, h = (width, height) if width is not None else (image.width - image.width % 64, image.height - image.height % 64)
    if w == 0 or h == 0:
        raise CLIError(f"init image {path} is smaller than 64x64")
    array = np.array(image.resize((w, h)))
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(dtype=torch.float32) / 127.5 - 1.0


def load_refiner(opts: argparse.Namespace, model):
    """The refiner model, as the base is loaded (device, dtype, precision; never a replacement --vae)."""
    import ldm
    from ldm.cli import inputs
    from ldm.cli.flags import PRECISIONS

    refiner = ldm.load_model(opts.refiner_config, opts.refiner_ckpt, device="cpu" if opts.offload else opts.device,
                             dtype=PRECISIONS[opts.precision], ema=not opts.no_ema)
    unet = refiner.config.unet
    if unet.in_channels != model.config.unet.in_channels:
        raise CLIError(f"the refiner's {unet.in_channels} latent channels differ from the base's "
                       f"{model.config.unet.in_channels}")
    multiple = opts.f * 2 ** (len(unet.channel_mult) - 1)
    if opts.H % multiple or opts.W % multiple:
        raise CLIError(f"--H and --W must be multiples of {multiple} for the refiner (got {opts.H}x{opts.W})")
    inputs.check_model(opts, refiner)
    try:  # LegacyDDPMDiscretization takes at most its 1000 timesteps
        schedules.sgm_sigma_list(refiner.sigmas, opts.refiner_steps, opts.schedule)
    except ValueError as e:
        raise CLIError(f"--refiner_steps {opts.refiner_steps}: {e}") from None
    return refiner


def second_stage(opts: argparse.Namespace, refiner):
    """The refiner's run on each batch's latents (ldm.pipeline.generate's second_stage)."""
    from ldm.refiner import refine

    def run(latents, prompts, generator):
        return refine(refiner, latents, prompts, generator, negative_prompt=opts.negative_prompt,
                      strength=opts.refiner_strength, steps=opts.refiner_steps, sampler=opts.sampler,
                      schedule=opts.schedule, scale=opts.scale, value_dict=value_dict(opts))
    return run
