"""Cross-attention maps: record softmax(q k^T * scale) of chosen attn2 layers and steps while sampling,
aggregated as DAAM (Tang et al. 2022, "What the DAAM: Interpreting Stable Diffusion Using Cross Attention"):
per token, summed over heads, upsampled (bicubic) to the image size, summed over layers and steps; only the
conditional half of the guidance batch, for every image of the batch.

    from ldm import pipeline
    from ldm.attention_maps import AttentionRecorder
    with AttentionRecorder(model, tokens=range(1, 11)) as recorder:
        images = pipeline.txt2img(model, prompts, H=512, W=512)
    maps = recorder.maps()  # (B, tokens, H, W) float32

How (ldm/hooks.py): an `observe` hook on each recorded attn2 reads the layer's inputs (the normed hidden
states and the context) and computes the probabilities again in the explicit form, in float32 as
ldm/models/attention.py attention_math, for the conditional rows only. The layer's own computation, whatever
its backend (sdpa, sliced, math), is not touched, so recording changes no image, bit for bit; the price is
a second q and k projection and an explicit (B, heads, HW, 77) score matrix per recorded layer and step.

Memory: the sum over heads, layers and steps is kept per feature-map size at that size, (B, tokens, h, w) for
each h in use (upsampling is linear, so upsampling each size's sum once at the end equals summing the
upsampled maps), and only for the requested `tokens`. The transient peak is one layer's score matrix for the
conditional half. `maps()` then builds (B, tokens, H, W).

CFG layout: CFGDenoiser runs [uncond, cond] as one batch (ldm/denoisers.py), so with `cfg=True` (guidance
scale != 1) the second half of each call's rows is recorded; with cfg=False (scale 1) every row. Guidance
run as two calls (unpairable conditionings) is not supported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ldm.hooks import BlockHooks, StepFilter, block, unet_of
from ldm.models.attention import CrossAttention


def cross_attention_layers(model) -> list[str]:
    """The original names of every cross-attention (attn2) layer of the UNet, in execution order."""
    return [name for name, m in unet_of(model).named_modules()
            if isinstance(m, CrossAttention) and name.endswith("attn2")]


def probabilities(attn: CrossAttention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) of a CrossAttention for its inputs: (B, heads, HW, T), float32."""
    b = x.shape[0]
    # (B, T, heads * d) -> (B, heads, T, d)
    q = attn.to_q(x).reshape(b, -1, attn.heads, attn.dim_head).transpose(1, 2)
    k = attn.to_k(context).reshape(b, -1, attn.heads, attn.dim_head).transpose(1, 2)
    return (torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale).softmax(dim=-1)


class AttentionRecorder:
    """Records DAAM maps of the attn2 layers `layers` (names; default all) at the steps `steps` (UNet
    evaluations of the run, ldm.hooks) for the context positions `tokens` (default all 77). `size`: the image size
    (H, W) the maps are upsampled to (default: the latent size times the VAE's downsampling factor)."""

    def __init__(self, model, *, layers: Sequence[str] | None = None, steps: StepFilter = None,
                 tokens: Sequence[int] | None = None, size: tuple[int, int] | None = None, cfg: bool = True):
        self.layers = list(cross_attention_layers(model) if layers is None else layers)
        self.tokens = None if tokens is None else torch.as_tensor(list(tokens), dtype=torch.long)
        self.size, self.cfg = size, cfg
        config = getattr(model, "config", None)
        self.factor = 2 ** (len(config.first_stage.ddconfig.ch_mult) - 1) if config is not None else None
        self.hooks = BlockHooks(model)
        for name in self.layers:
            if not isinstance(block(self.hooks.unet, name), CrossAttention):
                raise ValueError(f"{name} is not an attention layer (the cross-attention layers: "
                                 f"{', '.join(cross_attention_layers(model))})")
            self.hooks.observe(name, self._record, steps)
        self._latent = None
        self.reset()

    def reset(self) -> None:
        """Forget what was recorded, and start again at step 0 (for the next run)."""
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        self.calls = 0
        self.hooks.reset()

    def __enter__(self) -> AttentionRecorder:
        self.hooks.__enter__()
        self._latent_handle = self.hooks.unet.register_forward_pre_hook(self._latent_size)
        self.reset()
        return self

    def __exit__(self, *exc) -> None:
        self._latent_handle.remove()
        self.hooks.__exit__(*exc)

    def _latent_size(self, module, args):
        self._latent = tuple(args[0].shape[-2:])

    def _feature_size(self, tokens: int) -> tuple[int, int]:
        # the UNet halves the latent (rounding up, stride-2 convs with padding 1) at each level
        h, w = self._latent
        while h * w > tokens:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w != tokens:
            raise RuntimeError(f"cannot place {tokens} attention rows on the {self._latent} latent")
        return h, w

    def _record(self, output, call) -> None:
        x, context = call.inputs[0], call.inputs[1]
        rows = x.shape[0]
        if self.cfg:
            if rows % 2:
                raise RuntimeError(f"cfg=True expects [uncond, cond] halves, got a batch of {rows}")
            x, context = x[rows // 2:], context[rows // 2:]
        with torch.no_grad():
            probs = probabilities(call.module, x, context).sum(dim=1)  # (B, HW, T), summed over heads
            if self.tokens is not None:
                probs = probs[..., self.tokens.to(probs.device)]
            h, w = self._feature_size(probs.shape[1])
            maps = probs.transpose(1, 2).reshape(probs.shape[0], -1, h, w)  # (B, tokens, h, w)
            if (h, w) in self.sums:
                self.sums[(h, w)] += maps
            else:
                self.sums[(h, w)] = maps.clone()
        self.calls += 1

    def image_size(self) -> tuple[int, int]:
        if self.size is not None:
            return tuple(self.size)
        if self._latent is None or self.factor is None:
            raise RuntimeError("give size=(H, W): nothing recorded yet, or the model has no VAE config")
        return self._latent[0] * self.factor, self._latent[1] * self.factor

    def maps(self) -> torch.Tensor:
        """(B, tokens, H, W) float32: the recorded maps upsampled to the image size and summed."""
        if not self.sums:
            raise RuntimeError("nothing was recorded (no recorded layer ran at a recorded step)")
        size = self.image_size()
        total = None
        for maps in self.sums.values():
            up = F.interpolate(maps, size=size, mode="bicubic", align_corners=False)
            total = up if total is None else total + up
        return total.cpu()

    def held_bytes(self) -> int:
        """Bytes held between calls (the per-size sums)."""
        return sum(t.numel() * t.element_size() for t in self.sums.values())
