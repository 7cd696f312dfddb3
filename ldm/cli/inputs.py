"""What the user gave the command line, checked and read before anything is loaded or written: flag values
(`validate`), the prompts, the init image, and the checks that need the loaded model (`check_model`)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

from ldm import fast, samplers, schedules
from ldm.cli import images, limits, sdxl
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
    if mode == "inpaint":
        cfg = sdxl.config_of(opts.config)
        if cfg is not None and sdxl.is_sgm(cfg):
            raise CLIError(f"{opts.config} is an SDXL (generative-models) config; inpaint.py runs SD 1.x / 2.x "
                           "models (SDXL inpainting is not implemented)")
    else:
        sdxl.resolve(opts, mode)  # the config's family: defaults of --H/--W/--scale, the SDXL flags
    opts.sampler = sampler_name(opts)
    valid = SAMPLERS[opts.sampler].valid_schedules
    if opts.schedule not in valid:
        raise CLIError(f"schedule {opts.schedule!r} does not apply to sampler {opts.sampler}; "
                       f"valid: {', '.join(valid)}")
    if opts.ddim_eta and opts.sampler != "ddim":
        raise CLIError(f"--ddim_eta applies to the ddim sampler only (got {opts.ddim_eta} with {opts.sampler})")
    limits.check_numbers(vars(opts))  # ranges, and floats finite (ldm/cli/limits.py NUMBERS)
    for name in ("H", "W") if mode != "inpaint" else ():  # inpaint: the init image's size
        value = getattr(opts, name)
        if value is not None and (value < opts.f or value % opts.f):
            raise CLIError(f"--{name} {value} is not a positive multiple of --f {opts.f}")
    if mode in ("img2img", "inpaint"):
        _require_file(opts.init_img, "init image (--init-img)")
    if mode == "inpaint":
        _require_file(opts.mask, "mask (--mask)")
    if mode == "img2img":
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
    check_writable(opts.outdir)
    opts.device = resolve_device(opts.device)
    validate_speed_flags(opts)
    from ldm.cli import control

    control.validate(opts)


def validate_speed_flags(opts: argparse.Namespace) -> None:
    """Check the opt-in paths against each other and the device; fills in implied values and, with --fast auto,
    the device's defaults."""
    if getattr(opts, "fast", "none") == "auto":
        apply_fast_default(opts)
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


# ldm.fast.configure's keyword -> the flag that asks for it
FLAG_OF_OPTION = {"prepack_weights": "prepack", "memory_format_cl": "channels_last", "compile_networks": "compile"}


def apply_fast_default(opts: argparse.Namespace) -> None:
    """--fast auto: turn on the flags of ldm.fast.default_options(device, dtype), so that the CLI runs what the
    benchmark measures. A --compile run keeps its own choice (inductor packs weights itself)."""
    for option, value in fast.default_options(opts.device, PRECISIONS[opts.precision]).items():
        flag = FLAG_OF_OPTION[option]
        if option == "prepack_weights" and opts.compile:
            continue
        setattr(opts, flag, value)


MAX_PROMPT_FILE = 16 << 20  # bytes of --from-file: ~100,000 prompts


def check_writable(outdir: str) -> None:
    """The output folder can be written (checked before the model loads, creating nothing): it is a folder, or
    can be created in the nearest existing one, and a file can be created there (a probe, removed at once)."""
    existing = os.path.abspath(outdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "exists and is not a directory" if existing == os.path.abspath(outdir) else \
            f"cannot be created: {existing} is not a directory"
        raise CLIError(f"--outdir {outdir} {what}")
    for folder in (existing, os.path.join(existing, "samples")):
        if os.path.isdir(folder):
            try:
                tempfile.TemporaryFile(dir=folder).close()
            except OSError as e:
                raise CLIError(f"--outdir {outdir} is not writable ({folder}: {e.strerror or e})") from None


def read_prompts(opts: argparse.Namespace) -> list[str]:
    """The prompts of the run: n_samples copies of --prompt, or the lines of --from-file (the pipeline
    batches them n_samples at a time, as the originals' `chunk`). Unlike the originals, blank lines of the
    file are skipped with a warning instead of each making a batch of empty-prompt images."""
    if not opts.from_file:
        return opts.n_samples * [opts.prompt]
    path = opts.from_file
    with open(path, "rb") as f:
        data = f.read(MAX_PROMPT_FILE + 1)
    if len(data) > MAX_PROMPT_FILE:
        raise CLIError(f"prompt file {path} is larger than {MAX_PROMPT_FILE >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"prompt file {path} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") \
            from None
    lines = text.splitlines()
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise CLIError(f"prompt file has no prompts: {path}")
    if blank:
        shown = ", ".join(map(str, blank[:5])) + (", ..." if len(blank) > 5 else "")
        print(f"warning: prompt file {path}: skipped {len(blank)} blank line{'s' * (len(blank) > 1)} "
              f"(line {shown})", file=sys.stderr)
    return lines


def load_init_image(path: str, width: int | None = None, height: int | None = None) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]; as img2img.py load_img: RGB, size rounded down to a multiple of 32 (or
    the given size), LANCZOS resampling. 16-bit greyscale is scaled by 1/65535; images beyond PIL's
    decompression-bomb limit and samples of unknown range (float, 32-bit) are refused (ldm/cli/images.py)."""
    with images.opened(path, "init image") as image:
        w, h = (width, height) if width is not None else \
            (image.width - image.width % 32, image.height - image.height % 32)
        if w == 0 or h == 0:
            raise CLIError(f"init image {path} is smaller than 32x32")
        array = images.unit_rgb(image, path, "init image", (w, h))
    return 2.0 * torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None] - 1.0


def check_model(opts: argparse.Namespace, model, mode: str = "txt2img") -> None:
    """The loaded model against the flags: its kind, latent channels and downsampling factor."""
    if mode == "inpaint":
        return  # any kind; the latent shape is the model's (ldm/cli/inpaint.py checks the run)
    if model.conditioning_key == "hybrid":
        raise CLIError(f"{opts.config} is an inpainting model (9-channel UNet input: latent, mask, masked image); "
                       f"{mode} does not run it: use scripts/inpaint.py with --init-img and --mask")
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
        if truncated:  # one bounded line, whatever the prompt's length
            more = f" and {len(dropped) - 60} more characters" if len(dropped) > 60 else ""
            print(f"warning: prompt longer than {context} tokens, truncated (dropped: {dropped[:60]!r}{more}): "
                  f"{prompt[:50]!r}...", file=sys.stderr)
