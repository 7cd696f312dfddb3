"""scripts/rerun.py: regenerate an image from the generation parameters stored in its PNG.

The PNG's `parameters` (ldm/cli/record.py) give the txt2img / img2img / inpaint options of the run, the run's
seed, and the image's batch number and position. The run is replayed up to that batch through the same code path
as scripts/txt2img.py (ldm/cli/run.py) and the image is picked; the model, VAE, init image, mask, LoRAs and
embeddings must be the ones the image records (their hashes are checked before anything is decoded or used).
The PNG is treated as untrusted: every field is checked first, as a flag would be (its name in the message), a
path it records is never opened (an img2img or inpaint result needs --init-img, an inpaint one --mask, LoRAs and
embeddings --lora / --embedding / --lora_dir), and what will be replayed is said before the replay starts.
An image of scripts/sample_many.py (`Generator: per image`) has its own seed and is regenerated alone
(ldm/cli/sample_many.py `regenerate`).
Writes OUTDIR/NNNNN.png and says whether it is identical to the source.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

from ldm import pipeline, png_info
from ldm.cli import control, extras, inputs, limits, record, run, sample_many
from ldm.cli.flags import PRECISIONS, CLIError, Parser, add_model_flags, build_parser
from ldm.cli.interrupt import PROGRESS
from ldm.models.attention import ATTENTION_BACKENDS
from ldm.samplers import SAMPLERS


def build_parser_rerun() -> argparse.ArgumentParser:
    p = Parser(prog="rerun.py", description="Regenerate an image from the parameters stored in its PNG "
               "(writes OUTDIR/NNNNN.png and says whether it is identical to the source).")
    p.add_argument("image", help="a PNG written by txt2img.py / img2img.py / inpaint.py / rerun.py")
    add_model_flags(p)  # where the model is now; its hash must match the recorded one
    p.add_argument("--init-img", type=str, default=None, help="init image of an img2img or inpaint result "
                   "(required for one; its hash must match the recorded one: a path recorded in the PNG is never "
                   "opened)")
    p.add_argument("--mask", type=str, default=None, help="mask of an inpaint result (required for one; its hash "
                   "must match)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH", help="the LoRA files the image records, "
                   "in its order (the scales are the recorded ones; the hashes must match)")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH",
                   help="the embedding files the image records, in its order (the hashes must match)")
    p.add_argument("--lora_dir", type=str, default=None, help="where the image's <lora:NAME> prompt tags find "
                   "their files (the hashes must match)")
    p.add_argument("--refiner_config", type=str, default=None, help="config of the SDXL refiner an image was made with")
    p.add_argument("--refiner_ckpt", type=str, default=None,
                   help="where the refiner is now (an image made with a refiner; its hash must match)")
    p.add_argument("--outdir", type=str, default="outputs/rerun-samples", help="dir to write the result to")
    for flag, what in (("--control", "ControlNet files"), ("--control_config", "ControlNet configs"),
                       ("--control_image", "control images")):
        p.add_argument(flag, action="append", default=None,
                       help=f"{what} of a ControlNet result, in the recorded order (required for one: a path "
                            "recorded in the PNG is never opened; the files' hashes must match)")
    p.add_argument("--device", type=str, default=None, help="torch device (default: CUDA if available, else cpu)")
    return p


def _short(text: str, n: int = 60) -> str:
    """A value from the PNG, cut for a message (the text chunk may be megabytes long)."""
    return text[:n] + "..." if len(text) > n else text


def check_recorded(image: str, values: dict, batch: int, pos: int) -> None:
    """Every recorded value against what the command line accepts (ranges, finite floats, enums, the batch
    position within the batch), each error naming the PNG field; before any file is read or hashed."""
    key_of = {name: key for key, name, _ in (*record.FIELDS, *record.FAST_FIELDS)}
    key_of.update(H="Size", W="Size")

    def label(name):
        return f"{image}: parameter {key_of.get(name, name)!r}"

    limits.check_numbers(values, label)
    choices = {"sampler": sorted(SAMPLERS), "precision": list(PRECISIONS), "attention": list(ATTENTION_BACKENDS)}
    for name, valid in choices.items():
        if values.get(name) is not None and values[name] not in valid:
            raise CLIError(f"{label(name)} is {_short(values[name])!r}; valid: {', '.join(valid)}")
    schedules = SAMPLERS[values["sampler"]].valid_schedules
    if values["schedule"] not in schedules:
        raise CLIError(f"{label('schedule')} is {_short(values['schedule'])!r}; valid for {values['sampler']}: "
                       f"{', '.join(schedules)}")
    if not 0 <= batch < limits.MAX_REPLAY_BATCHES:
        raise CLIError(f"{image}: parameter 'Batch number' must be in [0, {limits.MAX_REPLAY_BATCHES}) (got {batch}): "
                       "a rerun samples every earlier batch of the run in full")
    if not 0 <= pos < values["n_samples"]:
        raise CLIError(f"{image}: parameter 'Batch pos' {pos} is not a position in a batch of "
                       f"{values['n_samples']} ('Batch size')")


def use_text_files(args: argparse.Namespace, opts: argparse.Namespace) -> None:
    """The LoRA, embedding and LoRA-directory paths of the replay are the ones the user names, never the paths the
    PNG records: its `Lora` entries give only the scales (matched in order), and every file's hash is checked
    against the recorded Lora hashes / TI hashes once the model is loaded, before anything is sampled."""
    from ldm.lora import parse_lora_arg

    recorded = [parse_lora_arg(entry) for entry in opts.lora]
    if len(args.lora) != len(recorded):
        names = ", ".join(_short(spec.label) for spec in recorded) or "none"
        raise CLIError(f"the image records {len(recorded)} --lora file(s) ({names}); name them with --lora, "
                       f"in that order (got {len(args.lora)})")
    opts.lora = [f"{path}:{spec.unet}" for path, spec in zip(args.lora, recorded)]
    if len(args.embedding) != len(opts.embedding):
        raise CLIError(f"the image records {len(opts.embedding)} --embedding file(s); name them with --embedding "
                       f"(got {len(args.embedding)})")
    opts.embedding = list(args.embedding)
    if (opts.lora_dir is None) != (args.lora_dir is None):
        raise CLIError("the image's prompt tags found their LoRAs in a --lora_dir: name it" if opts.lora_dir
                       is not None else "the image records no --lora_dir")
    opts.lora_dir = args.lora_dir


def rerun(args: argparse.Namespace) -> None:
    try:
        fields = png_info.parse_parameters(png_info.read_parameters(args.image))
    except (ValueError, OSError, Image.DecompressionBombError) as e:  # incl. truncated and foreign files
        raise CLIError(f"cannot read parameters from {args.image}: {' '.join(str(e).split())[:200]}") from None
    mode = "inpaint" if "Mask hash" in fields else "img2img" if "Denoising strength" in fields else "txt2img"
    opts = build_parser(mode).parse_args([])
    try:
        values, batch, pos = record.options_from_infotext(fields, vars(opts))
    except ValueError as e:
        raise CLIError(f"{args.image}: {str(e)[:200]}") from None
    check_recorded(args.image, values, batch, pos)
    vars(opts).update(values)
    opts.n_iter, opts.from_file = batch + 1, None  # replay the run up to the image's batch
    for name in ("config", "ckpt", "vae", "device", "outdir"):  # where to find things now, not what they were
        setattr(opts, name, getattr(args, name))
    if ("Refiner hash" in fields) != (args.refiner_ckpt is not None):
        raise CLIError(f"the image was made with the refiner {_short(fields.get('Refiner', '?'))}: give --refiner_config and "
                       "--refiner_ckpt" if "Refiner hash" in fields else "the image was made without a refiner")
    if args.refiner_ckpt is not None:
        opts.refiner_config, opts.refiner_ckpt = args.refiner_config, args.refiner_ckpt
    opts.fast = "none"  # exactly the paths the PNG records (none recorded: the plain path), not today's defaults
    if opts.prepack and inputs.resolve_device(opts.device).type != "cpu":
        opts.prepack = False  # a CPU-only path; elsewhere the plain kernels (rounding may differ anyway)
    for name, flag, field, given in (("init_img", "--init-img", "Init image", args.init_img),
                                     ("mask", "--mask", "Mask", args.mask)):
        if field + " hash" not in fields:
            continue
        if given is None:  # never a path from the PNG: it is opened only once its hash matched
            raise CLIError(f"{args.image} was made by {mode} from the {field.lower()} "
                           f"{_short(fields.get(field, '?'), 200)!r}: name that file with {flag} (its hash is "
                           "checked against the recorded one)")
        setattr(opts, name, given)
    use_text_files(args, opts)
    vars(opts).update(control.options_from_fields(fields))
    for name in ("control", "control_config", "control_image"):  # the user's files, in the recorded order
        recorded, given = getattr(opts, name), getattr(args, name)
        if not recorded and not given:
            continue
        if len(given or []) != len(recorded or []):
            raise CLIError(f"the image records {len(recorded or [])} --{name} file(s); name them with --{name}, "
                           f"in that order (got {len(given or [])})")
        if name == "control":  # the recorded strengths stay
            given = [f"{path}:{control.split_strength(spec)[1]!r}" for path, spec in zip(given, recorded)]
        setattr(opts, name, given)
    if ("VAE hash" in fields) != (opts.vae is not None):
        raise CLIError(f"the image was made with --vae {_short(fields.get('VAE', '?'))}" if "VAE hash" in fields
                       else "the image was made without --vae")
    print(f"{args.image}: replaying {mode} with seed {opts.seed}: {batch + 1} batch{'es' * (batch > 0)} of "
          f"{opts.n_samples} at {opts.W}x{opts.H}, {opts.sampler} {opts.ddim_steps} steps, for image {pos} of "
          f"batch {batch}")
    hashes = {}

    def check_hashes():
        hashes.update(run.file_hashes(opts, mode))
        for key, value in hashes.items():
            if not key.endswith("hash"):
                continue
            if key not in fields:
                raise CLIError(f"{args.image} records no {key}, so the file given for it cannot be checked")
            if fields[key] != value:
                raise CLIError(f"{key} {value} differs from the image's {_short(fields[key])}")
        for name in ("Init image", "Mask"):
            if name in hashes:
                hashes[name] = fields[name]  # keep the recorded name when given elsewhere
        hashes.update(control.path_fields(fields))

    model, prompts, init_image = run.prepare(opts, mode, before_load=check_hashes)
    # the LoRAs and embeddings must be the recorded ones too (A1111's Lora hashes / TI hashes of the batch)
    networks = extras.batch_fields(opts, model, opts.text, prompts[:opts.n_samples])
    for key in ("Lora hashes", "TI hashes"):
        if fields.get(key) != networks.get(key):
            raise CLIError(f"{key} {_short(str(networks.get(key)))} differs from the image's "
                           f"{_short(str(fields.get(key)))}")
    hashes.update(networks)
    PROGRESS.start(1)
    if fields.get(sample_many.GENERATOR) == sample_many.PER_IMAGE:  # an image of scripts/sample_many.py
        image, extra = sample_many.regenerate(opts, model, fields)
        hashes.update(extra)
    else:
        for number, _, latents in run.generate(opts, model, prompts, init_image, mode):
            if number == batch:  # earlier batches only advance the generator, as in the original run
                # decode the whole batch, as the run did: kernels may block (and so round) by batch size
                image = pipeline.to_uint8(run.decode(opts, model, latents))[pos]
    os.makedirs(opts.outdir, exist_ok=True)
    path = png_info.save_numbered(image, opts.outdir, run.SAMPLE_NAME, run.SAMPLE_TEMPLATE,
                                  record.infotext(vars(opts), opts.prompt, batch, pos, hashes))
    PROGRESS.wrote()
    with Image.open(args.image) as source:
        same = np.array_equal(np.asarray(source.convert("RGB")), image)
    print(f"{path}: {'identical to' if same else 'DIFFERENT from'} {args.image}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser_rerun().parse_args(argv)
    run.errors_as_one_line("rerun.py", rerun, args)
