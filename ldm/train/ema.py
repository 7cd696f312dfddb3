"""Exponential moving average of the UNet weights, stored under the original LitEma names.

As ldm/modules/ema.py LitEma of CompVis/stable-diffusion: one buffer per trainable parameter of the
wrapped module, named after the parameter with the dots removed ("diffusion_model.out.2.weight" ->
"diffusion_modelout2weight"), plus `decay` (float32 scalar) and `num_updates` (int32 scalar). Wrapped around
`LatentDiffusion.model` (the DiffusionWrapper) and registered as `model_ema`, its state_dict gives the
checkpoint keys `model_ema.decay`, `model_ema.num_updates`, `model_ema.diffusion_modelinput_blocks00weight`,
... that the loader reads with `ema=True`.

Update rule (LitEma.forward): with n the number of updates so far (after incrementing),
    d = min(decay, (1 + n) / (10 + n))        # warm-up: early weights are forgotten quickly
    shadow <- shadow - (1 - d) * (shadow - param)
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.loader import lit_ema_name


class LitEma(nn.Module):
    """EMA of the trainable parameters of one module (the DiffusionWrapper in LatentDiffusion)."""

    def __init__(self, module: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be between 0 and 1, got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        # -1 switches the warm-up off, as the original's use_num_upates=False
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int32))
        self.names = {}
        for name, param in module.named_parameters():
            if param.requires_grad:
                self.names[name] = lit_ema_name(name)
                self.register_buffer(self.names[name], param.detach().clone().float())

    def current_decay(self) -> float:
        """The decay the next update uses (after counting it), as LitEma.forward."""
        decay = float(self.decay)
        if int(self.num_updates) >= 0:
            n = int(self.num_updates) + 1
            decay = min(decay, (1 + n) / (10 + n))
        return decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One EMA step towards the current parameters of `module` (LitEma.forward)."""
        decay = self.current_decay()
        if int(self.num_updates) >= 0:
            self.num_updates += 1
        buffers = dict(self.named_buffers())
        for name, param in module.named_parameters():
            if name not in self.names:
                if param.requires_grad:
                    raise KeyError(f"parameter {name} has no EMA shadow")
                continue
            shadow = buffers[self.names[name]]
            # lerp_ is shadow + (1 - decay) * (param - shadow): the same update in one kernel
            shadow.lerp_(param.detach().to(shadow.dtype), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite the tracked parameters of `module` with their averages (LitEma.copy_to)."""
        buffers = dict(self.named_buffers())
        for name, param in module.named_parameters():
            if name in self.names:
                param.copy_(buffers[self.names[name]])

    def averaged_state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """{prefix + parameter name: averaged tensor}, e.g. prefix "model." gives UNet checkpoint keys."""
        buffers = dict(self.named_buffers())
        return {prefix + name: buffers[shadow] for name, shadow in self.names.items()}
