"""GeneralConditioner and its SDXL embedders, under the original attribute names (`conditioner.embedders.N.*`).

Specification: generative-models sgm/modules/encoders/modules.py (GeneralConditioner, FrozenCLIPEmbedder,
FrozenOpenCLIPEmbedder2, ConcatTimestepEmbedderND). The conditioner runs its embedders in yaml order, each on
`batch[input_key]`; an output of 3 dims joins "crossattn" (concatenated on the last dim), of 2 dims "vector"
(on dim 1), of 4 dims "concat" (on dim 1). `force_zero_embeddings` lists input keys whose embedders' outputs are
replaced by zeros (the base model's unconditional text).

- FrozenCLIPEmbedder (sgm's): ldm.models.clip_text's CLIP ViT-L/14 text model (transformers layout,
  `transformer.text_model.*`); SDXL reads `hidden_states[layer_idx]` (11: the penultimate layer, WITHOUT
  final_layer_norm) of ids padded with 49407.
- FrozenOpenCLIPEmbedder2: ldm.models.openclip_text's open_clip text tower (`model.*`, ViT-bigG-14 for SDXL) on
  open_clip.tokenize ids (padded with 0). With `legacy: False` the context is the output of the penultimate
  residual block WITHOUT ln_final (SD 2's embedder, legacy, applies ln_final), and `always_return_pooled` adds
  ln_final(last block) at the first end-of-text token (argmax of the ids) @ text_projection.
- ConcatTimestepEmbedderND: each column of a (B, D) tensor as timestep_embedding(v, outdim) ([cos, sin],
  float32), concatenated to (B, D * outdim).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ldm.config import FROZEN_CLIP_EMBEDDER, TextEncoderConfig
from ldm.config_sgm import (CONCAT_TIMESTEP, SGM_CLIP, SGM_OPENCLIP2, EmbedderConfig, SGMCLIPEmbedderConfig,
                            SGMOpenCLIPEmbedder2Config)
from ldm.models.clip_text import FrozenCLIPEmbedder as _CLIPEmbedder
from ldm.models.openclip_text import OpenCLIPTextTower
from ldm.models.tokenizer import Tokens, tokenize
from ldm.models.unet import timestep_embedding

OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat"}
KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}


class FrozenCLIPEmbedder(_CLIPEmbedder):
    """sgm's FrozenCLIPEmbedder: the v1 embedder (ldm/models/clip_text.py) on prompts, with always_return_pooled."""

    def __init__(self, cfg: SGMCLIPEmbedderConfig):
        super().__init__(TextEncoderConfig(target=FROZEN_CLIP_EMBEDDER, max_length=cfg.max_length, freeze=cfg.freeze,
                                           layer=cfg.layer, layer_idx=cfg.layer_idx, text_config=cfg.text_config))
        self.return_pooled = cfg.always_return_pooled

    def embed(self, prompts: Sequence[str]):
        ids = self.tokenize(prompts).ids.to(self.transformer.text_model.embeddings.token_embedding.weight.device)
        z = self(ids)
        if self.return_pooled:  # transformers' pooler_output: final_layer_norm of the last layer at the EOS
            return z, self.transformer(ids, "pooled")[:, 0]
        return z


class FrozenOpenCLIPEmbedder2(nn.Module):
    """sgm's FrozenOpenCLIPEmbedder2 (see the module docstring); `model` holds open_clip's text parameters."""

    LAYERS = {"last": 0, "penultimate": 1}

    def __init__(self, cfg: SGMOpenCLIPEmbedder2Config):
        super().__init__()
        self.layer, self.legacy, self.return_pooled = cfg.layer, cfg.legacy, cfg.always_return_pooled
        self.context_length = cfg.text_cfg.context_length
        self.model = OpenCLIPTextTower(cfg.text_cfg, cfg.embed_dim)
        if cfg.freeze:
            self.requires_grad_(False)

    def tokenize(self, prompts: str | Sequence[str]) -> Tokens:
        """Ids as open_clip.tokenize: padded with 0."""
        return tokenize(prompts, self.context_length, convention="open_clip")

    def forward(self, ids: torch.Tensor):
        """encode_with_transformer: {"last", "penultimate"} hidden states (the latter the input of the last
        block), then ln_final (legacy) or the pooled projection (not legacy)."""
        tower = self.model
        x = tower.token_embedding(ids) + tower.positional_embedding
        blocks = tower.transformer.resblocks
        outputs = {}
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                outputs["penultimate"] = x
            x = block(x)
        outputs["last"] = x
        if self.legacy:
            return tower.ln_final(outputs[self.layer])
        last = tower.ln_final(outputs["last"])
        # the end-of-text embedding (eot_token is the highest number in each sequence)
        pooled = last[torch.arange(last.shape[0], device=last.device), ids.argmax(dim=-1)] @ tower.text_projection
        return (outputs[self.layer], pooled) if self.return_pooled else outputs[self.layer]

    def embed(self, prompts: Sequence[str]):
        return self(self.tokenize(prompts).ids.to(self.model.token_embedding.weight.device))


class ConcatTimestepEmbedderND(nn.Module):
    """Embeds each dimension of a (B, D) tensor with timestep_embedding(v, outdim) and concatenates them."""

    def __init__(self, outdim: int):
        super().__init__()
        self.outdim = outdim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            raise ValueError(f"ConcatTimestepEmbedderND takes (B,) or (B, D) values, got {tuple(x.shape)}")
        b, dims = x.shape
        # (B, D) -> (B * D,) -> (B * D, outdim) -> (B, D * outdim)
        return timestep_embedding(x.reshape(b * dims), self.outdim).reshape(b, dims * self.outdim)


def build_embedder(cfg: EmbedderConfig) -> nn.Module:
    if cfg.target == SGM_CLIP:
        embedder = FrozenCLIPEmbedder(cfg.params)
    elif cfg.target == SGM_OPENCLIP2:
        embedder = FrozenOpenCLIPEmbedder2(cfg.params)
    elif cfg.target == CONCAT_TIMESTEP:
        embedder = ConcatTimestepEmbedderND(cfg.params.outdim)
    else:
        raise ValueError(f"unknown embedder {cfg.target!r}")
    embedder.input_key = cfg.input_key
    embedder.is_trainable = cfg.is_trainable
    if not cfg.is_trainable:  # as GeneralConditioner: frozen, eval
        embedder.requires_grad_(False)
    return embedder


class GeneralConditioner(nn.Module):
    """sgm GeneralConditioner: batch dict -> {"crossattn": (B, T, sum of widths), "vector": (B, sum of dims)}."""

    def __init__(self, embedders: Sequence[EmbedderConfig]):
        super().__init__()
        self.embedders = nn.ModuleList(build_embedder(cfg) for cfg in embedders)

    @property
    def input_keys(self) -> list[str]:
        """The batch keys the embedders read, each once, in embedder order."""
        return list(dict.fromkeys(e.input_key for e in self.embedders))

    def forward(self, batch: Mapping, force_zero_embeddings: Sequence[str] | None = None) -> dict:
        force_zero_embeddings = force_zero_embeddings or []
        missing = [key for key in self.input_keys if key not in batch]
        if missing:
            raise KeyError(f"the conditioner's batch lacks {', '.join(missing)} "
                           f"(it reads {', '.join(self.input_keys)})")
        output = {}
        for embedder in self.embedders:
            emb_out = embedder.embed(batch[embedder.input_key])
            for emb in emb_out if isinstance(emb_out, (list, tuple)) else [emb_out]:
                out_key = OUTPUT_DIM2KEYS[emb.dim()]
                if embedder.input_key in force_zero_embeddings:
                    emb = torch.zeros_like(emb)
                output[out_key] = torch.cat((output[out_key], emb), KEY2CATDIM[out_key]) if out_key in output else emb
        return output

    def tokenize(self, prompts: str | Sequence[str]) -> Tokens:
        """The first text embedder's tokens (both conventions truncate the same BPE ids alike)."""
        for embedder in self.embedders:
            if hasattr(embedder, "tokenize"):
                return embedder.tokenize(prompts)
        raise ValueError("the conditioner has no text embedder")
