"""A run of scripts/txt2img.py or scripts/img2img.py: load the model, let the pipeline sample, write the files.

Outputs as the originals: OUTDIR/samples/00000.png, ... and OUTDIR/grid-0000.png, numbered after what is
already there; every PNG carries its generation parameters (ldm/cli/record.py), from which scripts/rerun.py
regenerates it. Randomness and batching are the pipeline's (ldm.pipeline.generate: one CPU generator seeded
with --seed, all batches drawing from it in turn). Bad input ends with one `error:` line on stderr and exit
status 1 (2 for flag syntax) BEFORE anything is written or any directory created.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

import torch

import ldm
from ldm import fast, pipeline, png_info
from ldm.cli import inputs, record
from ldm.cli.flags import PRECISIONS, CLIError, build_parser

SAMPLE_NAME, SAMPLE_TEMPLATE = r"(\d{5,})\.png", "{:05}.png"
GRID_NAME, GRID_TEMPLATE = r"grid-(\d{4,})\.png", "grid-{:04}.png"


def apply_speed_flags(opts: argparse.Namespace, model) -> None:
    """The opt-in paths of the command line, on the loaded model (in place)."""
    fast.configure(model, attention=opts.attention, slice_size=opts.attention_slice, prepack_weights=opts.prepack,
                   memory_format_cl=opts.channels_last, vae_tile=opts.vae_tile,
                   vae_tile_overlap=opts.vae_tile_overlap or 0, vae_slice=opts.vae_slice,
                   compile_networks=opts.compile, offload_to="cpu" if opts.offload else None, device=opts.device)


def load(opts: argparse.Namespace):
    """The model on opts.device in the --precision dtype, checked against the flags (CLIError if not)."""
    # with --offload the weights stay in CPU memory and each part visits the device only while it runs
    model = ldm.load_model(opts.config, opts.ckpt, device="cpu" if opts.offload else opts.device,
                           dtype=PRECISIONS[opts.precision], ema=not opts.no_ema, vae_path=opts.vae)
    inputs.check_model(opts, model)
    apply_speed_flags(opts, model)
    return model


def autocast_dtype(opts: argparse.Namespace) -> torch.dtype | None:
    """--precision autocast: float16 autocast on an accelerator (as the original's autocast on the GPU);
    on the CPU, none (CPU autocast would be bfloat16, slower and far from the original's numbers)."""
    return torch.float16 if opts.precision == "autocast" and opts.device.type != "cpu" else None


def generate(opts: argparse.Namespace, model, prompts: list[str],
             init_image: torch.Tensor | None = None) -> Iterator[tuple[int, list[str], torch.Tensor]]:
    """(batch number, prompts, latents) for every batch of the run (ldm.pipeline.generate with the flags)."""
    return pipeline.generate(
        model, prompts, n_samples=opts.n_samples, latent_shape=(opts.C, opts.H // opts.f, opts.W // opts.f),
        seed=opts.seed, n_iter=opts.n_iter, fixed_code=opts.fixed_code, init_image=init_image,
        strength=getattr(opts, "strength", None), autocast=autocast_dtype(opts), sampler=opts.sampler,
        steps=opts.ddim_steps, schedule=opts.schedule, scale=opts.scale, eta=opts.ddim_eta,
        negative_prompt=opts.negative_prompt)


def decode(opts: argparse.Namespace, model, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] on the CPU."""
    dtype = autocast_dtype(opts)
    scope = torch.autocast(opts.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.no_grad(), scope:
        return pipeline.to_unit(pipeline.decode(model, latents))


def file_hashes(opts: argparse.Namespace, mode: str) -> dict[str, str]:
    hashes = {"Model hash": png_info.file_hash(opts.ckpt), "Model": os.path.splitext(os.path.basename(opts.ckpt))[0]}
    if opts.vae is not None:
        hashes.update({"VAE hash": png_info.file_hash(opts.vae), "VAE": os.path.basename(opts.vae)})
    if mode == "img2img":
        hashes.update({"Init image": opts.init_img, "Init image hash": png_info.file_hash(opts.init_img)})
    return hashes


def prepare(opts: argparse.Namespace, mode: str, before_load=None):
    """Validate, read the inputs and load the model: (model, prompts, init image or None). Writes nothing.
    `before_load()` runs once the inputs are read (rerun checks hashes there)."""
    inputs.validate(opts, mode)
    prompts = inputs.read_prompts(opts)
    init_image = None
    if mode == "img2img":
        init_image = inputs.load_init_image(opts.init_img, opts.W, opts.H)
        opts.H, opts.W = init_image.shape[2:]
    if before_load is not None:
        before_load()
    model = load(opts)
    inputs.check_run(opts, model)
    inputs.warn_long_prompts(model, prompts + [opts.negative_prompt])
    return model, prompts, init_image


def run(opts: argparse.Namespace, mode: str) -> None:
    model, prompts, init_image = prepare(opts, mode)
    hashes = file_hashes(opts, mode) if not (opts.skip_save and opts.skip_grid) else {}
    sample_dir = os.path.join(opts.outdir, "samples")
    grid_images, first_info = [], None
    for batch, chunk, latents in generate(opts, model, prompts, init_image):
        images = decode(opts, model, latents)
        infos = [record.infotext(vars(opts), prompt, batch, pos, hashes) for pos, prompt in enumerate(chunk)]
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
