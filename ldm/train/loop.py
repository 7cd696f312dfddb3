"""The optimisation loop shared by the autoencoder and the diffusion trainers.

AdamW with linear warm-up then cosine decay to `lr_min`, gradient-norm clipping, optional bf16/fp16
autocast (fp16 with a GradScaler), tqdm progress and a JSON-lines loss log. Randomness of a run comes from
one CPU `torch.Generator` (data, posterior samples, timesteps, noise, conditioning dropout), so a run is
reproducible from its seed on CPU and resumable from the generator state saved in its checkpoint.

The stage-specific parts (which parameters train, the loss, what a checkpoint holds) live in
ldm/train/autoencoder.py and ldm/train/diffusion.py; both subclass `Trainer`.

Data parallelism (torchrun, ldm/distributed.py): `opts.batch_size` is the GLOBAL batch. Every rank draws the
whole batch's randomness from the run's generator in the same order as one process does (so the generators
stay equal on every rank), then keeps its own rows (`World.rows`) and runs the network on them under
DistributedDataParallel, which averages the gradients over the ranks: with equal row counts that is the
gradient of the global batch's mean loss. So the same command trains the same model at any world size, up
to float rounding (the gradient sums run in another order). Rank 0 alone writes checkpoints and the log;
every log line records `world_size`; a checkpoint holds nothing of the world size, so a run resumes at any.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import trange

from ldm.distributed import World, all_sum

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


class _Loss(nn.Module):
    """The trainable `network` with the stage's loss as its forward, so that DistributedDataParallel sees a
    step's whole computation as one forward (its gradient hooks are armed there)."""

    def __init__(self, network: nn.Module, compute):
        super().__init__()
        self.network = network
        self.compute = compute

    def forward(self, *batch):
        return self.compute(*batch)


class Trainer:
    """One stage: subclasses implement `batch(generator)` (every random draw of a step for the global batch,
    returning this rank's rows), `compute_loss(*batch) -> (loss, logs)` (deterministic given the batch),
    `checkpoint_state() -> dict` (the original-layout `state_dict`) and `load_checkpoint_state(sd)`, and pass
    the module holding the trainable `params` as `network`. `world`: this process's rank (ldm/distributed.py;
    default a single process). `unused_parameters`: some trainable parameters take no part in the loss (DDP
    then looks for them every step)."""

    def __init__(self, params: list[torch.nn.Parameter], opts: TrainOptions, device: torch.device,
                 network: nn.Module, world: World | None = None, unused_parameters: bool = False):
        if opts.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {opts.precision!r}")
        self.opts = opts
        self.device = torch.device(device)
        self.params = params
        self.world = world if world is not None else World(device=self.device)
        self.world.rows(opts.batch_size)  # the global batch must split evenly over the ranks
        self.network_loss = _Loss(network, self.compute_loss)
        if self.world.main and self.world.distributed and any(
                isinstance(m, nn.Dropout) and m.p > 0 for m in network.modules()):
            # dropout masks come from the global torch RNG, not from the run's generator (none of the SD
            # configs uses dropout)
            warnings.warn("dropout > 0: each rank draws its own dropout masks, so this run is not the same "
                          "at every world size")
        if self.world.distributed:
            # parameters and buffers are broadcast from rank 0 here (they are equal already: same seed or the
            # same checkpoint); our buffers are constants, so DDP's per-step buffer sync changes nothing
            self.network_loss = nn.parallel.DistributedDataParallel(
                self.network_loss, device_ids=None if self.device.type == "cpu" else [self.device],
                find_unused_parameters=unused_parameters)
        self.optimizer = torch.optim.AdamW(params, lr=opts.lr, betas=opts.betas, weight_decay=opts.weight_decay)
        fp16 = opts.precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16) if fp16 else None
        self.generator = torch.Generator(device="cpu").manual_seed(opts.seed)
        self.step = 0

    # --- stage-specific -------------------------------------------------------------------------------
    def batch(self, generator: torch.Generator) -> tuple:
        raise NotImplementedError

    def compute_loss(self, *batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_checkpoint_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def after_step(self) -> None:
        """Hook after each optimiser step (the diffusion trainer updates its EMA here)."""

    # --- shared ---------------------------------------------------------------------------------------
    @property
    def rows(self) -> slice:
        """This rank's rows of the global batch (all of them in a single process)."""
        return self.world.rows(self.opts.batch_size)

    def loss(self, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """This rank's loss (the mean over its rows) of the next global batch drawn from `generator`."""
        return self.network_loss(*self.batch(generator))

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
        # the logged values of the global batch: the mean of the ranks' means (equal row counts)
        names = sorted(logs)
        values = all_sum(self.world, [float(loss.detach())] + [float(logs[k]) for k in names])
        values = [v / self.world.size for v in values]
        return {"step": self.step, "loss": values[0], "lr": lr, "grad_norm": float(grad_norm),
                **dict(zip(names, values[1:])), "world_size": self.world.size}

    def save(self, path: str | os.PathLike) -> None:
        """Original layout (`state_dict`, `global_step`) plus what resuming needs: `optimizer_states` (as
        Lightning names it) and `ldm_train` (options, RNG states). Written atomically, by rank 0 alone (every
        rank holds the same weights, optimizer and generator states)."""
        if not self.world.main:
            return
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
        `ckpt_every` steps and at the end (then calls `on_checkpoint(self)`). Returns the logged records.
        Under torchrun only rank 0 logs, saves, calls `on_checkpoint` and draws the progress bar."""
        records = []
        main = self.world.main
        if log_path and main:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a") if log_path and main else None
        start = time.time()
        try:
            bar = trange(self.step, self.opts.steps, desc=desc, disable=disable or not main, initial=self.step,
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
                    if on_checkpoint and main:
                        on_checkpoint(self)
            if ckpt_path:
                self.save(ckpt_path)
                if on_checkpoint and main:
                    on_checkpoint(self)
        finally:
            if log:
                log.close()
        return records
