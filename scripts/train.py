"""Train a latent diffusion model from an ORIGINAL-format yaml: the KL autoencoder, then the UNet (+ text encoder).

    # 1. the autoencoder (first_stage_config of the yaml); prints its latent std, writes the yaml with
    #    scale_factor = 1 / std to --write-config
    python scripts/train.py autoencoder --config configs/demo/shapes-v1.yaml --out runs/x/autoencoder.ckpt \
        --steps 500 --batch-size 8 --lr 2e-3 --write-config runs/x/model.yaml
    # 2. the diffusion model, with the frozen autoencoder of step 1
    python scripts/train.py diffusion --config runs/x/model.yaml --first-stage runs/x/autoencoder.ckpt \
        --out runs/x/ldm.ckpt --steps 2500 --batch-size 32 --lr 1e-3 --export runs/x/model.safetensors
    # 3. (any time) the pruned EMA-only fp16 export of a training checkpoint
    python scripts/train.py export --ckpt runs/x/ldm.ckpt --out runs/x/model.safetensors

Checkpoints are in the original layout (state_dict with model.diffusion_model.*, model_ema.*,
first_stage_model.*, cond_stage_model.*, global_step), so `ldm.load_model(yaml, ckpt)` and
scripts/txt2img.py read them; they also carry the optimizer and RNG state, and running the same command again
resumes from --out when it exists (raise --steps to train longer). Data: the procedural world of
ldm/demo/world.py (training split). Deterministic given --seed on CPU with a fixed --threads.
scripts/train_demo.py runs both stages with the demo model's settings.

Data-parallel: `torchrun --nproc_per_node N scripts/train.py ...` runs N processes (one GPU each with
--device cuda, nccl; or N CPU processes, gloo) under DistributedDataParallel. --batch-size stays the GLOBAL
batch, split evenly over the processes, and each step the processes together see exactly the samples one
process would see, so the same command trains the same model (up to float rounding) at any N; rank 0 alone
writes the checkpoint, the log and the export, and a run resumes at any N.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm import distributed  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.demo import world  # noqa: E402
from ldm.models.latent_diffusion import build_model  # noqa: E402
from ldm.train.autoencoder import AutoencoderTrainer, latent_std  # noqa: E402
from ldm.train.checkpoint_io import export_pruned, write_config  # noqa: E402
from ldm.train.diffusion import DiffusionTrainer  # noqa: E402
from ldm.train.loop import PRECISIONS, TrainOptions  # noqa: E402


def world_data(n: int, generator: torch.Generator, size: int = world.IMAGE_SIZE):
    images, captions, _ = world.batch(n, generator, split="train", size=size)
    return images, captions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="stage", required=True)

    def common(q, steps, batch, lr):
        q.add_argument("--config", required=True, help="original-format LatentDiffusion yaml")
        q.add_argument("--out", required=True, help="training checkpoint (.ckpt); resumed when it exists")
        q.add_argument("--steps", type=int, default=steps)
        q.add_argument("--batch-size", type=int, default=batch,
                       help="global batch, split evenly over the processes under torchrun")
        q.add_argument("--lr", type=float, default=lr)
        q.add_argument("--lr-min", type=float, default=None, help="end of the cosine decay (default lr / 10)")
        q.add_argument("--warmup", type=int, default=100)
        q.add_argument("--weight-decay", type=float, default=0.01)
        q.add_argument("--grad-clip", type=float, default=1.0)
        q.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                       help="bf16/fp16 autocast (on an accelerator)")
        q.add_argument("--device", default="cpu", help="cpu, or an accelerator type (each rank takes its own)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        q.add_argument("--image-size", type=int, default=world.IMAGE_SIZE,
                       help=f"side of the training images in pixels (default {world.IMAGE_SIZE}, the world's)")
        q.add_argument("--log", default=None,
                       help="JSON-lines loss log (default: OUT with .jsonl); every line records world_size")
        q.add_argument("--log-every", type=int, default=10)
        q.add_argument("--ckpt-every", type=int, default=500)

    a = sub.add_parser("autoencoder", help="train first_stage_config (reconstruction + KL)")
    common(a, 500, 8, 2e-3)
    a.add_argument("--kl-weight", type=float, default=1e-6)
    a.add_argument("--write-config", default=None, help="write the yaml with the fitted scale_factor here")

    d = sub.add_parser("diffusion", help="train the UNet (and the text encoder if cond_stage_trainable)")
    common(d, 2500, 32, 1e-3)
    d.add_argument("--first-stage", required=True, help="autoencoder checkpoint of the autoencoder stage")
    d.add_argument("--cond-dropout", type=float, default=0.1, help="caption -> '' probability (for CFG)")
    d.add_argument("--ema-decay", type=float, default=0.9999)
    d.add_argument("--export", default=None, help="also write the pruned EMA-only fp16 .safetensors here")

    e = sub.add_parser("export", help="pruned EMA-only .safetensors of a diffusion training checkpoint")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--fp32", action="store_true", help="keep float32 (default: float16)")
    e.add_argument("--no-ema", action="store_true", help="export the raw UNet weights instead of the EMA")
    return p


def options(args, extra: dict) -> TrainOptions:
    return TrainOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        lr_min=args.lr / 10 if args.lr_min is None else args.lr_min, warmup=args.warmup,
                        weight_decay=args.weight_decay, grad_clip=args.grad_clip, precision=args.precision,
                        seed=args.seed, log_every=args.log_every, ckpt_every=args.ckpt_every, extra=extra)


def build(args):
    cfg = load_config(args.config)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)  # weights initialised from the seed alone
        return build_model(cfg)


def fit(trainer, args, desc):
    out = Path(args.out)
    if out.exists():
        trainer.resume(out)
        if trainer.world.main:
            print(f"resumed {out} at step {trainer.step}")
    log = args.log or out.with_suffix(".jsonl")
    records = trainer.fit(out, log, desc=desc)
    if records and trainer.world.main:
        print(f"step {records[-1]['step']}: loss {records[-1]['loss']:.5f}; checkpoint {out}, log {log} "
              f"({trainer.world.size} process{'es' * (trainer.world.size > 1)})")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    ranks = distributed.init(torch.device(getattr(args, "device", "cpu")))
    try:
        if args.stage == "export":
            if ranks.main:
                dtype = None if args.fp32 else torch.float16
                path = export_pruned(args.ckpt, args.out, dtype=dtype, ema=not args.no_ema)
                print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
            return
        if args.batch_size % ranks.size:
            sys.exit(f"train.py: error: --batch-size {args.batch_size} does not split evenly over "
                     f"{ranks.size} processes")
        train(args, ranks)
    finally:
        distributed.finish(ranks)


def train(args, ranks):
    model = build(args)
    data = functools.partial(world_data, size=args.image_size)
    if args.stage == "autoencoder":
        trainer = AutoencoderTrainer(model.first_stage_model, data,
                                     options(args, {"kl_weight": args.kl_weight}), ranks.device, ranks)
        fit(trainer, args, "autoencoder")
        if not ranks.main:
            return
        generator = torch.Generator().manual_seed(args.seed + 1)
        images, _ = data(256, generator)
        std = latent_std(trainer.vae, images, generator)
        print(f"latent std {std:.5f} -> scale_factor {1 / std:.6g}")
        if args.write_config:
            print(f"wrote {write_config(args.config, args.write_config, 1 / std)}")
        return
    vae_state = torch.load(args.first_stage, map_location="cpu", weights_only=True)["state_dict"]
    model.first_stage_model.load_state_dict(vae_state, strict=True)
    extra = {"cond_dropout": args.cond_dropout, "ema_decay": args.ema_decay}
    trainer = DiffusionTrainer(model, data, options(args, extra), ranks.device, ranks)
    fit(trainer, args, "diffusion")
    if args.export and ranks.main:
        path = export_pruned(args.out, args.export)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
