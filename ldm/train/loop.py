"""The optimisation loop shared by the autoencoder and the diffusion trainers.

AdamW with linear warm-up then cosine decay to `lr_min`, gradient-norm clipping, optional bf16/fp16
autocast (fp16 with a GradScaler), tqdm progress and a JSON-lines loss log. Randomness of a run comes from
one CPU `torch.Generator` (data, posterior samples, timesteps, noise, conditioning dropout), so a run is
reproducible from its seed on CPU and resumable from the generator state saved in its checkpoint.

The stage-specific parts (which parameters train, the loss, what a checkpoint holds) live in
ldm/train/autoencoder.py and ldm/train/diffusion.py; both subclass `Trainer`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import trange

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainOptions:
    """Hyperparameters of one training stage (saved in its checkpoints under `ldm_train.options`)."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    lr_min: float = 1e-4  # end of the cosine decay
    warmup: int = 100
    weight_decay: float = 0.01  # torch.optim.AdamW's default, which the original's AdamW uses
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    precision: str = "fp32"  # "bf16" / "fp16": autocast on an accelerator
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end
    extra: dict = field(default_factory=dict, hash=False)  # stage-specific (kl_weight, ema_decay, ...)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainOptions:
        data = dict(data)
        data["betas"] = tuple(data["betas"])
        return cls(**data)

    def with_(self, **changes) -> TrainOptions:
        return replace(self, **changes)


def learning_rate(step: int, opts: TrainOptions) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `lr` to `lr_min` at `steps`; constant after."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    span = max(opts.steps - opts.warmup, 1)
    progress = min((step - opts.warmup) / span, 1.0)
    return opts.lr_min + 0.5 * (opts.lr - opts.lr_min) * (1.0 + math.cos(math.pi * progress))


class Trainer:
    """One stage: subclasses set `self.params` and implement `loss(generator) -> (loss, logs)`,
    `checkpoint_state() -> dict` (the original-layout `state_dict`) and `load_checkpoint_state(sd)`."""

    def __init__(self, params: list[torch.nn.Parameter], opts: TrainOptions, device: torch.device):
        if opts.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {opts.precision!r}")
        self.opts = opts
        self.device = torch.device(device)
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=opts.lr, betas=opts.betas, weight_decay=opts.weight_decay)
        fp16 = opts.precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16) if fp16 else None
        self.generator = torch.Generator(device="cpu").manual_seed(opts.seed)
        self.step = 0

    # --- stage-specific -------------------------------------------------------------------------------
    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_checkpoint_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def after_step(self) -> None:
        """Hook after each optimiser step (the diffusion trainer updates its EMA here)."""

    # --- shared ---------------------------------------------------------------------------------------
    def autocast(self):
        dtype = PRECISIONS[self.opts.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self) -> dict:
        lr = learning_rate(self.step, self.opts)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, logs = self.loss(self.generator)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.opts.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        self.after_step()
        return {"step": self.step, "loss": float(loss.detach()), "lr": lr, "grad_norm": float(grad_norm), **logs}

    def save(self, path: str | os.PathLike) -> None:
        """Original layout (`state_dict`, `global_step`) plus what resuming needs: `optimizer_states` (as
        Lightning names it) and `ldm_train` (options, RNG states). Written atomically."""
        payload = {
            "state_dict": self.checkpoint_state(),
            "global_step": self.step,
            "epoch": 0,
            "optimizer_states": [self.optimizer.state_dict()],
            "ldm_train": {
                "options": self.opts.to_dict(),
                "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "grad_scaler": None if self.scaler is None else self.scaler.state_dict(),
            },
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    def resume(self, path: str | os.PathLike) -> None:
        """Continue from a checkpoint written by `save`: weights, EMA, optimizer, step and RNG states."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if "ldm_train" not in payload or "optimizer_states" not in payload:
            raise ValueError(f"{path}: not a training checkpoint of ldm.train (no optimizer/RNG state)")
        self.load_checkpoint_state(payload["state_dict"])
        self.optimizer.load_state_dict(payload["optimizer_states"][0])
        train = payload["ldm_train"]
        self.generator.set_state(train["generator"])
        torch.set_rng_state(train["torch_rng"])
        if self.scaler is not None and train.get("grad_scaler"):
            self.scaler.load_state_dict(train["grad_scaler"])
        self.step = int(payload["global_step"])

    def fit(self, ckpt_path: str | os.PathLike | None = None, log_path: str | os.PathLike | None = None,
            desc: str = "train", disable: bool = False, on_checkpoint=None, before_step=None) -> list[dict]:
        """Train until `opts.steps`, logging every `log_every` steps; saves to `ckpt_path` every
        `ckpt_every` steps and at the end (then calls `on_checkpoint(self)`). Returns the logged records."""
        records = []
        if log_path:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a") if log_path else None
        start = time.time()
        try:
            bar = trange(self.step, self.opts.steps, desc=desc, disable=disable, initial=self.step,
                         total=self.opts.steps)
            for _ in bar:
                if before_step is not None:
                    before_step(self)
                record = self.train_step()
                if self.step % self.opts.log_every == 0 or self.step == self.opts.steps:
                    record["wall_s"] = round(time.time() - start, 2)
                    records.append(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    if log:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                every = self.opts.ckpt_every
                if ckpt_path and every and self.step % every == 0 and self.step != self.opts.steps:
                    self.save(ckpt_path)
                    if on_checkpoint:
                        on_checkpoint(self)
            if ckpt_path:
                self.save(ckpt_path)
                if on_checkpoint:
                    on_checkpoint(self)
        finally:
            if log:
                log.close()
        return records
