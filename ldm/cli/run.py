"""A run of scripts/txt2img.py, img2img.py or inpaint.py: load the model, let the pipeline sample, write the files.

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
from ldm.cli import control, extras, inputs, limits, record, sdxl
from ldm.cli import inpaint as inpaint_cli
from ldm.cli.flags import PRECISIONS, CLIError, build_parser
from ldm.cli.interrupt import EXIT_INTERRUPTED, PROGRESS, deferred_interrupt
from ldm.config import load_config

SAMPLE_NAME, SAMPLE_TEMPLATE = r"(\d{5,})\.png", "{:05}.png"
GRID_NAME, GRID_TEMPLATE = r"grid-(\d{4,})\.png", "grid-{:04}.png"


def apply_speed_flags(opts: argparse.Namespace, model) -> None:
    """The fast paths of the command line (--fast auto filled in by inputs.validate), on the loaded model."""
    fast.configure(model, attention=opts.attention, slice_size=opts.attention_slice, prepack_weights=opts.prepack,
                   memory_format_cl=opts.channels_last, vae_tile=opts.vae_tile,
                   vae_tile_overlap=opts.vae_tile_overlap or 0, vae_slice=opts.vae_slice,
                   compile_networks=opts.compile, offload_to="cpu" if opts.offload else None, device=opts.device)


def load(opts: argparse.Namespace, mode: str = "txt2img"):
    """The model on opts.device in the --precision dtype, checked against the flags (CLIError if not)."""
    # with --offload the weights stay in CPU memory and each part visits the device only while it runs
    # a ControlLDM --config: the whole ControlLDM, or with --control files its Stable Diffusion part alone
    model = ldm.load_model(opts.config, opts.ckpt, device="cpu" if opts.offload else opts.device,
                           dtype=PRECISIONS[opts.precision], ema=not opts.no_ema, vae_path=opts.vae,
                           with_control=not getattr(opts, "controls", None))
    inputs.check_model(opts, model, mode)
    apply_speed_flags(opts, model)
    return model


def autocast_dtype(opts: argparse.Namespace) -> torch.dtype | None:
    """--precision autocast: float16 autocast on an accelerator (as the original's autocast on the GPU);
    on the CPU, none (CPU autocast would be bfloat16, slower and far from the original's numbers)."""
    return torch.float16 if opts.precision == "autocast" and opts.device.type != "cpu" else None


def generate(opts: argparse.Namespace, model, prompts: list[str], init_image=None,
             mode: str = "txt2img") -> Iterator[tuple[int, list[str], torch.Tensor]]:
    """(batch number, prompts, latents) for every batch of the run (ldm.pipeline.generate with the flags;
    inpaint: `init_image` is (image, mask), ldm.inpaint.generate)."""
    if mode == "inpaint":
        return inpaint_cli.generate(opts, model, prompts, *init_image, autocast=autocast_dtype(opts))
    refiner = getattr(opts, "refiner_model", None)
    sgm = {}
    if getattr(opts, "sgm", False):  # SDXL: the size / crop / score conditioning, the refiner (cli/sdxl.py)
        sgm["value_dict"] = sdxl.value_dict(opts)
        if refiner is not None:
            sgm.update(handoff=opts.refiner_strength, second_stage=sdxl.second_stage(opts, refiner))
    return pipeline.generate(
        model, prompts, n_samples=opts.n_samples, latent_shape=(opts.C, opts.H // opts.f, opts.W // opts.f),
        seed=opts.seed, n_iter=opts.n_iter, fixed_code=opts.fixed_code, init_image=init_image,
        strength=getattr(opts, "strength", None), autocast=autocast_dtype(opts), sampler=opts.sampler,
        steps=opts.ddim_steps, schedule=opts.schedule, scale=opts.scale, eta=opts.ddim_eta,
        negative_prompt=opts.negative_prompt, text=opts.text, loras=opts.lora, lora_dir=opts.lora_dir,
        controls=getattr(opts, "control_entries", None), guess_mode=getattr(opts, "guess_mode", False), **sgm)


def decode(opts: argparse.Namespace, model, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] on the CPU (decoded by the refiner when there is one)."""
    model = getattr(opts, "refiner_model", None) or model
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
    if mode == "inpaint":
        hashes.update(inpaint_cli.file_hashes(opts))
    hashes.update(control.fields(opts))
    if getattr(opts, "refiner_ckpt", None) is not None:
        hashes.update({"Refiner": os.path.splitext(os.path.basename(opts.refiner_ckpt))[0],
                       "Refiner hash": png_info.file_hash(opts.refiner_ckpt)})
    return hashes


def prepare(opts: argparse.Namespace, mode: str, before_load=None):
    """Validate, read the inputs and load the model: (model, prompts, init image or None; inpaint: (image,
    mask)). Writes nothing. `before_load()` runs once the flags are checked, before the init image is decoded
    (rerun checks the hashes of the files it was given there)."""
    inputs.validate(opts, mode)
    # the sizes that drive allocations and work, from the config (nothing loaded yet), before they are used:
    # the prompts of --from-file are read first, n_samples copies of --prompt made after
    prompts = inputs.read_prompts(opts) if opts.from_file else None
    cfg, n_images = load_config(opts.config), run_images(opts, opts.n_samples if prompts is None else len(prompts))
    if getattr(opts, "H", None) is not None and getattr(opts, "W", None) is not None:
        limits.check_sizes(opts, cfg, n_images)
    extras.validate(opts, prompts or [opts.prompt])
    if before_load is not None:
        before_load()
    init_image = None
    if mode == "img2img":
        read = sdxl.load_init_image if opts.sgm else inputs.load_init_image  # SDXL: the demo's load_img
        init_image = read(opts.init_img, opts.W, opts.H)
        opts.H, opts.W = init_image.shape[2:]
    if mode == "inpaint":
        if control.uses_controlnet(opts):
            raise CLIError("inpaint.py does not take ControlNets (--control / a ControlLDM --config)")
        init_image = inpaint_cli.read_inputs(opts)  # sets opts.H, opts.W: the init image's size
    if mode in ("img2img", "inpaint"):
        limits.check_sizes(opts, cfg, n_images)
    if mode != "inpaint":
        sdxl.resolve_sizes(opts)  # SDXL: the size conditioning defaults to the image's size
    hints = control.read_hints(opts)
    prompts = prompts or inputs.read_prompts(opts)
    model = load(opts, mode)
    opts.control_entries = control.load_controls(opts, model, hints)
    if mode == "inpaint":
        inpaint_cli.check_run(opts, model, init_image[1])
    else:
        inputs.check_run(opts, model)
    if getattr(opts, "refiner_ckpt", None) is not None:
        opts.refiner_model = sdxl.load_refiner(opts, model)
        apply_speed_flags(opts, opts.refiner_model)
    opts.text = extras.prepare(opts, model, prompts)  # ldm.prompts.TextOptions, None for the original's
    if opts.prompt_syntax == "plain":  # the a1111 syntax reads long prompts in chunks of 75 tokens
        inputs.warn_long_prompts(model, prompts + [opts.negative_prompt])
    return model, prompts, init_image


def run_images(opts: argparse.Namespace, n_prompts: int) -> int:
    """How many images the run makes (n_iter passes over the prompts)."""
    return opts.n_iter * n_prompts


def run(opts: argparse.Namespace, mode: str) -> None:
    model, prompts, init_image = prepare(opts, mode)
    PROGRESS.start(run_images(opts, len(prompts)) * (not opts.skip_save) + (not opts.skip_grid))
    hashes = file_hashes(opts, mode) if not (opts.skip_save and opts.skip_grid) else {}
    sample_dir = os.path.join(opts.outdir, "samples")
    grid_images, first_info = [], None
    for batch, chunk, latents in generate(opts, model, prompts, init_image, mode):
        images = decode(opts, model, latents)
        batch_hashes = {**hashes, **extras.batch_fields(opts, model, opts.text, chunk)} if hashes else hashes
        infos = [record.infotext(vars(opts), prompt, batch, pos, batch_hashes) for pos, prompt in enumerate(chunk)]
        first_info = first_info or infos[0]
        if not opts.skip_save:
            os.makedirs(sample_dir, exist_ok=True)
            for image, info in zip(pipeline.to_uint8(images), infos):
                with deferred_interrupt():  # the file and its count, or neither
                    png_info.save_numbered(image, sample_dir, SAMPLE_NAME, SAMPLE_TEMPLATE, info)
                    PROGRESS.wrote()
        if not opts.skip_grid:
            grid_images.append(images)
    if not opts.skip_grid:
        # as the original: every sample of the run, n_rows (default n_samples) images per row
        grid = pipeline.make_grid(torch.cat(grid_images), nrow=opts.n_rows or opts.n_samples)
        os.makedirs(opts.outdir, exist_ok=True)
        # the grid carries the first image's parameters (as A1111's grids)
        with deferred_interrupt():
            png_info.save_numbered(pipeline.to_uint8(grid[None])[0], opts.outdir, GRID_NAME, GRID_TEMPLATE,
                                   first_info)
            PROGRESS.wrote()
    print(f"Your samples are ready and waiting for you here: \n{opts.outdir} \n \nEnjoy.")


def errors_as_one_line(prog: str, body, *args) -> None:
    """Run body(*args); expected failures become `prog: error: ...` on stderr and exit status 1, Ctrl-C one
    line and exit status 130 (ldm/cli/interrupt.py)."""
    from ldm.checkpoint import CheckpointError
    from ldm.config import ConfigError

    PROGRESS.reset()
    try:
        body(*args)
    except (CLIError, CheckpointError, ConfigError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        sys.stderr.write(f"{prog}: error: {message}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: {PROGRESS.message()}\n")
        sys.exit(EXIT_INTERRUPTED)


def txt2img_main(argv: list[str] | None = None) -> None:
    opts = build_parser("txt2img").parse_args(argv)
    errors_as_one_line("txt2img.py", run, opts, "txt2img")


def img2img_main(argv: list[str] | None = None) -> None:
    opts = build_parser("img2img").parse_args(argv)
    errors_as_one_line("img2img.py", run, opts, "img2img")


def inpaint_main(argv: list[str] | None = None) -> None:
    opts = build_parser("inpaint").parse_args(argv)
    errors_as_one_line("inpaint.py", run, opts, "inpaint")
