"""From checkpoint keys to a loaded LatentDiffusion: a short rule table, strict accounting, no double copy.

Our module paths are the original checkpoint key names (ldm/models/latent_diffusion.py), so most keys map to
themselves. The rules below cover what the original training code stores differently or additionally:

- EMA: LitEma (ldm/modules/ema.py) keeps the UNet's exponential moving average as buffers of `model_ema`
  named after the parameter path without dots, e.g. `model_ema.diffusion_modelinput_blocks00weight` for
  `model.diffusion_model.input_blocks.0.0.weight`, plus `model_ema.decay` and `model_ema.num_updates`. We
  default to the EMA weights (what the EMA-only releases ship, and what ddpm.py `ema_scope` swaps in when the
  yaml has `use_ema: true`); `ema=False` takes the raw weights. Note that the released inference yamls set
  `use_ema: False`, so the original scripts sample a full-EMA file (sd-v1-4-full-ema.ckpt) with its RAW
  weights: pass ema=False to reproduce them. A pruned release has no model_ema.<param> entries (the EMA is
  already folded into `model.diffusion_model.*`), so there the raw keys are used either way.
- Text encoder, v1: the released files store transformers' CLIPTextModel as
  `cond_stage_model.transformer.text_model.*`; files written against the older layout (CLIPTextTransformer
  directly, no `text_model.` level) store `cond_stage_model.transformer.embeddings...`. Both are accepted.
- 1x1 convolution vs linear: v1 SpatialTransformer projections are 1x1 convs, v2's are linear; a weight of
  shape (o, i, 1, 1) fills an (o, i) parameter and back.
- Named ignore list (IGNORED): checkpoint keys the model does not hold, each with its reason. Any other key
  that fills nothing is an error, as is any model tensor that nothing fills.
- SDXL (generative-models' DiffusionEngine, ldm/models/sgm.py): the same UNet / VAE / EMA keys; the text
  encoders live under `conditioner.embedders.N.` (CLIP in transformers' layout, open_clip's text tower), and
  `denoiser.sigmas` (the denoiser's table) is recomputed, so it may be present or not.

Memory (`load_model`): the model is built on the meta device (no storage), checkpoint tensors are memory-mapped
views (ldm/checkpoint.py), each is converted to the model tensor's dtype and the target device one at a time,
and `load_state_dict(assign=True)` adopts the result instead of copying it. A float32 checkpoint loaded as
float32 on CPU is therefore never copied at all: the parameters are copy-on-write views of the file (keep the
file in place while the model lives, as with torch.load(mmap=True)).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ldm.checkpoint import CheckpointError, read_state_dict
from ldm.schedules import DDPM_BUFFERS

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "cond_stage_model."
CLIP_NEW, CLIP_OLD = TEXT + "transformer.text_model.", TEXT + "transformer."
EMA_PREFIX = "model_ema."
CONTROL = "control_model."  # lllyasviel/ControlNet ControlLDM's ControlNet (ldm/controlnet_loader.py)
EMA_BOOKKEEPING = (EMA_PREFIX + "decay", EMA_PREFIX + "num_updates")
# transformers' position_ids buffer of a CLIP text model, v1 (cond_stage_model.) or SDXL (conditioner.embedders.N.)
POSITION_IDS = re.compile(r"(cond_stage_model|conditioner\.embedders\.\d+)\.transformer\.(text_model\.)?"
                          r"embeddings\.position_ids")
SGM_SIGMAS = "denoiser.sigmas"
# Checkpoint keys that may be left unused, by rule name. A rule only applies to a key the model does not
# take (a model that has e.g. `logit_scale` gets the file's value).
IGNORED = {
    # recomputed from the config; alphas_cumprod and betas are compared with the file (check_schedule)
    "schedule buffer": lambda key: key in DDPM_BUFFERS,
    # training state of LitEma
    "EMA bookkeeping": lambda key: key in EMA_BOOKKEEPING,
    # transformers' arange(77) buffer; our text encoder computes the positions (checked in check_position_ids)
    "CLIP position_ids": lambda key: POSITION_IDS.fullmatch(key) is not None,
    # sgm DiscreteDenoiser's table, a buffer: recomputed from the config, compared with the file (check_schedule)
    "denoiser sigmas": lambda key: key == SGM_SIGMAS,
    # open_clip's contrastive head; the cross-attention context does not use it
    "open_clip head": lambda key: key in (TEXT + "model.logit_scale", TEXT + "model.text_projection"),
    # training state of ddpm.py LatentDiffusion: the scale_by_std buffer, a learned per-step logvar, a VAE
    # loss (LPIPS/discriminator); the original's inference (load_state_dict strict=False) ignores them too
    # and takes scale_factor from the yaml
    "training state": lambda key: key in ("scale_factor", "logvar") or key.startswith(VAE + "loss."),
    # a v1.0 ControlNet file (cldm.py ControlLDM) read as Stable Diffusion only: ldm.load_controlnet reads these
    "ControlNet weights": lambda key: key.startswith(CONTROL),
}
# In a standalone VAE file (vae-ft-mse-840000-ema-pruned.ckpt): the autoencoder's training loss (LPIPS,
# discriminator, logvar) and LitEma bookkeeping; its EMA is already folded into the weights.
IGNORED_IN_VAE_FILE = {
    "VAE training loss": lambda key: key.startswith("loss."),
    "EMA bookkeeping": lambda key: key in EMA_BOOKKEEPING,
}


def lit_ema_name(name: str) -> str:
    """LitEma's buffer name for a parameter of the module it wraps: buffer names may not hold dots, so they are
    removed (ldm/modules/ema.py). The one home of this rule (training writes it, loading reads it)."""
    return name.replace(".", "")


def ema_key(unet_key: str) -> str:
    """The checkpoint key of a UNet weight's EMA (LitEma wraps `model`, the DiffusionWrapper, and is saved as
    `model_ema`): model.diffusion_model.out.2.weight -> model_ema.diffusion_modelout2weight."""
    return EMA_PREFIX + lit_ema_name(unet_key[len("model."):])


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def merge_vae(ckpt: Mapping, vae: Mapping) -> tuple[dict, dict[str, str]]:
    """The checkpoint with its VAE replaced by a standalone VAE file's weights (keys with or without
    `first_stage_model.`), and the keys that merging dropped, by rule name."""
    merged, ignored = {}, {}
    for key, value in ckpt.items():
        if key.startswith(VAE):
            ignored[key] = "VAE replaced by vae_path"
        else:
            merged[key] = value
    for key, value in vae.items():
        rule = next((name for name, applies in IGNORED_IN_VAE_FILE.items() if applies(key)), None)
        if rule is not None:
            ignored["vae file: " + key] = rule
        else:
            merged[key if key.startswith(VAE) else VAE + key] = value
    return merged, ignored


@dataclass
class LoadPlan:
    """Where every model tensor comes from and why every other checkpoint key is unused."""

    sources: dict[str, str] = field(default_factory=dict)  # model key -> checkpoint key
    reshaped: set[str] = field(default_factory=set)  # model keys filled from a 1x1-conv/linear counterpart
    ignored: dict[str, str] = field(default_factory=dict)  # checkpoint key -> rule name
    missing: list[str] = field(default_factory=list)  # model keys nothing fills
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys neither used nor ignored
    mismatched: list[str] = field(default_factory=list)  # "key: model shape vs file shape"
    use_ema: bool = False
    hints: list[str] = field(default_factory=list)  # what a mismatch means, said first


    def raise_if_incomplete(self, path, first: int = 5) -> None:
        problems = []
        for what, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                           ("shape mismatch", self.mismatched)):
            if keys:
                problems.append(f"{len(keys)} {what} (first: {', '.join(keys[:first])})")
        if problems:
            raise CheckpointError(path, "checkpoint does not match the config: " + "; ".join(self.hints + problems))


def plan_load(model: nn.Module, ckpt: Mapping, ema: bool = True,
              ignored: Mapping[str, str] | None = None) -> LoadPlan:
    """Map checkpoint keys onto `model`'s state_dict keys. `ckpt` values are tensors (real or meta) or
    shapes; nothing is read. `ignored`: keys already dropped (by merge_vae), reported with the rest."""
    targets = {key: _shape(value) for key, value in model.state_dict().items()}
    parameters = {name for name, _ in model.named_parameters()}
    unet_keys = [key for key in targets if key.startswith(UNET)]
    ema_names = {ema_key(key): key for key in unet_keys if key in parameters}  # LitEma skips buffers
    if len(ema_names) != len([key for key in unet_keys if key in parameters]):
        raise ValueError("two UNet parameter paths collide once their dots are removed")
    plan = LoadPlan(ignored=dict(ignored or {}), use_ema=ema and any(name in ckpt for name in ema_names))

    for key, shape in targets.items():
        candidates = [key]
        if plan.use_ema and key in parameters and key.startswith(UNET):
            candidates = [ema_key(key)]  # never fall back to raw: a partial EMA is a broken file
        elif key.startswith(CLIP_NEW):
            candidates.append(CLIP_OLD + key[len(CLIP_NEW):])
        source = next((name for name in candidates if name in ckpt), None)
        if source is None:
            plan.missing.append(key if candidates == [key] else f"{key} (as {' or '.join(candidates)})")
            continue
        plan.sources[key] = source
        stored = _shape(ckpt[source])
        if stored != shape:
            if stored + (1, 1) == shape or stored == shape + (1, 1):  # 1x1 conv <-> linear
                plan.reshaped.add(key)
            else:
                plan.mismatched.append(f"{source}: model {list(shape)} vs file {list(stored)}")

    plan.hints += _input_channels_hint(plan, ckpt, targets)
    used = set(plan.sources.values())
    for key in ckpt:
        if key in used:
            continue
        if key.startswith(UNET) and plan.use_ema and key in targets:
            plan.ignored[key] = "raw UNet weight (EMA used)"
        elif key in ema_names and not plan.use_ema:
            plan.ignored[key] = "EMA UNet weight (ema=False)"
        elif (rule := next((name for name, applies in IGNORED.items() if applies(key)), None)) is not None:
            plan.ignored[key] = rule
        else:
            plan.unexpected.append(key)
    return plan


def _input_channels_hint(plan: LoadPlan, ckpt: Mapping, targets: Mapping[str, tuple]) -> list[str]:
    """The mismatch of an inpainting checkpoint with an ordinary config or the reverse, in words."""
    key = UNET + "input_blocks.0.0.weight"
    source = plan.sources.get(key)
    if source is None or len(_shape(ckpt[source])) != 4 or _shape(ckpt[source])[1] == targets[key][1]:
        return []
    model, stored = targets[key][1], _shape(ckpt[source])[1]
    if (model, stored) == (9, 4):
        return ["the config is an inpainting model's (9 UNet input channels: latent, mask, masked-image latent) but "
                "the checkpoint's UNet takes 4 (an ordinary model): give its config, e.g. v1-inference.yaml"]
    if (model, stored) == (4, 9):
        return ["the checkpoint is an inpainting model's (9 UNet input channels: latent, mask, masked-image latent) "
                "but the config's UNet takes 4: give an inpainting config, e.g. v1-inpainting-inference.yaml or "
                "v2-inpainting-inference.yaml"]
    return [f"the config's UNet takes {model} input channels, the checkpoint's {stored}"]


def check_schedule(model: nn.Module, ckpt: Mapping[str, torch.Tensor], path) -> None:
    """Warn when the file's alphas_cumprod / betas differ from the schedule the config gives the model
    (a v1 file with a v2 config, a finetune with another beta range, ...)."""
    ours = model.alphas_cumprod.detach().cpu().double()
    expected = {"alphas_cumprod": ours, "betas": 1 - ours / torch.cat([ours.new_ones(1), ours[:-1]])}
    if hasattr(model, "sigmas"):  # sgm: the denoiser's sigma table
        expected[SGM_SIGMAS] = model.sigmas.double()
    for name, reference in expected.items():
        stored = ckpt.get(name)
        if stored is None or stored.is_meta:
            continue
        if stored.shape != reference.shape:
            warnings.warn(f"{path}: stored {name} has {stored.numel()} steps, the config {reference.numel()}",
                          stacklevel=3)
            continue
        # Both sides are float32 roundings of float64 math (rel. error <= 2^-24 each), the file's possibly a
        # half-precision one; betas derived from our float32 alphas_cumprod lose up to ~2.4e-7 absolute to
        # the ratio ac[t]/ac[t-1]. A genuinely different schedule differs by orders of magnitude more.
        rtol = torch.finfo(stored.dtype).eps + torch.finfo(torch.float32).eps
        if not torch.allclose(stored.double(), reference, rtol=rtol, atol=2.5e-7):
            error = ((stored.double() - reference).abs() / reference.abs()).max().item()
            warnings.warn(f"{path}: stored {name} differs from the config's schedule (max relative difference "
                          f"{error:.2e}); sampling uses the config's", stacklevel=3)


def check_position_ids(ckpt: Mapping[str, torch.Tensor], path) -> None:
    """Warn when a stored CLIP position_ids buffer is not 0..T-1: transformers used the stored values, so
    such a file (some merges wrote float, slightly off ids) behaves differently in the original."""
    for key in [k for k in ckpt if POSITION_IDS.fullmatch(k)]:
        stored = ckpt[key]
        if not stored.is_meta:
            if not torch.equal(stored.double().flatten(), torch.arange(stored.numel(), dtype=torch.float64)):
                warnings.warn(f"{path}: {key} is not 0..{stored.numel() - 1}; the model uses 0..{stored.numel() - 1}",
                              stacklevel=3)


def build_model(cfg, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                with_control: bool = True) -> nn.Module:
    """The (untrained) model of a config from ldm.config.load_config: a LatentDiffusion (CompVis / Stability
    yamls; a ControlLDM for a ControlLDM yaml unless with_control=False) or a DiffusionEngine (sgm yamls);
    device="meta" allocates no storage."""
    from ldm.config_sgm import DiffusionEngineConfig

    if isinstance(cfg, DiffusionEngineConfig):
        from ldm.models.sgm import build_model as build

        return build(cfg, device=device, dtype=dtype)
    from ldm.models.latent_diffusion import build_model as build

    return build(cfg, device=device, dtype=dtype, with_control=with_control)


def load_model(config_path: str | os.PathLike, ckpt_path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, ema: bool = True, vae_path: str | os.PathLike | None = None,
               with_control: bool = True):
    """The model of `config_path` (LatentDiffusion; for an sgm yaml DiffusionEngine; for a ControlLDM yaml a
    ControlLDM with the file's ControlNet, or with with_control=False the Stable Diffusion part alone) with the
    weights of `ckpt_path` (.ckpt/.pt/.safetensors), in eval mode with requires_grad False. ema=True uses the EMA
    UNet weights when the file has them; `vae_path` replaces the checkpoint's autoencoder with a standalone VAE
    file's."""
    from ldm.config import ConfigError, load_config

    device = torch.device(device)
    cfg = load_config(config_path)
    try:
        model = build_model(cfg, device="meta", dtype=dtype, with_control=with_control)
    except (ValueError, NotImplementedError) as err:  # options the modules refuse: name the file
        raise ConfigError(f"{os.fspath(config_path)}: cannot build the model: {err}") from err
    ckpt = read_state_dict(ckpt_path)
    ignored = {}
    if vae_path is not None:
        ckpt, ignored = merge_vae(ckpt, read_state_dict(vae_path))
    plan = plan_load(model, ckpt, ema=ema, ignored=ignored)
    where = f"{ckpt_path} + {vae_path}" if vae_path is not None else ckpt_path
    plan.raise_if_incomplete(where)
    check_schedule(model, ckpt, ckpt_path)
    check_position_ids(ckpt, ckpt_path)
    return assign_weights(model, ckpt, plan, device)


def assign_weights(model: nn.Module, ckpt: dict, plan: LoadPlan, device: torch.device) -> nn.Module:
    """Fill meta-built `model` from `ckpt` as `plan` says (consuming ckpt's entries), on `device`, in the
    dtypes the model was built with; eval mode, requires_grad False."""
    targets = model.state_dict()
    state = {}
    for key, source in plan.sources.items():
        # pop: once converted, the mapped source is only referenced here and its map can close
        value, target = ckpt.pop(source), targets[key]
        if key in plan.reshaped:
            value = value.reshape(target.shape)
        state[key] = value.to(device=device, dtype=target.dtype)
    del ckpt, targets
    model.load_state_dict(state, strict=True, assign=True)
    del state
    # tensors outside the state_dict (alphas_cumprod) were built with real values on CPU; move them along
    leftover = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors not in the state_dict stayed on the meta device: {', '.join(leftover)}")
    model.to(device)
    model.requires_grad_(False)
    return model.eval()
