"""Cross-attention and the spatial transformer of the Stable Diffusion UNet.

Specification: ldm/modules/attention.py of CompVis/stable-diffusion (v1: 1x1-conv projections) and
Stability-AI/stablediffusion (v2: linear projections, attention scores upcast to float32).
Attribute paths equal the checkpoint key names (`to_out.0`, `ff.net.0.proj`, `ff.net.2`, ...).

Three interchangeable attention backends compute softmax(q k^T * scale) v:
  "sdpa"    torch.nn.functional.scaled_dot_product_attention (fused kernels; the default)
  "sliced"  the "math" form over chunks of the query dimension, bounding the score matrix's memory
  "math"    the reference form: explicit scores, upcast to float32 before the softmax as the v2 original
Choose one per model with `set_attention_backend(model, name)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

ATTENTION_BACKENDS = ("sdpa", "sliced", "math")
DEFAULT_SLICE_SIZE = 1024  # query rows per chunk for "sliced": 4096-token latents (512 px) in four chunks


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # Scores and softmax in float32 even for half inputs, as the v2 original (_ATTN_PRECISION="fp32"),
    # because q k^T overflows float16 for large activations.
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


def attention_sliced(q, k, v, scale: float, slice_size: int = DEFAULT_SLICE_SIZE) -> torch.Tensor:
    # Rows of the softmax are independent, so chunking the queries changes nothing but peak memory.
    chunks = [attention_math(q_chunk, k, v, scale) for q_chunk in q.split(slice_size, dim=-2)]
    return torch.cat(chunks, dim=-2)


def attention_sdpa(q, k, v, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class CrossAttention(nn.Module):
    """Multi-head attention of x over `context` (self-attention when context is None).

    As ldm/modules/attention.py CrossAttention: q, k, v projections without bias, output projection
    with bias followed by a Dropout so that the checkpoint key is `to_out.0`.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        self.backend = "sdpa"
        self.slice_size = DEFAULT_SLICE_SIZE
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b = x.shape[0]
        # (B, T, heads * d) -> (B, heads, T, d)
        q, k, v = (t.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if self.backend == "sdpa":
            out = attention_sdpa(q, k, v, self.scale)
        elif self.backend == "sliced":
            out = attention_sliced(q, k, v, self.scale, self.slice_size)
        else:
            out = attention_math(q, k, v, self.scale)
        # (B, heads, T, d) -> (B, T, heads * d)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head)
        return self.to_out(out)


def set_attention_backend(module: nn.Module, name: str, slice_size: int | None = None) -> nn.Module:
    """Select the attention backend of every CrossAttention inside `module`; returns `module`."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(ATTENTION_BACKENDS)}")
    if slice_size is not None and slice_size < 1:
        raise ValueError(f"slice_size must be positive, got {slice_size}")
    for m in module.modules():
        if isinstance(m, CrossAttention):
            m.backend = name
            if slice_size is not None:
                m.slice_size = slice_size
    return module


class GEGLU(nn.Module):
    """Gated GELU, arXiv:2002.05202: one projection to twice the width, value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU -> Dropout -> Linear, inner width 4 * dim; indices give the keys `net.0.proj`, `net.2`."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def checkpointed(module: nn.Module, fn, *args):
    # Gradient checkpointing only matters when a backward pass follows; at inference it is a no-op.
    if module.use_checkpoint and module.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention, GEGLU feed-forward, each with a residual.

    `disable_self_attn` (v2 option, unused by SD 1.x/2.x) makes attn1 attend to the context too.
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, context_dim: int | None = None,
                 disable_self_attn: bool = False, use_checkpoint: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.use_checkpoint = use_checkpoint
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return checkpointed(self, self._forward, x, context)

    def _forward(self, x, context):
        x = self.attn1(self.norm1(x), context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    # channels-last only when x is laid out so and not also plain contiguous (ambiguous for 1x1 maps)
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, with a residual around the whole.

    GroupNorm(32, eps 1e-6) then a projection to the inner width: a 1x1 conv before flattening (v1) or
    a Linear after flattening (v2, `use_linear`); the two are the same map with differently shaped
    weights. The original zero-initialises proj_out; irrelevant here because weights are loaded.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1,
                 context_dim: int | list[int] | None = None, use_linear: bool = False,
                 disable_self_attn: bool = False, use_checkpoint: bool = False):
        super().__init__()
        inner_dim = n_heads * d_head
        # one context width per block (sgm attention.py takes a list; an int serves every block)
        context_dims = context_dim if isinstance(context_dim, list) else [context_dim] * depth
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            # v2 writes Linear(in_channels, inner_dim) here; the shapes agree because inner == in_channels.
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, context_dims[d], disable_self_attn, use_checkpoint)
            for d in range(depth))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        # (B, C, H, W) -> (B, H*W, C)
        x = x.flatten(2).transpose(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        # (B, H*W, C) -> (B, C, H, W). That view is channels-last in memory; give it the input's layout, else
        # every later NCHW convolution copies its weight to channels-last on each call (oneDNN on CPU follows
        # the input's layout): a full-size UNet step at 256 px took 84 s instead of diffusers' 64 s.
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous(memory_format=memory_format_of(x_in))
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
