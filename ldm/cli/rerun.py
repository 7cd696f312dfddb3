"""scripts/rerun.py: regenerate an image from the generation parameters stored in its PNG.

The PNG's `parameters` (ldm/cli/record.py) give the txt2img / img2img options of the run, the run's seed, and the
image's batch number and position. The run is replayed up to that batch through the same code path as
scripts/txt2img.py (ldm/cli/run.py) and the image is picked; the model, VAE and init image must be the ones the
image records (their hashes are checked before anything is loaded). An image of scripts/sample_many.py
(`Generator: per image`) has its own seed and is regenerated alone (ldm/cli/sample_many.py `regenerate`).
Writes OUTDIR/NNNNN.png and says whether it is identical to the source.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from ldm import pipeline, png_info
from ldm.cli import inputs, record, run, sample_many
from ldm.cli.flags import CLIError, Parser, add_model_flags, build_parser


def build_parser_rerun() -> argparse.ArgumentParser:
    p = Parser(prog="rerun.py", description="Regenerate an image from the parameters stored in its PNG "
               "(writes OUTDIR/NNNNN.png and says whether it is identical to the source).")
    p.add_argument("image", help="a PNG written by txt2img.py / img2img.py / rerun.py")
    add_model_flags(p)  # where the model is now; its hash must match the recorded one
    p.add_argument("--init-img", type=str, default=None, help="init image of an img2img result "
                   "(default: the recorded path; its hash must match)")
    p.add_argument("--outdir", type=str, default="outputs/rerun-samples", help="dir to write the result to")
    p.add_argument("--device", type=str, default=None, help="torch device (default: CUDA if available, else cpu)")
    return p


def rerun(args: argparse.Namespace) -> None:
    try:
        fields = png_info.parse_parameters(png_info.read_parameters(args.image))
    except (ValueError, UnidentifiedImageError) as e:
        raise CLIError(f"cannot read parameters from {args.image}: {e}") from None
    mode = "img2img" if "Denoising strength" in fields else "txt2img"
    opts = build_parser(mode).parse_args([])
    try:
        values, batch, pos = record.options_from_infotext(fields, vars(opts))
    except ValueError as e:
        raise CLIError(f"{args.image}: {e}") from None
    vars(opts).update(values)
    opts.n_iter, opts.from_file = batch + 1, None  # replay the run up to the image's batch
    for name in ("config", "ckpt", "vae", "device", "outdir"):  # where to find things now, not what they were
        setattr(opts, name, getattr(args, name))
    if opts.prepack and inputs.resolve_device(opts.device).type != "cpu":
        opts.prepack = False  # a CPU-only path; elsewhere the plain kernels (rounding may differ anyway)
    if mode == "img2img":  # resized to the recorded size, as the run did (rounding to multiples of 32)
        opts.init_img = args.init_img or fields.get("Init image")
    if ("VAE hash" in fields) != (opts.vae is not None):
        raise CLIError(f"the image was made with --vae {fields['VAE']}" if "VAE hash" in fields
                       else "the image was made without --vae")
    hashes = {}

    def check_hashes():
        hashes.update(run.file_hashes(opts, mode))
        for key, value in hashes.items():
            if key.endswith("hash") and fields.get(key) != value:
                raise CLIError(f"{key} {value} differs from the image's {fields.get(key)}")
        if mode == "img2img":
            hashes["Init image"] = fields["Init image"]  # keep the recorded name when given elsewhere

    model, prompts, init_image = run.prepare(opts, mode, before_load=check_hashes)
    if fields.get(sample_many.GENERATOR) == sample_many.PER_IMAGE:  # an image of scripts/sample_many.py
        image, extra = sample_many.regenerate(opts, model, fields)
        hashes.update(extra)
    else:
        for number, _, latents in run.generate(opts, model, prompts, init_image):
            if number == batch:  # earlier batches only advance the generator, as in the original run
                # decode the whole batch, as the run did: kernels may block (and so round) by batch size
                image = pipeline.to_uint8(run.decode(opts, model, latents))[pos]
    os.makedirs(opts.outdir, exist_ok=True)
    path = png_info.save_numbered(image, opts.outdir, run.SAMPLE_NAME, run.SAMPLE_TEMPLATE,
                                  record.infotext(vars(opts), opts.prompt, batch, pos, hashes))
    with Image.open(args.image) as source:
        same = np.array_equal(np.asarray(source.convert("RGB")), image)
    print(f"{path}: {'identical to' if same else 'DIFFERENT from'} {args.image}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser_rerun().parse_args(argv)
    run.errors_as_one_line("rerun.py", rerun, args)
