"""ControlNet (Zhang, Rao & Agrawala 2023) as lllyasviel/ControlNet cldm/cldm.py writes it, under its key names.

- `ControlNet` (`control_model.*` in the original checkpoints): a trainable copy of the UNet's encoder half
  (`time_embed`, `input_blocks`, `middle_block`, built by the same ldm.models.unet.Blocks), the hint encoder
  `input_hint_block` (eight 3x3 convs with FIXED widths 16, 16, 32, 32, 96, 96, 256 and then model_channels,
  three of them with stride 2, so the hint is 8x the latent), one 1x1 `zero_convs.i` per encoder output and
  `middle_block_out`. The encoded hint is added ONCE, to the output of input_blocks[0]. Returns
  len(input_blocks) + 1 residuals (13 for SD).
- `Control`: one ControlNet's entry of a conditioning dict (`cond["control"] = [Control, ...]`): the network,
  its hint and its `control_scales`. `model.apply_model` (ldm/models/latent_diffusion.py) turns the entries into
  residuals with `residuals`: each net sees the same x_t, t and context as the UNet call, its outputs are
  multiplied by its scales (ControlLDM.apply_model), and several ControlNets' scaled residuals are SUMMED (the
  original has one ControlNet; the sum is the convention of sd-webui-controlnet, ComfyUI and diffusers'
  MultiControlNetModel).
- `ControlLDM`: a LatentDiffusion with `control_model`, `control_scales`, `only_mid_control` and
  `global_average_pooling` (v1.1 nightly), whose apply_model also takes the original's conditioning dicts
  (`c_concat` = the hint of its own ControlNet, None for none).

Strength and guess mode (the gradio_*2image.py demos): control_scales = [s] * 13, or in guess mode
s * 0.825 ** (12 - i) with NO control on the unconditional branch (`control_scales`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ldm.config_controlnet import ControlLDMConfig, ControlNetConfig
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.models.unet import Blocks, TimestepEmbedSequential, UNetModel

HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)  # cldm.py input_hint_block; not derived from model_channels
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2, 1)  # of its eight convs: three halvings, the hint is 8x the latent
GUESS_DECAY = 0.825  # the demos' "magic number" (0.825 ** 12 < 0.01 < 0.826 ** 12)
NUM_SCALES = 13  # ControlLDM.control_scales has 13 entries (SD's 12 skips and the middle block)


def control_scales(strength: float = 1.0, guess_mode: bool = False) -> tuple[float, ...]:
    """control_scales of the demos: [strength] * 13, or strength * 0.825 ** (12 - i) in guess mode (the
    deepest residuals strongest). For a net with fewer residuals the first ones are used, as cldm.py's zip."""
    if guess_mode:
        return tuple(strength * (GUESS_DECAY ** float(12 - i)) for i in range(NUM_SCALES))
    return (strength,) * NUM_SCALES


def _zero_conv(channels: int) -> TimestepEmbedSequential:
    """cldm.py make_zero_conv: a 1x1 conv initialised to zero, so a new ControlNet starts as a no-op."""
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return TimestepEmbedSequential(conv)


def _hint_block(hint_channels: int, model_channels: int) -> TimestepEmbedSequential:
    widths = (hint_channels, *HINT_WIDTHS, model_channels)
    layers = []
    for i, stride in enumerate(HINT_STRIDES):
        layers.append(nn.Conv2d(widths[i], widths[i + 1], 3, stride=stride, padding=1))
        if i < len(HINT_STRIDES) - 1:
            layers.append(nn.SiLU())
    nn.init.zeros_(layers[-1].weight)  # zero_module, as the zero convs
    nn.init.zeros_(layers[-1].bias)
    return TimestepEmbedSequential(*layers)  # keys input_hint_block.{0,2,...,14}: SiLUs hold the odd indices


class ControlNet(nn.Module):
    """cldm.py ControlNet; forward(x, hint, timesteps, context) -> the residuals, encoder order then middle.

    `only_mid_control` and `global_average_pooling` are the ControlLDM options of the yaml it was trained with
    (they decide how its residuals enter the UNet); they are kept with the network, since a ControlNet file
    loaded onto another Stable Diffusion checkpoint brings them along."""

    embedding = UNetModel.embedding  # the UNet's timestep embedding (time_embed of the sinusoids; no label_emb)

    def __init__(self, cfg: ControlNetConfig, only_mid_control: bool = False, global_average_pooling: bool = False):
        super().__init__()
        unet_cfg = cfg.encoder()
        blocks = Blocks(unet_cfg)
        self.cfg = cfg
        self.model_channels = cfg.model_channels
        self.only_mid_control, self.global_average_pooling = only_mid_control, global_average_pooling
        self.time_embed = blocks.time_embed()
        self.input_blocks, skip_channels = blocks.input_blocks()
        self.zero_convs = nn.ModuleList(_zero_conv(ch) for ch in skip_channels)
        self.input_hint_block = _hint_block(cfg.hint_channels, cfg.model_channels)
        self.middle_block = blocks.middle_block()
        self.middle_block_out = _zero_conv(cfg.model_channels * cfg.channel_mult[-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor | float,
                context: torch.Tensor | None) -> list[torch.Tensor]:
        """x (B, in_channels, h, w) the UNet's input; hint (1 or B, hint_channels, 8h, 8w), in [0, 1] for the
        released models; timesteps and context as the UNet's. Residuals in the parameters' dtype."""
        b, _, h, w = x.shape
        if hint.ndim != 4 or hint.shape[1] != self.cfg.hint_channels or hint.shape[0] not in (1, b):
            raise ValueError(f"hint must be (1 or {b}, {self.cfg.hint_channels}, H, W), got {tuple(hint.shape)}")
        if tuple(hint.shape[2:]) != (8 * h, 8 * w):
            raise ValueError(f"hint is {hint.shape[3]}x{hint.shape[2]} (WxH), the ControlNet needs 8x the latent "
                             f"{w}x{h}: {8 * w}x{8 * h}")
        dtype = self.dtype
        emb = self.embedding(timesteps, None, b, x.device)
        context = None if context is None else context.to(dtype)
        guided_hint = self.input_hint_block(hint.to(dtype).expand(b, -1, -1, -1), emb, context)
        outs = []
        h = x.to(dtype)
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided_hint
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs


@dataclass(frozen=True, eq=False)
class Control:
    """One ControlNet in a conditioning: `cond["control"] = [Control(net, hint, scales), ...]`.

    hint: (1 or B, hint_channels, H, W) with H, W the image size (8x the latent); the released models take RGB
    in [0, 1] (uint8 / 255), the same hint for every sample. scales: control_scales, one per residual
    (`control_scales(strength, guess_mode)`)."""

    net: ControlNet
    hint: torch.Tensor
    scales: Sequence[float] = control_scales()


def is_controls(value) -> bool:
    """Whether a conditioning's `control` entry holds ControlNets (else: ready residuals)."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, Control) for v in value)


def residuals(controls: Sequence[Control], x: torch.Tensor, timesteps, context) -> list[torch.Tensor | None]:
    """The UNet's `control` argument for ControlNets `controls` at (x, t, context): each net's outputs times its
    scales (ControlLDM.apply_model; then averaged over space for global_average_pooling, as the v1.1
    nightly), summed over the nets. A net with only_mid_control contributes its middle residual only (None
    elsewhere: ControlledUnetModel adds nothing to the skips)."""
    total = None
    for control in controls:
        outs = control.net(x, control.hint, timesteps, context)
        if len(control.scales) < len(outs):
            raise ValueError(f"a ControlNet with {len(outs)} residuals needs as many scales, got "
                             f"{len(control.scales)}")
        outs = [out * scale for out, scale in zip(outs, control.scales)]
        if control.net.global_average_pooling:
            outs = [torch.mean(out, dim=(2, 3), keepdim=True) for out in outs]
        if control.net.only_mid_control:
            outs = [None] * (len(outs) - 1) + outs[-1:]
        total = outs if total is None else [_add(a, b) for a, b in zip(total, outs)]
    return total


def _add(a, b):
    return b if a is None else a if b is None else a + b


class ControlLDM(LatentDiffusion):
    """cldm.py ControlLDM: LatentDiffusion + `control_model`; state_dict keys are the original's."""

    def __init__(self, cfg: ControlLDMConfig):
        super().__init__(cfg)
        self.control_model = ControlNet(cfg.control_stage, cfg.only_mid_control, cfg.global_average_pooling)
        self.control_key = cfg.control_key
        self.control_scales = list(control_scales())  # as the original: set it to change the strength

    # the original's ControlLDM attributes, kept on the ControlNet (they go wherever it goes)
    only_mid_control = property(lambda self: self.control_model.only_mid_control,
                                lambda self, value: setattr(self.control_model, "only_mid_control", value))
    global_average_pooling = property(lambda self: self.control_model.global_average_pooling,
                                      lambda self, v: setattr(self.control_model, "global_average_pooling", v))

    def networks(self) -> dict[str, nn.Module]:
        return {**super().networks(), "control": self.control_model}

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond=None, **more) -> torch.Tensor:
        """As LatentDiffusion.apply_model; the original ControlLDM's dicts are read too: `c_concat` is the hint
        of `control_model` (a list is concatenated along channels), scaled by `control_scales`; None runs the
        UNet without control (the demos' unconditional branch in guess mode)."""
        if isinstance(cond, Mapping) and "c_concat" in cond:
            cond = dict(cond)
            hint = cond.pop("c_concat")
            if hint is not None:
                hint = torch.cat(list(hint), dim=1) if isinstance(hint, (list, tuple)) else hint
                own = Control(self.control_model, hint, tuple(self.control_scales))
                more_controls = cond.get("control") or []
                if more_controls and not is_controls(more_controls):
                    raise ValueError("c_concat (a hint) and ready control residuals cannot be combined")
                cond["control"] = [own, *more_controls]
        return super().apply_model(x, t, cond, **more)


def make_controls(nets: Sequence[ControlNet], hints: Sequence[torch.Tensor], strengths: Sequence[float],
                  guess_mode: bool = False) -> list[Control]:
    """Control entries for ControlNets with their hints and strengths, the scales as the demos set them."""
    if not len(nets) == len(hints) == len(strengths):
        raise ValueError(f"{len(nets)} ControlNets, {len(hints)} hints and {len(strengths)} strengths")
    return [Control(net, hint, control_scales(strength, guess_mode))
            for net, hint, strength in zip(nets, hints, strengths)]
