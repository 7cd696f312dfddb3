"""DiffusionEngine: SDXL base and refiner as generative-models (sgm) builds them, minus training.

Specification: sgm/models/diffusion.py DiffusionEngine, sgm/modules/diffusionmodules/wrappers.py OpenAIWrapper,
denoiser.py DiscreteDenoiser + denoiser_scaling.py EpsScaling + discretizer.py LegacyDDPMDiscretization, and the
demo's conditioning values (scripts/demo/streamlit_helpers.py get_batch, init_embedder_options). Attribute paths
are the checkpoint keys: `model.diffusion_model.*` (the UNet, ldm/models/unet.py with `label_emb` and per-level
transformer depth), `conditioner.embedders.N.*` (ldm/models/conditioner.py), `first_stage_model.*` (the KL
autoencoder, ldm/models/autoencoder.py; sgm's "vanilla-xformers" attention has the "vanilla" weights and math).
`denoiser.sigmas` is the denoiser's table: recomputed, so a checkpoint may hold it or not.

What the rest of ldm expects of a model (pipeline, samplers, fast paths, CLI) is here too: `conditioning` /
`unconditional_conditioning` (prompts + the demo's value dict -> the conditioner's dict), `apply_model(x, t,
cond)` through the one conditioning route (ldm.models.latent_diffusion.conditioning reads sgm's names),
`denoiser` (ldm.denoisers.Denoiser with quantize_sigma), `networks()`, `decode_first_stage`,
`get_first_stage_encoding`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ldm import schedules
from ldm.config_sgm import DiffusionEngineConfig
from ldm.denoisers import Denoiser
from ldm.models.latent_diffusion import _SkipRandomInitOnMeta, conditioning

# The demo's value dict (streamlit_helpers.py init_embedder_options / get_batch) -> the conditioner's batch keys
SIZE_KEYS = {"original_size_as_tuple": ("orig_height", "orig_width"),
             "crop_coords_top_left": ("crop_coords_top", "crop_coords_left"),
             "target_size_as_tuple": ("target_height", "target_width")}
AESTHETIC_KEY = "aesthetic_score"


class OpenAIWrapper(nn.Module):
    """Holds the UNet as `diffusion_model`; channels of "concat" are appended to x (sgm wrappers.py)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: torch.Tensor | None = None,
                c_crossattn: torch.Tensor | None = None, y: torch.Tensor | None = None,
                control: list[torch.Tensor] | None = None) -> torch.Tensor:
        if c_concat is not None:
            x = torch.cat((x, c_concat.to(x)), dim=1)
        return self.diffusion_model(x, t, c_crossattn, y=y, control=control)


class DiffusionEngine(nn.Module):
    """UNet + conditioner + VAE of one sgm config, with its DiscreteDenoiser."""

    family = "sgm"  # ldm.pipeline: the demo's defaults and samplers, guidance at every scale
    parameterization = "eps"  # EpsScaling
    conditioning_key = "crossattn"

    def __init__(self, cfg: DiffusionEngineConfig):
        super().__init__()
        from ldm.models.autoencoder import AutoencoderKL
        from ldm.models.conditioner import GeneralConditioner
        from ldm.models.unet import UNetModel

        self.config = cfg
        unet = UNetModel(cfg.unet.unet_config())
        if cfg.unet.disable_middle_transformer:  # sgm openaimodel.py: an Identity between the two ResBlocks
            unet.middle_block[1] = nn.Identity()
        self.model = OpenAIWrapper(unet)
        self.conditioner = GeneralConditioner(cfg.conditioner)
        self.first_stage_model = AutoencoderKL(cfg.first_stage.autoencoder_config())
        self.scale_factor = cfg.scale_factor
        disc = cfg.denoiser.discretization_config
        self.num_timesteps = disc.num_timesteps
        with torch.device("cpu"):  # real values even inside a meta-device build
            alphas_cumprod = schedules.sgm_alphas_cumprod(disc.linear_start, disc.linear_end, disc.num_timesteps)
        # not persistent: `denoiser.sigmas` of a checkpoint is recomputed (and compared, ldm/loader.py)
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float32), persistent=False)
        self.denoiser = Denoiser(self.apply_model, self.alphas_cumprod, self.parameterization, quantize_sigma=True,
                                 sigmas=schedules.sgm_sigmas(alphas_cumprod))

    # ------------------------------------------------------------------------------------------- the parts
    @property
    def unet(self) -> nn.Module:
        return self.model.diffusion_model

    @property
    def vae(self) -> nn.Module:
        return self.first_stage_model

    @property
    def sigmas(self) -> torch.Tensor:
        """The denoiser's 1000 discrete sigmas, ascending (float32, CPU)."""
        return self.denoiser.sigmas

    def discretization(self, n: int, schedule: str = "uniform") -> torch.Tensor:
        """n + 1 descending noise levels ending in 0: LegacyDDPMDiscretization ("uniform") or
        EDMDiscretization(sigmas[0], sigmas[-1], rho 7) ("karras")."""
        return schedules.sgm_sigma_list(self.sigmas, n, schedule)

    def networks(self) -> dict[str, nn.Module]:
        return {"text": self.conditioner, "unet": self.model.diffusion_model, "vae": self.first_stage_model}

    @property
    def has_aesthetic_score(self) -> bool:
        """A refiner: it is conditioned on an aesthetic score (and never zeroes its unconditional text)."""
        return AESTHETIC_KEY in self.conditioner.input_keys

    def tokenize(self, prompts: str | Sequence[str]):
        return self.conditioner.tokenize(prompts)

    # ------------------------------------------------------------------------------------------ conditioning
    def batch(self, prompts: Sequence[str], value_dict: Mapping, negative: bool = False) -> dict:
        """The conditioner's batch for `prompts` (streamlit_helpers.py get_batch): sizes and crop as (B, 2)
        (height, width) / (top, left), the aesthetic score as (B, 1); `negative`: the unconditional batch
        (its aesthetic score is value_dict["negative_aesthetic_score"], all else the same)."""
        device = self.alphas_cumprod.device
        n = len(prompts)
        batch = {}
        for key in self.conditioner.input_keys:
            if key == "txt":
                batch[key] = list(prompts)
            elif key in SIZE_KEYS:
                batch[key] = torch.tensor([value_dict[k] for k in SIZE_KEYS[key]], device=device).repeat(n, 1)
            elif key == AESTHETIC_KEY:
                score = value_dict["negative_aesthetic_score" if negative else AESTHETIC_KEY]
                batch[key] = torch.tensor([score], device=device).repeat(n, 1)
            else:
                batch[key] = value_dict[key]
        return batch

    def conditioning(self, prompts: Sequence[str], value_dict: Mapping | None = None) -> dict:
        """{"crossattn", "vector"} of a batch of prompts with the demo's values (orig_height, orig_width,
        crop_coords_top, crop_coords_left, target_height, target_width, aesthetic_score)."""
        return self.conditioner(self.batch(prompts, _values(self, value_dict)))

    def unconditional_conditioning(self, prompts: Sequence[str], value_dict: Mapping | None = None,
                                   zero_text: bool | None = None) -> dict:
        """The unconditional branch: `prompts` (the negative prompts) with the same sizes and crop and the
        negative aesthetic score. zero_text (default: a model without an aesthetic score, the base, whose
        negative prompts are all empty) zeroes every text embedding, as the demo's
        force_uc_zero_embeddings=["txt"]; the refiner's unconditional text is always encoded."""
        if zero_text is None:
            zero_text = not self.has_aesthetic_score and not any(prompts)
        batch = self.batch(prompts, _values(self, value_dict), negative=True)
        return self.conditioner(batch, force_zero_embeddings=["txt"] if zero_text else None)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond=None, **more) -> torch.Tensor:
        """UNet output (eps) for latent x at timesteps t under cond ({"crossattn", "vector"} or ldm's names):
        the one route from a conditioning to the UNet."""
        return self.model(x, t, **conditioning(cond, **more))

    # -------------------------------------------------------------------------------------- first stage
    def encode_first_stage(self, x: torch.Tensor):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, posterior, generator: torch.Generator | None = None) -> torch.Tensor:
        """scale_factor * a posterior sample (DiagonalGaussianRegularizer samples; diffusion.py
        encode_first_stage scales)."""
        z = posterior if isinstance(posterior, torch.Tensor) else posterior.sample(generator)
        return self.scale_factor * z

    def decode_first_stage(self, z: torch.Tensor, vae: nn.Module | None = None) -> torch.Tensor:
        """Latents -> images in [-1, 1], not clamped: 1.0 / scale_factor * z as diffusion.py."""
        return (vae or self.first_stage_model).decode(1.0 / self.scale_factor * z)


REQUIRED_VALUES = {"original_size_as_tuple": ("orig_height", "orig_width"), "target_size_as_tuple":
                   ("target_height", "target_width")}
DEFAULT_VALUES = {"crop_coords_top": 0, "crop_coords_left": 0, "aesthetic_score": 6.0,
                  "negative_aesthetic_score": 2.5}


def _values(model: DiffusionEngine, value_dict: Mapping | None) -> dict:
    """The demo's defaults (crop 0, 0; aesthetic 6.0 / 2.5) under `value_dict`; the sizes have none."""
    values = {**DEFAULT_VALUES, **(value_dict or {})}
    for key, names in REQUIRED_VALUES.items():
        missing = [n for n in names if n not in values]
        if key in model.conditioner.input_keys and missing:
            raise ValueError(f"this model is conditioned on {key}: give {', '.join(missing)} in value_dict")
    return values


def build_model(cfg: DiffusionEngineConfig, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> DiffusionEngine:
    """An (untrained) DiffusionEngine in eval mode; device="meta" allocates no parameter storage. Conditioner
    and VAE frozen (as the original); alphas_cumprod stays float32 on the CPU's values."""
    meta = torch.device(device).type == "meta"
    with torch.device(device), (_SkipRandomInitOnMeta() if meta else contextlib.nullcontext()):
        model = DiffusionEngine(cfg)
    alphas_cumprod = model.alphas_cumprod
    model.to(dtype=dtype)
    model.alphas_cumprod = alphas_cumprod if meta else alphas_cumprod.to(device)
    model.first_stage_model.requires_grad_(False)
    model.conditioner.requires_grad_(False)
    return model.eval()
