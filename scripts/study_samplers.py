"""Sampler convergence study: each sampler's error against a converged reference, as a function of NFE.

    python scripts/study_samplers.py --out outputs/study          # the demo model, in minutes on 2 cores
    python scripts/study_samplers.py --samplers all --schedule uniform,karras --steps 4,8,16,32,64 \
        --reference heun:400 --from-file prompts.txt --seeds 0,1,2,3 --out outputs/study-all

Every run starts from the x_T that txt2img draws for --prompt P --seed S --n_samples 1 and is compared with
the reference run from the same x_T. Writes OUT/results.json ({"reference": ..., "runs": [...]}),
OUT/results.csv (the runs), OUT/summary.md (the table printed at the end, with each sampler's empirical order
of convergence and the reference's own error floor) and OUT/error_vs_nfe.png (needs matplotlib:
`pip install -e '.[study]'`). The definitions of nfe, latent_rmse, psnr, order and floor are in ldm/study.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ldm.demo import DEMO_CKPT, DEMO_CONFIG  # noqa: E402

DEFAULT_PROMPT = "a red circle on a blue background, top left"
DEFAULT_SCALE = 3.0
# the default reference: deterministic, second order, one denoiser call per step, so that the reference and
# its floor (twice the steps) cost half of what heun's would; it runs 4x the largest --steps
DEFAULT_REFERENCE = "dpmpp_2m"


def parse_args(argv=None) -> argparse.Namespace:
    from ldm.cli.flags import PRECISIONS, Parser

    p = Parser(prog="study_samplers.py", description=__doc__.split("\n")[0])
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--from-file", default=None, help="prompts, one per line (instead of --prompt)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (txt2img's --seed)")
    p.add_argument("--samplers", default="euler,heun,dpmpp_2m", help="comma list of registered samplers, or all")
    p.add_argument("--schedule", default="karras",
                   help="comma list of schedules; each sampler runs with those that apply to it")
    p.add_argument("--steps", default="4,8,16,32", help="comma list of step counts")
    p.add_argument("--reference", default=None,
                   help="SAMPLER:STEPS[:SCHEDULE] (default: dpmpp_2m, second order at one call per step, at 4x the "
                        "largest --steps on the first schedule)")
    p.add_argument("--out", default="outputs/sampler-study", help="output directory (must not hold results yet)")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="model config (default: the demo model's)")
    p.add_argument("--ckpt", default=str(DEMO_CKPT), help="checkpoint (default: the shipped demo model)")
    p.add_argument("--H", type=int, default=64, help="image height (default: the demo model's 64)")
    p.add_argument("--W", type=int, default=64, help="image width (default: the demo model's 64)")
    p.add_argument("--C", type=int, default=4, help="latent channels")
    p.add_argument("--f", type=int, default=4, help="downsampling factor (default: the demo model's 4)")
    p.add_argument("--scale", type=float, default=DEFAULT_SCALE, help=f"guidance scale (default {DEFAULT_SCALE})")
    p.add_argument("--negative_prompt", default="", help="prompt of the unconditional branch (default: empty)")
    p.add_argument("--device", default=None, help="torch device (default: the CUDA device if available, else cpu)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="autocast",
                   help="as txt2img: full, autocast (float16 compute on an accelerator), fp16, bf16")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the demo model, whose small ops only wait on a second "
                        "thread when the cores are busy; torch's choice otherwise)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _int_list(text: str, flag: str) -> list[int]:
    from ldm.cli.flags import CLIError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{flag} takes a comma list of integers, got {text!r}") from None
    if not values:
        raise CLIError(f"{flag} is empty")
    return values


def check(opts: argparse.Namespace):
    """Every check that needs no model; returns (prompts, seeds, methods, reference)."""
    from ldm import samplers, study
    from ldm.cli import inputs
    from ldm.cli.flags import CLIError

    seeds = _int_list(opts.seeds, "--seeds")
    steps = sorted(set(_int_list(opts.steps, "--steps")))
    if steps[0] < 1:
        raise CLIError("--steps must be positive")
    schedules = [s for s in opts.schedule.split(",") if s]
    if not schedules:
        raise CLIError("--schedule is empty")
    if opts.samplers == "all":  # every sampler that takes one of the schedules
        names = [n for n, spec in samplers.SAMPLERS.items() if set(spec.valid_schedules) & set(schedules)]
    else:
        names = [s for s in opts.samplers.split(",") if s]
    if not names:
        raise CLIError("no sampler to run")
    try:
        runs = study.methods(names, schedules, steps)
        reference = study.parse_reference(opts.reference or f"{DEFAULT_REFERENCE}:{4 * steps[-1]}", schedules[0])
    except ValueError as e:
        raise CLIError(str(e)) from None
    for name in ("H", "W"):
        if getattr(opts, name) < opts.f or getattr(opts, name) % opts.f:
            raise CLIError(f"--{name} {getattr(opts, name)} is not a positive multiple of --f {opts.f}")
    for path, what in ((opts.config, "config"), (opts.ckpt, "checkpoint"), (opts.from_file, "prompt file")):
        if path is not None and not os.path.isfile(path):
            raise CLIError(f"{what} not found: {path}")
    if opts.from_file:
        prompts = [line for line in Path(opts.from_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise CLIError(f"prompt file is empty: {opts.from_file}")
    else:
        prompts = [opts.prompt]
    if (Path(opts.out) / "results.json").exists() and not opts.overwrite:
        raise CLIError(f"{opts.out} already holds results.json; choose another --out (or --overwrite)")
    if os.path.exists(opts.out) and not os.path.isdir(opts.out):
        raise CLIError(f"--out {opts.out} exists and is not a directory")
    opts.device = inputs.resolve_device(opts.device)
    return prompts, seeds, runs, reference


def is_demo_model(ckpt: str, prompts: list[str]) -> bool:
    """Adherence is measured for the shipped demo model on prompts of its world."""
    from ldm.demo import world

    if not (DEMO_CKPT.exists() and os.path.samefile(ckpt, DEMO_CKPT)):
        return False
    try:
        [world.parse_prompt(p) for p in prompts]
    except ValueError:
        return False
    return True


def main_body(opts: argparse.Namespace) -> None:
    prompts, seeds, runs, reference = check(opts)
    import torch

    import ldm
    from ldm import pipeline, study
    from ldm.cli import inputs
    from ldm.cli.flags import PRECISIONS, CLIError
    from ldm.cli.run import autocast_dtype

    if opts.threads is None and DEMO_CKPT.exists() and os.path.samefile(opts.ckpt, DEMO_CKPT):
        opts.threads = 1
    if opts.threads:
        torch.set_num_threads(opts.threads)
    model = ldm.load_model(opts.config, opts.ckpt, device=opts.device, dtype=PRECISIONS[opts.precision])
    inputs.check_model(opts, model)
    multiple = opts.f * 2 ** (len(model.config.unet.channel_mult) - 1)
    if opts.H % multiple or opts.W % multiple:
        raise CLIError(f"--H and --W must be multiples of {multiple} for this model (got {opts.H}x{opts.W})")
    dtype = autocast_dtype(opts)

    def scope():
        return torch.autocast(opts.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def denoiser_for(prompt):
        return pipeline.make_denoiser(model, [prompt], opts.negative_prompt, opts.scale)

    def decode(z):
        return pipeline.to_uint8(pipeline.to_unit(pipeline.decode(model, z)))[0]

    adherence = None
    if is_demo_model(opts.ckpt, prompts):
        from ldm.demo import evaluate

        def adherence(image, prompt):
            return int(all(evaluate.evaluate_image(image, prompt).values()))

    shape = (1, opts.C, opts.H // opts.f, opts.W // opts.f)
    print(f"reference {':'.join(map(str, reference))}; {len(runs)} sampler/schedule pairs x {len(prompts)} "
          f"prompts x {len(seeds)} seeds", file=sys.stderr)
    # as txt2img (ldm.cli.run): conditioning, sampling and decoding under the --precision autocast scope
    with torch.no_grad(), scope():
        results = study.measure(denoiser_for, prompts, seeds, shape, runs, reference, decode=decode,
                                adherence=adherence, device=opts.device, progress=not opts.quiet)
    messages = study.write(results, Path(opts.out))
    print(study.table(results))
    for message in messages:
        print(message)
    print(f"wrote {opts.out}/results.json, results.csv, summary.md"
          + ("" if messages else ", error_vs_nfe.png"))


def main(argv=None) -> None:
    from ldm.cli.run import errors_as_one_line

    opts = parse_args(argv)
    errors_as_one_line("study_samplers.py", main_body, opts)


if __name__ == "__main__":
    main()
