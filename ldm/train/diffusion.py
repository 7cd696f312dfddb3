"""Training the latent diffusion model: UNet (and, when `cond_stage_trainable`, the text encoder).

As ldm/models/diffusion/ddpm.py LatentDiffusion.shared_step / p_losses of CompVis/stable-diffusion:
    z0  = scale_factor * sample of q(z | x)              (get_first_stage_encoding, the VAE is frozen)
    t   ~ U{0, ..., T-1},  noise ~ N(0, I)
    z_t = sqrt(alphas_cumprod[t]) z0 + sqrt(1 - alphas_cumprod[t]) noise          (q_sample)
    loss = mean (model(z_t, t, c) - target)^2,  target = noise ("eps") or
           sqrt(alphas_cumprod[t]) noise - sqrt(1 - alphas_cumprod[t]) z0 ("v", Salimans & Ho 2022)
(l_simple_weight 1, original_elbo_weight 0, logvar 0: the SD configs' loss). Classifier-free guidance
(Ho & Salimans 2022) needs an unconditional model: each caption is replaced by "" with probability
`cond_dropout`, as the original's ucg_training, so the pipeline's unconditional branch (the encoding of "")
is what the model learnt.

Latent pool (opts.extra["latent_pool"] = N > 0): the frozen VAE encodes N training images once (from a
generator of their own, seeded from the run's seed) and each step draws B of their posteriors; the posterior
SAMPLE is still fresh every step. On a CPU the VAE encoder costs a third of a small UNet's training step;
the world's nuisance variation is small, so a few thousand images cover it.

Offset noise (opts.extra["offset_noise"] = s > 0; not in the original): noise = N(0, I) + s * N(0, 1) per
(sample, channel), constant over the latent's pixels (Guttenberg 2023, "Diffusion with offset noise"). With
the SD schedule the last step keeps sqrt(alphas_cumprod[999]) = 0.068 of the signal, and the per-channel
MEAN of x_T averages the pixel noise down 16x on a 16x16 latent, so a model trained on flat-colour images
reads the background colour off the mean of x_T instead of the caption (Lin et al. 2024, "Common diffusion
noise schedules and sample steps are flawed"); pure-noise x_T at sampling time then gives off-palette
backgrounds decided by the seed. The offset hides that mean. Sampling is unchanged.

Foreground weighting (opts.extra["foreground_weight"] = w > 0; not in the original): the squared error of
each latent pixel near the drawn object counts (1 + w) times, normalised by the mean weight so the loss keeps
its scale. "Near" is `foreground_mask`: the pixels of the image that differ from its border colour, pooled to
the latent grid and dilated by one latent pixel (so a circle's mask also holds the corners that would make it
a square). On the demo world a circle and a square of the same box differ on 86 to 168 of 4096 pixels (42 to
104 before issue 21 made the shapes larger), while a colour changes the whole shape: unweighted, the loss
barely sees which shape was drawn (README, The demo model: what the weight bought).

The EMA (ldm/train/ema.py, LitEma names) tracks the DiffusionWrapper `model` only, as the original does
even when the text encoder trains. Draws per step from the run's generator, in order: the batch seed, the
posterior sample, the dropout mask, the timesteps, the noise (with a latent pool: the pool indices, the
posterior sample, then the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.distributed import World
from ldm.train.autoencoder import DataFn, posterior_rows
from ldm.train.checkpoint_io import diffusion_state_dict, split_diffusion_state_dict
from ldm.train.ema import LitEma
from ldm.train.loop import Trainer, TrainOptions


def q_sample(z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor):
    a = alphas_cumprod.to(z0.device)[t].float()[:, None, None, None]
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


def diffusion_target(z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                     parameterization: str) -> torch.Tensor:
    if parameterization == "eps":
        return noise
    if parameterization == "v":
        a = alphas_cumprod.to(z0.device)[t].float()[:, None, None, None]
        return a.sqrt() * noise - (1 - a).sqrt() * z0
    raise ValueError(f"unknown parameterization {parameterization!r}")


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by "" with probability p (one uniform draw per caption)."""
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


@torch.no_grad()
def init_token_embeddings(text_model: torch.nn.Module, std: float, generator: torch.Generator,
                          position_std: float | None = None) -> None:
    """Redraw a CLIP text encoder's token embeddings with standard deviation `std` (training from scratch).

    CLIP's init (std 0.02, as transformers' CLIPTextEmbeddings) leaves a word's identity 50x below the
    unit-scale residual stream that the final LayerNorm hands to the UNet: trained jointly, the words with a
    strong first-order effect on the loss (the colours, which colour whole images) grow their embeddings, and
    the ones whose effect is spatial (shape, position) stay invisible to the UNet, so it gets no gradient to
    learn them from (measured on the demo after 500 steps: changing "red" to "green" moved the context by 14,
    "circle" to "square" by 0.4, at a token norm of 8). At std 1 every word is distinct from step 0.

    `position_std`: redraw the position embeddings too (CLIP's init: 0.01). Needed when the context is the
    embedding layer's output (`layer: hidden, layer_idx: 0`): the same colour word names the shape's colour at
    one place and the background's at another, and only the position embedding tells them apart.
    """
    embeddings = text_model.transformer.text_model.embeddings
    tables = ((embeddings.token_embedding.weight, std), (embeddings.position_embedding.weight, position_std))
    for table, scale in tables:
        if scale:
            table.copy_(torch.randn(table.shape, generator=generator, dtype=table.dtype) * scale)


def foreground_mask(images: torch.Tensor, latent_size: tuple[int, int], threshold: float = 0.3) -> torch.Tensor:
    """(N, 1, h, w) float mask on the latent grid of the pixels of `images` ((N, 3, H, W) in [-1, 1]) that differ
    from the image's border colour (per-channel median of the outermost pixel ring) by more than `threshold` in
    some channel, max-pooled to (h, w) and dilated by one latent pixel. Meant for flat-background images."""
    ring = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    background = ring.median(dim=-1).values[..., None, None]
    differs = ((images - background).abs().amax(dim=1, keepdim=True) > threshold).float()
    pooled = F.adaptive_max_pool2d(differs, latent_size)
    return F.max_pool2d(pooled, 3, stride=1, padding=1)


class DiffusionTrainer(Trainer):
    """Trains a LatentDiffusion built by ldm.models.latent_diffusion.build_model with a trained VAE in it.

    opts.extra: cond_dropout (0.1), ema_decay (0.9999, the original's default), train_text (defaults to the
    config's cond_stage_trainable).
    """

    def __init__(self, model: torch.nn.Module, data: DataFn, opts: TrainOptions, device="cpu",
                 world: World | None = None):
        self.model = model.to(device)
        self.data = data
        self.cond_dropout = float(opts.extra.get("cond_dropout", 0.1))
        self.offset_noise = float(opts.extra.get("offset_noise", 0.0))
        self.foreground_weight = float(opts.extra.get("foreground_weight", 0.0))
        self.train_text = bool(opts.extra.get("train_text", model.config.cond_stage_trainable))
        model.eval().requires_grad_(False)
        model.model.train().requires_grad_(True)
        network = nn.ModuleList([model.model])
        if self.train_text:
            model.cond_stage_model.train().requires_grad_(True)
            network.append(model.cond_stage_model)
        params = list(network.parameters())
        self.ema = LitEma(model.model, decay=float(opts.extra.get("ema_decay", 0.9999))).to(device)
        # a trained text encoder may have unused parameters (SD v2 reads OpenCLIP's penultimate layer)
        super().__init__(params, opts, device, network=network, world=world, unused_parameters=self.train_text)
        self.pool = self.encode_pool(int(opts.extra.get("latent_pool", 0)))

    @torch.no_grad()
    def encode_pool(self, n: int, chunk: int = 64):
        """(posterior means, posterior stds, captions, foreground masks or None) of n training images, or None
        for n = 0."""
        if n <= 0:
            return None
        generator = torch.Generator().manual_seed(self.opts.seed + 7919)
        means, stds, captions, masks = [], [], [], []
        for start in range(0, n, chunk):
            images, caps = self.data(min(chunk, n - start), generator)
            posterior = self.model.first_stage_model.encode(images.to(self.device))
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
            captions += caps
            if self.foreground_weight:
                masks.append(foreground_mask(images, tuple(means[-1].shape[-2:])))
        return torch.cat(means), torch.cat(stds), captions, torch.cat(masks) if masks else None

    def latents(self, generator: torch.Generator) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
        """Scaled latents z0 of this rank's rows of a training batch, the captions of the WHOLE batch (every
        draw is made for the whole batch; only this rank's images are encoded), and the rows' foreground
        masks (None without foreground weighting)."""
        model, n, rows = self.model, self.opts.batch_size, self.rows
        if self.pool is None:
            images, captions = self.data(n, generator)
            with torch.no_grad():
                posterior = model.first_stage_model.encode(images[rows].to(self.device))
                z = posterior_rows(posterior, generator, n, rows)
                mask = None
                if self.foreground_weight:  # from the CPU images, to the latents' device as the pool's masks
                    mask = foreground_mask(images[rows], tuple(z.shape[-2:])).to(self.device)
                return model.get_first_stage_encoding(z).float(), captions, mask
        means, stds, pool_captions, masks = self.pool
        index = torch.randint(0, means.shape[0], (n,), generator=generator)
        noise = torch.randn((n,) + means.shape[1:], generator=generator)
        z0 = model.scale_factor * (means[index[rows]] + stds[index[rows]] * noise[rows])
        mask = None if masks is None else masks[index[rows]].to(self.device)
        return z0.to(self.device), [pool_captions[i] for i in index.tolist()], mask

    def batch(self, generator: torch.Generator) -> tuple:
        """(z0, captions after dropout, t, noise, foreground mask or None) of this rank's rows, every draw made
        for the whole batch in the order of the module docstring (the mask draws nothing)."""
        model, n, rows = self.model, self.opts.batch_size, self.rows
        z0, captions, mask = self.latents(generator)
        captions = drop_captions(captions, self.cond_dropout, generator)[rows]
        t = torch.randint(0, model.num_timesteps, (n,), generator=generator)[rows].to(self.device)
        noise = torch.randn((n, *z0.shape[1:]), generator=generator)
        if self.offset_noise:
            noise = noise + self.offset_noise * torch.randn((n, z0.shape[1], 1, 1), generator=generator)
        return z0, captions, t, noise[rows].to(self.device), mask

    def compute_loss(self, z0: torch.Tensor, captions: list[str], t: torch.Tensor, noise: torch.Tensor,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        model = self.model
        z_t = q_sample(z0, t, noise, model.alphas_cumprod)
        target = diffusion_target(z0, t, noise, model.alphas_cumprod, model.parameterization)
        prediction = model.apply_model(z_t, t, model.conditioning(captions))
        if mask is None:
            return F.mse_loss(prediction.float(), target), {}
        weight = 1 + self.foreground_weight * mask  # (N, 1, h, w), broadcast over the latent channels
        return ((prediction.float() - target) ** 2 * weight).mean() / weight.mean(), {}

    def after_step(self) -> None:
        self.ema.update(self.model.model)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return diffusion_state_dict(self.model, self.ema)

    def load_checkpoint_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        model_sd, ema_sd = split_diffusion_state_dict(state_dict, self.model)
        self.model.load_state_dict(model_sd, strict=True)
        self.ema.load_state_dict(ema_sd, strict=True)
