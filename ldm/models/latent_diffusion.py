"""LatentDiffusion: the three networks of Stable Diffusion under the original attribute names.

As ldm/models/diffusion/ddpm.py LatentDiffusion, minus training: `model.diffusion_model` (the UNet, inside a
DiffusionWrapper), `first_stage_model` (AutoencoderKL), `cond_stage_model` (text encoder). So
`state_dict()` keys are the original checkpoint keys, except what the original stores but inference does not
need (model_ema.*, the schedule buffers, text-encoder extras), which the loader accounts for by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ldm.config import LatentDiffusionConfig, TextEncoderConfig
from ldm.schedules import alphas_cumprod_from_betas, make_beta_schedule


def _text_encoder(cfg: TextEncoderConfig) -> nn.Module:
    # imported here so a config with one text encoder does not need the other's module
    if cfg.is_openclip:
        from ldm.models.openclip_text import FrozenOpenCLIPEmbedder

        return FrozenOpenCLIPEmbedder(cfg)
    from ldm.models.clip_text import FrozenCLIPEmbedder

    return FrozenCLIPEmbedder(cfg)


def schedule_alphas_cumprod(cfg: LatentDiffusionConfig) -> torch.Tensor:
    """alphas_cumprod of the config's schedule: float64 math (as ddpm.py register_schedule), float32 result."""
    with torch.device("cpu"):  # real values even inside build_model(device="meta")
        betas = make_beta_schedule(cfg.timesteps, linear_start=cfg.linear_start, linear_end=cfg.linear_end,
                                   schedule=cfg.beta_schedule, cosine_s=cfg.cosine_s)
        return alphas_cumprod_from_betas(betas).to(torch.float32)


# The one vocabulary of conditioning (the keys of ddpm.py's `cond` dicts, plus `y` and `control`), and sgm's
# names for the same inputs (GeneralConditioner outputs, OpenAIWrapper): every model's apply_model reads these.
COND_KEYS = ("c_crossattn", "c_concat", "y", "control")
SGM_NAMES = {"crossattn": "c_crossattn", "concat": "c_concat", "vector": "y"}


def conditioning(cond=None, **more) -> dict:
    """A conditioning in canonical form {c_crossattn, c_concat, y, control} (absent entries left out).

    Accepts what the original apply_model accepts: a tensor or a list of tensors (the cross-attention
    context) or a dict; sgm's key names (crossattn, concat, vector) are read as ours. List entries of
    c_crossattn and c_concat are concatenated along dim 1 (tokens, channels), as ddpm.py DiffusionWrapper;
    `control` is a list of residuals and stays one.
    """
    if cond is None:
        cond = {}
    elif isinstance(cond, (torch.Tensor, list, tuple)):
        cond = {"c_crossattn": cond}
    elif not isinstance(cond, Mapping):
        raise TypeError(f"conditioning must be a tensor, a list of tensors or a dict, got {type(cond).__name__}")
    out = {}
    for key, value in [*cond.items(), *more.items()]:
        name = SGM_NAMES.get(key, key)
        if name not in COND_KEYS:
            raise ValueError(f"unknown conditioning {key!r}; valid: {', '.join(COND_KEYS)} "
                             f"(or sgm's {', '.join(SGM_NAMES)})")
        if value is None:
            continue
        if name in out:
            raise ValueError(f"conditioning {name!r} given twice")
        if name in ("c_crossattn", "c_concat") and isinstance(value, (list, tuple)):
            value = torch.cat(list(value), dim=1)
        out[name] = value
    return out


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` and routes conditioning to it (ddpm.py DiffusionWrapper)."""

    def __init__(self, unet: nn.Module, conditioning_key: str):
        super().__init__()
        self.diffusion_model = unet
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: torch.Tensor | None = None,
                c_crossattn: torch.Tensor | None = None, y: torch.Tensor | None = None,
                control: list[torch.Tensor] | None = None) -> torch.Tensor:
        if self.conditioning_key == "hybrid" and c_concat is None:
            raise ValueError("conditioning_key 'hybrid' needs c_concat (mask and masked-image latent)")
        if self.conditioning_key == "crossattn" and c_concat is not None:
            raise ValueError("c_concat given, but conditioning_key is 'crossattn'")
        if c_concat is not None:
            if c_concat.ndim != 4 or c_concat.shape[0] != x.shape[0] or c_concat.shape[2:] != x.shape[2:]:
                raise ValueError(f"c_concat must be (B, channels, H, W) like x {tuple(x.shape)}, got "
                                 f"{tuple(c_concat.shape)}")
            # inpainting: latent, then the extra channels (mask, masked-image latent) along dim 1
            x = torch.cat([x, c_concat.to(x)], dim=1)
        return self.diffusion_model(x, t, c_crossattn, y=y, control=control)


class LatentDiffusion(nn.Module):
    """UNet + VAE + text encoder of one Stable Diffusion config, with the config's noise schedule."""

    def __init__(self, cfg: LatentDiffusionConfig):
        super().__init__()
        from ldm.models.autoencoder import AutoencoderKL
        from ldm.models.unet import UNetModel

        self.config = cfg
        self.model = DiffusionWrapper(UNetModel(cfg.unet), cfg.conditioning_key)
        self.first_stage_model = AutoencoderKL(cfg.first_stage)
        self.cond_stage_model = _text_encoder(cfg.cond_stage)
        self.scale_factor = cfg.scale_factor
        self.parameterization = cfg.parameterization
        self.conditioning_key = cfg.conditioning_key
        self.num_timesteps = cfg.timesteps
        # Always real values on CPU, even inside a meta-device build: a loader that assigns checkpoint
        # tensors into a meta-built model then keeps the schedule (it is not in the state_dict).
        self.register_buffer("alphas_cumprod", schedule_alphas_cumprod(cfg), persistent=False)

    @property
    def unet(self) -> nn.Module:
        return self.model.diffusion_model

    @property
    def vae(self) -> nn.Module:
        return self.first_stage_model

    def networks(self) -> dict[str, nn.Module]:
        """The separately run networks by role (text encoder, UNet, VAE): what fast paths and offloading
        act on, so they never spell out attribute paths."""
        return {"text": self.cond_stage_model, "unet": self.model.diffusion_model, "vae": self.first_stage_model}

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """(B, 77, D) cross-attention context for a list of prompts."""
        return self.cond_stage_model.encode(prompts)

    def conditioning(self, prompts: list[str], text=None, negative: bool = False) -> dict:
        """The conditioning dict of a batch of prompts, as apply_model takes it. `text`: an
        ldm.prompts.TextOptions (A1111 syntax, clip skip, embeddings; None = the original's encoding);
        `negative`: the prompts are negative prompts (A1111 leaves their `<...>` tags as text)."""
        if text is None or text.is_original:
            return {"c_crossattn": [self.encode_text(prompts)]}
        from ldm import prompts as prompt_syntax

        return {"c_crossattn": [prompt_syntax.encode(self.cond_stage_model, prompts, text, strip_tags=not negative)]}

    # The original LatentDiffusion's own names for the same steps (ddpm.py), so code written against it runs.
    def get_learned_conditioning(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_text(prompts)

    def encode_first_stage(self, x: torch.Tensor):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, posterior, generator: torch.Generator | None = None) -> torch.Tensor:
        """scale_factor * a posterior sample (a plain tensor is taken as the latent itself, as the original).
        The one place where the latent scale meets the VAE posterior."""
        z = posterior if isinstance(posterior, torch.Tensor) else posterior.sample(generator)
        return self.scale_factor * z

    def decode_first_stage(self, z: torch.Tensor, vae: nn.Module | None = None) -> torch.Tensor:
        """Sampler latents -> images in [-1, 1], not clamped (`vae`: decode with another copy of the
        autoencoder, e.g. a float32 one after a half-precision overflow). 1 / scale_factor * z as ddpm.py
        decode_first_stage: z / scale_factor rounds differently (measured on 10^6 standard normal float32
        values: 22% of them differ in the last bit for scale_factor 0.18215)."""
        return (vae or self.first_stage_model).decode(1.0 / self.scale_factor * z)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond=None, **more) -> torch.Tensor:
        """UNet output (eps or v) for latent `x` at timesteps `t` under `cond`: THE route from a conditioning
        to the UNet, used by sampling (ldm/denoisers.py), training and the pipeline.

        cond: a dict with c_crossattn (context), c_concat (inpainting channels), y (class / vector), control
        (ControlNet residuals, or ControlNets with their hints and scales: a list of ldm.models.controlnet.Control,
        whose residuals are computed here), or what the original ddpm.py apply_model takes (see `conditioning`);
        keyword arguments add entries (apply_model(x, t, context, c_concat=...)).
        """
        cond = conditioning(cond, **more)
        if cond.get("control") is not None:
            from ldm.models.controlnet import is_controls, residuals

            if is_controls(cond["control"]):  # ControlNets: their summed, scaled residuals at this (x, t, context)
                cond["control"] = residuals(cond["control"], x, t, cond.get("c_crossattn"))
        return self.model(x, t, **cond)


class _SkipRandomInitOnMeta(TorchFunctionMode):
    """Random init of a meta tensor does nothing, but torch's meta normal_ imports torch._dynamo (seconds of
    start-up for every process that builds a model to load a checkpoint into): skip those calls."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in ("normal_", "uniform_", "trunc_normal_"):
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def build_model(cfg: LatentDiffusionConfig, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, with_control: bool = True) -> LatentDiffusion:
    """Build an (untrained) LatentDiffusion in eval mode; device="meta" allocates no parameter storage.
    A ControlLDM config gives a ControlLDM (with its ControlNet), or with with_control=False its Stable
    Diffusion part alone (a LatentDiffusion).

    As the original (ddpm.py instantiate_first_stage / instantiate_cond_stage), the VAE and the text encoder
    are frozen; the UNet keeps requires_grad (inference code runs under torch.no_grad()).

    Parameters and persistent buffers get `dtype`; `alphas_cumprod` stays float32 (samplers do their
    schedule arithmetic in float32 or higher, as the original's float32 buffers).
    """
    meta = torch.device(device).type == "meta"
    cls = LatentDiffusion
    if with_control and hasattr(cfg, "control_stage"):  # a ControlLDM yaml (ldm/config_controlnet.py)
        from ldm.models.controlnet import ControlLDM as cls
    with torch.device(device), (_SkipRandomInitOnMeta() if meta else contextlib.nullcontext()):
        model = cls(cfg)
    alphas_cumprod = model.alphas_cumprod
    model.to(dtype=dtype)
    if not meta:
        alphas_cumprod = alphas_cumprod.to(device)
    model.alphas_cumprod = alphas_cumprod
    model.first_stage_model.requires_grad_(False)
    model.cond_stage_model.requires_grad_(False)
    return model.eval()
