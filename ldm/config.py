"""Frozen dataclasses read from the ORIGINAL Stable Diffusion yaml files.

The yaml layout is the one of CompVis/stable-diffusion and Stability-AI/stablediffusion
(configs/stable-diffusion/*.yaml): `model: {base_learning_rate, target, params: {...,
unet_config, first_stage_config, cond_stage_config}}`. Field names are the original parameter
names (openaimodel.UNetModel, diffusionmodules/model.py Encoder/Decoder, autoencoder.AutoencoderKL,
encoders/modules.py, ddpm.DDPM/LatentDiffusion/LatentFinetuneDiffusion/LatentInpaintDiffusion), so a
yaml that the original accepts parses here, and a misspelled key fails loudly instead of being eaten
by `**ignore_kwargs` (the reading machinery: ldm/config_reader.py). `target:` strings only select a component
type; nothing is imported from them.

Two extensions (so tiny test models exist): `cond_stage_config.params.text_config` (transformers
CLIPTextConfig field names) and `cond_stage_config.params.embed_dim` + `text_cfg` (open_clip
CLIPTextCfg field names). When absent they resolve to CLIP ViT-L/14 (v1) and OpenCLIP ViT-H/14 (v2).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ldm.config_checks import check_ranges
from ldm.config_reader import ConfigError, build, convert, read_yaml

LATENT_DIFFUSION = "ldm.models.diffusion.ddpm.LatentDiffusion"
LATENT_INPAINT_DIFFUSION = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
UNET_MODEL = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
AUTOENCODER_KL = "ldm.models.autoencoder.AutoencoderKL"
FROZEN_CLIP_EMBEDDER = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
FROZEN_OPENCLIP_EMBEDDER = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
CONTROL_LDM = "cldm.cldm.ControlLDM"  # lllyasviel/ControlNet: read by ldm/config_controlnet.py


@dataclass(frozen=True)
class UNetConfig:
    """openaimodel.UNetModel arguments (Stability-AI/stablediffusion superset of CompVis)."""

    image_size: int  # unused by the network ("# unused" in the original yamls)
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int | tuple[int, ...]  # a list gives one count per level (Stability-AI openaimodel.py)
    attention_resolutions: tuple[int, ...]
    dropout: float = 0.0
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    num_classes: int | str | None = None  # an int: class labels; "sequential": a vector y (sgm, SDXL)
    use_checkpoint: bool = False
    use_fp16: bool = False
    use_bf16: bool = False
    num_heads: int = -1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int | tuple[int, ...] = 1  # a list: one depth per level, the middle block the last's (sgm)
    context_dim: int | tuple[int, ...] | None = None  # a list: one width per transformer block (sgm)
    n_embed: int | None = None
    legacy: bool = True
    disable_self_attentions: tuple[bool, ...] | None = None
    num_attention_blocks: tuple[int, ...] | None = None
    disable_middle_self_attn: bool = False
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None


@dataclass(frozen=True)
class DDConfig:
    """diffusionmodules/model.py Encoder/Decoder arguments (`ddconfig` in the yaml)."""

    ch: int
    out_ch: int
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    in_channels: int
    resolution: int
    z_channels: int
    ch_mult: tuple[int, ...] = (1, 2, 4, 8)
    dropout: float = 0.0
    resamp_with_conv: bool = True
    double_z: bool = True
    use_linear_attn: bool = False
    attn_type: str = "vanilla"
    give_pre_end: bool = False
    tanh_out: bool = False


@dataclass(frozen=True)
class TargetConfig:
    """A training-only section (lossconfig, scheduler_config): kept verbatim, never built."""

    target: str
    params: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class AutoencoderConfig:
    """autoencoder.AutoencoderKL arguments."""

    ddconfig: DDConfig
    embed_dim: int
    lossconfig: TargetConfig | None = None
    ckpt_path: str | None = None
    ignore_keys: tuple[str, ...] = ()
    image_key: str = "image"
    colorize_nlabels: int | None = None
    monitor: str | None = None
    ema_decay: float | None = None
    learn_logvar: bool = False


@dataclass(frozen=True)
class CLIPTextConfig:
    """transformers CLIPTextConfig field names; defaults are CLIP ViT-L/14 (SD v1 text encoder)."""

    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """open_clip CLIPTextCfg field names; defaults are OpenCLIP ViT-H/14 (SD v2 text encoder)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 1024
    heads: int = 16
    layers: int = 24
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class TextEncoderConfig:
    """encoders/modules.py FrozenCLIPEmbedder / FrozenOpenCLIPEmbedder arguments plus the size extensions.

    After `load_config`, `text_config` is set for FrozenCLIPEmbedder and `embed_dim` + `text_cfg` are set
    for FrozenOpenCLIPEmbedder (defaults filled in); the other target's fields are None.
    """

    target: str
    version: str | None = None  # a download name in the original; we never download
    arch: str | None = None  # FrozenOpenCLIPEmbedder only ("ViT-H-14")
    device: str | None = None  # ignored: placement is build_model's argument
    max_length: int = 77
    freeze: bool = True
    layer: str = "last"
    layer_idx: int | None = None  # FrozenCLIPEmbedder layer="hidden" only
    text_config: CLIPTextConfig | None = None
    embed_dim: int | None = None
    text_cfg: OpenCLIPTextConfig | None = None

    @property
    def is_openclip(self) -> bool:
        return self.target == FROZEN_OPENCLIP_EMBEDDER


@dataclass(frozen=True)
class LatentDiffusionConfig:
    """ddpm.DDPM + LatentDiffusion (+ LatentFinetuneDiffusion/LatentInpaintDiffusion) arguments.

    `unet`, `first_stage`, `cond_stage` are read from `unet_config`, `first_stage_config`,
    `cond_stage_config`; `target` and `base_learning_rate` from the `model:` section.
    """

    target: str
    unet: UNetConfig
    first_stage: AutoencoderConfig
    cond_stage: TextEncoderConfig
    base_learning_rate: float | None = None
    # ddpm.DDPM
    timesteps: int = 1000
    beta_schedule: str = "linear"
    loss_type: str = "l2"
    ckpt_path: str | None = None
    ignore_keys: tuple[str, ...] = ()
    load_only_unet: bool = False
    monitor: str | None = "val/loss"
    use_ema: bool = True
    first_stage_key: str = "image"
    image_size: int = 256
    channels: int = 3
    log_every_t: int = 100
    clip_denoised: bool = True
    linear_start: float = 1e-4
    linear_end: float = 2e-2
    cosine_s: float = 8e-3
    given_betas: tuple[float, ...] | None = None
    original_elbo_weight: float = 0.0
    v_posterior: float = 0.0
    l_simple_weight: float = 1.0
    conditioning_key: str | None = None
    parameterization: str = "eps"
    scheduler_config: TargetConfig | None = None
    use_positional_encodings: bool = False
    learn_logvar: bool = False
    logvar_init: float = 0.0
    make_it_fit: bool = False
    ucg_training: dict | None = field(default=None, hash=False)
    reset_ema: bool = False
    reset_num_ema_updates: bool = False
    # ddpm.LatentDiffusion
    num_timesteps_cond: int | None = None
    cond_stage_key: str = "image"
    cond_stage_trainable: bool = False
    concat_mode: bool = True
    cond_stage_forward: str | None = None
    scale_factor: float = 1.0
    scale_by_std: bool = False
    force_null_conditioning: bool = False
    # ddpm.LatentFinetuneDiffusion / LatentInpaintDiffusion (training-only; accepted for that target)
    concat_keys: tuple[str, ...] = ("mask", "masked_image")
    finetune_keys: tuple[str, ...] | None = None
    keep_finetune_dims: int = 4
    c_concat_log_start: int | None = None
    c_concat_log_end: int | None = None
    masked_image_key: str = "masked_image"


_INPAINT_ONLY = ("concat_keys", "finetune_keys", "keep_finetune_dims", "c_concat_log_start",
                 "c_concat_log_end", "masked_image_key")
_COMPONENTS = {  # yaml section -> (dataclass field, dataclass, accepted targets)
    "unet_config": ("unet", UNetConfig, (UNET_MODEL,)),
    "first_stage_config": ("first_stage", AutoencoderConfig, (AUTOENCODER_KL,)),
    "cond_stage_config": ("cond_stage", TextEncoderConfig, (FROZEN_CLIP_EMBEDDER, FROZEN_OPENCLIP_EMBEDDER)),
}


def _component(section: str, data: Any, where: str, src: str, targets: tuple[str, ...] | None = None) -> Any:
    name, cls, default_targets = _COMPONENTS[section]
    targets = targets or default_targets
    if not isinstance(data, Mapping):
        raise ConfigError(f"{src}: {where} must be a mapping with 'target' and 'params', got {data!r}")
    for key in data:
        if key not in ("target", "params"):
            raise ConfigError(f"{src}: unknown field {where}.{key!r} (expected 'target' and 'params')")
    target = data.get("target")
    if target not in targets:
        raise ConfigError(f"{src}: unknown target {where}.target={target!r} (supported: {', '.join(targets)})")
    params = data.get("params") or {}
    if cls is TextEncoderConfig:
        return _text_encoder(params, target, f"{where}.params", src)
    return build(cls, params, f"{where}.params", src)


def _text_encoder(params: Any, target: str, where: str, src: str) -> TextEncoderConfig:
    cfg = build(TextEncoderConfig, params, where, src, target=target)
    if cfg.is_openclip:
        wrong, layers = ("text_config", "layer_idx"), ("last", "penultimate")
        resolved = dict(embed_dim=cfg.embed_dim or 1024, text_cfg=cfg.text_cfg or OpenCLIPTextConfig())
    else:
        wrong, layers = ("arch", "embed_dim", "text_cfg"), ("last", "pooled", "hidden")
        resolved = dict(text_config=cfg.text_config or CLIPTextConfig())
    for name in wrong:
        if getattr(cfg, name) is not None:
            raise ConfigError(f"{src}: field {where}.{name} is not accepted by target {target}")
    if cfg.layer not in layers:
        raise ConfigError(f"{src}: {where}.layer={cfg.layer!r} must be one of {layers} for {target}")
    if cfg.layer == "hidden" and cfg.layer_idx is None:
        raise ConfigError(f"{src}: {where}.layer='hidden' needs {where}.layer_idx")
    return dataclasses.replace(cfg, **resolved)


def parse_config(data: Any, src: str = "<config>"):
    """Read the contents of an original yaml (as plain Python data) into a LatentDiffusionConfig (a
    ControlLDMConfig for lllyasviel/ControlNet's `cldm.cldm.ControlLDM`, ldm/config_controlnet.py; for an sgm
    yaml, model.target sgm.models.diffusion.DiffusionEngine, a config_sgm.DiffusionEngineConfig).

    Other top-level sections (`data`, `lightning` of training yamls and of the released
    v2-inpainting-inference.yaml) are ignored, as the original scripts read only `config.model`.
    """
    if not isinstance(data, Mapping) or "model" not in data:
        found = sorted(data) if isinstance(data, Mapping) else data
        raise ConfigError(f"{src}: expected a top-level section 'model', got {found!r}")
    model = data["model"]
    if not isinstance(model, Mapping):
        raise ConfigError(f"{src}: model must be a mapping, got {model!r}")
    for key in model:
        if key not in ("base_learning_rate", "target", "params"):
            raise ConfigError(f"{src}: unknown field model.{key!r} (expected base_learning_rate, target, params)")
    target = model.get("target")
    from ldm.config_sgm import DIFFUSION_ENGINE, parse_sgm  # generative-models (SDXL): ldm/config_sgm.py

    if target == DIFFUSION_ENGINE:
        return parse_sgm(model, src)
    if target == CONTROL_LDM:
        from ldm.config_controlnet import parse_control_ldm

        return parse_control_ldm(model, src)
    if target not in (LATENT_DIFFUSION, LATENT_INPAINT_DIFFUSION):
        raise ConfigError(f"{src}: unknown target model.target={target!r} (supported: {LATENT_DIFFUSION}, "
                          f"{LATENT_INPAINT_DIFFUSION}, {CONTROL_LDM}, {DIFFUSION_ENGINE})")
    return parse_model(model, src)


def parse_model(model: Mapping, src: str, cls: type = LatentDiffusionConfig,
                unet_targets: tuple[str, ...] = (UNET_MODEL,), **given: Any) -> LatentDiffusionConfig:
    """The `model:` section (target already checked) read into `cls` (LatentDiffusionConfig or a subclass,
    whose own fields come in `given` or from the params), its UNet's target one of `unet_targets`."""
    target = model["target"]
    params = dict(model.get("params") or {})
    for key in ("target", "base_learning_rate") + tuple(n for n, _, _ in _COMPONENTS.values()) + tuple(given):
        if key in params:
            raise ConfigError(f"{src}: unknown field model.params.{key!r}")
    components = {}
    for section, (name, _, _) in _COMPONENTS.items():
        if section not in params:
            raise ConfigError(f"{src}: missing required field model.params.{section}")
        targets = unet_targets if section == "unet_config" else None
        components[name] = _component(section, params.pop(section), f"model.params.{section}", src, targets)
    if target != LATENT_INPAINT_DIFFUSION:
        for key in _INPAINT_ONLY:
            if key in params:
                raise ConfigError(f"{src}: field model.params.{key} is only accepted by {LATENT_INPAINT_DIFFUSION}")
    lr = convert(float | None, model.get("base_learning_rate"), "model.base_learning_rate", src)
    cfg = build(cls, params, "model.params", src, target=target, base_learning_rate=lr, **components, **given)
    _check_supported(cfg, src)
    check_ranges(cfg, src)  # values the original divides by or allocates with (ldm/config_checks.py)
    return cfg


def _check_supported(cfg: LatentDiffusionConfig, src: str) -> None:
    """Values the original accepts but this reimplementation does not: fail instead of silently differing."""
    checks = [
        # the four of diffusionmodules/util.py make_beta_schedule (ldm/schedules.py builds them all)
        ("beta_schedule", cfg.beta_schedule in ("linear", "cosine", "sqrt_linear", "sqrt")),
        ("given_betas", cfg.given_betas is None),  # the original's `1. - betas` fails on a yaml list too
        ("parameterization", cfg.parameterization in ("eps", "v")),
        ("conditioning_key", cfg.conditioning_key in ("crossattn", "hybrid")),
        ("scale_by_std", not cfg.scale_by_std),
    ]
    for name, ok in checks:
        if not ok:
            raise ConfigError(f"{src}: unsupported value model.params.{name}={getattr(cfg, name)!r}")
    if cfg.unet.num_heads == -1 and cfg.unet.num_head_channels == -1:
        raise ConfigError(f"{src}: model.params.unet_config.params needs num_heads or num_head_channels")


def load_config(path: str | os.PathLike):
    """Read an original Stable Diffusion (CompVis / Stability) or SDXL (sgm) inference yaml, as omegaconf reads
    it (incl. `1e-4` floats): a LatentDiffusionConfig or a config_sgm.DiffusionEngineConfig."""
    return parse_config(read_yaml(path), os.fspath(path))
