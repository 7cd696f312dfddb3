"""scripts/sample_many.py: an image set from a prompt list, one generator per image, sharded over torchrun ranks.

    python scripts/sample_many.py --from-file prompts.txt --images_per_prompt 4 --seed 0 --outdir DIR ...
    torchrun --nproc_per_node N scripts/sample_many.py ...    # N GPUs (nccl) or N CPU processes (gloo)

Image i (the k-th image of prompt i // K) has seed S + i and its own generator (ldm/image_set.py), so the set
depends on the settings only, not on the world size. Batch j of n_samples consecutive images belongs to rank
j % N; each rank writes DIR/images/{i:06}.png (atomically: temp file + rename) with its PNG parameters, and
after a barrier rank 0 writes DIR/manifest.jsonl (index, prompt, seed, file, sha256; one row per image).

Resuming: the same command again skips the batches whose images are all there and recomputes the others
whole (a batch is always computed with the same images in the same rows), so a run killed at any point
(SIGKILL included) ends with exactly the files of an uninterrupted one. An image already in DIR must carry
the parameters this run would write, else the run stops before writing anything (another set's folder).

CPU threads: each process runs --threads intra-op threads (default 1 on the CPU; scale out with processes).
Kernels round differently for another thread count, so bit-identical sets need the same --threads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re

import torch

import ldm
from ldm import distributed, image_set, pipeline, png_info
from ldm.cli import inputs, record, run
from ldm.cli import sdxl
from ldm.cli.interrupt import PROGRESS, deferred_interrupt
from ldm.cli.flags import (PRECISIONS, SCHEDULES, CLIError, DefaultFloat, DefaultInt, Parser, add_model_flags,
                           add_speed_flags)
from ldm.samplers import SAMPLERS

IMAGE_TEMPLATE = "{:06}.png"
IMAGES, MANIFEST = "images", "manifest.jsonl"
# png_info.save_png's temporary names (".NAME.PID.tmp"), left behind only by a killed run
STALE = re.compile(r"\.(\d{6}\.png|manifest\.jsonl)\.\d+\.tmp")
JSONL_KEYS = {"prompt", "negative_prompt", "seed"}
# infotext fields of the convention (rerun.py regenerates such an image from its own seed), and the CPU threads
# (kernels round differently for another thread count)
GENERATOR, PER_IMAGE, INDEX, THREADS = "Generator", "per image", "Image index", "CPU threads"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="sample_many.py", description=f"Image sets with one generator per image (ldm {ldm.__version__})",
               epilog="Image i (prompt i // images_per_prompt) has seed --seed + i; its noise comes from its own "
                      "generator, so the set is the same for any batch composition, rank and world size. "
                      "Run under torchrun for several processes; rerun the same command to resume.")
    p.add_argument("--from-file", type=str, default=None,
                   help="prompts: one per line, or a .jsonl file of {\"prompt\", \"negative_prompt\" (optional), "
                        "\"seed\" (optional: that row's images get seed, seed + 1, ...)}")
    p.add_argument("--prompt", type=str, default=None, help="a single prompt instead of --from-file")
    p.add_argument("--images_per_prompt", type=int, default=1, help="images of each prompt (K)")
    p.add_argument("--seed", type=int, default=42, help="base seed S: image i has seed S + i")
    p.add_argument("--n_samples", type=int, default=1,
                   help="batch size of each process (1: every image equals txt2img --seed S+i --n_samples 1)")
    p.add_argument("--outdir", type=str, default="outputs/sample_many",
                   help="writes OUTDIR/images/NNNNNN.png and OUTDIR/manifest.jsonl; resumed when it exists")
    p.add_argument("--negative_prompt", type=str, default="",
                   help="negative prompt of every image (a .jsonl row may give its own)")
    p.add_argument("--ddim_steps", "--steps", dest="ddim_steps", type=int, default=50, help="sampling steps")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None,
                   help="sampler (default: ddim; SDXL configs: euler, generative-models' names as txt2img)")
    p.add_argument("--schedule", choices=SCHEDULES, default="uniform", help="spacing of the steps (as txt2img)")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="ddim eta (0.0: deterministic sampling)")
    p.add_argument("--scale", type=float, default=DefaultFloat(7.5),
                   help="classifier-free guidance scale (default 7.5; SDXL configs: 5.0)")
    p.add_argument("--H", type=int, default=DefaultInt(512), help="image height, in pixel space (default 512; "
                   "SDXL configs: 1024)")
    p.add_argument("--W", type=int, default=DefaultInt(512), help="image width, in pixel space (default 512; "
                   "SDXL configs: 1024)")
    p.add_argument("--C", type=int, default=4, help="latent channels")
    p.add_argument("--f", type=int, default=8, help="downsampling factor")
    add_model_flags(p)
    p.add_argument("--no-ema", dest="no_ema", action="store_true", help="use the raw UNet weights")
    p.add_argument("--precision", type=str, choices=list(PRECISIONS), default="autocast",
                   help="as txt2img: full, autocast (float16 compute on an accelerator), fp16, bf16")
    p.add_argument("--device", type=str, default=None,
                   help="torch device (default: this rank's CUDA device if available, else cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of each process (default on the CPU: 1; images are bit-identical only "
                        "for the same value)")
    add_speed_flags(p)
    sdxl.add_flags(p, img2img=False, refiner=False)  # size / crop conditioning of SDXL configs
    # what inputs.validate and run.load read for txt2img, fixed here (no grid, no n_iter, no fixed code)
    p.set_defaults(plms=False, dpm_solver=False, laion400m=False, n_iter=1, n_rows=0, fixed_code=False,
                   skip_grid=True, skip_save=False, control=None, control_config=None, control_image=None,
                   control_preprocess=None, guess_mode=False, lora=[], embedding=[], prompt_syntax="plain",
                   lora_dir=None, clip_skip=1)
    return p


def read_prompts(opts: argparse.Namespace) -> list[image_set.Prompt]:
    """The prompt rows: --prompt, the lines of a text file (as txt2img --from-file), or a .jsonl file."""
    if not opts.from_file:
        return [image_set.Prompt(opts.prompt)]
    with open(opts.from_file, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not opts.from_file.lower().endswith(".jsonl"):
        rows = [image_set.Prompt(line) for line in lines]
    else:
        rows = []
        for number, line in enumerate(lines, start=1):
            if line.strip():
                rows.append(_jsonl_row(line, f"{opts.from_file}:{number}"))
    if not rows:
        raise CLIError(f"prompt file is empty: {opts.from_file}")
    return rows


def _jsonl_row(line: str, where: str) -> image_set.Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise CLIError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise CLIError(f"{where}: a row needs a \"prompt\" string")
    if set(row) - JSONL_KEYS:
        raise CLIError(f"{where}: unknown keys {sorted(set(row) - JSONL_KEYS)}; a row has {sorted(JSONL_KEYS)}")
    negative, seed = row.get("negative_prompt"), row.get("seed")
    if negative is not None and not isinstance(negative, str):
        raise CLIError(f"{where}: \"negative_prompt\" must be a string")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise CLIError(f"{where}: \"seed\" must be a non-negative integer")
    return image_set.Prompt(row["prompt"], negative, seed)


def validate(opts: argparse.Namespace) -> None:
    """txt2img's checks (inputs.validate) and ours; raises CLIError before anything is loaded or written."""
    if opts.from_file and opts.prompt is not None:
        raise CLIError("give --from-file or --prompt, not both")
    if not opts.from_file and opts.prompt is None:
        raise CLIError("no prompts given (--from-file F or --prompt P)")
    for name in ("images_per_prompt", "threads"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            raise CLIError(f"--{name} must be at least 1 (got {getattr(opts, name)})")
    if opts.seed < 0:
        raise CLIError(f"--seed must be non-negative (got {opts.seed})")
    inputs.validate(opts, "txt2img")
    sdxl.resolve_sizes(opts)


def infotext(opts: argparse.Namespace, item: image_set.Item, batch: int, pos: int, hashes: dict) -> str:
    """The PNG parameters of one image: txt2img's fields with the image's own seed and negative prompt, its
    batch (of the set) and row, plus its index and the per-image convention."""
    options = {**vars(opts), "seed": item.seed, "negative_prompt": item.negative_prompt}
    extra = {INDEX: str(item.index), GENERATOR: PER_IMAGE}
    if opts.device.type == "cpu":
        extra[THREADS] = str(torch.get_num_threads())
    return record.infotext(options, item.prompt, batch, pos, {**hashes, **extra})


def regenerate(opts: argparse.Namespace, model, fields: dict[str, str]) -> tuple:
    """(uint8 image, its extra infotext fields) of one image of a set again, from its PNG parameters `fields`
    (scripts/rerun.py; opts holds the recorded txt2img options). Its batch is rebuilt as n_samples copies of
    the image: the rows of a batch do not interact (only the batch size changes rounding), so the image comes
    out as in its own batch on the same device and thread count."""
    item = image_set.Item(int(fields[INDEX]), opts.prompt, opts.negative_prompt, opts.seed)
    extra = {key: fields[key] for key in (INDEX, GENERATOR, THREADS) if key in fields}
    threads = torch.get_num_threads()
    if THREADS in fields and opts.device.type == "cpu":
        torch.set_num_threads(int(fields[THREADS]))
    try:
        images = image_set.sample_images(
            model, [item], n_samples=opts.n_samples, latent_shape=(opts.C, opts.H // opts.f, opts.W // opts.f),
            autocast=run.autocast_dtype(opts), sampler=opts.sampler, steps=opts.ddim_steps, schedule=opts.schedule,
            scale=opts.scale, eta=opts.ddim_eta, value_dict=sdxl.value_dict(opts))
    finally:
        torch.set_num_threads(threads)
    return pipeline.to_uint8(images)[0], extra


def image_path(outdir: str, index: int) -> str:
    return os.path.join(outdir, IMAGES, IMAGE_TEMPLATE.format(index))


def remove_stale(outdir: str) -> None:
    """Temporary files of a killed run (never under a final name; see png_info.save_png)."""
    for folder in (outdir, os.path.join(outdir, IMAGES)):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if STALE.fullmatch(name):
                    os.remove(os.path.join(folder, name))


def missing(batch: list[image_set.Item], number: int, outdir: str, opts, hashes: dict, problems: list) -> list:
    """The images of a batch not yet in outdir; an existing image with other parameters goes to `problems`."""
    todo = []
    for pos, item in enumerate(batch):
        path = image_path(outdir, item.index)
        if not os.path.exists(path):
            todo.append(item)
            continue
        try:
            same = png_info.read_parameters(path) == infotext(opts, item, number, pos, hashes)
        except (OSError, ValueError):
            same = False
        if not same:
            problems.append(path)
    return todo


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(outdir: str, items: list[image_set.Item], hashes: dict[int, str]) -> str:
    """DIR/manifest.jsonl, one row per image in index order (written to a temporary name, then renamed)."""
    path = os.path.join(outdir, MANIFEST)
    tmp = os.path.join(outdir, f".{MANIFEST}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for item in items:
            row = {"index": item.index, "prompt": item.prompt, "seed": item.seed,
                   "file": f"{IMAGES}/{IMAGE_TEMPLATE.format(item.index)}", "sha256": hashes[item.index]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def sample_many(opts: argparse.Namespace) -> None:
    requested = inputs.resolve_device(opts.device) if opts.device is not None else None
    world = distributed.init(requested)
    try:
        make_set(opts, world)
    finally:
        distributed.finish(world)


def make_set(opts: argparse.Namespace, world: distributed.World) -> None:
    opts.device = world.device
    validate(opts)
    if opts.device.type == "cpu":
        torch.set_num_threads(opts.threads or 1)
    elif opts.threads:
        torch.set_num_threads(opts.threads)
    items = image_set.plan(read_prompts(opts), opts.images_per_prompt, opts.seed, opts.negative_prompt)
    chunks = image_set.batches(items, opts.n_samples)
    mine = image_set.shard(len(chunks), world.rank, world.size)
    # the checkpoint's hash is read once (rank 0), not by every process
    hashes = distributed.all_gather(world, run.file_hashes(opts, "txt2img") if world.main else None)[0]
    if world.main:
        remove_stale(opts.outdir)
    distributed.barrier(world)  # no rank writes before the stale files are gone

    problems, todo = [], {}
    for number in mine:
        if remaining := missing(chunks[number], number, opts.outdir, opts, hashes, problems):
            todo[number] = remaining
    problems = sorted(p for rank_problems in distributed.all_gather(world, problems) for p in rank_problems)
    if problems:
        raise CLIError(f"{len(problems)} image(s) in {opts.outdir} were made with other settings or are "
                       f"unreadable (first: {problems[0]}); give another --outdir")
    total = int(distributed.all_sum(world, [sum(len(v) for v in todo.values())])[0])
    if total:
        model = run.load(opts)
        inputs.check_run(opts, model)
        if world.main:
            inputs.warn_long_prompts(model, [item.prompt for item in items] + [opts.negative_prompt])
        generate(opts, world, model, chunks, todo, hashes, total)
    distributed.barrier(world)  # every image is written

    digests = {item.index: sha256(image_path(opts.outdir, item.index)) for n in mine for item in chunks[n]}
    gathered = distributed.all_gather(world, digests)
    if world.main:
        path = write_manifest(opts.outdir, items, {k: v for part in gathered for k, v in part.items()})
        print(f"{len(items)} images ({total} new) in {os.path.join(opts.outdir, IMAGES)}; manifest {path}")


def generate(opts, world, model, chunks, todo, hashes, total) -> None:
    """Round r: rank k computes batch r * N + k when it has missing images; the ranks then add up what they
    wrote for rank 0's progress bar (images/s over all ranks)."""
    from tqdm import tqdm

    os.makedirs(os.path.join(opts.outdir, IMAGES), exist_ok=True)
    sampling = dict(sampler=opts.sampler, steps=opts.ddim_steps, schedule=opts.schedule, scale=opts.scale,
                    eta=opts.ddim_eta)
    if opts.sgm:  # SDXL: the size / crop conditioning (the same for every image)
        sampling["value_dict"] = sdxl.value_dict(opts)
    latent_shape = (opts.C, opts.H // opts.f, opts.W // opts.f)
    PROGRESS.start(sum(len(todo[number]) for number in todo if number % world.size == world.rank))
    bar = tqdm(total=total, unit="img", desc=f"images ({world.size} process{'es' * (world.size > 1)})",
               disable=not world.main)
    for first in range(0, len(chunks), world.size):
        number, written = first + world.rank, 0
        if number in todo:
            batch = chunks[number]
            images = image_set.sample_images(model, batch, n_samples=opts.n_samples, latent_shape=latent_shape,
                                             autocast=run.autocast_dtype(opts), **sampling)
            for pos, (item, image) in enumerate(zip(batch, pipeline.to_uint8(images))):
                if item in todo[number]:
                    with deferred_interrupt():  # the file and its count, or neither (ldm/cli/interrupt.py)
                        png_info.save_png(image, image_path(opts.outdir, item.index),
                                          infotext(opts, item, number, pos, hashes))
                        PROGRESS.wrote()
                    written += 1
        bar.update(int(distributed.all_sum(world, [written])[0]))
    bar.close()


def main(argv: list[str] | None = None) -> None:
    opts = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        run.errors_as_one_line("sample_many.py", sample_many, opts)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep their setting
