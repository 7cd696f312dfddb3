"""What the trainers write: checkpoints in the ORIGINAL key layout, pruned exports and the matching yaml.

A LatentDiffusion training checkpoint's `state_dict` holds what ddpm.py LatentDiffusion would save:
  model.diffusion_model.*      the UNet (raw, optimised weights)
  model_ema.*                  LitEma: decay, num_updates and one dot-free buffer per UNet parameter
  first_stage_model.*          the VAE
  cond_stage_model.*           the text encoder (incl. transformers' `embeddings.position_ids` buffer)
  betas, alphas_cumprod, ...   the 12 schedule buffers of ddpm.py DDPM.register_schedule
so ldm.load_model reads it as it reads a released SD checkpoint. The pruned export is what released
"-pruned-emaonly" files hold: the EMA weights folded into `model.diffusion_model.*`, no `model_ema.*`, no
training state, optionally in half precision, as .safetensors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ldm.loader import EMA_PREFIX, ema_key
from ldm.schedules import ddpm_buffers, make_beta_schedule
from ldm.train.ema import LitEma

CLIP_POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def schedule_buffers(cfg) -> dict[str, torch.Tensor]:
    """The 12 buffers ddpm.py DDPM.register_schedule stores, for the config's beta schedule and v_posterior
    (float32, as the original saves them)."""
    betas = make_beta_schedule(cfg.timesteps, linear_start=cfg.linear_start, linear_end=cfg.linear_end,
                               schedule=cfg.beta_schedule, cosine_s=cfg.cosine_s)
    return {k: v.to(torch.float32) for k, v in ddpm_buffers(betas, cfg.v_posterior).items()}


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in state.items()}


def diffusion_state_dict(model, ema: LitEma) -> dict[str, torch.Tensor]:
    """The full original-layout state_dict of a LatentDiffusion under training (see the module docstring)."""
    state = _cpu(model.state_dict())
    state.update({EMA_PREFIX + k: v for k, v in _cpu(ema.state_dict()).items()})
    state.update(schedule_buffers(model.config))
    if not model.config.cond_stage.is_openclip:
        # transformers' CLIPTextModel of SD v1's time saved this persistent buffer
        state[CLIP_POSITION_IDS] = torch.arange(model.config.cond_stage.text_config.max_position_embeddings)[None]
    return state


def split_diffusion_state_dict(state: dict[str, torch.Tensor], model) -> tuple[dict, dict]:
    """(keys of `model.state_dict()`, model_ema.* without its prefix) of a checkpoint written above."""
    own = set(model.state_dict())
    model_sd = {k: v for k, v in state.items() if k in own}
    ema_sd = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    return model_sd, ema_sd


def pruned_state_dict(state: dict[str, torch.Tensor], dtype: torch.dtype | None = torch.float16,
                      ema: bool = True) -> dict[str, torch.Tensor]:
    """From a full training state_dict: the UNet (EMA weights when `ema`), VAE and text encoder only,
    floating tensors cast to `dtype` (None keeps them)."""
    out = {}
    for key, value in state.items():
        if key.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")):
            out[key] = value
    if ema:
        for key in [k for k in out if k.startswith("model.diffusion_model.")]:
            shadow = ema_key(key)
            if shadow not in state:
                raise KeyError(f"no EMA weight {shadow} for {key}")
            out[key] = state[shadow]
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return {k: v.contiguous() for k, v in out.items()}


def export_pruned(ckpt_path: str | os.PathLike, out_path: str | os.PathLike,
                  dtype: torch.dtype | None = torch.float16, ema: bool = True) -> Path:
    """Write the pruned EMA-only .safetensors of a training checkpoint; returns the output path."""
    from safetensors.torch import save_file

    payload = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = pruned_state_dict(payload["state_dict"], dtype=dtype, ema=ema)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_path), metadata={"global_step": str(payload.get("global_step", 0)),
                                              "ema": str(ema)})
    return out_path


def write_config(template: str | os.PathLike, out: str | os.PathLike, scale_factor: float | None = None,
                 parameterization: str | None = None) -> Path:
    """Copy an original-format yaml, setting model.params.scale_factor and/or .parameterization (comments and
    layout are kept; each key must occur once, as in the original configs)."""
    text = Path(template).read_text()
    for key, value in (("scale_factor", None if scale_factor is None else f"{scale_factor:.6g}"),
                       ("parameterization", parameterization)):
        if value is None:
            continue
        text, count = re.subn(rf"(?m)^(\s+{key}:\s*)\S+", lambda m: f"{m.group(1)}{value}", text)
        if count != 1:
            raise ValueError(f"{template}: expected one {key} line, found {count}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or out.read_text() != text:
        out.write_text(text)
    return out
