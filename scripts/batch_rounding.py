"""How much the batch size and the CPU thread count change the images of a set (README, "Image sets").

    python scripts/batch_rounding.py                                   # the demo model, 16 prompts
    python scripts/batch_rounding.py --config C --ckpt K --H 512 --W 512 --f 8 --n 8 --batch_sizes 1 4

Every image has its own generator (ldm/image_set.py), so the noise is the same at every batch size; what
changes is rounding: kernels block by batch size and by thread count. Each setting is compared with batch
size 1 on one thread, in uint8 levels: the largest difference, the share of values that differ, the mean
absolute difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ldm  # noqa: E402
from ldm import image_set, pipeline  # noqa: E402
from ldm.demo import DEMO_CKPT, DEMO_CONFIG, seen_prompts  # noqa: E402
from ldm.train.demo_eval import DEMO_SCALE  # noqa: E402


def images(model, items, batch_size, latent_shape, **sampling) -> np.ndarray:
    out = [pipeline.to_uint8(image_set.sample_images(model, chunk, n_samples=batch_size, latent_shape=latent_shape,
                                                     **sampling))
           for chunk in image_set.batches(items, batch_size)]
    return np.concatenate(out).astype(np.int16)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(DEMO_CONFIG))
    p.add_argument("--ckpt", default=str(DEMO_CKPT))
    p.add_argument("--H", type=int, default=64)
    p.add_argument("--W", type=int, default=64)
    p.add_argument("--f", type=int, default=4)
    p.add_argument("--n", type=int, default=16, help="images (the demo's seen prompts, or --prompt repeated)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--samplers", nargs="+", default=["ddim", "euler_a"])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scale", type=float, default=DEMO_SCALE)
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    args = p.parse_args(argv)

    model = ldm.load_model(args.config, args.ckpt)
    prompts = [args.prompt] * args.n if args.prompt else seen_prompts(args.n)
    items = image_set.plan([image_set.Prompt(text) for text in prompts], 1, 0)
    latent_shape = (model.config.unet.in_channels, args.H // args.f, args.W // args.f)
    print("| sampler | batch size | threads | largest difference | values that differ | mean difference |\n"
          "|---|---:|---:|---:|---:|---:|")
    for sampler in args.samplers:
        sampling = dict(sampler=sampler, steps=args.steps, scale=args.scale)
        reference = None
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch_size in args.batch_sizes:
                result = images(model, items, batch_size, latent_shape, **sampling)
                if reference is None:
                    reference = result
                    continue
                gap = np.abs(result - reference)
                print(f"| {sampler} | {batch_size} | {threads} | {gap.max()} | {(gap > 0).sum()} of {gap.size} | "
                      f"{gap.mean():.1e} |", flush=True)


if __name__ == "__main__":
    main()
