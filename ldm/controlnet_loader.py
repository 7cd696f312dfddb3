"""Loading a ControlNet from any of its three released file layouts, strictly (every key used or ignored by name).

- v1.0 (lllyasviel/ControlNet `control_sd15_*.pth`, tool_add_control.py): the whole ControlLDM state_dict, the
  ControlNet under `control_model.*` next to a Stable Diffusion model (whose UNet holds SD's RAW weights), maybe
  under a Lightning `state_dict` entry;
- v1.1 (ControlNet-v1-1-nightly `control_v11*_sd15_*.pth`): the `control_model.*` keys only; the demos load an
  SD checkpoint and then this file into the ControlLDM of the model's yaml (both with strict=False);
- extracted (sd-webui-controlnet's extract_controlnet.py, `control_*-fp16.safetensors`): the same keys with the
  `control_model.` prefix removed.

Any of them in fp16 or fp32: tensors are converted to the dtype asked for (that of the UNet they join). Only the
ControlNet comes from such a file; in a v1.0 file the Stable Diffusion part is reported as ignored, by name.
The architecture (and the ControlLDM options only_mid_control / global_average_pooling) comes from a ControlLDM
yaml (ldm/config_controlnet.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ldm.checkpoint import CheckpointError, read_state_dict
from ldm.loader import CONTROL, EMA_PREFIX, IGNORED, TEXT, UNET, VAE, LoadPlan, _shape, assign_weights

LAYOUTS = ("v1.0 ControlLDM", "v1.1 control_model", "extracted")
SD_PART = (UNET, VAE, TEXT, EMA_PREFIX)  # the Stable Diffusion model of a v1.0 file
SD_RULES = {name: rule for name, rule in IGNORED.items() if name != "ControlNet weights"}  # the rest of it


def layout(ckpt: Mapping) -> str:
    """Which of the released layouts a state dict has (LAYOUTS)."""
    if not any(key.startswith(CONTROL) for key in ckpt):
        return "extracted"
    if any(key.startswith(SD_PART) for key in ckpt):
        return "v1.0 ControlLDM"
    return "v1.1 control_model"


def plan_controlnet_load(net: torch.nn.Module, ckpt: Mapping) -> LoadPlan:
    """Map checkpoint keys (any layout; values tensors or shapes) onto the ControlNet's state_dict keys."""
    prefix = "" if layout(ckpt) == "extracted" else CONTROL
    plan = LoadPlan()
    for key, value in net.state_dict().items():
        source, shape = prefix + key, tuple(value.shape)
        if source not in ckpt:
            plan.missing.append(source)
            continue
        plan.sources[key] = source
        stored = _shape(ckpt[source])
        if stored != shape:
            if stored + (1, 1) == shape or stored == shape + (1, 1):  # 1x1 conv <-> linear, as ldm/loader.py
                plan.reshaped.add(key)
            else:
                plan.mismatched.append(f"{source}: model {list(shape)} vs file {list(stored)}")
    used = set(plan.sources.values())
    for key in ckpt:
        if key in used:
            continue
        if prefix and key.startswith(SD_PART):
            plan.ignored[key] = "Stable Diffusion part of a ControlLDM file"
        elif prefix and (rule := next((n for n, applies in SD_RULES.items() if applies(key)), None)) is not None:
            plan.ignored[key] = rule  # its schedule buffers, logvar
        else:
            plan.unexpected.append(key)
    return plan


def load_controlnet(config_path: str | os.PathLike, ckpt_path: str | os.PathLike,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The ControlNet (ldm.models.controlnet.ControlNet) of the ControlLDM yaml `config_path` with the weights
    of `ckpt_path` in any released layout, in eval mode with requires_grad False."""
    from ldm.config import ConfigError, load_config
    from ldm.models.controlnet import ControlNet

    cfg = load_config(config_path)
    if not hasattr(cfg, "control_stage"):
        raise ConfigError(f"{os.fspath(config_path)}: not a ControlLDM config (model.target cldm.cldm.ControlLDM "
                          f"with a control_stage_config), so it does not describe a ControlNet")
    try:
        with torch.device("meta"):
            net = ControlNet(cfg.control_stage, cfg.only_mid_control, cfg.global_average_pooling)
    except (ValueError, NotImplementedError) as err:
        raise ConfigError(f"{os.fspath(config_path)}: cannot build the ControlNet: {err}") from err
    net.to(dtype=dtype)
    ckpt = read_state_dict(ckpt_path)
    if layout(ckpt) == "extracted" and any(key.startswith(SD_PART) for key in ckpt):
        raise CheckpointError(ckpt_path, "holds a Stable Diffusion model but no ControlNet (no control_model.* keys)")
    plan = plan_controlnet_load(net, ckpt)
    plan.raise_if_incomplete(f"{ckpt_path} (a ControlNet for {os.fspath(config_path)})")
    return assign_weights(net, ckpt, plan, torch.device(device))
