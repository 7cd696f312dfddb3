"""Tiny random Stable Diffusion models and checkpoints in the ORIGINAL key layout, for tests.

`make_tiny_checkpoint` writes what the original training code would have saved for a tiny config
(tests/configs/tiny-*.yaml): `{"state_dict": ..., "global_step": 0}` (.ckpt, torch.save) or the flat
state dict (.safetensors), with

- every key of our `LatentDiffusion.state_dict()` (equal to the original names),
- `model_ema.<UNet key without "model." and without dots>` (LitEma's naming, ldm/modules/ema.py) holding
  DIFFERENT values from the raw UNet, plus `model_ema.decay` and `model_ema.num_updates`,
- the 12 schedule buffers of ddpm.py DDPM.register_schedule,
- text-encoder extras the original stores: `...embeddings.position_ids` (transformers CLIPTextModel, v1),
  `cond_stage_model.model.logit_scale` and `.text_projection` (open_clip, v2), when our model lacks them.

Weights depend only on (seed, key, shape), never on module construction order: each tensor has its own
CPU generator seeded from a hash of the key. Matrices and convolutions get std 1/sqrt(fan_in) so
activations stay O(1) through the network (a ControlNet's hint encoder 2/sqrt(fan_in), see random_tensor);
1-D weights (all norms) are 1 + 0.1 N(0, 1); biases 0.05 N(0, 1).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch

from ldm.config import LatentDiffusionConfig, load_config
from ldm.config_sgm import DiffusionEngineConfig
from ldm.loader import build_model
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.schedules import sgm_alphas_cumprod, sgm_sigmas

SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
CONFIG_DIR = Path(__file__).parent / "configs"
TINY_CONFIGS = ("tiny-v1", "tiny-v1-inpainting", "tiny-v2", "tiny-v2-v")
TINY_SGM_CONFIGS = ("tiny-sdxl-base", "tiny-sdxl-refiner")


def tiny_config_path(name: str) -> Path:
    """tests/configs/<name>.yaml, e.g. tiny_config_path("tiny-v1")."""
    return CONFIG_DIR / f"{name}.yaml"


def ema_key(unet_key: str) -> str:
    """LitEma buffer name of a UNet parameter: "model.diffusion_model.out.2.weight" ->
    "model_ema.diffusion_modelout2weight" (ldm/modules/ema.py removes the dots)."""
    assert unet_key.startswith("model.diffusion_model."), unet_key
    return "model_ema." + unet_key[len("model."):].replace(".", "")


def random_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A float32 tensor determined by (seed, key, shape) alone."""
    digest = hashlib.sha256(f"{seed}:{key}:{tuple(shape)}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    name = key.rsplit(".", 1)[-1]
    if len(shape) == 1 and name.endswith("bias"):
        return 0.05 * noise
    if len(shape) == 1:  # GroupNorm / LayerNorm scales (nothing else here is a 1-D weight)
        return 1.0 + 0.1 * noise
    if len(shape) == 0:
        return noise
    # (out, in, kh, kw) conv, (out, in) linear, (vocab, width) embedding: fan-in scaled
    fan_in = math.prod(shape[1:])
    if ".input_hint_block." in key:
        # a ControlNet's hint encoder is eight convs with SiLUs in between: with gain 1 the encoded hint
        # shrinks to std 0.05 and barely moves the output; gain 2 (He-like) keeps it O(1) (std 1.4 measured
        # on tests/configs/tiny-cldm.yaml), as in a trained ControlNet, where the hint matters
        return 2.0 * noise / math.sqrt(fan_in)
    return noise / math.sqrt(fan_in)


def schedule_buffers(cfg: LatentDiffusionConfig) -> dict[str, torch.Tensor]:
    """The buffers ddpm.py DDPM.register_schedule stores, computed as there (numpy float64, then float32)."""
    betas = np.linspace(cfg.linear_start**0.5, cfg.linear_end**0.5, cfg.timesteps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    v = cfg.v_posterior
    posterior_variance = (1 - v) * betas * (1.0 - ac_prev) / (1.0 - ac) + v * betas
    values = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }
    return {k: torch.tensor(values[k], dtype=torch.float32) for k in SCHEDULE_KEYS}


def _text_extras(cfg) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if isinstance(cfg, DiffusionEngineConfig):  # sgm: transformers' CLIP keeps position_ids (sd_xl_base_1.0)
        return {f"conditioner.embedders.{i}.transformer.text_model.embeddings.position_ids":
                ((1, e.params.text_config.max_position_embeddings), torch.int64)
                for i, e in enumerate(cfg.conditioner) if e.target.endswith(".FrozenCLIPEmbedder")}
    text = cfg.cond_stage
    if text.is_openclip:
        return {
            "cond_stage_model.model.logit_scale": ((), torch.float32),
            "cond_stage_model.model.text_projection": ((text.text_cfg.width, text.embed_dim), torch.float32),
        }
    positions = text.text_config.max_position_embeddings
    return {"cond_stage_model.transformer.text_model.embeddings.position_ids": ((1, positions), torch.int64)}


def model_state_dict(cfg: LatentDiffusionConfig | DiffusionEngineConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for exactly the keys of `build_model(cfg).state_dict()` (what `tiny_model` loads)."""
    shapes = build_model(cfg, device="meta").state_dict()
    state = {}
    for key in sorted(shapes):
        meta = shapes[key]
        if key.endswith("position_ids"):  # transformers registers arange(max_positions)[None]
            state[key] = torch.arange(meta.shape[-1], dtype=meta.dtype).reshape(meta.shape)
        elif not meta.dtype.is_floating_point:
            raise AssertionError(f"no rule for non-float tensor {key} ({meta.dtype})")
        else:
            state[key] = random_tensor(key, tuple(meta.shape), seed)
    return state


def tiny_state_dict(config_path: str | os.PathLike, seed: int = 0, ema: bool = True) -> dict[str, torch.Tensor]:
    """The full original-layout state dict of a random checkpoint for `config_path` (float32). An sgm config
    gets what the SDXL releases hold (no EMA, no schedule buffers, `denoiser.sigmas`); `ema` does not apply."""
    cfg = load_config(config_path)
    state = model_state_dict(cfg, seed)
    if isinstance(cfg, DiffusionEngineConfig):
        state.update({k: torch.arange(shape[-1], dtype=dtype).reshape(shape)
                      for k, (shape, dtype) in _text_extras(cfg).items()})
        disc = cfg.denoiser.discretization_config
        state["denoiser.sigmas"] = sgm_sigmas(sgm_alphas_cumprod(disc.linear_start, disc.linear_end,
                                                                 disc.num_timesteps))
        return state
    for key, (shape, dtype) in _text_extras(cfg).items():
        if key in state:
            continue
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[-1], dtype=dtype).reshape(shape)
        elif key.endswith("logit_scale"):
            state[key] = torch.tensor(math.log(1 / 0.07))  # open_clip's initial value
        else:
            state[key] = random_tensor(key, shape, seed)
    state.update(schedule_buffers(cfg))
    if ema:
        for key in [k for k in state if k.startswith("model.diffusion_model.")]:
            # different values from the raw weights: a salted key draws independent noise
            state[ema_key(key)] = random_tensor("ema:" + key, tuple(state[key].shape), seed)
        state["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
        state["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return state


def make_tiny_checkpoint(config_path: str | os.PathLike, out_path: str | os.PathLike, seed: int = 0,
                         ema: bool = True, fp16: bool = False, safetensors: bool | None = None) -> Path:
    """Write a random checkpoint in the original layout; `.safetensors` suffix (or safetensors=True)
    writes a flat safetensors file, anything else `torch.save({"state_dict": ..., "global_step": 0})`."""
    out_path = Path(out_path)
    state = tiny_state_dict(config_path, seed, ema)
    if fp16:  # as a half-precision release: every float tensor in fp16, integer buffers unchanged
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    if safetensors is None:
        safetensors = out_path.suffix == ".safetensors"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(out_path))
    else:
        torch.save({"state_dict": state, "global_step": 0}, out_path)
    return out_path


def tiny_model(config_path: str | os.PathLike, seed: int = 0) -> LatentDiffusion:
    """A CPU float32 LatentDiffusion (or sgm DiffusionEngine) with the raw (non-EMA) weights
    `make_tiny_checkpoint` would write, loaded directly (strict) without going through ldm.loader."""
    cfg = load_config(config_path)
    model = build_model(cfg, device="meta")  # no random init: every tensor comes from the state dict
    model.load_state_dict(model_state_dict(cfg, seed), strict=True, assign=True)
    return model
