"""The README's inpainting example: masked img2img and an outpainting with the shipped demo model, scored.

It writes a demo-world image and two masks to OUTDIR, then runs scripts/inpaint.py's code path (ldm.cli), exactly
as for a real checkpoint:

    python scripts/inpaint.py --config configs/demo/shapes-v1.yaml --ckpt checkpoints/demo/shapes-v1.safetensors \
        --init-img OUTDIR/inpaint-init.png --mask OUTDIR/inpaint-mask.png --strength 1.0 \
        --prompt "a yellow square on a blue background, top left" --ddim_steps 25 --scale 2 --n_samples 8 \
        --seed 0 --outdir OUTDIR/inpaint

- inpaint: init "a red circle on a blue background, top left", mask = the top-left quadrant, prompt a yellow
  square there;
- outpaint: the init image moved 32 px to the right (the shape is now top right) on a canvas whose new left
  half is grey and masked, prompt "a red circle on a blue background, top right".

Each sample is read back by the classical evaluator (ldm/demo/evaluate.py: colour, shape, background and
position must all match the prompt), and the mean absolute difference to the input outside the mask says how
much of the kept part survives (the VAE's round trip; no pixels are pasted back).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ldm.demo import DEMO_CKPT, DEMO_CONFIG  # noqa: E402

INIT = "a red circle on a blue background, top left"
RUNS = {  # name: (prompt, how the input is made)
    "inpaint": ("a yellow square on a blue background, top left", "mask the top-left quadrant"),
    "outpaint": ("a red circle on a blue background, top right", "shift right by 32 px, mask the new left half"),
}


def make_inputs(outdir: Path) -> None:
    from ldm.demo import world

    image = world.to_uint8(world.render(world.parse_prompt(INIT), np.random.default_rng(0))).permute(1, 2, 0).numpy()
    mask = np.zeros((64, 64), np.uint8)
    mask[:32, :32] = 255
    Image.fromarray(mask).save(outdir / "inpaint-mask.png")
    Image.fromarray(image).save(outdir / "inpaint-init.png")
    canvas = np.full_like(image, 128)  # the new area's content does not matter: it is masked
    canvas[:, 32:] = image[:, :32]
    Image.fromarray(canvas).save(outdir / "outpaint-init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(outdir / "outpaint-mask.png")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--outdir", type=Path, default=Path("outputs/demo-inpaint"))
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--n_samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from ldm import cli
    from ldm.demo import evaluate

    args.outdir.mkdir(parents=True, exist_ok=True)
    make_inputs(args.outdir)
    for name, (prompt, how) in RUNS.items():
        init, mask = args.outdir / f"{name}-init.png", args.outdir / f"{name}-mask.png"
        outdir = args.outdir / name
        first = len(list((outdir / "samples").glob("*.png"))) if (outdir / "samples").exists() else 0
        cli.inpaint_main(["--config", str(DEMO_CONFIG), "--ckpt", str(DEMO_CKPT), "--init-img", str(init),
                          "--mask", str(mask), "--prompt", prompt, "--strength", str(args.strength),
                          "--sampler", args.sampler, "--ddim_steps", "25", "--scale", "2", "--n_samples",
                          str(args.n_samples), "--seed", str(args.seed), "--outdir", str(outdir)])
        paths = sorted((outdir / "samples").glob("*.png"))[first:]
        samples = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])
        keep = np.asarray(Image.open(mask)) < 128
        kept = np.abs(samples.astype(np.float64) - np.asarray(Image.open(init), np.float64))[:, keep].mean()
        score = evaluate.score(list(samples), [prompt] * len(samples))
        print(f"{name} ({how}): prompt adherence {score['prompt_accuracy']:.2f} over {len(samples)} samples "
              f"(colour {score['colour']:.2f}, shape {score['shape']:.2f}, background {score['background']:.2f}, "
              f"position {score['position']:.2f}); outside the mask mean |difference| {kept:.2f} of 255")


if __name__ == "__main__":
    main()
