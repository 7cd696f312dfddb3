"""The README's score table: prompt adherence of the shipped demo model per sampler and step count.

    python scripts/score_table.py                      # writes checkpoints/demo/scores.md
    python scripts/score_table.py --samplers ddim --steps 25 --n 40
    python scripts/score_table.py --samplers ddim dpmpp_2m --steps 25 --seeds 0 1 \
        --out checkpoints/demo/scores-seeds01.md

Images come from the txt2img pipeline (ldm.pipeline via ldm/train/demo_eval.py) with the demo's guidance
scale, one seed; they are scored by the classical evaluator of ldm/demo/evaluate.py. "seen" are combinations
of attributes that occur in training (world.seen_prompts), "held-out" are the pairings kept out of training
(world.heldout_prompts). A prompt counts only when colour, shape, background and position all match.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SAMPLERS = ("ddim", "plms", "dpm_solver", "euler_a", "dpmpp_2m")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    from ldm.demo import DEMO_CKPT, DEMO_CONFIG

    p.add_argument("--config", default=str(DEMO_CONFIG))
    p.add_argument("--ckpt", default=str(DEMO_CKPT))
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    p.add_argument("--steps", nargs="+", type=int, default=[10, 25])
    p.add_argument("--n", type=int, default=40, help="prompts per split")
    p.add_argument("--scale", type=float, default=None, help="guidance scale (default: the demo's)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="every prompt is drawn once per seed")
    p.add_argument("--out", default=str(ROOT / "checkpoints/demo/scores.md"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    import torch

    import ldm
    from ldm.demo import world
    from ldm.train.demo_eval import DEMO_SCALE, score_model

    if args.threads:
        torch.set_num_threads(args.threads)
    scale = DEMO_SCALE if args.scale is None else args.scale
    model = ldm.load_model(args.config, args.ckpt)
    splits = {"seen": world.seen_prompts(args.n), "held-out": world.heldout_prompts(args.n)}
    results = {}
    start = time.time()
    for sampler in args.samplers:
        for steps in args.steps:
            for split, prompts in splits.items():
                r = score_model(model, prompts, sampler=sampler, steps=steps, scale=scale, seeds=args.seeds)
                results[(sampler, steps, split)] = r
                print(f"{sampler:>10} {steps:>3} steps {split:>8}: prompt {r['prompt_accuracy']:.3f} "
                      f"(colour {r['colour']:.2f} shape {r['shape']:.2f} background {r['background']:.2f} "
                      f"position {r['position']:.2f})", flush=True)

    lines = [
        f"Prompt adherence of the demo model (`{Path(args.ckpt).name}`): fraction of prompts whose colour, shape,",
        f"background and position all match, {args.n} prompts per split, seed{'s' * (len(args.seeds) > 1)} "
        f"{' and '.join(map(str, args.seeds))}, guidance scale {scale:g},",
        f"64x64 images (`python {' '.join(['scripts/score_table.py'] + sys.argv[1:])}`). Seen: combinations that occur",
        "in training; held-out: the colour-shape and colour-background pairings kept out of training. Per attribute:",
        "the fraction of images whose colour / shape / background / position is right.",
        "",
        "| sampler | steps | seen | held-out | seen per attribute | held-out per attribute |",
        "|---|---:|---:|---:|---|---|",
    ]

    def attributes(r: dict) -> str:
        return " / ".join(f"{r[name]:.2f}" for name in ("colour", "shape", "background", "position"))

    for sampler in args.samplers:
        for steps in args.steps:
            seen, held = results[(sampler, steps, "seen")], results[(sampler, steps, "held-out")]
            lines.append(f"| {sampler} | {steps} | {seen['prompt_accuracy']:.2f} | {held['prompt_accuracy']:.2f} | "
                         f"{attributes(seen)} | {attributes(held)} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {f"{s}/{n}/{split}": r for (s, n, split), r in results.items()}, indent=1) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
