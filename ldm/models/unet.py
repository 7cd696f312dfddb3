"""The Stable Diffusion denoising UNet (`model.diffusion_model.*` in the original checkpoints).

Specification: ldm/modules/diffusionmodules/openaimodel.py UNetModel (with util.py timestep_embedding and
GroupNorm32) of CompVis/stable-diffusion and Stability-AI/stablediffusion, restricted to what the SD v1/v2
yamls use: spatial transformers for attention, conv resampling, no class conditioning. Attribute paths
are the checkpoint keys: `input_blocks.N.M`, `middle_block.M`, `output_blocks.N.M`, `time_embed.{0,2}`,
`out.{0,2}`; parameter-free layers (SiLU, Dropout) stay in the Sequentials so the indices line up.

Gradient checkpointing (`use_checkpoint`) is honoured only while training with gradients enabled;
at inference it changes nothing, as in the original. `use_fp16`/`use_bf16` are ignored: the
computation runs in the dtype of the parameters (chosen when loading), inputs are cast to it and the
output is cast back to the dtype of `x`, as the original casts `h` to `self.dtype` and back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import UNetConfig
from ldm.models.attention import SpatialTransformer, checkpointed


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (B,) -> (B, dim), float32.

    As diffusionmodules/util.py timestep_embedding: cosines first, then sines (the reverse of
    "Attention Is All You Need"), frequencies max_period^(-i/half) for i < half, zero pad for odd dim.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs.to(timesteps.device)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, as util.py GroupNorm32 (half activations lose range)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)  # util.py normalization: 32 groups, default eps 1e-5


class ResBlock(nn.Module):
    """Two 3x3 convs with the projected timestep embedding added in between, plus a skip connection.

    As openaimodel.py ResBlock without up/down-sampling and without scale-shift norm (SD uses neither).
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float = 0.0, out_channels: int | None = None,
                 use_checkpoint: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpointed(self, self._forward, x, emb)

    def _forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Strided 3x3 conv halving the resolution (openaimodel.py Downsample with use_conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (openaimodel.py Upsample with use_conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential passing the timestep embedding to ResBlocks and the context to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def attention_heads(cfg: UNetConfig, ch: int) -> tuple[int, int]:
    """(number of heads, head width) of the transformer at `ch` channels, as openaimodel.py computes them.

    v1 fixes the number of heads (num_heads=8), v2 the head width (num_head_channels=64);
    `legacy` recomputes the width from the head count, which only differs when ch is not divisible.
    """
    if cfg.num_head_channels == -1:
        num_heads, dim_head = cfg.num_heads, ch // cfg.num_heads
    else:
        num_heads, dim_head = ch // cfg.num_head_channels, cfg.num_head_channels
    if cfg.legacy:
        dim_head = ch // num_heads
    return num_heads, dim_head


def _check_supported(cfg: UNetConfig) -> None:
    # Options of openaimodel.UNetModel that no Stable Diffusion v1/v2 config uses: refuse them rather
    # than build a different network.
    unsupported = {
        "use_spatial_transformer": not cfg.use_spatial_transformer,
        "context_dim": cfg.context_dim is None,
        "dims": cfg.dims != 2,
        "conv_resample": not cfg.conv_resample,
        "num_classes": cfg.num_classes is not None,
        "n_embed": cfg.n_embed is not None,
        "use_scale_shift_norm": cfg.use_scale_shift_norm,
        "resblock_updown": cfg.resblock_updown,
        "adm_in_channels": cfg.adm_in_channels is not None,
        "num_heads": cfg.num_heads == -1 and cfg.num_head_channels == -1,
    }
    bad = [f"{name}={getattr(cfg, name)!r}" for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise NotImplementedError(f"UNetModel does not support {', '.join(bad)}")


def _per_level(cfg: UNetConfig) -> tuple[int, ...]:
    """ResBlocks per level; checks the per-level lists against channel_mult as openaimodel.py asserts."""
    levels = len(cfg.channel_mult)
    counts = cfg.num_res_blocks
    counts = (counts,) * levels if isinstance(counts, int) else tuple(counts)
    lists = {"num_res_blocks": counts, "disable_self_attentions": cfg.disable_self_attentions,
             "num_attention_blocks": cfg.num_attention_blocks}
    for name, values in lists.items():
        if values is not None and len(values) != levels:
            raise ValueError(f"UNetModel {name} has {len(values)} entries, channel_mult {levels}")
    if cfg.num_attention_blocks is not None and any(a > n for a, n in zip(cfg.num_attention_blocks, counts)):
        raise ValueError(f"UNetModel num_attention_blocks {list(cfg.num_attention_blocks)} exceeds "
                         f"num_res_blocks {list(counts)}")
    return counts


class UNetModel(nn.Module):
    """openaimodel.py UNetModel for cross-attention conditioning; forward(x, timesteps, context)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        _check_supported(cfg)
        self.cfg = cfg
        self.model_channels = mc = cfg.model_channels
        levels = len(cfg.channel_mult)
        num_res_blocks = _per_level(cfg)
        time_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, time_dim, cfg.dropout, ch_out, cfg.use_checkpoint)

        def transformer(ch: int, disable_self_attn: bool) -> SpatialTransformer:
            heads, dim_head = attention_heads(cfg, ch)
            return SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim,
                                      cfg.use_linear_in_transformer, disable_self_attn, cfg.use_checkpoint)

        def has_attention(ds: int, level: int, i: int) -> bool:
            # num_attention_blocks limits the count per level but never adds attention (as the original)
            limit = cfg.num_attention_blocks
            return ds in cfg.attention_resolutions and (limit is None or i < limit[level])

        def self_attn_disabled(level: int) -> bool:
            return bool(cfg.disable_self_attentions and cfg.disable_self_attentions[level])

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for i in range(num_res_blocks[level]):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if has_attention(ds, level, i):
                    layers.append(transformer(ch, self_attn_disabled(level)))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res(ch, ch), transformer(ch, cfg.disable_middle_self_attn), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(num_res_blocks[level] + 1):
                layers = [res(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if has_attention(ds, level, i):
                    layers.append(transformer(ch, self_attn_disabled(level)))
                if level and i == num_res_blocks[level]:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x (B, in_channels, H, W); timesteps (B,) integer or float (a scalar is broadcast); context
        (B, T, context_dim). Returns (B, out_channels, H, W) in the dtype of x."""
        dtype = self.time_embed[0].weight.dtype
        t = torch.as_tensor(timesteps, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(dtype))
        if context is not None:
            context = context.to(dtype)
        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype)
