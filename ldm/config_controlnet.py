"""lllyasviel/ControlNet's yaml files (models/cldm_v15.yaml, cldm_v21.yaml and ControlNet-v1-1-nightly's
models/control_v11*.yaml, copied in configs/controlnet/) read into frozen dataclasses, as strictly as the
Stable Diffusion yamls (ldm/config.py).

A ControlLDM yaml is a LatentDiffusion yaml (`model.target: cldm.cldm.ControlLDM`, whose UNet is
`cldm.cldm.ControlledUnetModel`, an openaimodel UNetModel that adds control residuals) plus the ControlLDM
arguments of cldm/cldm.py: `control_stage_config` (a `cldm.cldm.ControlNet`), `control_key`,
`only_mid_control` and, in the v1.1 nightly only, `global_average_pooling` (the shuffle model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ldm.config import CONTROL_LDM, LatentDiffusionConfig, UNetConfig, parse_model
from ldm.config_reader import ConfigError, build

CONTROL_NET = "cldm.cldm.ControlNet"
CONTROLLED_UNET = "cldm.cldm.ControlledUnetModel"
CONTROL_LDM_FIELDS = ("control_stage_config", "control_key", "only_mid_control", "global_average_pooling")


@dataclass(frozen=True)
class ControlNetConfig:
    """cldm.cldm.ControlNet arguments: an openaimodel UNetModel's encoder arguments plus `hint_channels`.

    Unlike UNetModel there is no out_channels, num_classes or use_bf16, and transformer_depth is one int
    (ControlNet passes it to every SpatialTransformer as it is)."""

    image_size: int  # unused by the network
    in_channels: int
    model_channels: int
    hint_channels: int
    num_res_blocks: int | tuple[int, ...]
    attention_resolutions: tuple[int, ...]
    dropout: float = 0.0
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = -1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | tuple[int, ...] | None = None
    n_embed: int | None = None
    legacy: bool = True
    disable_self_attentions: tuple[bool, ...] | None = None
    num_attention_blocks: tuple[int, ...] | None = None
    disable_middle_self_attn: bool = False
    use_linear_in_transformer: bool = False

    def encoder(self) -> UNetConfig:
        """The UNetConfig whose encoder half (time_embed, input_blocks, middle_block) this ControlNet copies:
        cldm.py builds them with the same code as openaimodel.py UNetModel (ldm.models.unet.Blocks)."""
        fields = {name: value for name, value in vars(self).items() if name != "hint_channels"}
        return UNetConfig(out_channels=self.in_channels, **fields)


@dataclass(frozen=True, kw_only=True)
class ControlLDMConfig(LatentDiffusionConfig):
    """cldm.cldm.ControlLDM: a LatentDiffusion (every LatentDiffusionConfig field) plus its ControlNet."""

    control_stage: ControlNetConfig
    control_key: str
    only_mid_control: bool
    global_average_pooling: bool = False  # ControlNet-v1-1-nightly cldm.py only


def parse_control_ldm(model: Mapping, src: str) -> ControlLDMConfig:
    """The `model:` section of a ControlLDM yaml (model.target already checked to be cldm.cldm.ControlLDM)."""
    params = dict(model.get("params") or {})
    if "control_stage_config" not in params:
        raise ConfigError(f"{src}: missing required field model.params.control_stage_config")
    control = _control_stage(params.pop("control_stage_config"), "model.params.control_stage_config", src)
    cfg = parse_model({**model, "params": params}, src, cls=ControlLDMConfig, unet_targets=(CONTROLLED_UNET,),
                      control_stage=control)
    if cfg.conditioning_key != "crossattn":
        # ControlLDM.apply_model reads c_concat as the hint and gives the UNet only the text context
        raise ConfigError(f"{src}: {CONTROL_LDM} needs model.params.conditioning_key crossattn, "
                          f"got {cfg.conditioning_key!r}")
    mismatch = encoder_mismatch(cfg.control_stage, cfg.unet)
    if mismatch:
        raise ConfigError(f"{src}: model.params.control_stage_config.params.{mismatch} of unet_config")
    return cfg


def encoder_mismatch(net: ControlNetConfig, unet: UNetConfig) -> str | None:
    """Why a ControlNet's residuals cannot be added to this UNet's skips (None when they can): the two
    encoders must have the same inputs, widths and block counts, and see the same context."""
    for name in ("in_channels", "model_channels", "channel_mult", "num_res_blocks", "context_dim"):
        if getattr(unet, name) != getattr(net, name):
            return f"{name}={getattr(net, name)!r} differs from the UNet's {getattr(unet, name)!r}"
    return None


def _control_stage(data: Any, where: str, src: str) -> ControlNetConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{src}: {where} must be a mapping with 'target' and 'params', got {data!r}")
    for key in data:
        if key not in ("target", "params"):
            raise ConfigError(f"{src}: unknown field {where}.{key!r} (expected 'target' and 'params')")
    if data.get("target") != CONTROL_NET:
        raise ConfigError(f"{src}: unknown target {where}.target={data.get('target')!r} (supported: {CONTROL_NET})")
    return build(ControlNetConfig, data.get("params") or {}, f"{where}.params", src)

