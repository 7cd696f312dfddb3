"""KL-regularised autoencoder: the first stage of latent diffusion.

Specification: ldm/modules/diffusionmodules/model.py (Encoder, Decoder, ResnetBlock, AttnBlock,
Downsample, Upsample), ldm/modules/distributions/distributions.py (DiagonalGaussianDistribution) and
ldm/models/autoencoder.py (AutoencoderKL) of CompVis/stable-diffusion; Rombach et al. 2022, Sec. 3.1.
Attribute paths equal the checkpoint keys under `first_stage_model.` (e.g. `encoder.down.0.block.1.conv1`,
`decoder.up.3.upsample.conv`, `encoder.mid.attn_1.q`), so loading is a prefix strip.

The VAE never takes a timestep: the original builds its ResnetBlocks with temb_channels=0, so there is no
`temb_proj` here. Images are (B, in_channels, H, W) in [-1, 1]; latents are UNSCALED (the caller multiplies
by / divides by `scale_factor`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import AutoencoderConfig, DDConfig
from ldm.noise import Generators, randn


def Normalize(channels: int) -> nn.GroupNorm:
    # as model.py Normalize: 32 groups, eps 1e-6 (not torch's default 1e-5)
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    # swish, x * sigmoid(x) as model.py nonlinearity; F.silu is the same function fused into one kernel,
    # which spares a full-resolution temporary in the decoder.
    return F.silu(x)


class ResnetBlock(nn.Module):
    """as model.py ResnetBlock with temb_channels=0 and conv_shortcut=False (how the VAE builds it)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 "network in network" projection only where the channel count changes
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, as model.py AttnBlock.

    q, k, v and proj_out stay 1x1 convolutions because the checkpoint stores them as [C, C, 1, 1].
    scaled_dot_product_attention uses the default scale C**-0.5, which is the original's `int(c)**(-0.5)`.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head, one token per pixel. Contiguous, because the fused SDPA
        # kernels need unit stride along C: on the CPU a transposed view falls back to the explicit form, whose
        # (H*W)^2 score matrix is 17 GB for a 2048 px image (256x256 latents); the fused kernel needs O(H*W).
        q, k, v = (proj(h).reshape(b, 1, c, height * width).transpose(2, 3).contiguous()
                   for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        # (B, 1, H*W, C) -> (B, C, H, W)
        h = h.transpose(2, 3).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero padding right and bottom only, as model.py Downsample(with_conv=True)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch convs pad symmetrically; the original pads (left 0, right 1, top 0, bottom 1)
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv, as model.py Upsample(with_conv=True)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_supported(dd: DDConfig) -> None:
    # Options the original accepts that no released Stable Diffusion VAE uses; they would change the keys or
    # the math, so fail here instead of building something else. "vanilla-xformers" is the same attention
    # computed by another kernel (Stability-AI model.py MemoryEfficientAttnBlock).
    if not dd.resamp_with_conv:
        raise ValueError("ddconfig.resamp_with_conv = false (avg-pool / conv-free resampling) is not supported")
    if dd.use_linear_attn or dd.attn_type not in ("vanilla", "vanilla-xformers"):
        raise ValueError(f"ddconfig attention {dd.attn_type!r} (use_linear_attn={dd.use_linear_attn}) "
                         "is not supported; only vanilla softmax attention")


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    # plain container so the keys read `down.N.block.M`, `down.N.attn.M` like the original's nn.Module()
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


class Encoder(nn.Module):
    """Image -> moments (2 * z_channels when double_z), as model.py Encoder."""

    def __init__(self, dd: DDConfig):
        super().__init__()
        _check_supported(dd)
        ch, ch_mult = dd.ch, tuple(dd.ch_mult)
        self.conv_in = nn.Conv2d(dd.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, curr_res = ch, dd.resolution
        for i_level, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks, attns = [], []
            for _ in range(dd.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dd.dropout))
                block_in = block_out
                # attention is placed by the resolution this level works at, counted from the yaml resolution
                if curr_res in dd.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i_level != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dd.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dd.dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * dd.z_channels if dd.double_z else dd.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):
    """z (z_channels) -> image (out_ch), as model.py Decoder."""

    def __init__(self, dd: DDConfig):
        super().__init__()
        _check_supported(dd)
        self.give_pre_end, self.tanh_out = dd.give_pre_end, dd.tanh_out
        ch, ch_mult = dd.ch, tuple(dd.ch_mult)
        n_levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        curr_res = dd.resolution // 2 ** (n_levels - 1)
        self.conv_in = nn.Conv2d(dd.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dd.dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dd.dropout)
        # built from the lowest resolution up, stored by level index: `up.0` is the full-resolution level,
        # as the original's `self.up.insert(0, up)`
        levels = []
        for i_level in reversed(range(n_levels)):
            block_out = ch * ch_mult[i_level]
            blocks, attns = [], []
            for _ in range(dd.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dd.dropout))
                block_in = block_out
                if curr_res in dd.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _level(blocks, attns)
            if i_level != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, dd.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(nonlinearity(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class DiagonalGaussianDistribution:
    """Posterior q(z|x) = N(mean, diag(exp(logvar))), as distributions.py DiagonalGaussianDistribution."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.deterministic = deterministic
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        # the original clamps to keep exp() finite
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:  # a point mass at the mean: sample() == mode(), as the original (logvar is kept)
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: Generators = None) -> torch.Tensor:
        # drawn as ldm/noise.py draws everything (float32 on the generator's device, then moved), so a seed
        # gives the same latent on every device and dtype; one generator per image also works
        return self.mean + self.std * randn(self.mean.shape, generator, self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) summed over (C, H, W); `other` defaults to the standard normal prior."""
        if self.deterministic:
            return torch.zeros(1)  # the original's torch.Tensor([0.])
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample` under the posterior, summed over `dims`."""
        if self.deterministic:
            return torch.zeros(1)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=list(dims))


class AutoencoderKL(nn.Module):
    """as ldm/models/autoencoder.py AutoencoderKL, inference part (the loss and training hooks are left out)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        dd = cfg.ddconfig
        if not dd.double_z:
            # the original asserts this too: the posterior needs a mean and a log-variance per channel
            raise ValueError("AutoencoderKL needs ddconfig.double_z = true")
        self.encoder = Encoder(dd)
        self.decoder = Decoder(dd)
        self.quant_conv = nn.Conv2d(2 * dd.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, dd.z_channels, 1)
        # for the argument checks (fast paths may swap the convolutions for ones without these attributes)
        self.image_channels, self.latent_channels = dd.in_channels, cfg.embed_dim

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images -> posterior, in the dtype of the weights (x is cast to it, as under the original's autocast)."""
        channels = self.image_channels
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"x must be (B, {channels}, H, W) images, got {tuple(x.shape)}")
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x.to(self.quant_conv.weight.dtype))))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """UNSCALED latents -> images, nominally in [-1, 1] but not clamped, in the dtype of the weights."""
        channels = self.latent_channels
        if z.ndim != 4 or z.shape[1] != channels:
            raise ValueError(f"z must be (B, {channels}, h, w) latents, got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
