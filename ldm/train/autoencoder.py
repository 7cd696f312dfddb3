"""Training the KL autoencoder (first stage): reconstruction + KL, no discriminator.

As ldm/modules/losses/contperceptual.py LPIPSWithDiscriminator of CompVis/stable-diffusion with the GAN and
LPIPS terms off (disc_weight 0, perceptual_weight 0) and a fixed log-variance of 0:
    nll = sum |x - x_rec| / B            (per-image sum over pixels, batch mean)
    kl  = sum KL(q(z|x) || N(0, I)) / B
    loss = nll + kl_weight * kl          (the original configs use kl_weight 1e-6)
Here the loss is divided by the number of values per image (3 H W): the same minimiser, but a loss of order 1
so that gradient-norm clipping and the logged numbers mean the same as in the diffusion stage.
The reconstruction comes from a posterior SAMPLE (AutoencoderKL.forward, sample_posterior=True).

Random crops (opts.extra["crop"] = c > 0): each image of a batch is cut to a c x c window at a position drawn
from the run's generator, as the original VAEs were trained on 256 px crops of larger images. The networks
are convolutional (plus one attention over the latent in the middle block), so they apply to full images
afterwards; on a CPU a 32 px crop of a 64 px image costs a quarter of the full image.

Posterior log-variance at the start (opts.extra["logvar_init"] = v, default None: the layer's own init): the
bias of quant_conv's log-variance half is set to v before the first step. With the default init the posterior
std starts near 1, the same order as the posterior means, so the decoder first sees mostly noise and learns
the average image; with kl_weight 1e-6 the encoder shrinks the variance only slowly (a 64-channel demo VAE
still had std 0.86 and L1 0.28 after 200 steps). Starting at std e^(v/2) removes that plateau; the KL term
still pulls the variance up where it costs nothing.

Checkpoints hold the original first-stage layout: `state_dict` with encoder.*, decoder.*, quant_conv.*,
post_quant_conv.* (what `first_stage_model.*` holds inside a LatentDiffusion checkpoint, without the prefix).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm.distributed import World
from ldm.noise import randn
from ldm.train.loop import Trainer, TrainOptions

# (n, generator) -> (images (n, 3, H, W) in [-1, 1], captions)
DataFn = Callable[[int, torch.Generator], tuple[torch.Tensor, list[str]]]


def posterior_rows(posterior, generator: torch.Generator, n: int, rows: slice) -> torch.Tensor:
    """A posterior sample of `rows` of a global batch of n, whose noise is drawn for all n (as one process draws
    it; README, data-parallel training): posterior.sample(generator) when the rows are the whole batch."""
    mean = posterior.mean
    return mean + posterior.std * randn((n, *mean.shape[1:]), generator, mean.device, mean.dtype)[rows]


def autoencoder_loss(vae, images: torch.Tensor, kl_weight: float, generator: torch.Generator,
                     n: int | None = None, rows: slice | None = None) -> tuple[torch.Tensor, dict]:
    """Loss of `images`; the posterior noise is drawn for a global batch of n of which they are `rows`
    (default: they are the whole batch)."""
    posterior = vae.encode(images)
    if rows is None:
        n, rows = images.shape[0], slice(None)
    reconstruction = vae.decode(posterior_rows(posterior, generator, n, rows))  # AutoencoderKL.forward
    error = (images - reconstruction.float()).abs()
    kl = posterior.kl().float().mean()
    loss = error.mean() + kl_weight * kl / images[0].numel()
    return loss, {"rec_l1": float(error.detach().mean()), "kl": float(kl.detach())}


class AutoencoderTrainer(Trainer):
    """Trains `vae` (an AutoencoderKL) on images from `data`; opts.extra["kl_weight"] (default 1e-6)."""

    def __init__(self, vae: torch.nn.Module, data: DataFn, opts: TrainOptions, device="cpu",
                 world: World | None = None):
        self.vae = vae.to(device).train().requires_grad_(True)
        self.data = data
        self.kl_weight = float(opts.extra.get("kl_weight", 1e-6))
        self.crop = int(opts.extra.get("crop", 0))
        logvar_init = opts.extra.get("logvar_init")
        if logvar_init is not None:  # resume() overwrites this with the checkpoint's weights
            with torch.no_grad():
                bias = self.vae.quant_conv.bias
                bias[bias.shape[0] // 2:] = float(logvar_init)
        super().__init__(list(self.vae.parameters()), opts, device, network=self.vae, world=world)

    def batch(self, generator: torch.Generator) -> tuple:
        """This rank's images of the global batch (data and crops drawn for all of it); the posterior noise
        follows in compute_loss, drawn for all of it too."""
        images, _ = self.data(self.opts.batch_size, generator)
        if self.crop:
            images = random_crops(images, self.crop, generator)
        return images[self.rows].to(self.device), generator

    def compute_loss(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        return autoencoder_loss(self.vae, images, self.kl_weight, generator, self.opts.batch_size, self.rows)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.vae.state_dict().items()}

    def load_checkpoint_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.vae.load_state_dict(state_dict, strict=True)


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One size x size window per image, top-left corners uniform over the valid range."""
    n, _, h, w = images.shape
    if size > min(h, w):
        raise ValueError(f"crop {size} is larger than the images ({h}x{w})")
    ys = torch.randint(0, h - size + 1, (n,), generator=generator).tolist()
    xs = torch.randint(0, w - size + 1, (n,), generator=generator).tolist()
    return torch.stack([im[:, y:y + size, x:x + size] for im, y, x in zip(images, ys, xs)])


@torch.no_grad()
def latent_std(vae: torch.nn.Module, images: torch.Tensor, generator: torch.Generator,
               batch_size: int = 64) -> float:
    """Standard deviation of posterior samples of `images`; scale_factor = 1 / this, as the original's
    scale_by_std (ddpm.py LatentDiffusion.on_train_batch_start) computes from its first batch."""
    was_training = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    latents = [vae.encode(chunk.to(device)).sample(generator).float().cpu() for chunk in images.split(batch_size)]
    vae.train(was_training)
    return float(torch.cat(latents).flatten().std())
