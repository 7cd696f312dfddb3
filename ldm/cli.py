"""Command line of scripts/txt2img.py and scripts/img2img.py (scripts/rerun.py: ldm/rerun.py).

Flags and defaults are those of CompVis/stable-diffusion scripts/txt2img.py and scripts/img2img.py (v2's
`--steps` is an alias of `--ddim_steps`), plus --sampler, --schedule, --negative_prompt, --no-ema, --vae,
--device and the opt-in speed and memory flags (add_speed_flags; README, Speed). Outputs as there:
OUTDIR/samples/00000.png, ... and OUTDIR/grid-0000.png, numbered after what is
already there. Every PNG carries its generation parameters (ldm/png_info.py), from which scripts/rerun.py
regenerates it.

Randomness (README, "Noise convention"): one CPU torch.Generator seeded with --seed right before sampling
(txt2img) or before encoding the init image (img2img). As the original, which seeds once
(seed_everything) and then draws fresh noise for every batch, all batches of a run (n_iter times the
prompt chunks) draw from that one generator in turn; --fixed_code draws one start code first and reuses it.
So an image is identified by the run's seed, its batch number in the run and its position in the batch:
the PNG records `Seed` (the --seed of the run, the same for every image), `Batch number`, `Batch size`
and `Batch pos`; rerun replays the run up to that batch and picks the image.

Bad input (sizes, names, files, strength) ends with one `error:` line on stderr and exit status 1 (2 for
flag syntax) BEFORE anything is written or any directory created.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from itertools import islice

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm, trange

import ldm
from ldm import fast, pipeline, png_info, samplers, schedules
from ldm.models.attention import ATTENTION_BACKENDS, DEFAULT_SLICE_SIZE
from ldm.samplers import SAMPLERS

# every sampler takes "uniform"; the k-family also karras / exponential, the originals' family "quad"
SCHEDULES = tuple(dict.fromkeys(name for spec in SAMPLERS.values() for name in spec.valid_schedules))
PRECISIONS = {"full": torch.float32, "autocast": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DPM_SOLVER = "dpm_solver"  # registry name of the original DPMSolverSampler (--dpm_solver)
SAMPLE_NAME, SAMPLE_TEMPLATE = r"(\d{5,})\.png", "{:05}.png"
GRID_NAME, GRID_TEMPLATE = r"grid-(\d{4,})\.png", "grid-{:04}.png"
DEFAULT_TILE_OVERLAP = 16  # latent pixels: 128 px of cross-fade between 512 px tiles (ldm/tiling.py)

EPILOG = ("Unlike the original scripts, no NSFW safety checker and no invisible watermark are applied "
          "(opt-in flags may be added later). All batches of a run draw their noise, in turn, from one CPU "
          "generator seeded with --seed, so a seed gives the same images on any device. Every PNG carries "
          "its parameters (Seed: the run's --seed, Batch number, Batch pos); scripts/rerun.py regenerates "
          "an image from them.")


class CLIError(Exception):
    """Bad input: reported as one line on stderr, no traceback."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(mode: str) -> argparse.ArgumentParser:
    """The flags of the original scripts/{mode}.py with their defaults, plus ours."""
    img2img = mode == "img2img"
    p = Parser(prog=f"{mode}.py", description=f"Stable Diffusion {mode} (ldm {ldm.__version__})", epilog=EPILOG)
    p.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
                   help="the prompt to render")
    p.add_argument("--negative_prompt", type=str, default="",
                   help="prompt for the unconditional branch of classifier-free guidance (default: empty)")
    if img2img:
        p.add_argument("--init-img", type=str, nargs="?", help="path to the input image")
    p.add_argument("--outdir", type=str, nargs="?", help="dir to write results to",
                   default=f"outputs/{mode}-samples")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    p.add_argument("--ddim_steps", "--steps", dest="ddim_steps", type=int, default=50,
                   help="number of sampling steps (for every sampler)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="sampler (default: ddim)")
    p.add_argument("--schedule", choices=SCHEDULES, default="uniform",
                   help="spacing of the steps (default: uniform, as the originals); karras and exponential "
                        "for the k-samplers, quad for ddim/plms/dpm_solver/unipc")
    p.add_argument("--plms", action="store_true", help="use plms sampling (= --sampler plms)")
    p.add_argument("--dpm_solver", "--dpm", action="store_true",
                   help=f"use dpm_solver sampling (= --sampler {DPM_SOLVER})")
    if not img2img:  # only the original txt2img has it
        p.add_argument("--laion400m", action="store_true",
                       help="the original's switch to the LAION-400M LDM-KL-8 (BERT text encoder) model; not "
                            "implemented by ldm, refused with a message")
    p.add_argument("--fixed_code", action="store_true",
                   help="use the same starting code for every batch of the run")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="ddim eta (0.0: deterministic sampling)")
    p.add_argument("--n_iter", type=int, default=1 if img2img else 2, help="sample this often")
    size_help = " (default: the init image's, rounded down to a multiple of 32)" if img2img else ""
    p.add_argument("--H", type=int, default=None if img2img else 512, help="image height, in pixel space" + size_help)
    p.add_argument("--W", type=int, default=None if img2img else 512, help="image width, in pixel space" + size_help)
    p.add_argument("--C", type=int, default=4, help="latent channels")
    p.add_argument("--f", type=int, default=8, help="downsampling factor")
    p.add_argument("--n_samples", type=int, default=2 if img2img else 3,
                   help="how many samples to produce for each given prompt. A.k.a. batch size")
    p.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    p.add_argument("--scale", type=float, default=5.0 if img2img else 7.5,
                   help="unconditional guidance scale: eps = eps(x, uncond) + scale * (eps(x, cond) - eps(x, uncond))")
    if img2img:
        p.add_argument("--strength", type=float, default=0.75,
                       help="strength for noising/unnoising. 1.0 corresponds to full destruction of the init image")
    p.add_argument("--from-file", type=str, help="if specified, load prompts from this file, one per line")
    p.add_argument("--config", type=str, default="configs/stable-diffusion/v1-inference.yaml",
                   help="path to config which constructs model")
    p.add_argument("--ckpt", type=str, default="models/ldm/stable-diffusion-v1/model.ckpt",
                   help="path to checkpoint of model (.ckpt or .safetensors)")
    p.add_argument("--vae", type=str, default=None, help="VAE checkpoint replacing the model's first stage")
    p.add_argument("--no-ema", dest="no_ema", action="store_true",
                   help="use the raw UNet weights instead of the EMA weights of the checkpoint")
    p.add_argument("--seed", type=int, default=42, help="the seed (for reproducible sampling)")
    p.add_argument("--precision", type=str, choices=list(PRECISIONS), default="autocast",
                   help="full: float32; autocast: float32 weights, float16 compute on an accelerator "
                        "(float32 on the CPU); fp16/bf16: the model in that dtype")
    p.add_argument("--device", type=str, default=None,
                   help="torch device (default: the CUDA device if available, else cpu)")
    add_speed_flags(p)
    return p


def add_speed_flags(p: argparse.ArgumentParser) -> None:
    """Opt-in fast and memory-saving paths (ldm/fast.py, ldm/tiling.py); every one is off by default. Those
    that can change an image's pixels are recorded in its PNG and replayed by rerun.py (png_info.FAST_FIELDS)."""
    g = p.add_argument_group("speed and memory (opt-in; see README, Speed)")
    g.add_argument("--attention", choices=ATTENTION_BACKENDS, default=None,
                   help="attention kernel: sdpa (default; fused kernels), sliced (bounded memory), math (reference)")
    g.add_argument("--attention_slice", type=int, default=None,
                   help=f"query rows per chunk of --attention sliced (default {DEFAULT_SLICE_SIZE}; implies sliced)")
    g.add_argument("--prepack", action="store_true",
                   help="CPU, float32: run convolutions and linear layers on weights prepacked once for oneDNN "
                        "(faster; holds a second copy of those weights)")
    g.add_argument("--channels_last", action="store_true", help="channels-last (NHWC) convolutions")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and the VAE decoder (the first step of a new size compiles)")
    g.add_argument("--vae_tile", type=int, default=None,
                   help="decode in overlapping tiles of this many latent pixels (64 = 512 px), cross-faded: "
                        "for images too large to decode whole")
    g.add_argument("--vae_tile_overlap", type=int, default=None,
                   help=f"latent pixels shared by neighbouring tiles (default {DEFAULT_TILE_OVERLAP})")
    g.add_argument("--vae_slice", type=int, default=None, help="decode this many images at a time")
    g.add_argument("--offload", action="store_true",
                   help="accelerators: keep text encoder, UNet and VAE in CPU memory and move each to --device "
                        "only while it runs")


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
    """--sampler, or the originals' flags (--dpm_solver wins over --plms, as in txt2img.py)."""
    legacy = DPM_SOLVER if opts.dpm_solver else "plms" if opts.plms else None
    if opts.sampler is not None and legacy is not None and opts.sampler != legacy:
        raise CLIError(f"--sampler {opts.sampler} contradicts --{'dpm_solver' if opts.dpm_solver else 'plms'}")
    name = opts.sampler or legacy or "ddim"
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
    opts.sampler = sampler_name(opts)
    valid = SAMPLERS[opts.sampler].valid_schedules
    if opts.schedule not in valid:
        raise CLIError(f"schedule {opts.schedule!r} does not apply to sampler {opts.sampler}; valid: {', '.join(valid)}")
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


def apply_speed_flags(opts: argparse.Namespace, model) -> None:
    """The opt-in paths of the command line, on the loaded model (in place)."""
    fast.configure(model, attention=opts.attention, slice_size=opts.attention_slice, prepack_weights=opts.prepack,
                   memory_format_cl=opts.channels_last, vae_tile=opts.vae_tile,
                   vae_tile_overlap=opts.vae_tile_overlap or 0, vae_slice=opts.vae_slice,
                   compile_networks=opts.compile, offload_to="cpu" if opts.offload else None, device=opts.device)


def read_prompts(opts: argparse.Namespace) -> list[list[str]]:
    """Batches of prompts: n_samples copies of --prompt, or the lines of --from-file in chunks of
    n_samples (as the originals' `chunk`)."""
    if not opts.from_file:
        return [opts.n_samples * [opts.prompt]]
    with open(opts.from_file, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines:
        raise CLIError(f"prompt file is empty: {opts.from_file}")
    it = iter(lines)
    return [list(batch) for batch in iter(lambda: tuple(islice(it, opts.n_samples)), ())]


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


def load(opts: argparse.Namespace):
    """The model on opts.device in the --precision dtype, checked against the flags (CLIError if not)."""
    # with --offload the weights stay in CPU memory and each part visits the device only while it runs
    model = ldm.load_model(opts.config, opts.ckpt, device="cpu" if opts.offload else opts.device,
                           dtype=PRECISIONS[opts.precision], ema=not opts.no_ema, vae_path=opts.vae)
    if model.conditioning_key == "hybrid":
        raise CLIError("inpainting (hybrid) models are not supported by txt2img/img2img")
    unet, first_stage = model.config.unet, model.config.first_stage
    if opts.C != unet.in_channels:
        raise CLIError(f"--C {opts.C} does not match the model's {unet.in_channels} latent channels")
    f = 2 ** (len(first_stage.ddconfig.ch_mult) - 1)
    if opts.f != f:
        raise CLIError(f"--f {opts.f} does not match the model's downsampling factor {f}")
    apply_speed_flags(opts, model)
    return model


def check_model(opts: argparse.Namespace, model) -> None:
    """Checks that need the model: image size and step count (before anything is written)."""
    # the UNet halves the latent len(channel_mult) - 1 times and concatenates skips of equal size
    multiple = opts.f * 2 ** (len(model.config.unet.channel_mult) - 1)
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
    tokens = model.cond_stage_model.tokenize(prompts)
    context = tokens.ids.shape[1]
    for prompt, truncated, dropped in zip(prompts, tokens.truncated, tokens.dropped):
        if truncated:
            print(f"warning: prompt longer than {context} tokens, truncated (dropped: {dropped!r}): "
                  f"{prompt[:50]!r}...", file=sys.stderr)


def autocast_scope(opts: argparse.Namespace):
    """--precision autocast: float16 autocast on an accelerator (as the original's autocast on the GPU);
    on the CPU, float32 (CPU autocast would be bfloat16, slower and far from the original's numbers)."""
    if opts.precision == "autocast" and opts.device.type != "cpu":
        return torch.autocast(opts.device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def generate(opts: argparse.Namespace, model, data: list[list[str]],
             init_image: torch.Tensor | None = None) -> Iterator[tuple[int, list[str], torch.Tensor]]:
    """(batch number, prompts, latents) for every batch of the run, in order (n_iter times `data`).

    A short last chunk of --from-file is padded with its last prompt to n_samples (the original fails on
    it), so that every batch has the same shape and draws the same amount of noise; the latents of the
    padding are dropped.
    """
    shape = (opts.n_samples, opts.C, opts.H // opts.f, opts.W // opts.f)
    generator = torch.Generator(device="cpu").manual_seed(opts.seed)
    init_latent = None
    with torch.no_grad(), autocast_scope(opts):
        if init_image is not None:
            init_latent = pipeline.encode_image(model, init_image.expand(opts.n_samples, -1, -1, -1), generator)
        start_code = pipeline.randn(shape, generator, opts.device) if opts.fixed_code else None
        batch = 0
        for _ in trange(opts.n_iter, desc="Sampling"):
            for prompts in tqdm(data, desc="data"):
                padded = prompts + prompts[-1:] * (opts.n_samples - len(prompts))
                latents = pipeline.sample(
                    model, padded, negative_prompt=opts.negative_prompt, sampler=opts.sampler,
                    steps=opts.ddim_steps, schedule=opts.schedule, scale=opts.scale, eta=opts.ddim_eta,
                    shape=shape, generator=generator, x_T=start_code, init_latent=init_latent,
                    strength=getattr(opts, "strength", None))
                yield batch, prompts, latents[:len(prompts)]
                batch += 1


def decode(opts: argparse.Namespace, model, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] on the CPU."""
    with torch.no_grad(), autocast_scope(opts):
        return pipeline.to_unit(pipeline.decode(model, latents))


def file_hashes(opts: argparse.Namespace, mode: str) -> dict[str, str]:
    hashes = {"Model hash": png_info.file_hash(opts.ckpt), "Model": os.path.splitext(os.path.basename(opts.ckpt))[0]}
    if opts.vae is not None:
        hashes.update({"VAE hash": png_info.file_hash(opts.vae), "VAE": os.path.basename(opts.vae)})
    if mode == "img2img":
        hashes.update({"Init image": opts.init_img, "Init image hash": png_info.file_hash(opts.init_img)})
    return hashes


def prepare(opts: argparse.Namespace, mode: str, before_load=None):
    """Validate, read the inputs and load the model: (model, prompt batches, init image or None).
    Writes nothing. `before_load()` runs once the inputs are read (rerun checks hashes there)."""
    validate(opts, mode)
    data = read_prompts(opts)
    init_image = None
    if mode == "img2img":
        init_image = load_init_image(opts.init_img, opts.W, opts.H)
        opts.H, opts.W = init_image.shape[2:]
    if before_load is not None:
        before_load()
    model = load(opts)
    check_model(opts, model)
    warn_long_prompts(model, [p for batch in data for p in batch] + [opts.negative_prompt])
    return model, data, init_image


def run(opts: argparse.Namespace, mode: str) -> None:
    model, data, init_image = prepare(opts, mode)
    hashes = file_hashes(opts, mode) if not (opts.skip_save and opts.skip_grid) else {}
    sample_dir = os.path.join(opts.outdir, "samples")
    grid_images, first_info = [], None
    for batch, prompts, latents in generate(opts, model, data, init_image):
        images = decode(opts, model, latents)
        infos = [png_info.infotext(opts, prompt, batch, pos, hashes) for pos, prompt in enumerate(prompts)]
        first_info = first_info or infos[0]
        if not opts.skip_save:
            os.makedirs(sample_dir, exist_ok=True)
            for image, info in zip(pipeline.to_uint8(images), infos):
                png_info.save_numbered(image, sample_dir, SAMPLE_NAME, SAMPLE_TEMPLATE, info)
        if not opts.skip_grid:
            grid_images.append(images)
    if not opts.skip_grid:
        # as the original: every sample of the run, n_rows (default n_samples) images per row
        grid = pipeline.make_grid(torch.cat(grid_images), nrow=opts.n_rows or opts.n_samples)
        os.makedirs(opts.outdir, exist_ok=True)
        # the grid carries the first image's parameters (as A1111's grids)
        png_info.save_numbered(pipeline.to_uint8(grid[None])[0], opts.outdir, GRID_NAME, GRID_TEMPLATE, first_info)
    print(f"Your samples are ready and waiting for you here: \n{opts.outdir} \n \nEnjoy.")


def errors_as_one_line(prog: str, body, *args) -> None:
    """Run body(*args); expected failures become `prog: error: ...` on stderr and exit status 1."""
    from ldm.checkpoint import CheckpointError
    from ldm.config import ConfigError

    try:
        body(*args)
    except (CLIError, CheckpointError, ConfigError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        sys.stderr.write(f"{prog}: error: {message}\n")
        sys.exit(1)


def txt2img_main(argv: list[str] | None = None) -> None:
    opts = build_parser("txt2img").parse_args(argv)
    errors_as_one_line("txt2img.py", run, opts, "txt2img")


def img2img_main(argv: list[str] | None = None) -> None:
    opts = build_parser("img2img").parse_args(argv)
    errors_as_one_line("img2img.py", run, opts, "img2img")
