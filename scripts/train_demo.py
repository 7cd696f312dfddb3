"""Train the shipped demo model from scratch: the KL autoencoder, then the UNet with its tiny CLIP text encoder.

    python scripts/train_demo.py --threads 2          # both stages with the defaults below (the shipped model)
    python scripts/train_demo.py --unet-steps 5000     # continue a finished run to more steps (resumes)

The shipped model is the first command. Against the original recipe its UNet stage reads the text encoder's
embedding layer (configs/demo/shapes-v1.yaml) and weights the loss near the shape (--foreground-weight); both
were measured (README, The demo model) on the 40 seen and 40 held-out prompts of scripts/score_table.py.

Data: the procedural world of ldm/demo/world.py (training split; held-out combinations never seen).
Outputs:
  configs/demo/shapes-v1.yaml             the original-format yaml (scale_factor filled in after stage 1)
  runs/demo/autoencoder.ckpt, ldm.ckpt    full training checkpoints (original layout + optimizer/RNG state)
  runs/demo/*.jsonl                       loss logs
  checkpoints/demo/shapes-v1.safetensors  the pruned EMA-only fp16 export that `make demo` loads
  checkpoints/demo/train_report.json      hyperparameters, wall times, final losses and scores
Every stage resumes from its checkpoint when one exists, so an interrupted run is continued by running the
same command again. Deterministic given --seed on CPU (same thread count).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ldm.config import load_config  # noqa: E402
from ldm.demo import world  # noqa: E402
from ldm.models.latent_diffusion import build_model  # noqa: E402
from ldm.train.autoencoder import AutoencoderTrainer, latent_std  # noqa: E402
from ldm.train.checkpoint_io import export_pruned, write_config  # noqa: E402
from ldm.train.diffusion import DiffusionTrainer, init_token_embeddings  # noqa: E402
from ldm.train.loop import TrainOptions  # noqa: E402

from ldm.demo import DEMO_CKPT as SHIPPED  # noqa: E402
from ldm.demo import DEMO_CONFIG as CONFIG  # noqa: E402
from ldm.demo import DEMO_REPORT as REPORT  # noqa: E402


def world_data(n: int, generator: torch.Generator, attr_dropout: float = 0.0):
    """n training images and captions; with `attr_dropout` each attribute of a caption is left unsaid with that
    probability (the image still shows it), so that each word has to carry its own attribute: a caption that
    names the shape but not the colour teaches the shape word alone (see README, The demo model)."""
    images, _, attrs = world.batch(n, generator, split="train")
    if not attr_dropout:
        return images, [a.caption() for a in attrs]
    drop = torch.rand(n, len(world.ATTRIBUTE_NAMES), generator=generator) < attr_dropout
    return images, [a.caption(tuple(name for name, d in zip(world.ATTRIBUTE_NAMES, row) if d))
                    for a, row in zip(attrs, drop.tolist())]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=str(ROOT / "runs/demo"), help="training checkpoints and logs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", default="2",
                   help="torch CPU threads, or 'auto': 1 while the machine is busier than its cores (OpenMP "
                        "threads that wait on a descheduled partner waste most of their time), else all cores; "
                        "deterministic only with a fixed number")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--vae-steps", type=int, default=2500,
                   help="the shapes' corners are what the VAE learns last: on 200 world images the evaluator reads "
                        "the reconstruction's shape right for 0.82 after 1000 steps (a 1000-step schedule), 0.965 "
                        "after 1500 of a 3000-step one, and 0.995 (L1 0.029) after these 2500")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-crop", type=int, default=0,
                   help="train the VAE on random crops of this size (0: whole images; crops of 32 px, tried first, "
                        "rarely hold a whole shape and learnt shape colours slowly)")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-logvar-init", type=float, default=-8.0,
                   help="initial posterior log-variance (see ldm/train/autoencoder.py)")
    p.add_argument("--unet-steps", type=int, default=2500)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--latent-scale", type=float, default=0.5,
                   help="scale_factor = this / std of the latents. 1 is the original's scale_by_std; 0.5 lowers "
                        "the signal-to-noise ratio at every timestep 4x (input scaling, Chen 2023, 'On the "
                        "importance of noise scheduling for diffusion models'): on flat-colour images the "
                        "background and the shape's place stay readable from x_t up to t = 999 at scale 1, and a "
                        "model that learns to read them there takes them from the seed's noise at sampling time")
    p.add_argument("--parameterization", default="v", choices=["eps", "v"],
                   help="what the UNet predicts (written into the yaml). eps (SD v1) weights the error of the "
                        "predicted image by the signal-to-noise ratio, 0.005 at t = 999, so the steps that decide "
                        "the layout barely train; v (SD v2, Salimans & Ho 2022) weights it by SNR + 1")
    p.add_argument("--token-embedding-std", type=float, default=1.0,
                   help="initial std of the text encoder's token embeddings (ldm/train/diffusion.py "
                        "init_token_embeddings); 0 keeps CLIP's 0.02")
    p.add_argument("--offset-noise", type=float, default=0.1,
                   help="per-channel noise offset in training (ldm/train/diffusion.py); 0 is the original")
    p.add_argument("--ema-decay", type=float, default=0.995,
                   help="EMA decay of the UNet weights (the original's 0.9999 averages over ~10k steps, longer "
                        "than this whole run; 0.995 averages over the last ~200 steps)")
    p.add_argument("--latent-pool", type=int, default=8192,
                   help="encode this many training images once and draw batches from their posteriors (0: "
                        "encode every batch)")
    p.add_argument("--position-embedding-std", type=float, default=1.0,
                   help="redraw the text encoder's position embeddings with this std (0: CLIP's init, 0.01); the "
                        "demo's context is the embedding layer (configs/demo/shapes-v1.yaml), where only the "
                        "position embedding tells the shape's colour word from the background's")
    p.add_argument("--foreground-weight", type=float, default=4.0,
                   help="extra weight of the loss near the drawn shape (ldm/train/diffusion.py foreground_mask): "
                        "the error there counts 1 + this times (0: the original's unweighted loss). Measured "
                        "(README, The demo model): the held-out shapes 0.40 without, 0.575 with 4")
    p.add_argument("--attr-dropout", type=float, default=0.0,
                   help="probability of leaving each attribute out of a training caption (UNet stage)")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--no-score", action="store_true", help="skip the final prompt-adherence evaluation")
    return p.parse_args(argv)


def machine_description(args) -> str:
    """The CPU model and the thread count, so the report's timings can be read against a machine."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{args.device}, {args.precision}, {args.threads} threads of {os.cpu_count()} logical CPUs ({model})"


def adapt_threads(args):
    """A before_step hook for --threads auto (checked every 20 steps)."""
    if args.threads != "auto":
        return None
    cores = os.cpu_count() or 1

    def hook(trainer):
        if trainer.step % 20 == 0:
            busy = os.getloadavg()[0] > cores + 0.5
            torch.set_num_threads(1 if busy else cores)
    return hook


def train_autoencoder(args, work: Path) -> dict:
    cfg = load_config(CONFIG)
    ckpt = work / "autoencoder.ckpt"
    opts = TrainOptions(steps=args.vae_steps, batch_size=args.vae_batch, lr=args.vae_lr, lr_min=args.vae_lr / 10,
                        warmup=50, precision=args.precision, seed=args.seed, log_every=10,
                        ckpt_every=100, extra={"kl_weight": 1e-6, "crop": args.vae_crop,
                                                     "logvar_init": args.vae_logvar_init})
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        vae = build_model(cfg).first_stage_model  # random init from the seed
    trainer = AutoencoderTrainer(vae, world_data, opts, args.device)
    if ckpt.exists():
        trainer.resume(ckpt)
        trainer.opts = trainer.opts.with_(steps=max(args.vae_steps, trainer.step))
    start = time.time()
    records = trainer.fit(ckpt, work / "autoencoder_loss.jsonl", desc="autoencoder",
                          before_step=adapt_threads(args))
    # scale_factor: latent_scale / std of posterior samples of 256 fixed world images (1 / std: the original's
    # scale_by_std)
    gen = torch.Generator().manual_seed(args.seed + 1)
    images, _ = world_data(256, gen)
    std = latent_std(trainer.vae, images, gen)
    write_config(CONFIG, CONFIG, args.latent_scale / std)
    return {"steps": trainer.step, "wall_s": round(time.time() - start, 1), "latent_std": std,
            "final": records[-1] if records else None}


def train_diffusion(args, work: Path) -> dict:
    cfg = load_config(CONFIG)
    ckpt = work / "ldm.ckpt"
    opts = TrainOptions(steps=args.unet_steps, batch_size=args.unet_batch, lr=args.unet_lr, lr_min=args.unet_lr / 20,
                        warmup=100, precision=args.precision, seed=args.seed + 1, log_every=10,
                        ckpt_every=args.ckpt_every, extra={"cond_dropout": 0.1, "ema_decay": args.ema_decay,
                                              "offset_noise": args.offset_noise,
                                              "latent_pool": args.latent_pool,
                                              "foreground_weight": args.foreground_weight})
    with torch.random.fork_rng():
        torch.manual_seed(args.seed + 1)
        model = build_model(cfg)
    if args.token_embedding_std or args.position_embedding_std:
        init_token_embeddings(model.cond_stage_model, args.token_embedding_std,
                              torch.Generator().manual_seed(args.seed + 2), args.position_embedding_std)
    vae_state = torch.load(work / "autoencoder.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    model.first_stage_model.load_state_dict(vae_state, strict=True)
    data = functools.partial(world_data, attr_dropout=args.attr_dropout)
    trainer = DiffusionTrainer(model, data, opts, args.device)
    if ckpt.exists():
        trainer.resume(ckpt)
    start = time.time()

    def export(t):
        export_pruned(ckpt, SHIPPED)

    records = trainer.fit(ckpt, work / "ldm_loss.jsonl", desc="diffusion", on_checkpoint=export,
                          before_step=adapt_threads(args))
    return {"steps": trainer.step, "wall_s": round(time.time() - start, 1),
            "final": records[-1] if records else None}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1 if args.threads == "auto" else int(args.threads))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    # a run that starts from nothing starts a new report; a resumed one adds its entry to "runs"
    fresh = not (work / "autoencoder.ckpt").exists()
    report = json.loads(REPORT.read_text()) if REPORT.exists() and not fresh else {}
    report["args"] = vars(args)
    report["machine"] = machine_description(args)
    write_config(CONFIG, CONFIG, parameterization=args.parameterization)
    start = time.time()
    stages = {"autoencoder": train_autoencoder(args, work), "diffusion": train_diffusion(args, work)}
    # Every invocation is one entry of "runs", with its own stage timings; the top-level stage entries keep the
    # last run that trained each stage, so resuming a finished VAE stage does not erase its record.
    for name, stage in stages.items():
        if stage["final"] is not None or name not in report:
            report[name] = stage
    report.setdefault("runs", []).append({"wall_s": round(time.time() - start, 1), "vae_steps": args.vae_steps,
                                          "unet_steps": args.unet_steps, "threads": args.threads, **stages})
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {SHIPPED} ({SHIPPED.stat().st_size / 1e6:.1f} MB) and {CONFIG}; "
          f"wall time {time.time() - start:.0f} s")
    if not args.no_score:
        import ldm
        from ldm.train.demo_eval import score_model

        model = ldm.load_model(CONFIG, SHIPPED)
        report["scores"] = {}
        for split, prompts in (("seen", world.seen_prompts(40)), ("heldout", world.heldout_prompts(40))):
            result = score_model(model, prompts, sampler="ddim", steps=25)
            report["scores"][split] = result
            print(f"{split}: prompt accuracy {result['prompt_accuracy']:.3f} "
                  f"(attributes {result['attribute_accuracy']:.3f}) over {result['n']} prompts, ddim 25 steps")
        REPORT.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
