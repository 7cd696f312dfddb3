"""The latent-diffusion denoising UNet (`model.diffusion_model.*` in the original checkpoints).

Specification: ldm/modules/diffusionmodules/openaimodel.py UNetModel (with util.py timestep_embedding and
GroupNorm32) of CompVis/stable-diffusion and Stability-AI/stablediffusion, the per-level `transformer_depth`
and `label_emb` of Stability-AI/generative-models (sgm) openaimodel.py, and the control residuals of
lllyasviel/ControlNet cldm.py ControlledUnetModel. Restricted to what released models use: spatial
transformers for attention, conv resampling. Attribute paths are the checkpoint keys: `input_blocks.N.M`,
`middle_block.M`, `output_blocks.N.M`, `time_embed.{0,2}`, `label_emb.0.{0,2}`, `out.{0,2}`; parameter-free
layers (SiLU, Dropout) stay in the Sequentials so the indices line up.

`Blocks(cfg)` builds the pieces level by level; the UNet is its time/label embedding, `input_blocks` (the
encoder half), `middle_block` and `output_blocks`, and a ControlNet builds its encoder copy with the same
`Blocks` calls.

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
    # Options of openaimodel.UNetModel that no released latent-diffusion config uses: refuse them rather
    # than build a different network.
    unsupported = {
        "use_spatial_transformer": not cfg.use_spatial_transformer,
        "context_dim": cfg.context_dim is None,
        "dims": cfg.dims != 2,
        "conv_resample": not cfg.conv_resample,
        "num_classes": cfg.num_classes is not None and not isinstance(cfg.num_classes, int)
        and cfg.num_classes != "sequential",
        "adm_in_channels": cfg.num_classes == "sequential" and cfg.adm_in_channels is None,
        "n_embed": cfg.n_embed is not None,
        "use_scale_shift_norm": cfg.use_scale_shift_norm,
        "resblock_updown": cfg.resblock_updown,
        "num_heads": cfg.num_heads == -1 and cfg.num_head_channels == -1,
    }
    bad = [f"{name}={getattr(cfg, name)!r}" for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise NotImplementedError(f"UNetModel does not support {', '.join(bad)}")


def _per_level(cfg: UNetConfig, name: str) -> tuple:
    """An int option as one value per level; a list is checked against channel_mult as openaimodel.py does."""
    levels = len(cfg.channel_mult)
    values = getattr(cfg, name)
    values = (values,) * levels if isinstance(values, int) else tuple(values)
    if len(values) != levels:
        raise ValueError(f"UNetModel {name} has {len(values)} entries, channel_mult {levels}")
    return values


def _context_dims(context_dim: int | tuple[int, ...], depth: int) -> list[int]:
    """Context width of each transformer block of a SpatialTransformer of `depth` blocks, as sgm attention.py:
    one int for all; a list of `depth` widths; a list of another length only if all its widths are equal."""
    if isinstance(context_dim, int):
        return [context_dim] * depth
    dims = list(context_dim)
    if len(dims) != depth:
        if len(set(dims)) != 1:
            raise ValueError(f"context_dim {dims} neither matches transformer depth {depth} nor is homogeneous")
        dims = [dims[0]] * depth
    return dims


class Blocks:
    """Builds the UNet's layers from a UNetConfig as openaimodel.py UNetModel.__init__ does, level by level."""

    def __init__(self, cfg: UNetConfig):
        _check_supported(cfg)
        self.cfg = cfg
        self.time_dim = cfg.model_channels * 4
        self.num_res_blocks = _per_level(cfg, "num_res_blocks")
        self.depth = _per_level(cfg, "transformer_depth")  # the middle block takes the last level's depth
        for name in ("disable_self_attentions", "num_attention_blocks"):
            if getattr(cfg, name) is not None:
                _per_level(cfg, name)
        limit = cfg.num_attention_blocks
        if limit is not None and any(a > n for a, n in zip(limit, self.num_res_blocks)):
            raise ValueError(f"UNetModel num_attention_blocks {list(limit)} exceeds num_res_blocks "
                             f"{list(self.num_res_blocks)}")

    def res(self, ch_in: int, ch_out: int) -> ResBlock:
        return ResBlock(ch_in, self.time_dim, self.cfg.dropout, ch_out, self.cfg.use_checkpoint)

    def transformer(self, ch: int, depth: int, disable_self_attn: bool) -> SpatialTransformer:
        cfg = self.cfg
        heads, dim_head = attention_heads(cfg, ch)
        return SpatialTransformer(ch, heads, dim_head, depth, _context_dims(cfg.context_dim, depth),
                                  cfg.use_linear_in_transformer, disable_self_attn, cfg.use_checkpoint)

    def _attention(self, ch: int, ds: int, level: int, i: int) -> list[nn.Module]:
        # num_attention_blocks limits the count per level but never adds attention (as the original)
        cfg, limit = self.cfg, self.cfg.num_attention_blocks
        if ds not in cfg.attention_resolutions or (limit is not None and i >= limit[level]):
            return []
        disabled = bool(cfg.disable_self_attentions and cfg.disable_self_attentions[level])
        return [self.transformer(ch, self.depth[level], disabled)]

    def time_embed(self) -> nn.Sequential:
        mc = self.cfg.model_channels
        return nn.Sequential(nn.Linear(mc, self.time_dim), nn.SiLU(), nn.Linear(self.time_dim, self.time_dim))

    def label_emb(self) -> nn.Module | None:
        """Class (int num_classes: an Embedding) or vector conditioning ("sequential": SDXL's size/crop/pooled
        vector through Linear, SiLU, Linear, nested once as sgm writes it: keys label_emb.0.0 / label_emb.0.2)."""
        cfg = self.cfg
        if cfg.num_classes is None:
            return None
        if cfg.num_classes == "sequential":
            return nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, self.time_dim), nn.SiLU(),
                                               nn.Linear(self.time_dim, self.time_dim)))
        return nn.Embedding(cfg.num_classes, self.time_dim)

    def input_blocks(self, in_channels: int | None = None) -> tuple[nn.ModuleList, list[int]]:
        """The encoder half and the channel count of each of its outputs (the skips, in order)."""
        cfg, mc = self.cfg, self.cfg.model_channels
        in_channels = cfg.in_channels if in_channels is None else in_channels
        blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for i in range(self.num_res_blocks[level]):
                layers = [self.res(ch, mult * mc)]
                ch = mult * mc
                layers += self._attention(ch, ds, level, i)
                blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        return blocks, skip_channels

    def middle_block(self) -> TimestepEmbedSequential:
        ch = self.cfg.model_channels * self.cfg.channel_mult[-1]
        return TimestepEmbedSequential(self.res(ch, ch), self.transformer(ch, self.depth[-1],
                                                                          self.cfg.disable_middle_self_attn),
                                       self.res(ch, ch))

    def output_blocks(self, skip_channels: list[int]) -> nn.ModuleList:
        cfg, mc = self.cfg, self.cfg.model_channels
        skip_channels = list(skip_channels)
        ch, ds = mc * cfg.channel_mult[-1], 2 ** (len(cfg.channel_mult) - 1)
        blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(self.num_res_blocks[level] + 1):
                layers = [self.res(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                layers += self._attention(ch, ds, level, i)
                if level and i == self.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                    ds //= 2
                blocks.append(TimestepEmbedSequential(*layers))
        return blocks


class UNetModel(nn.Module):
    """openaimodel.py UNetModel; forward(x, timesteps, context, y=None, control=None)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        blocks = Blocks(cfg)
        self.cfg = cfg
        self.model_channels = mc = cfg.model_channels
        self.time_embed = blocks.time_embed()
        label_emb = blocks.label_emb()
        if label_emb is not None:  # registered only when used, so the keys equal the original's
            self.label_emb = label_emb
        self.input_blocks, skip_channels = blocks.input_blocks()
        self.middle_block = blocks.middle_block()
        self.output_blocks = blocks.output_blocks(skip_channels)
        self.out = nn.Sequential(normalization(mc * cfg.channel_mult[0]), nn.SiLU(),
                                 nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def embedding(self, timesteps: torch.Tensor | float, y: torch.Tensor | None, batch: int,
                  device: torch.device) -> torch.Tensor:
        """The embedding every ResBlock receives: time_embed of the sinusoidal timestep embedding, plus
        label_emb(y) when the model is class- or vector-conditioned (sgm openaimodel.py forward)."""
        t = torch.as_tensor(timesteps, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(self.dtype))
        if hasattr(self, "label_emb"):
            emb = emb + self.label_emb(y if not y.is_floating_point() else y.to(self.dtype))
        return emb

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, control: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, in_channels, H, W); timesteps (B,) integer or float (a scalar is broadcast); context
        (B, T, context_dim); y (B, adm_in_channels) vector or (B,) class labels, exactly when the config has
        num_classes; control: the len(input_blocks) + 1 residuals of a ControlNet (one per skip, in encoder
        order, then the middle block's; None entries add nothing), added as cldm.py ControlledUnetModel does. Returns
        (B, out_channels, H, W) in the dtype of x."""
        check_inputs(self, x, timesteps, context, y, control)
        dtype = self.dtype
        emb = self.embedding(timesteps, y, x.shape[0], x.device)
        context = None if context is None else context.to(dtype)
        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        control = None if control is None else list(control)
        if control and (residual := control.pop()) is not None:
            h = h + residual.to(dtype)
        for block in self.output_blocks:
            skip = skips.pop()
            # hs.pop() + control.pop(): the residual joins the skip, not h (None: no residual, only_mid_control)
            if control and (residual := control.pop()) is not None:
                skip = skip + residual.to(dtype)
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h).to(x.dtype)


def check_inputs(unet: UNetModel, x, timesteps, context, y, control) -> None:
    """Shapes of UNetModel.forward's arguments, each error naming its argument (instead of a failure deep
    inside torch, or a silently broadcast context)."""
    cfg = unet.cfg
    if x.ndim != 4 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"x must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
    b = x.shape[0]
    multiple = 2 ** (len(cfg.channel_mult) - 1)
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(f"x height and width must be multiples of {multiple} for this UNet, got {tuple(x.shape[2:])}")
    t = torch.as_tensor(timesteps)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != b):
        raise ValueError(f"timesteps must be a scalar or of shape ({b},), got {tuple(t.shape)}")
    if context is not None:
        if context.ndim != 3:
            raise ValueError(f"context must be (B, tokens, width), got {tuple(context.shape)}")
        if context.shape[0] != b:
            raise ValueError(f"context batch {context.shape[0]} does not match x batch {b}")
        widths = cfg.context_dim if isinstance(cfg.context_dim, tuple) else (cfg.context_dim,)
        if cfg.context_dim is not None and context.shape[2] not in widths:
            raise ValueError(f"context width {context.shape[2]} does not match the UNet's context_dim "
                             f"{cfg.context_dim}")
    if (y is None) != (cfg.num_classes is None):
        raise ValueError("y must be given exactly when the UNet is class- or vector-conditioned "
                         f"(num_classes={cfg.num_classes!r})")
    if y is not None:
        if y.shape[0] != b:
            raise ValueError(f"y batch {y.shape[0]} does not match x batch {b}")
        if cfg.num_classes == "sequential" and tuple(y.shape[1:]) != (cfg.adm_in_channels,):
            raise ValueError(f"y must be (B, {cfg.adm_in_channels}), got {tuple(y.shape)}")
    if control is not None and len(control) != len(unet.input_blocks) + 1:
        raise ValueError(f"control needs {len(unet.input_blocks) + 1} residuals, got {len(control)}")
