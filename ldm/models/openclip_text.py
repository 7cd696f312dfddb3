"""FrozenOpenCLIPEmbedder: the SD v2 text encoder (OpenCLIP ViT-H/14 text tower) under open_clip's key names.

As Stability-AI ldm/modules/encoders/modules.py FrozenOpenCLIPEmbedder, which builds an open_clip CLIP model,
deletes its vision tower and runs the text transformer itself (encode_with_transformer). Attribute paths are
the checkpoint keys under `cond_stage_model.`: `model.token_embedding`, `model.positional_embedding`,
`model.transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc,
mlp.c_proj}`, `model.ln_final`, `model.text_projection`, `model.logit_scale` (open_clip model.py CLIP and
transformer.py ResidualAttentionBlock, whose attention is torch.nn.MultiheadAttention with one packed q/k/v
input projection).

`text_projection` and `logit_scale` are parameters of the checkpoint that the cross-attention context never
uses (they serve CLIP's contrastive head). They are kept as parameters under those names so that
`state_dict()` equals the checkpoint's `cond_stage_model.*` keys and strict loading needs no ignore rule.

layer "penultimate" (the v2 yamls) runs every residual block but the last, then ln_final; "last" runs all.
Attention is causal, as open_clip's text tower (its attn_mask is -inf above the diagonal). The MLP uses exact
GELU: ViT-H-14 is not a quick_gelu model.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import OpenCLIPTextConfig, TextEncoderConfig
from ldm.models.tokenizer import EOT, SOT, Tokens, tokenize


def _normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
    # on the meta device there is nothing to fill, and normal_ there imports torch._dynamo (seconds of CPU)
    x = torch.empty(shape)
    return nn.init.normal_(x, std=std) if x.device.type != "meta" else x


class MultiheadSelfAttention(nn.Module):
    """Causal self-attention with torch.nn.MultiheadAttention's parameter layout (in_proj_*, out_proj)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        # initialised as nn.MultiheadAttention does (xavier_uniform, zero bias), for untrained builds
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # rows [0:d] of the packed projection are q, [d:2d] k, [2d:3d] v
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, d_head)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN residual block (open_clip transformer.py ResidualAttentionBlock without layer scale)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        # a Sequential with named entries, so the keys read mlp.c_fc / mlp.c_proj as in the checkpoint
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden), gelu=nn.GELU(),
                                             c_proj=nn.Linear(hidden, width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))


class OpenCLIPTextTower(nn.Module):
    """The parameters the original keeps of open_clip's CLIP after `del model.visual`."""

    def __init__(self, text_cfg: OpenCLIPTextConfig, embed_dim: int):
        super().__init__()
        width = text_cfg.width
        # initial values as open_clip's (TextTransformer.init_parameters, CLIP logit_scale), for untrained builds
        self.token_embedding = nn.Embedding.from_pretrained(_normal((text_cfg.vocab_size, width), 0.02),
                                                            freeze=False)
        self.positional_embedding = nn.Parameter(_normal((text_cfg.context_length, width), 0.01))
        self.transformer = Transformer(width, text_cfg.layers, text_cfg.heads, text_cfg.mlp_ratio)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(_normal((width, embed_dim), width ** -0.5))  # unused by encode
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))  # unused by encode

    def forward(self, ids: torch.Tensor, skip_last: int = 1, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after all but the last `skip_last` residual blocks, then ln_final (B, T, width).
        `token_embeds`: the token-embedding rows already looked up (textual inversion, ldm/prompts.py)."""
        x = (self.token_embedding(ids) if token_embeds is None else token_embeds) + self.positional_embedding
        blocks = self.transformer.resblocks
        for block in blocks[: max(len(blocks) - skip_last, 0)]:
            x = block(x)
        return self.ln_final(x)


class FrozenOpenCLIPEmbedder(nn.Module):
    """Prompts -> (B, 77, D) cross-attention context of SD v2 (OpenCLIP ViT-H/14 text tower by default)."""

    LAYERS = {"last": 0, "penultimate": 1}  # the original's layer_idx: how many final blocks to skip

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        text_cfg = cfg.text_cfg or OpenCLIPTextConfig()
        if cfg.layer not in self.LAYERS:
            raise ValueError(f"FrozenOpenCLIPEmbedder layer must be one of {tuple(self.LAYERS)}, got {cfg.layer!r}")
        self.layer = cfg.layer
        # no minimum depth: with a single block "penultimate" runs none (text_transformer_forward breaks at once)
        self.layer_idx = self.LAYERS[cfg.layer]
        # the original tokenizes with open_clip.tokenize's fixed 77 (its max_length argument is unused);
        # the positional embedding has context_length rows and is added whole, so the ids must match it
        self.context_length = text_cfg.context_length
        self.model = OpenCLIPTextTower(text_cfg, cfg.embed_dim or 1024)
        if cfg.freeze:
            self.requires_grad_(False)

    def tokenize(self, prompts: str | Sequence[str]) -> Tokens:
        """Ids as open_clip.tokenize: padded with 0."""
        return tokenize(prompts, self.context_length, convention="open_clip")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, self.layer_idx)

    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        device = self.model.token_embedding.weight.device
        return self(self.tokenize(prompts).ids.to(device))

    # What A1111's prompt handling needs (ldm/prompts.py); A1111 pads with 0 after the first end-of-text
    # (sd_hijack_open_clip.py id_pad) and ignores clip skip for this encoder (its encode_with_transformers
    # leaves layer_idx as the config has it), so there is none here.
    convention, id_start, id_end, id_pad = "open_clip", SOT, EOT, 0

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    def encode_embeds(self, ids: torch.Tensor, token_embeds: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        if clip_skip != 1:
            raise ValueError("clip skip applies to the SD v1 CLIP text encoder only (A1111 ignores it for SD 2)")
        return self.model(ids, self.layer_idx, token_embeds)
