"""FrozenCLIPEmbedder: the SD v1 text encoder (CLIP ViT-L/14 text tower) in transformers' CLIPTextModel layout.

As CompVis ldm/modules/encoders/modules.py FrozenCLIPEmbedder, which wraps transformers' CLIPTextModel
(models/clip/modeling_clip.py: CLIPTextTransformer, CLIPEncoderLayer, CLIPAttention, CLIPMLP). Attribute paths
are the checkpoint keys under `cond_stage_model.`: `transformer.text_model.embeddings.token_embedding`,
`...encoder.layers.N.self_attn.q_proj`, `...final_layer_norm`. The checkpoint also stores
`transformer.text_model.embeddings.position_ids` (a persistent buffer in transformers of that time, equal to
arange(77)); it is not registered here (positions are arange(T) by construction, and a buffer would stay empty
in a meta-device build that loads with assign=True), the loader ignores that key by name.

A pre-LayerNorm transformer with causal self-attention (CLIP is trained as a causal text model even though SD
reads all 77 positions); the context for the UNet is the last hidden state after final_layer_norm ("last"),
or, for the original's other layers, the hidden state after `layer_idx` layers ("hidden") or the end-of-text
position ("pooled").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import CLIPTextConfig, TextEncoderConfig
from ldm.models.tokenizer import EOT, SOT, Tokens, tokenize


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # the sigmoid approximation of GELU that OpenAI's CLIP was trained with (transformers' "quick_gelu")
    return x * torch.sigmoid(1.702 * x)


def _activation(name: str):
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":  # exact erf form, transformers ACT2FN["gelu"]
        return F.gelu
    raise ValueError(f"unsupported CLIP hidden_act {name!r} (expected 'quick_gelu' or 'gelu')")


def _embedding(num: int, dim: int) -> nn.Embedding:
    # nn.Embedding's own init is normal_, which on the meta device imports torch._dynamo (seconds of CPU) to
    # fill nothing; build from an empty table instead and fill it only where there is storage (std 0.02 as
    # transformers' CLIP initialisation; a checkpoint overwrites it)
    table = torch.empty(num, dim)
    if table.device.type != "meta":
        nn.init.normal_(table, std=0.02)
    return nn.Embedding.from_pretrained(table, freeze=False)


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v projections (modeling_clip.py CLIPAttention)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_attention_heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, heads, T, d_head)
        # scale 1/sqrt(d_head) and the causal mask as transformers' CLIP (its additive mask uses finfo.min,
        # which softmax turns into the same exact zeros as is_causal)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.act = _activation(act)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.self_attn = CLIPAttention(dim, cfg.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(dim, cfg.intermediate_size, cfg.hidden_act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = _embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = _embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        # positions 0..T-1, which is what the checkpoint's position_ids buffer holds; `token_embeds`: the
        # token-embedding rows already looked up (textual inversion replaces some of them, ldm/prompts.py)
        x = self.token_embedding(ids) if token_embeds is None else token_embeds
        return x + self.position_embedding.weight[: ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    """Embeddings, encoder layers and final LayerNorm (modeling_clip.py CLIPTextTransformer)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor, layer: str = "last", layer_idx: int | None = None,
                token_embeds: torch.Tensor | None = None, clip_skip: int = 1) -> torch.Tensor:
        x = self.embeddings(ids, token_embeds)
        layers = self.encoder.layers
        if clip_skip > 1:
            # A1111's "clip skip" N (sd_hijack_clip.py encode_with_transformers): transformers'
            # hidden_states[-N], i.e. the output of the first L + 1 - N layers, THEN final_layer_norm
            if not clip_skip <= len(layers):
                raise ValueError(f"clip skip {clip_skip} exceeds the {len(layers)} layers of the text encoder")
            for block in layers[: len(layers) + 1 - clip_skip]:
                x = block(x)
            return self.final_layer_norm(x)
        if layer == "hidden":
            # transformers' hidden_states[layer_idx]: index 0 is the embedding output, i the output of layer i;
            # no final_layer_norm on these; negative indices count from the end as in that tuple of n + 1
            for block in layers[: layer_idx % (len(layers) + 1)]:
                x = block(x)
            return x
        for block in layers:
            x = block(x)
        x = self.final_layer_norm(x)
        if layer == "pooled":
            # end-of-text position: the original takes argmax of the ids (49407 is the largest id) and
            # returns (B, 1, D)
            return x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)][:, None]
        return x


class CLIPTextModel(nn.Module):
    """Holds `text_model` so attribute paths match transformers' CLIPTextModel state_dict."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, ids: torch.Tensor, layer: str = "last", layer_idx: int | None = None,
                token_embeds: torch.Tensor | None = None, clip_skip: int = 1) -> torch.Tensor:
        return self.text_model(ids, layer, layer_idx, token_embeds, clip_skip)


class FrozenCLIPEmbedder(nn.Module):
    """Prompts -> (B, 77, D) cross-attention context of SD v1 (CLIP ViT-L/14 text tower by default)."""

    LAYERS = ("last", "pooled", "hidden")

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        text_config = cfg.text_config or CLIPTextConfig()
        if cfg.layer not in self.LAYERS:
            raise ValueError(f"FrozenCLIPEmbedder layer must be one of {self.LAYERS}, got {cfg.layer!r}")
        if cfg.layer == "hidden":
            if cfg.layer_idx is None or not abs(cfg.layer_idx) <= text_config.num_hidden_layers:
                raise ValueError(f"layer 'hidden' needs |layer_idx| <= {text_config.num_hidden_layers}, "
                                 f"got {cfg.layer_idx}")
        if cfg.max_length > text_config.max_position_embeddings:
            raise ValueError(f"max_length {cfg.max_length} exceeds max_position_embeddings "
                             f"{text_config.max_position_embeddings}")
        self.layer = cfg.layer
        self.layer_idx = cfg.layer_idx
        self.max_length = cfg.max_length
        self.transformer = CLIPTextModel(text_config)
        if cfg.freeze:
            self.requires_grad_(False)

    def tokenize(self, prompts: str | Sequence[str]) -> Tokens:
        """Ids as transformers' CLIPTokenizer(truncation=True, padding="max_length"): padded with 49407."""
        return tokenize(prompts, self.max_length, convention="transformers")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(ids, self.layer, self.layer_idx)

    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        device = self.transformer.text_model.embeddings.token_embedding.weight.device
        return self(self.tokenize(prompts).ids.to(device))

    # What A1111's prompt handling needs (ldm/prompts.py): the BPE convention, the special ids, the token table
    # and an encode from looked-up token embeddings with its clip skip.
    convention, id_start, id_end, id_pad = "transformers", SOT, EOT, EOT

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.text_model.embeddings.token_embedding

    def encode_embeds(self, ids: torch.Tensor, token_embeds: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """(B, T, D) context from ids and their token-embedding rows; clip_skip N >= 2 as A1111 (then the
        final LayerNorm, whatever the config's layer); 1 = this encoder's own output."""
        if clip_skip > 1:
            return self.transformer(ids, token_embeds=token_embeds, clip_skip=clip_skip)
        return self.transformer(ids, self.layer, self.layer_idx, token_embeds)
