"""Frozen dataclasses read from the ORIGINAL generative-models (sgm) yaml files: SDXL base and refiner.

The layout is Stability-AI/generative-models configs/inference/sd_xl_{base,refiner}.yaml: `model: {target:
sgm.models.diffusion.DiffusionEngine, params: {network_config, denoiser_config, first_stage_config,
conditioner_config, ...}}`. Field names are the original parameter names (sgm/models/diffusion.py DiffusionEngine,
sgm/modules/diffusionmodules/openaimodel.py UNetModel, denoiser.py DiscreteDenoiser, discretizer.py
LegacyDDPMDiscretization, sgm/models/autoencoder.py AutoencoderKL and its bases, sgm/modules/encoders/modules.py
GeneralConditioner and its embedders), read strictly by ldm/config_reader.py: a yaml the original accepts parses,
a misspelled key fails. `ldm.config.load_config` dispatches here on `model.target`.

Two extensions, as for v1/v2 (so tiny test models exist): FrozenCLIPEmbedder `params.text_config` (transformers
CLIPTextConfig fields) and FrozenOpenCLIPEmbedder2 `params.embed_dim` + `text_cfg` (open_clip CLIPTextCfg
fields). Absent, they resolve to CLIP ViT-L/14 and to the `arch` (ViT-bigG-14 or ViT-H-14) sizes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ldm.config import AutoencoderConfig, CLIPTextConfig, DDConfig, OpenCLIPTextConfig, TargetConfig, UNetConfig
from ldm.config_reader import ConfigError, build, convert

DIFFUSION_ENGINE = "sgm.models.diffusion.DiffusionEngine"
SGM_UNET = "sgm.modules.diffusionmodules.openaimodel.UNetModel"
SGM_AUTOENCODER_KL = "sgm.models.autoencoder.AutoencoderKL"
DISCRETE_DENOISER = "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser"
EPS_SCALING = "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"
LEGACY_DDPM = "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"
GENERAL_CONDITIONER = ("sgm.modules.GeneralConditioner", "sgm.modules.encoders.modules.GeneralConditioner")
SGM_CLIP = "sgm.modules.encoders.modules.FrozenCLIPEmbedder"
SGM_OPENCLIP2 = "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2"
CONCAT_TIMESTEP = "sgm.modules.encoders.modules.ConcatTimestepEmbedderND"
OPENAI_WRAPPER = "sgm.modules.diffusionmodules.wrappers.OpenAIWrapper"

# open_clip's model configs (model_configs/<arch>.json, text_cfg and embed_dim) for the arches SDXL names
OPENCLIP_ARCHES = {
    "ViT-H-14": (1024, OpenCLIPTextConfig()),
    "ViT-bigG-14": (1280, OpenCLIPTextConfig(width=1280, heads=20, layers=32)),
}


@dataclass(frozen=True)
class SGMUNetConfig:
    """sgm openaimodel.py UNetModel arguments. Unlike the CompVis / Stability UNet it has no `legacy` flag (heads
    are computed as legacy=False), no `use_spatial_transformer` (always), no `image_size`."""

    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int | tuple[int, ...]
    attention_resolutions: tuple[int, ...]
    dropout: float = 0.0
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    num_classes: int | str | None = None
    use_checkpoint: bool = False
    num_heads: int = -1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    transformer_depth: int | tuple[int, ...] = 1
    context_dim: int | tuple[int, ...] | None = None
    disable_self_attentions: tuple[bool, ...] | None = None
    num_attention_blocks: tuple[int, ...] | None = None
    disable_middle_self_attn: bool = False
    disable_middle_transformer: bool = False
    use_linear_in_transformer: bool = False
    spatial_transformer_attn_type: str = "softmax"  # "softmax-xformers": the same attention, another kernel
    adm_in_channels: int | None = None

    def unet_config(self) -> UNetConfig:
        """The network in ldm's UNetConfig terms (ldm/models/unet.py builds it); `disable_middle_transformer`
        is applied by the model (an Identity in the middle block)."""
        shared = {f.name for f in dataclasses.fields(UNetConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in shared}
        # sgm's disable_self_attentions applies only with a context_dim (openaimodel.py); ours alike
        return UNetConfig(image_size=0, use_spatial_transformer=True, legacy=False, **values)


@dataclass(frozen=True)
class SGMAutoencoderConfig:
    """sgm/models/autoencoder.py AutoencoderKL -> AutoencodingEngineLegacy -> AutoencodingEngine ->
    AbstractAutoencoder arguments (`lossconfig` is AutoencoderKL's old name of `loss_config`)."""

    embed_dim: int
    ddconfig: DDConfig
    lossconfig: TargetConfig | None = None
    loss_config: TargetConfig | None = None
    max_batch_size: int | None = None
    ckpt_path: str | None = None
    ckpt_engine: Any = None
    optimizer_config: dict | None = field(default=None, hash=False)
    lr_g_factor: float = 1.0
    trainable_ae_params: Any = field(default=None, hash=False)
    ae_optimizer_args: Any = field(default=None, hash=False)
    trainable_disc_params: Any = field(default=None, hash=False)
    disc_optimizer_args: Any = field(default=None, hash=False)
    disc_start_iter: int = 0
    diff_boost_factor: float = 3.0
    additional_decode_keys: tuple[str, ...] | None = None
    ema_decay: float | None = None
    monitor: str | None = None
    input_key: str = "jpg"

    def autoencoder_config(self) -> AutoencoderConfig:
        return AutoencoderConfig(ddconfig=self.ddconfig, embed_dim=self.embed_dim)


@dataclass(frozen=True)
class LegacyDDPMConfig:
    """discretizer.py LegacyDDPMDiscretization arguments (SD's linear beta schedule)."""

    linear_start: float = 0.00085
    linear_end: float = 0.0120
    num_timesteps: int = 1000


@dataclass(frozen=True)
class DiscreteDenoiserConfig:
    """denoiser.py DiscreteDenoiser arguments; `scaling_config` is a denoiser_scaling.py class (EpsScaling)."""

    scaling_config: TargetConfig
    num_idx: int
    discretization_config: LegacyDDPMConfig
    do_append_zero: bool = False
    quantize_c_noise: bool = True
    flip: bool = True


@dataclass(frozen=True)
class SGMCLIPEmbedderConfig:
    """encoders/modules.py FrozenCLIPEmbedder (sgm's, with always_return_pooled) plus `text_config`."""

    version: str = "openai/clip-vit-large-patch14"  # a download name in the original; we never download
    device: str | None = None  # the original defaults to its accelerator; ignored: placement is the loader's argument
    max_length: int = 77
    freeze: bool = True
    layer: str = "last"
    layer_idx: int | None = None
    always_return_pooled: bool = False
    text_config: CLIPTextConfig | None = None


@dataclass(frozen=True)
class SGMOpenCLIPEmbedder2Config:
    """encoders/modules.py FrozenOpenCLIPEmbedder2 plus `embed_dim` and `text_cfg` (default: the arch's sizes)."""

    arch: str = "ViT-H-14"
    version: str = "laion2b_s32b_b79k"
    device: str | None = None  # ignored, as SGMCLIPEmbedderConfig.device
    max_length: int = 77
    freeze: bool = True
    layer: str = "last"
    always_return_pooled: bool = False
    legacy: bool = True
    embed_dim: int | None = None
    text_cfg: OpenCLIPTextConfig | None = None


@dataclass(frozen=True)
class ConcatTimestepEmbedderConfig:
    """encoders/modules.py ConcatTimestepEmbedderND: each input dimension as timestep_embedding(v, outdim)."""

    outdim: int


EMBEDDERS = {SGM_CLIP: SGMCLIPEmbedderConfig, SGM_OPENCLIP2: SGMOpenCLIPEmbedder2Config,
             CONCAT_TIMESTEP: ConcatTimestepEmbedderConfig}


@dataclass(frozen=True)
class EmbedderConfig:
    """One entry of GeneralConditioner's emb_models: the embedder and how the conditioner feeds it."""

    target: str
    params: SGMCLIPEmbedderConfig | SGMOpenCLIPEmbedder2Config | ConcatTimestepEmbedderConfig
    is_trainable: bool = False
    input_key: str | None = None
    input_keys: tuple[str, ...] | None = None
    ucg_rate: float = 0.0  # training's condition dropout; inference (get_unconditional_conditioning) sets it to 0
    legacy_ucg_value: Any = None

    @property
    def is_text(self) -> bool:
        return self.target in (SGM_CLIP, SGM_OPENCLIP2)


@dataclass(frozen=True)
class DiffusionEngineConfig:
    """sgm/models/diffusion.py DiffusionEngine arguments; `unet`, `denoiser`, `first_stage`, `conditioner` are
    read from network_config, denoiser_config, first_stage_config, conditioner_config (its emb_models, in order)."""

    target: str
    unet: SGMUNetConfig
    denoiser: DiscreteDenoiserConfig
    first_stage: SGMAutoencoderConfig
    conditioner: tuple[EmbedderConfig, ...] = ()
    base_learning_rate: float | None = None
    sampler_config: TargetConfig | None = None
    optimizer_config: TargetConfig | None = None
    scheduler_config: TargetConfig | None = None
    loss_fn_config: TargetConfig | None = None
    network_wrapper: str | None = None
    ckpt_path: str | None = None
    use_ema: bool = False
    ema_decay_rate: float = 0.9999
    scale_factor: float = 1.0
    disable_first_stage_autocast: bool = False
    input_key: str = "jpg"
    log_keys: tuple[str, ...] | None = None
    no_cond_log: bool = False
    compile_model: bool = False
    en_and_decode_n_samples_a_time: int | None = None


def _section(data: Any, where: str, src: str, targets: tuple[str, ...], extra: tuple[str, ...] = ()) -> tuple:
    """(target, params, other keys) of a `{target, params}` mapping whose target is one of `targets`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{src}: {where} must be a mapping with 'target' and 'params', got {data!r}")
    for key in data:
        if key not in ("target", "params") + extra:
            expected = ", ".join(("target", "params") + extra)
            raise ConfigError(f"{src}: unknown field {where}.{key!r} (expected {expected})")
    target = data.get("target")
    if target not in targets:
        raise ConfigError(f"{src}: unknown target {where}.target={target!r} (supported: {', '.join(targets)})")
    return target, data.get("params") or {}, {k: v for k, v in data.items() if k in extra}


def _embedder(data: Any, where: str, src: str) -> EmbedderConfig:
    keys = tuple(f.name for f in dataclasses.fields(EmbedderConfig) if f.name not in ("target", "params"))
    target, params, extra = _section(data, where, src, tuple(EMBEDDERS), keys)
    params = build(EMBEDDERS[target], params, f"{where}.params", src)
    if target == SGM_CLIP:
        params = _clip(params, f"{where}.params", src)
    elif target == SGM_OPENCLIP2:
        params = _openclip2(params, f"{where}.params", src)
    cfg = build(EmbedderConfig, extra, where, src, target=target, params=params)
    if cfg.input_key is None:
        # the original also takes `input_keys` (several inputs of one embedder); no SDXL embedder has them
        raise ConfigError(f"{src}: {where} needs input_key" + (" (input_keys is not supported)" if cfg.input_keys
                                                              else ""))
    if cfg.input_keys is not None or cfg.legacy_ucg_value is not None:
        bad = "input_keys" if cfg.input_keys is not None else "legacy_ucg_value"
        raise ConfigError(f"{src}: unsupported field {where}.{bad}")
    return cfg


def _clip(cfg: SGMCLIPEmbedderConfig, where: str, src: str) -> SGMCLIPEmbedderConfig:
    layers = ("last", "pooled", "hidden")
    if cfg.layer not in layers:
        raise ConfigError(f"{src}: {where}.layer={cfg.layer!r} must be one of {layers}")
    # the original asserts 0 <= abs(layer_idx) <= 12 (ViT-L/14's depth); ours checks against the model's depth
    if cfg.layer == "hidden" and cfg.layer_idx is None:
        raise ConfigError(f"{src}: {where}.layer='hidden' needs {where}.layer_idx")
    return dataclasses.replace(cfg, text_config=cfg.text_config or CLIPTextConfig())


def _openclip2(cfg: SGMOpenCLIPEmbedder2Config, where: str, src: str) -> SGMOpenCLIPEmbedder2Config:
    layers = ("last", "penultimate")  # "pooled" is listed in the original's LAYERS but raises NotImplementedError
    if cfg.layer not in layers:
        raise ConfigError(f"{src}: {where}.layer={cfg.layer!r} must be one of {layers}")
    if cfg.always_return_pooled and cfg.legacy:  # the original's `assert not self.legacy`
        raise ConfigError(f"{src}: {where}.always_return_pooled needs legacy: False")
    if cfg.text_cfg is None or cfg.embed_dim is None:
        if cfg.arch not in OPENCLIP_ARCHES:
            raise ConfigError(f"{src}: {where}.arch={cfg.arch!r} has no built-in sizes (known: "
                              f"{', '.join(OPENCLIP_ARCHES)}); give {where}.embed_dim and {where}.text_cfg")
        embed_dim, text_cfg = OPENCLIP_ARCHES[cfg.arch]
        cfg = dataclasses.replace(cfg, embed_dim=cfg.embed_dim or embed_dim, text_cfg=cfg.text_cfg or text_cfg)
    return cfg


def _denoiser(data: Any, where: str, src: str) -> DiscreteDenoiserConfig:
    _, params, _ = _section(data, where, src, (DISCRETE_DENOISER,))
    if not isinstance(params, Mapping):
        raise ConfigError(f"{src}: {where}.params must be a mapping, got {params!r}")
    params = dict(params)
    scaling = params.pop("scaling_config", None)
    discretization = params.pop("discretization_config", None)
    for name, value in (("scaling_config", scaling), ("discretization_config", discretization)):
        if value is None:
            raise ConfigError(f"{src}: missing required field {where}.params.{name}")
    target, scaling_params, _ = _section(scaling, f"{where}.params.scaling_config", src, (EPS_SCALING,))
    if scaling_params:
        raise ConfigError(f"{src}: EpsScaling takes no params ({where}.params.scaling_config.params)")
    _, disc_params, _ = _section(discretization, f"{where}.params.discretization_config", src, (LEGACY_DDPM,))
    disc = build(LegacyDDPMConfig, disc_params, f"{where}.params.discretization_config.params", src)
    cfg = build(DiscreteDenoiserConfig, params, f"{where}.params", src,
                scaling_config=TargetConfig(target), discretization_config=disc)
    # the denoiser's sigma table is the whole schedule, ascending (ldm/models/sgm.py); other values build
    # another table that no released model uses
    checks = {"num_idx": cfg.num_idx == disc.num_timesteps, "do_append_zero": not cfg.do_append_zero,
              "quantize_c_noise": cfg.quantize_c_noise, "flip": cfg.flip}
    for name, ok in checks.items():
        if not ok:
            raise ConfigError(f"{src}: unsupported value {where}.params.{name}={getattr(cfg, name)!r}")
    return cfg


def _target_config(data: Any, where: str, src: str) -> TargetConfig | None:
    if data is None:
        return None
    return convert(TargetConfig, data, where, src)


def parse_sgm(model: Mapping, src: str) -> DiffusionEngineConfig:
    """The `model:` section of an sgm yaml (target DiffusionEngine) as a DiffusionEngineConfig."""
    params = dict(model.get("params") or {})
    where = "model.params"
    for section in ("network_config", "denoiser_config", "first_stage_config"):
        if section not in params:
            raise ConfigError(f"{src}: missing required field {where}.{section}")
    _, unet, _ = _section(params.pop("network_config"), f"{where}.network_config", src, (SGM_UNET,))
    unet = build(SGMUNetConfig, unet, f"{where}.network_config.params", src)
    denoiser = _denoiser(params.pop("denoiser_config"), f"{where}.denoiser_config", src)
    _, vae, _ = _section(params.pop("first_stage_config"), f"{where}.first_stage_config", src,
                         (SGM_AUTOENCODER_KL,))
    vae = build(SGMAutoencoderConfig, vae, f"{where}.first_stage_config.params", src)
    embedders = ()
    conditioner = params.pop("conditioner_config", None)
    if conditioner is not None:  # None: the original's UNCONDITIONAL_CONFIG, no embedders
        _, cond, _ = _section(conditioner, f"{where}.conditioner_config", src, GENERAL_CONDITIONER)
        cond = dict(cond)
        emb_models = cond.pop("emb_models", None)
        if cond:
            raise ConfigError(f"{src}: unknown field {where}.conditioner_config.params.{next(iter(cond))!r} "
                              "(expected emb_models)")
        if not isinstance(emb_models, list):
            raise ConfigError(f"{src}: {where}.conditioner_config.params.emb_models must be a list")
        embedders = tuple(_embedder(e, f"{where}.conditioner_config.params.emb_models[{i}]", src)
                          for i, e in enumerate(emb_models))
    sections = {name: _target_config(params.pop(name, None), f"{where}.{name}", src)
                for name in ("sampler_config", "optimizer_config", "scheduler_config", "loss_fn_config")}
    lr = convert(float | None, model.get("base_learning_rate"), "model.base_learning_rate", src)
    cfg = build(DiffusionEngineConfig, params, where, src, target=DIFFUSION_ENGINE, unet=unet, denoiser=denoiser,
                first_stage=vae, conditioner=embedders, base_learning_rate=lr, **sections)
    _check_supported(cfg, src)
    return cfg


def _check_supported(cfg: DiffusionEngineConfig, src: str) -> None:
    """Values the original accepts but this reimplementation does not: fail instead of silently differing."""
    where = "model.params"
    vae = cfg.first_stage
    checks = [
        (f"{where}.network_wrapper", cfg.network_wrapper in (None, OPENAI_WRAPPER), cfg.network_wrapper),
        (f"{where}.network_config.params.spatial_transformer_attn_type",
         cfg.unet.spatial_transformer_attn_type in ("softmax", "softmax-xformers"),
         cfg.unet.spatial_transformer_attn_type),
        # decoding in chunks may round differently from one batch; --vae_slice is ours
        (f"{where}.first_stage_config.params.max_batch_size", vae.max_batch_size is None, vae.max_batch_size),
    ]
    for name, ok, value in checks:
        if not ok:
            raise ConfigError(f"{src}: unsupported value {name}={value!r}")
    if vae.lossconfig is None and vae.loss_config is None:  # AutoencodingEngine requires it
        raise ConfigError(f"{src}: missing required field {where}.first_stage_config.params.lossconfig")
    if cfg.unet.num_heads == -1 and cfg.unet.num_head_channels == -1:
        raise ConfigError(f"{src}: {where}.network_config.params needs num_heads or num_head_channels")
