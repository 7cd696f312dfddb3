"""What the user gave the command line, checked and read before anything is loaded or written: flag values
(`validate`), the prompts, the init image, and the checks that need the loaded model (`check_model`)."""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ldm import fast, samplers, schedules
from ldm.cli import sdxl
from ldm.cli.flags import DEFAULT_TILE_OVERLAP, DPM_SOLVER, PRECISIONS, CLIError
from ldm.samplers import SAMPLERS


def default_device() -> torch.device:
    # torch.device(<int>) is the CUDA device with that index; no device-name literal needed (STYLE.md)
    return torch.device(torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise CLIError(f"device {name!r} is not usable: {str(e).splitlines()[0] if str(e) else e}") from None
    return device


def sampler_name(opts: argparse.Namespace) -> str:
    """--sampler, or the originals' flags (--dpm_solver wins over --plms, as in txt2img.py); for an SDXL config
    the registry name of generative-models' sampler (ldm.samplers.resolve)."""
    legacy = DPM_SOLVER if opts.dpm_solver else "plms" if opts.plms else None
    if opts.sampler is not None and legacy is not None and opts.sampler != legacy:
        raise CLIError(f"--sampler {opts.sampler} contradicts --{'dpm_solver' if opts.dpm_solver else 'plms'}")
    sgm = getattr(opts, "sgm", False)
    name = opts.sampler or legacy or ("euler" if sgm else "ddim")
    if sgm:
        try:
            name = samplers.resolve(name, "sgm")
        except ValueError as e:
            raise CLIError(str(e)) from None
    if name not in SAMPLERS:
        raise CLIError(f"unknown sampler {name!r}; valid: {', '.join(sorted(SAMPLERS))}")
    return name


def _require_file(path: str | None, what: str) -> None:
    if not path:
        raise CLIError(f"{what} not given")
    if not os.path.isfile(path):
        raise CLIError(f"{what} not found: {path}")


def validate(opts: argparse.Namespace, mode: str) -> None:
    """Every check that needs no model; raises CLIError. Runs before anything is loaded or written."""
    if getattr(opts, "laion400m", False):
        raise CLIError("--laion400m selects the LDM-KL-8 BERT model, which ldm does not implement "
                       "(give an SD v1/v2 --config and --ckpt instead)")
    sdxl.resolve(opts, mode)  # the config's family: defaults of --H/--W/--scale, the SDXL flags
    opts.sampler = sampler_name(opts)
    valid = SAMPLERS[opts.sampler].valid_schedules
    if opts.schedule not in valid:
        raise CLIError(f"schedule {opts.schedule!r} does not apply to sampler {opts.sampler}; "
                       f"valid: {', '.join(valid)}")
    if opts.ddim_eta and opts.sampler != "ddim":
        raise CLIError(f"--ddim_eta applies to the ddim sampler only (got {opts.ddim_eta} with {opts.sampler})")
    for name in ("ddim_steps", "n_iter", "n_samples", "C", "f"):
        if getattr(opts, name) < 1:
            raise CLIError(f"--{name} must be at least 1 (got {getattr(opts, name)})")
    if opts.n_rows < 0:
        raise CLIError(f"--n_rows must be >= 0 (got {opts.n_rows})")
    for name in ("H", "W"):
        value = getattr(opts, name)
        if value is not None and (value < opts.f or value % opts.f):
            raise CLIError(f"--{name} {value} is not a positive multiple of --f {opts.f}")
    if mode == "img2img":
        if not 0.0 <= opts.strength <= 1.0:
            raise CLIError(f"--strength must be in [0, 1] (got {opts.strength})")
        _require_file(opts.init_img, "init image (--init-img)")
        if (opts.H is None) != (opts.W is None):
            raise CLIError("give both --H and --W, or neither (then the init image's size is used)")
    _require_file(opts.config, "config")
    _require_file(opts.ckpt, "checkpoint")
    if opts.vae is not None:
        _require_file(opts.vae, "VAE checkpoint")
    if opts.from_file:
        _require_file(opts.from_file, "prompt file (--from-file)")
    elif opts.prompt is None:
        raise CLIError("no prompt given")
    if os.path.exists(opts.outdir) and not os.path.isdir(opts.outdir):
        raise CLIError(f"--outdir {opts.outdir} exists and is not a directory")
    opts.device = resolve_device(opts.device)
    validate_speed_flags(opts)


def validate_speed_flags(opts: argparse.Namespace) -> None:
    """Check the opt-in paths against each other and the device; fills in implied values."""
    for name in ("attention_slice", "vae_tile", "vae_slice"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            raise CLIError(f"--{name} must be at least 1 (got {getattr(opts, name)})")
    if opts.attention_slice is not None:
        if opts.attention not in (None, "sliced"):
            raise CLIError(f"--attention_slice applies to --attention sliced (got --attention {opts.attention})")
        opts.attention = "sliced"
    if opts.vae_tile is None:
        if opts.vae_tile_overlap is not None:
            raise CLIError("--vae_tile_overlap needs --vae_tile")
    else:
        if opts.vae_tile_overlap is None:
            opts.vae_tile_overlap = min(DEFAULT_TILE_OVERLAP, opts.vae_tile // 2)
        if not 0 <= 2 * opts.vae_tile_overlap <= opts.vae_tile:
            raise CLIError(f"--vae_tile_overlap must be between 0 and half of --vae_tile "
                           f"(got {opts.vae_tile_overlap} with --vae_tile {opts.vae_tile})")
    if opts.prepack:
        if opts.device.type != "cpu" or PRECISIONS[opts.precision] != torch.float32:
            raise CLIError("--prepack applies to float32 on the CPU (--device cpu, --precision full or autocast)")
        if not fast.prepack_supported():
            raise CLIError("--prepack needs a torch build with oneDNN (mkldnn); this one has none")
    if opts.offload and opts.device.type == "cpu":
        raise CLIError("--offload moves the models between CPU memory and an accelerator; --device is the CPU")


def read_prompts(opts: argparse.Namespace) -> list[str]:
    """The prompts of the run: n_samples copies of --prompt, or the lines of --from-file (the pipeline
    batches them n_samples at a time, as the originals' `chunk`)."""
    if not opts.from_file:
        return opts.n_samples * [opts.prompt]
    with open(opts.from_file, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines:
        raise CLIError(f"prompt file is empty: {opts.from_file}")
    return lines


def load_init_image(path: str, width: int | None = None, height: int | None = None) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]; as img2img.py load_img: RGB, size rounded down to a multiple of 32 (or
    the given size), LANCZOS resampling."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise CLIError(f"cannot read init image {path}: {e}") from None
    w, h = (width, height) if width is not None else (image.width - image.width % 32, image.height - image.height % 32)
    if w == 0 or h == 0:
        raise CLIError(f"init image {path} is smaller than 32x32")
    image = image.resize((w, h), resample=Image.LANCZOS)
    array = np.asarray(image).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(array).permute(2, 0, 1)[None] - 1.0


def check_model(opts: argparse.Namespace, model) -> None:
    """The loaded model against the flags: its kind, latent channels and downsampling factor."""
    if model.conditioning_key == "hybrid":
        raise CLIError("inpainting (hybrid) models are not supported by txt2img/img2img")
    unet, first_stage = model.config.unet, model.config.first_stage
    if opts.C != unet.in_channels:
        raise CLIError(f"--C {opts.C} does not match the model's {unet.in_channels} latent channels")
    f = 2 ** (len(first_stage.ddconfig.ch_mult) - 1)
    if opts.f != f:
        raise CLIError(f"--f {opts.f} does not match the model's downsampling factor {f}")


def check_run(opts: argparse.Namespace, model) -> None:
    """The run's image size and step count against the model (before anything is written)."""
    unet = model.config.unet
    # the UNet halves the latent len(channel_mult) - 1 times and concatenates skips of equal size
    multiple = opts.f * 2 ** (len(unet.channel_mult) - 1)
    if opts.H % multiple or opts.W % multiple:
        raise CLIError(f"--H and --W must be multiples of {multiple} for this model (got {opts.H}x{opts.W})")
    try:  # some step counts select timesteps outside the schedule (the original's IndexError)
        samplers.sigma_list(SAMPLERS[opts.sampler], schedules.discrete_sigmas(model.alphas_cumprod.cpu()),
                            opts.ddim_steps, opts.schedule)
    except ValueError as e:
        raise CLIError(f"--ddim_steps {opts.ddim_steps}: {e}") from None


def warn_long_prompts(model, prompts: list[str]) -> None:
    """CLIP reads at most 77 tokens (start, 75 BPE ids, end); the original drops the rest silently."""
    prompts = list(dict.fromkeys(prompts))
    tokenize = getattr(model, "tokenize", None) or model.cond_stage_model.tokenize  # SDXL: its first text embedder
    tokens = tokenize(prompts)
    context = tokens.ids.shape[1]
    for prompt, truncated, dropped in zip(prompts, tokens.truncated, tokens.dropped):
        if truncated:
            print(f"warning: prompt longer than {context} tokens, truncated (dropped: {dropped!r}): "
                  f"{prompt[:50]!r}...", file=sys.stderr)
