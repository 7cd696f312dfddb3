"""scripts/rerun.py: regenerate an image from the generation parameters stored in its PNG.

The PNG's `parameters` (ldm/png_info.py) give the txt2img / img2img options of the run, the run's seed, and the
image's batch number and position. The run is replayed up to that batch through the same code path as
scripts/txt2img.py (ldm/cli.py) and the image is picked; the model, VAE and init image must be the ones the
image records (their hashes are checked before anything is loaded). Writes OUTDIR/NNNNN.png and says whether it
is identical to the source.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from ldm import cli, pipeline, png_info


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="rerun.py", description="Regenerate an image from the parameters stored in its PNG "
                   "(writes OUTDIR/NNNNN.png and says whether it is identical to the source).")
    p.add_argument("image", help="a PNG written by txt2img.py / img2img.py / rerun.py")
    p.add_argument("--config", type=str, default="configs/stable-diffusion/v1-inference.yaml",
                   help="config of the model that made the image")
    p.add_argument("--ckpt", type=str, default="models/ldm/stable-diffusion-v1/model.ckpt",
                   help="checkpoint that made the image (its sha256 must match the recorded Model hash)")
    p.add_argument("--vae", type=str, default=None, help="VAE checkpoint, when the image records one")
    p.add_argument("--init-img", type=str, default=None, help="init image of an img2img result "
                   "(default: the recorded path; its hash must match)")
    p.add_argument("--outdir", type=str, default="outputs/rerun-samples", help="dir to write the result to")
    p.add_argument("--device", type=str, default=None, help="torch device (default: CUDA if available, else cpu)")
    return p


def rerun(args: argparse.Namespace) -> None:
    try:
        fields = png_info.parse_parameters(png_info.read_parameters(args.image))
    except (ValueError, UnidentifiedImageError) as e:
        raise cli.CLIError(f"cannot read parameters from {args.image}: {e}") from None
    mode = "img2img" if "Denoising strength" in fields else "txt2img"
    try:
        opts, batch, pos = png_info.options_from_infotext(fields, cli.build_parser(mode).parse_args([]))
    except ValueError as e:
        raise cli.CLIError(f"{args.image}: {e}") from None
    opts.n_iter, opts.from_file = batch + 1, None  # replay the run up to the image's batch
    for name in ("config", "ckpt", "vae", "device", "outdir"):  # where to find things now, not what they were
        setattr(opts, name, getattr(args, name))
    if opts.prepack and cli.resolve_device(opts.device).type != "cpu":
        opts.prepack = False  # a CPU-only path; elsewhere the plain kernels (rounding may differ anyway)
    if mode == "img2img":  # resized to the recorded size, as the run did (rounding to multiples of 32)
        opts.init_img = args.init_img or fields.get("Init image")
    if ("VAE hash" in fields) != (opts.vae is not None):
        raise cli.CLIError(f"the image was made with --vae {fields['VAE']}" if "VAE hash" in fields
                           else "the image was made without --vae")
    hashes = {}

    def check_hashes():
        hashes.update(cli.file_hashes(opts, mode))
        for key, value in hashes.items():
            if key.endswith("hash") and fields.get(key) != value:
                raise cli.CLIError(f"{key} {value} differs from the image's {fields.get(key)}")
        if mode == "img2img":
            hashes["Init image"] = fields["Init image"]  # keep the recorded name when given elsewhere

    model, data, init_image = cli.prepare(opts, mode, before_load=check_hashes)
    for number, _, latents in cli.generate(opts, model, data, init_image):
        if number == batch:  # earlier batches only advance the generator, as in the original run
            # decode the whole batch, as the run did: kernels may block (and so round) by batch size
            image = pipeline.to_uint8(cli.decode(opts, model, latents))[pos]
    os.makedirs(opts.outdir, exist_ok=True)
    path = png_info.save_numbered(image, opts.outdir, cli.SAMPLE_NAME, cli.SAMPLE_TEMPLATE,
                                  png_info.infotext(opts, opts.prompt, batch, pos, hashes))
    with Image.open(args.image) as source:
        same = np.array_equal(np.asarray(source.convert("RGB")), image)
    print(f"{path}: {'identical to' if same else 'DIFFERENT from'} {args.image}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cli.errors_as_one_line("rerun.py", rerun, args)
